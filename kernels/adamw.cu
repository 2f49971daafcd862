// AdamW (PyTorch semantics), per tensor and fused over all tensors, and the squared-norm
// reductions of gradient clipping. CPU twin: src/backend/cpu/adamw.rs.
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

// One AdamW element: the update of adamw_f32 and adamw_multi_f32 (one definition, so the
// fused launch is the per-tensor one element for element). g = grad * grad_scale: the
// clipping factor (and fp16's loss-scale division) folded in, the gradient left untouched.
//   param *= decay; m += w1 (g - m); v = beta2 v + w2 g^2;
//   param -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
__device__ __forceinline__ void adamw_element(float* param, const float* grad, float* m, float* v, long long i,
                                              const AdamArgs& a, float decay, float grad_scale) {
    float g = grad[i] * grad_scale;
    float p = param[i] * decay;
    float mi = m[i];
    mi += a.w1 * (g - mi);
    float vi = v[i] * a.beta2 + a.w2 * g * g;
    float denom = sqrtf(vi) / a.bc2_sqrt + a.eps;
    p += -a.step_size * (mi / denom);
    m[i] = mi;
    v[i] = vi;
    param[i] = p;
}

// One AdamW step on fp32 master weights, moments fp32 (the fused adamw_multi_f32 below also
// writes the GEMMs' rounded weight copies).
extern "C" __global__ void adamw_f32(float* param, const float* grad, float* m, float* v, int n, AdamArgs a,
                                     float grad_scale) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    adamw_element(param, grad, m, v, i, a, a.decay, grad_scale);
}

// ---- one launch over every parameter tensor -------------------------------------------------
// The host describes each tensor once (pointers are stable: the model allocates its
// parameters, gradients and moments once) and the table stays on the device between steps.
// Block b works on elements [c*MULTI_CHUNK, (c+1)*MULTI_CHUNK) of tensor t, where t is the
// last tensor with first_block <= b and c = b - first_block: every block belongs to one
// tensor, so no element is shared and the update is the per-tensor one.
#define MULTI_CHUNK 2048

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
extern "C" __global__ void adamw_multi_f32(const AdamTensor* tensors, int nt, AdamArgs a, float grad_scale,
                                           const float* stats, int low_mode, int low_t) {
    if (stats) {
        if (stats[2] != 0.0f) return;  // uniform over the grid: no block reaches a barrier
        grad_scale = stats[3];
    }
    __shared__ int ti;
    if (threadIdx.x == 0) ti = tensor_of_block(tensors, nt, (int)blockIdx.x);
    __syncthreads();
    const AdamTensor& t = tensors[ti];
    long long start = (long long)(blockIdx.x - t.first_block) * MULTI_CHUNK;
    long long end = min(start + MULTI_CHUNK, t.n);
    float decay = t.decays ? a.decay : 1.0f;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        adamw_element(t.param, t.grad, t.m, t.v, i, a, decay, grad_scale);
        if (t.param_low) st(t.param_low, low_t, i, round_as(t.param[i], low_mode));
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
    const SquaresTensor& t = tensors[ti];
    long long base = (long long)(blockIdx.x - t.first_block) * REDUCE_CHUNK;
    double s = 0.0;
    for (int j = threadIdx.x; j < REDUCE_CHUNK; j += blockDim.x) {
        long long i = base + j;
        if (i < t.n) s += (double)t.x[i] * (double)t.x[i];
    }
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
    const SquaresTensor& t = tensors[ti];
    float* x = const_cast<float*>(t.x);  // the table is shared with the read-only norm
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
    long long base = (long long)blockIdx.x * REDUCE_CHUNK;
    double s = 0.0;
    for (int j = threadIdx.x; j < REDUCE_CHUNK; j += blockDim.x) {
        long long i = base + j;
        if (i < n) s += (double)x[i] * (double)x[i];
    }
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
