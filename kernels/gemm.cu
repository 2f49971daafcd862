// The GEMM family's own kernels (the products themselves go through cuBLAS): bias add,
// bias gradients (column sums) and in-place add. CPU twin: src/backend/cpu/gemm.rs and
// the add_inplace of src/backend/cpu/mod.rs.
#include "common.cuh"

// Rows per partial sum in column reductions: REDUCE_ROWS of src/backend/cpu/gemm.rs. Each
// partial is summed row by row and the partials are added in order, exactly as the CPU
// does, so the result does not depend on the launch shape.
#define REDUCE_ROWS 64

// out[r, :] += bias, rows of width cols, out in its storage type (common.cuh `ld` / `st`).
// One thread per element.
extern "C" __global__ void add_bias_f32(void* out, int out_t, const float* bias, int rows, int cols) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * cols) return;
    st(out, out_t, i, ld(out, out_t, i) + bias[i % cols]);
}

// Up to COL_SUMS_MAX column reductions of the same shape in one launch (a layer's q, k and
// v bias gradients), passed by value; blockIdx.z picks the tensor.
#define COL_SUMS_MAX 4
struct ColSums {
    float* dst[COL_SUMS_MAX];
    const void* src[COL_SUMS_MAX];
};

// For tensor z = blockIdx.z: partial_z[k, j] = sum of src_z[r, j] over rows r of chunk k
// (REDUCE_ROWS rows, in order), src in its storage type, then dst_z[j] += the partials in
// chunk order, by the last block of each column block (common.cuh last_block_of_column).
// Grid: (ceil(cols / blockDim.x), ceil(rows / REDUCE_ROWS), tensors); one thread per
// column. partial: tensors x chunks x cols; counters: tensors x gridDim.x.
extern "C" __global__ void col_sums_f32(ColSums t, int src_t, float* partial, unsigned* counters, int rows,
                                        int cols) {
    const int z = blockIdx.z;
    const void* src = t.src[z];
    float* part = partial + (size_t)z * gridDim.y * cols;
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    int k = blockIdx.y;
    if (j < cols) {
        int r0 = k * REDUCE_ROWS, r1 = min(rows, r0 + REDUCE_ROWS);
        float acc = 0.0f;
        int r = r0;
        for (; r + 8 <= r1; r += 8) {  // eight loads in flight, added in row order
            float v[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) v[u] = ld(src, src_t, (size_t)(r + u) * cols + j);
#pragma unroll
            for (int u = 0; u < 8; ++u) acc += v[u];
        }
        for (; r < r1; ++r) acc += ld(src, src_t, (size_t)r * cols + j);
        part[(size_t)k * cols + j] = acc;
    }
    if (last_block_of_column(counters + (size_t)z * gridDim.x + blockIdx.x) && j < cols)
        add_partials(t.dst[z], part, gridDim.y, cols, j);
}

// dst[..n] += src[..n]
extern "C" __global__ void add_inplace_f32(float* dst, const float* src, int n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] += src[i];
}
