// Fused multi-head self-attention over packed variable-length sequences with dropout on
// the probabilities, FlashAttention-2 style: key/value tiles stream through shared memory,
// online softmax, per-row logsumexp saved, no t x t matrix in global memory; the
// backward pass recomputes the probabilities from the logsumexp and regenerates the
// dropout mask from Philox. CPU twin: src/backend/cpu/attention.rs.
//
// Layout (FlashAttention's "varlen"): q, k, v, out [n, h*d], the b sequences packed with no
// padding, sequence bi being tokens seqs[bi] .. seqs[bi+1] (its length L <= t, the
// longest), heads interleaved as the HF linear layers produce them; lse [n, h]. Every
// token attends to the L tokens of its sequence: no mask, no work on padding. Scale
// 1/sqrt(d). The dropout counter of probability (i, j) of head (bi, hi) is
// ((bi*h + hi)*tp + i)*tp + j, tp = t rounded up to a multiple of 4 (counter_stride: each
// row starts a Philox group). Grids are sized for t; blocks past a sequence's L return.
//
// Work split (fp32 on CUDA cores; the bf16 / fp16 modes run kernels/attention_mma.cu on
// tensor cores instead):
// - forward and dq: one warp per query row, ATT_WARPS rows per block; tiles of
//   ATT_TILE = 32 keys, lane l owns key j0 + l of the tile for the scores, then the warp
//   accumulates P V (or dS K) over the tile with lanes spread over the head dimension.
// - dk/dv: one warp per key row, tiles of 32 queries; the same with roles swapped.
// Backward is two kernels (dq; then dk and dv) so that every output row is written by
// one warp: no atomics, deterministic. D_i = dO_i . O_i is computed by the dq kernel and
// read by the dk/dv kernel.
// Shared memory is sized at launch for the actual head dim d <= ATT_DMAX (rows padded to
// d + 1 floats so lane-per-row reads are free of bank conflicts).
#include "common.cuh"

#define ATT_TILE 32
#define ATT_WARPS 8
#define ATT_DMAX 128
#define ATT_EPL (ATT_DMAX / 32)  // head-dim elements per lane

// Element 0 of head hi of token s0 + i.
__device__ __forceinline__ size_t head_off(int s0, int i, int hi, int h, int d) {
    return ((size_t)(s0 + i) * h + hi) * d;
}

// The counters' row length (src/backend/cpu/attention.rs counter_stride).
__device__ __forceinline__ unsigned long long counter_stride(int t) { return (unsigned long long)((t + 3) & ~3); }
__device__ __forceinline__ unsigned long long prob_index(int bi, int hi, int i, int j, int t, int h) {
    const unsigned long long tp = counter_stride(t);
    return (((unsigned long long)(bi * h + hi) * tp + i) * tp) + j;
}

// Loads rows r0 .. r0 + ATT_TILE of head hi of the sequence at token s0 (length len) of
// x into dst [ATT_TILE][d + 1] (rows past len are zero).
template <typename T>
__device__ __forceinline__ void load_tile(float* dst, const T* x, int s0, int hi, int r0, int len, int h, int d) {
    const int ld = d + 1;
    for (int idx = threadIdx.x; idx < ATT_TILE * d; idx += blockDim.x) {
        int rr = idx / d, e = idx - rr * d;
        int r = r0 + rr;
        dst[rr * ld + e] = r < len ? to_f32(x[head_off(s0, r, hi, h, d) + e]) : 0.0f;
    }
}

// Grid: (ceil(t / ATT_WARPS), h, b); block ATT_WARPS * 32 threads; dynamic shared memory
// (2 * ATT_TILE * (d + 1) + ATT_WARPS * d + ATT_TILE) floats.
template <typename T>
__device__ void attention_fwd(T* out, float* lse, const T* q, const T* k, const T* v, const int* seqs, int b,
                              int t, int h, int d, DropoutArgs drop) {
    extern __shared__ float smem[];
    const int ld = d + 1;
    float* ks = smem;                  // [ATT_TILE][ld]
    float* vs = ks + ATT_TILE * ld;    // [ATT_TILE][ld]
    float* qs = vs + ATT_TILE * ld;    // [ATT_WARPS][d]
    float* mk = qs + ATT_WARPS * d;    // [ATT_TILE]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hi = blockIdx.y, bi = blockIdx.z;
    const int s0 = seqs[bi], len = seqs[bi + 1] - s0;
    if ((int)blockIdx.x * ATT_WARPS >= len) return;  // block-uniform: no row of this sequence
    const int i = blockIdx.x * ATT_WARPS + warp;
    const bool active = i < len;
    const float scale = 1.0f / sqrtf((float)d);
    const bool dropping = drop.p > 0.0f;
    float* qrow = qs + warp * d;
    if (active)
        for (int e = lane; e < d; e += 32) qrow[e] = to_f32(q[head_off(s0, i, hi, h, d) + e]);

    float m_run = NEG_INF, l_run = 0.0f;
    float acc[ATT_EPL];
#pragma unroll
    for (int u = 0; u < ATT_EPL; ++u) acc[u] = 0.0f;

    for (int j0 = 0; j0 < len; j0 += ATT_TILE) {
        __syncthreads();  // the previous tile is consumed
        load_tile(ks, k, s0, hi, j0, len, h, d);
        load_tile(vs, v, s0, hi, j0, len, h, d);
        if (threadIdx.x < ATT_TILE) {
            int j = j0 + threadIdx.x;
            mk[threadIdx.x] = j < len ? 1.0f : 0.0f;
        }
        __syncthreads();
        if (!active) continue;  // warp-uniform
        const int j = j0 + lane;
        float s = NEG_INF;
        if (mk[lane] > 0.5f) {
            float dot = 0.0f;
            for (int e = 0; e < d; ++e) dot += qrow[e] * ks[lane * ld + e];
            s = dot * scale;
        }
        const float tmax = warp_max(s);
        if (tmax == NEG_INF) continue;  // no key of this tile is in the sequence
        const float m_new = fmaxf(m_run, tmax);
        const float p = s == NEG_INF ? 0.0f : expf(s - m_new);
        const float corr = expf(m_run - m_new);  // 0 on the first real tile
        l_run = l_run * corr + warp_sum(p);
        m_run = m_new;
        const float pf = (dropping && p != 0.0f) ? p * dropout_factor(drop, prob_index(bi, hi, i, j, t, h)) : p;
#pragma unroll
        for (int u = 0; u < ATT_EPL; ++u) acc[u] *= corr;
        for (int jj = 0; jj < ATT_TILE; ++jj) {
            const float pj = __shfl_sync(FULL_MASK, pf, jj);
            if (pj == 0.0f) continue;  // warp-uniform
#pragma unroll
            for (int u = 0; u < ATT_EPL; ++u) {
                int e = lane + 32 * u;
                if (e < d) acc[u] += pj * vs[jj * ld + e];
            }
        }
    }
    if (!active) return;
    const float inv = l_run > 0.0f ? 1.0f / l_run : 0.0f;
    const size_t o = head_off(s0, i, hi, h, d);
#pragma unroll
    for (int u = 0; u < ATT_EPL; ++u) {
        int e = lane + 32 * u;
        if (e < d) out[o + e] = from_f32<T>(acc[u] * inv);
    }
    if (lane == 0) lse[(size_t)(s0 + i) * h + hi] = l_run > 0.0f ? m_run + logf(l_run) : NEG_INF;
}
extern "C" __global__ void attention_fwd_f32(float* out, float* lse, const float* q, const float* k, const float* v,
                                             const int* seqs, int b, int t, int h, int d, DropoutArgs drop) {
    attention_fwd<float>(out, lse, q, k, v, seqs, b, t, h, d, drop);
}

// Backward, part 1: dQ (overwritten) and D = rowsum(dO * O) [n, h] for part 2.
// With f the dropout factors and P recomputed as exp(S - lse):
//   dP_ij = (dO_i . V_j) f_ij,  dS_ij = P_ij (dP_ij - D_i) / sqrt(d),  dQ_i = sum_j dS_ij K_j.
// Same grid, block and shared memory as attention_fwd (qs holds Q rows, then dO rows
// follow in a second [ATT_WARPS][d] area: (2 * ATT_TILE * (d + 1) + 2 * ATT_WARPS * d
// + ATT_TILE) floats).
template <typename T>
__device__ void attention_bwd_dq(T* dq, float* dvec, const T* dout, const T* q, const T* k, const T* v, const T* out,
                                 const float* lse, const int* seqs, int b, int t, int h, int d, DropoutArgs drop) {
    extern __shared__ float smem[];
    const int ld = d + 1;
    float* ks = smem;
    float* vs = ks + ATT_TILE * ld;
    float* qs = vs + ATT_TILE * ld;   // [ATT_WARPS][d]
    float* dos = qs + ATT_WARPS * d;  // [ATT_WARPS][d]
    float* mk = dos + ATT_WARPS * d;  // [ATT_TILE]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hi = blockIdx.y, bi = blockIdx.z;
    const int s0 = seqs[bi], len = seqs[bi + 1] - s0;
    if ((int)blockIdx.x * ATT_WARPS >= len) return;  // block-uniform: no row of this sequence
    const int i = blockIdx.x * ATT_WARPS + warp;
    const bool active = i < len;
    const float scale = 1.0f / sqrtf((float)d);
    const bool dropping = drop.p > 0.0f;
    float* qrow = qs + warp * d;
    float* dorow = dos + warp * d;
    float di = 0.0f, li = 0.0f;
    if (active) {
        const size_t o = head_off(s0, i, hi, h, d);
        float part = 0.0f;
        for (int e = lane; e < d; e += 32) {
            qrow[e] = to_f32(q[o + e]);
            float g = to_f32(dout[o + e]);
            dorow[e] = g;
            part += g * to_f32(out[o + e]);
        }
        di = warp_sum(part);
        li = lse[(size_t)(s0 + i) * h + hi];
        if (lane == 0) dvec[(size_t)(s0 + i) * h + hi] = di;
    }
    float acc[ATT_EPL];
#pragma unroll
    for (int u = 0; u < ATT_EPL; ++u) acc[u] = 0.0f;

    for (int j0 = 0; j0 < len; j0 += ATT_TILE) {
        __syncthreads();
        load_tile(ks, k, s0, hi, j0, len, h, d);
        load_tile(vs, v, s0, hi, j0, len, h, d);
        if (threadIdx.x < ATT_TILE) {
            int j = j0 + threadIdx.x;
            mk[threadIdx.x] = j < len ? 1.0f : 0.0f;
        }
        __syncthreads();
        if (!active) continue;
        const int j = j0 + lane;
        float ds = 0.0f;
        if (mk[lane] > 0.5f) {
            float qk = 0.0f, dov = 0.0f;  // Q_i . K_j and dO_i . V_j
            for (int e = 0; e < d; ++e) {
                qk += qrow[e] * ks[lane * ld + e];
                dov += dorow[e] * vs[lane * ld + e];
            }
            const float p = expf(qk * scale - li);
            const float f = dropping ? dropout_factor(drop, prob_index(bi, hi, i, j, t, h)) : 1.0f;
            ds = p * (dov * f - di) * scale;
        }
        for (int jj = 0; jj < ATT_TILE; ++jj) {
            const float dsj = __shfl_sync(FULL_MASK, ds, jj);
            if (dsj == 0.0f) continue;
#pragma unroll
            for (int u = 0; u < ATT_EPL; ++u) {
                int e = lane + 32 * u;
                if (e < d) acc[u] += dsj * ks[jj * ld + e];
            }
        }
    }
    if (!active) return;
    const size_t o = head_off(s0, i, hi, h, d);
#pragma unroll
    for (int u = 0; u < ATT_EPL; ++u) {
        int e = lane + 32 * u;
        if (e < d) dq[o + e] = from_f32<T>(acc[u]);
    }
}
extern "C" __global__ void attention_bwd_dq_f32(float* dq, float* dvec, const float* dout, const float* q,
                                                const float* k, const float* v, const float* out, const float* lse,
                                                const int* seqs, int b, int t, int h, int d, DropoutArgs drop) {
    attention_bwd_dq<float>(dq, dvec, dout, q, k, v, out, lse, seqs, b, t, h, d, drop);
}

// Backward, part 2: dK, dV (overwritten), one warp per key row j, tiles of 32 queries:
//   dV_j = sum_i P_ij f_ij dO_i,  dK_j = sum_i dS_ij Q_i.
// Grid: (ceil(t / ATT_WARPS), h, b); dynamic shared memory
// (2 * ATT_TILE * (d + 1) + 2 * ATT_WARPS * d + 2 * ATT_TILE) floats.
template <typename T>
__device__ void attention_bwd_dkdv(T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v, const float* lse,
                                   const float* dvec, const int* seqs, int b, int t, int h, int d,
                                   DropoutArgs drop) {
    extern __shared__ float smem[];
    const int ld = d + 1;
    float* qs = smem;                  // [ATT_TILE][ld] queries of the tile
    float* dos = qs + ATT_TILE * ld;   // [ATT_TILE][ld] their dO
    float* kw = dos + ATT_TILE * ld;   // [ATT_WARPS][d] this warp's key
    float* vw = kw + ATT_WARPS * d;    // [ATT_WARPS][d] this warp's value
    float* ls = vw + ATT_WARPS * d;    // [ATT_TILE] lse of the tile's queries
    float* ds_ = ls + ATT_TILE;        // [ATT_TILE] D of the tile's queries
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hi = blockIdx.y, bi = blockIdx.z;
    const int s0 = seqs[bi], len = seqs[bi + 1] - s0;
    if ((int)blockIdx.x * ATT_WARPS >= len) return;  // block-uniform: no row of this sequence
    const int j = blockIdx.x * ATT_WARPS + warp;
    const bool active = j < len;
    const float scale = 1.0f / sqrtf((float)d);
    const bool dropping = drop.p > 0.0f;
    float* krow = kw + warp * d;
    float* vrow = vw + warp * d;
    if (active) {
        const size_t o = head_off(s0, j, hi, h, d);
        for (int e = lane; e < d; e += 32) {
            krow[e] = to_f32(k[o + e]);
            vrow[e] = to_f32(v[o + e]);
        }
    }
    float adk[ATT_EPL], adv[ATT_EPL];
#pragma unroll
    for (int u = 0; u < ATT_EPL; ++u) adk[u] = adv[u] = 0.0f;

    for (int i0 = 0; i0 < len; i0 += ATT_TILE) {
        __syncthreads();
        load_tile(qs, q, s0, hi, i0, len, h, d);
        load_tile(dos, dout, s0, hi, i0, len, h, d);
        if (threadIdx.x < ATT_TILE) {
            int i = i0 + threadIdx.x;
            size_t r = (size_t)(s0 + i) * h + hi;
            ls[threadIdx.x] = i < len ? lse[r] : 0.0f;
            ds_[threadIdx.x] = i < len ? dvec[r] : 0.0f;
        }
        __syncthreads();
        if (!active) continue;
        const int i = i0 + lane;
        float pf = 0.0f, ds = 0.0f;
        if (i < len) {
            float qk = 0.0f, dov = 0.0f;  // Q_i . K_j and dO_i . V_j
            for (int e = 0; e < d; ++e) {
                qk += qs[lane * ld + e] * krow[e];
                dov += dos[lane * ld + e] * vrow[e];
            }
            const float p = expf(qk * scale - ls[lane]);
            const float f = dropping ? dropout_factor(drop, prob_index(bi, hi, i, j, t, h)) : 1.0f;
            pf = p * f;
            ds = p * (dov * f - ds_[lane]) * scale;
        }
        for (int ii = 0; ii < ATT_TILE; ++ii) {
            const float pfi = __shfl_sync(FULL_MASK, pf, ii);
            const float dsi = __shfl_sync(FULL_MASK, ds, ii);
#pragma unroll
            for (int u = 0; u < ATT_EPL; ++u) {
                int e = lane + 32 * u;
                if (e < d) {
                    adv[u] += pfi * dos[ii * ld + e];
                    adk[u] += dsi * qs[ii * ld + e];
                }
            }
        }
    }
    if (!active) return;
    const size_t o = head_off(s0, j, hi, h, d);
#pragma unroll
    for (int u = 0; u < ATT_EPL; ++u) {
        int e = lane + 32 * u;
        if (e < d) {
            dk[o + e] = from_f32<T>(adk[u]);
            dv[o + e] = from_f32<T>(adv[u]);
        }
    }
}
extern "C" __global__ void attention_bwd_dkdv_f32(float* dk, float* dv, const float* dout, const float* q,
                                                  const float* k, const float* v, const float* lse, const float* dvec,
                                                  const int* seqs, int b, int t, int h, int d, DropoutArgs drop) {
    attention_bwd_dkdv<float>(dk, dv, dout, q, k, v, lse, dvec, seqs, b, t, h, d, drop);
}
