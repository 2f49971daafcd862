// Dropout from Philox counters: masks are a function of (seed, stream, element index),
// regenerated in backward, never stored. CPU twin: src/backend/cpu/dropout.rs.
#include "common.cuh"

// out[i] = round_as(inp[i] * factor(i), round), out and inp in their storage types
// (common.cuh `ld` / `st`). One thread per counter group of four elements (one Philox call
// each). With p = 0 the factor is 1 (a copy, rounded).
__device__ void dropout_apply(void* out, int out_t, const void* inp, int inp_t, int n, const DropoutArgs& d,
                              int round) {
    long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long i0 = g * 4;
    if (i0 >= n) return;
    if (!(d.p > 0.0f)) {
        for (int u = 0; u < 4 && i0 + u < n; ++u) st(out, out_t, i0 + u, round_as(ld(inp, inp_t, i0 + u), round));
        return;
    }
    uint4 w = dropout_words(d, (unsigned long long)g);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        if (i0 + u < n)
            st(out, out_t, i0 + u, round_as(factor_of_word(d, word_at(w, u)) * ld(inp, inp_t, i0 + u), round));
    }
}

extern "C" __global__ void dropout_fwd_f32(void* out, int out_t, const void* inp, int inp_t, int n, DropoutArgs d,
                                           int round) {
    dropout_apply(out, out_t, inp, inp_t, n, d, round);
}

// dinp = dout * mask / (1-p) with the forward's mask: the same code on the gradient.
extern "C" __global__ void dropout_bwd_f32(void* dinp, int dinp_t, const void* dout, int dout_t, int n,
                                           DropoutArgs d, int round) {
    dropout_apply(dinp, dinp_t, dout, dout_t, n, d, round);
}

// The two dropout views of the forget rows from one read of their input:
// out[0..n] = inp * factor(i), out[n..2n] = inp * factor(n + i), i.e. dropout_fwd over
// [inp | inp] (view b's elements come after view a's, as in the batch
// [forget a | forget b | retain]). One thread per input element.
template <typename T>
__device__ void dropout_duplicate(T* out, const T* inp, int n, DropoutArgs d) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = to_f32(inp[i]);
    float fa = dropout_factor(d, (unsigned long long)i);
    float fb = dropout_factor(d, (unsigned long long)(n + i));
    out[i] = from_f32<T>(fa * x);
    out[n + i] = from_f32<T>(fb * x);
}

extern "C" __global__ void dropout_duplicate_f32(float* out, const float* inp, int n, DropoutArgs d) {
    dropout_duplicate<float>(out, inp, n, d);
}

// Backward of dropout_duplicate: both views' gradients meet in one input gradient,
// dinp[i] = dout[i] * factor(i) + dout[n + i] * factor(n + i) (overwritten).
template <typename T>
__device__ void dropout_duplicate_bwd(T* dinp, const T* dout, int n, DropoutArgs d) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float fa = dropout_factor(d, (unsigned long long)i);
    float fb = dropout_factor(d, (unsigned long long)(n + i));
    float a = to_f32(dout[i]) * fa;
    float b = to_f32(dout[n + i]) * fb;
    dinp[i] = from_f32<T>(a + b);
}

extern "C" __global__ void dropout_duplicate_bwd_f32(float* dinp, const float* dout, int n, DropoutArgs d) {
    dropout_duplicate_bwd<float>(dinp, dout, n, d);
}
