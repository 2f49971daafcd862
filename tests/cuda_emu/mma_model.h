// The tensor cores' truncating accumulation, shared by the emulator's mma.sync
// (cuda_emu.h, CUDA_EMU_MMA=truncate) and its cuBLAS (cublas.cpp: 16-bit GEMMs run on
// tensor cores too). As those who measured tensor cores describe it (Fasi, Higham,
// Mikaitis, Pranesh, "Numerical behavior of NVIDIA tensor cores", PeerJ CS 2021;
// Khattak, Mikaitis, "Accurate models of NVIDIA tensor cores", 2025), in its least
// accurate reported variant: the exact products and c aligned to the largest of them, each
// cut toward zero 24 bits below that one's leading bit, added exactly, the sum cut toward
// zero to fp32. The Rust model of the same: src/backend/cpu/mma_probe.rs (TRUNCATING).
#pragma once
#include <math.h>
#include <stdint.h>

// 2^e for e in the normal range of a double, built from its bits (ldexp / frexp were a
// third of the emulator's time with CUDA_EMU_MMA=truncate); exact, as they are.
inline double emu_pow2(int e) {
    if (e < -1022 || e > 1023) return ldexp(1.0, e);
    const uint64_t bits = (uint64_t)(e + 1023) << 52;
    double d;
    __builtin_memcpy(&d, &bits, 8);
    return d;
}

// frexp's exponent of a finite nonzero double: |t| in [2^(e-1), 2^e)
inline int emu_exponent(double t) {
    uint64_t bits;
    __builtin_memcpy(&bits, &t, 8);
    const int field = (int)((bits >> 52) & 0x7ff);
    if (field == 0) {  // subnormal (no product of 16-bit values is; kept exact anyway)
        int e;
        frexp(t, &e);
        return e;
    }
    return field - 1022;
}

// c plus the exact products a[q] * b[q * bstride] of 16-bit values (q < n <= 16).
inline float emu_dot_truncated(float c, const float* a, const float* b, int bstride, int n) {
    double t[17];
    t[0] = (double)c;
    for (int k = 0; k < n; ++k) t[k + 1] = (double)a[k] * (double)b[k * bstride];  // exact
    int emax = INT32_MIN;
    for (int k = 0; k <= n; ++k) {
        if (!isfinite(t[k])) {  // inf / NaN: IEEE's answer, as the hardware gives for these
            float s = 0.0f;
            for (int q = 0; q < n; ++q) s += a[q] * b[q * bstride];
            return c + s;
        }
        if (t[k] != 0.0) {
            const int e = emu_exponent(t[k]);  // |t| in [2^(e-1), 2^e)
            if (e > emax) emax = e;
        }
    }
    if (emax == INT32_MIN) return c + 0.0f;
    // fixed point with its last bit 24 bits below the largest term's leading bit
    const int lsb = emax - 1 - 23;
    long long sum = 0;
    const double scale = emu_pow2(-lsb);
    for (int k = 0; k <= n; ++k) sum += (long long)trunc(t[k] * scale);  // t * 2^-lsb: exact
    const double exact = (double)sum * emu_pow2(lsb);  // |sum| < 17 * 2^24: exact in a double
    float r = (float)exact;                          // to nearest, then toward zero
    if (fabs((double)r) > fabs(exact)) r = nextafterf(r, 0.0f);
    return r;
}
