// Bias + GELU (erf form, BERT's "gelu"). CPU twin: src/backend/cpu/gelu.rs. The bias
// gradient is a column sum of dinp: col_sums_f32 of kernels/gemm.cu.
#include "common.cuh"

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

// dinp = round_as(dout * gelu'(inp + bias), round) (overwritten). One thread per element.
// The bias gradient is then summed from the stored (rounded) dinp, as the weight gradient
// GEMM reads it.
extern "C" __global__ void bias_gelu_bwd_dinp_f32(void* dinp, int dinp_t, const void* dout, int dout_t,
                                                  const void* inp, int inp_t, const float* bias, int n, int c,
                                                  int round) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * c) return;
    st(dinp, dinp_t, i, round_as(ld(dout, dout_t, i) * gelu_grad(ld(inp, inp_t, i) + bias[i % c]), round));
}
