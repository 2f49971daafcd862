//! Every kernel family of the backend at one step shape, as a list of (name, work, one
//! call): shared by tests/gpu_bench.rs `kernels` (each against its floor, for
//! scripts/gpu-check.sh) and benches/kernels.rs (criterion). Any `Backend` runs it; the
//! names are the `Backend` methods, with the variant after a slash.
use deepcut_fast::backend::{AdamW, Backend, Dropout, Precision};

/// What one call moves or computes: the throughput its time is divided into.
#[derive(Clone, Copy, Debug)]
pub enum Work {
    /// Bytes read + written once (memory-bound kernels).
    Bytes(u64),
    /// Floating-point operations (matmul-bound kernels).
    Flops(u64),
}

/// The step shape: b sequences of t tokens, h heads of d, FFN f, `labels` classes, a word
/// table of `vocab` rows, `params` parameters for the optimiser.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub d: usize,
    pub f: usize,
    pub labels: usize,
    pub vocab: usize,
    pub params: usize,
}

impl Shape {
    /// roberta-base at bf 8, br 32, seq 128: [forget a | forget b | retain] = 48 sequences.
    pub fn roberta_step() -> Shape {
        Shape {
            b: 48,
            t: 128,
            h: 12,
            d: 64,
            f: 3072,
            labels: 13,
            vocab: 50265,
            params: 124_645_632,
        }
    }
    /// Tiny, for smoke tests on the CPU emulator.
    pub fn small() -> Shape {
        Shape {
            b: 2,
            t: 40,
            h: 2,
            d: 64,
            f: 512,
            labels: 13,
            vocab: 1000,
            params: 100_000,
        }
    }
    pub fn describe(&self) -> String {
        format!(
            "{} x {} tokens, {} heads of {}, FFN {}",
            self.b, self.t, self.h, self.d, self.f
        )
    }
}

fn fill(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i + seed) * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

/// The receiver of each kernel: (name, work, a closure that enqueues one call).
pub type Runner<'r> = dyn FnMut(&str, Work, &mut dyn FnMut()) + 'r;

/// Bytes per element of an `alloc_rounded(.., Bf16)` buffer on `be`: 2 where the backend
/// stores it in 16 bits (CUDA), 4 where it keeps fp32 (the CPU); a copy into one rounds
/// exactly when it is 16-bit.
fn rounded_width<B: Backend>(be: &B) -> usize {
    let x = [1.0f32 + 1.0 / 4096.0]; // not a bf16 value
    let mut src = be.alloc(1);
    be.upload(&mut src, &x);
    let mut b = be.alloc_rounded(1, Precision::Bf16);
    be.copy(&mut b, &src, 1);
    if be.download(&b, 1)[0] == x[0] {
        4
    } else {
        2
    }
}

/// Calls `run(name, work, op)` once per kernel family, where `op()` enqueues one call of
/// it on `be` (buffers set up before, kept across calls), with its operands stored as a
/// bf16 step stores them (`alloc_rounded`: what the GEMMs and the attention core read;
/// 16-bit on CUDA) and its byte count from that. Attention is timed in fp32 (fp32 buffers)
/// and in bf16 (CUDA cores and tensor cores on CUDA); FLOPs are counted as benches/ops.rs
/// counts them (forward 4 b t^2 c, backward 2.5x that).
pub fn kernels<B: Backend>(be: &B, s: Shape, run: &mut Runner<'_>) {
    let (b, t, h, d, f, l) = (s.b, s.t, s.h, s.d, s.f, s.labels);
    let (n, c) = (b * t, h * d);
    let up = |x: &[f32]| {
        let mut buf = be.alloc(x.len());
        be.upload(&mut buf, x);
        buf
    };
    let up_i = |x: &[i32]| {
        let mut buf = be.alloc_i32(x.len());
        be.upload_i32(&mut buf, x);
        buf
    };
    let bytes = |floats: usize| Work::Bytes(4 * floats as u64);
    // elements of fp32 buffers and of 16-bit (bf16 step) buffers
    let w16 = rounded_width(be);
    let mixed = |f32s: usize, lows: usize| Work::Bytes((4 * f32s + w16 * lows) as u64);
    let lo = |x: &[f32]| {
        let mut buf = be.alloc_rounded(x.len(), Precision::Bf16);
        let r: Vec<f32> = x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        be.upload(&mut buf, &r);
        buf
    };
    let lo_zero = |len: usize| be.alloc_rounded(len, Precision::Bf16);
    let drop = Dropout::new(0.1, 1, 1, 1);

    // attention
    let (q, k, v, dout) = (
        up(&fill(n * c, 3)),
        up(&fill(n * c, 4)),
        up(&fill(n * c, 5)),
        up(&fill(n * c, 6)),
    );
    // b full sequences of t tokens, packed
    let seqs = up_i(&(0..=b).map(|r| (r * t) as i32).collect::<Vec<_>>());
    let (mut out, mut lse) = (be.alloc(n * c), be.alloc(n * h));
    let (mut dq, mut dk, mut dv) = (be.alloc(n * c), be.alloc(n * c), be.alloc(n * c));
    let att = 4 * (b * t * t * c) as u64;
    run("attention_fwd/fp32", Work::Flops(att), &mut || {
        be.attention_fwd(
            &mut out,
            &mut lse,
            &q,
            &k,
            &v,
            &seqs,
            b,
            n,
            t,
            h,
            d,
            drop,
            Precision::Fp32,
        )
    });
    run("attention_bwd/fp32", Work::Flops(att * 5 / 2), &mut || {
        be.attention_bwd(
            &mut dq,
            &mut dk,
            &mut dv,
            &dout,
            &q,
            &k,
            &v,
            &out,
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
    });
    {
        let bf = Precision::Bf16;
        let (q, k, v, dout) = (
            lo(&fill(n * c, 3)),
            lo(&fill(n * c, 4)),
            lo(&fill(n * c, 5)),
            lo(&fill(n * c, 6)),
        );
        let (mut out, mut dq, mut dk, mut dv) = (lo_zero(n * c), lo_zero(n * c), lo_zero(n * c), lo_zero(n * c));
        run("attention_fwd/bf16", Work::Flops(att), &mut || {
            be.attention_fwd(&mut out, &mut lse, &q, &k, &v, &seqs, b, n, t, h, d, drop, bf)
        });
        run("attention_bwd/bf16", Work::Flops(att * 5 / 2), &mut || {
            be.attention_bwd(
                &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, &seqs, b, n, t, h, d, drop, bf,
            )
        });
    }

    // the linear layers' GEMM + bias (cuBLASLt epilogue on CUDA), bf16 operands, fp32 out
    let (xa, wb, bias_f) = (lo(&fill(n * c, 21)), lo(&fill(f * c, 22)), up(&fill(f, 23)));
    let mut yf = be.alloc(n * f);
    run(
        "gemm_bias/bf16 ffn-in",
        Work::Flops(2 * (n * f * c) as u64),
        &mut || be.gemm_bias(&mut yf, &xa, &wb, &bias_f, n, f, c, false, true, Precision::Bf16),
    );

    // element-wise and row kernels
    let (x, w, bias) = (up(&fill(n * c, 7)), up(&fill(c, 9)), up(&fill(c, 10)));
    // as the step stores them: the residual stream and the LayerNorm's output in 16 bits
    let res = lo(&fill(n * c, 8));
    let (mut y, mut mean, mut rstd) = (lo_zero(n * c), be.alloc(n), be.alloc(n));
    run("layernorm_fwd/residual", mixed(n * c, 2 * n * c), &mut || {
        be.layernorm_fwd(
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
            Precision::Bf16,
        )
    });
    let (mut dx, mut dw, mut db) = (be.alloc(n * c), be.alloc(c), be.alloc(c));
    run("layernorm_bwd/residual", mixed(3 * n * c, n * c), &mut || {
        be.layernorm_bwd(&mut dx, &mut dw, &mut db, &dout, &x, Some(&res), &w, &mean, &rstd, n, c)
    });
    // the encoder's residual LayerNorms: the hidden dropout of their input fused in
    let hdrop = Dropout::new(0.1, 1, 1, 2);
    run("dropout_layernorm_fwd/residual", mixed(n * c, 2 * n * c), &mut || {
        be.dropout_layernorm_fwd(
            &mut y,
            &mut mean,
            &mut rstd,
            &x,
            hdrop,
            Some(&res),
            &w,
            &bias,
            n,
            c,
            1e-12,
            Precision::Bf16,
        )
    });
    let (mut dsum, mut dtmp, mut dpb) = (be.alloc(n * c), lo_zero(n * c), be.alloc(c));
    // as the encoder calls it: the preceding linear layer's bias gradient in the same call
    run(
        "dropout_layernorm_bwd/residual",
        mixed(3 * n * c, 3 * n * c), // dinp is read back for its column sums
        &mut || {
            be.dropout_layernorm_bwd(
                &mut dsum,
                Some(&mut dtmp),
                Some(&mut dpb),
                &mut dw,
                &mut db,
                &dout,
                &x,
                hdrop,
                Some(&res),
                &w,
                &mean,
                &rstd,
                n,
                c,
                Precision::Bf16,
            )
        },
    );
    let (xf, bf) = (up(&fill(n * f, 11)), up(&fill(f, 12)));
    let (mut gf, mut dxf, mut dbf) = (lo_zero(n * f), lo_zero(n * f), be.alloc(f));
    run("bias_gelu_fwd", mixed(n * f, n * f), &mut || {
        be.bias_gelu_fwd(&mut gf, &xf, &bf, n, f, Precision::Bf16)
    });
    run("bias_gelu_bwd", mixed(2 * n * f, n * f), &mut || {
        be.bias_gelu_bwd(&mut dxf, &mut dbf, &yf, &xf, &bf, n, f, Precision::Bf16)
    });
    run("dropout_fwd", mixed(n * c, n * c), &mut || {
        be.dropout_fwd(&mut y, &x, n * c, drop, Precision::Bf16)
    });
    let mut yq = be.alloc(n * c);
    // a step's embedding dropout: its first sixth (B_f of 2 B_f + B_r sequences) repeated
    let nd = n * c / 6;
    let mut y2 = be.alloc_rounded(n * c, Precision::Bf16);
    run("dropout_duplicate", mixed(n * c - nd, n * c), &mut || {
        be.dropout_duplicate(&mut y2, &x, nd, n * c - nd, drop, Precision::Bf16)
    });
    run("quantize/bf16", bytes(2 * n * c), &mut || {
        be.quantize(&mut yq, n * c, Precision::Bf16)
    });
    run("add_bias", bytes(2 * n * c), &mut || be.add_bias(&mut yq, &bias, n, c));
    run("bias_grad", mixed(0, n * c), &mut || be.bias_grad(&mut db, &dtmp, n, c));
    let logits = up(&fill(n * l, 13));
    let lab = up_i(&(0..n as i32).map(|i| i % l as i32).collect::<Vec<_>>());
    let (mut losses, mut dlogits) = (be.alloc(n), lo_zero(n * l));
    run("softmax_ce_fwd", bytes(n * l + 2 * n), &mut || {
        be.softmax_ce_fwd(&mut losses, &logits, &lab, n, l)
    });
    run("softmax_ce_bwd", mixed(n * l + n, n * l), &mut || {
        be.softmax_ce_bwd(&mut dlogits, &logits, &lab, n, l, 1e-3)
    });
    let vocab = s.vocab;
    let hid: Vec<i32> = (0..n).map(|i| ((i * 7919) % vocab) as i32).collect();
    let hpos: Vec<i32> = (0..n).map(|i| (i % t) as i32 + 2).collect();
    let htypes = vec![0; n];
    let order = up_i(&deepcut_fast::backend::embedding_order(&hid, &hpos, &htypes));
    let (ids, pos, types) = (up_i(&hid), up_i(&hpos), up_i(&htypes));
    let (wte, wpe, wtt) = (up(&fill(vocab * c, 14)), up(&fill((t + 2) * c, 15)), up(&fill(c, 16)));
    run("embedding_fwd", bytes(4 * n * c), &mut || {
        be.embedding_fwd(&mut yq, &ids, &pos, &types, &wte, &wpe, &wtt, n, c)
    });
    let (mut dwte, mut dwpe, mut dwtt) = (be.alloc(vocab * c), be.alloc((t + 2) * c), be.alloc(c));
    run("embedding_bwd", bytes(4 * n * c), &mut || {
        be.embedding_bwd(&mut dwte, &mut dwpe, &mut dwtt, &dout, &ids, &pos, &types, &order, n, c)
    });

    // the contrastive rows: every token but the first and last of a sequence, gathered from
    // the hidden states, normalised, and the gradient scattered back (distinct rows, as
    // DeepCUT's)
    let zi: Vec<i32> = (0..n as i32)
        .filter(|i| i % t as i32 != 0 && i % t as i32 != t as i32 - 1)
        .collect();
    let m = zi.len();
    let zidx = up_i(&zi);
    let (mut zraw, mut z, mut norm, mut dzraw) = (be.alloc(m * c), be.alloc(m * c), be.alloc(m), be.alloc(m * c));
    let (hidden, dz, mut dhidden) = (lo(&fill(n * c, 18)), up(&fill(m * c, 17)), be.alloc(n * c));
    run("gather_rows", mixed(m * c, m * c), &mut || {
        be.gather_rows(&mut zraw, &hidden, &zidx, m, c)
    });
    run("l2norm_fwd", bytes(2 * m * c), &mut || {
        be.l2norm_fwd(&mut z, &mut norm, &zraw, m, c)
    });
    run("l2norm_bwd", bytes(3 * m * c), &mut || {
        be.l2norm_bwd(&mut dzraw, &dz, &z, &norm, m, c)
    });
    run("scatter_add_rows", bytes(3 * m * c), &mut || {
        be.scatter_add_rows(&mut dhidden, &dzraw, &zidx, m, c)
    });

    // the optimiser over all parameters as one tensor: 4 reads, 3 writes per element
    let np = s.params;
    let (mut pm, gr, mut m1, mut v1) = (be.alloc(np), be.alloc(np), be.alloc(np), be.alloc(np));
    let hp = AdamW {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut step = 0;
    run("adamw", bytes(7 * np), &mut || {
        step += 1;
        be.adamw(&mut pm, &gr, &mut m1, &mut v1, np, hp, step, 1.0)
    });
    run("sum_squares", bytes(np), &mut || {
        let _ = be.sum_squares(&gr, np);
    });
    // the step's optimiser as run trains: the norm, the clip decided on the backend, AdamW
    // (the gradient read twice: 5 reads, 3 writes per element)
    let mut stats = be.alloc(deepcut_fast::backend::ClipStats::LEN);
    run("clip_adamw_all", bytes(8 * np), &mut || {
        step += 1;
        let mut slots = [deepcut_fast::backend::ParamSlot {
            param: &mut pm,
            grad: &gr,
            m: &mut m1,
            v: &mut v1,
            n: np,
            decays: true,
            low: None,
        }];
        be.clip_adamw_all(&mut slots, hp, step, 1.0, 1.0, None, Precision::Fp32, &mut stats)
    });
}
