//! Rounding fp32 buffers to bf16 or fp16 in place: the mixed-precision emulation of SPEC
//! section 7 (see `backend::Precision`). CPU twin of kernels/quantize.cu.
//!
//! The conversions are the `half` crate's (IEEE 754 round to nearest, ties to even), so a
//! value comes back exactly as a store to a bf16 / fp16 buffer and a load give it:
//! - bf16: fp32's exponent range; the mantissa keeps 8 bits. Only values within half an
//!   ulp of f32::MAX round up to +-inf.
//! - fp16: |x| >= 65520 becomes +-inf (the overflow dynamic loss scaling detects);
//!   |x| < 2^-14 becomes an fp16 subnormal (steps of 2^-24), no flush to zero.
//! - NaN stays NaN (quiet); +-0 and +-inf are kept.
use crate::backend::Precision;
use half::{bf16, f16};
use rayon::prelude::*;

/// Elements per parallel task (any value gives the same result).
const CHUNK: usize = 16384;

/// `x` rounded to the nearest `precision` value and widened back to f32.
#[inline]
pub fn round_to(x: f32, precision: Precision) -> f32 {
    match precision {
        Precision::Fp32 => x,
        Precision::Bf16 => bf16::from_f32(x).to_f32(),
        Precision::Fp16 => f16::from_f32(x).to_f32(),
    }
}

/// x = round_to(x, precision) in place, on the calling thread; nothing is touched in fp32.
/// What the ops that round their output as they write it (`rounding`) apply to each row.
pub fn round_in_place(x: &mut [f32], precision: Precision) {
    if precision != Precision::Fp32 {
        x.iter_mut().for_each(|v| *v = round_to(*v, precision));
    }
}

/// x[..n] = round_to(x[..n], precision) in place; nothing is touched in fp32.
pub fn quantize(x: &mut [f32], n: usize, precision: Precision) {
    if precision == Precision::Fp32 {
        return;
    }
    x[..n].par_chunks_mut(CHUNK).for_each(|c| round_in_place(c, precision));
}

/// A copy of x rounded to `precision`, or None in fp32 (use x itself): the inputs an op
/// reads in 16 bits (attention's q, k, v, InfoNCE's similarity rows).
pub fn rounded_copy(x: &[f32], precision: Precision) -> Option<Vec<f32>> {
    (precision != Precision::Fp32).then(|| {
        let mut v = x.to_vec();
        quantize(&mut v, x.len(), precision);
        v
    })
}
