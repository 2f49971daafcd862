//! Row gather and scatter-add (kernels/rows.cu). CPU twin: cpu/rows.rs.
use super::{check, int, need, Cuda, CudaBuf};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

fn rows_cfg(m: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (m as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// out[r, :] = src[idx[r], :] for r < m (src in any storage).
pub fn gather_rows(cu: &Cuda, out: &mut CudaSlice<f32>, src: &CudaBuf, idx: &CudaSlice<i32>, m: usize, c: usize) {
    if m == 0 || c == 0 {
        return;
    }
    let _r = cu.range("gather_rows");
    need(out.len(), m * c, "gather_rows out");
    need(idx.len(), m, "gather_rows idx");
    let (mi, ci) = (int(m, "gather_rows m"), int(c, "gather_rows c"));
    let mut l = cu.stream.launch_builder(cu.func("gather_rows_f32"));
    let (ps, ts) = (src.addr(&cu.stream), src.code());
    l.arg(out).arg(&ps).arg(&ts).arg(idx).arg(&mi).arg(&ci);
    // SAFETY: (float* out, const void* src, int src_t, const int* idx, int m, int c); block
    // r < m copies row idx[r] of src (in range by contract, of src_t's storage) to
    // out[r*c..][..c]; out and idx are checked above.
    check(unsafe { l.launch(rows_cfg(m)) }, "gather_rows_f32");
}

/// dst[idx[r], :] += src[r, :] for r < m (accumulates; repeated indices in row order).
pub fn scatter_add_rows(
    cu: &Cuda, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>, idx: &CudaSlice<i32>, m: usize, c: usize,
) {
    if m == 0 || c == 0 {
        return;
    }
    let _r = cu.range("scatter_add_rows");
    need(src.len(), m * c, "scatter_add_rows src");
    need(idx.len(), m, "scatter_add_rows idx");
    let (mi, ci) = (int(m, "scatter_add_rows m"), int(c, "scatter_add_rows c"));
    let mut l = cu.stream.launch_builder(cu.func("scatter_add_rows_f32"));
    l.arg(dst).arg(src).arg(idx).arg(&mi).arg(&ci);
    // SAFETY: (float* dst, const float* src, const int* idx, int m, int c); the owner
    // block of each destination row reads src rows < m and updates dst row idx[r] (in
    // range by contract); src and idx are checked above.
    check(unsafe { l.launch(rows_cfg(m)) }, "scatter_add_rows_f32");
}
