//! Where a DeepCUT step's time goes on the CPU backend: every op at the shapes of the
//! MiniLM step (2 B_f + B_r = 48 sequences of 128 tokens, hidden 384, 12 heads, FFN 1536),
//! timed alone, times the number of calls per step. The sum is close to what
//! `deepcut-fast bench` measures (it leaves out the host side: assemble, losses).
//! Each op runs alone, so one that allocates and frees large buffers per call can pay page
//! faults here that a step with a warm heap does not (attention's rows did until it wrote
//! in place): check a surprising row with `perf record` of the `bench` command.
//!
//! cargo run --release --example op_speed [-- b t]      (default 48 128)
use deepcut_fast::backend::cpu::{
    adamw, attention, dropout, embedding, gelu, gemm, infonce, l2norm, layernorm, rows, softmax_ce,
};
use deepcut_fast::backend::{Dropout, InfoNceOptions, Precision};
use std::time::Instant;

/// Median seconds of `f` over a few calls after one warm-up.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..5)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[2]
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (b, t) = (args.first().copied().unwrap_or(48), args.get(1).copied().unwrap_or(128));
    let (h, d, layers, l) = (12, 32, 6, 13);
    let c = h * d;
    let f = 4 * c;
    let n = b * t;
    let vocab = 30522;
    let data = |len: usize, s: usize| -> Vec<f32> {
        (0..len)
            .map(|i| (((i + s) * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    };
    let x = data(n * c, 0);
    let xf = data(n * f, 3);
    let w_cc = data(c * c, 1);
    let w_fc = data(f * c, 2);
    let seqs: Vec<i32> = (0..=b).map(|r| (r * t) as i32).collect(); // b full sequences, packed
    let drop = Dropout::new(0.1, 1, 1, 1);
    let mut rows_out: Vec<(String, f64, usize)> = vec![];
    let mut add = |name: &str, s: f64, calls: usize| rows_out.push((name.to_string(), s, calls));

    let mut o_nc = vec![0f32; n * c];
    let mut o_nf = vec![0f32; n * f];
    // GEMMs, forward: 4 x [n,c]x[c,c]^T, [n,c]x[f,c]^T, [n,f]x[c,f]^T per layer
    add(
        "gemm fwd n,c,c (tb)",
        time(|| gemm::gemm(&mut o_nc, &x, &w_cc, n, c, c, false, true, 1.0, 0.0)),
        4 * layers,
    );
    add(
        "gemm fwd n,f,c (tb)",
        time(|| gemm::gemm(&mut o_nf, &x, &w_fc, n, f, c, false, true, 1.0, 0.0)),
        layers,
    );
    add(
        "gemm fwd n,c,f (tb)",
        time(|| gemm::gemm(&mut o_nc, &xf, &w_fc, n, c, f, false, true, 1.0, 0.0)),
        layers,
    );
    // backward input gradients: dX = dY W (nn)
    add(
        "gemm dX n,c,c (nn)",
        time(|| gemm::gemm(&mut o_nc, &x, &w_cc, n, c, c, false, false, 1.0, 0.0)),
        4 * layers,
    );
    add(
        "gemm dX n,f,c (nn)",
        time(|| gemm::gemm(&mut o_nf, &x, &w_fc, n, f, c, false, false, 1.0, 0.0)),
        layers,
    );
    add(
        "gemm dX n,c,f (nn)",
        time(|| gemm::gemm(&mut o_nc, &xf, &w_fc, n, c, f, false, false, 1.0, 0.0)),
        layers,
    );
    // weight gradients: dW += dY^T X (ta)
    let mut g_cc = vec![0f32; c * c];
    let mut g_fc = vec![0f32; f * c];
    add(
        "gemm dW c,c,n (ta)",
        time(|| gemm::gemm(&mut g_cc, &x, &x, c, c, n, true, false, 1.0, 1.0)),
        4 * layers,
    );
    add(
        "gemm dW f,c,n (ta)",
        time(|| gemm::gemm(&mut g_fc, &xf, &x, f, c, n, true, false, 1.0, 1.0)),
        layers,
    );
    add(
        "gemm dW c,f,n (ta)",
        time(|| gemm::gemm(&mut g_fc, &x, &xf, c, f, n, true, false, 1.0, 1.0)),
        layers,
    );
    let bias_c = data(c, 5);
    let bias_f = data(f, 6);
    add(
        "add_bias [n,c]",
        time(|| gemm::add_bias(&mut o_nc, &bias_c, n, c)),
        5 * layers,
    );
    let mut db = vec![0f32; c];
    add(
        "bias_grad [n,c]",
        time(|| gemm::bias_grad(&mut db, &x, n, c)),
        5 * layers,
    );
    let mut lse = vec![0f32; n * h];
    add(
        "attention_fwd",
        time(|| {
            attention::attention_fwd(
                &mut o_nc,
                &mut lse,
                &x,
                &x,
                &x,
                &seqs,
                b,
                n,
                t,
                h,
                d,
                drop,
                Precision::Fp32,
            )
        }),
        layers,
    );
    let (mut dq, mut dk, mut dv) = (vec![0f32; n * c], vec![0f32; n * c], vec![0f32; n * c]);
    let o2 = o_nc.clone();
    add(
        "attention_bwd",
        time(|| {
            attention::attention_bwd(
                &mut dq,
                &mut dk,
                &mut dv,
                &x,
                &x,
                &x,
                &x,
                &o2,
                &lse,
                &seqs,
                b,
                n,
                t,
                h,
                d,
                drop,
                Precision::Fp32,
            )
        }),
        layers,
    );
    add(
        "dropout_fwd/bwd [n,c]",
        time(|| dropout::dropout_fwd(&mut o_nc, &x, n * c, drop, Precision::Fp32)),
        4, // embeddings and head; the layers' dropouts ride in their LayerNorms
    );
    let (mut mu, mut rs) = (vec![0f32; n], vec![0f32; n]);
    let w = vec![1f32; c];
    add(
        "layernorm_fwd (dropout fused)",
        time(|| {
            layernorm::layernorm_fwd(
                &mut o_nc,
                &mut mu,
                &mut rs,
                &x,
                drop,
                Some(&x),
                &w,
                &w,
                n,
                c,
                1e-12,
                Precision::Fp32,
            )
        }),
        2 * layers,
    );
    add(
        "layernorm_fwd (embeddings)",
        time(|| {
            let off = Dropout::OFF;
            layernorm::layernorm_fwd(
                &mut o_nc,
                &mut mu,
                &mut rs,
                &x,
                off,
                None,
                &w,
                &w,
                n,
                c,
                1e-12,
                Precision::Fp32,
            )
        }),
        1,
    );
    let (mut dw, mut dbb) = (vec![0f32; c], vec![0f32; c]);
    let mut dx2 = vec![0f32; n * c];
    add(
        "layernorm_bwd (dropout fused)",
        time(|| {
            layernorm::layernorm_bwd(
                &mut dq,
                Some(&mut dx2),
                &mut dw,
                &mut dbb,
                &x,
                &x,
                drop,
                Some(&x),
                &w,
                &mu,
                &rs,
                n,
                c,
                Precision::Fp32,
            )
        }),
        2 * layers,
    );
    add(
        "layernorm_bwd (embeddings)",
        time(|| {
            let off = Dropout::OFF;
            layernorm::layernorm_bwd(
                &mut dq,
                None,
                &mut dw,
                &mut dbb,
                &x,
                &x,
                off,
                None,
                &w,
                &mu,
                &rs,
                n,
                c,
                Precision::Fp32,
            )
        }),
        1,
    );
    add(
        "bias_gelu_fwd [n,f]",
        time(|| gelu::bias_gelu_fwd(&mut o_nf, &xf, &bias_f, n, f, Precision::Fp32)),
        layers,
    );
    let mut dbf = vec![0f32; f];
    let mut dxf = vec![0f32; n * f];
    add(
        "bias_gelu_bwd [n,f]",
        time(|| gelu::bias_gelu_bwd(&mut dxf, &mut dbf, &xf, &xf, &bias_f, n, f, Precision::Fp32)),
        layers,
    );
    add(
        "add_inplace [n,c] (InfoNCE's dh)",
        time(|| {
            for (a, s) in o_nc.iter_mut().zip(&x) {
                *a += s;
            }
        }),
        1, // the residual paths ride in the GEMMs' beta term
    );
    let ids: Vec<i32> = (0..n).map(|i| ((i * 7919) % vocab) as i32).collect();
    let pos: Vec<i32> = (0..n).map(|i| (i % t) as i32).collect();
    let types = vec![0i32; n];
    let order = deepcut_fast::backend::embedding_order(&ids, &pos, &types);
    let wte = data(vocab * c, 7);
    let wpe = data(512 * c, 8);
    let wtt = data(2 * c, 9);
    add(
        "embedding_fwd",
        time(|| embedding::embedding_fwd(&mut o_nc, &ids, &pos, &types, &wte, &wpe, &wtt, n, c)),
        1,
    );
    let (mut dwte, mut dwpe, mut dwtt) = (vec![0f32; vocab * c], vec![0f32; 512 * c], vec![0f32; 2 * c]);
    add(
        "embedding_bwd",
        time(|| embedding::embedding_bwd(&mut dwte, &mut dwpe, &mut dwtt, &x, &ids, &pos, &types, &order, n, c)),
        1,
    );
    let labels: Vec<i32> = (0..n).map(|i| (i % l) as i32).collect();
    let logits = data(n * l, 10);
    let mut losses = vec![0f32; n];
    add(
        "softmax_ce_fwd",
        time(|| softmax_ce::softmax_ce_fwd(&mut losses, &logits, &labels, n, l)),
        1,
    );
    let mut dlog = vec![0f32; n * l];
    add(
        "softmax_ce_bwd",
        time(|| softmax_ce::softmax_ce_bwd(&mut dlog, &logits, &labels, n, l, 1.0)),
        1,
    );
    // contrastive term: m labelled rows (126 of 128 per sequence), a third anchors
    let m = b * (t - 2);
    let (z, zl, za, zp) = infonce::synthetic_rows(m, c);
    let idx: Vec<i32> = (0..m as i32).collect();
    let mut zraw = vec![0f32; m * c];
    add("gather_rows", time(|| rows::gather_rows(&mut zraw, &x, &idx, m, c)), 1);
    let mut zn = vec![0f32; m * c];
    let mut norm = vec![0f32; m];
    add(
        "l2norm_fwd",
        time(|| l2norm::l2norm_fwd(&mut zn, &mut norm, &z, m, c)),
        1,
    );
    let opts = InfoNceOptions::default();
    let (mut il, mut ilse, mut dz) = (vec![0f32; m], vec![0f32; m], vec![0f32; m * c]);
    add(
        "infonce_fwd",
        time(|| infonce::infonce_fwd(&mut il, &mut ilse, &z, &zl, &za, &zp, m, c, opts, Precision::Fp32)),
        1,
    );
    add(
        "infonce_bwd",
        time(|| infonce::infonce_bwd(&mut dz, &z, &ilse, &zl, &za, &zp, m, c, opts, 1.0, Precision::Fp32)),
        1,
    );
    let mut dzr = vec![0f32; m * c];
    add(
        "l2norm_bwd",
        time(|| l2norm::l2norm_bwd(&mut dzr, &dz, &zn, &norm, m, c)),
        1,
    );
    let mut dh = vec![0f32; n * c];
    add(
        "scatter_add_rows",
        time(|| rows::scatter_add_rows(&mut dh, &dzr, &idx, m, c)),
        1,
    );
    // optimiser over every parameter (22.6M for MiniLM with its vocabulary)
    let np = 22_570_381;
    let mut p = data(np, 11);
    let g = data(np, 12);
    let (mut m1, mut v1) = (vec![0f32; np], vec![0f32; np]);
    add(
        "sum_squares (clip)",
        time(|| {
            std::hint::black_box(adamw::sum_squares(&g, np));
        }),
        1,
    );
    add(
        "adamw",
        time(|| adamw::adamw(&mut p, &g, &mut m1, &mut v1, np, 1e-5, 0.9, 0.999, 1e-8, 0.01, 1, 1.0)),
        1,
    );
    add(
        "zero grads",
        time(|| {
            m1.fill(0.0);
        }),
        1,
    );

    let total: f64 = rows_out.iter().map(|(_, s, k)| s * *k as f64).sum();
    println!(
        "{:<32} {:>10} {:>6} {:>12} {:>6}",
        "op", "ms/call", "calls", "ms/step", "share"
    );
    for (name, s, k) in &rows_out {
        let per = s * *k as f64;
        println!(
            "{name:<32} {:>10.3} {:>6} {:>12.1} {:>5.1}%",
            s * 1e3,
            k,
            per * 1e3,
            100.0 * per / total
        );
    }
    println!("{:<32} {:>10} {:>6} {:>12.1}", "total", "", "", total * 1e3);
}
