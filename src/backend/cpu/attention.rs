//! Multi-head self-attention core with a key padding mask and dropout on the
//! probabilities. CPU twin of kernels/attention.cu (which tiles FlashAttention-style and
//! never stores the t x t matrix; here one head's t x t scores live only inside its task).
//!
//! Layout: q, k, v, out are [b, t, h*d], heads interleaved exactly as the HF query/key/value
//! linear layers produce them, so no transposes are needed around the op.
//! lse [b, h, t] is the per-row logsumexp of the scaled, masked scores; backward
//! recomputes the probabilities from it. Scores use scale 1/sqrt(d) as in BERT.
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

/// Probabilities of row i (already multiplied by nothing: P = softmax(S)); masked keys get 0.
fn probs_row(p: &mut [f32], qi: &[f32], kh: &[f32], mask: &[f32], d: usize, scale: f32, lse: f32) {
    for (j, pj) in p.iter_mut().enumerate() {
        *pj = if mask[j] > 0.5 {
            (scale * dot(qi, &kh[j * d..(j + 1) * d]) - lse).exp()
        } else {
            0.0
        };
    }
}

/// Index of probability (i, j) of head (bi, hi), the dropout counter.
#[inline]
fn prob_index(bi: usize, hi: usize, i: usize, j: usize, t: usize, h: usize) -> u64 {
    (((bi * h + hi) * t + i) * t + j) as u64
}

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
            let mut oh = vec![0f32; t * d];
            let mut lh = vec![0f32; t];
            let mut s = vec![0f32; t];
            for i in 0..t {
                let qi = &qh[i * d..(i + 1) * d];
                let mut mx = f32::NEG_INFINITY;
                for j in 0..t {
                    s[j] = if m[j] > 0.5 {
                        scale * dot(qi, &kh[j * d..(j + 1) * d])
                    } else {
                        f32::NEG_INFINITY
                    };
                    mx = mx.max(s[j]);
                }
                let sum: f32 = s.iter().map(|&x| (x - mx).exp()).sum();
                let l = mx + sum.ln();
                lh[i] = l;
                let oi = &mut oh[i * d..(i + 1) * d];
                for j in 0..t {
                    if m[j] <= 0.5 {
                        continue;
                    }
                    let pj = (s[j] - l).exp() * dropout.factor(prob_index(bi, hi, i, j, t, h));
                    for (o, x) in oi.iter_mut().zip(&vh[j * d..(j + 1) * d]) {
                        *o += pj * x;
                    }
                }
            }
            (oh, lh)
        })
        .collect();
    for (task, (oh, lh)) in results.into_iter().enumerate() {
        let (bi, hi) = (task / h, task % h);
        scatter_head(out, &oh, bi, hi, t, h, d);
        lse[(bi * h + hi) * t..(bi * h + hi + 1) * t].copy_from_slice(&lh);
    }
}

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
            let (mut dqh, mut dkh, mut dvh) = (vec![0f32; t * d], vec![0f32; t * d], vec![0f32; t * d]);
            let mut p = vec![0f32; t];
            for i in 0..t {
                let qi = &qh[i * d..(i + 1) * d];
                let doi = &doh[i * d..(i + 1) * d];
                probs_row(&mut p, qi, &kh, m, d, scale, lh[i]);
                // D_i = dout_i . out_i = sum_j P_ij dP_ij (FlashAttention-2, eq. for dS)
                let di = dot(doi, &oh[i * d..(i + 1) * d]);
                for j in 0..t {
                    if m[j] <= 0.5 {
                        continue;
                    }
                    let f = dropout.factor(prob_index(bi, hi, i, j, t, h));
                    let vj = &vh[j * d..(j + 1) * d];
                    // dV_j += (P_ij f_ij) dout_i
                    for (dvx, gx) in dvh[j * d..(j + 1) * d].iter_mut().zip(doi) {
                        *dvx += p[j] * f * gx;
                    }
                    let dp = dot(doi, vj) * f;
                    let ds = p[j] * (dp - di) * scale;
                    for (dqx, kx) in dqh[i * d..(i + 1) * d].iter_mut().zip(&kh[j * d..(j + 1) * d]) {
                        *dqx += ds * kx;
                    }
                    for (dkx, qx) in dkh[j * d..(j + 1) * d].iter_mut().zip(qi) {
                        *dkx += ds * qx;
                    }
                }
            }
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
