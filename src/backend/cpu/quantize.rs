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

/// x[..n] = round_to(x[..n], precision) in place; nothing is touched in fp32.
pub fn quantize(x: &mut [f32], n: usize, precision: Precision) {
    if precision == Precision::Fp32 {
        return;
    }
    x[..n].par_chunks_mut(CHUNK).for_each(|c| {
        for v in c {
            *v = round_to(*v, precision);
        }
    });
}
