//! Fused multi-head self-attention (kernels/attention.cu). CPU twin: cpu/attention.rs.
use super::{check, ensure, int, need, Cuda, DropoutArgs};
use crate::backend::Dropout;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// ATT_TILE, ATT_WARPS and ATT_DMAX of kernels/attention.cu.
const TILE: usize = 32;
const WARPS: usize = 8;
pub const MAX_HEAD_DIM: usize = 128;

fn cfg(b: usize, t: usize, h: usize, smem_floats: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (t.div_ceil(WARPS) as u32, h as u32, b as u32),
        block_dim: ((WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: (smem_floats * 4) as u32,
    }
}

#[allow(clippy::too_many_arguments)]
fn check_sizes(what: &str, bufs: &[usize], mask: usize, b: usize, t: usize, h: usize, d: usize) {
    assert!(
        d <= MAX_HEAD_DIM,
        "{what}: head dim {d} > {MAX_HEAD_DIM} is not supported by kernels/attention.cu"
    );
    let n = b * t * h * d;
    int(n, "attention b*t*h*d");
    int(b * h * t * t, "attention dropout counter b*h*t*t");
    for &len in bufs {
        need(len, n, what);
    }
    need(mask, b * t, what);
}

/// out = softmax(q k^T / sqrt(d) + key mask) v with dropout on the probabilities; lse
/// [b, h, t] saved. q, k, v, out [b, t, h*d]; mask [b, t].
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd(
    cu: &Cuda, out: &mut CudaSlice<f32>, lse: &mut CudaSlice<f32>, q: &CudaSlice<f32>, k: &CudaSlice<f32>,
    v: &CudaSlice<f32>, mask: &CudaSlice<f32>, b: usize, t: usize, h: usize, d: usize, dropout: Dropout,
) {
    if b * t * h == 0 {
        return;
    }
    let _r = cu.range("attention_fwd");
    check_sizes(
        "attention_fwd",
        &[out.len(), q.len(), k.len(), v.len()],
        mask.len(),
        b,
        t,
        h,
        d,
    );
    need(lse.len(), b * h * t, "attention_fwd lse");
    let (bi, ti, hi, di) = (int(b, "b"), int(t, "t"), int(h, "h"), int(d, "d"));
    let args = DropoutArgs::from(dropout);
    let smem = 2 * TILE * (d + 1) + WARPS * d + TILE;
    let mut l = cu.stream.launch_builder(cu.func("attention_fwd_f32"));
    l.arg(out).arg(lse).arg(q).arg(k).arg(v).arg(mask);
    l.arg(&bi).arg(&ti).arg(&hi).arg(&di).arg(&args);
    // SAFETY: (float* out, float* lse, const float* q, const float* k, const float* v, const
    // float* mask, int b, int t, int h, int d, DropoutArgs drop); block (query tile, head,
    // sequence) reads rows < t of its head of q, k, v and mask[bi*t..][..t], writes its
    // query rows of out and lse; sizes checked above; dynamic shared memory as the kernel's
    // comment specifies (< 48 KiB for d <= 128).
    check(unsafe { l.launch(cfg(b, t, h, smem)) }, "attention_fwd_f32");
}

/// dq, dk, dv (overwritten) from dout, recomputing the probabilities from lse; two
/// kernels (dq and D = rowsum(dO * O); then dk, dv), no atomics.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    cu: &Cuda, dq: &mut CudaSlice<f32>, dk: &mut CudaSlice<f32>, dv: &mut CudaSlice<f32>, dout: &CudaSlice<f32>,
    q: &CudaSlice<f32>, k: &CudaSlice<f32>, v: &CudaSlice<f32>, out: &CudaSlice<f32>, lse: &CudaSlice<f32>,
    mask: &CudaSlice<f32>, b: usize, t: usize, h: usize, d: usize, dropout: Dropout,
) {
    if b * t * h == 0 {
        return;
    }
    let _r = cu.range("attention_bwd");
    check_sizes(
        "attention_bwd",
        &[
            dq.len(),
            dk.len(),
            dv.len(),
            dout.len(),
            q.len(),
            k.len(),
            v.len(),
            out.len(),
        ],
        mask.len(),
        b,
        t,
        h,
        d,
    );
    need(lse.len(), b * h * t, "attention_bwd lse");
    let (bi, ti, hi, di) = (int(b, "b"), int(t, "t"), int(h, "h"), int(d, "d"));
    let args = DropoutArgs::from(dropout);
    let mut guard = cu.scratch.lock().unwrap();
    let dvec = ensure(&cu.stream, &mut guard.f32_b, b * h * t);

    let smem = 2 * TILE * (d + 1) + 2 * WARPS * d + TILE;
    let mut l = cu.stream.launch_builder(cu.func("attention_bwd_dq_f32"));
    l.arg(dq)
        .arg(&mut *dvec)
        .arg(dout)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(out)
        .arg(lse)
        .arg(mask);
    l.arg(&bi).arg(&ti).arg(&hi).arg(&di).arg(&args);
    // SAFETY: (float* dq, float* dvec, const float* dout, const float* q, const float* k,
    // const float* v, const float* out, const float* lse, const float* mask, int b, int t,
    // int h, int d, DropoutArgs drop); each block writes its query rows of dq and dvec
    // [b*h*t] (ensure), reads rows < t of its head; sizes checked above.
    check(unsafe { l.launch(cfg(b, t, h, smem)) }, "attention_bwd_dq_f32");

    let smem = 2 * TILE * (d + 1) + 2 * WARPS * d + 2 * TILE;
    let mut l = cu.stream.launch_builder(cu.func("attention_bwd_dkdv_f32"));
    l.arg(dk)
        .arg(dv)
        .arg(dout)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(lse)
        .arg(&*dvec)
        .arg(mask);
    l.arg(&bi).arg(&ti).arg(&hi).arg(&di).arg(&args);
    // SAFETY: (float* dk, float* dv, const float* dout, const float* q, const float* k,
    // const float* v, const float* lse, const float* dvec, const float* mask, int b, int t,
    // int h, int d, DropoutArgs drop); each block writes its key rows of dk and dv, reads
    // rows < t of its head and dvec written by the launch before on the same stream.
    check(unsafe { l.launch(cfg(b, t, h, smem)) }, "attention_bwd_dkdv_f32");
}
