use deepcut_fast::backend::cpu::gemm::gemm;
use std::time::Instant;
fn main() {
    let (m, n, k) = (4096, 1536, 384);
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; n * k];
    let mut c = vec![0f32; m * n];
    for (ta, tb) in [(false, true), (false, false), (true, false)] {
        let t0 = Instant::now();
        for _ in 0..5 {
            gemm(&mut c, &a, &b, m, n, k, ta, tb, 1.0, 0.0);
        }
        let s = t0.elapsed().as_secs_f64() / 5.0;
        println!("ta={ta} tb={tb}: {:.1} GFLOP/s", 2.0 * (m * n * k) as f64 / s / 1e9);
    }
}
