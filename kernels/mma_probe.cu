// One tensor-core product, for the tests that pin down what the hardware does with the
// 16-bit inputs the attention and InfoNCE kernels feed it (kernels/mma.cuh): C = A B with
// A [16 x 16] and B [16 x 8] given as bf16 or fp16 bit patterns, one mma.sync m16n8k16 from
// a zero fp32 accumulator. CPU twin: src/backend/cpu/mma_probe.rs (the exact products,
// summed in f64, rounded once to fp32). The question it answers on a GPU: are fp16
// subnormal inputs (|x| < 2^-14, e.g. probabilities below 6.1e-5 rounded to fp16) used, or
// flushed to zero? The attention and InfoNCE fp16 parity tests on the H200 were 1000x
// further from their twins than on the CPU emulator, and bf16 on the same path was not.
#include "mma.cuh"

// a: 16 x 16 row-major, b: 16 x 8 row-major (k x n), c: 16 x 8 row-major (fp32). fp16:
// nonzero for fp16 bits, else bf16. One warp.
extern "C" __global__ void mma_probe_f32(float* c, const unsigned short* a, const unsigned short* b, int fp16) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c2 = (lane & 3) * 2;
    if (threadIdx.x >= 32) return;
    unsigned af[4], bf[2];
#pragma unroll
    for (int r = 0; r < 4; ++r) {  // mma.cuh's A layout
        const int row = g + (r & 1) * 8, col = c2 + (r >> 1) * 8;
        af[r] = join2(a[row * 16 + col], a[row * 16 + col + 1]);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // B: k rows c2 + 8 r, c2 + 8 r + 1 of column g
        const int k = c2 + r * 8;
        bf[r] = join2(b[k * 8 + g], b[(k + 1) * 8 + g]);
    }
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (fp16)
        mma_16816(acc, af, bf, F16Tag());
    else
        mma_16816(acc, af, bf, Bf16Tag());
#pragma unroll
    for (int r = 0; r < 4; ++r) c[(g + (r >> 1) * 8) * 8 + c2 + (r & 1)] = acc[r];
}
