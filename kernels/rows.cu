// Row gather and scatter-add: labelled positions of the final hidden states [n, c] into
// the contrastive embeddings Z [m, c] (fp32), and dZ back. CPU twin: src/backend/cpu/rows.rs.
// Indices come from the host batcher and are not checked here.
#include "common.cuh"

// out[r, :] = src[idx[r], :] for r < m. One block per output row.
template <typename T>
__device__ void gather_rows(float* out, const T* src, const int* idx, int m, int c) {
    int r = blockIdx.x;
    if (r >= m) return;
    const T* s = src + (size_t)idx[r] * c;
    float* o = out + (size_t)r * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) o[j] = to_f32(s[j]);
}
extern "C" __global__ void gather_rows_f32(float* out, const float* src, const int* idx, int m, int c) {
    gather_rows<float>(out, src, idx, m, c);
}
extern "C" __global__ void gather_rows_bf16(float* out, const bf16* src, const int* idx, int m, int c) {
    gather_rows<bf16>(out, src, idx, m, c);
}

// dst[idx[r], :] += src[r, :] for r < m (accumulates; repeated indices added in row order
// by one owner block, no atomics). One block per source row.
extern "C" __global__ void scatter_add_rows_f32(float* dst, const float* src, const int* idx, int m, int c) {
    scatter_add_owner<float>(dst, src, idx, m, c, blockIdx.x);
}
