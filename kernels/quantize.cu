// Rounding fp32 buffers to bf16 or fp16 in place: the mixed-precision emulation of SPEC
// section 7 (src/backend/mod.rs Precision). CPU twin: src/backend/cpu/quantize.rs.
//
// Each value is converted with the round-to-nearest-even intrinsic and widened back, so it
// comes back exactly as a store to a bf16 / fp16 buffer and a load give it: fp16 overflow
// (|x| >= 65520) becomes +-inf, fp16 subnormals are kept (the kernels are compiled without
// -ftz), NaN stays NaN (the payload may differ from the CPU's; only NaN-ness is compared).
#include "common.cuh"

// x[i] = float(bf16_rn(x[i])) for i < n. One thread per element.
extern "C" __global__ void quantize_bf16_f32(float* x, int n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    x[i] = round_as(x[i], 1);
}

// x[i] = float(fp16_rn(x[i])) for i < n. One thread per element.
extern "C" __global__ void quantize_fp16_f32(float* x, int n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    x[i] = round_as(x[i], 2);
}

// dst[i] = src[i] converted between storage types (common.cuh `ld` / `st`: rounded to
// nearest even into 16 bits, exact into fp32). One thread per element.
extern "C" __global__ void convert_f32(void* dst, int dst_t, const void* src, int src_t, int n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    st(dst, dst_t, i, ld(src, src_t, i));
}
