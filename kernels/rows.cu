// Row gather and scatter-add: labelled positions of the final hidden states [n, c] into
// the contrastive embeddings Z [m, c] (fp32), and dZ back. CPU twin: src/backend/cpu/rows.rs.
// Indices come from the host batcher and are not checked here.
#include "common.cuh"

// out[r, :] = src[idx[r], :] for r < m, each in its storage type: src 16-bit where the
// final hidden states are (the bf16 / fp16 modes), out fp32 (the contrastive embeddings)
// or the same 16-bit type as src (an evaluation's kept rows, `Model::forward_rows`: the
// store rounds a value that is already 16-bit, so it is a copy). One block per output
// row; a thread's loads are issued before its stores (out and src are distinct buffers,
// but the compiler cannot know: a store between loads made each column step a round trip).
#define GATHER_MAX 8
extern "C" __global__ void gather_rows_f32(void* out, int out_t, const void* src, int src_t, const int* idx, int m,
                                           int c) {
    int r = blockIdx.x;
    if (r >= m) return;
    const size_t s = (size_t)idx[r] * c;
    const size_t o = (size_t)r * c;
    for (int j0 = threadIdx.x; j0 < c; j0 += GATHER_MAX * blockDim.x) {
        float v[GATHER_MAX];
#pragma unroll
        for (int u = 0; u < GATHER_MAX; ++u) {
            const int j = j0 + u * blockDim.x;
            v[u] = j < c ? ld(src, src_t, s + j) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < GATHER_MAX; ++u) {
            const int j = j0 + u * blockDim.x;
            if (j < c) st(out, out_t, o + j, v[u]);
        }
    }
}

// count[idx[r]] += 1 for r < m (count zeroed by the launcher): how many source rows each
// destination row takes, for scatter_add_rows_f32. One thread per source row.
extern "C" __global__ void scatter_count_rows_f32(unsigned* count, const int* idx, int m) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < m) atomicAdd(count + idx[r], 1u);
}

// dst[idx[r], :] += src[r, :] for r < m (accumulates; repeated indices added in row order
// by one owner block, no atomics). One block per source row. A destination row that takes
// one source row (count from scatter_count_rows_f32: DeepCUT's rows are distinct tokens)
// is added by that row's block with no search; only repeated ones go through the owner
// scan, whose O(m) index reads per block made the call O(m^2): at m = 24,192 rows (bf 32,
// br 128) about 3e8 index reads for a copy of 74 MB.
extern "C" __global__ void scatter_add_rows_f32(float* dst, const float* src, const int* idx, const unsigned* count,
                                                int m, int c) {
    const int r = blockIdx.x;
    if (r >= m) return;
    const int key = idx[r];
    if (count[key] == 1u) {  // block-uniform
        float* d = dst + (size_t)key * c;
        const float* s = src + (size_t)r * c;
        for (int j = threadIdx.x; j < c; j += blockDim.x) d[j] += s[j];
        return;
    }
    scatter_add_owner<float>(dst, src, idx, m, c, r);
}
