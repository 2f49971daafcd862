//! Rounding fp32 buffers to bf16 / fp16 in place, and conversions between fp32 and 16-bit
//! storage (kernels/quantize.cu), the mixed-precision emulation. CPU twin: cpu/quantize.rs.
use super::{check, grid_1d, int, need, Cuda, CudaBuf, BLOCK};
use crate::backend::Precision;
use cudarc::driver::PushKernelArg;

/// x[..n] rounded to the nearest `precision` value (ties to even), in place; no launch in
/// fp32, nor on a buffer stored in 16 bits of `precision` (its values already are). A
/// 16-bit buffer of the other type cannot hold the result: that panics.
pub fn quantize(cu: &Cuda, x: &mut CudaBuf, n: usize, precision: Precision) {
    let kernel = match precision {
        Precision::Fp32 => return,
        Precision::Bf16 => "quantize_bf16_f32",
        Precision::Fp16 => "quantize_fp16_f32",
    };
    if n == 0 {
        return;
    }
    let x = match x {
        CudaBuf::F32(x) => x,
        CudaBuf::Half(_, p) if *p == precision => return,
        CudaBuf::Half(_, p) => panic!("quantize to {precision}: the buffer is stored as {p}"),
    };
    let _r = cu.range(kernel);
    need(x.len(), n, kernel);
    let ni = int(n, "quantize n");
    let mut l = cu.stream.launch_builder(cu.func(kernel));
    l.arg(&mut **x).arg(&ni);
    // SAFETY: (float* x, int n); thread i < n reads and writes x[i]; x holds at least n
    // floats (checked above).
    check(unsafe { l.launch(grid_1d(n, BLOCK)) }, kernel);
}

/// dst[..n] = src[..n] on the device (stream-ordered): a byte copy when both are stored
/// alike, else a conversion (rounded to nearest even into 16 bits, exact into fp32).
pub fn copy(cu: &Cuda, dst: &mut CudaBuf, src: &CudaBuf, n: usize) {
    if n == 0 {
        return;
    }
    need(dst.len(), n, "copy dst");
    need(src.len(), n, "copy src");
    match (&mut *dst, src) {
        (CudaBuf::F32(d), CudaBuf::F32(s)) => {
            check(cu.stream.memcpy_dtod(&s.slice(..n), &mut d.slice_mut(..n)), "copy");
            return;
        }
        (CudaBuf::Half(d, pd), CudaBuf::Half(s, ps)) if pd == ps => {
            check(cu.stream.memcpy_dtod(&s.slice(..n), &mut d.slice_mut(..n)), "copy");
            return;
        }
        _ => {}
    }
    let _r = cu.range("convert");
    let (pd, td, ps, ts) = (dst.addr(&cu.stream), dst.code(), src.addr(&cu.stream), src.code());
    let ni = int(n, "copy n");
    let mut l = cu.stream.launch_builder(cu.func("convert_f32"));
    l.arg(&pd).arg(&td).arg(&ps).arg(&ts).arg(&ni);
    // SAFETY: (void* dst, int dst_t, const void* src, int src_t, int n); thread i < n reads
    // src[i] and writes dst[i], each of the storage type its code says; both hold n elements
    // (checked above).
    check(unsafe { l.launch(grid_1d(n, BLOCK)) }, "convert_f32");
}

/// Host values as 16-bit bit patterns of `p` (round to nearest even, as the kernels' `st`).
pub fn to_bits(x: &[f32], p: Precision) -> Vec<u16> {
    match p {
        Precision::Bf16 => x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect(),
        Precision::Fp16 => x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect(),
        Precision::Fp32 => unreachable!("fp32 buffers are not stored as bits"),
    }
}

/// 16-bit bit patterns of `p` as fp32 values (exact).
pub fn from_bits(b: &[u16], p: Precision) -> Vec<f32> {
    match p {
        Precision::Bf16 => b.iter().map(|&v| half::bf16::from_bits(v).to_f32()).collect(),
        Precision::Fp16 => b.iter().map(|&v| half::f16::from_bits(v).to_f32()).collect(),
        Precision::Fp32 => unreachable!("fp32 buffers are not stored as bits"),
    }
}
