// Device-side stand-ins that let kernels/*.cu compile as C++ and run on the CPU
// (tests/cuda_emu, driven by tests/common/cuda_emu.rs). Included before every kernel file.
//
// Execution model (runtime.cpp): one launch runs its blocks one after another; the threads
// of a block are real OS threads, so __syncthreads is a barrier over the block and the
// warp shuffles exchange values through a per-warp barrier. `__shared__` variables become
// function statics, shared by every thread; that is per-block memory because blocks never
// run at the same time. Arithmetic is the C++ compiler's fp32 (no FMA contraction), so a
// kernel's numbers are what its code says, not what a GPU's instruction selection gives.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct emu_dim3 {
    unsigned int x, y, z;
};
struct EmuThreadState {
    emu_dim3 tid, bid, bdim, gdim;
};
extern thread_local EmuThreadState emu_state;
#define threadIdx (emu_state.tid)
#define blockIdx (emu_state.bid)
#define blockDim (emu_state.bdim)
#define gridDim (emu_state.gdim)

extern "C" void __syncthreads();
extern "C" int __syncthreads_or(int pred);
extern "C" uint64_t emu_shfl64(uint64_t v, int src_lane);
extern "C" void* emu_dyn_smem();
extern "C" int emu_lane();

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

// Registers kernel `name` with the emulated driver (cuModuleGetFunction finds it by name):
// a thunk unpacks cuLaunchKernel's argument pointers into the kernel's parameters.
typedef void (*EmuThunk)(void** params);
extern "C" void emu_register(const char* name, EmuThunk thunk);
template <typename... A, size_t... I>
inline void emu_call_impl(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<typename std::remove_reference<A>::type*>(p[I])...);
}
template <typename... A>
inline void emu_call(void (*f)(A...), void** p) {
    emu_call_impl(f, p, std::index_sequence_for<A...>{});
}
#define EMU_REGISTER(name)                                                           \
    static void emu_thunk_##name(void** p) { emu_call(name, p); }                    \
    static int emu_reg_##name = (emu_register(#name, emu_thunk_##name), 0);
