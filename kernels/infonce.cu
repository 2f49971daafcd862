// Class-masked InfoNCE of DeepCUT (SPEC section 4), forward and backward: fp32 on CUDA
// cores, and in the bf16 / fp16 modes the products on tensor cores over z rounded to 16
// bits (the 16-bit kernels at the end of this file).
// CPU twin: src/backend/cpu/infonce.rs (same loss, same options, same outputs, the same
// rounding points in the 16-bit modes).
//
// For a valid anchor i (anchor flag, |P_i| > 0, |D_i| > 0), with s_ij = z_i . z_j / tau:
//   L_i = -mean_{p in P_i} s_ip + logsumexp_{n in D_i} s_in
//   P_i = { j : y_j != y_i },  D_i = { j != i : y_j = y_i } (same-class) | { j != i } (all),
//   minus i's partner with own-view = exclude.
// Memory is O(m c): the m x m similarities exist only as 32 x 32 tiles in registers and
// shared memory. Every kernel walks the same tiles: rows a0 .. a0+32 (anchors) against
// columns c0 .. c0+32; 256 threads, warp w owns tile rows 4w .. 4w+3 and lane l owns tile
// column l for the element-wise work, so row reductions (max, sum) are warp shuffles.
//
// Kernels, in launch order:
// - infonce_counts_f32: |P_i|, validity and class representative per row (an O(m^2) label
//   count, integer only).
// - infonce_fwd_f32 (fp32; 16-bit where z is too wide for shared memory) and
//   infonce_fwd16_{bf16,f16}: per anchor tile, online logsumexp over column tiles (running
//   max and sum per row, fp32) and the linear term sum_{p in P_i} s_ip (f64); writes loss,
//   lse. The fp32 kernels stream both sides' z through shared memory in chunks of 32
//   elements per tile; the 16-bit ones keep the anchor rows and one column tile whole.
// - infonce_bwd_rows_f32: per anchor tile, recomputes the tiles with
//   W_ij = [j in D_i] exp(s_ij - lse_i) - [j in P_i] / |P_i| and accumulates
//   dz_i = scale / tau * sum_j W_ij z_j into its own rows of dz (zeroed by the launcher).
//   Or, 16-bit: infonce_rep_list_f32 and infonce_class_sums_f32 (the linear term's
//   per-class sums), then
//   infonce_bwd_rows16_{bf16,f16}_nbN with the W z products on tensor cores.
// - infonce_bwd_cols_f32 (only without detached columns): per column tile, the same W
//   transposed, dz_j += scale / tau * sum_i W_ij z_i over valid anchors i, accumulated in a
//   scratch [m, c] and added to dz at the end (fp32 products in every mode).
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
// InfoNceOptions::valid_anchors; rep[i] = the first row of i's class (its representative,
// which infonce_class_sums sums for). One thread per row; labels stream through shared
// memory. Block: 256 threads.
extern "C" __global__ void infonce_counts_f32(int* npos, int* valid, int* rep, const int* labels, const int* anchor,
                                              const int* partner, int m, InfoNceArgs a) {
    __shared__ int ys[256];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int yi = i < m ? labels[i] : 0;
    int same = 0, first = -1;
    for (int j0 = 0; j0 < m; j0 += blockDim.x) {
        __syncthreads();
        if (j0 + (int)threadIdx.x < m) ys[threadIdx.x] = labels[j0 + threadIdx.x];
        __syncthreads();
        const int lim = min((int)blockDim.x, m - j0);
        for (int jj = 0; jj < lim; ++jj) {
            const int eq = ys[jj] == yi;
            same += eq;
            if (eq && first < 0) first = j0 + jj;
        }
    }
    if (i >= m) return;
    const int np = m - same;
    const int in_d = (a.denom_all ? m - 1 : same - 1) - (excluded_partner(labels, partner, i, a) >= 0 ? 1 : 0);
    npos[i] = np;
    valid[i] = anchor[i] != 0 && np > 0 && in_d > 0;
    rep[i] = first;
}

// Rows r0 .. r0 + 32 of z, elements e0 .. e0 + 32, into the shared tile dst [32][NCE_LD]
// (zeros past row m or element c), rounded as `round` says (0: as stored). Block-wide;
// the caller places the barriers.
__device__ __forceinline__ void load_z_chunk(float* dst, const float* z, int r0, int e0, int m, int c,
                                             int round = 0) {
    for (int idx = threadIdx.x; idx < NCE_TILE * 32; idx += blockDim.x) {
        int rr = idx >> 5, ee = idx & 31, e = e0 + ee;
        dst[rr * NCE_LD + ee] = (r0 + rr < m && e < c) ? round_as(z[(size_t)(r0 + rr) * c + e], round) : 0.0f;
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

// The forward's walk over the column tiles, whatever computes a tile: `tiles.scores(s, c0)`
// adds the dot products of the anchor tile with columns c0 .. c0+32 to s[u] (row 4w + u,
// column lane), beginning with a barrier (which publishes yc). Online logsumexp over D_i
// (running max and sum, fp32) and the linear term sum_{p in P_i} s_ip (f64); writes loss
// and lse of the tile's rows: L_i, logsumexp on valid anchors, 0 elsewhere.
// Each lane keeps its own running max and sum over its columns (j = lane mod 32) and the
// lanes combine once, at the end: one exp per element and no shuffle per tile (a warp max
// and sum per row and tile, 10 shuffles and 2 exps per element's share, cost more than the
// tile's tensor-core products at c 384).
template <typename Tiles>
__device__ __forceinline__ void infonce_fwd_walk(Tiles& tiles, float* loss, float* lse, const int* labels,
                                                 const int* npos, const AnchorMeta& am, int* yc, int any, int a0,
                                                 int m, const InfoNceArgs& a) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
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
        tiles.scores(s, c0);  // its barriers publish yc
        const int j = c0 + lane;
#pragma unroll
        for (int u = 0; u < NCE_RPW; ++u) {
            const int r = warp * NCE_RPW + u, i = a0 + r;
            const float sv = s[u] * a.inv_tau;
            const bool same = yc[lane] == am.y[r];
            const bool in_d = j < m && j != i && j != am.excl[r] && (a.denom_all || same);
            const bool in_p = j < m && !same;
            if (in_p) psum[u] += (double)sv;
            if (in_d) {  // (m, l) <- (max(m, sv), l e^(m - max) + e^(sv - max)), one exp
                const float hi = fmaxf(mrun[u], sv), e = expf(fminf(mrun[u], sv) - hi);
                lrun[u] = sv > mrun[u] ? lrun[u] * e + 1.0f : lrun[u] + e;
                mrun[u] = hi;
            }
        }
    }
#pragma unroll
    for (int u = 0; u < NCE_RPW; ++u) {
        const double ps = warp_sum(psum[u]);
        const float mx = warp_max(mrun[u]);
        const float l = warp_sum(mrun[u] == NEG_INF ? 0.0f : lrun[u] * expf(mrun[u] - mx));
        const int r = warp * NCE_RPW + u, i = a0 + r;
        if (lane != 0 || i >= m) continue;
        if (am.valid[r]) {  // |D_i| > 0: mx is finite
            const float lv = mx + logf(l);
            lse[i] = lv;
            loss[i] = (float)((double)lv - ps / (double)npos[i]);
        } else {
            lse[i] = 0.0f;
            loss[i] = 0.0f;
        }
    }
}

// Tiles of the fp32 kernels: both sides streamed from z in 32-element chunks.
struct SimtTiles {
    float *ra, *rc, *st;
    const float* z;
    int a0, m, c;
    InfoNceArgs a;
    __device__ __forceinline__ void scores(float s[NCE_RPW], int c0) {
        score_tile_as(s, ra, rc, st, z, a0, c0, m, c, a);
    }
};

// loss[i] = L_i, lse[i] = logsumexp_{n in D_i} s_in on valid anchors, 0 elsewhere.
// Grid: ceil(m / 32) blocks of 256 threads, one per anchor tile.
extern "C" __global__ void infonce_fwd_f32(float* loss, float* lse, const float* z, const int* labels, const int* npos,
                                           const int* valid, const int* partner, int m, int c, InfoNceArgs a) {
    __shared__ float ra[NCE_TILE * NCE_LD], rc[NCE_TILE * NCE_LD], st[NCE_TILE * NCE_LD];
    __shared__ AnchorMeta am;
    __shared__ int yc[NCE_TILE];
    const int a0 = blockIdx.x * NCE_TILE;
    const int any = load_anchor_meta(am, labels, npos, valid, partner, nullptr, a0, m, a);
    SimtTiles tiles{ra, rc, st, z, a0, m, c, a};
    infonce_fwd_walk(tiles, loss, lse, labels, npos, am, yc, any, a0, m, a);
}

// Whether column j (label yj) is in D_i for tile row r (anchor i), and in P_i.
__device__ __forceinline__ bool in_denominator(const AnchorMeta& am, int r, int i, int j, int yj,
                                               const InfoNceArgs& a) {
    return j != i && j != am.excl[r] && (a.denom_all || yj == am.y[r]);
}

// W_ij of tile row r (anchor i = a0 + r) and column j, given s_ij / tau = sv; the
// probability rounded as `round_p` says (the 16-bit anchor gradient multiplies it in 16
// bits, as the CPU twin does; 0: fp32).
__device__ __forceinline__ float weight_of(const AnchorMeta& am, int r, int i, int j, int yj, int m, float sv,
                                           const InfoNceArgs& a, int round_p) {
    if (!am.valid[r] || j >= m) return 0.0f;
    const bool same = yj == am.y[r];
    return (in_denominator(am, r, i, j, yj, a) ? round_as(expf(sv - am.lse[r]), round_p) : 0.0f) -
           (same ? 0.0f : am.inv_npos[r]);
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
            ws[r * NCE_LD + lane] = weight_of(am, r, a0 + r, c0 + lane, yc[lane], m, s[u] * a.inv_tau, a, a.round);
        }
        // dz rows += W (32 x 32) times the column rows' embeddings (rounded in the 16-bit
        // modes, as the twin's GEMM reads them), 32 embedding elements at a time (lane =
        // element).
        for (int e0 = 0; e0 < c; e0 += 32) {
            __syncthreads();  // ws written / rc consumed
            load_z_chunk(rc, z, c0, e0, m, c, a.round);
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
            ws[r * NCE_LD + lane] = weight_of(am, r, a0 + r, j0 + lane, yc[lane], m, s[u] * a.inv_tau, a, 0);
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

// ---- bf16 / fp16: z rounded once, tiles in shared memory, every product on tensor cores --
// The launcher's default in the 16-bit modes (src/backend/cuda/infonce.rs `smem16`).
// infonce_round16_* first writes zr: z rounded to 16 bits, rows of ldh = c16 + 8 halves
// (c16 = c rounded up to 16, zeros from c on) and a multiple of 32 rows (zero rows past m).
// A tile of 32 rows of zr is then one contiguous, 16-byte aligned block, which the kernels
// copy to shared memory by cp.async: no registers, no bounds checks, half the bytes of
// fp32 z, no rounding in the loop. A block keeps its 32 anchor rows (za) for the whole walk
// and streams the column tiles through `nbuf` buffers (zc): with 2, the next tile's copy is
// in flight while the current one is multiplied. Fragments come by ldmatrix (mma.cuh); the
// + 8 halves a row put the 8 rows an ldmatrix reads at once in distinct banks. The anchor
// gradient's products run on tensor cores too:
//   W_ij = round16([j in D_i] exp(s_ij - lse_i)),  acc_i = sum_j W_ij round16(z_j)  (fp32)
//   dz_i = scale * ((acc_i - mu_i) / tau),  mu_i = mean of round16(z_p) over P_i (f64)
// with mu from per-class sums (infonce_class_sums_f32). The SIMT rows kernel computes the
// same in 16-bit modes (rounded p, rounded z) and the CPU twin does (cpu/infonce.rs).
// Accumulators: the 32 x c16 block of dz stays in registers for the whole column walk,
// warp w owning rows 16 (w & 1) .. + 16 and the NB 8-wide column blocks from (w >> 1) NB:
// 4 NB fp32 registers per thread, so one instantiation per NB (c16 <= 32 NB).
#define NCE16_PAD 8
#define NCE16_WLD (NCE_TILE + 8)  // row stride of the 16-bit W tile, in halves
#define NCE16_KQ 4                // the score tile's K range is split in quarters over warps

// zr [rows][ldh] = z [m][c] rounded to 16 bits, zeros past row m and from element c; rows a
// multiple of 32. One thread per 8 elements (one 16-byte store); grid-stride.
template <typename Tag>
__device__ void infonce_round16(unsigned short* zr, const float* z, int m, int c, int rows, int ldh) {
    const int q = ldh >> 3;  // 8-element groups a row
    const long long total = (long long)rows * q;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(idx / q), e = (int)(idx - (long long)r * q) * 8;
        float v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) v[u] = r < m && e + u < c ? z[(size_t)r * c + e + u] : 0.0f;
        st_vec<uint4>(zr + (size_t)r * ldh + e, make_uint4(pack2<Tag>(v[0], v[1]), pack2<Tag>(v[2], v[3]),
                                                           pack2<Tag>(v[4], v[5]), pack2<Tag>(v[6], v[7])));
    }
}
extern "C" __global__ void infonce_round16_bf16(unsigned short* zr, const float* z, int m, int c, int rows, int ldh) {
    infonce_round16<Bf16Tag>(zr, z, m, c, rows, ldh);
}
extern "C" __global__ void infonce_round16_f16(unsigned short* zr, const float* z, int m, int c, int rows, int ldh) {
    infonce_round16<F16Tag>(zr, z, m, c, rows, ldh);
}

// The 32 rows of zr from row r0 into dst [32][ldh], 16 bytes a copy (cp.async; the caller
// commits and waits).
__device__ __forceinline__ void copy_tile16(unsigned short* dst, const unsigned short* zr, int r0, int ldh) {
    const int n = NCE_TILE * ldh / 8;
    const unsigned short* src = zr + (size_t)r0 * ldh;
    for (int q = threadIdx.x; q < n; q += blockDim.x) cp_async16(dst + q * 8, src + (size_t)q * 8);
}

// st4[kq] [32][NCE_LD] = the part of za zc^T over K quarter kq (fp32 accumulation): warp w
// computes rows 16 (w & 1) .. + 16, all 32 columns (4 n-tiles), over the 16-wide k steps
// of quarter kq = w >> 1. Per k step one ldmatrix for the A fragment and two for the four
// n-tiles' B fragments feed 4 MMAs (the 16 x 8 block per warp before took 6 32-bit loads
// per MMA, over the whole K, and its shared-memory reads bounded the kernel).
template <typename Tag>
__device__ __forceinline__ void score_tile16(float* st4, const unsigned short* za, const unsigned short* zc, int c16,
                                             int ldh) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c2 = (lane & 3) * 2;
    const int i8 = lane >> 3, r8 = lane & 7;
    const int mr = (warp & 1) * 16, kq = warp >> 1;
    const int steps = c16 >> 4, per = (steps + NCE16_KQ - 1) / NCE16_KQ;
    const int k_lo = kq * per, k_hi = min(steps, k_lo + per);
    // this lane's row addresses: A matrices (row half, k half) (0,0) (1,0) (0,1) (1,1), the
    // order of a[]; B matrices (n-tile, k half) (0,0) (0,1) (1,0) (1,1): two n-tiles' b[]
    const unsigned short* pa = za + (mr + (i8 & 1) * 8 + r8) * ldh + (i8 >> 1) * 8;
    const unsigned short* pb = zc + ((i8 >> 1) * 8 + r8) * ldh + (i8 & 1) * 8;
    float acc[4][4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
    for (int ks = k_lo; ks < k_hi; ++ks) {
        const int k0 = ks * 16;
        unsigned a[4];
        ldmatrix_x4(a, pa + k0);
#pragma unroll
        for (int p = 0; p < 2; ++p) {
            unsigned x[4];
            ldmatrix_x4(x, pb + p * 16 * ldh + k0);
            const unsigned b0[2] = {x[0], x[1]}, b1[2] = {x[2], x[3]};
            mma_16816(acc[2 * p], a, b0, Tag());
            mma_16816(acc[2 * p + 1], a, b1, Tag());
        }
    }
    float* st = st4 + kq * NCE_TILE * NCE_LD;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
        st[(mr + g) * NCE_LD + nt * 8 + c2] = acc[nt][0];
        st[(mr + g) * NCE_LD + nt * 8 + c2 + 1] = acc[nt][1];
        st[(mr + g + 8) * NCE_LD + nt * 8 + c2] = acc[nt][2];
        st[(mr + g + 8) * NCE_LD + nt * 8 + c2 + 1] = acc[nt][3];
    }
}

// Tiles of the 16-bit kernels: the anchor rows za and the column tiles zc (nbuf buffers of
// [32][ldh]) from zr; the scores go through st4 to the SIMT layout of the walk.
template <typename Tag>
struct Smem16Tiles {
    unsigned short* za;
    unsigned short* zc;
    float* st4;
    const unsigned short* zr;
    int m, c16, ldh, nbuf;
    // The buffer column tile c0 goes to.
    __device__ __forceinline__ unsigned short* buf(int c0) const {
        return zc + (size_t)((c0 / NCE_TILE) % nbuf) * NCE_TILE * ldh;
    }
    // Before the walk: the anchor rows at a0 and, double-buffered, the first column tile, as
    // one group.
    __device__ __forceinline__ void start(int a0) {
        copy_tile16(za, zr, a0, ldh);
        if (nbuf == 2) copy_tile16(zc, zr, 0, ldh);
        cp_async_commit();
    }
    // s[u] += the scores of tile c0 (row 4w + u, column lane). The caller's barrier before
    // the call follows every read of the previous tile (its buffer, st4); the barrier after
    // the copy lands publishes what the caller wrote before the call (yc).
    __device__ __forceinline__ void scores(float s[NCE_RPW], int c0) {
        if (nbuf == 2) {
            if (c0 + NCE_TILE < m) copy_tile16(buf(c0 + NCE_TILE), zr, c0 + NCE_TILE, ldh);
            cp_async_commit();   // one group per tile, empty after the last
            cp_async_wait<1>();  // all but that newest group: tile c0 (and the anchors)
        } else {
            copy_tile16(zc, zr, c0, ldh);
            cp_async_commit();
            cp_async_wait<0>();
        }
        __syncthreads();
        score_tile16<Tag>(st4, za, buf(c0), c16, ldh);
        __syncthreads();
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const int plane = NCE_TILE * NCE_LD;
#pragma unroll
        for (int u = 0; u < NCE_RPW; ++u) {
            const int o = (warp * NCE_RPW + u) * NCE_LD + lane;
            s[u] += ((st4[o] + st4[plane + o]) + st4[2 * plane + o]) + st4[3 * plane + o];
        }
    }
};

// As infonce_fwd_f32, over zr (infonce_round16_*). Dynamic shared memory: (1 + nbuf) * 32 *
// ldh halves. Grid: ceil(m / 32) blocks of 256 threads.
template <typename Tag>
__device__ void infonce_fwd16(float* loss, float* lse, const unsigned short* zr, const int* labels, const int* npos,
                              const int* valid, const int* partner, int m, int c, int nbuf, InfoNceArgs a) {
    extern __shared__ __align__(16) float smem[];
    __shared__ float st4[NCE16_KQ * NCE_TILE * NCE_LD];
    __shared__ AnchorMeta am;
    __shared__ int yc[NCE_TILE];
    const int c16 = (c + 15) & ~15, ldh = c16 + NCE16_PAD;
    unsigned short* za = reinterpret_cast<unsigned short*>(smem);
    const int a0 = blockIdx.x * NCE_TILE;
    const int any = load_anchor_meta(am, labels, npos, valid, partner, nullptr, a0, m, a);
    Smem16Tiles<Tag> tiles{za, za + NCE_TILE * ldh, st4, zr, m, c16, ldh, nbuf};
    if (any) tiles.start(a0);
    infonce_fwd_walk(tiles, loss, lse, labels, npos, am, yc, any, a0, m, a);
}

// Entry points (explicit parameter lists: tests/cuda_build.rs reads them).
extern "C" __global__ void infonce_fwd16_bf16(float* loss, float* lse, const unsigned short* zr, const int* labels,
                                              const int* npos, const int* valid, const int* partner, int m, int c,
                                              int nbuf, InfoNceArgs a) {
    infonce_fwd16<Bf16Tag>(loss, lse, zr, labels, npos, valid, partner, m, c, nbuf, a);
}
extern "C" __global__ void infonce_fwd16_f16(float* loss, float* lse, const unsigned short* zr, const int* labels,
                                             const int* npos, const int* valid, const int* partner, int m, int c,
                                             int nbuf, InfoNceArgs a) {
    infonce_fwd16<F16Tag>(loss, lse, zr, labels, npos, valid, partner, m, c, nbuf, a);
}

// The class representatives (rows r with rep[r] = r) into list[0 .. *count), in any order
// (each one's sums below are its own): count zeroed by the launcher. One thread per row.
extern "C" __global__ void infonce_rep_list_f32(int* list, unsigned* count, const int* rep, int m) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < m && rep[r] == r) list[atomicAdd(count, 1u)] = r;
}

// The linear term's sums for the 16-bit anchor gradient, in f64: sums[r, e] = sum of
// round16(z_j)[e] over the rows j of class representative r (the *count rows of list;
// other rows are not written), and sums[m, e] = the same over every row.
// Grid (G, ceil(c / 32)), block (32, CS_GROUPS): block x computes the sums k = x, x + G, ...
// of k = 0 .. *count (k = *count: all rows), for the 32 elements of column block y; thread
// (e', g) sums the chunks g, g + CS_GROUPS, ... of CS_CHUNK rows in row order, and the
// groups' sums are added in group order: a fixed order, the same bits on every run (the
// CPU adds rows in plain order: the last f64 bits may differ). A chunk's members are picked
// into shared memory first, then its loads issued together. (One block per representative
// and 128 columns, each thread walking every row: m / 32 dependent round trips, about a
// millisecond at m 24,000, and m + 1 blocks a column block, almost all returning at once.)
#define CS_CHUNK 32
#define CS_GROUPS 8
extern "C" __global__ void infonce_class_sums_f32(double* sums, const float* z, const int* rep, const int* list,
                                                  const unsigned* count, int m, int c, InfoNceArgs a) {
    __shared__ int rows[CS_GROUPS][CS_CHUNK];
    __shared__ double part[CS_GROUPS][32];
    const int x = threadIdx.x, g = threadIdx.y, e = blockIdx.y * 32 + x;
    const int n = (int)*count;
    for (int k = blockIdx.x; k <= n; k += gridDim.x) {  // block-uniform
        const int r = k < n ? list[k] : m;
        double s = 0.0;
        for (int base = 0; base < m; base += CS_GROUPS * CS_CHUNK) {
            const int j = base + g * CS_CHUNK + x;
            __syncthreads();  // the previous chunk's rows are read
            rows[g][x] = j < m && (r == m || rep[j] == r) ? j : -1;
            __syncthreads();
            if (e < c) {
                float v[CS_CHUNK];
#pragma unroll
                for (int u = 0; u < CS_CHUNK; ++u) v[u] = rows[g][u] >= 0 ? z[(size_t)rows[g][u] * c + e] : 0.0f;
#pragma unroll
                for (int u = 0; u < CS_CHUNK; ++u)
                    if (rows[g][u] >= 0) s += (double)round_as(v[u], a.round);
            }
        }
        part[g][x] = s;
        __syncthreads();
        if (g == 0 && e < c) {
            double t = 0.0;
#pragma unroll
            for (int q = 0; q < CS_GROUPS; ++q) t += part[q][x];
            sums[(size_t)r * c + e] = t;
        }
        __syncthreads();  // part is read before the next k writes it
    }
}

// Anchor rows of the 16-bit backward: dz_i = scale * ((acc_i - mu_i) / tau) on valid
// anchors (other rows are left as the launcher zeroed them). zr: infonce_round16_*; sums:
// infonce_class_sums_f32. Dynamic shared memory: (1 + nbuf) * 32 * ldh halves. Grid:
// ceil(m / 32) blocks of 256 threads.
template <typename Tag, int NB>
__device__ void infonce_bwd_rows16(float* dz, const double* sums, const unsigned short* zr, const float* lse,
                                   const int* labels, const int* npos, const int* valid, const int* partner,
                                   const int* rep, int m, int c, int nbuf, InfoNceArgs a) {
    static_assert(NB % 2 == 0, "n-tiles in pairs, one ldmatrix each");
    extern __shared__ __align__(16) float smem[];
    __shared__ float st4[NCE16_KQ * NCE_TILE * NCE_LD];
    __shared__ __align__(16) unsigned short ws[NCE_TILE * NCE16_WLD];
    __shared__ AnchorMeta am;
    __shared__ int yc[NCE_TILE];
    const int c16 = (c + 15) & ~15, ldh = c16 + NCE16_PAD;
    unsigned short* za = reinterpret_cast<unsigned short*>(smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c2 = (lane & 3) * 2;
    const int i8 = lane >> 3, r8 = lane & 7;
    const int a0 = blockIdx.x * NCE_TILE;
    if (!load_anchor_meta(am, labels, npos, valid, partner, lse, a0, m, a)) return;  // block-uniform
    Smem16Tiles<Tag> tiles{za, za + NCE_TILE * ldh, st4, zr, m, c16, ldh, nbuf};
    tiles.start(a0);
    const int mb = (warp & 1) * 16, nb0 = (warp >> 1) * NB;
    float acc[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.0f;
    // this lane's ldmatrix row in the W tile: A matrices (row half, k half) as a[]
    const unsigned short* pw = ws + (mb + (i8 & 1) * 8 + r8) * NCE16_WLD + (i8 >> 1) * 8;
    for (int c0 = 0; c0 < m; c0 += NCE_TILE) {
        __syncthreads();  // yc, ws and the buffers of earlier tiles are consumed
        if (threadIdx.x < NCE_TILE) yc[threadIdx.x] = c0 + (int)threadIdx.x < m ? labels[c0 + threadIdx.x] : 0;
        float s[NCE_RPW] = {0.0f, 0.0f, 0.0f, 0.0f};
        tiles.scores(s, c0);
#pragma unroll
        for (int u = 0; u < NCE_RPW; ++u) {
            const int r = warp * NCE_RPW + u, i = a0 + r, j = c0 + lane;
            const bool in_d = am.valid[r] && j < m && in_denominator(am, r, i, j, yc[lane], a);
            ws[r * NCE16_WLD + lane] = to_bits(in_d ? expf(s[u] * a.inv_tau - am.lse[r]) : 0.0f, Tag());
        }
        __syncthreads();
        // acc += W [16 rows of this warp, 32 columns] zc [32, this warp's elements]: B from
        // zc stored [k = column row][n = element], transposed by ldmatrix: matrices (k half,
        // n-tile) (0,0) (1,0) (0,1) (1,1), two n-tiles' b[] (16 16-bit loads a pair before)
        const unsigned short* zk = tiles.buf(c0) + ((i8 & 1) * 8 + r8) * ldh + (i8 >> 1) * 8;
#pragma unroll
        for (int k0 = 0; k0 < NCE_TILE; k0 += 16) {
            unsigned wa[4];
            ldmatrix_x4(wa, pw + k0);
#pragma unroll
            for (int nb = 0; nb < NB; nb += 2) {
                const int e0 = (nb0 + nb) * 8;
                if (e0 >= c16) break;  // warp-uniform; c16 and e0 are multiples of 16
                unsigned x[4];
                ldmatrix_x4_trans(x, zk + k0 * ldh + e0);
                const unsigned b0[2] = {x[0], x[1]}, b1[2] = {x[2], x[3]};
                mma_16816(acc[nb], wa, b0, Tag());
                mma_16816(acc[nb + 1], wa, b1, Tag());
            }
        }
    }
    // Epilogue: rows mb + g and mb + g + 8, elements (nb0 + nb) 8 + c2 + {0, 1}.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = mb + g + half * 8, i = a0 + r;
        if (!am.valid[r]) continue;
        const double* total = sums + (size_t)m * c;
        const double* own = sums + (size_t)rep[i] * c;
        const double inv_np = 1.0 / (double)npos[i];
        // 4 blocks' sums loaded before their stores (one store between loads made each
        // pair of loads a round trip: 2 NB of them per row)
        static_assert(NB % 4 == 0, "blocks of 4 in the epilogue");
#pragma unroll
        for (int nb4 = 0; nb4 < NB; nb4 += 4) {
            double tot[4][2], cls[4][2];
#pragma unroll
            for (int v = 0; v < 4; ++v)
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    const int e = (nb0 + nb4 + v) * 8 + c2 + q;
                    tot[v][q] = e < c ? total[e] : 0.0;
                    cls[v][q] = e < c ? own[e] : 0.0;
                }
#pragma unroll
            for (int v = 0; v < 4; ++v)
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    const int e = (nb0 + nb4 + v) * 8 + c2 + q;
                    if (e >= c) continue;
                    const double mu = (tot[v][q] - cls[v][q]) * inv_np;
                    dz[(size_t)i * c + e] =
                        a.scale * (float)(((double)acc[nb4 + v][half * 2 + q] - mu) * (double)a.inv_tau);
                }
        }
    }
}

// Entry points, one per type and accumulator size (explicit parameter lists:
// tests/cuda_build.rs reads them).
#define NCE_ROWS16_CALL dz, sums, zr, lse, labels, npos, valid, partner, rep, m, c, nbuf, a
extern "C" __global__ void infonce_bwd_rows16_bf16_nb12(float* dz, const double* sums, const unsigned short* zr,
                                                         const float* lse, const int* labels, const int* npos,
                                                         const int* valid, const int* partner, const int* rep, int m,
                                                         int c, int nbuf, InfoNceArgs a) {
    infonce_bwd_rows16<Bf16Tag, 12>(NCE_ROWS16_CALL);
}
extern "C" __global__ void infonce_bwd_rows16_bf16_nb24(float* dz, const double* sums, const unsigned short* zr,
                                                         const float* lse, const int* labels, const int* npos,
                                                         const int* valid, const int* partner, const int* rep, int m,
                                                         int c, int nbuf, InfoNceArgs a) {
    infonce_bwd_rows16<Bf16Tag, 24>(NCE_ROWS16_CALL);
}
extern "C" __global__ void infonce_bwd_rows16_bf16_nb32(float* dz, const double* sums, const unsigned short* zr,
                                                         const float* lse, const int* labels, const int* npos,
                                                         const int* valid, const int* partner, const int* rep, int m,
                                                         int c, int nbuf, InfoNceArgs a) {
    infonce_bwd_rows16<Bf16Tag, 32>(NCE_ROWS16_CALL);
}
extern "C" __global__ void infonce_bwd_rows16_f16_nb12(float* dz, const double* sums, const unsigned short* zr,
                                                         const float* lse, const int* labels, const int* npos,
                                                         const int* valid, const int* partner, const int* rep, int m,
                                                         int c, int nbuf, InfoNceArgs a) {
    infonce_bwd_rows16<F16Tag, 12>(NCE_ROWS16_CALL);
}
extern "C" __global__ void infonce_bwd_rows16_f16_nb24(float* dz, const double* sums, const unsigned short* zr,
                                                         const float* lse, const int* labels, const int* npos,
                                                         const int* valid, const int* partner, const int* rep, int m,
                                                         int c, int nbuf, InfoNceArgs a) {
    infonce_bwd_rows16<F16Tag, 24>(NCE_ROWS16_CALL);
}
extern "C" __global__ void infonce_bwd_rows16_f16_nb32(float* dz, const double* sums, const unsigned short* zr,
                                                         const float* lse, const int* labels, const int* npos,
                                                         const int* valid, const int* partner, const int* rep, int m,
                                                         int c, int nbuf, InfoNceArgs a) {
    infonce_bwd_rows16<F16Tag, 32>(NCE_ROWS16_CALL);
}
