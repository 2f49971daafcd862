// Warp-level tensor-core MMA for the 16-bit attention kernels (kernels/attention_mma.cu):
// mma.sync m16n8k16 with bf16 or fp16 inputs and fp32 accumulation, and the packing of
// 16-bit values into its fragment registers.
//
// Fragment layout (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"),
// with g = lane / 4 and c = 2 * (lane % 4); each register holds two 16-bit values, the
// lower column (or k) index in the low half:
//   A (16 x 16, row-major): a[0] (g, c..c+1)   a[1] (g+8, c..c+1)
//                           a[2] (g, c+8..c+9) a[3] (g+8, c+8..c+9)
//   B (16 x 8, k x n):      b[0] (k c..c+1, n g)  b[1] (k c+8..c+9, n g)
//   C (16 x 8, fp32):       c[0..1] (g, c..c+1)   c[2..3] (g+8, c..c+1)
// So the C fragments of two n-tiles side by side are, after packing, exactly the A fragment
// of a 16 x 16 tile: scores computed by one MMA feed the next without leaving registers.
//
// The CPU emulator (tests/cuda_emu) implements the same instruction with the same layout.
#pragma once
#include "common.cuh"

// CODE: the storage code of the type (common.cuh `ld` / `st`, `round_as`).
struct Bf16Tag {
    static constexpr int CODE = 1;
};
struct F16Tag {
    static constexpr int CODE = 2;
};

__device__ __forceinline__ unsigned short to_bits(float x, Bf16Tag) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
__device__ __forceinline__ unsigned short to_bits(float x, F16Tag) { return __half_as_ushort(__float2half_rn(x)); }

// x rounded to the 16-bit type and back: what a 16-bit store and load give.
__device__ __forceinline__ float round16(float x, Bf16Tag) { return round_as(x, 1); }
__device__ __forceinline__ float round16(float x, F16Tag) { return round_as(x, 2); }

// Two values rounded to 16 bits in one register, `lo` in the low half.
template <typename Tag>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    return (unsigned)to_bits(lo, Tag()) | ((unsigned)to_bits(hi, Tag()) << 16);
}
// Two 16-bit values already in shared memory.
__device__ __forceinline__ unsigned join2(unsigned short lo, unsigned short hi) {
    return (unsigned)lo | ((unsigned)hi << 16);
}

// c += a b over the warp (every lane calls it with its fragments).
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2], Bf16Tag) {
#ifdef DEEPCUT_CUDA_EMU
    emu_mma_16816(c, a, b, true);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2], F16Tag) {
#ifdef DEEPCUT_CUDA_EMU
    emu_mma_16816(c, a, b, false);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// ---- fragments straight from shared memory (ldmatrix) -----------------------------------
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: four 8 x 8 matrices of 16-bit values;
// lane 8 i + r passes the address of row r of matrix i (16 bytes, 16-byte aligned), and
// register i of lane l receives matrix i's (row l / 4, columns 2 (l % 4), + 1), lower
// column in the low half; with .trans, (rows 2 (l % 4), + 1 of column l / 4): the matrix
// transposed. So one instruction yields a whole A fragment (matrices = the four 8 x 8
// quarters in a[] order), or the B fragments of two n-tiles, where the 32-bit loads above
// take 4 (A), 2 (B from [n][k]) or 4 16-bit loads (B from [k][n]) per register.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const unsigned short* row) {
#ifdef DEEPCUT_CUDA_EMU
    emu_ldmatrix(r, 0, row);
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const unsigned short* row) {
#ifdef DEEPCUT_CUDA_EMU
    emu_ldmatrix(r, 1, row);
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

// ---- global to shared memory without registers (cp.async, sm_80+) -----------------------
// 16 bytes from global src to shared dst (both 16-byte aligned), in the background: the
// copies a thread issued since its last commit form a group; wait<N> returns once all but
// the N newest groups have landed (in this thread's view: a barrier must follow before
// other threads read them). .cg: cached in L2 only, the data is read once per block.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
#ifdef DEEPCUT_CUDA_EMU
    emu_cp_async(dst, src, 16);
#else
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef DEEPCUT_CUDA_EMU
    emu_cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef DEEPCUT_CUDA_EMU
    emu_cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
