//! Multi-head self-attention core with a key padding mask and dropout on the
//! probabilities. CPU twin of kernels/attention.cu (which tiles FlashAttention-style and
//! never stores the t x t matrix; here one head's t x t scores live only inside its task).
//!
//! Layout: q, k, v, out are [b, t, h*d], heads interleaved exactly as the HF query/key/value
//! linear layers produce them, so no transposes are needed around the op: each head's
//! GEMMs read its [t, d] block in place through strided views.
//! lse [b, h, t] is the per-row logsumexp of the scaled, masked scores; backward
//! recomputes the probabilities from it. Scores use scale 1/sqrt(d) as in BERT.
//!
//! Precision (`inputs`): in fp32 the softmax is the natural-exp one above. In bf16 / fp16
//! this is the twin of kernels/attention_mma.cu (tensor cores) and rounds where it does:
//! q, k, v, dout (and out, for D) are read rounded to the 16-bit type; the forward pass
//! works in log2 units with an integer row offset M = ceil(max_j s_ij log2 e),
//! p_ij = 2^(s_ij log2 e - M), rounds p_ij f_ij before the P V product and divides by
//! l_i = sum_j p_ij afterwards (so the GPU's online rescaling by powers of two commutes
//! with the rounding); the backward pass rounds p f before dV and dS before dQ and dK; and
//! out, dq, dk, dv are written rounded, ready for the GEMMs that read them. Softmax
//! statistics, lse and D stay fp32 (SPEC 7).
//!
//! One task per (sequence, head), each with its own scratch ([t, t] blocks, reused
//! across the tasks of a rayon split); the element-wise passes over a [t, t] block are
//! compiled for AVX-512/AVX2 where the CPU has them (simd::multiversion) and use the
//! vectorisable exp. Every task's result depends only on its inputs, so any thread
//! count gives the same bits.
use super::gemm::{gemm_view, View};
use super::quantize::{round_in_place, round_to, rounded_copy};
use super::simd::{self, multiversion};
use crate::backend::philox::Dropout;
use crate::backend::Precision;
use rayon::prelude::*;
use std::borrow::Cow;
use std::f32::consts::{LN_2, LOG2_E};

/// x rounded to `p` (borrowed unchanged in fp32).
fn rounded(x: &[f32], p: Precision) -> Cow<'_, [f32]> {
    rounded_copy(x, p).map_or(Cow::Borrowed(x), Cow::Owned)
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Index of probability (i, j) of head (bi, hi), the dropout counter.
#[inline]
fn prob_index(bi: usize, hi: usize, i: usize, j: usize, t: usize, h: usize) -> u64 {
    (((bi * h + hi) * t + i) * t + j) as u64
}

/// Head `hi` of sequence `bi` in a [b, t, h*d] tensor, as a [t, d] view.
fn head(x: &[f32], bi: usize, hi: usize, t: usize, h: usize, d: usize) -> View<'_> {
    View {
        data: x,
        offset: bi * t * h * d + hi * d,
        row_stride: h * d,
        col_stride: 1,
    }
}

/// Copies a dense [t, d] block into head `hi` of sequence `bi` of a [b, t, h*d] tensor.
fn scatter_head(x: &mut [f32], src: &[f32], bi: usize, hi: usize, t: usize, h: usize, d: usize) {
    let c = h * d;
    for i in 0..t {
        let base = (bi * t + i) * c + hi * d;
        x[base..base + d].copy_from_slice(&src[i * d..(i + 1) * d]);
    }
}

multiversion! {
    /// Row i of s [t, t] (scaled scores) becomes softmax over real keys (masked keys
    /// exactly 0) times the dropout factors in `fac` [t]; returns the row's logsumexp.
    fn softmax_dropout_row(row: &mut [f32], mask: &[f32], fac: &[f32], dropout_on: bool) -> f32 {
        for (x, &m) in row.iter_mut().zip(mask) {
            *x = if m > 0.5 { *x } else { f32::NEG_INFINITY };
        }
        let mx = simd::max(row);
        for x in row.iter_mut() {
            *x = simd::exp(*x - mx);
        }
        let sum = simd::sum(row);
        let inv = 1.0 / sum;
        if dropout_on {
            for (x, f) in row.iter_mut().zip(fac) {
                *x = *x * inv * f;
            }
        } else {
            for x in row.iter_mut() {
                *x *= inv;
            }
        }
        mx + sum.ln()
    }
}

multiversion! {
    /// Backward, first pass over row i: from the recomputed scaled scores `p` (in place),
    /// p = exp(s - lse) on real keys and 0 on masked ones, and pf = p * fac.
    fn probs_row(p: &mut [f32], pf: &mut [f32], mask: &[f32], fac: &[f32], lse: f32) {
        for ((x, y), (&m, &f)) in p.iter_mut().zip(pf.iter_mut()).zip(mask.iter().zip(fac)) {
            let e = simd::exp(*x - lse);
            *x = if m > 0.5 { e } else { 0.0 };
            *y = *x * f;
        }
    }
}

multiversion! {
    /// Backward, second pass over row i: ds = p (dp fac - D_i) scale, in place of dp.
    fn dscores_row(dp: &mut [f32], p: &[f32], fac: &[f32], di: f32, scale: f32) {
        for ((g, &p), &f) in dp.iter_mut().zip(p).zip(fac) {
            *g = p * (*g * f - di) * scale;
        }
    }
}

/// Forward row in bf16 / fp16 (kernels/attention_mma.cu): the scaled scores in `row` become
/// round(p f) with p = 2^(s log2 e - M) over real keys (0 on masked ones); returns lse and
/// 1 / l, by which the row of P V is multiplied. A row without real keys gives zeros and
/// lse = -inf, as the kernel.
fn softmax_row_rounded(row: &mut [f32], mask: &[f32], fac: &[f32], dropout_on: bool, prec: Precision) -> (f32, f32) {
    let mut mx = f32::NEG_INFINITY;
    for (x, &m) in row.iter_mut().zip(mask) {
        *x = if m > 0.5 { *x * LOG2_E } else { f32::NEG_INFINITY };
        mx = mx.max(*x);
    }
    if mx == f32::NEG_INFINITY {
        row.fill(0.0);
        return (f32::NEG_INFINITY, 0.0);
    }
    let big = mx.ceil();
    let mut l = 0f32;
    for (x, &f) in row.iter_mut().zip(fac) {
        let p = if *x == f32::NEG_INFINITY {
            0.0
        } else {
            (*x - big).exp2()
        };
        l += p;
        *x = round_to(if dropout_on { p * f } else { p }, prec);
    }
    ((big + l.log2()) * LN_2, 1.0 / l)
}

/// Backward, first pass over row i in bf16 / fp16: p = 2^(s log2 e - lse log2 e) on real
/// keys (in place of the scaled scores), pf = round(p f).
fn probs_row_rounded(p: &mut [f32], pf: &mut [f32], mask: &[f32], fac: &[f32], lse: f32, prec: Precision) {
    let ls2 = lse * LOG2_E;
    for ((x, y), (&m, &f)) in p.iter_mut().zip(pf.iter_mut()).zip(mask.iter().zip(fac)) {
        *x = if m > 0.5 && lse != f32::NEG_INFINITY {
            (*x * LOG2_E - ls2).exp2()
        } else {
            0.0
        };
        *y = round_to(*x * f, prec);
    }
}

/// Backward, second pass in bf16 / fp16: ds = round(p (dp f - D_i) scale).
fn dscores_row_rounded(dp: &mut [f32], p: &[f32], fac: &[f32], di: f32, scale: f32, prec: Precision) {
    for ((g, &p), &f) in dp.iter_mut().zip(p).zip(fac) {
        *g = round_to(p * (*g * f - di) * scale, prec);
    }
}

/// Per-task scratch of the forward pass.
struct FwdScratch {
    s: Vec<f32>,
    fac: Vec<f32>,
}

/// Per (sequence, head): S = Q K^T / sqrt(d), P = softmax(S) over real keys, P' = P with
/// dropout, O = P' V. The t x t block exists only inside one task. `inputs`: see the
/// module comment.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd(
    out: &mut [f32], lse: &mut [f32], q: &[f32], k: &[f32], v: &[f32], mask: &[f32], b: usize, t: usize, h: usize,
    d: usize, dropout: Dropout, inputs: Precision,
) {
    let scale = 1.0 / (d as f32).sqrt();
    let on = dropout.is_on();
    let (q, k, v) = (rounded(q, inputs), rounded(k, inputs), rounded(v, inputs));
    let (q, k, v) = (&q[..], &k[..], &v[..]);
    let results: Vec<(Vec<f32>, Vec<f32>)> = (0..b * h)
        .into_par_iter()
        .map_init(
            || FwdScratch {
                s: vec![0f32; t * t],
                fac: vec![1f32; t],
            },
            |scr, task| {
                let (bi, hi) = (task / h, task % h);
                let m = &mask[bi * t..(bi + 1) * t];
                let s = &mut scr.s;
                // S [t, t] = scale * Q_h K_h^T
                gemm_view(
                    s,
                    head(q, bi, hi, t, h, d),
                    head(k, bi, hi, t, h, d).t(),
                    t,
                    t,
                    d,
                    scale,
                    0.0,
                );
                let mut lh = vec![0f32; t];
                let mut inv_l = vec![1f32; t];
                for (i, row) in s.chunks_mut(t).enumerate() {
                    if on {
                        dropout.fill_factors(prob_index(bi, hi, i, 0, t, h), &mut scr.fac);
                    }
                    if inputs == Precision::Fp32 {
                        lh[i] = softmax_dropout_row(row, m, &scr.fac, on);
                    } else {
                        (lh[i], inv_l[i]) = softmax_row_rounded(row, m, &scr.fac, on, inputs);
                    }
                }
                // O_h [t, d] = P' V_h
                let mut oh = vec![0f32; t * d];
                gemm_view(
                    &mut oh,
                    View::rows(s, 0, t),
                    head(v, bi, hi, t, h, d),
                    t,
                    d,
                    t,
                    1.0,
                    0.0,
                );
                if inputs != Precision::Fp32 {
                    for (row, &f) in oh.chunks_mut(d).zip(&inv_l) {
                        row.iter_mut().for_each(|x| *x = round_to(*x * f, inputs));
                    }
                }
                (oh, lh)
            },
        )
        .collect();
    for (task, (oh, lh)) in results.into_iter().enumerate() {
        let (bi, hi) = (task / h, task % h);
        scatter_head(out, &oh, bi, hi, t, h, d);
        lse[(bi * h + hi) * t..(bi * h + hi + 1) * t].copy_from_slice(&lh);
    }
}

/// Per-task scratch of the backward pass: P, P with dropout, the dropout factors and dP
/// (then dS), each [t, t].
struct BwdScratch {
    p: Vec<f32>,
    pf: Vec<f32>,
    fac: Vec<f32>,
    ds: Vec<f32>,
}

/// Backward, recomputing P from lse (FlashAttention-2): with f the dropout factors,
/// dV = (P f)^T dO, dP = (dO V^T) f, D_i = dO_i . O_i, dS = P (dP - D) / sqrt(d),
/// dQ = dS K, dK = dS^T Q. `inputs`: see the module comment.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], dout: &[f32], q: &[f32], k: &[f32], v: &[f32], out: &[f32],
    lse: &[f32], mask: &[f32], b: usize, t: usize, h: usize, d: usize, dropout: Dropout, inputs: Precision,
) {
    let scale = 1.0 / (d as f32).sqrt();
    let c = h * d;
    let (q, k, v, dout, out) = (
        rounded(q, inputs),
        rounded(k, inputs),
        rounded(v, inputs),
        rounded(dout, inputs),
        rounded(out, inputs),
    );
    let (q, k, v, dout, out) = (&q[..], &k[..], &v[..], &dout[..], &out[..]);
    // D [b*t, h] = dO . O per row and head, in one streaming pass (inside the tasks these
    // strided reads missed the cache; the sums are the same).
    let dvec: Vec<f32> = dout[..b * t * c]
        .par_chunks(c)
        .zip(out[..b * t * c].par_chunks(c))
        .flat_map_iter(|(g, o)| g.chunks(d).zip(o.chunks(d)).map(|(g, o)| dot(g, o)))
        .collect();
    type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);
    let results: Vec<Grads> = (0..b * h)
        .into_par_iter()
        .map_init(
            || BwdScratch {
                p: vec![0f32; t * t],
                pf: vec![0f32; t * t],
                fac: vec![1f32; t * t],
                ds: vec![0f32; t * t],
            },
            |scr, task| {
                let (bi, hi) = (task / h, task % h);
                let m = &mask[bi * t..(bi + 1) * t];
                let lh = &lse[(bi * h + hi) * t..(bi * h + hi + 1) * t];
                let (qh, kh, vh, doh) = (
                    head(q, bi, hi, t, h, d),
                    head(k, bi, hi, t, h, d),
                    head(v, bi, hi, t, h, d),
                    head(dout, bi, hi, t, h, d),
                );
                // P recomputed from the saved logsumexp, and P with dropout
                gemm_view(&mut scr.p, qh, kh.t(), t, t, d, scale, 0.0);
                for (i, &li) in lh.iter().enumerate() {
                    let r = i * t..(i + 1) * t;
                    dropout.fill_factors(prob_index(bi, hi, i, 0, t, h), &mut scr.fac[r.clone()]);
                    let (p, pf, fac) = (&mut scr.p[r.clone()], &mut scr.pf[r.clone()], &scr.fac[r]);
                    if inputs == Precision::Fp32 {
                        probs_row(p, pf, m, fac, li);
                    } else {
                        probs_row_rounded(p, pf, m, fac, li, inputs);
                    }
                }
                // dV_h = (P f)^T dO_h
                let mut dvh = vec![0f32; t * d];
                gemm_view(&mut dvh, View::rows(&scr.pf, 0, t).t(), doh, t, d, t, 1.0, 0.0);
                // dP = dO_h V_h^T, then dS in place
                gemm_view(&mut scr.ds, doh, vh.t(), t, t, d, 1.0, 0.0);
                for i in 0..t {
                    let di = dvec[(bi * t + i) * h + hi];
                    let r = i * t..(i + 1) * t;
                    let (ds, p, fac) = (&mut scr.ds[r.clone()], &scr.p[r.clone()], &scr.fac[r]);
                    if inputs == Precision::Fp32 {
                        dscores_row(ds, p, fac, di, scale);
                    } else {
                        dscores_row_rounded(ds, p, fac, di, scale, inputs);
                    }
                }
                // dQ_h = dS K_h, dK_h = dS^T Q_h
                let (mut dqh, mut dkh) = (vec![0f32; t * d], vec![0f32; t * d]);
                let ds = View::rows(&scr.ds, 0, t);
                gemm_view(&mut dqh, ds, kh, t, d, t, 1.0, 0.0);
                gemm_view(&mut dkh, ds.t(), qh, t, d, t, 1.0, 0.0);
                (dqh, dkh, dvh)
            },
        )
        .collect();
    for (task, (mut dqh, mut dkh, mut dvh)) in results.into_iter().enumerate() {
        let (bi, hi) = (task / h, task % h);
        for g in [&mut dqh, &mut dkh, &mut dvh] {
            round_in_place(g, inputs);
        }
        scatter_head(dq, &dqh, bi, hi, t, h, d);
        scatter_head(dk, &dkh, bi, hi, t, h, d);
        scatter_head(dv, &dvh, bi, hi, t, h, d);
    }
}
