// AdamW (PyTorch semantics), and the two reductions gradient clipping needs.
// CPU twin: src/backend/cpu/adamw.rs.
#include "common.cuh"

// Elements per partial sum of sum_squares: REDUCE_CHUNK of the CPU twin.
#define REDUCE_CHUNK 4096

// Scalars of one step, formed on the host in f64 exactly as the CPU twin forms them.
struct AdamArgs {
    float decay;      // 1 - lr * weight_decay
    float step_size;  // lr / (1 - beta1^step)
    float bc2_sqrt;   // sqrt(1 - beta2^step)
    float w1;         // 1 - beta1
    float w2;         // 1 - beta2
    float beta2;
    float eps;
    float pad_;
};

// One AdamW step on fp32 master weights, moments fp32. When `param_bf16` is not null the
// bf16 copy of the updated weight is written in the same pass (mixed precision).
//   param *= decay; m += w1 (g - m); v = beta2 v + w2 g^2;
//   param -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
extern "C" __global__ void adamw_f32(float* param, const float* grad, float* m, float* v, bf16* param_bf16, int n,
                                     AdamArgs a) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = grad[i];
    float p = param[i] * a.decay;
    float mi = m[i];
    mi += a.w1 * (g - mi);
    float vi = v[i] * a.beta2 + a.w2 * g * g;
    float denom = sqrtf(vi) / a.bc2_sqrt + a.eps;
    p += -a.step_size * (mi / denom);
    m[i] = mi;
    v[i] = vi;
    param[i] = p;
    if (param_bf16) param_bf16[i] = __float2bfloat16_rn(p);
}

// partials[k] = sum of x[i]^2 over chunk k (REDUCE_CHUNK elements), in f64. One block per
// chunk; a fixed tree inside the block, so the result is the same on every run.
extern "C" __global__ void sum_squares_partials_f32(double* partials, const float* x, int n) {
    __shared__ double scratch[32];
    long long base = (long long)blockIdx.x * REDUCE_CHUNK;
    double s = 0.0;
    for (int j = threadIdx.x; j < REDUCE_CHUNK; j += blockDim.x) {
        long long i = base + j;
        if (i < n) s += (double)x[i] * (double)x[i];
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// out[0] = sum of partials[0..k] in order (one thread; k = n / 4096 is small).
extern "C" __global__ void sum_partials_f64(double* out, const double* partials, int k) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = 0.0;
    for (int i = 0; i < k; ++i) s += partials[i];
    out[0] = s;
}

// x[..n] *= alpha (gradient clipping).
extern "C" __global__ void scale_f32(float* x, int n, float alpha) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= alpha;
}
