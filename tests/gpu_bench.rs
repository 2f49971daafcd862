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
use deepcut_fast::backend::{Backend, Dropout, InfoNceOptions, Precision};
use deepcut_fast::model::{Dims, HostBatch, Mode, Model};
use deepcut_fast::train::optim::{LossScaling, OptimConfig, Optimizer};
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
    let mut seed = 1u64;
    let mut model = Model::new(be, dims.clone(), b * t, |_, shape| {
        (0..shape.iter().product::<usize>())
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
            })
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
    // bf16: GEMMs on tensor cores (inputs rounded, fp32 buffers)
    let g = Cuda::new(0).expect("the device opened a moment ago");
    let tb = step_time(g, 10, |g: &Cuda| g.synchronize(), Precision::Bf16);
    println!(
        "BENCH minilm_step_gpu_bf16 {:.1} tokens/s ({:.2} ms/step, bf16 GEMMs on tensor cores, {name})",
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
        let mut run = || {
            g.infonce_fwd(&mut loss, &mut lse, &dz_, &dl, &da, &dp, m, c, opts);
            g.infonce_bwd(&mut grad, &dz_, &lse, &dl, &da, &dp, m, c, opts, 0.3 / 1000.0);
        };
        run();
        g.synchronize();
        let reps = if m <= 4096 { 10 } else { 3 };
        // device memory this size took (inputs, outputs and the kernels' scratch): O(m c)
        let used = match (before, g.memory_used()) {
            (Some(a), Some(b)) => format!("{} MiB on the device", b.saturating_sub(a) >> 20),
            _ => "device memory unknown".to_string(),
        };
        let t0 = Instant::now();
        for _ in 0..reps {
            run();
        }
        g.synchronize();
        let s = t0.elapsed().as_secs_f64() / reps as f64;
        let pairs = (m as f64) * (m as f64) / 3.0; // anchors x columns
        println!(
            "BENCH infonce_fwd_bwd_m{m}_c{c} {:.3} ms ({:.2e} pairs/s; {used} for {} MiB of z)",
            s * 1e3,
            pairs / s,
            (m * c * 4) >> 20
        );
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
    let (b, t, h, d) = if small {
        (2, 40, 2, 64)
    } else {
        (48usize, 128usize, 12usize, 64usize)
    };
    let (n, c, f, labels) = (b * t, h * d, 4 * h * d, 13usize);
    let fill = |len: usize, seed: usize| -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    };
    let up = |x: &[f32]| {
        let mut buf = g.alloc(x.len());
        g.upload(&mut buf, x);
        buf
    };
    let up_i = |x: &[i32]| {
        let mut buf = g.alloc_i32(x.len());
        g.upload_i32(&mut buf, x);
        buf
    };
    let drop = Dropout::new(0.1, 1, 1, 1);
    // floors: copy bandwidth (read + write) and the bf16 / fp32 GEMM rates
    let big = if small { 1 << 16 } else { 64 << 20 };
    let (src, mut dst) = (g.alloc(big), g.alloc(big));
    let bw = (2 * 4 * big) as f64 / per_call(&g, 10, || g.copy(&mut dst, &src, big));
    let (ga, gb, mut gc) = (up(&fill(n * c, 1)), up(&fill(f * c, 2)), g.alloc(n * f));
    let gemm_flops = 2.0 * (n * f * c) as f64;
    let mut gemm =
        |p: Precision| gemm_flops / per_call(&g, 20, || g.gemm(&mut gc, &ga, &gb, n, f, c, false, true, 1.0, 0.0, p));
    let (bf16_rate, fp32_rate) = (gemm(Precision::Bf16), gemm(Precision::Fp32));
    println!(
        "BENCH floor_copy_bandwidth {:.0} GB/s (device-to-device copy, read + write)",
        bw / 1e9
    );
    println!(
        "BENCH floor_gemm_bf16 {:.1} TFLOP/s ({n}x{f}x{c}, cuBLAS tensor cores)",
        bf16_rate / 1e12
    );
    println!("BENCH floor_gemm_fp32 {:.1} TFLOP/s ({n}x{f}x{c})", fp32_rate / 1e12);

    let report_bytes = |name: &str, s: f64, bytes: usize| {
        let rate = bytes as f64 / s;
        println!(
            "BENCH kernel_{name} {:.3} ms ({:.0} GB/s, {:.0}% of copy bandwidth)",
            s * 1e3,
            rate / 1e9,
            100.0 * rate / bw
        );
    };
    let report_flops = |name: &str, s: f64, flops: f64, floor: f64| {
        println!(
            "BENCH kernel_{name} {:.3} ms ({:.1} TFLOP/s, {:.0}% of the bf16 GEMM rate)",
            s * 1e3,
            flops / s / 1e12,
            100.0 * flops / s / floor
        );
    };

    // attention, fp32 SIMT and bf16 tensor cores; FLOPs as benches/ops.rs counts them
    let (q, k, v, dout) = (
        up(&fill(n * c, 3)),
        up(&fill(n * c, 4)),
        up(&fill(n * c, 5)),
        up(&fill(n * c, 6)),
    );
    let mask = up(&vec![1.0; n]);
    let (mut out, mut lse) = (g.alloc(n * c), g.alloc(b * h * t));
    let (mut dq, mut dk, mut dv) = (g.alloc(n * c), g.alloc(n * c), g.alloc(n * c));
    let att = 4.0 * (b * t * t * c) as f64;
    for p in [Precision::Fp32, Precision::Bf16] {
        let s = per_call(&g, 20, || {
            g.attention_fwd(&mut out, &mut lse, &q, &k, &v, &mask, b, t, h, d, drop, p)
        });
        report_flops(&format!("attention_fwd_{p}"), s, att, bf16_rate);
        let s = per_call(&g, 20, || {
            g.attention_bwd(
                &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, &mask, b, t, h, d, drop, p,
            )
        });
        report_flops(&format!("attention_bwd_{p}"), s, 2.5 * att, bf16_rate);
    }

    // element-wise and row kernels: bytes read + written once
    let (x, res, w, bias) = (
        up(&fill(n * c, 7)),
        up(&fill(n * c, 8)),
        up(&fill(c, 9)),
        up(&fill(c, 10)),
    );
    let (mut y, mut mean, mut rstd) = (g.alloc(n * c), g.alloc(n), g.alloc(n));
    let s = per_call(&g, 50, || {
        g.layernorm_fwd(
            &mut y,
            &mut mean,
            &mut rstd,
            &x,
            Some(&res),
            &w,
            &bias,
            n,
            c,
            1e-12,
            Precision::Fp32,
        )
    });
    report_bytes("layernorm_fwd_residual", s, 4 * 3 * n * c);
    let (mut dx, mut dw, mut db) = (g.alloc(n * c), g.alloc(c), g.alloc(c));
    let s = per_call(&g, 50, || {
        g.layernorm_bwd(&mut dx, &mut dw, &mut db, &dout, &x, Some(&res), &w, &mean, &rstd, n, c)
    });
    report_bytes("layernorm_bwd_residual", s, 4 * 4 * n * c);
    let (xf, bf) = (up(&fill(n * f, 11)), up(&fill(f, 12)));
    let (mut yf, mut dxf, mut dbf) = (g.alloc(n * f), g.alloc(n * f), g.alloc(f));
    let s = per_call(&g, 50, || g.bias_gelu_fwd(&mut yf, &xf, &bf, n, f, Precision::Fp32));
    report_bytes("bias_gelu_fwd", s, 4 * 2 * n * f);
    let s = per_call(&g, 50, || {
        g.bias_gelu_bwd(&mut dxf, &mut dbf, &yf, &xf, &bf, n, f, Precision::Fp32)
    });
    report_bytes("bias_gelu_bwd", s, 4 * 3 * n * f);
    let s = per_call(&g, 50, || g.dropout_fwd(&mut y, &x, n * c, drop, Precision::Fp32));
    report_bytes("dropout_fwd", s, 4 * 2 * n * c);
    let mut y2 = g.alloc(2 * n * c);
    let s = per_call(&g, 50, || g.dropout_duplicate(&mut y2, &x, n * c, drop));
    report_bytes("dropout_duplicate", s, 4 * 3 * n * c);
    let s = per_call(&g, 50, || g.quantize(&mut y, n * c, Precision::Bf16));
    report_bytes("quantize_bf16", s, 4 * 2 * n * c);
    let s = per_call(&g, 50, || g.add_bias(&mut y, &bias, n, c));
    report_bytes("add_bias", s, 4 * 2 * n * c);
    let s = per_call(&g, 50, || g.bias_grad(&mut db, &x, n, c));
    report_bytes("bias_grad", s, 4 * n * c);
    let (logits, lab) = (
        up(&fill(n * labels, 13)),
        up_i(&(0..n as i32).map(|i| i % labels as i32).collect::<Vec<_>>()),
    );
    let (mut losses, mut dlogits) = (g.alloc(n), g.alloc(n * labels));
    let s = per_call(&g, 50, || g.softmax_ce_fwd(&mut losses, &logits, &lab, n, labels));
    report_bytes("softmax_ce_fwd", s, 4 * (n * labels + 2 * n));
    let s = per_call(&g, 50, || {
        g.softmax_ce_bwd(&mut dlogits, &logits, &lab, n, labels, 1e-3)
    });
    report_bytes("softmax_ce_bwd", s, 4 * (2 * n * labels + n));
    let vocab = if small { 1000 } else { 50265 };
    let ids = up_i(&(0..n).map(|i| ((i * 7919) % vocab) as i32).collect::<Vec<_>>());
    let pos = up_i(&(0..n).map(|i| (i % t) as i32 + 2).collect::<Vec<_>>());
    let types = up_i(&vec![0; n]);
    let (wte, wpe, wtt) = (up(&fill(vocab * c, 14)), up(&fill(514 * c, 15)), up(&fill(c, 16)));
    let s = per_call(&g, 50, || {
        g.embedding_fwd(&mut y, &ids, &pos, &types, &wte, &wpe, &wtt, n, c)
    });
    report_bytes("embedding_fwd", s, 4 * 4 * n * c);
    let (mut dwte, mut dwpe, mut dwtt) = (g.alloc(vocab * c), g.alloc(514 * c), g.alloc(c));
    let s = per_call(&g, 5, || {
        g.embedding_bwd(&mut dwte, &mut dwpe, &mut dwtt, &dout, &ids, &pos, &types, n, c)
    });
    report_bytes("embedding_bwd", s, 4 * 4 * n * c);
    // the optimiser over roberta-base's 125M parameters in one tensor: 4 reads, 3 writes
    let np = if small { 100_000 } else { 124_645_632 };
    let (mut pm, gr, mut m1, mut v1) = (g.alloc(np), g.alloc(np), g.alloc(np), g.alloc(np));
    let hp = deepcut_fast::backend::AdamW {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut step = 0;
    let s = per_call(&g, 10, || {
        step += 1;
        g.adamw(&mut pm, &gr, &mut m1, &mut v1, np, hp, step, 1.0)
    });
    report_bytes("adamw", s, 4 * 7 * np);
    let s = per_call(&g, 10, || {
        let _ = g.sum_squares(&gr, np);
    });
    report_bytes("sum_squares", s, 4 * np);
}
