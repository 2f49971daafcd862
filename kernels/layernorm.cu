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

// ---- rows read four elements at a time (the engine's widths: c % 4 == 0, c <= LN_MAX_C) ----
// The _vec4 kernels below are the element kernels' twins (same parameters, same arithmetic
// per element, the block sums in another order) for rows whose width is a multiple of 4,
// at most LN_MAX_C, with buffers aligned to four elements (src/backend/cuda/layernorm.rs
// picks them). Each thread keeps its LN_V groups of four in registers, so a row is read
// once and the dropout mask drawn once, one Philox call per four elements (the element
// kernels call Philox for every element at every read: three calls per element forward,
// on an H200 0.077 ms against 0.032 ms without dropout at 6,144 x 768).
#define LN_V 4
#define LN_THREADS 128  // src/backend/cuda/layernorm.rs LN_BLOCK
#define LN_MAX_C (4 * LN_V * LN_THREADS)

// x = dropout(inp) + residual at elements i .. i + 3 (i a multiple of 4: one Philox group),
// as ln_input forms each; f = the dropout factors (1 without dropout).
__device__ __forceinline__ void ln_input4(float (&x)[4], float (&f)[4], const void* inp, int inp_t,
                                          const void* residual, int res_t, size_t i, const DropoutArgs& drop) {
    ld4(x, inp, inp_t, i);
    if (drop.p > 0.0f) {
        const uint4 w = dropout_words(drop, i >> 2);
        f[0] = factor_of_word(drop, w.x);
        f[1] = factor_of_word(drop, w.y);
        f[2] = factor_of_word(drop, w.z);
        f[3] = factor_of_word(drop, w.w);
#pragma unroll
        for (int e = 0; e < 4; ++e) x[e] = f[e] * x[e];
    } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) f[e] = 1.0f;
    }
    if (residual) {
        float r[4];
        ld4(r, residual, res_t, i);
#pragma unroll
        for (int e = 0; e < 4; ++e) x[e] += r[e];
    }
}

extern "C" __global__ void layernorm_fwd_vec4_f32(void* out, int out_t, float* mean, float* rstd, const void* inp,
                                                  int inp_t, const void* residual, int res_t, const float* weight,
                                                  const float* bias, int n, int c, float eps, int round,
                                                  DropoutArgs drop) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= n) return;
    const size_t base = (size_t)r * c;
    const int groups = c / 4;
    // the parameters are read with the row, before any store (loaded beside the stores,
    // each group's weight and bias waited for the previous group's store)
    float x[LN_V][4], f[4], w[LN_V][4], b[LN_V][4];
    float s = 0.0f;
#pragma unroll
    for (int u = 0; u < LN_V; ++u) {
        const int g = threadIdx.x + u * blockDim.x;
        if (g < groups) {
            ln_input4(x[u], f, inp, inp_t, residual, res_t, base + 4 * (size_t)g, drop);
            ld4(w[u], weight, 0, 4 * (size_t)g);
            ld4(b[u], bias, 0, 4 * (size_t)g);
#pragma unroll
            for (int e = 0; e < 4; ++e) s += x[u][e];
        }
    }
    const float mu = block_sum(s, scratch) / c;
    float q = 0.0f;
#pragma unroll
    for (int u = 0; u < LN_V; ++u)
        if (threadIdx.x + u * blockDim.x < groups)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float d = x[u][e] - mu;
                q += d * d;
            }
    const float var = block_sum(q, scratch) / c;
    const float rs = 1.0f / sqrtf(var + eps);
    if (threadIdx.x == 0) {
        mean[r] = mu;
        rstd[r] = rs;
    }
#pragma unroll
    for (int u = 0; u < LN_V; ++u) {
        const int g = threadIdx.x + u * blockDim.x;
        if (g < groups) {
            float y[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) y[e] = round_as((x[u][e] - mu) * rs * w[u][e] + b[u][e], round);
            st4(out, out_t, base + 4 * (size_t)g, y);
        }
    }
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

// layernorm_bwd_dinp_f32 for the rows the _vec4 kernels take (above).
extern "C" __global__ void layernorm_bwd_dinp_vec4_f32(float* dsum, void* dinp, int dinp_t, const float* dout,
                                                       const void* inp, int inp_t, const void* residual, int res_t,
                                                       const float* weight, const float* mean, const float* rstd,
                                                       int n, int c, DropoutArgs drop, int round) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= n) return;
    const size_t base = (size_t)r * c;
    const int groups = c / 4;
    const float mu = mean[r], rs = rstd[r];
    // w kept from the first pass: reloading it after the second pass's stores waited for them
    float xh[LN_V][4], g[LN_V][4], f[LN_V][4], w[LN_V][4];
    float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
    for (int u = 0; u < LN_V; ++u) {
        const int k = threadIdx.x + u * blockDim.x;
        if (k < groups) {
            const size_t i = base + 4 * (size_t)k;
            ln_input4(xh[u], f[u], inp, inp_t, residual, res_t, i, drop);
            ld4(g[u], dout, 0, i);
            ld4(w[u], weight, 0, 4 * (size_t)k);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                xh[u][e] = (xh[u][e] - mu) * rs;
                const float dxh = g[u][e] * w[u][e];
                s1 += dxh;
                s2 += dxh * xh[u][e];
            }
        }
    }
    const float a = block_sum(s1, scratch) / c;
    const float b = block_sum(s2, scratch) / c;
#pragma unroll
    for (int u = 0; u < LN_V; ++u) {
        const int k = threadIdx.x + u * blockDim.x;
        if (k < groups) {
            const size_t i = base + 4 * (size_t)k;
            float dx[4], di[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                dx[e] = rs * (g[u][e] * w[u][e] - a - xh[u][e] * b);
                di[e] = round_as(f[u][e] * dx[e], round);
            }
            st4(dsum, 0, i, dx);
            if (dinp) st4(dinp, dinp_t, i, di);
        }
    }
}

// f[u] = v for a u known only at run time, by selects: indexing a register array with it
// would put the array in local memory.
__device__ __forceinline__ void set_at(float (&f)[4], int u, float v) {
#pragma unroll
    for (int e = 0; e < 4; ++e) f[e] = e == u ? v : f[e];
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
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int k = blockIdx.y;
    const bool mine = j < c;  // every lane runs the row loop: the mask's shuffles need all 32
    // With c % 4 == 0 the four lanes of columns 4m .. 4m + 3 (blockDim.x is a multiple of 4)
    // share one Philox group per row: lane q draws row r + q's words and the four trade
    // them, one call per lane per four rows instead of one per element.
    const bool quad = drop.p > 0.0f && c % 4 == 0;  // uniform over the launch
    const int q = threadIdx.x & 3;
    const int r0 = k * REDUCE_ROWS, r1 = min(n, r0 + REDUCE_ROWS);
    float dw = 0.0f, db = 0.0f, dp = 0.0f;
    for (int r = r0; r < r1; r += 4) {
        float f[4] = {1.0f, 1.0f, 1.0f, 1.0f};
        if (quad) {
            const uint4 w = dropout_words(drop, ((size_t)(r + q) * c + (size_t)(j & ~3)) >> 2);
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                // from lane (q + t) & 3, which drew row r + ((q + t) & 3): its word for column q
                const unsigned got =
                    __shfl_sync(FULL_MASK, word_at(w, (q - t) & 3), (threadIdx.x & 28) | ((q + t) & 3));
                set_at(f, (q + t) & 3, factor_of_word(drop, got));
            }
        } else if (drop.p > 0.0f && mine) {
#pragma unroll 1
            for (int u = 0; u < 4; ++u) set_at(f, u, dropout_factor(drop, (size_t)(r + u) * c + j));
        }
        if (!mine) continue;
        // The four rows' loads first (predicated), then their adds in row order: with a
        // `break` between rows the compiler issued each row's loads only after the previous
        // row's adds, a global round trip per row (64 a chunk; SASS, 2026-11-30).
        float v4[4], g4[4], m4[4], s4[4], p4[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int rr = r + u;
            if (rr < r1) {
                const size_t i = (size_t)rr * c + j;
                v4[u] = ld(inp, inp_t, i);
                if (residual) p4[u] = ld(residual, res_t, i);
                g4[u] = dout[i];
                m4[u] = mean[rr];
                s4[u] = rstd[rr];
            }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            if (r + u >= r1) break;
            float v = v4[u];
            if (drop.p > 0.0f) v = f[u] * v;
            if (residual) v += p4[u];
            const float xh = (v - m4[u]) * s4[u];
            dw += g4[u] * xh;
            db += g4[u];
        }
        if (dinp_bias) {  // the linear layer's bias gradient, rows in order
            float d4[4];
#pragma unroll
            for (int u = 0; u < 4; ++u)
                if (r + u < r1) d4[u] = ld(dinp, dinp_t, (size_t)(r + u) * c + j);
#pragma unroll
            for (int u = 0; u < 4; ++u)
                if (r + u < r1) dp += d4[u];
        }
    }
    if (mine) {
        pw[(size_t)k * c + j] = dw;
        pb[(size_t)k * c + j] = db;
        if (dinp_bias) pp[(size_t)k * c + j] = dp;
    }
    if (last_block_of_column(counters + blockIdx.x) && mine) {
        add_partials(dweight, pw, gridDim.y, c, j);
        add_partials(dbias, pb, gridDim.y, c, j);
        if (dinp_bias) add_partials(dinp_bias, pp, gridDim.y, c, j);
    }
}
