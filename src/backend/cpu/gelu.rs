//! Bias + GELU (erf form, as BERT's "gelu"). CPU twin of kernels/gelu.cu; on the GPU this
//! is a cuBLASLt epilogue where possible.
use super::gemm::col_sums_into;
use rayon::prelude::*;
use std::f32::consts::{FRAC_1_SQRT_2, PI};

#[inline]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * FRAC_1_SQRT_2))
}

/// d gelu / dx = Phi(x) + x * phi(x)
#[inline]
pub fn gelu_grad(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + libm::erff(x * FRAC_1_SQRT_2));
    let pdf = (-0.5 * x * x).exp() / (2.0 * PI).sqrt();
    cdf + x * pdf
}

/// out = gelu(inp + bias), rows of width c.
pub fn bias_gelu_fwd(out: &mut [f32], inp: &[f32], bias: &[f32], n: usize, c: usize) {
    out[..n * c]
        .par_chunks_mut(c)
        .zip(inp[..n * c].par_chunks(c))
        .for_each(|(o, x)| {
            for ((o, x), b) in o.iter_mut().zip(x).zip(bias) {
                *o = gelu(x + b);
            }
        });
}

/// dinp = dout * gelu'(inp + bias); dbias += column sums of dinp.
pub fn bias_gelu_bwd(dinp: &mut [f32], dbias: &mut [f32], dout: &[f32], inp: &[f32], bias: &[f32], n: usize, c: usize) {
    dinp[..n * c]
        .par_chunks_mut(c)
        .zip(dout[..n * c].par_chunks(c).zip(inp[..n * c].par_chunks(c)))
        .for_each(|(di, (g, x))| {
            for j in 0..c {
                di[j] = g[j] * gelu_grad(x[j] + bias[j]);
            }
        });
    col_sums_into(dbias, dinp, n, c);
}
