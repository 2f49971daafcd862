// AdamW (PyTorch semantics), per tensor and fused over all tensors, and the squared-norm
// reductions of gradient clipping. CPU twin: src/backend/cpu/adamw.rs.
#include "common.cuh"

// Elements per partial sum of sum_squares: REDUCE_CHUNK of the CPU twin.
#define REDUCE_CHUNK 4096
// Threads of the partial-sum kernels (the backend's BLOCK) and each thread's elements.
#define REDUCE_THREADS 256
#define REDUCE_PER (REDUCE_CHUNK / REDUCE_THREADS)

// This thread's part of chunk [base, base + REDUCE_CHUNK) of x[..n]: the squares of
// elements base + threadIdx.x + k REDUCE_THREADS, k in order, in f64 (past n: +0, which
// leaves the sum as it was). All REDUCE_PER loads are issued before the first add: a loop
// of load-then-add had the warp wait a global round trip per element, and through a
// table reference (the multi-tensor kernel) two (the pointer re-read each time): 10% of
// copy bandwidth on an H200.
__device__ __forceinline__ double chunk_squares(const float* x, long long base, long long n) {
    float v[REDUCE_PER];
#pragma unroll
    for (int k = 0; k < REDUCE_PER; ++k) {
        const long long i = base + threadIdx.x + k * REDUCE_THREADS;
        v[k] = i < n ? x[i] : 0.0f;
    }
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < REDUCE_PER; ++k) s += (double)v[k] * (double)v[k];
    return s;
}

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

// One AdamW element: the update of adamw_f32 and adamw_multi_f32 (one definition, so the
// fused launch is the per-tensor one element for element), on values in registers (the
// callers load and store them). g = grad * grad_scale: the clipping factor (and fp16's
// loss-scale division) folded in, the gradient left untouched.
//   param *= decay; m += w1 (g - m); v = beta2 v + w2 g^2;
//   param -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
__device__ __forceinline__ void adamw_update(float g, float& p, float& mi, float& vi, const AdamArgs& a,
                                             float decay) {
    p *= decay;
    mi += a.w1 * (g - mi);
    vi = vi * a.beta2 + a.w2 * g * g;
    float denom = sqrtf(vi) / a.bc2_sqrt + a.eps;
    p += -a.step_size * (mi / denom);
}

// One AdamW step on fp32 master weights, moments fp32 (the fused adamw_multi_f32 below also
// writes the GEMMs' rounded weight copies).
extern "C" __global__ void adamw_f32(float* param, const float* grad, float* m, float* v, int n, AdamArgs a,
                                     float grad_scale) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float p = param[i], mi = m[i], vi = v[i];
    adamw_update(grad[i] * grad_scale, p, mi, vi, a, a.decay);
    m[i] = mi;
    v[i] = vi;
    param[i] = p;
}

// ---- one launch over every parameter tensor -------------------------------------------------
// The host describes each tensor once (pointers are stable: the model allocates its
// parameters, gradients and moments once) and the table stays on the device between steps.
// Block b works on elements [c*MULTI_CHUNK, (c+1)*MULTI_CHUNK) of tensor t, where t is the
// last tensor with first_block <= b and c = b - first_block: every block belongs to one
// tensor, so no element is shared and the update is the per-tensor one.
#define MULTI_CHUNK 2048
// Threads of a block of the fused kernels (the backend's BLOCK), so a thread's elements of
// the chunk are known at compile time: MULTI_PER of them, all loaded before any is stored.
#define MULTI_THREADS 256
#define MULTI_PER (MULTI_CHUNK / MULTI_THREADS)

struct AdamTensor {
    float* param;
    const float* grad;
    float* m;
    float* v;
    void* param_low;   // null: none; else the updated weight rounded by low_mode (LOW_*), stored as low_t
    long long n;
    int first_block;
    int decays;  // 1: weight decay applies (decay = 1 - lr wd); 0: decay = 1
};

// The tensor block b belongs to: binary search over first_block (increasing).
template <typename Desc>
__device__ __forceinline__ int tensor_of_block(const Desc* t, int nt, int b) {
    int lo = 0, hi = nt - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (t[mid].first_block <= b) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// How param_low rounds: as kernels/quantize.cu does (the values a GEMM reads in bf16 / fp16
// mode), so the copy equals quantize(copy of param) bit for bit.
#define LOW_NONE 0
#define LOW_BF16 1
#define LOW_FP16 2

// low_t: the storage type of every param_low (common.cuh `st`: 0 fp32 holding rounded
// values, 1 bf16, 2 fp16, the GEMM copies of the bf16 / fp16 modes).
// stats: null, or the decision of sum_partials_multi_f64 (ClipStats in src/backend/mod.rs):
// a nonzero state stats[2] skips the update, else stats[3] replaces grad_scale. The
// clipping factor is then decided on the device and the host never waits for the norm.
// The descriptor is copied into registers and a thread's MULTI_PER elements are all loaded
// before the first store: with the descriptor read through a reference and one element at a
// time, the compiler had to assume each store might change the table or the next element's
// inputs, and every element cost three dependent global round trips (descriptor pointers,
// values, the param re-read for its rounded copy): 37% of copy bandwidth on an H200, where
// adamw_f32 (one element a thread) reached 92%.
extern "C" __global__ void adamw_multi_f32(const AdamTensor* tensors, int nt, AdamArgs a, float grad_scale,
                                           const float* stats, int low_mode, int low_t) {
    if (stats) {
        if (stats[2] != 0.0f) return;  // uniform over the grid: no block reaches a barrier
        grad_scale = stats[3];
    }
    __shared__ int ti;
    if (threadIdx.x == 0) ti = tensor_of_block(tensors, nt, (int)blockIdx.x);
    __syncthreads();
    const AdamTensor t = tensors[ti];
    const long long chunk0 = (long long)(blockIdx.x - t.first_block) * MULTI_CHUNK;
    const long long start = chunk0 + threadIdx.x, end = min(chunk0 + MULTI_CHUNK, t.n);
    const float decay = t.decays ? a.decay : 1.0f;
    float g[MULTI_PER], p[MULTI_PER], mi[MULTI_PER], vi[MULTI_PER];
#pragma unroll
    for (int k = 0; k < MULTI_PER; ++k) {
        const long long i = start + k * MULTI_THREADS;
        if (i < end) {
            g[k] = t.grad[i];
            p[k] = t.param[i];
            mi[k] = t.m[i];
            vi[k] = t.v[i];
        }
    }
#pragma unroll
    for (int k = 0; k < MULTI_PER; ++k) {
        const long long i = start + k * MULTI_THREADS;
        if (i < end) {
            adamw_update(g[k] * grad_scale, p[k], mi[k], vi[k], a, decay);
            t.m[i] = mi[k];
            t.v[i] = vi[k];
            t.param[i] = p[k];
            if (t.param_low) st(t.param_low, low_t, i, round_as(p[k], low_mode));
        }
    }
}

// The squared norms of many tensors with one copy back: per-tensor partials over
// REDUCE_CHUNK-element chunks (the chunks sum_squares_partials_f32 uses, aligned to each
// tensor's start), then each tensor's partials summed in order and the tensors' sums added
// in tensor order: bit for bit the per-tensor sum_squares calls summed on the host.
struct SquaresTensor {
    const float* x;
    long long n;
    int first_block;  // first partial of this tensor
    int nblocks;      // its number of partials
};

extern "C" __global__ void sum_squares_multi_partials_f32(double* partials, const SquaresTensor* tensors, int nt) {
    __shared__ double scratch[32];
    __shared__ int ti;
    if (threadIdx.x == 0) ti = tensor_of_block(tensors, nt, (int)blockIdx.x);
    __syncthreads();
    const SquaresTensor t = tensors[ti];
    double s = chunk_squares(t.x, (long long)(blockIdx.x - t.first_block) * REDUCE_CHUNK, t.n);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// out[0] = sum over tensors (in order) of the in-order sum of that tensor's partials
// (sum_partials_f64's order, tensor by tensor). Block k sums tensor k's partials into
// per_tensor[k] (common.cuh sum_in_order; blocks of SUM_BLOCK threads); the last block to
// finish (common.cuh last_block_of, counter[0]: zero before, left zero) adds them in
// tensor order in thread 0. Grid: nt blocks. (One thread per tensor walking its partials
// in global memory made the largest tensor's chain, roberta-base's 38.6M-element word
// embeddings, the norm's whole time.)
//
// stats non-null: thread 0 also makes Backend::clip_adamw_all's decision (its CPU form is
// the trait's default and ClipState::decide in src/backend/mod.rs, the same f64 operations
// and the same order of tests): norm = sqrt(out) / loss_scale; the state is
//   1 failed      if stats[2] already says failed (any code but 0, 2, 3; sticky),
//   3 stale       else if overflows_seen >= 0 (fp16 loss scaling) and the overflow count
//                 stats[4] differs from it (an overflow the host has not seen halved the
//                 scale these gradients carry),
//   0 applied     else if the norm is finite,
//   2 overflowed  else if overflows_seen >= 0 and loss_scale > 1 (stats[4] counts it),
//   1 failed      else;
// grad_scale = f * (1 / loss_scale) when applied (f = clip / norm above clip, else 1), 0
// otherwise. Written as ClipStats: norm hi, norm lo, state, grad_scale, overflows;
// adamw_multi_f32 reads the state and grad_scale.
#define SUM_BLOCK 256
extern "C" __global__ void sum_partials_multi_f64(double* out, double* per_tensor, const double* partials,
                                                  const SquaresTensor* tensors, int nt, float* stats, float clip,
                                                  float loss_scale, int overflows_seen, unsigned* counter) {
    __shared__ double tile[SUM_BLOCK];
    const int k = blockIdx.x;
    const double mine = sum_in_order(partials + tensors[k].first_block, tensors[k].nblocks, tile);
    if (threadIdx.x == 0) per_tensor[k] = mine;
    if (!last_block_of(counter, gridDim.x)) return;
    const double s = sum_in_order(per_tensor, nt, tile);
    if (threadIdx.x == 0) {
        out[0] = s;
        if (stats) {
            double norm = sqrt(s) / (double)loss_scale;
            bool finite = isfinite(norm);
            bool scaling = overflows_seen >= 0;
            float overflows = stats[4];
            float state;
            int before = (int)stats[2];
            if (before != 0 && before != 2 && before != 3) state = 1.0f;
            else if (scaling && overflows != (float)overflows_seen) state = 3.0f;
            else if (finite) state = 0.0f;
            else if (scaling && loss_scale > 1.0f) state = 2.0f;
            else state = 1.0f;
            float f = norm > (double)clip ? (float)((double)clip / norm) : 1.0f;
            float hi = (float)norm;
            stats[0] = hi;
            stats[1] = finite ? (float)(norm - (double)hi) : 0.0f;
            stats[2] = state;
            stats[3] = state == 0.0f ? f * (1.0f / loss_scale) : 0.0f;
            stats[4] = state == 2.0f ? overflows + 1.0f : overflows;
        }
    }
}

// Zeroes x[..n] of every tensor of a SquaresTensor table (the gradients, before a step's
// backward accumulates into them): one launch where one memset per parameter tensor cost
// a driver call and a tiny GPU operation each (~100 per MiniLM step). Block b zeroes chunk
// b of the table's REDUCE_CHUNK chunks, so the gradient norm's table serves unchanged.
// CPU twin: Backend::zero_all's default (zero per tensor).
extern "C" __global__ void zero_multi_f32(const SquaresTensor* tensors, int nt) {
    __shared__ int ti;
    if (threadIdx.x == 0) ti = tensor_of_block(tensors, nt, (int)blockIdx.x);
    __syncthreads();
    const SquaresTensor t = tensors[ti];  // by value: a reference was re-read after every store
    float* x = const_cast<float*>(t.x);    // the table is shared with the read-only norm
    long long base = (long long)(blockIdx.x - t.first_block) * REDUCE_CHUNK;
    for (int j = threadIdx.x; j < REDUCE_CHUNK; j += blockDim.x) {
        long long i = base + j;
        if (i < t.n) x[i] = 0.0f;
    }
}

// partials[k] = sum of x[i]^2 over chunk k (REDUCE_CHUNK elements), in f64. One block per
// chunk; a fixed tree inside the block, so the result is the same on every run.
extern "C" __global__ void sum_squares_partials_f32(double* partials, const float* x, int n) {
    __shared__ double scratch[32];
    double s = chunk_squares(x, (long long)blockIdx.x * REDUCE_CHUNK, n);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// out[0] = sum of partials[0..k] in order. One block of SUM_BLOCK threads (common.cuh
// sum_in_order).
extern "C" __global__ void sum_partials_f64(double* out, const double* partials, int k) {
    __shared__ double tile[SUM_BLOCK];
    const double s = sum_in_order(partials, k, tile);
    if (threadIdx.x == 0) out[0] = s;
}
