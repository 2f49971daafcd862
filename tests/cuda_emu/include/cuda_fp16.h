// CPU stand-in for CUDA's cuda_fp16.h (tests/cuda_emu): IEEE binary16 through GCC's
// _Float16, whose conversions round to nearest even, keep subnormals and overflow to inf,
// as __float2half_rn does.
#pragma once

struct __half {
    _Float16 v;
};
typedef __half half;

inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
// Decoded by hand: GCC 12 widens _Float16 through libgcc's soft __extendhfsf2, which was
// 40% of the emulator's time in the 16-bit InfoNCE tests. Exact (the widening is), with
// subnormals scaled by 2^-24 and NaN quieted as the conversion does.
inline float emu_half_bits_to_float(unsigned short h) {
    const unsigned sign = (unsigned)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    unsigned bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0u);
    } else if (exp == 0) {
        const float f = (float)man * 5.9604644775390625e-8f;  // man * 2^-24, exact
        __builtin_memcpy(&bits, &f, 4);
        bits |= sign;
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}
inline float __half2float(__half h) {
    unsigned short u;
    __builtin_memcpy(&u, &h.v, 2);
    return emu_half_bits_to_float(u);
}

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
