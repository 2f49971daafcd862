//! Bias + GELU (erf form, as BERT's "gelu"). CPU twin of kernels/gelu.cu; on the GPU this
//! is a cuBLASLt epilogue where possible.
//!
//! erf and exp are simd::erf and simd::exp (within 4.2e-7 and 1 ulp of libm), so the row
//! loops vectorise; they run in AVX-512/AVX2 builds where the CPU has them.
use super::gemm::{col_sums_chunk, REDUCE_ROWS};
use super::quantize::round_in_place;
use super::simd::{self, multiversion};
use crate::backend::Precision;
use rayon::prelude::*;
use std::f32::consts::FRAC_1_SQRT_2;

/// 1 / sqrt(2 pi)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + simd::erf(x * FRAC_1_SQRT_2))
}

/// d gelu / dx = Phi(x) + x * phi(x)
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + simd::erf(x * FRAC_1_SQRT_2));
    let pdf = simd::exp(-0.5 * x * x) * FRAC_1_SQRT_2PI;
    cdf + x * pdf
}

multiversion! {
    /// One row: o = gelu(x + bias).
    fn bias_gelu_row(o: &mut [f32], x: &[f32], bias: &[f32]) {
        for ((o, x), b) in o.iter_mut().zip(x).zip(bias) {
            *o = gelu(x + b);
        }
    }
}

multiversion! {
    /// One row: di = g * gelu'(x + bias).
    fn bias_gelu_grad_row(di: &mut [f32], g: &[f32], x: &[f32], bias: &[f32]) {
        let c = di.len();
        let (g, x, bias) = (&g[..c], &x[..c], &bias[..c]);
        for j in 0..c {
            di[j] = g[j] * gelu_grad(x[j] + bias[j]);
        }
    }
}

/// out = gelu(inp + bias), rows of width c, rounded to `rounding`.
pub fn bias_gelu_fwd(out: &mut [f32], inp: &[f32], bias: &[f32], n: usize, c: usize, rounding: Precision) {
    out[..n * c]
        .par_chunks_mut(c)
        .zip(inp[..n * c].par_chunks(c))
        .for_each(|(o, x)| {
            bias_gelu_row(o, x, &bias[..c]);
            round_in_place(o, rounding);
        });
}

/// dinp = dout * gelu'(inp + bias), rounded to `rounding`; dbias += column sums of dinp as
/// written. One pass: each chunk of REDUCE_ROWS rows is written and summed while in cache,
/// partials added in chunk order (the same bits as `col_sums_into` over dinp).
#[allow(clippy::too_many_arguments)]
pub fn bias_gelu_bwd(
    dinp: &mut [f32], dbias: &mut [f32], dout: &[f32], inp: &[f32], bias: &[f32], n: usize, c: usize,
    rounding: Precision,
) {
    let rows = REDUCE_ROWS * c;
    let partials: Vec<Vec<f32>> = dinp[..n * c]
        .par_chunks_mut(rows)
        .zip(dout[..n * c].par_chunks(rows).zip(inp[..n * c].par_chunks(rows)))
        .map(|(di, (g, x))| {
            for ((di, g), x) in di.chunks_mut(c).zip(g.chunks(c)).zip(x.chunks(c)) {
                bias_gelu_grad_row(di, g, x, &bias[..c]);
                round_in_place(di, rounding);
            }
            let mut acc = vec![0f32; c];
            col_sums_chunk(&mut acc, di);
            acc
        })
        .collect();
    for p in partials {
        for (d, x) in dbias[..c].iter_mut().zip(&p) {
            *d += x;
        }
    }
}
