// Bias + GELU (erf form, BERT's "gelu"). CPU twin: src/backend/cpu/gelu.rs. The backward
// also sums the bias gradient (a column sum of dinp) in the same launch.
#include "common.cuh"

#define REDUCE_ROWS 64  // as kernels/gemm.cu and src/backend/cpu/gemm.rs
#define GELU_ROWS 8     // rows of a column loaded together (bias_gelu_bwd_f32)

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

// bias_gelu_fwd_f32 four elements per thread, for c % 4 == 0 and out, inp and bias aligned
// to four elements (src/backend/cuda/gelu.rs picks it): 8- or 16-byte accesses and 32-bit
// index arithmetic (the element kernel's 64-bit `i % c` costs more than the GELU).
extern "C" __global__ void bias_gelu_fwd_vec4_f32(void* out, int out_t, const void* inp, int inp_t,
                                                  const float* bias, int n, int c, int round) {
    const unsigned g = blockIdx.x * blockDim.x + threadIdx.x, groups = (unsigned)n * (unsigned)c / 4;
    if (g >= groups) return;
    const unsigned j = (g % ((unsigned)c / 4)) * 4;  // the group's first column
    float x[4], b[4], y[4];
    ld4(x, inp, inp_t, 4 * (size_t)g);
    ld4(b, bias, 0, j);
#pragma unroll
    for (int e = 0; e < 4; ++e) y[e] = round_as(gelu(x[e] + b[e]), round);
    st4(out, out_t, 4 * (size_t)g, y);
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
        // GELU_ROWS rows at a time, every load before the first store: dinp may alias dout
        // or inp as far as the compiler knows, so a store between loads made each row wait
        // for the last (0.113 ms on an H200 at 6,144 x 3,072, 41% of copy bandwidth).
        for (int r = r0; r < r1; r += GELU_ROWS) {
            float go[GELU_ROWS], xi[GELU_ROWS];
#pragma unroll
            for (int u = 0; u < GELU_ROWS; ++u) {
                const size_t i = (size_t)(r + u) * c + j;
                go[u] = r + u < r1 ? ld(dout, dout_t, i) : 0.0f;
                xi[u] = r + u < r1 ? ld(inp, inp_t, i) : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < GELU_ROWS; ++u) {
                if (r + u >= r1) break;
                const float v = round_as(go[u] * gelu_grad(xi[u] + b), round);
                st(dinp, dinp_t, (size_t)(r + u) * c + j, v);
                acc += round_as(v, dinp_t);  // as stored: what the weight-gradient GEMM reads
            }
        }
        partial[(size_t)k * c + j] = acc;
    }
    if (last_block_of_column(counters + blockIdx.x) && j < c) add_partials(dbias, partial, gridDim.y, c, j);
}
