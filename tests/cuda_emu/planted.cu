// Kernels with one planted bug each, built into the emulator only (never into the engine):
// tests/gpu_parity.rs `sanitizers_catch_planted_bugs` launches them under the sanitizer
// builds and requires each report, so a sanitizer run that reports nothing has shown
// something. One block of `n` threads (unless said otherwise), `n` floats of dynamic shared
// memory, `out` of n.

// Reads a neighbour's shared-memory slot with no __syncthreads after the writes: racecheck.
extern "C" __global__ void planted_missing_syncthreads(float* out, int n) {
    extern __shared__ float smem[];
    const int t = threadIdx.x;
    smem[t] = (float)t;
    out[t] = smem[(t + 1) % n];
}

// Orders a neighbour's shared-memory write by a warp shuffle alone, with no __syncwarp: a
// shuffle exchanges registers and orders no memory, so this is a race too (racecheck).
extern "C" __global__ void planted_shuffle_as_a_fence(float* out, int n) {
    extern __shared__ float smem[];
    const int t = threadIdx.x;
    smem[t] = (float)t;
    const float v = __shfl_sync(0xffffffffu, (float)t, (t + 1) & 31);
    out[t] = v + smem[t ^ 1];
}

// A warp sum by full-mask xor shuffles (common.cuh's warp_sum) after the upper half of
// every warp has returned: its shuffles read lanes that have exited, whose values are
// undefined on a GPU; the emulator refuses the read.
extern "C" __global__ void planted_shuffle_from_exited_lanes(float* out, int n) {
    const int t = threadIdx.x;
    if ((t & 31) >= 16) return;
    float x = (float)t;
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    out[t] = x;
}

// The same sum with every lane there: the control (out[0] = 0 + 1 + ... + 31 = 496) in a
// block of whole warps; in a block of 48 threads the second warp's shuffles read lanes
// past the block's last thread (planted by the launch), refused too.
extern "C" __global__ void planted_warp_sum(float* out, int n) {
    const int t = threadIdx.x;
    float x = (float)(t & 31);
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    out[t] = x;
}

// The two halves of the block wait at two different __syncthreads: a divergent barrier,
// undefined on a GPU (compute-sanitizer's synccheck reports it); the emulator refuses it.
extern "C" __global__ void planted_divergent_syncthreads(float* out, int n) {
    extern __shared__ float smem[];
    const int t = threadIdx.x;
    if (t < n / 2) {
        smem[t] = (float)t;
        __syncthreads();
        out[t] = smem[n / 2 - 1 - t];
    } else {
        smem[t] = 2.0f * t;
        __syncthreads();
        out[t] = smem[n - 1 - (t - n / 2)] + 1.0f;
    }
}

// Stores one element past the end of `out` (`<=` for `<`): memcheck.
extern "C" __global__ void planted_write_past_the_end(float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.0f;
}

// The first kernel with its barrier: the control, which neither sanitizer may report.
extern "C" __global__ void planted_control_with_syncthreads(float* out, int n) {
    extern __shared__ float smem[];
    const int t = threadIdx.x;
    smem[t] = (float)t;
    __syncthreads();
    out[t] = smem[(t + 1) % n];
}

// Adds into a static __shared__ array it never zeroed. On a GPU a block's shared memory
// starts as whatever was there; the emulator's statics start as zeros (the first block) or
// as the previous block's values, which hides the bug unless CUDA_EMU_FILL=nan refills
// them before each block (out then NaN).
extern "C" __global__ void planted_static_shared_never_zeroed(float* out, int n) {
    __shared__ float acc[64];
    const int t = threadIdx.x;
    acc[t] += (float)t;
    __syncthreads();
    out[t] = acc[(t + 1) % n];
}

// The same with the zeroing: the control, finite under the refill.
extern "C" __global__ void planted_static_shared_zeroed(float* out, int n) {
    __shared__ float acc[64];
    const int t = threadIdx.x;
    acc[t] = 0.0f;
    acc[t] += (float)t;
    __syncthreads();
    out[t] = acc[(t + 1) % n];
}

// Every block adds 1 to out[0] with a plain read-modify-write, no atomic: racecheck sees it
// only if blocks are not ordered one after another (the ThreadSanitizer build's slots).
// Launched on a grid of (1, 4, 1), as the last-block kernels below.
extern "C" __global__ void planted_blocks_add_without_atomics(float* out, int n) {
    if (threadIdx.x == 0) out[0] += 1.0f;
}

// out[0] = the sum of the grid's partials out[1 ..= gridDim.y], in block order: the last
// block's work in the three kernels below.
__device__ void sum_partials(float* out) {
    float s = 0.0f;
    for (unsigned y = 0; y < gridDim.y; ++y) s += out[1 + y];
    out[0] = s;
}

// The last-block pattern of common.cuh (`last_block_of_column`: each block writes a
// partial, takes a ticket, and the block that takes the last one sums the partials), with
// the planted bug: thread 1 writes the block's partial and thread 0 takes the ticket with no
// __syncthreads between them, so the last block's sum is not ordered after that partial.
// out[1 + y] holds block y's partial, out[n - 1] the ticket counter (as unsigned, zero).
extern "C" __global__ void planted_last_block_ticket_before_its_partial(float* out, int n) {
    __shared__ bool last;
    unsigned* counter = (unsigned*)&out[n - 1];
    if (threadIdx.x == 1) out[1 + blockIdx.y] = (float)(blockIdx.y + 1);
    if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.y - 1;
    __syncthreads();
    if (last && threadIdx.x == 0) sum_partials(out);
}

// The same with the __syncthreads but no __threadfence before the ticket: on a GPU the last
// block may read a partial that is not yet visible to it (CUDA Programming Guide, "Memory
// Fence Functions"; atomicAdd is relaxed). The ThreadSanitizer build's relaxed atomics and
// fences (cuda_emu.h) leave the partials unordered before the last block's sum.
extern "C" __global__ void planted_last_block_without_fence(float* out, int n) {
    __shared__ bool last;
    unsigned* counter = (unsigned*)&out[n - 1];
    if (threadIdx.x == 1) out[1 + blockIdx.y] = (float)(blockIdx.y + 1);
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.y - 1;
    __syncthreads();
    if (last && threadIdx.x == 0) sum_partials(out);
}

// The control: the same with common.cuh's own `last_block_of_column`, which orders the
// partial before the ticket (barrier and fence); out[0] = 1 + 2 + 3 + 4 = 10 on a grid of 4 blocks.
#include "common.cuh"
extern "C" __global__ void planted_last_block_control(float* out, int n) {
    unsigned* counter = (unsigned*)&out[n - 1];
    if (threadIdx.x == 1) out[1 + blockIdx.y] = (float)(blockIdx.y + 1);
    if (last_block_of_column(counter) && threadIdx.x == 0) sum_partials(out);
}

// Two 16-bit shared-memory values read as one 32-bit word (common.cuh `ld_vec`, the wide
// access of the 16-bit kernels) at element `off`: at an odd element the address is 2 bytes
// past a word, which a GPU faults on ("misaligned address") and the emulator refuses; at an
// even one out[0] = off + (off + 1), the control.
#include "common.cuh"
__device__ void pair_at(float* out, int off) {
    __shared__ __align__(16) unsigned short h[64];
    const int t = threadIdx.x;
    if (t < 64) h[t] = (unsigned short)t;
    __syncthreads();
    if (t == 0) {
        const unsigned u = ld_vec<unsigned>(h + off);
        out[0] = (float)(u & 0xffffu) + (float)(u >> 16);
    }
}
extern "C" __global__ void planted_misaligned_load2(float* out, int n) { pair_at(out, 1); }
extern "C" __global__ void planted_aligned_load2(float* out, int n) { pair_at(out, 2); }

// Not a bug: exp2f of n arguments that are not integers, out[t] = exp2f(-3 + t / 64), for
// `emulator_models_a_gpus_functions`: the host's results, or with CUDA_EMU_MATH=approx
// results up to 2 ulp off, as a GPU's exp2f may be (cuda_emu.h).
extern "C" __global__ void planted_exp2f(float* out, int n) {
    const int t = threadIdx.x;
    if (t < n) out[t] = exp2f(-3.0f + (float)t * 0.015625f + 0.001f);
}
