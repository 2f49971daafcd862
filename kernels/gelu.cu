// Bias + GELU (erf form, BERT's "gelu"). CPU twin: src/backend/cpu/gelu.rs. The bias
// gradient is a column sum of dinp: col_sum_partials + col_partials_add of kernels/gemm.cu.
#include "common.cuh"

__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

// d gelu / dx = Phi(x) + x phi(x); 1/sqrt(2 pi) formed as the CPU forms it.
__device__ __forceinline__ float gelu_grad(float x) {
    float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
    float pdf = expf(-0.5f * x * x) / sqrtf(2.0f * 3.14159265358979323846f);
    return cdf + x * pdf;
}

// out = round_as(gelu(inp + bias), round), rows of width c. One thread per element.
template <typename T>
__device__ void bias_gelu_fwd(T* out, const T* inp, const float* bias, int n, int c, int round) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * c) return;
    out[i] = from_f32<T>(round_as(gelu(to_f32(inp[i]) + bias[i % c]), round));
}
extern "C" __global__ void bias_gelu_fwd_f32(float* out, const float* inp, const float* bias, int n, int c,
                                             int round) {
    bias_gelu_fwd<float>(out, inp, bias, n, c, round);
}
extern "C" __global__ void bias_gelu_fwd_bf16(bf16* out, const bf16* inp, const float* bias, int n, int c,
                                              int round) {
    bias_gelu_fwd<bf16>(out, inp, bias, n, c, round);
}

// dinp = round_as(dout * gelu'(inp + bias), round) (overwritten). One thread per element.
// The bias gradient is then summed from the stored (rounded) dinp, as the weight gradient
// GEMM reads it.
template <typename T>
__device__ void bias_gelu_bwd_dinp(T* dinp, const T* dout, const T* inp, const float* bias, int n, int c, int round) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * c) return;
    dinp[i] = from_f32<T>(round_as(to_f32(dout[i]) * gelu_grad(to_f32(inp[i]) + bias[i % c]), round));
}
extern "C" __global__ void bias_gelu_bwd_dinp_f32(float* dinp, const float* dout, const float* inp, const float* bias,
                                                  int n, int c, int round) {
    bias_gelu_bwd_dinp<float>(dinp, dout, inp, bias, n, c, round);
}
extern "C" __global__ void bias_gelu_bwd_dinp_bf16(bf16* dinp, const bf16* dout, const bf16* inp, const float* bias,
                                                   int n, int c, int round) {
    bias_gelu_bwd_dinp<bf16>(dinp, dout, inp, bias, n, c, round);
}
