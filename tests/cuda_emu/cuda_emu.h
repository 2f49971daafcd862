// Device-side stand-ins that let kernels/*.cu compile as C++ and run on the CPU
// (tests/cuda_emu, driven by tests/common/cuda_emu.rs). Included before every kernel file.
//
// Execution model (runtime.cpp): one launch runs its blocks one after another; the threads
// of a block are fibers on the launching thread, switched only where they wait, so
// __syncthreads is a barrier over the block and the warp shuffles exchange values through
// a per-warp barrier. `__shared__` variables become
// function statics, shared by every thread; that is per-block memory because blocks never
// run at the same time (with CUDA_EMU_FILL=nan they are refilled before each block). Each
// kernel file is compiled EMU_SLOTS times (-DEMU_SLOT=0, 1, ...; the ThreadSanitizer build
// has 4 slots, the others 1), its code in an anonymous namespace, so each slot's copy of a
// kernel has its own statics and blocks in different slots share no shared memory
// (runtime.cpp, "Slots"). Arithmetic is the C++ compiler's fp32 (no FMA contraction), so a
// kernel's numbers are what its code says, not what a GPU's instruction selection gives.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <type_traits>
#include <utility>
#include <cuda_bf16.h>  // the mma fragments' decodes (emu_b16_value)
#include <cuda_fp16.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Kernels test this to swap inline PTX (mma.sync) for the emulator's version.
#define DEEPCUT_CUDA_EMU 1
#ifndef EMU_SLOTS
#define EMU_SLOTS 1
#endif
#ifndef EMU_SLOT
#define EMU_SLOT 0
#endif

struct emu_dim3 {
    unsigned int x, y, z;
};
struct EmuThreadState {
    emu_dim3 tid, bid, bdim, gdim;
};
// initial-exec: read %fs-relative, without a __tls_get_addr call per threadIdx. Besides
// speed, ThreadSanitizer's __tls_get_addr interceptor guesses the size of a dynamic TLS
// block from the bytes before it when the block's address is 16 past a page (its glibc
// <= 2.18 heuristic): now and then it reset the shadow of a garbage range and killed the
// process ("failed to allocate 0x1fd58a5abb000 bytes").
extern thread_local EmuThreadState emu_state __attribute__((tls_model("initial-exec")));
#define threadIdx (emu_state.tid)
#define blockIdx (emu_state.bid)
#define blockDim (emu_state.bdim)
#define gridDim (emu_state.gdim)

extern "C" void __syncthreads();
extern "C" int __syncthreads_or(int pred);
extern "C" uint64_t emu_shfl64(uint64_t v, int src_lane);
extern "C" void* emu_dyn_smem();
extern "C" int emu_lane();
// A GPU faults ("misaligned address") on an access wider than its element type whose
// address is not a multiple of its width; host C++ does it anyway, so the kernels' wide
// accesses (common.cuh `ld_vec` / `st_vec`, mma.cuh's ldmatrix and cp.async) ask here first,
// and a misaligned one aborts naming
// block, thread and address.
extern "C" void emu_misaligned(const void* p, int bytes, const char* what);
inline void emu_aligned(const void* p, int bytes, const char* what) {
    if ((uintptr_t)p % (uintptr_t)bytes) emu_misaligned(p, bytes, what);
}
// Every lane of the calling warp passes `bytes` (<= 64) bytes; `all` [32][64] receives each
// lane's bytes at lane * 64 (one warp barrier, like a shuffle).
extern "C" void emu_warp_gather(const void* mine, int bytes, void* all);
// kernels/mma.cuh's ldmatrix_x4[_trans] (trans 0 / 1) and cp.async (runtime.cpp).
extern "C" void emu_ldmatrix(unsigned* out, int trans, const void* row);
extern "C" void emu_cp_async(void* dst, const void* src, int bytes);
extern "C" void emu_cp_async_commit();
extern "C" void emu_cp_async_wait(int newest_pending);

template <typename T>
inline T __shfl_sync(unsigned int, T v, int src) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a plain value");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    u = emu_shfl64(u, src & 31);
    T r;
    memcpy(&r, &u, sizeof(T));
    return r;
}
template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T v, int o) {
    return __shfl_sync(mask, v, emu_lane() ^ o);
}

// Blocks run one after another on one OS thread, so a fence has nothing to order; the
// atomic is a real one all the same (tests may launch from several threads).
// The ThreadSanitizer build (EMU_TSAN_KERNELS) models CUDA's memory model instead: atomicAdd
// is relaxed and orders nothing (runtime.cpp does it, unseen by TSan), and every
// __threadfence releases to and acquires from one device-wide fence object. So a block that
// writes partials for the "last block" to read must fence them before its ticket, or the
// last block's reads race with them; fences then order more than CUDA's (any two fences
// synchronise), so a last block that forgets its own fence after the ticket goes unseen
// when it fenced before it.
#if defined(EMU_TSAN_KERNELS)
extern "C" void emu_threadfence();
extern "C" unsigned int emu_atomic_add_relaxed(unsigned int* p, unsigned int v);
inline void __threadfence() { emu_threadfence(); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return emu_atomic_add_relaxed(p, v); }
#else
inline void __threadfence() {}
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
#endif
template <typename T>
inline T __ldcg(const T* p) { return *p; }

struct uint2 {
    unsigned int x, y;
};
struct uint4 {
    unsigned int x, y, z, w;
};
inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }

inline unsigned int __umulhi(unsigned int a, unsigned int b) { return (unsigned int)(((uint64_t)a * b) >> 32); }
inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    memcpy(&i, &f, 4);
    return i;
}
template <typename A, typename B>
inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a < (C)b ? (C)a : (C)b;
}
template <typename A, typename B>
inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a < (C)b ? (C)b : (C)a;
}

// Registers slot EMU_SLOT's copy of kernel `name` with the emulated driver
// (cuModuleGetFunction finds it by name): a thunk unpacks cuLaunchKernel's argument
// pointers into the kernel's parameters.
typedef void (*EmuThunk)(void** params);
extern "C" void emu_register(const char* name, int slot, EmuThunk thunk);
template <typename... A, size_t... I>
inline void emu_call_impl(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<typename std::remove_reference<A>::type*>(p[I])...);
}
template <typename... A>
inline void emu_call(void (*f)(A...), void** p) {
    emu_call_impl(f, p, std::index_sequence_for<A...>{});
}
// The size of each parameter, so a launch the runtime defers can copy the arguments, as
// cuLaunchKernel does when it is called (runtime.cpp "Deferred work").
extern "C" void emu_register_params(const char* name, int n, const size_t* sizes);
template <typename... A>
inline int emu_register_params_of(const char* name, void (*)(A...)) {
    static const size_t sizes[] = {0, sizeof(typename std::remove_reference<A>::type)...};
    emu_register_params(name, (int)sizeof...(A), sizes + 1);
    return 0;
}
#define EMU_REGISTER(name)                                                           \
    static void emu_thunk_##name(void** p) { emu_call(name, p); }                    \
    static int emu_reg_##name = (emu_register(#name, EMU_SLOT, emu_thunk_##name),    \
                                 emu_register_params_of(#name, name), 0);

// The single-precision functions the kernels call, as a GPU's may differ from the host's:
// with CUDA_EMU_MATH=approx (runtime.cpp emu_math_approx) each result is moved by up to the
// CUDA Math API's documented error (expf, exp2f, erff 2 ulp; logf, log2f 1 ulp), by an
// amount picked by a hash of the argument, so the same argument always gives the same
// result, as on a GPU; results that are exact on both (2^n of an integer, log2 of a power of two, exp 0, 0)
// are kept. Without it the host's functions (glibc: within 1 ulp, mostly correctly rounded)
// are what the CPU twins call too. In the kernels' anonymous namespace (tests/common/
// cuda_emu.rs), where unqualified calls find these before math.h's.
extern "C" int emu_math_approx();
inline float emu_ulps(float r, float x, int max_ulp) {
    if (!emu_math_approx() || !isfinite(r) || r == 0.0f) return r;
    uint32_t h;
    memcpy(&h, &x, 4);
    h *= 0x9E3779B1u;
    h ^= h >> 15;
    h *= 0x85EBCA77u;
    h ^= h >> 13;
    const int k = (int)(h % (uint32_t)(2 * max_ulp + 1)) - max_ulp;
    uint32_t rb;
    memcpy(&rb, &r, 4);
    const uint32_t mag = rb & 0x7fffffffu;
    if ((k < 0 && mag < (uint32_t)-k) || mag + (uint32_t)(k > 0 ? k : 0) >= 0x7f800000u) return r;
    rb = (rb & 0x80000000u) | (mag + (uint32_t)k);
    memcpy(&r, &rb, 4);
    return r;
}
namespace {
inline float exp2f(float x) { return x == truncf(x) ? ::exp2f(x) : emu_ulps(::exp2f(x), x, 2); }
inline float expf(float x) { return x == 0.0f ? 1.0f : emu_ulps(::expf(x), x, 2); }
inline float logf(float x) { return emu_ulps(::logf(x), x, 1); }
inline float log2f(float x) {
    const float r = ::log2f(x);  // an integer for a power of two: exact
    return r == truncf(r) ? r : emu_ulps(r, x, 1);
}
inline float erff(float x) { return emu_ulps(::erff(x), x, 2); }
}  // namespace

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 with c as both C and D:
// the warp's fragments are gathered, decoded with the PTX ISA layout (kernels/mma.cuh), and
// each lane computes its four outputs as c + (sum over k of the exact products, in fp32),
// the order the CPU twins follow. With CUDA_EMU_MMA=truncate (runtime.cpp emu_mma_truncate)
// it computes them as tensor cores are reported to (mma_model.h): fp16 products carry 22
// significant bits and lose their low bits to the alignment; bf16 products carry 16 and
// mostly do not: the emulator then shows the fp16-only differences the H200 showed.
#include "mma_model.h"
extern "C" int emu_mma_truncate();
// a fragment's 16-bit value, decoded as the emulator's cuda_bf16.h / cuda_fp16.h decode it
inline float emu_b16_value(unsigned short u, bool bf16) {
    return bf16 ? __bfloat162float(__nv_bfloat16{u}) : emu_half_bits_to_float(u);
}
inline void emu_mma_16816(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2], bool bf16) {
    struct Frag {
        unsigned a[4], b[2];
    } mine;
    static_assert(sizeof(Frag) <= 64, "gather slot");
    memcpy(mine.a, a, sizeof mine.a);
    memcpy(mine.b, b, sizeof mine.b);
    unsigned char all[32][64];
    emu_warp_gather(&mine, sizeof mine, all);
    // Only what this lane reads is decoded: rows g and g + 8 of A (held by lanes 4g..4g+3)
    // and columns c2, c2 + 1 of B (lanes 4 c2..4 c2 + 7); decoding all 384 values in every
    // lane was most of the emulator's time in the 16-bit InfoNCE tests.
    const int lane = emu_lane(), g = lane >> 2, c2 = (lane & 3) * 2;
    float A[16][16], B[16][8];
    for (int from = 0; from < 32; ++from) {
        const int fg = from >> 2, fc2 = (from & 3) * 2;
        const bool a_rows = fg == g, b_cols = fg == c2 || fg == c2 + 1;
        if (!a_rows && !b_cols) continue;
        Frag f;
        memcpy(&f, all[from], sizeof f);
        for (int r = 0; a_rows && r < 4; ++r) {
            const int row = fg + (r & 1) * 8, col = fc2 + (r >> 1) * 8;
            A[row][col] = emu_b16_value((unsigned short)(f.a[r] & 0xffffu), bf16);
            A[row][col + 1] = emu_b16_value((unsigned short)(f.a[r] >> 16), bf16);
        }
        for (int r = 0; b_cols && r < 2; ++r) {
            const int k = fc2 + r * 8;
            B[k][fg] = emu_b16_value((unsigned short)(f.b[r] & 0xffffu), bf16);
            B[k + 1][fg] = emu_b16_value((unsigned short)(f.b[r] >> 16), bf16);
        }
    }
    if (emu_mma_truncate()) {
        for (int r = 0; r < 4; ++r) {
            const int row = g + (r >> 1) * 8, col = c2 + (r & 1);
            c[r] = emu_dot_truncated(c[r], A[row], &B[0][col], 8, 16);
        }
        return;
    }
    for (int r = 0; r < 4; ++r) {
        const int row = g + (r >> 1) * 8, col = c2 + (r & 1);
        float sum = 0.0f;
        for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
        c[r] += sum;
    }
}
