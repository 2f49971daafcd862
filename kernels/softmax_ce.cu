// Softmax cross-entropy with an ignore index, fp32 softmax. CPU twin:
// src/backend/cpu/softmax_ce.rs. One warp per row (the label count is small).
#include "common.cuh"

#define IGNORE_INDEX (-100)

// Row max and sum of exp(x - max) over a row of v logits, for the warp's lanes.
template <typename T>
__device__ __forceinline__ void row_stats(const T* row, int v, float* mx, float* sum) {
    int lane = threadIdx.x & 31;
    float m = NEG_INF;
    for (int j = lane; j < v; j += 32) m = fmaxf(m, to_f32(row[j]));
    m = warp_max(m);
    float s = 0.0f;
    for (int j = lane; j < v; j += 32) s += expf(to_f32(row[j]) - m);
    *mx = m;
    *sum = warp_sum(s);
}

// losses[r] = logsumexp(logits[r]) - logits[r][label], 0 for ignored rows.
template <typename T>
__device__ void softmax_ce_fwd(float* losses, const T* logits, const int* labels, int n, int v) {
    int r = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (r >= n) return;
    int y = labels[r];
    if (y == IGNORE_INDEX) {
        if ((threadIdx.x & 31) == 0) losses[r] = 0.0f;
        return;
    }
    const T* row = logits + (size_t)r * v;
    float m, s;
    row_stats(row, v, &m, &s);
    if ((threadIdx.x & 31) == 0) losses[r] = (m + logf(s)) - to_f32(row[y]);
}
extern "C" __global__ void softmax_ce_fwd_f32(float* losses, const float* logits, const int* labels, int n, int v) {
    softmax_ce_fwd<float>(losses, logits, labels, n, v);
}

// dlogits[r] = scale * (softmax(logits[r]) - onehot(label)), zero rows when ignored;
// dlogits in its storage type (16-bit in bf16 / fp16: the GEMMs that read it next do).
extern "C" __global__ void softmax_ce_bwd_f32(void* dlogits, int dlogits_t, const float* logits, const int* labels,
                                              int n, int v, float scale) {
    int r = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= n) return;
    int y = labels[r];
    const size_t d = (size_t)r * v;
    if (y == IGNORE_INDEX) {
        for (int j = lane; j < v; j += 32) st(dlogits, dlogits_t, d + j, 0.0f);
        return;
    }
    const float* row = logits + (size_t)r * v;
    float m, s;
    row_stats(row, v, &m, &s);
    for (int j = lane; j < v; j += 32)
        st(dlogits, dlogits_t, d + j, scale * (expf(row[j] - m) / s - (j == y ? 1.0f : 0.0f)));
}
