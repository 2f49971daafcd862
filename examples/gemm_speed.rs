//! GFLOP/s of the CPU backend's GEMM at the shapes of a MiniLM step (48 x 128 tokens, and
//! 1,536, about what a packed WNUT17 step holds):
//! best of 7 calls, per (m, n, k, transposes). `RAYON_NUM_THREADS` (and `MATMUL_NUM_THREADS` for
//! matrixmultiply) set its threads; `DEEPCUT_CPU_GEMM=matrixmultiply|gemm` picks the library.
//!
//! cargo run --release --example gemm_speed
use deepcut_fast::backend::cpu::gemm::gemm;
use std::time::Instant;
fn main() {
    let shapes = [
        // forward (x W^T)
        (6144, 384, 384, false, true),
        (6144, 1536, 384, false, true),
        (6144, 384, 1536, false, true),
        // input gradients (dy W)
        (6144, 384, 384, false, false),
        (6144, 1536, 384, false, false),
        (6144, 384, 1536, false, false),
        // weight gradients (dy^T x)
        (384, 384, 6144, true, false),
        (1536, 384, 6144, true, false),
        (384, 1536, 6144, true, false),
        // an evaluation batch of 1,024 tokens
        (1024, 384, 384, false, true),
        (1024, 1536, 384, false, true),
        (1024, 384, 1536, false, true),
        (2048, 2048, 2048, false, true),
        // a real step's 1,536 tokens
        (1536, 384, 384, false, true),
        (1536, 1536, 384, false, true),
        (1536, 384, 1536, false, true),
        (1536, 384, 384, false, false),
        (1536, 1536, 384, false, false),
        (1536, 384, 1536, false, false),
        (384, 384, 1536, true, false),
        (1536, 384, 1536, true, false),
        (384, 1536, 1536, true, false),
    ];
    for (m, n, k, ta, tb) in shapes {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; n * k];
        let mut c = vec![0f32; m * n];
        gemm(&mut c, &a, &b, m, n, k, ta, tb, 1.0, 0.0);
        let mut best = f64::INFINITY;
        for _ in 0..7 {
            let t0 = Instant::now();
            gemm(&mut c, &a, &b, m, n, k, ta, tb, 1.0, 0.0);
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "ours {m}x{n}x{k} ta={} tb={}: {:.1} GFLOP/s",
            ta as u8,
            tb as u8,
            2.0 * (m * n * k) as f64 / best / 1e9
        );
    }
}
