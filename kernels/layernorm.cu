// LayerNorm with an optional fused residual add (post-LN BERT: x_out = LN(sublayer(x) + x)),
// and the dropout of its input fused in when `drop.p` > 0 (x_out = LN(dropout(sublayer(x)) +
// x)): the dropped input is regenerated from the Philox mask wherever it is read, never
// stored, and the backward pass writes the input's gradient through the same mask next to
// the residual's. Statistics in fp32. CPU twin: src/backend/cpu/layernorm.rs.
#include "common.cuh"

#define REDUCE_ROWS 64  // as kernels/gemm.cu and src/backend/cpu/gemm.rs

// x[i] = dropout(inp)[i] + residual[i], the dropout as kernels/dropout.cu applies it
// (factor * inp; p = 0: inp).
template <typename T>
__device__ __forceinline__ float ln_input(const T* inp, const T* residual, size_t i, const DropoutArgs& drop) {
    float v = to_f32(inp[i]);
    if (drop.p > 0.0f) v = dropout_factor(drop, i) * v;
    if (residual) v += to_f32(residual[i]);
    return v;
}

// out = round_as((x - mean) * rstd * weight + bias, round) with x = inp + residual
// (residual may be null). mean [n], rstd [n] saved. One block per row; two passes over the row (mean, then the
// centred variance), reading x from global memory (L1/L2) each time.
template <typename T>
__device__ void layernorm_fwd(T* out, float* mean, float* rstd, const T* inp, const T* residual, const float* weight,
                              const float* bias, int n, int c, float eps, int round, DropoutArgs drop) {
    __shared__ float scratch[32];
    int r = blockIdx.x;
    if (r >= n) return;
    size_t base = (size_t)r * c;
    float s = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) s += ln_input(inp, residual, base + j, drop);
    const float mu = block_sum(s, scratch) / c;
    float q = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float d = ln_input(inp, residual, base + j, drop) - mu;
        q += d * d;
    }
    const float var = block_sum(q, scratch) / c;
    const float rs = 1.0f / sqrtf(var + eps);
    if (threadIdx.x == 0) {
        mean[r] = mu;
        rstd[r] = rs;
    }
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float x = ln_input(inp, residual, base + j, drop);
        out[base + j] = from_f32<T>(round_as((x - mu) * rs * weight[j] + bias[j], round));
    }
}
extern "C" __global__ void layernorm_fwd_f32(float* out, float* mean, float* rstd, const float* inp,
                                             const float* residual, const float* weight, const float* bias, int n,
                                             int c, float eps, int round, DropoutArgs drop) {
    layernorm_fwd<float>(out, mean, rstd, inp, residual, weight, bias, n, c, eps, round, drop);
}
extern "C" __global__ void layernorm_fwd_bf16(bf16* out, float* mean, float* rstd, const bf16* inp,
                                              const bf16* residual, const float* weight, const float* bias, int n,
                                              int c, float eps, int round, DropoutArgs drop) {
    layernorm_fwd<bf16>(out, mean, rstd, inp, residual, weight, bias, n, c, eps, round, drop);
}

// dsum (overwritten) = d loss / d x, x = dropout(inp) + residual:
//   xhat = (x - mean) rstd, dxhat = g w,
//   dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat));
// dinp (when not null) = round_as(factor * dx, round), the gradient of inp through the
// mask, as dropout_bwd_f32 would write it from dsum. One block per row. The parameter
// gradients are two further launches (layernorm_bwd_param_partials, then
// col_partials_add_f32 of kernels/gemm.cu twice).
template <typename T>
__device__ void layernorm_bwd_dinp(T* dsum, T* dinp, const T* dout, const T* inp, const T* residual,
                                   const float* weight, const float* mean, const float* rstd, int n, int c,
                                   DropoutArgs drop, int round) {
    __shared__ float scratch[32];
    int r = blockIdx.x;
    if (r >= n) return;
    size_t base = (size_t)r * c;
    const float mu = mean[r], rs = rstd[r];
    float s1 = 0.0f, s2 = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float xh = (ln_input(inp, residual, base + j, drop) - mu) * rs;
        float dxh = to_f32(dout[base + j]) * weight[j];
        s1 += dxh;
        s2 += dxh * xh;
    }
    const float a = block_sum(s1, scratch) / c;
    const float b = block_sum(s2, scratch) / c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float xh = (ln_input(inp, residual, base + j, drop) - mu) * rs;
        float g = to_f32(dout[base + j]);
        const float dx = rs * (g * weight[j] - a - xh * b);
        dsum[base + j] = from_f32<T>(dx);
        if (dinp) dinp[base + j] = from_f32<T>(round_as(dropout_factor(drop, base + j) * dx, round));
    }
}
extern "C" __global__ void layernorm_bwd_dinp_f32(float* dsum, float* dinp, const float* dout, const float* inp,
                                                  const float* residual, const float* weight, const float* mean,
                                                  const float* rstd, int n, int c, DropoutArgs drop, int round) {
    layernorm_bwd_dinp<float>(dsum, dinp, dout, inp, residual, weight, mean, rstd, n, c, drop, round);
}
extern "C" __global__ void layernorm_bwd_dinp_bf16(bf16* dsum, bf16* dinp, const bf16* dout, const bf16* inp,
                                                   const bf16* residual, const float* weight, const float* mean,
                                                   const float* rstd, int n, int c, DropoutArgs drop, int round) {
    layernorm_bwd_dinp<bf16>(dsum, dinp, dout, inp, residual, weight, mean, rstd, n, c, drop, round);
}

// Per chunk k of REDUCE_ROWS rows: pw[k, j] = sum_r g[r, j] xhat[r, j], pb[k, j] = sum_r g[r, j],
// rows in order (the CPU's per-chunk partials). Grid: (ceil(c / blockDim.x), nchunks).
template <typename T>
__device__ void layernorm_bwd_param_partials(float* pw, float* pb, const T* dout, const T* inp, const T* residual,
                                             const float* mean, const float* rstd, int n, int c, DropoutArgs drop) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    int k = blockIdx.y;
    if (j >= c) return;
    int r0 = k * REDUCE_ROWS, r1 = min(n, r0 + REDUCE_ROWS);
    float dw = 0.0f, db = 0.0f;
    for (int r = r0; r < r1; ++r) {
        size_t i = (size_t)r * c + j;
        float xh = (ln_input(inp, residual, i, drop) - mean[r]) * rstd[r];
        float g = to_f32(dout[i]);
        dw += g * xh;
        db += g;
    }
    pw[(size_t)k * c + j] = dw;
    pb[(size_t)k * c + j] = db;
}
extern "C" __global__ void layernorm_bwd_param_partials_f32(float* pw, float* pb, const float* dout, const float* inp,
                                                            const float* residual, const float* mean,
                                                            const float* rstd, int n, int c, DropoutArgs drop) {
    layernorm_bwd_param_partials<float>(pw, pb, dout, inp, residual, mean, rstd, n, c, drop);
}
extern "C" __global__ void layernorm_bwd_param_partials_bf16(float* pw, float* pb, const bf16* dout, const bf16* inp,
                                                             const bf16* residual, const float* mean,
                                                             const float* rstd, int n, int c, DropoutArgs drop) {
    layernorm_bwd_param_partials<bf16>(pw, pb, dout, inp, residual, mean, rstd, n, c, drop);
}
