//! Softmax cross-entropy with an ignore index (kernels/softmax_ce.cu). CPU twin:
//! cpu/softmax_ce.rs.
use super::{check, grid_1d, int, need, Cuda, CudaBuf, BLOCK};
use cudarc::driver::{CudaSlice, PushKernelArg};

/// losses[r] = -log softmax(logits[r])[labels[r]], 0 where the label is IGNORE_INDEX.
/// One warp per row. Labels other than IGNORE_INDEX must be in 0..v (as on the CPU).
pub fn softmax_ce_fwd(
    cu: &Cuda, losses: &mut CudaSlice<f32>, logits: &CudaSlice<f32>, labels: &CudaSlice<i32>, n: usize, v: usize,
) {
    if n == 0 {
        return;
    }
    let _r = cu.range("softmax_ce_fwd");
    need(losses.len(), n, "softmax_ce_fwd losses");
    need(logits.len(), n * v, "softmax_ce_fwd logits");
    need(labels.len(), n, "softmax_ce_fwd labels");
    let (ni, vi) = (int(n, "softmax_ce n"), int(v, "softmax_ce v"));
    int(n * 32, "softmax_ce threads");
    let mut l = cu.stream.launch_builder(cu.func("softmax_ce_fwd_f32"));
    l.arg(losses).arg(logits).arg(labels).arg(&ni).arg(&vi);
    // SAFETY: (float* losses, const float* logits, const int* labels, int n, int v); warp
    // r < n reads logits row r and labels[r], writes losses[r]; sizes checked above.
    check(unsafe { l.launch(grid_1d(n * 32, BLOCK)) }, "softmax_ce_fwd_f32");
}

/// dlogits = scale * (softmax(logits) - onehot(label)), zero rows when ignored; dlogits in
/// any storage (rounded into 16 bits).
pub fn softmax_ce_bwd(
    cu: &Cuda, dlogits: &mut CudaBuf, logits: &CudaSlice<f32>, labels: &CudaSlice<i32>, n: usize, v: usize, scale: f32,
) {
    if n == 0 {
        return;
    }
    let _r = cu.range("softmax_ce_bwd");
    need(dlogits.len(), n * v, "softmax_ce_bwd dlogits");
    need(logits.len(), n * v, "softmax_ce_bwd logits");
    need(labels.len(), n, "softmax_ce_bwd labels");
    let (ni, vi) = (int(n, "softmax_ce n"), int(v, "softmax_ce v"));
    int(n * 32, "softmax_ce threads");
    let mut l = cu.stream.launch_builder(cu.func("softmax_ce_bwd_f32"));
    let (pd, td) = (dlogits.addr(&cu.stream), dlogits.code());
    l.arg(&pd)
        .arg(&td)
        .arg(logits)
        .arg(labels)
        .arg(&ni)
        .arg(&vi)
        .arg(&scale);
    // SAFETY: (void* dlogits, int dlogits_t, const float* logits, const int* labels, int n,
    // int v, float scale); warp r < n reads logits row r, writes dlogits row r (of
    // dlogits_t's storage); sizes checked above.
    check(unsafe { l.launch(grid_1d(n * 32, BLOCK)) }, "softmax_ce_bwd_f32");
}
