// Tensor-core attention for the bf16 and fp16 modes (SPEC section 7: 16-bit matmul inputs,
// fp32 accumulation, fp32 softmax and logsumexp). Same contract, packed (varlen) layout,
// dropout counters and work split into three kernels as kernels/attention.cu (the fp32 SIMT kernels), but
// every product runs on mma.sync m16n8k16 (kernels/mma.cuh). CPU twin:
// src/backend/cpu/attention.rs with `inputs` bf16 / fp16, which rounds at the same places:
//
// Forward, per query row i, in log2 units (x = s * log2(e), s = q_i . k_j / sqrt(d)):
//   M = ceil(max_j x_j),  p_j = 2^(x_j - M),  l = sum_j p_j (fp32),
//   out_i = (sum_j round(p_j f_j) v_j) / l,  lse_i = (M + log2 l) ln 2,
// where round() is to the 16-bit type and f the dropout factors. Because M is an integer,
// the online softmax's rescaling of earlier tiles (by 2^(M_old - M_new)) is exact and
// commutes with the rounding: the rounded probabilities, and so the result, do not depend
// on how the keys are tiled (up to fp32 summation order).
// Backward, with p_ij = 2^(x_ij - lse_i log2(e)) and D_i = dO_i . O_i (fp32):
//   dV_j = sum_i round(p_ij f_ij) dO_i,  dS_ij = round(p_ij (dO_i . V_j f_ij - D_i) / sqrt(d)),
//   dQ_i = sum_j dS_ij K_j,  dK_j = sum_i dS_ij Q_i,  D_i = round(dO_i) . round(O_i).
// q, k, v and dO are rounded to 16 bits as they are read, and out, dq, dk, dv are written
// rounded: the products that read them next need them rounded, and a separate rounding
// pass over each would cost a read and a write. `io` says how those eight buffers are
// stored: 1, in 16 bits of the kernel's type (the engine's bf16 / fp16 modes: the loads
// are the bits themselves, half the traffic), or 0, as fp32 holding 16-bit values.
//
// Work split: blocks of AM_WARPS warps; each warp owns 16 rows (query rows for forward and
// dq, key rows for dk/dv) whose A fragments stay in registers, and the block streams tiles
// of AM_TILE keys (or queries) through shared memory. The head dim is padded with zeros to
// DP (32, 64 or 128; one instantiation each). Every output row is written by one warp in a
// fixed order: deterministic, no atomics.
#include "common.cuh"
#include "mma.cuh"

#define AM_WARPS 4
#define AM_ROWS (16 * AM_WARPS)
#define AM_TILE 32
#define AM_LOG2E 1.4426950408889634f
#define AM_LN2 0.6931471805599453f

// Element 0 of head hi of token s0 + i (packed layout, kernels/attention.cu).
__device__ __forceinline__ size_t am_off(int s0, int i, int hi, int h, int d) {
    return ((size_t)(s0 + i) * h + hi) * d;
}
// Philox's four words of counter group `group`. Not inlined: the fully unrolled tile loops
// would otherwise carry a copy of Philox per call site (megabytes of SASS).
__device__ __noinline__ uint4 am_words(const DropoutArgs& drop, unsigned long long group) {
    return dropout_words(drop, group);
}
// Counter group of probabilities (i, j4 .. j4 + 3) of head (bi, hi), j4 a multiple of 4
// (kernels/attention.cu prob_index: rows of counter_stride(t), a multiple of 4, counters).
__device__ __forceinline__ unsigned long long am_group(int bi, int hi, int i, int j4, int t, int h) {
    const unsigned long long tp = (unsigned long long)((t + 3) & ~3);
    return ((((unsigned long long)(bi * h + hi) * tp + i) * tp) + j4) >> 2;
}

// The factors f[half][c] of this lane's fragment elements in the forward and dQ kernels:
// query row row0 + g + 8 half, key column j + c (j = j0 + nt * 8 + c2, even). The lanes q
// and q ^ 1 of a quad need the same two counter groups (keys j & ~3 .. + 3 of both rows):
// each draws one (the even lane row g's, the odd lane row g + 8's) and they trade the two
// words the other needs: one Philox call per lane per n-tile (a call per pair of elements
// before).
__device__ __forceinline__ void am_factors_q(const DropoutArgs& drop, int bi, int hi, int row0, int j, int t, int h,
                                             float (&f)[2][2]) {
    const int lane = threadIdx.x & 31, g = lane >> 2;
    const bool odd = lane & 1;
    const uint4 w = am_words(drop, am_group(bi, hi, row0 + g + (odd ? 8 : 0), j & ~3, t, h));
    const unsigned r0 = __shfl_xor_sync(FULL_MASK, odd ? w.x : w.z, 1);
    const unsigned r1 = __shfl_xor_sync(FULL_MASK, odd ? w.y : w.w, 1);
    // even lane: keys j, j + 1 are words 0, 1 (its own row g; row g + 8's from the odd
    // lane); odd lane: words 2, 3 (row g's from the even lane; its own row g + 8)
    f[0][0] = factor_of_word(drop, odd ? r0 : w.x);
    f[0][1] = factor_of_word(drop, odd ? r1 : w.y);
    f[1][0] = factor_of_word(drop, odd ? w.z : r0);
    f[1][1] = factor_of_word(drop, odd ? w.w : r1);
}

// The factors f[nt][half][c] of this lane's fragment elements in the dK / dV kernel: key
// row row0 + g + 8 half, query i0 + nt * 8 + c2 + c. Here a counter group runs over four
// key rows, held by the lanes k = g % 4 = 0..3 of the same (g / 4, c2). Lane k draws the
// four groups of its own nt = k and, in four rounds u, takes from lane (k + u) % 4 its
// word k of that lane's groups (the rotation lets every lane send one value per shuffle):
// four Philox calls per lane per tile (sixteen before).
__device__ __forceinline__ void am_factors_k(const DropoutArgs& drop, int bi, int hi, int row0, int i0, int t, int h,
                                             float (&f)[AM_TILE / 8][2][2]) {
    static_assert(AM_TILE / 8 == 4, "one n-tile per lane of a group of four key rows");
    const int lane = threadIdx.x & 31, g = lane >> 2, c2 = (lane & 3) * 2, k = g & 3;
    uint4 w[2][2];
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int c = 0; c < 2; ++c)
            w[half][c] = am_words(drop, am_group(bi, hi, i0 + k * 8 + c2 + c, row0 + 8 * half + (g & ~3), t, h));
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const int from = (k + u) & 3, src = (lane & ~12) | (from << 2);
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const unsigned got = __shfl_sync(FULL_MASK, word_at(w[half][c], (k - u) & 3), src);
                const float fac = factor_of_word(drop, got);
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) f[nt][half][c] = nt == from ? fac : f[nt][half][c];
            }
    }
}

// Element i of an activation buffer as 16-bit bits of Tag's type, and as the fp32 value of
// those bits: stored in 16 bits (io) it is read as is, stored as fp32 it is rounded.
template <typename Tag>
__device__ __forceinline__ unsigned short am_bits(const void* x, bool io, size_t i) {
    return io ? ((const unsigned short*)x)[i] : to_bits(((const float*)x)[i], Tag());
}
template <typename Tag>
__device__ __forceinline__ float am_val(const void* x, bool io, size_t i) {
    return io ? ld(x, ((int)Tag::CODE), i) : round16(((const float*)x)[i], Tag());
}

// Rows r0 .. r0 + AM_TILE of head hi of the sequence at token s0 (length len) of x, rounded
// to 16 bits, into dst (zeros past row len and column d): one 16-bit load per element, the
// path for fp32 storage and head dims below DP (am_copy_tile below is the engine's).
template <typename Tag, int DP>
__device__ __forceinline__ void am_load_tile(unsigned short (*dst)[DP + 8], const void* x, int s0, int hi, int r0,
                                             int len, int h, int d, bool io) {
    for (int idx = threadIdx.x; idx < AM_TILE * DP; idx += blockDim.x) {
        const int rr = idx / DP, e = idx - rr * DP, r = r0 + rr;
        dst[rr][e] = r < len && e < d ? am_bits<Tag>(x, io, am_off(s0, r, hi, h, d) + e) : (unsigned short)0;
    }
}

// The same tile in 16-byte pieces (8 values) by cp.async, AM_VECS(DP) per thread, for 16-bit
// storage with d == DP and 16-byte aligned buffers (am_vec_ok); rows past len are zeroed by
// plain stores. No registers hold the tile on its way, so the kernels keep the next tile's
// copy in flight while they compute on the current one at every head size (registers held
// it before, and not at d 128, whose kernels were at the register limit). (A loop of 2-byte
// loads, each waited for in turn, made the forward 0.20 ms on an H200 at the roberta-base
// step's shapes, 2% of the GEMM rate.)
#define AM_THREADS (AM_WARPS * 32)
#define AM_VECS(DP) (AM_TILE * (DP) / 8 / AM_THREADS)
template <int DP>
__device__ __forceinline__ bool am_vec_ok(bool io, int d, const void* a, const void* b) {
    return io && d == DP && (((size_t)a | (size_t)b) & 15) == 0;
}
template <int DP>
__device__ __forceinline__ void am_copy_tile(unsigned short (*dst)[DP + 8], const void* x, int s0, int hi, int r0,
                                             int len, int h) {
    static_assert(AM_TILE * DP / 8 % AM_THREADS == 0, "whole 16-byte pieces per thread");
#pragma unroll
    for (int u = 0; u < AM_VECS(DP); ++u) {
        const int idx = threadIdx.x + u * AM_THREADS, rr = idx / (DP / 8), e = (idx % (DP / 8)) * 8;
        const int row = r0 + rr;
        if (row < len)  // rows are DP + 8 halves: 16-byte aligned
            cp_async16(&dst[rr][e], static_cast<const unsigned short*>(x) + am_off(s0, row, hi, h, DP) + e);
        else
            st_vec<uint4>(&dst[rr][e], make_uint4(0u, 0u, 0u, 0u));
    }
}

// The tiles of AM_TILE rows of x and y (K and V, or Q and dO) a kernel walks, through two
// shared-memory buffers each: the copy of the next tile is issued when the current one is
// asked for (cp.async), or, without the 16-byte path, the tile is loaded into buffer 0 by
// element loads when asked for.
template <typename Tag, int DP>
struct AmTiles {
    unsigned short (*xs)[AM_TILE][DP + 8];  // [2]
    unsigned short (*ys)[AM_TILE][DP + 8];
    const void *x, *y;
    bool vec;
    int s0, hi, len, h, d;
    bool io;
    // Before the walk: the first tiles' copy.
    __device__ __forceinline__ void start() {
        if (!vec) return;
        am_copy_tile<DP>(xs[0], x, s0, hi, 0, len, h);
        am_copy_tile<DP>(ys[0], y, s0, hi, 0, len, h);
        cp_async_commit();
    }
    // The buffer that holds the tiles at row r0 once the caller's next barrier has passed.
    // Called right after a barrier that follows every read of the previous tiles.
    __device__ __forceinline__ int next(int r0) {
        if (!vec) {
            am_load_tile<Tag, DP>(xs[0], x, s0, hi, r0, len, h, d, io);
            am_load_tile<Tag, DP>(ys[0], y, s0, hi, r0, len, h, d, io);
            return 0;
        }
        const int b = (r0 / AM_TILE) & 1;
        if (r0 + AM_TILE < len) {  // into the other buffer, whose tiles were read before the barrier
            am_copy_tile<DP>(xs[b ^ 1], x, s0, hi, r0 + AM_TILE, len, h);
            am_copy_tile<DP>(ys[b ^ 1], y, s0, hi, r0 + AM_TILE, len, h);
        }
        cp_async_commit();   // one group per tile, empty after the last
        cp_async_wait<1>();  // all but that newest group: this tile's copies have landed
        return b;
    }
};

// The A fragments of this warp's 16 rows (row0 ..) of head hi of the sequence at token s0
// (length len) of x over the padded head dim: a[kk] covers columns 16 kk .. 16 kk + 15.
// With 16-bit storage and d == DP (the engine's case) each register is one 4-byte load and
// all DP / 4 of them are issued together; the general path below guards every element and
// joins 2-byte loads, which the compiler turned into a branch and a round trip per pair (32
// round trips before the first MMA of the dQ kernel, which loads two operands).
template <typename Tag, int DP>
__device__ __forceinline__ void am_load_a(unsigned (&a)[DP / 16][4], const void* x, int s0, int hi, int row0,
                                          int len, int h, int d, bool io) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c2 = (lane & 3) * 2;
    if (io && d == DP && ((size_t)x & 3) == 0) {
        const unsigned short* xs = static_cast<const unsigned short*>(x);
        const bool ok[2] = {row0 + g < len, row0 + g + 8 < len};
        // rows past the sequence point at its first row (never loaded): no pointer past it
        const unsigned short* rp[2] = {xs + am_off(s0, ok[0] ? row0 + g : 0, hi, h, DP) + c2,
                                       xs + am_off(s0, ok[1] ? row0 + g + 8 : 0, hi, h, DP) + c2};
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r)
                a[kk][r] = ok[r & 1] ? ld_vec<unsigned>(rp[r & 1] + kk * 16 + (r >> 1) * 8) : 0u;
        return;
    }
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = row0 + g + (r & 1) * 8, col = kk * 16 + c2 + (r >> 1) * 8;
            unsigned short lo = 0, hi2 = 0;
            if (row < len) {
                const size_t o = am_off(s0, row, hi, h, d);
                if (col < d) lo = am_bits<Tag>(x, io, o + col);
                if (col + 1 < d) hi2 = am_bits<Tag>(x, io, o + col + 1);
            }
            a[kk][r] = join2(lo, hi2);
        }
}

// B fragments of n-tiles n0 .. n0 + 7 and n0 + 8 .. n0 + 15 (b[0], b[1]) over k rows k0 ..
// k0 + 15 of the product's right operand, one ldmatrix each (mma.cuh). From a tile stored
// [n][k] (the operand transposed: K for Q K^T), the four 8 x 8 matrices are (n-tile, k
// half) in the order (0, 0), (0, 1), (1, 0), (1, 1); from a tile stored [k][n] (V for P V),
// transposed on the way, (k half, n-tile) in the order (0, 0), (1, 0), (0, 1), (1, 1).
// Rows are DP + 8 halves (a multiple of 16 bytes) and the tiles 16-byte aligned, so every
// row address is. (Per lane, 2 instructions for what took 4 32-bit loads from [n][k] and
// 16 16-bit loads from [k][n].)
template <int DP>
__device__ __forceinline__ void am_b2_nk(unsigned (&b)[2][2], const unsigned short (*tile)[DP + 8], int n0, int k0) {
    const int lane = threadIdx.x & 31, i = lane >> 3, r = lane & 7;
    unsigned x[4];
    ldmatrix_x4(x, &tile[n0 + (i >> 1) * 8 + r][k0 + (i & 1) * 8]);
    b[0][0] = x[0];
    b[0][1] = x[1];
    b[1][0] = x[2];
    b[1][1] = x[3];
}
template <int DP>
__device__ __forceinline__ void am_b2_kn(unsigned (&b)[2][2], const unsigned short (*tile)[DP + 8], int n0, int k0) {
    const int lane = threadIdx.x & 31, i = lane >> 3, r = lane & 7;
    unsigned x[4];
    ldmatrix_x4_trans(x, &tile[k0 + (i & 1) * 8 + r][n0 + (i >> 1) * 8]);
    b[0][0] = x[0];
    b[0][1] = x[1];
    b[1][0] = x[2];
    b[1][1] = x[3];
}

// The A fragments of a 16 x AM_TILE product held as C fragments (n-tiles of 8 columns).
template <typename Tag>
__device__ __forceinline__ void am_c_to_a(unsigned (&a)[AM_TILE / 16][4], const float (&c)[AM_TILE / 8][4]) {
#pragma unroll
    for (int kk = 0; kk < AM_TILE / 16; ++kk) {
        a[kk][0] = pack2<Tag>(c[2 * kk][0], c[2 * kk][1]);
        a[kk][1] = pack2<Tag>(c[2 * kk][2], c[2 * kk][3]);
        a[kk][2] = pack2<Tag>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        a[kk][3] = pack2<Tag>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
}

// acc[16 x AM_TILE] = A[16 x DP] (registers) times the tile [AM_TILE][DP] transposed.
template <typename Tag, int DP>
__device__ __forceinline__ void am_rows_times_tile_t(float (&acc)[AM_TILE / 8][4], const unsigned (&a)[DP / 16][4],
                                                     const unsigned short (*tile)[DP + 8]) {
#pragma unroll
    for (int nt = 0; nt < AM_TILE / 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[nt][r] = 0.0f;
#pragma unroll
    for (int nt = 0; nt < AM_TILE / 8; nt += 2)
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) {
            unsigned b[2][2];
            am_b2_nk<DP>(b, tile, nt * 8, kk * 16);
            mma_16816(acc[nt], a[kk], b[0], Tag());
            mma_16816(acc[nt + 1], a[kk], b[1], Tag());
        }
}

// acc[16 x DP] += A[16 x AM_TILE] (registers) times the tile [AM_TILE][DP].
template <typename Tag, int DP>
__device__ __forceinline__ void am_acc_times_tile(float (&acc)[DP / 8][4], const unsigned (&a)[AM_TILE / 16][4],
                                                  const unsigned short (*tile)[DP + 8]) {
#pragma unroll
    for (int nd = 0; nd < DP / 8; nd += 2)
#pragma unroll
        for (int kk = 0; kk < AM_TILE / 16; ++kk) {
            unsigned b[2][2];
            am_b2_kn<DP>(b, tile, nd * 8, kk * 16);
            mma_16816(acc[nd], a[kk], b[0], Tag());
            mma_16816(acc[nd + 1], a[kk], b[1], Tag());
        }
}

// Quad (the 4 lanes that share fragment rows) reductions.
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(FULL_MASK, x, 1);
    return x + __shfl_xor_sync(FULL_MASK, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, 1));
    return fmaxf(x, __shfl_xor_sync(FULL_MASK, x, 2));
}

// Writes this warp's 16 x DP accumulator rows row0 .. (times mul[half]), rounded to 16
// bits, to head hi of the sequence at token s0 of y, rows < len and columns < d.
template <typename Tag, int DP>
__device__ __forceinline__ void am_store(void* y, const float (&acc)[DP / 8][4], const float (&mul)[2], int s0,
                                         int hi, int row0, int len, int h, int d, bool io) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c2 = (lane & 3) * 2;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + g + 8 * half;
        if (row >= len) continue;
        const size_t o = am_off(s0, row, hi, h, d);
#pragma unroll
        for (int nd = 0; nd < DP / 8; ++nd)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int e = nd * 8 + c2 + c;
                if (e >= d) continue;
                const float x = acc[nd][half * 2 + c] * mul[half];
                if (io)
                    ((unsigned short*)y)[o + e] = to_bits(x, Tag());
                else
                    ((float*)y)[o + e] = round16(x, Tag());
            }
    }
}

// Grid (ceil(t / AM_ROWS), h, b), block AM_WARPS * 32 threads, static shared memory.
template <typename Tag, int DP>
__device__ void attention_fwd_mma(void* out, float* lse, const void* q, const void* k, const void* v,
                                  const int* seqs, int b, int t, int h, int d, DropoutArgs drop, int io) {
    __shared__ __align__(16) unsigned short ks2[2][AM_TILE][DP + 8];
    __shared__ __align__(16) unsigned short vs2[2][AM_TILE][DP + 8];
    __shared__ float mk[AM_TILE];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c2 = (lane & 3) * 2;
    const int hi = blockIdx.y, bi = blockIdx.z;
    const int s0 = seqs[bi], len = seqs[bi + 1] - s0;
    if ((int)blockIdx.x * AM_ROWS >= len) return;  // block-uniform: no row of this sequence
    const int row0 = blockIdx.x * AM_ROWS + warp * 16;
    const float scale = 1.0f / sqrtf((float)d);
    const bool dropping = drop.p > 0.0f;
    unsigned qa[DP / 16][4];
    am_load_a<Tag, DP>(qa, q, s0, hi, row0, len, h, d, io);
    float acc[DP / 8][4];
#pragma unroll
    for (int nd = 0; nd < DP / 8; ++nd)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[nd][r] = 0.0f;
    // Per fragment row (g, g + 8): M, the integer exponent offset so far, and this lane's
    // part of the row sum l (relative to 2^M).
    float big[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    AmTiles<Tag, DP> tiles{ks2, vs2, k, v, am_vec_ok<DP>(io, d, k, v), s0, hi, len, h, d, (bool)io};
    tiles.start();

    for (int j0 = 0; j0 < len; j0 += AM_TILE) {
        __syncthreads();  // the previous tile is consumed
        const int buf = tiles.next(j0);
        const unsigned short(*ks)[DP + 8] = ks2[buf];
        const unsigned short(*vs)[DP + 8] = vs2[buf];
        if (threadIdx.x < AM_TILE) {
            const int j = j0 + threadIdx.x;
            mk[threadIdx.x] = j < len ? 1.0f : 0.0f;
        }
        __syncthreads();
        if (row0 >= len) continue;  // warp-uniform: no row of the sequence
        float s[AM_TILE / 8][4];
        am_rows_times_tile_t<Tag, DP>(s, qa, ks);
        float tmax[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nt = 0; nt < AM_TILE / 8; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const float x = mk[nt * 8 + c2 + (r & 1)] > 0.5f ? s[nt][r] * scale * AM_LOG2E : NEG_INF;
                s[nt][r] = x;
                tmax[r >> 1] = fmaxf(tmax[r >> 1], x);
            }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const float nb = ceilf(quad_max(tmax[half]));
            if (nb > big[half]) {  // false for a tile with no key of the sequence (nb = -inf)
                if (big[half] != NEG_INF) {
                    const float f = ldexpf(1.0f, (int)(big[half] - nb));  // exact
                    l[half] *= f;
#pragma unroll
                    for (int nd = 0; nd < DP / 8; ++nd) {
                        acc[nd][half * 2] *= f;
                        acc[nd][half * 2 + 1] *= f;
                    }
                }
                big[half] = nb;
            }
        }
#pragma unroll
        for (int nt = 0; nt < AM_TILE / 8; ++nt) {
            float f[2][2] = {{1.0f, 1.0f}, {1.0f, 1.0f}};
            if (dropping) am_factors_q(drop, bi, hi, row0, j0 + nt * 8 + c2, t, h, f);
#pragma unroll
            for (int half = 0; half < 2; ++half)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const float x = s[nt][half * 2 + c];
                    const float p = x == NEG_INF ? 0.0f : exp2f(x - big[half]);
                    l[half] += p;
                    s[nt][half * 2 + c] = p * f[half][c];
                }
        }
        unsigned pa[AM_TILE / 16][4];
        am_c_to_a<Tag>(pa, s);
        am_acc_times_tile<Tag, DP>(acc, pa, vs);
    }
    if (row0 >= len) return;
    float inv[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        l[half] = quad_sum(l[half]);
        inv[half] = l[half] > 0.0f ? 1.0f / l[half] : 0.0f;
        const int row = row0 + g + 8 * half;
        if ((lane & 3) == 0 && row < len)
            lse[(size_t)(s0 + row) * h + hi] = l[half] > 0.0f ? (big[half] + log2f(l[half])) * AM_LN2 : NEG_INF;
    }
    am_store<Tag, DP>(out, acc, inv, s0, hi, row0, len, h, d, io);
}

// Backward, part 1: dQ (overwritten) and D = rowsum(dO * O) [n, h] for part 2.
// Grid and block as the forward kernel.
template <typename Tag, int DP>
__device__ void attention_bwd_dq_mma(void* dq, float* dvec, const void* dout, const void* q, const void* k,
                                     const void* v, const void* out, const float* lse, const int* seqs, int b,
                                     int t, int h, int d, DropoutArgs drop, int io) {
    __shared__ __align__(16) unsigned short ks2[2][AM_TILE][DP + 8];
    __shared__ __align__(16) unsigned short vs2[2][AM_TILE][DP + 8];
    __shared__ float mk[AM_TILE];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c2 = (lane & 3) * 2;
    const int hi = blockIdx.y, bi = blockIdx.z;
    const int s0 = seqs[bi], len = seqs[bi + 1] - s0;
    if ((int)blockIdx.x * AM_ROWS >= len) return;  // block-uniform: no row of this sequence
    const int row0 = blockIdx.x * AM_ROWS + warp * 16;
    const float scale = 1.0f / sqrtf((float)d);
    const bool dropping = drop.p > 0.0f;
    unsigned qa[DP / 16][4], ga[DP / 16][4];
    am_load_a<Tag, DP>(qa, q, s0, hi, row0, len, h, d, io);
    am_load_a<Tag, DP>(ga, dout, s0, hi, row0, len, h, d, io);
    float dd[2], ls2[2];  // D and lse * log2(e) of rows g and g + 8
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + g + 8 * half;
        float part = 0.0f;
        if (row < len && io && d == DP) {
            // the same sum, its loads issued before the first product (a round trip each before)
            const unsigned short *go = (const unsigned short*)dout + am_off(s0, row, hi, h, DP) + (lane & 3),
                                 *oo = (const unsigned short*)out + am_off(s0, row, hi, h, DP) + (lane & 3);
            unsigned short gv[DP / 4], ov[DP / 4];
#pragma unroll
            for (int u = 0; u < DP / 4; ++u) {
                gv[u] = go[4 * u];
                ov[u] = oo[4 * u];
            }
#pragma unroll
            for (int u = 0; u < DP / 4; ++u)
                part += half_bits_to_f32(gv[u], Tag::CODE) * half_bits_to_f32(ov[u], Tag::CODE);
        } else if (row < len) {
            const size_t o = am_off(s0, row, hi, h, d);
            for (int e = lane & 3; e < d; e += 4) part += am_val<Tag>(dout, io, o + e) * am_val<Tag>(out, io, o + e);
        }
        dd[half] = quad_sum(part);
        const size_t r = (size_t)(s0 + row) * h + hi;
        ls2[half] = row < len ? lse[r] * AM_LOG2E : NEG_INF;
        if ((lane & 3) == 0 && row < len) dvec[r] = dd[half];
    }
    float acc[DP / 8][4];
#pragma unroll
    for (int nd = 0; nd < DP / 8; ++nd)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[nd][r] = 0.0f;

    AmTiles<Tag, DP> tiles{ks2, vs2, k, v, am_vec_ok<DP>(io, d, k, v), s0, hi, len, h, d, (bool)io};
    tiles.start();

    for (int j0 = 0; j0 < len; j0 += AM_TILE) {
        __syncthreads();
        const int buf = tiles.next(j0);
        const unsigned short(*ks)[DP + 8] = ks2[buf];
        const unsigned short(*vs)[DP + 8] = vs2[buf];
        if (threadIdx.x < AM_TILE) {
            const int j = j0 + threadIdx.x;
            mk[threadIdx.x] = j < len ? 1.0f : 0.0f;
        }
        __syncthreads();
        if (row0 >= len) continue;
        float s[AM_TILE / 8][4], dp[AM_TILE / 8][4];
        am_rows_times_tile_t<Tag, DP>(s, qa, ks);
        am_rows_times_tile_t<Tag, DP>(dp, ga, vs);
#pragma unroll
        for (int nt = 0; nt < AM_TILE / 8; ++nt) {
            float f[2][2] = {{1.0f, 1.0f}, {1.0f, 1.0f}};
            if (dropping) am_factors_q(drop, bi, hi, row0, j0 + nt * 8 + c2, t, h, f);
#pragma unroll
            for (int half = 0; half < 2; ++half)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int r = half * 2 + c, col = nt * 8 + c2 + c;
                    float ds = 0.0f;
                    if (mk[col] > 0.5f && ls2[half] != NEG_INF) {
                        const float p = exp2f(s[nt][r] * scale * AM_LOG2E - ls2[half]);
                        ds = p * (dp[nt][r] * f[half][c] - dd[half]) * scale;
                    }
                    s[nt][r] = ds;
                }
        }
        unsigned sa[AM_TILE / 16][4];
        am_c_to_a<Tag>(sa, s);
        am_acc_times_tile<Tag, DP>(acc, sa, ks);
    }
    if (row0 >= len) return;
    const float one[2] = {1.0f, 1.0f};
    am_store<Tag, DP>(dq, acc, one, s0, hi, row0, len, h, d, io);
}

// Backward, part 2: dK, dV (overwritten); each warp owns 16 key rows and streams tiles of
// AM_TILE queries.
// Grid and block as the forward kernel.
template <typename Tag, int DP>
__device__ void attention_bwd_dkdv_mma(void* dk, void* dv, const void* dout, const void* q, const void* k,
                                       const void* v, const float* lse, const float* dvec, const int* seqs, int b,
                                       int t, int h, int d, DropoutArgs drop, int io) {
    __shared__ __align__(16) unsigned short qs2[2][AM_TILE][DP + 8];
    __shared__ __align__(16) unsigned short gs2[2][AM_TILE][DP + 8];
    __shared__ float ls2[AM_TILE], dd[AM_TILE];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c2 = (lane & 3) * 2;
    const int hi = blockIdx.y, bi = blockIdx.z;
    const int s0 = seqs[bi], len = seqs[bi + 1] - s0;
    if ((int)blockIdx.x * AM_ROWS >= len) return;  // block-uniform: no row of this sequence
    const int row0 = blockIdx.x * AM_ROWS + warp * 16;
    const float scale = 1.0f / sqrtf((float)d);
    const bool dropping = drop.p > 0.0f;
    unsigned ka[DP / 16][4], va[DP / 16][4];
    am_load_a<Tag, DP>(ka, k, s0, hi, row0, len, h, d, io);
    am_load_a<Tag, DP>(va, v, s0, hi, row0, len, h, d, io);
    bool key_on[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int j = row0 + g + 8 * half;
        key_on[half] = j < len;
    }
    float adk[DP / 8][4], adv[DP / 8][4];
#pragma unroll
    for (int nd = 0; nd < DP / 8; ++nd)
#pragma unroll
        for (int r = 0; r < 4; ++r) adk[nd][r] = adv[nd][r] = 0.0f;

    AmTiles<Tag, DP> tiles{qs2, gs2, q, dout, am_vec_ok<DP>(io, d, q, dout), s0, hi, len, h, d, (bool)io};
    tiles.start();

    for (int i0 = 0; i0 < len; i0 += AM_TILE) {
        __syncthreads();
        const int buf = tiles.next(i0);
        const unsigned short(*qs)[DP + 8] = qs2[buf];
        const unsigned short(*gs)[DP + 8] = gs2[buf];
        if (threadIdx.x < AM_TILE) {
            const int i = i0 + threadIdx.x;
            const size_t r = (size_t)(s0 + i) * h + hi;
            ls2[threadIdx.x] = i < len ? lse[r] * AM_LOG2E : NEG_INF;
            dd[threadIdx.x] = i < len ? dvec[r] : 0.0f;
        }
        __syncthreads();
        if (row0 >= len) continue;
        float st[AM_TILE / 8][4], dpt[AM_TILE / 8][4];  // S^T and dP^T: key rows x query columns
        am_rows_times_tile_t<Tag, DP>(st, ka, qs);
        am_rows_times_tile_t<Tag, DP>(dpt, va, gs);
        float fk[AM_TILE / 8][2][2];
        if (dropping) am_factors_k(drop, bi, hi, row0, i0, t, h, fk);
#pragma unroll
        for (int nt = 0; nt < AM_TILE / 8; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int half = r >> 1, col = nt * 8 + c2 + (r & 1);
                float pf = 0.0f, ds = 0.0f;
                if (key_on[half] && ls2[col] != NEG_INF) {
                    const float p = exp2f(st[nt][r] * scale * AM_LOG2E - ls2[col]);
                    const float f = dropping ? fk[nt][half][r & 1] : 1.0f;
                    pf = p * f;
                    ds = p * (dpt[nt][r] * f - dd[col]) * scale;
                }
                st[nt][r] = pf;
                dpt[nt][r] = ds;
            }
        unsigned pa[AM_TILE / 16][4], sa[AM_TILE / 16][4];
        am_c_to_a<Tag>(pa, st);
        am_c_to_a<Tag>(sa, dpt);
        am_acc_times_tile<Tag, DP>(adv, pa, gs);
        am_acc_times_tile<Tag, DP>(adk, sa, qs);
    }
    if (row0 >= len) return;
    const float one[2] = {1.0f, 1.0f};
    am_store<Tag, DP>(dk, adk, one, s0, hi, row0, len, h, d, io);
    am_store<Tag, DP>(dv, adv, one, s0, hi, row0, len, h, d, io);
}

// ---- entry points: {fwd, bwd_dq, bwd_dkdv} x {bf16, f16} x padded head dim {32, 64, 128} ----
// The parameters of kernels/attention.cu's fp32 twins, the activations untyped, and io.
extern "C" __global__ void attention_fwd_mma_bf16_d32(void* out, float* lse, const void* q, const void* k,
                                                   const void* v, const int* seqs, int b, int t, int h, int d,
                                                   DropoutArgs drop, int io) {
    attention_fwd_mma<Bf16Tag, 32>(out, lse, q, k, v, seqs, b, t, h, d, drop, io);
}
extern "C" __global__ void attention_bwd_dq_mma_bf16_d32(void* dq, float* dvec, const void* dout, const void* q,
                                                      const void* k, const void* v, const void* out,
                                                      const float* lse, const int* seqs, int b, int t, int h, int d,
                                                      DropoutArgs drop, int io) {
    attention_bwd_dq_mma<Bf16Tag, 32>(dq, dvec, dout, q, k, v, out, lse, seqs, b, t, h, d, drop, io);
}
extern "C" __global__ void attention_bwd_dkdv_mma_bf16_d32(void* dk, void* dv, const void* dout, const void* q,
                                                        const void* k, const void* v, const float* lse,
                                                        const float* dvec, const int* seqs, int b, int t, int h,
                                                        int d, DropoutArgs drop, int io) {
    attention_bwd_dkdv_mma<Bf16Tag, 32>(dk, dv, dout, q, k, v, lse, dvec, seqs, b, t, h, d, drop, io);
}
extern "C" __global__ void attention_fwd_mma_bf16_d64(void* out, float* lse, const void* q, const void* k,
                                                   const void* v, const int* seqs, int b, int t, int h, int d,
                                                   DropoutArgs drop, int io) {
    attention_fwd_mma<Bf16Tag, 64>(out, lse, q, k, v, seqs, b, t, h, d, drop, io);
}
extern "C" __global__ void attention_bwd_dq_mma_bf16_d64(void* dq, float* dvec, const void* dout, const void* q,
                                                      const void* k, const void* v, const void* out,
                                                      const float* lse, const int* seqs, int b, int t, int h, int d,
                                                      DropoutArgs drop, int io) {
    attention_bwd_dq_mma<Bf16Tag, 64>(dq, dvec, dout, q, k, v, out, lse, seqs, b, t, h, d, drop, io);
}
extern "C" __global__ void attention_bwd_dkdv_mma_bf16_d64(void* dk, void* dv, const void* dout, const void* q,
                                                        const void* k, const void* v, const float* lse,
                                                        const float* dvec, const int* seqs, int b, int t, int h,
                                                        int d, DropoutArgs drop, int io) {
    attention_bwd_dkdv_mma<Bf16Tag, 64>(dk, dv, dout, q, k, v, lse, dvec, seqs, b, t, h, d, drop, io);
}
extern "C" __global__ void attention_fwd_mma_bf16_d128(void* out, float* lse, const void* q, const void* k,
                                                   const void* v, const int* seqs, int b, int t, int h, int d,
                                                   DropoutArgs drop, int io) {
    attention_fwd_mma<Bf16Tag, 128>(out, lse, q, k, v, seqs, b, t, h, d, drop, io);
}
extern "C" __global__ void attention_bwd_dq_mma_bf16_d128(void* dq, float* dvec, const void* dout, const void* q,
                                                      const void* k, const void* v, const void* out,
                                                      const float* lse, const int* seqs, int b, int t, int h, int d,
                                                      DropoutArgs drop, int io) {
    attention_bwd_dq_mma<Bf16Tag, 128>(dq, dvec, dout, q, k, v, out, lse, seqs, b, t, h, d, drop, io);
}
extern "C" __global__ void attention_bwd_dkdv_mma_bf16_d128(void* dk, void* dv, const void* dout, const void* q,
                                                        const void* k, const void* v, const float* lse,
                                                        const float* dvec, const int* seqs, int b, int t, int h,
                                                        int d, DropoutArgs drop, int io) {
    attention_bwd_dkdv_mma<Bf16Tag, 128>(dk, dv, dout, q, k, v, lse, dvec, seqs, b, t, h, d, drop, io);
}
extern "C" __global__ void attention_fwd_mma_f16_d32(void* out, float* lse, const void* q, const void* k,
                                                   const void* v, const int* seqs, int b, int t, int h, int d,
                                                   DropoutArgs drop, int io) {
    attention_fwd_mma<F16Tag, 32>(out, lse, q, k, v, seqs, b, t, h, d, drop, io);
}
extern "C" __global__ void attention_bwd_dq_mma_f16_d32(void* dq, float* dvec, const void* dout, const void* q,
                                                      const void* k, const void* v, const void* out,
                                                      const float* lse, const int* seqs, int b, int t, int h, int d,
                                                      DropoutArgs drop, int io) {
    attention_bwd_dq_mma<F16Tag, 32>(dq, dvec, dout, q, k, v, out, lse, seqs, b, t, h, d, drop, io);
}
extern "C" __global__ void attention_bwd_dkdv_mma_f16_d32(void* dk, void* dv, const void* dout, const void* q,
                                                        const void* k, const void* v, const float* lse,
                                                        const float* dvec, const int* seqs, int b, int t, int h,
                                                        int d, DropoutArgs drop, int io) {
    attention_bwd_dkdv_mma<F16Tag, 32>(dk, dv, dout, q, k, v, lse, dvec, seqs, b, t, h, d, drop, io);
}
extern "C" __global__ void attention_fwd_mma_f16_d64(void* out, float* lse, const void* q, const void* k,
                                                   const void* v, const int* seqs, int b, int t, int h, int d,
                                                   DropoutArgs drop, int io) {
    attention_fwd_mma<F16Tag, 64>(out, lse, q, k, v, seqs, b, t, h, d, drop, io);
}
extern "C" __global__ void attention_bwd_dq_mma_f16_d64(void* dq, float* dvec, const void* dout, const void* q,
                                                      const void* k, const void* v, const void* out,
                                                      const float* lse, const int* seqs, int b, int t, int h, int d,
                                                      DropoutArgs drop, int io) {
    attention_bwd_dq_mma<F16Tag, 64>(dq, dvec, dout, q, k, v, out, lse, seqs, b, t, h, d, drop, io);
}
extern "C" __global__ void attention_bwd_dkdv_mma_f16_d64(void* dk, void* dv, const void* dout, const void* q,
                                                        const void* k, const void* v, const float* lse,
                                                        const float* dvec, const int* seqs, int b, int t, int h,
                                                        int d, DropoutArgs drop, int io) {
    attention_bwd_dkdv_mma<F16Tag, 64>(dk, dv, dout, q, k, v, lse, dvec, seqs, b, t, h, d, drop, io);
}
extern "C" __global__ void attention_fwd_mma_f16_d128(void* out, float* lse, const void* q, const void* k,
                                                   const void* v, const int* seqs, int b, int t, int h, int d,
                                                   DropoutArgs drop, int io) {
    attention_fwd_mma<F16Tag, 128>(out, lse, q, k, v, seqs, b, t, h, d, drop, io);
}
extern "C" __global__ void attention_bwd_dq_mma_f16_d128(void* dq, float* dvec, const void* dout, const void* q,
                                                      const void* k, const void* v, const void* out,
                                                      const float* lse, const int* seqs, int b, int t, int h, int d,
                                                      DropoutArgs drop, int io) {
    attention_bwd_dq_mma<F16Tag, 128>(dq, dvec, dout, q, k, v, out, lse, seqs, b, t, h, d, drop, io);
}
extern "C" __global__ void attention_bwd_dkdv_mma_f16_d128(void* dk, void* dv, const void* dout, const void* q,
                                                        const void* k, const void* v, const float* lse,
                                                        const float* dvec, const int* seqs, int b, int t, int h,
                                                        int d, DropoutArgs drop, int io) {
    attention_bwd_dkdv_mma<F16Tag, 128>(dk, dv, dout, q, k, v, lse, dvec, seqs, b, t, h, d, drop, io);
}
