//! Multi-head self-attention core with a key padding mask and dropout on the
//! probabilities. CPU twin of kernels/attention.cu (which tiles FlashAttention-style and
//! never stores the t x t matrix; here one head's t x t scores live only inside its task).
//!
//! Layout: q, k, v, out are [b, t, h*d], heads interleaved exactly as the HF query/key/value
//! linear layers produce them, so no transposes are needed around the op.
//! lse [b, h, t] is the per-row logsumexp of the scaled, masked scores; backward
//! recomputes the probabilities from it. Scores use scale 1/sqrt(d) as in BERT.
use super::gemm::gemm;
use crate::backend::philox::Dropout;
use rayon::prelude::*;

/// Copies head `hi` of sequence `bi` out of a [b, t, h*d] tensor into a dense [t, d] block.
fn gather_head(x: &[f32], bi: usize, hi: usize, t: usize, h: usize, d: usize) -> Vec<f32> {
    let c = h * d;
    let mut out = Vec::with_capacity(t * d);
    for i in 0..t {
        let base = (bi * t + i) * c + hi * d;
        out.extend_from_slice(&x[base..base + d]);
    }
    out
}

fn scatter_head(x: &mut [f32], src: &[f32], bi: usize, hi: usize, t: usize, h: usize, d: usize) {
    let c = h * d;
    for i in 0..t {
        let base = (bi * t + i) * c + hi * d;
        x[base..base + d].copy_from_slice(&src[i * d..(i + 1) * d]);
    }
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

/// Softmax of the scaled scores in place, row by row, with masked keys at exactly 0;
/// returns per-row logsumexp. `s` is [t, t] holding q.k^T (unscaled).
fn softmax_rows(s: &mut [f32], lse: &mut [f32], mask: &[f32], t: usize, scale: f32) {
    for i in 0..t {
        let row = &mut s[i * t..(i + 1) * t];
        let mut mx = f32::NEG_INFINITY;
        for (x, &m) in row.iter_mut().zip(mask) {
            *x = if m > 0.5 { *x * scale } else { f32::NEG_INFINITY };
            mx = mx.max(*x);
        }
        let mut sum = 0f32;
        for x in row.iter_mut() {
            *x = (*x - mx).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
        lse[i] = mx + sum.ln();
    }
}

/// Per (sequence, head): S = Q K^T, P = softmax(S / sqrt(d)) over real keys, P' = P with
/// dropout, O = P' V. The t x t block exists only inside one task.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd(
    out: &mut [f32], lse: &mut [f32], q: &[f32], k: &[f32], v: &[f32], mask: &[f32], b: usize, t: usize, h: usize,
    d: usize, dropout: Dropout,
) {
    let scale = 1.0 / (d as f32).sqrt();
    let results: Vec<(Vec<f32>, Vec<f32>)> = (0..b * h)
        .into_par_iter()
        .map(|task| {
            let (bi, hi) = (task / h, task % h);
            let (qh, kh, vh) = (
                gather_head(q, bi, hi, t, h, d),
                gather_head(k, bi, hi, t, h, d),
                gather_head(v, bi, hi, t, h, d),
            );
            let m = &mask[bi * t..(bi + 1) * t];
            let mut s = vec![0f32; t * t];
            gemm(&mut s, &qh, &kh, t, t, d, false, true, 1.0, 0.0);
            let mut lh = vec![0f32; t];
            softmax_rows(&mut s, &mut lh, m, t, scale);
            if dropout.is_on() {
                let mut fac = vec![1f32; t];
                for i in 0..t {
                    dropout.fill_factors(prob_index(bi, hi, i, 0, t, h), &mut fac);
                    for (p, f) in s[i * t..(i + 1) * t].iter_mut().zip(&fac) {
                        *p *= f;
                    }
                }
            }
            let mut oh = vec![0f32; t * d];
            gemm(&mut oh, &s, &vh, t, d, t, false, false, 1.0, 0.0);
            (oh, lh)
        })
        .collect();
    for (task, (oh, lh)) in results.into_iter().enumerate() {
        let (bi, hi) = (task / h, task % h);
        scatter_head(out, &oh, bi, hi, t, h, d);
        lse[(bi * h + hi) * t..(bi * h + hi + 1) * t].copy_from_slice(&lh);
    }
}

/// Backward, recomputing P from lse (FlashAttention-2): with f the dropout factors,
/// dV = (P f)^T dO, dP = (dO V^T) f, D_i = dO_i . O_i, dS = P (dP - D) / sqrt(d),
/// dQ = dS K, dK = dS^T Q.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], dout: &[f32], q: &[f32], k: &[f32], v: &[f32], out: &[f32],
    lse: &[f32], mask: &[f32], b: usize, t: usize, h: usize, d: usize, dropout: Dropout,
) {
    let scale = 1.0 / (d as f32).sqrt();
    type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);
    let results: Vec<Grads> = (0..b * h)
        .into_par_iter()
        .map(|task| {
            let (bi, hi) = (task / h, task % h);
            let g = |x: &[f32]| gather_head(x, bi, hi, t, h, d);
            let (qh, kh, vh, oh, doh) = (g(q), g(k), g(v), g(out), g(dout));
            let m = &mask[bi * t..(bi + 1) * t];
            let lh = &lse[(bi * h + hi) * t..(bi * h + hi + 1) * t];
            // P recomputed from the saved logsumexp
            let mut p = vec![0f32; t * t];
            gemm(&mut p, &qh, &kh, t, t, d, false, true, 1.0, 0.0);
            for i in 0..t {
                for (x, &mj) in p[i * t..(i + 1) * t].iter_mut().zip(m) {
                    *x = if mj > 0.5 { (*x * scale - lh[i]).exp() } else { 0.0 };
                }
            }
            let mut fac = vec![1f32; t * t];
            for i in 0..t {
                dropout.fill_factors(prob_index(bi, hi, i, 0, t, h), &mut fac[i * t..(i + 1) * t]);
            }
            let pf: Vec<f32> = p.iter().zip(&fac).map(|(a, b)| a * b).collect();
            let mut dvh = vec![0f32; t * d];
            gemm(&mut dvh, &pf, &doh, t, d, t, true, false, 1.0, 0.0);
            let mut ds = vec![0f32; t * t];
            gemm(&mut ds, &doh, &vh, t, t, d, false, true, 1.0, 0.0);
            for i in 0..t {
                let di = dot(&doh[i * d..(i + 1) * d], &oh[i * d..(i + 1) * d]);
                for j in 0..t {
                    let idx = i * t + j;
                    ds[idx] = p[idx] * (ds[idx] * fac[idx] - di) * scale;
                }
            }
            let (mut dqh, mut dkh) = (vec![0f32; t * d], vec![0f32; t * d]);
            gemm(&mut dqh, &ds, &kh, t, d, t, false, false, 1.0, 0.0);
            gemm(&mut dkh, &ds, &qh, t, d, t, true, false, 1.0, 0.0);
            (dqh, dkh, dvh)
        })
        .collect();
    for (task, (dqh, dkh, dvh)) in results.into_iter().enumerate() {
        let (bi, hi) = (task / h, task % h);
        scatter_head(dq, &dqh, bi, hi, t, h, d);
        scatter_head(dk, &dkh, bi, hi, t, h, d);
        scatter_head(dv, &dvh, bi, hi, t, h, d);
    }
}
