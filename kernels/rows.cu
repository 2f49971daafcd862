// Row gather and scatter-add: labelled positions of the final hidden states [n, c] into
// the contrastive embeddings Z [m, c] (fp32), and dZ back. CPU twin: src/backend/cpu/rows.rs.
// Indices come from the host batcher and are not checked here.
#include "common.cuh"

// out[r, :] = src[idx[r], :] for r < m, src in its storage type (the final hidden states
// are 16-bit in the bf16 / fp16 modes). One block per output row.
extern "C" __global__ void gather_rows_f32(float* out, const void* src, int src_t, const int* idx, int m, int c) {
    int r = blockIdx.x;
    if (r >= m) return;
    const size_t s = (size_t)idx[r] * c;
    float* o = out + (size_t)r * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) o[j] = ld(src, src_t, s + j);
}

// dst[idx[r], :] += src[r, :] for r < m (accumulates; repeated indices added in row order
// by one owner block, no atomics). One block per source row.
extern "C" __global__ void scatter_add_rows_f32(float* dst, const float* src, const int* idx, int m, int c) {
    scatter_add_owner<float>(dst, src, idx, m, c, blockIdx.x);
}
