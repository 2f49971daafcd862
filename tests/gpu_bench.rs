//! GPU throughput, for scripts/gpu-check.sh (ignored by default: `--ignored` runs them).
//! Prints `BENCH <name> <value> <unit>` lines; nothing is asserted about speed.
//!
//! - minilm_step: forward + CE + backward + clipped AdamW of the MiniLM shape (6 layers,
//!   hidden 384, 12 heads, FFN 1536) on 32 x 128 tokens, dropout on: GPU fp32, GPU bf16
//!   (GEMMs on tensor cores) and CPU fp32.
//! - infonce: fused class-masked InfoNCE forward + backward (detached columns) at m = 4096,
//!   16384 and 65536 rows of width 384, the DeepCUT batch shape of benches/infonce.rs; compare
//!   with scripts/infonce_torch.py (the same loss in PyTorch on the same GPU).
//! - kernels: every kernel family at the roberta-base step shape (two views of bf 8 and
//!   br 32: 48 sequences x 128 tokens, hidden 768, 12 heads of 64, FFN 3072), each
//!   against its floor: the memory-bound ones in GB/s against a device-to-device copy's
//!   bandwidth, the matmul-bound ones (GEMM, attention) in TFLOP/s against the bf16 GEMM
//!   rate measured on the same card.
//!
//! Times are wall-clock around device-synchronised loops after a warm-up.
use deepcut_fast::backend::cpu::Cpu;
use deepcut_fast::backend::cuda::Cuda;
use deepcut_fast::backend::{Backend, InfoNceOptions, Precision};
#[path = "common/kernel_suite.rs"]
mod kernel_suite;
use deepcut_fast::model::{Dims, HostBatch, Mode, Model};
use deepcut_fast::train::optim::{LossScaling, OptimConfig, Optimizer};
use deepcut_fast::util::Lcg;
use kernel_suite::{Shape, Work};
use std::time::Instant;

fn gpu() -> Option<Cuda> {
    match Cuda::new(0) {
        Ok(g) => Some(g),
        Err(e) => {
            use std::io::Write;
            if std::env::var("DEEPCUT_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("DEEPCUT_REQUIRE_GPU=1 but there is no usable CUDA device: {e}");
            }
            let _ = writeln!(std::io::stderr(), "SKIPPED: no usable CUDA device ({e})");
            None
        }
    }
}

/// The all-MiniLM-L6-v2 shape with a 13-label head (WNUT17).
fn minilm_dims() -> Dims {
    let cfg = deepcut_fast::model::ModelConfig::preset("minilm-l6").expect("built-in preset");
    Dims::from_config(&cfg, 13)
}

/// Seconds per training step of the MiniLM shape on `be`.
fn step_time<B: Backend>(be: B, steps: usize, sync: impl Fn(&B), precision: Precision) -> f64 {
    let dims = minilm_dims();
    let (b, t) = (32, 128);
    let mut rng = Lcg::with_increment(1, 1);
    let mut model = Model::new(be, dims.clone(), b * t, |_, shape| {
        (0..shape.iter().product::<usize>())
            .map(|_| (rng.next_unit() - 0.5) * 0.04)
            .collect()
    })
    .with_precision(precision);
    let batch = HostBatch::synthetic(b, t, dims.vocab, dims.labels, 0);
    let mut opt = Optimizer::new(
        &model,
        OptimConfig {
            lr: 1e-4,
            weight_decay: 0.01,
            warmup: 0,
            total: 1000,
            clip: 1.0,
        },
    )
    .with_precision(precision, LossScaling::default());
    let mut one = |step: u64, model: &mut Model<B>| {
        model.set_loss_scale(opt.loss_scale());
        model.forward(&batch, Mode::Train { seed: 1, step });
        model.zero_grads();
        model.backward(opt.loss_scale() / batch.labelled() as f32, None);
        let _ = model.ce_loss(&batch);
        opt.update(model).expect("finite");
    };
    one(1, &mut model); // warm-up (allocations, first launches)
    sync(&model.be);
    let t0 = Instant::now();
    for s in 0..steps {
        one(2 + s as u64, &mut model);
    }
    sync(&model.be);
    t0.elapsed().as_secs_f64() / steps as f64
}

#[test]
#[ignore]
fn minilm_step() {
    let Some(g) = gpu() else { return };
    let name = g.name();
    let tokens = 32.0 * 128.0;
    let tg = step_time(g, 10, |g: &Cuda| g.synchronize(), Precision::Fp32);
    println!(
        "BENCH minilm_step_gpu {:.1} tokens/s ({:.2} ms/step, fp32, {name})",
        tokens / tg,
        tg * 1e3
    );
    // bf16: GEMMs and attention on tensor cores, their operands stored in 16 bits
    let g = Cuda::new(0).expect("the device opened a moment ago");
    let tb = step_time(g, 10, |g: &Cuda| g.synchronize(), Precision::Bf16);
    println!(
        "BENCH minilm_step_gpu_bf16 {:.1} tokens/s ({:.2} ms/step, bf16 storage, tensor cores, {name})",
        tokens / tb,
        tb * 1e3
    );
    let tc = step_time(Cpu, 2, |_| {}, Precision::Fp32);
    println!(
        "BENCH minilm_step_cpu {:.1} tokens/s ({:.1} ms/step, {} threads)",
        tokens / tc,
        tc * 1e3,
        rayon::current_num_threads()
    );
}

#[test]
#[ignore]
fn infonce() {
    let Some(g) = gpu() else { return };
    let c = 384;
    for m in [4096, 16384, 65536] {
        let before = g.memory_used();
        let (z, labels, anchor, partner) = deepcut_fast::backend::cpu::infonce::synthetic_rows(m, c);
        let mut dz_ = g.alloc(m * c);
        g.upload(&mut dz_, &z);
        let up_i = |x: &[i32]| {
            let mut b = g.alloc_i32(x.len());
            g.upload_i32(&mut b, x);
            b
        };
        let (dl, da, dp) = (up_i(&labels), up_i(&anchor), up_i(&partner));
        let (mut loss, mut lse, mut grad) = (g.alloc(m), g.alloc(m), g.alloc(m * c));
        let opts = InfoNceOptions::default();
        let mut run = |prec: Precision| {
            g.infonce_fwd(&mut loss, &mut lse, &dz_, &dl, &da, &dp, m, c, opts, prec);
            g.infonce_bwd(&mut grad, &dz_, &lse, &dl, &da, &dp, m, c, opts, 0.3 / 1000.0, prec);
        };
        run(Precision::Fp32);
        g.synchronize();
        let reps = if m <= 4096 { 10 } else { 3 };
        // device memory this size took (inputs, outputs and the kernels' scratch): O(m c)
        let used = match (before, g.memory_used()) {
            (Some(a), Some(b)) => format!("{} MiB on the device", b.saturating_sub(a) >> 20),
            _ => "device memory unknown".to_string(),
        };
        // fp32 (CUDA cores, the PyTorch script's precision) and bf16 (similarities on
        // tensor cores)
        for prec in [Precision::Fp32, Precision::Bf16] {
            run(prec);
            g.synchronize();
            let t0 = Instant::now();
            for _ in 0..reps {
                run(prec);
            }
            g.synchronize();
            let s = t0.elapsed().as_secs_f64() / reps as f64;
            let pairs = (m as f64) * (m as f64) / 3.0; // anchors x columns
            let tag = if prec == Precision::Fp32 {
                String::new()
            } else {
                format!("_{prec}")
            };
            println!(
                "BENCH infonce_fwd_bwd_m{m}_c{c}{tag} {:.3} ms ({:.2e} pairs/s; {used} for {} MiB of z)",
                s * 1e3,
                pairs / s,
                (m * c * 4) >> 20
            );
        }
    }
}

/// Seconds per call of `f` on the device (3 warm-up calls, then `reps` timed).
fn per_call(g: &Cuda, reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    g.synchronize();
    let t0 = Instant::now();
    for _ in 0..reps {
        f();
    }
    g.synchronize();
    t0.elapsed().as_secs_f64() / reps as f64
}

#[test]
#[ignore]
fn kernels() {
    let Some(g) = gpu() else { return };
    // DEEPCUT_BENCH_SMALL=1: tiny shapes, to smoke-test this bench on the CPU emulator
    let small = std::env::var("DEEPCUT_BENCH_SMALL").is_ok();
    let shape = if small { Shape::small() } else { Shape::roberta_step() };
    // floors: copy bandwidth (read + write) and the bf16 / fp32 GEMM rates at the FFN shape
    let big = if small { 1 << 16 } else { 64 << 20 };
    let (src, mut dst) = (g.alloc(big), g.alloc(big));
    let bw = (2 * 4 * big) as f64 / per_call(&g, 10, || g.copy(&mut dst, &src, big));
    let (n, c, f) = (shape.b * shape.t, shape.h * shape.d, shape.f);
    let fill = |len: usize| -> Vec<f32> { (0..len).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect() };
    let up = |x: &[f32]| {
        let mut buf = g.alloc(x.len());
        g.upload(&mut buf, x);
        buf
    };
    // bf16 operands stored as a bf16 step stores them (alloc_rounded: 16 bits), fp32 output
    let lo = |x: &[f32]| {
        let mut buf = g.alloc_rounded(x.len(), Precision::Bf16);
        let r: Vec<f32> = x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        g.upload(&mut buf, &r);
        buf
    };
    let (ga, gb, mut gc) = (up(&fill(n * c)), up(&fill(f * c)), g.alloc(n * f));
    let (la, lb) = (lo(&fill(n * c)), lo(&fill(f * c)));
    let gemm_flops = 2.0 * (n * f * c) as f64;
    let bf16_rate = gemm_flops
        / per_call(&g, 20, || {
            g.gemm(&mut gc, &la, &lb, n, f, c, false, true, 1.0, 0.0, Precision::Bf16)
        });
    let fp32_rate = gemm_flops
        / per_call(&g, 20, || {
            g.gemm(&mut gc, &ga, &gb, n, f, c, false, true, 1.0, 0.0, Precision::Fp32)
        });
    println!(
        "BENCH floor_copy_bandwidth {:.0} GB/s (device-to-device copy, read + write)",
        bw / 1e9
    );
    println!(
        "BENCH floor_gemm_bf16 {:.1} TFLOP/s ({n}x{f}x{c}, the backend's gemm on bf16 operands, fp32 out)",
        bf16_rate / 1e12
    );
    println!("BENCH floor_gemm_fp32 {:.1} TFLOP/s ({n}x{f}x{c})", fp32_rate / 1e12);
    // The step's GEMM shapes: the backend's gemm on 16-bit operands (what a bf16 step runs)
    // against plain cublasGemmEx on bf16 (the floor), and against the same product on fp32
    // buffers holding bf16 values (cuBLASLt FAST_16BF: the path before 16-bit storage).
    for (what, mnk) in [("ffn-in", (f, n, c)), ("ffn-out", (c, n, f)), ("qkvo", (c, n, c))] {
        let native = deepcut_fast::backend::cuda::gemm::bf16_gemm_rate_at(&g, mnk, true, 10)
            .expect("bf16 GEMM with fp32 output");
        let (mm, nn, kk) = mnk;
        let flops = 2.0 * (mm * nn * kk) as f64;
        let mut out = g.alloc(nn * mm);
        let (a16, b16) = (lo(&fill(nn * kk)), lo(&fill(mm * kk)));
        let ours = flops
            / per_call(&g, 20, || {
                g.gemm(&mut out, &a16, &b16, nn, mm, kk, false, true, 1.0, 0.0, Precision::Bf16)
            });
        let (a, b) = (up(&fill(nn * kk)), up(&fill(mm * kk)));
        let fp32_buffers = flops
            / per_call(&g, 20, || {
                g.gemm(&mut out, &a, &b, nn, mm, kk, false, true, 1.0, 0.0, Precision::Bf16)
            });
        println!(
            "BENCH gemm_{what}_bf16 {:.1} TFLOP/s ours on 16-bit operands ({:.0}% of cublasGemmEx's {:.1}); \
             {:.1} TFLOP/s on fp32 buffers ({nn}x{mm}x{kk})",
            ours / 1e12,
            100.0 * ours / native,
            native / 1e12,
            fp32_buffers / 1e12
        );
    }
    println!("kernels at {}", shape.describe());
    kernel_suite::kernels(&g, shape, &mut |name, work, op| {
        let reps = if name == "embedding_bwd" { 5 } else { 20 };
        let s = per_call(&g, reps, op);
        let name = name.replace(['/', ' '], "_");
        match work {
            Work::Bytes(b) => {
                let rate = b as f64 / s;
                println!(
                    "BENCH kernel_{name} {:.3} ms ({:.0} GB/s, {:.0}% of copy bandwidth)",
                    s * 1e3,
                    rate / 1e9,
                    100.0 * rate / bw
                )
            }
            Work::Flops(fl) => println!(
                "BENCH kernel_{name} {:.3} ms ({:.1} TFLOP/s, {:.0}% of the bf16 GEMM rate)",
                s * 1e3,
                fl as f64 / s / 1e12,
                100.0 * fl as f64 / s / bf16_rate
            ),
        }
    });
}
