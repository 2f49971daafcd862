//! LayerNorm with an optional fused residual add (BERT is post-LN:
//! x_out = LN(dropout(sublayer(x)) + x)), and optionally the dropout of its input fused
//! in (`dropout` on): the dropped input is formed per row and never stored; the backward
//! pass regenerates it. CPU twin of kernels/layernorm.cu.
//!
//! Rows run in parallel; each row's loops are compiled for AVX-512/AVX2 where the CPU has
//! them (simd::multiversion), with the statistics summed in fixed lanes (f64 for mean and
//! variance), so the result does not depend on the thread count or the vector width.
use super::gemm::REDUCE_ROWS;
use super::quantize::round_in_place;
use super::simd::{self, multiversion};
use crate::backend::{Dropout, Precision};
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

/// Row r of inp as `dropout_fwd` leaves it (elements r c .. r c + c of the mask): into
/// `buf` when the dropout is on, with the row's mask factors left in `fac`; else the row
/// itself.
fn input_row<'a>(
    inp: &'a [f32], r: usize, c: usize, dropout: Dropout, fac: &mut [f32], buf: &'a mut [f32],
) -> &'a [f32] {
    let row = &inp[r * c..(r + 1) * c];
    if !dropout.is_on() {
        return row;
    }
    dropout.fill_factors((r * c) as u64, fac);
    for ((b, &f), &x) in buf.iter_mut().zip(fac.iter()).zip(row) {
        *b = f * x; // factor * x, as cpu/dropout.rs and the kernels multiply
    }
    buf
}

/// out = (x - mean) * rstd * weight + bias with x = dropout(inp) + residual, per row of
/// width c (`Dropout::OFF`: x = inp + residual). Bit for bit `dropout_fwd` (fp32) then
/// the plain LayerNorm.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd(
    out: &mut [f32], mean: &mut [f32], rstd: &mut [f32], inp: &[f32], dropout: Dropout, residual: Option<&[f32]>,
    weight: &[f32], bias: &[f32], n: usize, c: usize, eps: f32, rounding: Precision,
) {
    out[..n * c]
        .par_chunks_mut(c)
        .zip(mean[..n].par_iter_mut().zip(rstd[..n].par_iter_mut()))
        .enumerate()
        .for_each_init(
            || {
                let w = if dropout.is_on() { c } else { 0 };
                (vec![0f32; w], vec![0f32; w])
            },
            |(fac, buf), (r, (o, (mu, rs)))| {
                let x = input_row(inp, r, c, dropout, fac, buf);
                let res = residual.map(|res| &res[r * c..(r + 1) * c]);
                (*mu, *rs) = layernorm_fwd_row(o, x, res, &weight[..c], &bias[..c], eps);
                round_in_place(o, rounding);
            },
        );
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

/// Gradient of layernorm_fwd. dsum (overwritten) is the gradient w.r.t. x = dropout(inp) +
/// residual, i.e. what flows unchanged to the residual; with `dinp` given it also gets the
/// gradient w.r.t. inp, dsum through the dropout mask rounded as `rounding` says (bit for
/// bit `dropout_bwd` of dsum). dweight and dbias are accumulated.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd(
    dsum: &mut [f32], dinp: Option<&mut [f32]>, dweight: &mut [f32], dbias: &mut [f32], dout: &[f32], inp: &[f32],
    dropout: Dropout, residual: Option<&[f32]>, weight: &[f32], mean: &[f32], rstd: &[f32], n: usize, c: usize,
    rounding: Precision,
) {
    // Row-parallel pass: dsum (and dinp), plus per-chunk partial sums of dweight/dbias
    // that are added in a fixed order afterwards (deterministic for any thread count).
    let job = |chunk: usize, ds_chunk: &mut [f32], mut dp_chunk: Option<&mut [f32]>| {
        let mut dw = vec![0f32; c];
        let mut db = vec![0f32; c];
        let mut xhat = vec![0f32; c];
        let w = if dropout.is_on() { c } else { 0 };
        let (mut fac, mut buf) = (vec![0f32; w], vec![0f32; w]);
        for (i, ds) in ds_chunk.chunks_mut(c).enumerate() {
            let r = chunk * REDUCE_ROWS + i;
            let rows = r * c..(r + 1) * c;
            layernorm_bwd_row(
                ds,
                &mut dw,
                &mut db,
                &mut xhat,
                &dout[rows.clone()],
                input_row(inp, r, c, dropout, &mut fac, &mut buf),
                residual.map(|res| &res[rows]),
                &weight[..c],
                mean[r],
                rstd[r],
            );
            if let Some(dp) = dp_chunk.as_deref_mut() {
                // dinp = dropout_bwd(dsum) on this row, while it is in cache
                let dp = &mut dp[i * c..(i + 1) * c];
                if dropout.is_on() {
                    for ((d, &f), &g) in dp.iter_mut().zip(&fac).zip(ds.iter()) {
                        *d = f * g;
                    }
                } else {
                    dp.copy_from_slice(ds);
                }
                round_in_place(dp, rounding);
            }
        }
        (dw, db)
    };
    let partials: Vec<(Vec<f32>, Vec<f32>)> = match dinp {
        Some(dinp) => dsum[..n * c]
            .par_chunks_mut(REDUCE_ROWS * c)
            .zip(dinp[..n * c].par_chunks_mut(REDUCE_ROWS * c))
            .enumerate()
            .map(|(k, (ds, dp))| job(k, ds, Some(dp)))
            .collect(),
        None => dsum[..n * c]
            .par_chunks_mut(REDUCE_ROWS * c)
            .enumerate()
            .map(|(k, ds)| job(k, ds, None))
            .collect(),
    };
    for (dw, db) in partials {
        for j in 0..c {
            dweight[j] += dw[j];
            dbias[j] += db[j];
        }
    }
}
