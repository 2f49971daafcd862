//! Quick per-op timing at the MiniLM step shape (32 x 128 tokens).
use deepcut_fast::backend::cpu::{attention, dropout, gelu, layernorm};
use deepcut_fast::backend::Dropout;
use std::time::Instant;
fn time(name: &str, mut f: impl FnMut()) {
    f();
    let t0 = Instant::now();
    for _ in 0..3 {
        f();
    }
    println!("{name}: {:.1} ms", t0.elapsed().as_secs_f64() / 3.0 * 1e3);
}
fn main() {
    let (b, t, h, d) = (32, 128, 12, 32);
    let c = h * d;
    let n = b * t;
    let x: Vec<f32> = (0..n * c).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mask = vec![1f32; n];
    let mut out = vec![0f32; n * c];
    let mut lse = vec![0f32; b * h * t];
    let drop = Dropout::new(0.1, 1, 1, 1);
    time("attention_fwd", || {
        attention::attention_fwd(&mut out, &mut lse, &x, &x, &x, &mask, b, t, h, d, drop)
    });
    let (mut dq, mut dk, mut dv) = (vec![0f32; n * c], vec![0f32; n * c], vec![0f32; n * c]);
    let o2 = out.clone();
    time("attention_bwd", || {
        attention::attention_bwd(
            &mut dq, &mut dk, &mut dv, &x, &x, &x, &x, &o2, &lse, &mask, b, t, h, d, drop,
        )
    });
    time("dropout_fwd [n,c]", || dropout::dropout_fwd(&mut out, &x, n * c, drop));
    let (mut mu, mut rs) = (vec![0f32; n], vec![0f32; n]);
    let w = vec![1f32; c];
    time("layernorm_fwd", || {
        layernorm::layernorm_fwd(&mut out, &mut mu, &mut rs, &x, Some(&x), &w, &w, n, c, 1e-12)
    });
    let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
    time("layernorm_bwd", || {
        layernorm::layernorm_bwd(&mut dq, &mut dw, &mut db, &x, &x, Some(&x), &w, &mu, &rs, n, c)
    });
    let xf: Vec<f32> = (0..n * 4 * c)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut of = vec![0f32; n * 4 * c];
    let bf = vec![0.1f32; 4 * c];
    time("bias_gelu_fwd [n,f]", || {
        gelu::bias_gelu_fwd(&mut of, &xf, &bf, n, 4 * c)
    });
    let mut dbf = vec![0f32; 4 * c];
    let mut dxf = vec![0f32; n * 4 * c];
    time("bias_gelu_bwd [n,f]", || {
        gelu::bias_gelu_bwd(&mut dxf, &mut dbf, &xf, &xf, &bf, n, 4 * c)
    });
}
