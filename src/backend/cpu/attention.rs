//! Multi-head self-attention core over packed variable-length sequences, with dropout on
//! the probabilities. CPU twin of kernels/attention.cu (which tiles FlashAttention-style
//! and never stores the L x L matrix; here one head's L x L scores live only inside its
//! task).
//!
//! Layout (FlashAttention's "varlen"): q, k, v, out are [n, h*d], the b sequences packed
//! one after another with no padding: sequence r is tokens seqs[r] .. seqs[r+1] (seqs
//! [b+1], seqs[0] = 0, seqs[b] = n). Every token of a sequence attends to every token of
//! it and to nothing else, so no key mask is needed and no work is spent on padding: a
//! batch of short sentences costs its real tokens, not b times the longest. Heads are
//! interleaved exactly as the HF query/key/value linear layers produce them, so no
//! transposes are needed around the op: each head's GEMMs read its [L, d] block in place
//! through strided views. lse [n, h] is the per-row logsumexp of the scaled scores;
//! backward recomputes the probabilities from it. Scores use scale 1/sqrt(d) as in BERT.
//! t is the longest sequence: the dropout counter of probability (i, j) of head hi of
//! sequence r is ((r h + hi) tp + i) tp + j, tp = t rounded up to a multiple of 4.
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
//! One task per sequence, its heads in turn, each task with its own scratch ([t, t]
//! blocks, reused across the tasks of a rayon split) and writing its rows of the outputs
//! in place: no per-task results to allocate and copy into place afterwards, and a
//! sequence's q / k / v rows, which its heads share, read by one core (the MiniLM step at
//! 48 x 128 tokens: 5% less time than one task per (sequence, head), BENCHMARKS.md). The
//! element-wise passes over a [t, t] block are compiled for AVX-512/AVX2 where the CPU has
//! them (simd::multiversion) and use the vectorisable exp. Every task's result depends
//! only on its inputs, so any thread count gives the same bits.
use super::gemm::{gemm_view, gemm_view_ldc, View};
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

/// Index of probability (i, j) of head (bi, hi), the dropout counter: rows of
/// [`counter_stride`]`(t)` counters, so every row starts a Philox group of four and the
/// tensor-core kernels can share one draw among the lanes that hold four neighbours.
#[inline]
fn prob_index(bi: usize, hi: usize, i: usize, j: usize, t: usize, h: usize) -> u64 {
    let tp = counter_stride(t);
    (((bi * h + hi) * tp + i) * tp + j) as u64
}

/// The attention dropout counters' row length: t rounded up to a multiple of 4.
pub fn counter_stride(t: usize) -> usize {
    t.next_multiple_of(4)
}

/// Head `hi` of the sequence starting at token `s0` of a packed [n, h*d] tensor, as an
/// [L, d] view (the caller bounds the rows).
fn head(x: &[f32], s0: usize, hi: usize, h: usize, d: usize) -> View<'_> {
    View {
        data: x,
        offset: s0 * h * d + hi * d,
        row_stride: h * d,
        col_stride: 1,
    }
}

/// The rows of every sequence of a packed tensor with `width` columns, as disjoint
/// mutable blocks (the spans tile 0..n in order), so each sequence's task writes its heads
/// in place.
fn split_rows<'a>(x: &'a mut [f32], spans: &[(usize, usize)], width: usize) -> Vec<&'a mut [f32]> {
    let mut rest = x;
    spans
        .iter()
        .map(|&(_, len)| {
            let (rows, tail) = std::mem::take(&mut rest).split_at_mut(len * width);
            rest = tail;
            rows
        })
        .collect()
}

/// Rounds row by row (to `p`, after multiplying row i by `scale[i]` where given) the
/// [L, d] block of head `hi` inside a sequence's rows of a packed [L, h d] tensor.
fn round_head(x: &mut [f32], scale: Option<&[f32]>, hi: usize, h: usize, d: usize, p: Precision) {
    if p == Precision::Fp32 {
        return;
    }
    for (i, row) in x.chunks_mut(h * d).enumerate() {
        let row = &mut row[hi * d..(hi + 1) * d];
        match scale {
            Some(f) => row.iter_mut().for_each(|x| *x = round_to(*x * f[i], p)),
            None => round_in_place(row, p),
        }
    }
}

/// Start and length of every sequence of `seqs` [b+1], checked against n tokens and the
/// longest length t (the dropout counter's stride).
pub(crate) fn spans(seqs: &[i32], b: usize, n: usize, t: usize) -> Vec<(usize, usize)> {
    assert!(
        seqs.len() > b,
        "attention: seqs holds {} offsets, {} sequences need {}",
        seqs.len(),
        b,
        b + 1
    );
    assert_eq!(seqs[0], 0, "attention: seqs[0] must be 0");
    assert_eq!(seqs[b] as usize, n, "attention: seqs[b] = {} but n = {n}", seqs[b]);
    (0..b)
        .map(|r| {
            let (s0, s1) = (seqs[r], seqs[r + 1]);
            assert!(s1 >= s0, "attention: seqs decreases at sequence {r}");
            let len = (s1 - s0) as usize;
            assert!(len <= t, "attention: sequence {r} has {len} tokens, more than t = {t}");
            (s0 as usize, len)
        })
        .collect()
}

multiversion! {
    /// Row i of s [L, L] (scaled scores) becomes softmax times the dropout factors in
    /// `fac` [L]; returns the row's logsumexp.
    fn softmax_dropout_row(row: &mut [f32], fac: &[f32], dropout_on: bool) -> f32 {
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
    /// p = exp(s - lse), and pf = p * fac.
    fn probs_row(p: &mut [f32], pf: &mut [f32], fac: &[f32], lse: f32) {
        for ((x, y), &f) in p.iter_mut().zip(pf.iter_mut()).zip(fac) {
            *x = simd::exp(*x - lse);
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
/// round(p f) with p = 2^(s log2 e - M); returns lse and 1 / l, by which the row of P V is
/// multiplied.
fn softmax_row_rounded(row: &mut [f32], fac: &[f32], dropout_on: bool, prec: Precision) -> (f32, f32) {
    let mut mx = f32::NEG_INFINITY;
    for x in row.iter_mut() {
        *x *= LOG2_E;
        mx = mx.max(*x);
    }
    let big = mx.ceil();
    let mut l = 0f32;
    for (x, &f) in row.iter_mut().zip(fac) {
        let p = (*x - big).exp2();
        l += p;
        *x = round_to(if dropout_on { p * f } else { p }, prec);
    }
    ((big + l.log2()) * LN_2, 1.0 / l)
}

/// Backward, first pass over row i in bf16 / fp16: p = 2^(s log2 e - lse log2 e) (in place
/// of the scaled scores), pf = round(p f).
fn probs_row_rounded(p: &mut [f32], pf: &mut [f32], fac: &[f32], lse: f32, prec: Precision) {
    let ls2 = lse * LOG2_E;
    for ((x, y), &f) in p.iter_mut().zip(pf.iter_mut()).zip(fac) {
        *x = (*x * LOG2_E - ls2).exp2();
        *y = round_to(*x * f, prec);
    }
}

/// Backward, second pass in bf16 / fp16: ds = round(p (dp f - D_i) scale).
fn dscores_row_rounded(dp: &mut [f32], p: &[f32], fac: &[f32], di: f32, scale: f32, prec: Precision) {
    for ((g, &p), &f) in dp.iter_mut().zip(p).zip(fac) {
        *g = round_to(p * (*g * f - di) * scale, prec);
    }
}

/// Per-task scratch of the forward pass: S [L, L] (allocated [t, t]), the dropout
/// factors of a row and 1 / l per row (16-bit inputs).
struct FwdScratch {
    s: Vec<f32>,
    fac: Vec<f32>,
    inv_l: Vec<f32>,
}

/// Per (sequence, head): S = Q K^T / sqrt(d), P = softmax(S), P' = P with dropout,
/// O = P' V. The L x L block exists only inside one task (a sequence: its heads in turn,
/// each written in place into the sequence's rows of `out` and `lse`). `inputs`: see the
/// module comment.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd(
    out: &mut [f32], lse: &mut [f32], q: &[f32], k: &[f32], v: &[f32], seqs: &[i32], b: usize, n: usize, t: usize,
    h: usize, d: usize, dropout: Dropout, inputs: Precision,
) {
    let spans = spans(seqs, b, n, t);
    let scale = 1.0 / (d as f32).sqrt();
    let on = dropout.is_on();
    let c = h * d;
    let (q, k, v) = (
        rounded(&q[..n * c], inputs),
        rounded(&k[..n * c], inputs),
        rounded(&v[..n * c], inputs),
    );
    let (q, k, v) = (&q[..], &k[..], &v[..]);
    let outs = split_rows(&mut out[..n * c], &spans, c);
    let lses = split_rows(&mut lse[..n * h], &spans, h);
    outs.into_par_iter().zip(lses).enumerate().for_each_init(
        || FwdScratch {
            s: vec![0f32; t * t],
            fac: vec![1f32; t],
            inv_l: vec![1f32; t],
        },
        |scr, (bi, (o, l))| {
            let (s0, len) = spans[bi];
            if len == 0 {
                return;
            }
            for hi in 0..h {
                let s = &mut scr.s[..len * len];
                let fac = &mut scr.fac[..len];
                // S [L, L] = scale * Q_h K_h^T
                gemm_view(
                    s,
                    head(q, s0, hi, h, d),
                    head(k, s0, hi, h, d).t(),
                    len,
                    len,
                    d,
                    scale,
                    0.0,
                );
                for (i, row) in s.chunks_mut(len).enumerate() {
                    if on {
                        dropout.fill_factors(prob_index(bi, hi, i, 0, t, h), fac);
                    }
                    if inputs == Precision::Fp32 {
                        l[i * h + hi] = softmax_dropout_row(row, fac, on);
                    } else {
                        (l[i * h + hi], scr.inv_l[i]) = softmax_row_rounded(row, fac, on, inputs);
                    }
                }
                // O_h [L, d] = P' V_h, into head hi's columns of the sequence's rows
                gemm_view_ldc(
                    &mut o[hi * d..],
                    c,
                    View::rows(s, 0, len),
                    head(v, s0, hi, h, d),
                    len,
                    d,
                    len,
                    1.0,
                    0.0,
                );
                round_head(o, Some(&scr.inv_l[..len]), hi, h, d, inputs);
            }
        },
    );
}

/// Per-task scratch of the backward pass: P, P with dropout, the dropout factors and dP
/// (then dS), each [L, L] (allocated [t, t]).
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
    lse: &[f32], seqs: &[i32], b: usize, n: usize, t: usize, h: usize, d: usize, dropout: Dropout, inputs: Precision,
) {
    let spans = spans(seqs, b, n, t);
    let scale = 1.0 / (d as f32).sqrt();
    let c = h * d;
    let (q, k, v, dout, out) = (
        rounded(&q[..n * c], inputs),
        rounded(&k[..n * c], inputs),
        rounded(&v[..n * c], inputs),
        rounded(&dout[..n * c], inputs),
        rounded(&out[..n * c], inputs),
    );
    let (q, k, v, dout, out) = (&q[..], &k[..], &v[..], &dout[..], &out[..]);
    // D [n, h] = dO . O per row and head, in one streaming pass (inside the tasks these
    // strided reads missed the cache; the sums are the same).
    let dvec: Vec<f32> = dout
        .par_chunks(c)
        .zip(out.par_chunks(c))
        .flat_map_iter(|(g, o)| g.chunks(d).zip(o.chunks(d)).map(|(g, o)| dot(g, o)))
        .collect();
    let dqs = split_rows(&mut dq[..n * c], &spans, c);
    let dks = split_rows(&mut dk[..n * c], &spans, c);
    let dvs = split_rows(&mut dv[..n * c], &spans, c);
    dqs.into_par_iter().zip(dks).zip(dvs).enumerate().for_each_init(
        || BwdScratch {
            p: vec![0f32; t * t],
            pf: vec![0f32; t * t],
            fac: vec![1f32; t * t],
            ds: vec![0f32; t * t],
        },
        |scr, (bi, ((dq, dk), dv))| {
            let (s0, len) = spans[bi];
            if len == 0 {
                return;
            }
            let ll = len * len;
            for hi in 0..h {
                let (qh, kh, vh, doh) = (
                    head(q, s0, hi, h, d),
                    head(k, s0, hi, h, d),
                    head(v, s0, hi, h, d),
                    head(dout, s0, hi, h, d),
                );
                // P recomputed from the saved logsumexp, and P with dropout
                gemm_view(&mut scr.p[..ll], qh, kh.t(), len, len, d, scale, 0.0);
                for i in 0..len {
                    let li = lse[(s0 + i) * h + hi];
                    let r = i * len..(i + 1) * len;
                    dropout.fill_factors(prob_index(bi, hi, i, 0, t, h), &mut scr.fac[r.clone()]);
                    let (p, pf, fac) = (&mut scr.p[r.clone()], &mut scr.pf[r.clone()], &scr.fac[r]);
                    if inputs == Precision::Fp32 {
                        probs_row(p, pf, fac, li);
                    } else {
                        probs_row_rounded(p, pf, fac, li, inputs);
                    }
                }
                // dV_h = (P f)^T dO_h
                let pf = View::rows(&scr.pf[..ll], 0, len).t();
                gemm_view_ldc(&mut dv[hi * d..], c, pf, doh, len, d, len, 1.0, 0.0);
                // dP = dO_h V_h^T, then dS in place
                gemm_view(&mut scr.ds[..ll], doh, vh.t(), len, len, d, 1.0, 0.0);
                for i in 0..len {
                    let di = dvec[(s0 + i) * h + hi];
                    let r = i * len..(i + 1) * len;
                    let (ds, p, fac) = (&mut scr.ds[r.clone()], &scr.p[r.clone()], &scr.fac[r]);
                    if inputs == Precision::Fp32 {
                        dscores_row(ds, p, fac, di, scale);
                    } else {
                        dscores_row_rounded(ds, p, fac, di, scale, inputs);
                    }
                }
                // dQ_h = dS K_h, dK_h = dS^T Q_h
                let ds = View::rows(&scr.ds[..ll], 0, len);
                gemm_view_ldc(&mut dq[hi * d..], c, ds, kh, len, d, len, 1.0, 0.0);
                gemm_view_ldc(&mut dk[hi * d..], c, ds.t(), qh, len, d, len, 1.0, 0.0);
                for g in [&mut *dq, &mut *dk, &mut *dv] {
                    round_head(g, None, hi, h, d, inputs);
                }
            }
        },
    );
}
