// Kernels with one planted bug each, built into the emulator only (never into the engine):
// tests/gpu_parity.rs `sanitizers_catch_planted_bugs` launches them under the sanitizer
// builds and requires each report, so a sanitizer run that reports nothing has shown
// something. One block of `n` threads, `n` floats of dynamic shared memory, `out` of n.

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
