//! Row-wise L2 normalisation (kernels/l2norm.cu). CPU twin: cpu/l2norm.rs.
use super::{check, grid_1d, int, need, Cuda, BLOCK};
use cudarc::driver::{CudaSlice, PushKernelArg};

/// out[r] = inp[r] / norm[r], norm[r] = max(||inp[r]||, 1e-12) saved. One warp per row.
pub fn l2norm_fwd(
    cu: &Cuda, out: &mut CudaSlice<f32>, norm: &mut CudaSlice<f32>, inp: &CudaSlice<f32>, m: usize, c: usize,
) {
    if m == 0 {
        return;
    }
    let _r = cu.range("l2norm_fwd");
    need(out.len(), m * c, "l2norm_fwd out");
    need(inp.len(), m * c, "l2norm_fwd inp");
    need(norm.len(), m, "l2norm_fwd norm");
    let (mi, ci) = (int(m, "l2norm m"), int(c, "l2norm c"));
    int(m * 32, "l2norm threads");
    let mut l = cu.stream.launch_builder(cu.func("l2norm_fwd_f32"));
    l.arg(out).arg(norm).arg(inp).arg(&mi).arg(&ci);
    // SAFETY: (float* out, float* norm, const float* inp, int m, int c); warp r < m reads
    // inp row r, writes out row r and norm[r]; sizes checked above.
    check(unsafe { l.launch(grid_1d(m * 32, BLOCK)) }, "l2norm_fwd_f32");
}

/// dinp = (dout - out (out . dout)) / norm (overwritten).
pub fn l2norm_bwd(
    cu: &Cuda, dinp: &mut CudaSlice<f32>, dout: &CudaSlice<f32>, out: &CudaSlice<f32>, norm: &CudaSlice<f32>, m: usize,
    c: usize,
) {
    if m == 0 {
        return;
    }
    let _r = cu.range("l2norm_bwd");
    for (len, what) in [(dinp.len(), "dinp"), (dout.len(), "dout"), (out.len(), "out")] {
        need(len, m * c, what);
    }
    need(norm.len(), m, "l2norm_bwd norm");
    let (mi, ci) = (int(m, "l2norm m"), int(c, "l2norm c"));
    int(m * 32, "l2norm threads");
    let mut l = cu.stream.launch_builder(cu.func("l2norm_bwd_f32"));
    l.arg(dinp).arg(dout).arg(out).arg(norm).arg(&mi).arg(&ci);
    // SAFETY: (float* dinp, const float* dout, const float* out, const float* norm, int m,
    // int c); warp r < m reads row r of dout, out and norm[r], writes row r of dinp; sizes
    // checked above.
    check(unsafe { l.launch(grid_1d(m * 32, BLOCK)) }, "l2norm_bwd_f32");
}
