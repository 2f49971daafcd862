//! Row gather and scatter-add (kernels/rows.cu). CPU twin: cpu/rows.rs.
use super::{check, ensure, grid_1d, int, need, Cuda, CudaBuf};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

fn rows_cfg(m: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (m as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// out[r, :] = src[idx[r], :] for r < m: src in any storage, out fp32 or src's own 16-bit
/// storage (a copy of rows that `Model::forward_rows` keeps; never a rounding).
pub fn gather_rows(cu: &Cuda, out: &mut CudaBuf, src: &CudaBuf, idx: &CudaSlice<i32>, m: usize, c: usize) {
    if m == 0 || c == 0 {
        return;
    }
    let _r = cu.range("gather_rows");
    need(out.len(), m * c, "gather_rows out");
    need(idx.len(), m, "gather_rows idx");
    assert!(
        out.code() == 0 || out.code() == src.code(),
        "gather_rows: a {} out takes rows of that storage only, not {}",
        out.precision(),
        src.precision()
    );
    let (mi, ci) = (int(m, "gather_rows m"), int(c, "gather_rows c"));
    let mut l = cu.stream.launch_builder(cu.func("gather_rows_f32"));
    let (po, to) = (out.addr(&cu.stream), out.code());
    let (ps, ts) = (src.addr(&cu.stream), src.code());
    l.arg(&po).arg(&to).arg(&ps).arg(&ts).arg(idx).arg(&mi).arg(&ci);
    // SAFETY: (void* out, int out_t, const void* src, int src_t, const int* idx, int m,
    // int c); block r < m copies row idx[r] of src (in range by contract, of src_t's
    // storage) to out[r*c..][..c] in out_t's storage; out and idx are checked above.
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
    // rows of dst: the counts cover every index in range (0 <= idx < dst rows, by contract)
    let rows = dst.len() / c;
    let mut guard = cu.scratch.lock().unwrap();
    let count = ensure(cu, &mut guard.u32_rows, rows);
    check(
        cu.stream.memset_zeros(&mut count.slice_mut(..rows)),
        "scatter_add_rows zero counts",
    );
    let mut l = cu.stream.launch_builder(cu.func("scatter_count_rows_f32"));
    l.arg(&mut *count).arg(idx).arg(&mi);
    // SAFETY: (unsigned* count, const int* idx, int m); thread r < m reads idx[r] (checked
    // above) and increments count[idx[r]], in range by contract (count holds dst's rows).
    check(unsafe { l.launch(grid_1d(m, 256)) }, "scatter_count_rows_f32");
    let mut l = cu.stream.launch_builder(cu.func("scatter_add_rows_f32"));
    l.arg(dst).arg(src).arg(idx).arg(&*count).arg(&mi).arg(&ci);
    // SAFETY: (float* dst, const float* src, const int* idx, const unsigned* count, int m,
    // int c); block r reads src row r < m and count[idx[r]]; the one block that adds to a
    // destination row (the only source of a once-taken row, else the owner of the first
    // occurrence) updates dst row idx[r] (in range by contract); src and idx are checked
    // above, count was just written for these indices.
    check(unsafe { l.launch(rows_cfg(m)) }, "scatter_add_rows_f32");
}
