//! LayerNorm with an optional fused residual add (BERT is post-LN:
//! x_out = LN(sublayer(x) + x)). CPU twin of kernels/layernorm.cu.
//!
//! Rows run in parallel; each row's loops are compiled for AVX-512/AVX2 where the CPU has
//! them (simd::multiversion), with the statistics summed in fixed lanes (f64 for mean and
//! variance), so the result does not depend on the thread count or the vector width.
use super::gemm::REDUCE_ROWS;
use super::quantize::round_in_place;
use super::simd::{self, multiversion};
use crate::backend::Precision;
use rayon::prelude::*;

/// Lanes of the f64 sums of the row statistics (one AVX-512 register).
const LANES64: usize = 8;

/// sum of x as f64 in LANES64 interleaved partial sums added in lane order.
#[inline(always)]
fn sum64(x: &[f32], shift: f64) -> (f64, f64) {
    let mut s = [0f64; LANES64];
    let mut q = [0f64; LANES64];
    let mut chunks = x.chunks_exact(LANES64);
    for ch in &mut chunks {
        for l in 0..LANES64 {
            let d = ch[l] as f64 - shift;
            s[l] += d;
            q[l] += d * d;
        }
    }
    for (l, &v) in chunks.remainder().iter().enumerate() {
        let d = v as f64 - shift;
        s[l] += d;
        q[l] += d * d;
    }
    let (mut ts, mut tq) = (0f64, 0f64);
    for l in 0..LANES64 {
        ts += s[l];
        tq += q[l];
    }
    (ts, tq)
}

multiversion! {
    /// One row: o = LN(x + res) * weight + bias; returns (mean, 1/std).
    fn layernorm_fwd_row(
        o: &mut [f32], x: &[f32], res: Option<&[f32]>, weight: &[f32], bias: &[f32], eps: f32,
    ) -> (f32, f32) {
        let c = o.len();
        // The residual sum is staged in `o` so the statistics see exactly the values
        // the backward pass will recompute.
        match res {
            Some(res) => {
                for ((o, a), b) in o.iter_mut().zip(x).zip(res) {
                    *o = a + b;
                }
            }
            None => o.copy_from_slice(x),
        }
        let (s, _) = sum64(o, 0.0);
        let m = s / c as f64;
        let (_, q) = sum64(o, m);
        let var = q / c as f64;
        let rs = (1.0 / (var + eps as f64).sqrt()) as f32;
        let mf = m as f32;
        for ((o, w), b) in o.iter_mut().zip(weight).zip(bias) {
            *o = (*o - mf) * rs * w + b;
        }
        (mf, rs)
    }
}

/// out = (x - mean) * rstd * weight + bias with x = inp + residual, per row of width c.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd(
    out: &mut [f32], mean: &mut [f32], rstd: &mut [f32], inp: &[f32], residual: Option<&[f32]>, weight: &[f32],
    bias: &[f32], n: usize, c: usize, eps: f32, rounding: Precision,
) {
    out[..n * c]
        .par_chunks_mut(c)
        .zip(mean[..n].par_iter_mut().zip(rstd[..n].par_iter_mut()))
        .enumerate()
        .for_each(|(r, (o, (mu, rs)))| {
            let x = &inp[r * c..(r + 1) * c];
            let res = residual.map(|res| &res[r * c..(r + 1) * c]);
            (*mu, *rs) = layernorm_fwd_row(o, x, res, &weight[..c], &bias[..c], eps);
            round_in_place(o, rounding);
        });
}

multiversion! {
    /// One row of the backward pass: di (overwritten) from dout g; dw, db accumulated.
    /// xhat is scratch of width c.
    fn layernorm_bwd_row(
        di: &mut [f32], dw: &mut [f32], db: &mut [f32], xhat: &mut [f32], g: &[f32], x: &[f32],
        res: Option<&[f32]>, weight: &[f32], m: f32, s: f32,
    ) {
        let c = di.len();
        match res {
            Some(res) => {
                for ((h, &a), &b) in xhat.iter_mut().zip(x).zip(res) {
                    *h = (a + b - m) * s;
                }
            }
            None => {
                for (h, &a) in xhat.iter_mut().zip(x) {
                    *h = (a - m) * s;
                }
            }
        }
        // dxhat = g * w; dx = s * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        let mut s1 = [0f32; simd::LANES];
        let mut s2 = [0f32; simd::LANES];
        for j in 0..c {
            let dxh = g[j] * weight[j];
            s1[j % simd::LANES] += dxh;
            s2[j % simd::LANES] += dxh * xhat[j];
            dw[j] += g[j] * xhat[j];
            db[j] += g[j];
        }
        let (a, b) = (simd::sum(&s1) / c as f32, simd::sum(&s2) / c as f32);
        for j in 0..c {
            di[j] = s * (g[j] * weight[j] - a - xhat[j] * b);
        }
    }
}

/// Gradient of layernorm_fwd. dinp (overwritten) is the gradient w.r.t. inp + residual,
/// i.e. it flows unchanged to both summands; dweight and dbias are accumulated.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd(
    dinp: &mut [f32], dweight: &mut [f32], dbias: &mut [f32], dout: &[f32], inp: &[f32], residual: Option<&[f32]>,
    weight: &[f32], mean: &[f32], rstd: &[f32], n: usize, c: usize,
) {
    // Row-parallel pass: dinp, plus per-chunk partial sums of dweight/dbias that are
    // added in a fixed order afterwards (deterministic for any thread count).
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dinp[..n * c]
        .par_chunks_mut(REDUCE_ROWS * c)
        .enumerate()
        .map(|(chunk, di_chunk)| {
            let mut dw = vec![0f32; c];
            let mut db = vec![0f32; c];
            let mut xhat = vec![0f32; c];
            for (i, di) in di_chunk.chunks_mut(c).enumerate() {
                let r = chunk * REDUCE_ROWS + i;
                let rows = r * c..(r + 1) * c;
                layernorm_bwd_row(
                    di,
                    &mut dw,
                    &mut db,
                    &mut xhat,
                    &dout[rows.clone()],
                    &inp[rows.clone()],
                    residual.map(|res| &res[rows]),
                    &weight[..c],
                    mean[r],
                    rstd[r],
                );
            }
            (dw, db)
        })
        .collect();
    for (dw, db) in partials {
        for j in 0..c {
            dweight[j] += dw[j];
            dbias[j] += db[j];
        }
    }
}
