// A CPU stand-in for the cuBLAS calls of the engine (tests/cuda_emu): handles, stream and
// math mode, cublasSgemm_v2 and cublasGemmEx, column-major as cuBLAS. GemmEx with a
// CUBLAS_COMPUTE_32F_FAST_16BF / _16F compute type rounds every A and B element to bf16 /
// fp16 first, as tensor cores read them: a caller that passes values not representable in
// 16 bits (breaking Backend::gemm's promise) gets a visibly different product.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "include/cuda_bf16.h"
#include "include/cuda_fp16.h"

typedef int cublasStatus_t;
static int dummy_handle;

enum { N_OP = 0, T_OP = 1 };
enum { R_32F = 0, R_16F = 2, R_16BF = 14 };
enum { COMPUTE_32F = 68, COMPUTE_32F_FAST_16F = 74, COMPUTE_32F_FAST_16BF = 75 };

static float load(const void* p, int type, size_t i) {
    switch (type) {
        case R_32F: return ((const float*)p)[i];
        case R_16BF: return __bfloat162float(((const __nv_bfloat16*)p)[i]);
        default: return __half2float(((const __half*)p)[i]);
    }
}
static void store(void* p, int type, size_t i, float v) {
    switch (type) {
        case R_32F: ((float*)p)[i] = v; break;
        case R_16BF: ((__nv_bfloat16*)p)[i] = __float2bfloat16_rn(v); break;
        default: ((__half*)p)[i] = __float2half_rn(v);
    }
}

static cublasStatus_t gemm(int ta, int tb, int m, int n, int k, float alpha, const void* a, int at, int lda,
                           const void* b, int bt, int ldb, float beta, void* c, int ct, int ldc, int round) {
    if (m < 0 || n < 0 || k < 0) return 7;
    auto rd = [round](float x) {
        if (round == COMPUTE_32F_FAST_16BF) return __bfloat162float(__float2bfloat16_rn(x));
        if (round == COMPUTE_32F_FAST_16F) return __half2float(__float2half_rn(x));
        return x;
    };
    // op(A) as rows [m][k] and op(B) as columns [n][k], converted (and rounded) once
    std::vector<float> ar((size_t)m * k), bc((size_t)n * k);
    for (int i = 0; i < m; ++i)
        for (int l = 0; l < k; ++l)
            ar[(size_t)i * k + l] = rd(load(a, at, ta == N_OP ? i + (size_t)l * lda : l + (size_t)i * lda));
    for (int j = 0; j < n; ++j)
        for (int l = 0; l < k; ++l)
            bc[(size_t)j * k + l] = rd(load(b, bt, tb == N_OP ? l + (size_t)j * ldb : j + (size_t)l * ldb));
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            const float* x = &ar[(size_t)i * k];
            const float* y = &bc[(size_t)j * k];
            float acc = 0.0f;
            for (int l = 0; l < k; ++l) acc += x[l] * y[l];
            size_t o = i + (size_t)j * ldc;
            float v = alpha * acc;
            if (beta != 0.0f) v += beta * load(c, ct, o);
            store(c, ct, o, v);
        }
    return 0;
}

extern "C" {
cublasStatus_t cublasCreate_v2(void** h) {
    *h = &dummy_handle;
    return 0;
}
cublasStatus_t cublasDestroy_v2(void*) { return 0; }
cublasStatus_t cublasSetStream_v2(void*, void*) { return 0; }
cublasStatus_t cublasSetMathMode(void*, int) { return 0; }
cublasStatus_t cublasGetMathMode(void*, int* m) {
    *m = 0;
    return 0;
}
cublasStatus_t cublasSetPointerMode_v2(void*, int) { return 0; }
cublasStatus_t cublasGetPointerMode_v2(void*, int* m) {
    *m = 0;
    return 0;
}
cublasStatus_t cublasSetWorkspace_v2(void*, void*, size_t) { return 0; }
cublasStatus_t cublasSgemm_v2(void*, int ta, int tb, int m, int n, int k, const float* alpha, const float* a, int lda,
                              const float* b, int ldb, const float* beta, float* c, int ldc) {
    return gemm(ta, tb, m, n, k, *alpha, a, R_32F, lda, b, R_32F, ldb, *beta, c, R_32F, ldc, COMPUTE_32F);
}
cublasStatus_t cublasGemmEx(void*, int ta, int tb, int m, int n, int k, const void* alpha, const void* a, int at,
                            int lda, const void* b, int bt, int ldb, const void* beta, void* c, int ct, int ldc,
                            int compute, int) {
    return gemm(ta, tb, m, n, k, *(const float*)alpha, a, at, lda, b, bt, ldb, *(const float*)beta, c, ct, ldc,
                compute);
}
}
