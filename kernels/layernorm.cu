// LayerNorm with an optional fused residual add (post-LN BERT: x_out = LN(sublayer(x) + x)),
// and the dropout of its input fused in when `drop.p` > 0 (x_out = LN(dropout(sublayer(x)) +
// x)): the dropped input is regenerated from the Philox mask wherever it is read, never
// stored, and the backward pass writes the input's gradient through the same mask next to
// the residual's. Statistics in fp32. CPU twin: src/backend/cpu/layernorm.rs.
#include "common.cuh"

#define REDUCE_ROWS 64  // as kernels/gemm.cu and src/backend/cpu/gemm.rs

// x[i] = dropout(inp)[i] + residual[i], the dropout as kernels/dropout.cu applies it
// (factor * inp; p = 0: inp). inp and residual in their storage types (common.cuh `ld`).
__device__ __forceinline__ float ln_input(const void* inp, int inp_t, const void* residual, int res_t, size_t i,
                                         const DropoutArgs& drop) {
    float v = ld(inp, inp_t, i);
    if (drop.p > 0.0f) v = dropout_factor(drop, i) * v;
    if (residual) v += ld(residual, res_t, i);
    return v;
}

// out = round_as((x - mean) * rstd * weight + bias, round) with x = dropout(inp) + residual
// (residual may be null). mean [n], rstd [n] saved. One block per row; two passes over the
// row (mean, then the centred variance), reading x from global memory (L1/L2) each time.
// out, inp and residual may be 16-bit (in the bf16 / fp16 modes out and residual are).
extern "C" __global__ void layernorm_fwd_f32(void* out, int out_t, float* mean, float* rstd, const void* inp,
                                             int inp_t, const void* residual, int res_t, const float* weight,
                                             const float* bias, int n, int c, float eps, int round, DropoutArgs drop) {
    __shared__ float scratch[32];
    int r = blockIdx.x;
    if (r >= n) return;
    size_t base = (size_t)r * c;
    float s = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) s += ln_input(inp, inp_t, residual, res_t, base + j, drop);
    const float mu = block_sum(s, scratch) / c;
    float q = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float d = ln_input(inp, inp_t, residual, res_t, base + j, drop) - mu;
        q += d * d;
    }
    const float var = block_sum(q, scratch) / c;
    const float rs = 1.0f / sqrtf(var + eps);
    if (threadIdx.x == 0) {
        mean[r] = mu;
        rstd[r] = rs;
    }
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float x = ln_input(inp, inp_t, residual, res_t, base + j, drop);
        st(out, out_t, base + j, round_as((x - mu) * rs * weight[j] + bias[j], round));
    }
}

// dsum (overwritten, fp32) = d loss / d x, x = dropout(inp) + residual:
//   xhat = (x - mean) rstd, dxhat = g w,
//   dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat));
// dinp (when not null) = round_as(factor * dx, round), the gradient of inp through the
// mask, as dropout_bwd_f32 would write it from dsum. One block per row. The parameter
// gradients are one further launch (layernorm_bwd_params_f32).
extern "C" __global__ void layernorm_bwd_dinp_f32(float* dsum, void* dinp, int dinp_t, const float* dout,
                                                  const void* inp, int inp_t, const void* residual, int res_t,
                                                  const float* weight, const float* mean, const float* rstd, int n,
                                                  int c, DropoutArgs drop, int round) {
    __shared__ float scratch[32];
    int r = blockIdx.x;
    if (r >= n) return;
    size_t base = (size_t)r * c;
    const float mu = mean[r], rs = rstd[r];
    float s1 = 0.0f, s2 = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float xh = (ln_input(inp, inp_t, residual, res_t, base + j, drop) - mu) * rs;
        float dxh = dout[base + j] * weight[j];
        s1 += dxh;
        s2 += dxh * xh;
    }
    const float a = block_sum(s1, scratch) / c;
    const float b = block_sum(s2, scratch) / c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float xh = (ln_input(inp, inp_t, residual, res_t, base + j, drop) - mu) * rs;
        float g = dout[base + j];
        const float dx = rs * (g * weight[j] - a - xh * b);
        dsum[base + j] = dx;
        if (dinp) st(dinp, dinp_t, base + j, round_as(dropout_factor(drop, base + j) * dx, round));
    }
}

// Per chunk k of REDUCE_ROWS rows: pw[k, j] = sum_r g[r, j] xhat[r, j], pb[k, j] = sum_r g[r, j],
// rows in order (the CPU's per-chunk partials); with dinp_bias (not null) also pp[k, j] =
// sum_r dinp[r, j] as stored by layernorm_bwd_dinp_f32 (the bias gradient of the linear
// layer whose output inp is, col_sums_f32's sum). Then, by the last block of each column
// block, dweight[j] += pw[0, j] + ..., dbias[j] += pb[0, j] + ... (and dinp_bias[j] += pp
// ...) in chunk order (the last-block pattern of common.cuh's last_block_of_column, as
// kernels/gemm.cu col_sums_f32). Grid: (ceil(c / blockDim.x), nchunks); counters
// [gridDim.x], zero before and after.
extern "C" __global__ void layernorm_bwd_params_f32(float* dweight, float* dbias, float* dinp_bias, const void* dinp,
                                                    int dinp_t, float* pw, float* pb, float* pp, unsigned* counters,
                                                    const float* dout, const void* inp, int inp_t,
                                                    const void* residual, int res_t, const float* mean,
                                                    const float* rstd, int n, int c, DropoutArgs drop) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    int k = blockIdx.y;
    if (j < c) {
        int r0 = k * REDUCE_ROWS, r1 = min(n, r0 + REDUCE_ROWS);
        float dw = 0.0f, db = 0.0f, dp = 0.0f;
        for (int r = r0; r < r1; ++r) {
            size_t i = (size_t)r * c + j;
            float xh = (ln_input(inp, inp_t, residual, res_t, i, drop) - mean[r]) * rstd[r];
            float g = dout[i];
            dw += g * xh;
            db += g;
            if (dinp_bias) dp += ld(dinp, dinp_t, i);
        }
        pw[(size_t)k * c + j] = dw;
        pb[(size_t)k * c + j] = db;
        if (dinp_bias) pp[(size_t)k * c + j] = dp;
    }
    if (last_block_of_column(counters + blockIdx.x) && j < c) {
        add_partials(dweight, pw, gridDim.y, c, j);
        add_partials(dbias, pb, gridDim.y, c, j);
        if (dinp_bias) add_partials(dinp_bias, pp, gridDim.y, c, j);
    }
}
