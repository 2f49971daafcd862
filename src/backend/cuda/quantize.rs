//! Rounding fp32 buffers to bf16 / fp16 in place (kernels/quantize.cu), the
//! mixed-precision emulation. CPU twin: cpu/quantize.rs.
use super::{check, grid_1d, int, need, Cuda, BLOCK};
use crate::backend::Precision;
use cudarc::driver::{CudaSlice, PushKernelArg};

/// x[..n] rounded to the nearest `precision` value (ties to even), in place; no launch
/// in fp32.
pub fn quantize(cu: &Cuda, x: &mut CudaSlice<f32>, n: usize, precision: Precision) {
    let kernel = match precision {
        Precision::Fp32 => return,
        Precision::Bf16 => "quantize_bf16_f32",
        Precision::Fp16 => "quantize_fp16_f32",
    };
    if n == 0 {
        return;
    }
    let _r = cu.range(kernel);
    need(x.len(), n, kernel);
    let ni = int(n, "quantize n");
    let mut l = cu.stream.launch_builder(cu.func(kernel));
    l.arg(x).arg(&ni);
    // SAFETY: (float* x, int n); thread i < n reads and writes x[i]; x holds at least n
    // floats (checked above).
    check(unsafe { l.launch(grid_1d(n, BLOCK)) }, kernel);
}

/// dst[..n] = src[..n] on the device (stream-ordered).
pub fn copy(cu: &Cuda, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>, n: usize) {
    if n == 0 {
        return;
    }
    need(dst.len(), n, "copy dst");
    need(src.len(), n, "copy src");
    check(cu.stream.memcpy_dtod(&src.slice(..n), &mut dst.slice_mut(..n)), "copy");
}
