// Embeddings: word + position + token type. CPU twin: src/backend/cpu/embedding.rs.
#include "common.cuh"

// out[r, :] = wte[ids[r]] + wpe[pos[r]] + wtt[types[r]] (tables fp32). One block per row.
// __restrict__ (out is never a table: the Rust side borrows it mutably): without it every
// store might change the tables, so each column step's loads waited for the previous store.
template <typename T>
__device__ void embedding_fwd(T* __restrict__ out, const int* ids, const int* pos, const int* types,
                              const float* __restrict__ wte, const float* __restrict__ wpe,
                              const float* __restrict__ wtt, int n, int c) {
    int r = blockIdx.x;
    if (r >= n) return;
    const float* __restrict__ a = wte + (size_t)ids[r] * c;
    const float* __restrict__ b = wpe + (size_t)pos[r] * c;
    const float* __restrict__ d = wtt + (size_t)types[r] * c;
    T* __restrict__ o = out + (size_t)r * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) o[j] = from_f32<T>(a[j] + b[j] + d[j]);
}
extern "C" __global__ void embedding_fwd_f32(float* out, const int* ids, const int* pos, const int* types,
                                             const float* wte, const float* wpe, const float* wtt, int n, int c) {
    embedding_fwd<float>(out, ids, pos, types, wte, wpe, wtt, n, c);
}

// Scatter-add of dout [n, c] into the three tables (accumulates), deterministically: for
// every table row, the tokens that use it are added in token order, as on the CPU, by the
// block that starts the row's run in `order` ([3n], the tokens sorted by (index, token) per
// table, built on the host: scatter_add_sorted in common.cuh). No float atomics: atomicAdd
// would make the sum's order, and so its last bits, vary run to run.
// Grid: (n, 3, ceil(c / blockDim.x)); blockIdx.y picks the table (0 word, 1 position, 2
// type), blockIdx.z the block of columns.
template <typename T>
__device__ void embedding_bwd(float* dwte, float* dwpe, float* dwtt, const T* dout, const int* ids, const int* pos,
                              const int* types, const int* order, int n, int c) {
    float* dst = blockIdx.y == 0 ? dwte : blockIdx.y == 1 ? dwpe : dwtt;
    const int* idx = blockIdx.y == 0 ? ids : blockIdx.y == 1 ? pos : types;
    scatter_add_sorted<T>(dst, dout, idx, order + (size_t)blockIdx.y * n, n, c, blockIdx.x);
}
extern "C" __global__ void embedding_bwd_f32(float* dwte, float* dwpe, float* dwtt, const float* dout, const int* ids,
                                             const int* pos, const int* types, const int* order, int n, int c) {
    embedding_bwd<float>(dwte, dwpe, dwtt, dout, ids, pos, types, order, n, c);
}
