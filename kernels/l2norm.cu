// Row-wise L2 normalisation z = x / max(||x||, eps), as torch.nn.functional.normalize.
// fp32 (the contrastive embeddings). CPU twin: src/backend/cpu/l2norm.rs. One warp per row.
#include "common.cuh"

#define L2NORM_EPS 1e-12f  // L2NORM_EPS of the CPU twin

// out[r] = inp[r] / norm[r], norm[r] = max(||inp[r]||, eps) saved; sum of squares in f64
// as on the CPU.
// __restrict__ here and below: the Rust side passes distinct buffers (one borrowed
// mutably), and without it each column step's loads waited for the previous step's store.
extern "C" __global__ void l2norm_fwd_f32(float* __restrict__ out, float* __restrict__ norm,
                                          const float* __restrict__ inp, int m, int c) {
    int r = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= m) return;
    const float* __restrict__ x = inp + (size_t)r * c;
    double ss = 0.0;
    for (int j = lane; j < c; j += 32) ss += (double)x[j] * (double)x[j];
    ss = warp_sum(ss);
    float nr = fmaxf((float)sqrt(ss), L2NORM_EPS);
    float inv = 1.0f / nr;
    if (lane == 0) norm[r] = nr;
    float* __restrict__ o = out + (size_t)r * c;
    for (int j = lane; j < c; j += 32) o[j] = x[j] * inv;
}

// dinp = (dout - out (out . dout)) / norm (overwritten); dout / eps where the norm was clamped.
extern "C" __global__ void l2norm_bwd_f32(float* __restrict__ dinp, const float* __restrict__ dout,
                                          const float* __restrict__ out, const float* __restrict__ norm, int m, int c) {
    int r = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= m) return;
    const float* __restrict__ g = dout + (size_t)r * c;
    const float* __restrict__ z = out + (size_t)r * c;
    float* __restrict__ d = dinp + (size_t)r * c;
    float nr = norm[r];
    if (nr <= L2NORM_EPS) {
        for (int j = lane; j < c; j += 32) d[j] = g[j] / nr;
        return;
    }
    float inv = 1.0f / nr;
    float zg = 0.0f;
    for (int j = lane; j < c; j += 32) zg += z[j] * g[j];
    zg = warp_sum(zg);
    for (int j = lane; j < c; j += 32) d[j] = (g[j] - z[j] * zg) * inv;
}
