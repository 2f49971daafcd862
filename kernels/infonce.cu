// Class-masked InfoNCE of DeepCUT (SPEC section 4), forward and backward, fp32; in the
// bf16 / fp16 modes the similarity dot products run on tensor cores (score_tile_mma).
// CPU twin: src/backend/cpu/infonce.rs (same loss, same options, same outputs).
//
// For a valid anchor i (anchor flag, |P_i| > 0, |D_i| > 0), with s_ij = z_i . z_j / tau:
//   L_i = -mean_{p in P_i} s_ip + logsumexp_{n in D_i} s_in
//   P_i = { j : y_j != y_i },  D_i = { j != i : y_j = y_i } (same-class) | { j != i } (all),
//   minus i's partner with own-view = exclude.
// Memory is O(m c): the m x m similarities exist only as 32 x 32 tiles in registers and
// shared memory. Every kernel walks the same tiles: rows a0 .. a0+32 (anchors) against
// columns c0 .. c0+32, the dot products accumulated over the embedding in chunks of 32
// through shared memory; 256 threads, warp w owns tile rows 4w .. 4w+3 and lane l owns
// tile column l, so row reductions (max, sum) are warp shuffles.
//
// Kernels, in launch order:
// - infonce_counts_f32: |P_i| and validity per row (an O(m^2) label count, integer only).
// - infonce_fwd_f32: per anchor tile, online logsumexp over column tiles (running max and
//   sum per row, fp32) and the linear term sum_{p in P_i} s_ip (f64); writes loss, lse.
// - infonce_bwd_rows_f32: per anchor tile, recomputes the tiles with
//   W_ij = [j in D_i] exp(s_ij - lse_i) - [j in P_i] / |P_i| and accumulates
//   dz_i = scale / tau * sum_j W_ij z_j into its own rows of dz (zeroed by the launcher).
// - infonce_bwd_cols_f32 (only without detached columns): per column tile, the same W
//   transposed, dz_j += scale / tau * sum_i W_ij z_i over valid anchors i, accumulated in a
//   scratch [m, c] and added to dz at the end.
// Each output row is written by one block, visiting tiles in a fixed order: no atomics,
// the same bits on every run (Inf-CL's row/column split).
// The CPU twin instead groups rows by class and reduces the linear term to per-class sums
// (one GEMM per group); here the class masks are applied inside full tiles, which costs
// m^2 c instead of sum_k n_k^2 c but needs no host-side grouping (and so no download of
// the labels in the middle of a step).
#include "common.cuh"
#include "mma.cuh"

#define NCE_TILE 32
#define NCE_RPW 4  // tile rows per warp: 8 warps x 4 = 32
#define NCE_LD 33  // padded row of a shared tile

struct InfoNceArgs {
    float inv_tau;
    float scale;      // backward only: gamma / count for gamma * L_f
    int denom_all;    // Denominator::All
    int own_exclude;  // OwnView::Exclude
    int round;        // 0: fp32 dot products (CUDA cores); 1 / 2: z rounded to bf16 / fp16 (tensor cores)
};

// The partner excluded from D_i, or -1.
__device__ __forceinline__ int excluded_partner(const int* labels, const int* partner, int i, const InfoNceArgs& a) {
    int p = partner[i];
    if (a.own_exclude && p >= 0 && p != i && (a.denom_all || labels[p] == labels[i])) return p;
    return -1;
}

// npos[i] = |P_i| = m - n_{y_i}; valid[i] = anchor[i] && |P_i| > 0 && |D_i| > 0, as
// InfoNceOptions::valid_anchors. One thread per row; labels stream through shared memory.
// Block: 256 threads.
extern "C" __global__ void infonce_counts_f32(int* npos, int* valid, const int* labels, const int* anchor,
                                              const int* partner, int m, InfoNceArgs a) {
    __shared__ int ys[256];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int yi = i < m ? labels[i] : 0;
    int same = 0;
    for (int j0 = 0; j0 < m; j0 += blockDim.x) {
        __syncthreads();
        if (j0 + (int)threadIdx.x < m) ys[threadIdx.x] = labels[j0 + threadIdx.x];
        __syncthreads();
        const int lim = min((int)blockDim.x, m - j0);
        for (int jj = 0; jj < lim; ++jj) same += ys[jj] == yi;
    }
    if (i >= m) return;
    const int np = m - same;
    const int in_d = (a.denom_all ? m - 1 : same - 1) - (excluded_partner(labels, partner, i, a) >= 0 ? 1 : 0);
    npos[i] = np;
    valid[i] = anchor[i] != 0 && np > 0 && in_d > 0;
}

// Rows r0 .. r0 + 32 of z, elements e0 .. e0 + 32, into the shared tile dst [32][NCE_LD]
// (zeros past row m or element c). Block-wide; the caller places the barriers.
__device__ __forceinline__ void load_z_chunk(float* dst, const float* z, int r0, int e0, int m, int c) {
    for (int idx = threadIdx.x; idx < NCE_TILE * 32; idx += blockDim.x) {
        int rr = idx >> 5, ee = idx & 31, e = e0 + ee;
        dst[rr * NCE_LD + ee] = (r0 + rr < m && e < c) ? z[(size_t)(r0 + rr) * c + e] : 0.0f;
    }
}

// s[u] += z_{r0 + 4w + u} . z_{c0 + lane} for u < 4 (rows or columns past m count as zero
// vectors). Begins with a barrier; ra and rc are [32][NCE_LD] shared tiles.
__device__ __forceinline__ void score_tile(float s[NCE_RPW], float* ra, float* rc, const float* z, int r0, int c0,
                                           int m, int c) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int e0 = 0; e0 < c; e0 += 32) {
        __syncthreads();
        load_z_chunk(ra, z, r0, e0, m, c);
        load_z_chunk(rc, z, c0, e0, m, c);
        __syncthreads();
#pragma unroll 8
        for (int ee = 0; ee < 32; ++ee) {
            const float zc = rc[lane * NCE_LD + ee];
#pragma unroll
            for (int u = 0; u < NCE_RPW; ++u) s[u] += ra[(warp * NCE_RPW + u) * NCE_LD + ee] * zc;
        }
    }
}

// score_tile on tensor cores, for the bf16 / fp16 modes: the products of z rounded to 16
// bits, fp32 accumulation (the CPU twin rounds z for its similarity GEMMs the same way).
// Each of the 8 warps computes one 16 x 8 block of the 32 x 32 tile with mma.sync over
// the same shared chunks as score_tile, then the tile goes through `st` [32][NCE_LD] to the
// SIMT layout the callers use (s[u]: row 4w + u, column lane).
template <typename Tag>
__device__ __forceinline__ void score_tile_mma(float s[NCE_RPW], float* ra, float* rc, float* st, const float* z,
                                               int r0, int c0, int m, int c) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c2 = (lane & 3) * 2;
    const int mr = (warp >> 2) * 16, nc = (warp & 3) * 8;  // this warp's block: rows mr.., columns nc..
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int e0 = 0; e0 < c; e0 += 32) {
        __syncthreads();
        load_z_chunk(ra, z, r0, e0, m, c);
        load_z_chunk(rc, z, c0, e0, m, c);
        __syncthreads();
#pragma unroll
        for (int k0 = 0; k0 < 32; k0 += 16) {
            const float* a_lo = ra + (mr + g) * NCE_LD + k0 + c2;
            const float* a_hi = ra + (mr + g + 8) * NCE_LD + k0 + c2;
            const float* b_n = rc + (nc + g) * NCE_LD + k0 + c2;
            const unsigned a[4] = {pack2<Tag>(a_lo[0], a_lo[1]), pack2<Tag>(a_hi[0], a_hi[1]),
                                   pack2<Tag>(a_lo[8], a_lo[9]), pack2<Tag>(a_hi[8], a_hi[9])};
            const unsigned b[2] = {pack2<Tag>(b_n[0], b_n[1]), pack2<Tag>(b_n[8], b_n[9])};
            mma_16816(acc, a, b, Tag());
        }
    }
    // st is free: its last readers (the previous call's) passed the barriers above
    st[(mr + g) * NCE_LD + nc + c2] = acc[0];
    st[(mr + g) * NCE_LD + nc + c2 + 1] = acc[1];
    st[(mr + g + 8) * NCE_LD + nc + c2] = acc[2];
    st[(mr + g + 8) * NCE_LD + nc + c2 + 1] = acc[3];
    __syncthreads();
#pragma unroll
    for (int u = 0; u < NCE_RPW; ++u) s[u] += st[(warp * NCE_RPW + u) * NCE_LD + lane];
}

// The tile's dot products in the precision `a.round` asks for.
__device__ __forceinline__ void score_tile_as(float s[NCE_RPW], float* ra, float* rc, float* st, const float* z,
                                              int r0, int c0, int m, int c, const InfoNceArgs& a) {
    if (a.round == 1)
        score_tile_mma<Bf16Tag>(s, ra, rc, st, z, r0, c0, m, c);
    else if (a.round == 2)
        score_tile_mma<F16Tag>(s, ra, rc, st, z, r0, c0, m, c);
    else
        score_tile(s, ra, rc, z, r0, c0, m, c);
}

// Metadata of the 32 anchor rows a0 .. a0+32 of a tile, in shared memory.
struct AnchorMeta {
    int y[NCE_TILE];
    int valid[NCE_TILE];
    int excl[NCE_TILE];
    float lse[NCE_TILE];
    float inv_npos[NCE_TILE];
};

// Fills `am` for rows a0 .. a0+32 (threads 0..31); returns, to every thread, whether any
// of them is a valid anchor. Ends with a barrier.
__device__ __forceinline__ int load_anchor_meta(AnchorMeta& am, const int* labels, const int* npos, const int* valid,
                                                const int* partner, const float* lse, int a0, int m,
                                                const InfoNceArgs& a) {
    int v = 0;
    if (threadIdx.x < NCE_TILE) {
        const int i = a0 + threadIdx.x;
        v = i < m ? valid[i] : 0;
        am.y[threadIdx.x] = i < m ? labels[i] : 0;
        am.valid[threadIdx.x] = v;
        am.excl[threadIdx.x] = i < m ? excluded_partner(labels, partner, i, a) : -1;
        am.lse[threadIdx.x] = (v && lse) ? lse[i] : 0.0f;
        am.inv_npos[threadIdx.x] = v ? 1.0f / (float)npos[i] : 0.0f;
    }
    return __syncthreads_or(v);
}

// loss[i] = L_i, lse[i] = logsumexp_{n in D_i} s_in on valid anchors, 0 elsewhere.
// Grid: ceil(m / 32) blocks of 256 threads, one per anchor tile.
extern "C" __global__ void infonce_fwd_f32(float* loss, float* lse, const float* z, const int* labels, const int* npos,
                                           const int* valid, const int* partner, int m, int c, InfoNceArgs a) {
    __shared__ float ra[NCE_TILE * NCE_LD], rc[NCE_TILE * NCE_LD], st[NCE_TILE * NCE_LD];
    __shared__ AnchorMeta am;
    __shared__ int yc[NCE_TILE];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int a0 = blockIdx.x * NCE_TILE;
    const int any = load_anchor_meta(am, labels, npos, valid, partner, nullptr, a0, m, a);
    float mrun[NCE_RPW], lrun[NCE_RPW];
    double psum[NCE_RPW];
#pragma unroll
    for (int u = 0; u < NCE_RPW; ++u) {
        mrun[u] = NEG_INF;
        lrun[u] = 0.0f;
        psum[u] = 0.0;
    }
    for (int c0 = 0; any && c0 < m; c0 += NCE_TILE) {
        __syncthreads();  // yc of the previous tile is read
        if (threadIdx.x < NCE_TILE) yc[threadIdx.x] = c0 + (int)threadIdx.x < m ? labels[c0 + threadIdx.x] : 0;
        float s[NCE_RPW] = {0.0f, 0.0f, 0.0f, 0.0f};
        score_tile_as(s, ra, rc, st, z, a0, c0, m, c, a);  // its barriers publish yc
        const int j = c0 + lane;
#pragma unroll
        for (int u = 0; u < NCE_RPW; ++u) {
            const int r = warp * NCE_RPW + u, i = a0 + r;
            const float sv = s[u] * a.inv_tau;
            const bool same = yc[lane] == am.y[r];
            const bool in_d = j < m && j != i && j != am.excl[r] && (a.denom_all || same);
            const bool in_p = j < m && !same;
            if (in_p) psum[u] += (double)sv;
            const float tmax = warp_max(in_d ? sv : NEG_INF);
            if (tmax == NEG_INF) continue;  // warp-uniform: nothing of D_i in this tile
            const float m_new = fmaxf(mrun[u], tmax);
            const float tsum = warp_sum(in_d ? expf(sv - m_new) : 0.0f);
            lrun[u] = lrun[u] * expf(mrun[u] - m_new) + tsum;
            mrun[u] = m_new;
        }
    }
#pragma unroll
    for (int u = 0; u < NCE_RPW; ++u) {
        const double ps = warp_sum(psum[u]);
        const int r = warp * NCE_RPW + u, i = a0 + r;
        if (lane != 0 || i >= m) continue;
        if (am.valid[r]) {
            const float l = mrun[u] + logf(lrun[u]);
            lse[i] = l;
            loss[i] = (float)((double)l - ps / (double)npos[i]);
        } else {
            lse[i] = 0.0f;
            loss[i] = 0.0f;
        }
    }
}

// W_ij of tile row r (anchor i = a0 + r) and column j, given s_ij / tau = sv.
__device__ __forceinline__ float weight_of(const AnchorMeta& am, int r, int i, int j, int yj, int m, float sv,
                                           const InfoNceArgs& a) {
    if (!am.valid[r] || j >= m) return 0.0f;
    const bool same = yj == am.y[r];
    const bool in_d = j != i && j != am.excl[r] && (a.denom_all || same);
    return (in_d ? expf(sv - am.lse[r]) : 0.0f) - (same ? 0.0f : am.inv_npos[r]);
}

// Anchor rows: dz_i = scale / tau * sum_j W_ij z_j, accumulated into dz (zeroed first by
// the launcher; rows that are not valid anchors stay zero). Grid: ceil(m / 32) blocks of
// 256 threads, one per anchor tile.
extern "C" __global__ void infonce_bwd_rows_f32(float* dz, const float* z, const float* lse, const int* labels,
                                                const int* npos, const int* valid, const int* partner, int m, int c,
                                                InfoNceArgs a) {
    __shared__ float ra[NCE_TILE * NCE_LD], rc[NCE_TILE * NCE_LD], ws[NCE_TILE * NCE_LD], st[NCE_TILE * NCE_LD];
    __shared__ AnchorMeta am;
    __shared__ int yc[NCE_TILE];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int a0 = blockIdx.x * NCE_TILE;
    if (!load_anchor_meta(am, labels, npos, valid, partner, lse, a0, m, a)) return;
    for (int c0 = 0; c0 < m; c0 += NCE_TILE) {
        __syncthreads();
        if (threadIdx.x < NCE_TILE) yc[threadIdx.x] = c0 + (int)threadIdx.x < m ? labels[c0 + threadIdx.x] : 0;
        float s[NCE_RPW] = {0.0f, 0.0f, 0.0f, 0.0f};
        score_tile_as(s, ra, rc, st, z, a0, c0, m, c, a);
#pragma unroll
        for (int u = 0; u < NCE_RPW; ++u) {
            const int r = warp * NCE_RPW + u;
            ws[r * NCE_LD + lane] = weight_of(am, r, a0 + r, c0 + lane, yc[lane], m, s[u] * a.inv_tau, a);
        }
        // dz rows += W (32 x 32) times the column rows' embeddings, 32 embedding
        // elements at a time (lane = element).
        for (int e0 = 0; e0 < c; e0 += 32) {
            __syncthreads();  // ws written / rc consumed
            load_z_chunk(rc, z, c0, e0, m, c);
            __syncthreads();
            const int e = e0 + lane;
#pragma unroll
            for (int u = 0; u < NCE_RPW; ++u) {
                const int r = warp * NCE_RPW + u;
                if (!am.valid[r] || e >= c) continue;
                float acc = 0.0f;
                for (int l = 0; l < NCE_TILE; ++l) acc += ws[r * NCE_LD + l] * rc[l * NCE_LD + lane];
                dz[(size_t)(a0 + r) * c + e] += acc;
            }
        }
    }
    const float k = a.scale * a.inv_tau;
    for (int e = lane; e < c; e += 32) {
#pragma unroll
        for (int u = 0; u < NCE_RPW; ++u) {
            const int r = warp * NCE_RPW + u;
            if (am.valid[r]) dz[(size_t)(a0 + r) * c + e] *= k;
        }
    }
}

// Columns (not detached): dz_j += scale / tau * sum over valid anchors i of W_ij z_i. The
// block owns columns j0 .. j0+32; partial sums go to dzc [m, c] (zeroed by the launcher)
// and are added to dz at the end. Grid: ceil(m / 32) blocks of 256 threads.
extern "C" __global__ void infonce_bwd_cols_f32(float* dz, float* dzc, const float* z, const float* lse,
                                                const int* labels, const int* npos, const int* valid,
                                                const int* partner, int m, int c, InfoNceArgs a) {
    __shared__ float ra[NCE_TILE * NCE_LD], rc[NCE_TILE * NCE_LD], ws[NCE_TILE * NCE_LD], st[NCE_TILE * NCE_LD];
    __shared__ AnchorMeta am;
    __shared__ int yc[NCE_TILE];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j0 = blockIdx.x * NCE_TILE;
    if (threadIdx.x < NCE_TILE) yc[threadIdx.x] = j0 + (int)threadIdx.x < m ? labels[j0 + threadIdx.x] : 0;
    for (int a0 = 0; a0 < m; a0 += NCE_TILE) {
        __syncthreads();  // am and ws of the previous anchor tile are consumed
        if (!load_anchor_meta(am, labels, npos, valid, partner, lse, a0, m, a)) continue;  // block-uniform
        float s[NCE_RPW] = {0.0f, 0.0f, 0.0f, 0.0f};
        score_tile_as(s, ra, rc, st, z, a0, j0, m, c, a);  // s[u]: anchor a0 + 4w + u, column j0 + lane
#pragma unroll
        for (int u = 0; u < NCE_RPW; ++u) {
            const int r = warp * NCE_RPW + u;
            ws[r * NCE_LD + lane] = weight_of(am, r, a0 + r, j0 + lane, yc[lane], m, s[u] * a.inv_tau, a);
        }
        for (int e0 = 0; e0 < c; e0 += 32) {
            __syncthreads();
            load_z_chunk(ra, z, a0, e0, m, c);
            __syncthreads();
            const int e = e0 + lane;
#pragma unroll
            for (int u = 0; u < NCE_RPW; ++u) {
                const int jr = warp * NCE_RPW + u, j = j0 + jr;
                if (j >= m || e >= c) continue;
                float acc = 0.0f;
                for (int r = 0; r < NCE_TILE; ++r) acc += ws[r * NCE_LD + jr] * ra[r * NCE_LD + lane];
                dzc[(size_t)j * c + e] += acc;
            }
        }
    }
    const float k = a.scale * a.inv_tau;
    for (int e = lane; e < c; e += 32) {
#pragma unroll
        for (int u = 0; u < NCE_RPW; ++u) {
            const int j = j0 + warp * NCE_RPW + u;
            if (j < m) dz[(size_t)j * c + e] += k * dzc[(size_t)j * c + e];
        }
    }
}
