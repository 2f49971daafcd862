//! Dropout from Philox counters (kernels/dropout.cu). CPU twin: cpu/dropout.rs.
use super::{check, grid_1d, int, need, round_code, Cuda, CudaBuf, DropoutArgs, BLOCK};
use crate::backend::{Dropout, Precision};
use cudarc::driver::{CudaSlice, PushKernelArg};

/// out = inp * mask / (1-p) (a copy when p = 0), rounded to `rounding`.
pub fn dropout_fwd(cu: &Cuda, out: &mut CudaBuf, inp: &CudaBuf, n: usize, d: Dropout, rounding: Precision) {
    launch_elementwise(cu, "dropout_fwd_f32", out, inp, n, d, rounding);
}

/// dinp = dout * mask / (1-p), the forward's mask regenerated, rounded to `rounding`.
pub fn dropout_bwd(cu: &Cuda, dinp: &mut CudaBuf, dout: &CudaBuf, n: usize, d: Dropout, rounding: Precision) {
    launch_elementwise(cu, "dropout_bwd_f32", dinp, dout, n, d, rounding);
}

/// The two launches above (out and inp in any storage).
fn launch_elementwise(
    cu: &Cuda, kernel: &str, out: &mut CudaBuf, inp: &CudaBuf, n: usize, d: Dropout, rounding: Precision,
) {
    if n == 0 {
        return;
    }
    let _r = cu.range(kernel);
    need(out.len(), n, kernel);
    need(inp.len(), n, kernel);
    let (ni, args) = (int(n, "dropout n"), DropoutArgs::from(d));
    let mut l = cu.stream.launch_builder(cu.func(kernel));
    let round = round_code(rounding);
    let (po, to, pi, ti) = (out.addr(&cu.stream), out.code(), inp.addr(&cu.stream), inp.code());
    l.arg(&po).arg(&to).arg(&pi).arg(&ti).arg(&ni).arg(&args).arg(&round);
    // SAFETY: (void* out, int out_t, const void* inp, int inp_t, int n, DropoutArgs d, int
    // round), as dropout_bwd_f32's; one thread per group of four elements reads inp[..n]
    // and writes out[..n], each of its type's storage; both hold n elements (checked above).
    check(unsafe { l.launch(grid_1d(n.div_ceil(4), BLOCK)) }, kernel);
}

/// out [2n] = dropout over [inp | inp]: both forget views from one read of inp [n].
pub fn dropout_duplicate(cu: &Cuda, out: &mut CudaSlice<f32>, inp: &CudaSlice<f32>, n: usize, d: Dropout) {
    if n == 0 {
        return;
    }
    let _r = cu.range("dropout_duplicate");
    need(out.len(), 2 * n, "dropout_duplicate out");
    need(inp.len(), n, "dropout_duplicate inp");
    let (ni, args) = (int(2 * n, "dropout_duplicate 2n") / 2, DropoutArgs::from(d));
    let mut l = cu.stream.launch_builder(cu.func("dropout_duplicate_f32"));
    l.arg(out).arg(inp).arg(&ni).arg(&args);
    // SAFETY: (float* out, const float* inp, int n, DropoutArgs d); thread i < n reads inp[i]
    // and writes out[i], out[n + i]; out holds 2n floats, inp n (checked above).
    check(unsafe { l.launch(grid_1d(n, BLOCK)) }, "dropout_duplicate_f32");
}

/// dinp [n] (overwritten) = sum of both views' gradients dout [2n] through their masks.
pub fn dropout_duplicate_bwd(cu: &Cuda, dinp: &mut CudaSlice<f32>, dout: &CudaSlice<f32>, n: usize, d: Dropout) {
    if n == 0 {
        return;
    }
    let _r = cu.range("dropout_duplicate_bwd");
    need(dinp.len(), n, "dropout_duplicate_bwd dinp");
    need(dout.len(), 2 * n, "dropout_duplicate_bwd dout");
    let (ni, args) = (int(2 * n, "dropout_duplicate_bwd 2n") / 2, DropoutArgs::from(d));
    let mut l = cu.stream.launch_builder(cu.func("dropout_duplicate_bwd_f32"));
    l.arg(dinp).arg(dout).arg(&ni).arg(&args);
    // SAFETY: (float* dinp, const float* dout, int n, DropoutArgs d); thread i < n reads
    // dout[i], dout[n + i] and writes dinp[i]; sizes checked above.
    check(unsafe { l.launch(grid_1d(n, BLOCK)) }, "dropout_duplicate_bwd_f32");
}
