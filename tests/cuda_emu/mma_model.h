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
            int e;
            frexp(t[k], &e);  // |t| in [2^(e-1), 2^e)
            if (e > emax) emax = e;
        }
    }
    if (emax == INT32_MIN) return c + 0.0f;
    // fixed point with its last bit 24 bits below the largest term's leading bit
    const int lsb = emax - 1 - 23;
    long long sum = 0;
    for (int k = 0; k <= n; ++k) sum += (long long)trunc(ldexp(t[k], -lsb));
    const double exact = ldexp((double)sum, lsb);  // |sum| < 17 * 2^24: exact in a double
    float r = (float)exact;                          // to nearest, then toward zero
    if (fabs((double)r) > fabs(exact)) r = nextafterf(r, 0.0f);
    return r;
}
