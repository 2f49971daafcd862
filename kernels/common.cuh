// Device helpers shared by every kernel file: Philox dropout masks (bit-identical to
// src/backend/philox.rs), warp and block reductions, fp32/bf16 loads and stores, and the
// deterministic "owner computes" scatter-add, and the last-block column reductions.
//
// Conventions (as the CPU twins in src/backend/cpu): row-major, sizes passed explicitly,
// parameter gradients accumulate (+=), activation gradients are overwritten. Activations
// may be stored in fp32, bf16 or fp16 (a storage code next to the pointer, `ld` / `st`
// below); statistics, softmax, logsumexp, losses, parameter gradients and optimiser state
// are fp32 (SPEC section 7).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define FULL_MASK 0xffffffffu
#define NEG_INF (-__int_as_float(0x7f800000))

typedef __nv_bfloat16 bf16;

// ---- fp32 / bf16 ------------------------------------------------------------------------
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// ---- storage types -------------------------------------------------------------------------
// A buffer an op may receive in 16-bit storage comes as a `void*` with a storage code next to
// it (`int *_t`: 0 fp32, 1 bf16, 2 fp16; src/backend/cuda/mod.rs `CudaBuf::code`, the same
// codes as `round_as` below). Arithmetic is fp32 whatever the storage: `ld` widens, `st`
// rounds to nearest even into 16 bits (what `round_as` gives, stored). The branch is
// uniform across a launch. A kernel's `_f32` suffix names its arithmetic, not its storage.
__device__ __forceinline__ float ld(const void* p, int t, size_t i) {
    return t == 0   ? ((const float*)p)[i]
           : t == 1 ? __bfloat162float(((const bf16*)p)[i])
                    : __half2float(((const __half*)p)[i]);
}
__device__ __forceinline__ void st(void* p, int t, size_t i, float v) {
    if (t == 0)
        ((float*)p)[i] = v;
    else if (t == 1)
        ((bf16*)p)[i] = __float2bfloat16_rn(v);
    else
        ((__half*)p)[i] = __float2half_rn(v);
}

// x rounded to the precision whose code `mode` the launcher passes (0 fp32: unchanged,
// 1 bf16, 2 fp16; src/backend/cuda/mod.rs `round_code`) and widened back, as
// kernels/quantize.cu rounds: ops that write a buffer the next GEMM reads in 16 bits round
// it as they store it, instead of a separate pass.
__device__ __forceinline__ float round_as(float x, int mode) {
    return mode == 1 ? __bfloat162float(__float2bfloat16_rn(x)) : mode == 2 ? __half2float(__float2half_rn(x)) : x;
}

// ---- four elements at once ------------------------------------------------------------------
// A plain value of type V (uint2, uint4) at p, p aligned to sizeof(V): one wide access.
template <typename V>
__device__ __forceinline__ V ld_vec(const void* p) {
#ifdef DEEPCUT_CUDA_EMU
    emu_aligned(p, (int)sizeof(V), "ld_vec (a wide load)");
    V v;
    memcpy(&v, p, sizeof(V));
    return v;
#else
    return *reinterpret_cast<const V*>(p);
#endif
}
template <typename V>
__device__ __forceinline__ void st_vec(void* p, V v) {
#ifdef DEEPCUT_CUDA_EMU
    emu_aligned(p, (int)sizeof(V), "st_vec (a wide store)");
    memcpy(p, &v, sizeof(V));
#else
    *reinterpret_cast<V*>(p) = v;
#endif
}
__device__ __forceinline__ float half_bits_to_f32(unsigned b, int t) {
    return t == 1 ? __int_as_float((int)(b << 16)) : __half2float(__ushort_as_half((unsigned short)b));
}
__device__ __forceinline__ unsigned f32_to_half_bits(float x, int t) {
    return t == 1 ? (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(x))
                  : (unsigned)__half_as_ushort(__float2half_rn(x));
}
// v = elements i .. i + 3 of p (storage t, ld's codes) as fp32; i a multiple of 4, p
// aligned to four elements (16 bytes fp32, 8 bytes 16-bit: the launchers check it,
// src/backend/cuda/mod.rs vec4_aligned).
__device__ __forceinline__ void ld4(float (&v)[4], const void* p, int t, size_t i) {
    if (t == 0) {
        const uint4 u = ld_vec<uint4>((const float*)p + i);
        v[0] = __int_as_float((int)u.x);
        v[1] = __int_as_float((int)u.y);
        v[2] = __int_as_float((int)u.z);
        v[3] = __int_as_float((int)u.w);
    } else {
        const uint2 u = ld_vec<uint2>((const unsigned short*)p + i);
        v[0] = half_bits_to_f32(u.x & 0xffffu, t);
        v[1] = half_bits_to_f32(u.x >> 16, t);
        v[2] = half_bits_to_f32(u.y & 0xffffu, t);
        v[3] = half_bits_to_f32(u.y >> 16, t);
    }
}
// Elements i .. i + 3 of p = v, rounded to 16 bits as st does for 16-bit storage.
__device__ __forceinline__ void st4(void* p, int t, size_t i, const float (&v)[4]) {
    if (t == 0) {
        st_vec<uint4>((float*)p + i, make_uint4((unsigned)__float_as_int(v[0]), (unsigned)__float_as_int(v[1]),
                                                (unsigned)__float_as_int(v[2]), (unsigned)__float_as_int(v[3])));
    } else {
        st_vec<uint2>((unsigned short*)p + i,
                      make_uint2(f32_to_half_bits(v[0], t) | (f32_to_half_bits(v[1], t) << 16),
                                 f32_to_half_bits(v[2], t) | (f32_to_half_bits(v[3], t) << 16)));
    }
}

// ---- Philox4x32-10 (Salmon et al. SC'11), as src/backend/philox.rs ------------------------
// Counter = [group lo, group hi, stream lo, stream hi], key = [seed lo, seed hi]; element
// idx uses word idx & 3 of counter group idx >> 2. u = (word >> 8) * 2^-24 is exact in
// fp32, and the element is kept iff u >= p, so both backends make the same decisions.
struct DropoutArgs {
    unsigned long long seed;
    unsigned long long stream;
    float p;      // drop probability; 0 = identity
    float scale;  // 1 / (1 - p), computed on the host in fp32 as Dropout::scale()
};

__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint2 key) {
    const unsigned int M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            key.x += W0;
            key.y += W1;
        }
        unsigned int hi0 = __umulhi(M0, ctr.x), lo0 = M0 * ctr.x;
        unsigned int hi1 = __umulhi(M1, ctr.z), lo1 = M1 * ctr.z;
        ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
    }
    return ctr;
}

// The four words of counter group `group` (elements 4*group .. 4*group+3).
__device__ __forceinline__ uint4 dropout_words(const DropoutArgs& d, unsigned long long group) {
    uint4 ctr = make_uint4((unsigned int)group, (unsigned int)(group >> 32), (unsigned int)d.stream,
                           (unsigned int)(d.stream >> 32));
    uint2 key = make_uint2((unsigned int)d.seed, (unsigned int)(d.seed >> 32));
    return philox4x32_10(ctr, key);
}

__device__ __forceinline__ unsigned int word_at(uint4 w, int i) {
    return i == 0 ? w.x : i == 1 ? w.y : i == 2 ? w.z : w.w;
}

// Multiplier of a word: 0 (dropped) or 1/(1-p) (kept).
__device__ __forceinline__ float factor_of_word(const DropoutArgs& d, unsigned int w) {
    float u = (float)(w >> 8) * (1.0f / 16777216.0f);
    return u >= d.p ? d.scale : 0.0f;
}

// Multiplier of element idx (one Philox call; use dropout_words to share a call by four).
__device__ __forceinline__ float dropout_factor(const DropoutArgs& d, unsigned long long idx) {
    if (!(d.p > 0.0f)) return 1.0f;
    uint4 w = dropout_words(d, idx >> 2);
    return factor_of_word(d, word_at(w, (int)(idx & 3)));
}

// ---- reductions -----------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_MASK, x, o);
    return x;
}
__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_MASK, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, o));
    return x;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. `scratch` holds 32 values; the call begins and ends with a barrier so it can be
// used twice in a row.
template <typename F>
__device__ __forceinline__ F block_sum(F x, F* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    x = warp_sum(x);
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    F total = 0;
    for (int w = 0; w < nwarps; ++w) total += scratch[w];  // same order in every thread
    __syncthreads();
    return total;
}

// ---- deterministic scatter-add ----------------------------------------------------------------
// d[0..c] += the rows src_row(q) for q = q0, q0 + 1, ... < m in that order, block-wide, each
// thread keeping 4 columns in registers; src_row(q) is a row index, or -1 to skip q.
// scatter_add_owner's walk (scatter_add_sorted below walks its runs by column).
template <typename T, typename Rows>
__device__ __forceinline__ void add_rows_in_order(float* d, const T* src, int c, int q0, int m, Rows src_row) {
    const int stride = blockDim.x * 4;
    for (int j0 = threadIdx.x; j0 < c; j0 += stride) {
        float acc[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            int j = j0 + u * blockDim.x;
            acc[u] = j < c ? d[j] : 0.0f;
        }
        for (int q = q0; q < m; ++q) {
            const int row = src_row(q);
            if (row < 0) continue;
            const T* s = src + (size_t)row * c;
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                int j = j0 + u * blockDim.x;
                if (j < c) acc[u] += to_f32(s[j]);
            }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            int j = j0 + u * blockDim.x;
            if (j < c) d[j] = acc[u];
        }
    }
}

// dst[idx[r], :] += src[r, :] for r < m, in increasing r for every destination row, exactly
// the order of the CPU loop, with no atomics. One block per source row r: the block that
// holds the first occurrence of a destination row owns it and walks every later row with
// the same index; the others return. O(m^2) index reads, O(m c) data: fine for a few
// thousand rows (scatter_add_rows); scatter_add_sorted below is the O(m) version for
// callers that can sort the indices on the host (the embedding backward).
template <typename T>
__device__ void scatter_add_owner(float* dst, const T* src, const int* idx, int m, int c, int r) {
    __shared__ int found;
    if (r >= m) return;
    const int key = idx[r];
    if (threadIdx.x == 0) found = 0;
    __syncthreads();
    for (int q = threadIdx.x; q < r; q += blockDim.x)
        if (idx[q] == key) found = 1;
    __syncthreads();
    if (found) return;  // an earlier row owns this destination
    add_rows_in_order(dst + (size_t)key * c, src, c, r, m, [&](int q) { return idx[q] == key ? q : -1; });
}

// dst[idx[r], :] += src[r, :] over the tokens r in `order` (idx's tokens sorted by (idx, r),
// src/backend/mod.rs scatter_order), in increasing r for every destination row as the CPU
// adds them, no atomics. Block (k, ., z) looks at order[k]: if it starts a run of equal
// indices it owns that row's columns [z blockDim.x, (z + 1) blockDim.x), one per thread, and
// walks the run; the others return. O(m c) data, O(m) index reads.
// A run can be every token (the token-type table: one type), and each column's sum is a
// sequential chain, so the parallelism is in the columns: one per thread, a block per
// blockDim.x of them (grid z). The run is walked in chunks of SAS_CHUNK rows whose source
// rows are staged in shared memory first, so a thread's loads of a chunk are independent
// of each other and stay in flight together. (One block walking all 768 columns of a
// 6,144-row run with a dependent index load per row took 3.9 ms on an H200; staging alone,
// 3.0 ms.) The sums still run in r order: bit for bit the CPU's.
#define SAS_CHUNK 32
template <typename T>
__device__ void scatter_add_sorted(float* dst, const T* src, const int* idx, const int* order, int m, int c, int k) {
    __shared__ int rows[SAS_CHUNK];
    if (k >= m) return;
    const int key = idx[order[k]];
    if (k > 0 && idx[order[k - 1]] == key) return;  // block-uniform: an earlier block owns the run
    const int j = blockIdx.z * blockDim.x + threadIdx.x;
    const bool mine = j < c;  // every thread takes part in the barriers, its column or not
    float* d = dst + (size_t)key * c;
    float acc = mine ? d[j] : 0.0f;
    for (int q0 = k; q0 < m; q0 += SAS_CHUNK) {
        __syncthreads();  // the previous chunk's rows are read by every thread
        if (threadIdx.x < SAS_CHUNK) {
            const int q = q0 + threadIdx.x;
            const int r = q < m ? order[q] : -1;
            rows[threadIdx.x] = r >= 0 && idx[r] == key ? r : -1;
        }
        __syncthreads();
        // the run is contiguous in order: its rows are a prefix of the chunk
        int n = 0;
        while (n < SAS_CHUNK && rows[n] >= 0) ++n;
        if (mine) {
            const T* s = src + j;
            if (n == SAS_CHUNK) {
                float v[SAS_CHUNK];  // every load first, then the adds in order
#pragma unroll
                for (int i = 0; i < SAS_CHUNK; ++i) v[i] = to_f32(s[(size_t)rows[i] * c]);
#pragma unroll
                for (int i = 0; i < SAS_CHUNK; ++i) acc += v[i];
            } else {
                for (int i = 0; i < n; ++i) acc += to_f32(s[(size_t)rows[i] * c]);
            }
        }
        if (n < SAS_CHUNK) break;  // block-uniform: the run ended in this chunk
    }
    if (mine) d[j] = acc;
}

// Column reductions in one launch (col_sums_f32 in kernels/gemm.cu, layernorm_bwd_params_f32).
// Grid (column blocks, chunks): block (x, k) sums its chunk's rows into partial[k, :]; the
// last block of column block x to finish, whichever it is, adds that column block's
// partials to dst in chunk order and resets its counter (the last-block pattern of the
// CUDA Programming Guide, "Memory Fence Functions"). The order of every sum is fixed, so
// the result is bit for bit the CPU's. counters [gridDim.x]: zero before the launch, zero
// after it. This replaced a second launch (col_partials_add) per bias or LayerNorm
// parameter gradient: 63 of a MiniLM step's 191 launches.
// `counter`: this column block's (counters[blockIdx.x], or per tensor of a multi-tensor
// grid), counting the gridDim.y row-chunk blocks.
__device__ __forceinline__ bool last_block_of(unsigned* counter, unsigned blocks) {
    __shared__ bool last;
    __threadfence();  // this block's partials are visible to the device before it is counted
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == blocks - 1;
    __syncthreads();
    if (last) {
        __threadfence();  // and the others' partials are read only after they were counted
        if (threadIdx.x == 0) *counter = 0;  // for the next launch (stream order)
    }
    return last;
}
__device__ __forceinline__ bool last_block_of_column(unsigned* counter) { return last_block_of(counter, gridDim.y); }

// Thread 0 gets x[0] + x[1] + ... + x[k - 1], added in that order from 0.0 (the other
// threads get 0). The block stages blockDim.x values at a time in `tile` (blockDim.x
// doubles of shared memory) with coalesced loads, so thread 0's chain of adds reads
// shared memory, 8 loads in flight: one thread walking global memory waited for each
// load (on an H200 the gradient norm's 30,000 partials took about a millisecond).
__device__ __forceinline__ double sum_in_order(const double* x, long long k, double* tile) {
    double s = 0.0;
    for (long long base = 0; base < k; base += blockDim.x) {
        const int cnt = (int)min((long long)blockDim.x, k - base);
        __syncthreads();  // the previous tile is added
        if (threadIdx.x < cnt) tile[threadIdx.x] = __ldcg(x + base + threadIdx.x);
        __syncthreads();
        if (threadIdx.x == 0) {
            int i = 0;
            for (; i + 8 <= cnt; i += 8) {
                double v[8];
#pragma unroll
                for (int u = 0; u < 8; ++u) v[u] = tile[i + u];
#pragma unroll
                for (int u = 0; u < 8; ++u) s += v[u];
            }
            for (; i < cnt; ++i) s += tile[i];
        }
    }
    return s;
}

// dst[j] += partial[0, j], then += partial[1, j], ... (accumulates, as parameter gradients
// do). The partials were written by other blocks: read past L1 (__ldcg), eight at a time
// so their loads overlap (the adds stay in order).
__device__ __forceinline__ void add_partials(float* dst, const float* partial, int nchunks, int cols, int j) {
    float d = dst[j];
    int k = 0;
    for (; k + 8 <= nchunks; k += 8) {
        float v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) v[u] = __ldcg(partial + (size_t)(k + u) * cols + j);
#pragma unroll
        for (int u = 0; u < 8; ++u) d += v[u];
    }
    for (; k < nchunks; ++k) d += __ldcg(partial + (size_t)k * cols + j);
    dst[j] = d;
}
