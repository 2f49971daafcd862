//! Bias + GELU (kernels/gelu.cu). CPU twin: cpu/gelu.rs.
use super::gemm::col_sums_into;
use super::{check, grid_1d, int, need, round_code, Cuda, BLOCK};
use crate::backend::Precision;
use cudarc::driver::{CudaSlice, PushKernelArg};

/// out = gelu(inp + bias) (erf form), rows of width c, rounded to `rounding`.
pub fn bias_gelu_fwd(
    cu: &Cuda, out: &mut CudaSlice<f32>, inp: &CudaSlice<f32>, bias: &CudaSlice<f32>, n: usize, c: usize,
    rounding: Precision,
) {
    let total = n * c;
    if total == 0 {
        return;
    }
    let _r = cu.range("bias_gelu_fwd");
    need(out.len(), total, "bias_gelu_fwd out");
    need(inp.len(), total, "bias_gelu_fwd inp");
    need(bias.len(), c, "bias_gelu_fwd bias");
    let (ni, ci) = (int(n, "gelu n"), int(c, "gelu c"));
    int(total, "gelu n*c");
    let mut l = cu.stream.launch_builder(cu.func("bias_gelu_fwd_f32"));
    let round = round_code(rounding);
    l.arg(out).arg(inp).arg(bias).arg(&ni).arg(&ci).arg(&round);
    // SAFETY: (float* out, const float* inp, const float* bias, int n, int c, int round); one thread
    // per element < n*c, bias[..c]; sizes checked above.
    check(unsafe { l.launch(grid_1d(total, BLOCK)) }, "bias_gelu_fwd_f32");
}

/// dinp = dout * gelu'(inp + bias) (overwritten, rounded to `rounding`); dbias += column
/// sums of dinp as written.
#[allow(clippy::too_many_arguments)]
pub fn bias_gelu_bwd(
    cu: &Cuda, dinp: &mut CudaSlice<f32>, dbias: &mut CudaSlice<f32>, dout: &CudaSlice<f32>, inp: &CudaSlice<f32>,
    bias: &CudaSlice<f32>, n: usize, c: usize, rounding: Precision,
) {
    let total = n * c;
    if total == 0 {
        return;
    }
    let _r = cu.range("bias_gelu_bwd");
    for (len, what) in [(dinp.len(), "dinp"), (dout.len(), "dout"), (inp.len(), "inp")] {
        need(len, total, what);
    }
    need(bias.len(), c, "bias_gelu_bwd bias");
    let (ni, ci) = (int(n, "gelu n"), int(c, "gelu c"));
    int(total, "gelu n*c");
    let mut l = cu.stream.launch_builder(cu.func("bias_gelu_bwd_dinp_f32"));
    let round = round_code(rounding);
    l.arg(&mut *dinp)
        .arg(dout)
        .arg(inp)
        .arg(bias)
        .arg(&ni)
        .arg(&ci)
        .arg(&round);
    // SAFETY: (float* dinp, const float* dout, const float* inp, const float* bias, int n,
    // int c, int round); one thread per element < n*c; sizes checked above.
    check(unsafe { l.launch(grid_1d(total, BLOCK)) }, "bias_gelu_bwd_dinp_f32");
    col_sums_into(cu, dbias, dinp, n, c);
}
