// CPU stand-in for CUDA's cuda_fp16.h (tests/cuda_emu): IEEE binary16 through GCC's
// _Float16, whose conversions round to nearest even, keep subnormals and overflow to inf,
// as __float2half_rn does.
#pragma once

struct __half {
    _Float16 v;
};
typedef __half half;

inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
inline float __half2float(__half h) { return (float)h.v; }

inline unsigned short __half_as_ushort(__half h) {
    unsigned short u;
    __builtin_memcpy(&u, &h.v, 2);
    return u;
}
inline __half __ushort_as_half(unsigned short u) {
    __half h;
    __builtin_memcpy(&h.v, &u, 2);
    return h;
}
