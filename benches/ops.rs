//! One criterion bench per CPU backend op, named after the op (the `Backend` method and
//! the kernel family: `gemm`, `attention_fwd`, `layernorm_bwd`, ...), at the shapes of a
//! MiniLM DeepCUT step: 2 B_f + B_r = 48 sequences of 128 tokens, hidden 384, 12 heads,
//! FFN 1536, 13 labels, 22.6M parameters. Throughput is reported with every time:
//! FLOPs/s for ops that do arithmetic at matrix scale (criterion's "elements" are FLOPs
//! there: gemm 2mnk, attention 4 b t^2 c forward and 10 b t^2 c backward with the
//! recomputed scores, infonce 2 x pairs x c per GEMM), bytes/s (read + written once) for
//! the memory-bound ones.
//!
//! cargo bench --bench ops [-- NAME]        e.g. -- attention_bwd
//!
//! The InfoNCE op at other sizes and options: benches/infonce.rs; a whole step:
//! benches/step.rs and `deepcut-fast bench`; the CUDA kernels: tests/gpu_bench.rs.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use deepcut_fast::backend::cpu::{
    adamw, attention, dropout, embedding, gelu, gemm, infonce, l2norm, layernorm, rows, softmax_ce, Cpu,
};
use deepcut_fast::backend::{AdamW, Backend, ClipStats, Dropout, InfoNceOptions, ParamSlot, Precision};
use std::time::Duration;

// The MiniLM step shape.
const B: usize = 48;
const T: usize = 128;
const H: usize = 12;
const D: usize = 32;
const C: usize = H * D;
const F: usize = 4 * C;
const N: usize = B * T;
const L: usize = 13;
const VOCAB: usize = 30522;
const PARAMS: usize = 22_570_381;

fn data(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i + seed) * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

fn drop() -> Dropout {
    Dropout::new(0.1, 1, 1, 1)
}

/// Bytes of `n` f32 values.
fn bytes(n: usize) -> u64 {
    4 * n as u64
}

/// One bench group named `op` with one function `id` timing `f`.
fn bench(c: &mut Criterion, op: &str, id: &str, tp: Throughput, mut f: impl FnMut()) {
    let mut g = c.benchmark_group(op);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(tp);
    g.bench_function(id, |b| b.iter(&mut f));
    g.finish();
}

fn linear_algebra(c: &mut Criterion) {
    // The step's GEMMs: forward x W^T, input gradient dY W, weight gradient dY^T X.
    let mut g = c.benchmark_group("gemm");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let shapes = [
        ("fwd", N, C, C, false, true),
        ("fwd", N, F, C, false, true),
        ("fwd", N, C, F, false, true),
        ("dx", N, C, C, false, false),
        ("dx", N, F, C, false, false),
        ("dw", C, C, N, true, false),
        ("dw", C, F, N, true, false),
        ("square", 2048, 2048, 2048, false, true),
    ];
    for (what, m, n, k, ta, tb) in shapes {
        let a = data(m * k, 1);
        let b = data(k * n, 2);
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        g.bench_function(BenchmarkId::new(what, format!("{m}x{n}x{k}")), |bn| {
            bn.iter(|| gemm::gemm(&mut out, &a, &b, m, n, k, ta, tb, 1.0, 0.0))
        });
    }
    g.finish();

    let x = data(N * C, 3);
    let bias = data(C, 4);
    let mut out = data(N * C, 5);
    bench(c, "add_bias", "n,c", Throughput::Bytes(bytes(2 * N * C)), || {
        gemm::add_bias(&mut out, &bias, N, C)
    });
    let mut db = vec![0f32; C];
    bench(c, "bias_grad", "n,c", Throughput::Bytes(bytes(N * C)), || {
        gemm::bias_grad(&mut db, &x, N, C)
    });
    let be = Cpu;
    bench(c, "add_inplace", "n,c", Throughput::Bytes(bytes(3 * N * C)), || {
        be.add_inplace(&mut out, &x, N * C)
    });
    bench(c, "zero", "n,c", Throughput::Bytes(bytes(N * C)), || {
        be.zero(&mut out, N * C)
    });
}

fn layers(c: &mut Criterion) {
    let x = data(N * C, 1);
    let res = data(N * C, 2);
    let w = data(C, 3);
    let bias = data(C, 4);
    let mut out = vec![0f32; N * C];
    let (mut mean, mut rstd) = (vec![0f32; N], vec![0f32; N]);
    let ids: Vec<i32> = (0..N).map(|i| ((i * 7919) % VOCAB) as i32).collect();
    let pos: Vec<i32> = (0..N).map(|i| (i % T) as i32).collect();
    let types = vec![0i32; N];
    let order = deepcut_fast::backend::embedding_order(&ids, &pos, &types);
    let (wte, wpe, wtt) = (data(VOCAB * C, 5), data(512 * C, 6), data(2 * C, 7));
    bench(c, "embedding_fwd", "n,c", Throughput::Bytes(bytes(4 * N * C)), || {
        embedding::embedding_fwd(&mut out, &ids, &pos, &types, &wte, &wpe, &wtt, N, C)
    });
    let (mut dwte, mut dwpe, mut dwtt) = (vec![0f32; VOCAB * C], vec![0f32; 512 * C], vec![0f32; 2 * C]);
    bench(c, "embedding_bwd", "n,c", Throughput::Bytes(bytes(7 * N * C)), || {
        embedding::embedding_bwd(&mut dwte, &mut dwpe, &mut dwtt, &x, &ids, &pos, &types, &order, N, C)
    });
    // The encoder's residual LayerNorms, with the hidden dropout of their input fused in.
    bench(
        c,
        "layernorm_fwd",
        "n,c residual dropout",
        Throughput::Bytes(bytes(3 * N * C)),
        || {
            let d = drop();
            layernorm::layernorm_fwd(
                &mut out,
                &mut mean,
                &mut rstd,
                &x,
                d,
                Some(&res),
                &w,
                &bias,
                N,
                C,
                1e-12,
                Precision::Fp32,
            )
        },
    );
    let (mut dw, mut db) = (vec![0f32; C], vec![0f32; C]);
    let (mut dsum, mut dinp) = (vec![0f32; N * C], vec![0f32; N * C]);
    bench(
        c,
        "layernorm_bwd",
        "n,c residual dropout",
        Throughput::Bytes(bytes(5 * N * C)),
        || {
            layernorm::layernorm_bwd(
                &mut dsum,
                Some(&mut dinp),
                &mut dw,
                &mut db,
                &x,
                &x,
                drop(),
                Some(&res),
                &w,
                &mean,
                &rstd,
                N,
                C,
                Precision::Fp32,
            )
        },
    );

    let xf = data(N * F, 8);
    let bf = data(F, 9);
    let mut of = vec![0f32; N * F];
    bench(c, "bias_gelu_fwd", "n,f", Throughput::Bytes(bytes(2 * N * F)), || {
        gelu::bias_gelu_fwd(&mut of, &xf, &bf, N, F, Precision::Fp32)
    });
    let mut dbf = vec![0f32; F];
    let mut dxf = vec![0f32; N * F];
    bench(c, "bias_gelu_bwd", "n,f", Throughput::Bytes(bytes(3 * N * F)), || {
        gelu::bias_gelu_bwd(&mut dxf, &mut dbf, &xf, &xf, &bf, N, F, Precision::Fp32)
    });

    // attention: q = k = v = x, all keys real, dropout 0.1 on the probabilities
    let seqs: Vec<i32> = (0..=B).map(|r| (r * T) as i32).collect(); // B full sequences, packed
    let mut lse = vec![0f32; N * H];
    let att_flops = (4 * B * T * T * C) as u64;
    bench(
        c,
        "attention_fwd",
        "b48 t128 h12 d32",
        Throughput::Elements(att_flops),
        || {
            attention::attention_fwd(
                &mut out,
                &mut lse,
                &x,
                &x,
                &x,
                &seqs,
                B,
                N,
                T,
                H,
                D,
                drop(),
                Precision::Fp32,
            )
        },
    );
    let o = out.clone();
    let (mut dq, mut dk, mut dv) = (vec![0f32; N * C], vec![0f32; N * C], vec![0f32; N * C]);
    bench(
        c,
        "attention_bwd",
        "b48 t128 h12 d32",
        Throughput::Elements(10 * att_flops / 4),
        || {
            attention::attention_bwd(
                &mut dq,
                &mut dk,
                &mut dv,
                &res,
                &x,
                &x,
                &x,
                &o,
                &lse,
                &seqs,
                B,
                N,
                T,
                H,
                D,
                drop(),
                Precision::Fp32,
            )
        },
    );

    bench(c, "dropout_fwd", "n,c", Throughput::Bytes(bytes(2 * N * C)), || {
        dropout::dropout_fwd(&mut out, &x, N * C, drop(), Precision::Fp32)
    });
    bench(c, "dropout_bwd", "n,c", Throughput::Bytes(bytes(2 * N * C)), || {
        dropout::dropout_bwd(&mut dinp, &x, N * C, drop(), Precision::Fp32)
    });
    // the step's embedding dropout: B_f = 8 forget sequences embedded once, written twice
    // (views a and b), and the B - 16 retain sequences
    let (nf, ne) = (8 * T * C, (B - 8) * T * C);
    let mut dup = vec![0f32; ne + nf];
    bench(
        c,
        "dropout_duplicate",
        "b48 (8 repeated)",
        Throughput::Bytes(bytes(2 * ne + nf)),
        || dropout::dropout_duplicate(&mut dup, &x[..ne], nf, ne, drop(), Precision::Fp32),
    );
    bench(
        c,
        "dropout_duplicate_bwd",
        "b48 (8 repeated)",
        Throughput::Bytes(bytes(2 * ne + nf)),
        || dropout::dropout_duplicate_bwd(&mut out, &dup, nf, ne, drop()),
    );

    let labels: Vec<i32> = (0..N).map(|i| (i % L) as i32).collect();
    let logits = data(N * L, 10);
    let mut losses = vec![0f32; N];
    bench(c, "softmax_ce_fwd", "n,l", Throughput::Bytes(bytes(N * L + N)), || {
        softmax_ce::softmax_ce_fwd(&mut losses, &logits, &labels, N, L)
    });
    let mut dlogits = vec![0f32; N * L];
    bench(c, "softmax_ce_bwd", "n,l", Throughput::Bytes(bytes(2 * N * L)), || {
        softmax_ce::softmax_ce_bwd(&mut dlogits, &logits, &labels, N, L, 1.0)
    });
}

fn contrastive(c: &mut Criterion) {
    // labelled tokens: 126 of 128 per sequence; a third are forget tokens (anchors)
    let m = B * (T - 2);
    let (z, labels, anchor, partner) = infonce::synthetic_rows(m, C);
    let hidden = data(N * C, 1);
    let idx: Vec<i32> = (0..m).map(|r| (r + 2 * (r / (T - 2)) + 1) as i32).collect();
    let mut zraw = vec![0f32; m * C];
    bench(c, "gather_rows", "m,c", Throughput::Bytes(bytes(2 * m * C)), || {
        rows::gather_rows(&mut zraw, &hidden, &idx, m, C)
    });
    let mut dh = vec![0f32; N * C];
    bench(
        c,
        "scatter_add_rows",
        "m,c",
        Throughput::Bytes(bytes(3 * m * C)),
        || rows::scatter_add_rows(&mut dh, &z, &idx, m, C),
    );
    let (mut zn, mut norm) = (vec![0f32; m * C], vec![0f32; m]);
    bench(c, "l2norm_fwd", "m,c", Throughput::Bytes(bytes(2 * m * C)), || {
        l2norm::l2norm_fwd(&mut zn, &mut norm, &zraw, m, C)
    });
    let mut dzr = vec![0f32; m * C];
    bench(c, "l2norm_bwd", "m,c", Throughput::Bytes(bytes(3 * m * C)), || {
        l2norm::l2norm_bwd(&mut dzr, &z, &zn, &norm, m, C)
    });
    // FLOPs of the similarity GEMMs the op runs: the same-class pairs of every valid anchor
    let opts = InfoNceOptions::default();
    let valid = opts.valid_anchors(&labels, &anchor, &partner, m);
    let mut count = std::collections::HashMap::new();
    for &y in &labels {
        *count.entry(y).or_insert(0u64) += 1;
    }
    let pairs: u64 = (0..m).filter(|&i| valid[i]).map(|i| count[&labels[i]]).sum();
    let (mut loss, mut lse, mut dz) = (vec![0f32; m], vec![0f32; m], vec![0f32; m * C]);
    bench(
        c,
        "infonce_fwd",
        "m6048 c384 same-class",
        Throughput::Elements(2 * pairs * C as u64),
        || {
            infonce::infonce_fwd(
                &mut loss,
                &mut lse,
                &z,
                &labels,
                &anchor,
                &partner,
                m,
                C,
                opts,
                Precision::Fp32,
            )
        },
    );
    bench(
        c,
        "infonce_bwd",
        "m6048 c384 same-class detached",
        Throughput::Elements(4 * pairs * C as u64),
        || {
            infonce::infonce_bwd(
                &mut dz,
                &z,
                &lse,
                &labels,
                &anchor,
                &partner,
                m,
                C,
                opts,
                1.0,
                Precision::Fp32,
            )
        },
    );
}

fn optimiser(c: &mut Criterion) {
    let g = data(PARAMS, 1);
    let mut p = data(PARAMS, 2);
    let (mut m, mut v) = (vec![0f32; PARAMS], vec![0f32; PARAMS]);
    bench(c, "adamw", "22.6M params", Throughput::Bytes(bytes(7 * PARAMS)), || {
        adamw::adamw(&mut p, &g, &mut m, &mut v, PARAMS, 1e-5, 0.9, 0.999, 1e-8, 0.01, 3, 1.0)
    });
    bench(
        c,
        "sum_squares",
        "22.6M params",
        Throughput::Bytes(bytes(PARAMS)),
        || {
            std::hint::black_box(adamw::sum_squares(&g, PARAMS));
        },
    );
    // the optimiser as a step runs it: global norm, clip, AdamW (the gradient read twice)
    let mut stats = vec![0f32; ClipStats::LEN];
    let mut step = 3;
    bench(
        c,
        "clip_adamw_all",
        "22.6M params",
        Throughput::Bytes(bytes(8 * PARAMS)),
        || {
            step += 1;
            let mut slots = [ParamSlot {
                param: &mut p,
                grad: &g,
                m: &mut m,
                v: &mut v,
                n: PARAMS,
                decays: true,
                low: None,
            }];
            Cpu.clip_adamw_all(
                &mut slots,
                AdamW::with_lr(1e-5),
                step,
                1.0,
                1.0,
                None,
                Precision::Fp32,
                &mut stats,
            )
        },
    );
}

criterion_group!(benches, linear_algebra, layers, contrastive, optimiser);
criterion_main!(benches);
