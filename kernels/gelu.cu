// Bias + GELU (erf form, BERT's "gelu"). CPU twin: src/backend/cpu/gelu.rs. The backward
// also sums the bias gradient (a column sum of dinp) in the same launch.
#include "common.cuh"

#define REDUCE_ROWS 64  // as kernels/gemm.cu and src/backend/cpu/gemm.rs

__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

// d gelu / dx = Phi(x) + x phi(x); 1/sqrt(2 pi) formed as the CPU forms it.
__device__ __forceinline__ float gelu_grad(float x) {
    float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
    float pdf = expf(-0.5f * x * x) / sqrtf(2.0f * 3.14159265358979323846f);
    return cdf + x * pdf;
}

// out = round_as(gelu(inp + bias), round), rows of width c. One thread per element. out
// and inp in their storage types (common.cuh `ld` / `st`; out is 16-bit in bf16 / fp16).
extern "C" __global__ void bias_gelu_fwd_f32(void* out, int out_t, const void* inp, int inp_t, const float* bias,
                                             int n, int c, int round) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * c) return;
    st(out, out_t, i, round_as(gelu(ld(inp, inp_t, i) + bias[i % c]), round));
}

// dinp = round_as(dout * gelu'(inp + bias), round) (overwritten), and dbias += the column
// sums of dinp as stored (as the weight gradient GEMM reads it): one launch and one pass,
// where an element-wise kernel and a column reduction over the dinp it had just written
// took two of each. Grid (ceil(c / blockDim.x), ceil(n / REDUCE_ROWS)): thread j of block
// (x, k) walks column j over the rows of chunk k in order, writes dinp and sums it into
// partial[k, j]; the last block of each column block adds the partials in chunk order
// (common.cuh last_block_of_column): the element-wise kernel and col_sums_f32 bit for bit.
// counters [gridDim.x]: zero before the launch and after it.
extern "C" __global__ void bias_gelu_bwd_f32(void* dinp, int dinp_t, const void* dout, int dout_t, const void* inp,
                                             int inp_t, const float* bias, int n, int c, int round, float* dbias,
                                             float* partial, unsigned* counters) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    int k = blockIdx.y;
    if (j < c) {
        const float b = bias[j];
        int r0 = k * REDUCE_ROWS, r1 = min(n, r0 + REDUCE_ROWS);
        float acc = 0.0f;
        for (int r = r0; r < r1; ++r) {
            size_t i = (size_t)r * c + j;
            st(dinp, dinp_t, i, round_as(ld(dout, dout_t, i) * gelu_grad(ld(inp, inp_t, i) + b), round));
            acc += ld(dinp, dinp_t, i);  // as stored: what the weight-gradient GEMM reads
        }
        partial[(size_t)k * c + j] = acc;
    }
    if (last_block_of_column(counters + blockIdx.x) && j < c) add_partials(dbias, partial, gridDim.y, c, j);
}
