//! Embeddings: word + position + token type (kernels/embedding.cu). CPU twin:
//! cpu/embedding.rs.
use super::{check, int, need, Cuda};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// out[r] = wte[ids[r]] + wpe[pos[r]] + wtt[types[r]]. Indices are not checked on the
/// device (they come from the tokenizer and the batcher, as on the CPU).
#[allow(clippy::too_many_arguments)]
pub fn embedding_fwd(
    cu: &Cuda, out: &mut CudaSlice<f32>, ids: &CudaSlice<i32>, pos: &CudaSlice<i32>, types: &CudaSlice<i32>,
    wte: &CudaSlice<f32>, wpe: &CudaSlice<f32>, wtt: &CudaSlice<f32>, n: usize, c: usize,
) {
    if n == 0 || c == 0 {
        return;
    }
    let _r = cu.range("embedding_fwd");
    need(out.len(), n * c, "embedding_fwd out");
    for (buf, what) in [(ids, "ids"), (pos, "pos"), (types, "types")] {
        need(buf.len(), n, what);
    }
    let (ni, ci) = (int(n, "embedding n"), int(c, "embedding c"));
    int(n * c, "embedding n*c");
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = cu.stream.launch_builder(cu.func("embedding_fwd_f32"));
    l.arg(out)
        .arg(ids)
        .arg(pos)
        .arg(types)
        .arg(wte)
        .arg(wpe)
        .arg(wtt)
        .arg(&ni)
        .arg(&ci);
    // SAFETY: (float* out, const int* ids, const int* pos, const int* types, const float* wte,
    // const float* wpe, const float* wtt, int n, int c); block r < n writes out[r*c..][..c]
    // and reads table rows named by ids/pos/types[r], which must be in range (the trait's
    // contract, as on the CPU); out and the index buffers are checked above.
    check(unsafe { l.launch(cfg) }, "embedding_fwd_f32");
}

/// Scatter-add of dout into the three tables (accumulates), deterministic: each table row
/// receives its tokens' gradients in token order from the block that starts its run in
/// `order` ([3n], `backend::embedding_order`), no atomics.
#[allow(clippy::too_many_arguments)]
pub fn embedding_bwd(
    cu: &Cuda, dwte: &mut CudaSlice<f32>, dwpe: &mut CudaSlice<f32>, dwtt: &mut CudaSlice<f32>, dout: &CudaSlice<f32>,
    ids: &CudaSlice<i32>, pos: &CudaSlice<i32>, types: &CudaSlice<i32>, order: &CudaSlice<i32>, n: usize, c: usize,
) {
    if n == 0 || c == 0 {
        return;
    }
    let _r = cu.range("embedding_bwd");
    need(dout.len(), n * c, "embedding_bwd dout");
    for (buf, what) in [(ids, "ids"), (pos, "pos"), (types, "types")] {
        need(buf.len(), n, what);
    }
    need(order.len(), 3 * n, "embedding_bwd order");
    let (ni, ci) = (int(n, "embedding n"), int(c, "embedding c"));
    int(n * c, "embedding n*c");
    int(3 * n, "embedding 3n");
    // a block per 128 columns of a run: a run's columns are independent sums
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 3, c.div_ceil(128) as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = cu.stream.launch_builder(cu.func("embedding_bwd_f32"));
    l.arg(dwte)
        .arg(dwpe)
        .arg(dwtt)
        .arg(dout)
        .arg(ids)
        .arg(pos)
        .arg(types)
        .arg(order)
        .arg(&ni)
        .arg(&ci);
    // SAFETY: (float* dwte, float* dwpe, float* dwtt, const float* dout, const int* ids,
    // const int* pos, const int* types, const int* order, int n, int c); block (k, table, z)
    // reads order[table*n..][..n] (a permutation of 0..n by contract) and columns
    // [128 z, 128 z + 128) below c of the dout rows it names, and updates those columns of
    // the table rows named by its index buffer (in range by contract);
    // dout, the index buffers and order are checked above.
    check(unsafe { l.launch(cfg) }, "embedding_bwd_f32");
}
