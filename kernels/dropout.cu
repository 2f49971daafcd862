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
    // the four loads before the first store: a store between them (out may be inp, as far
    // as the compiler knows) made each a global round trip of its own
    float x[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) x[u] = i0 + u < n ? ld(inp, inp_t, i0 + u) : 0.0f;
    if (!(d.p > 0.0f)) {
        for (int u = 0; u < 4 && i0 + u < n; ++u) st(out, out_t, i0 + u, round_as(x[u], round));
        return;
    }
    uint4 w = dropout_words(d, (unsigned long long)g);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        if (i0 + u < n) st(out, out_t, i0 + u, round_as(factor_of_word(d, word_at(w, u)) * x[u], round));
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

// The factors of out elements o0 .. o0 + 3 (o0 need not be a multiple of 4): one Philox
// call when they form one counter group, one per element otherwise.
__device__ __forceinline__ void factors4(const DropoutArgs& d, long long o0, float (&f)[4]) {
    if ((o0 & 3) == 0) {
        uint4 w = dropout_words(d, (unsigned long long)(o0 >> 2));
#pragma unroll
        for (int u = 0; u < 4; ++u) f[u] = factor_of_word(d, word_at(w, u));
    } else {
#pragma unroll
        for (int u = 0; u < 4; ++u) f[u] = dropout_factor(d, (unsigned long long)(o0 + u));
    }
}

// The factors of input elements i0 .. i0 + 3 of the dropout-duplicate pass: fa at their
// view-a places (i, used where i < n_dup), fb at n_dup + i (view b and the rest); 1 when
// the dropout is off.
__device__ __forceinline__ void dup_factors(const DropoutArgs& d, int n_dup, long long i0, float (&fa)[4],
                                            float (&fb)[4]) {
#pragma unroll
    for (int u = 0; u < 4; ++u) fa[u] = fb[u] = 1.0f;
    if (!(d.p > 0.0f)) return;
    factors4(d, n_dup + i0, fb);
    if (i0 < n_dup) factors4(d, i0, fa);
}

// The dropout-duplicate pass of a DeepCUT step: inp [n] (the embeddings of [forget |
// retain] tokens), whose first n_dup elements are needed twice (views a and b of the forget
// sequences, independent masks), read once: out [n + n_dup] = dropout of [inp[..n_dup] |
// inp[..n_dup] | inp[n_dup..n]], each element masked by its index in out, rounded as
// `round` says; bit for bit dropout_fwd over the doubled input. One thread per group of
// four input elements: it writes them at o = n_dup + i (view b and the rest) and, where
// i < n_dup, at o = i (view a).
extern "C" __global__ void dropout_duplicate_f32(void* out, int out_t, const void* inp, int inp_t, int n_dup, int n,
                                                 DropoutArgs d, int round) {
    const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (i0 >= n) return;
    float x[4];  // loaded before any store (as dropout_apply)
#pragma unroll
    for (int u = 0; u < 4; ++u) x[u] = i0 + u < n ? ld(inp, inp_t, i0 + u) : 0.0f;
    float fa[4], fb[4];
    dup_factors(d, n_dup, i0, fa, fb);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const long long i = i0 + u;
        if (i >= n) break;
        st(out, out_t, n_dup + i, round_as(fb[u] * x[u], round));
        if (i < n_dup) st(out, out_t, i, round_as(fa[u] * x[u], round));
    }
}

// Backward of dropout_duplicate: dinp [n] (overwritten) = dout [n + n_dup] through the
// masks, the two views' gradients of a duplicated element summed (a + b, as the CPU twin):
// dinp[i] = dout[i] f(i) + dout[n_dup + i] f(n_dup + i) for i < n_dup, dout[n_dup + i]
// f(n_dup + i) after. One thread per group of four elements of dinp.
extern "C" __global__ void dropout_duplicate_bwd_f32(void* dinp, int dinp_t, const void* dout, int dout_t,
                                                     int n_dup, int n, DropoutArgs d) {
    const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (i0 >= n) return;
    float gb[4], ga[4];  // loaded before any store (as dropout_apply)
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const long long i = i0 + u;
        gb[u] = i < n ? ld(dout, dout_t, n_dup + i) : 0.0f;
        ga[u] = i < n_dup ? ld(dout, dout_t, i) : 0.0f;
    }
    float fa[4], fb[4];
    dup_factors(d, n_dup, i0, fa, fb);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const long long i = i0 + u;
        if (i >= n) break;
        const float b = gb[u] * fb[u];
        st(dinp, dinp_t, i, i < n_dup ? ga[u] * fa[u] + b : b);
    }
}
