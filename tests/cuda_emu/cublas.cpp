// A CPU stand-in for the cuBLAS and cuBLASLt calls of the engine (tests/cuda_emu): handles,
// stream and math mode, cublasSgemm_v2 and cublasGemmEx, column-major as cuBLAS; and the
// cuBLASLt matmul with its descriptors, layouts (fp32, bf16, fp16), heuristic and the BIAS
// epilogue with an fp32 bias (this file
// is built once and installed as both libcublas.so and libcublasLt.so). GemmEx with a
// CUBLAS_COMPUTE_32F_FAST_16BF / _16F compute type rounds every A and B element to bf16 /
// fp16 first, as tensor cores read them: a caller that passes values not representable in
// 16 bits (breaking Backend::gemm's promise) gets a visibly different product.
#include <cmath>
#include <dlfcn.h>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <vector>
#include "mma_model.h"

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

// CUDA_EMU_NO_WORK=1 (runtime.cpp): GEMMs are checked and counted, not computed. This
// library is loaded under both cuBLAS names, so each copy prints the calls it served.
static unsigned long long blas_calls, lt_calls, lt_heuristics;
static void print_gemms() {
    if (blas_calls) fprintf(stderr, "cuda_emu counters: cublas gemms %llu\n", blas_calls);
    if (lt_calls)
        fprintf(stderr, "cuda_emu counters: cublasLt matmuls %llu, heuristic queries %llu\n", lt_calls,
                lt_heuristics);
}
static bool no_work() {
    static const bool on = [] {
        const char* v = getenv("CUDA_EMU_NO_WORK");
        bool set = v && *v && strcmp(v, "0") != 0;
        if (set) atexit(print_gemms);
        return set;
    }();
    return on;
}

// The emulated driver's queue (runtime.cpp "Deferred work"): a GEMM is stream work, run
// when the host waits. Found in the libcuda.so this process already has open (the engine
// opens the driver before cuBLAS); without it GEMMs would run ahead of the kernels queued
// before them, so that is an error, not a fallback.
typedef int (*DeferFn)(void (*)(void*), void*);
static DeferFn defer_fn() {
    static const DeferFn f = [] {
        for (const char* name : {"libcuda.so", "libcuda.so.1"}) {
            if (void* h = dlopen(name, RTLD_NOW | RTLD_NOLOAD))
                if (void* sym = dlsym(h, "emu_defer")) return (DeferFn)sym;
        }
        fprintf(stderr, "cuda_emu: cuBLAS found no emulated libcuda.so open in this process\n");
        abort();
        return (DeferFn) nullptr;
    }();
    return f;
}

struct Gemm {
    int ta, tb, m, n, k;
    float alpha;
    const void* a;
    int at, lda;
    const void* b;
    int bt, ldb;
    float beta;
    void* c;
    int ct, ldc, round;
    const float* bias;
};
static void gemm_now(const Gemm& g);
static void run_gemm(void* p) {
    Gemm* g = (Gemm*)p;
    gemm_now(*g);
    delete g;
}

// Checks the call now (as cuBLAS does) and queues the product; alpha and beta are read
// now (host pointer mode).
static cublasStatus_t gemm(int ta, int tb, int m, int n, int k, float alpha, const void* a, int at, int lda,
                           const void* b, int bt, int ldb, float beta, void* c, int ct, int ldc, int round,
                           const float* bias = nullptr) {
    if (m < 0 || n < 0 || k < 0) return 7;
    if (no_work()) return 0;
    Gemm* g = new Gemm{ta, tb, m, n, k, alpha, a, at, lda, b, bt, ldb, beta, c, ct, ldc, round, bias};
    if (!defer_fn()(run_gemm, g)) run_gemm(g);
    return 0;
}

// CUDA_EMU_MMA=truncate: 16-bit GEMMs (tensor cores on a GPU) add their products 16 at a
// time, in k order, as mma.sync does in that mode (mma_model.h); fp32 GEMMs are unchanged.
static bool truncating() {
    static const bool on = [] {
        const char* v = getenv("CUDA_EMU_MMA");
        return v && strcmp(v, "truncate") == 0;
    }();
    return on;
}

static void gemm_now(const Gemm& g) {
    const int ta = g.ta, tb = g.tb, m = g.m, n = g.n, k = g.k, at = g.at, lda = g.lda, bt = g.bt, ldb = g.ldb,
              ct = g.ct, ldc = g.ldc, round = g.round;
    const float alpha = g.alpha, beta = g.beta;
    const void *a = g.a, *b = g.b;
    void* c = g.c;
    const float* bias = g.bias;
    auto rd = [round](float x) {
        if (round == COMPUTE_32F_FAST_16BF) return __bfloat162float(__float2bfloat16_rn(x));
        if (round == COMPUTE_32F_FAST_16F) return __half2float(__float2half_rn(x));
        return x;
    };
    const bool tensor_cores = truncating() && (round != COMPUTE_32F || at != R_32F || bt != R_32F);
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
            const float* x = ar.data() + (size_t)i * k;  // (k = 0: an empty product)
            const float* y = bc.data() + (size_t)j * k;
            float acc = 0.0f;
            if (tensor_cores)
                for (int l = 0; l < k; l += 16) acc = emu_dot_truncated(acc, x + l, y + l, 1, k - l < 16 ? k - l : 16);
            else
                for (int l = 0; l < k; ++l) acc += x[l] * y[l];
            size_t o = i + (size_t)j * ldc;
            float v = alpha * acc;
            if (beta != 0.0f) v += beta * load(c, ct, o);
            if (bias) v += bias[i];  // the BIAS epilogue: one value per row of D
            store(c, ct, o, v);
        }
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
    ++blas_calls;
    return gemm(ta, tb, m, n, k, *alpha, a, R_32F, lda, b, R_32F, ldb, *beta, c, R_32F, ldc, COMPUTE_32F);
}
cublasStatus_t cublasGemmEx(void*, int ta, int tb, int m, int n, int k, const void* alpha, const void* a, int at,
                            int lda, const void* b, int bt, int ldb, const void* beta, void* c, int ct, int ldc,
                            int compute, int) {
    ++blas_calls;
    return gemm(ta, tb, m, n, k, *(const float*)alpha, a, at, lda, b, bt, ldb, *(const float*)beta, c, ct, ldc,
                compute);
}
}

// ---- cuBLASLt -------------------------------------------------------------------------------
// Descriptor attributes and values as cublasLt.h numbers them.
enum { DESC_TRANSA = 3, DESC_TRANSB = 4, DESC_EPILOGUE = 7, DESC_BIAS_POINTER = 8, DESC_BIAS_DATA_TYPE = 26 };
enum { EPILOGUE_DEFAULT = 1, EPILOGUE_BIAS = 4 };

struct LtDesc {
    int compute, scale;
    int transa = N_OP, transb = N_OP, epilogue = EPILOGUE_DEFAULT;
    const float* bias = nullptr;
};
struct LtLayout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
};
struct LtHeuristic {  // cublasLtMatmulHeuristicResult_t
    uint64_t algo[8];
    size_t workspace;
    int state;
    float waves;
    int reserved[4];
};

extern "C" {
cublasStatus_t cublasLtCreate(void** h) {
    *h = &dummy_handle;
    return 0;
}
cublasStatus_t cublasLtDestroy(void*) { return 0; }
cublasStatus_t cublasLtMatmulDescCreate(LtDesc** d, int compute, int scale) {
    *d = new LtDesc{compute, scale};
    return 0;
}
cublasStatus_t cublasLtMatmulDescDestroy(LtDesc* d) {
    delete d;
    return 0;
}
cublasStatus_t cublasLtMatmulDescSetAttribute(LtDesc* d, int attr, const void* buf, size_t size) {
    switch (attr) {
        case DESC_TRANSA: memcpy(&d->transa, buf, 4); return 0;
        case DESC_TRANSB: memcpy(&d->transb, buf, 4); return 0;
        case DESC_EPILOGUE:
            memcpy(&d->epilogue, buf, 4);
            return d->epilogue == EPILOGUE_DEFAULT || d->epilogue == EPILOGUE_BIAS ? 0 : 15;  // NOT_SUPPORTED
        case DESC_BIAS_POINTER:
            if (size != sizeof(void*)) return 7;  // INVALID_VALUE
            memcpy(&d->bias, buf, sizeof(void*));
            return 0;
        case DESC_BIAS_DATA_TYPE: {  // the engine's bias is always its fp32 master vector
            int t;
            memcpy(&t, buf, 4);
            return t == R_32F ? 0 : 15;
        }
        default: return 15;
    }
}
cublasStatus_t cublasLtMatrixLayoutCreate(LtLayout** l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (ld < (int64_t)rows) return 7;
    *l = new LtLayout{type, rows, cols, ld};
    return 0;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(LtLayout* l) {
    delete l;
    return 0;
}
cublasStatus_t cublasLtMatmulPreferenceCreate(void** p) {
    *p = new int(0);
    return 0;
}
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(void*, int, const void*, size_t) { return 0; }
cublasStatus_t cublasLtMatmulPreferenceDestroy(void* p) {
    delete (int*)p;
    return 0;
}
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(void*, LtDesc*, LtLayout*, LtLayout*, LtLayout*, LtLayout*, void*,
                                              int requested, LtHeuristic* results, int* returned) {
    ++lt_heuristics;
    if (requested < 1) return 7;
    memset(results, 0, sizeof(LtHeuristic));
    results->waves = 1.0f;
    *returned = 1;
    return 0;
}
// D = alpha op(A) op(B) + beta C (+ bias per row with the BIAS epilogue), C and D the same
// buffer here (the engine's only use).
cublasStatus_t cublasLtMatmul(void*, LtDesc* d, const void* alpha, const void* a, LtLayout* la, const void* b,
                              LtLayout* lb, const void* beta, const void* c, LtLayout* lc, void* dd, LtLayout* ld,
                              const void* algo, void*, size_t, void*) {
    ++lt_calls;
    if (!algo || c != dd || lc->rows != ld->rows || lc->cols != ld->cols) return 7;
    const int m = (int)ld->rows, n = (int)ld->cols;
    const int k = (int)(d->transa == N_OP ? la->cols : la->rows);
    if ((d->transa == N_OP ? la->rows : la->cols) != (uint64_t)m) return 7;
    if ((d->transb == N_OP ? lb->cols : lb->rows) != (uint64_t)n) return 7;
    if ((d->transb == N_OP ? lb->rows : lb->cols) != (uint64_t)k) return 7;
    if (d->epilogue == EPILOGUE_BIAS && !d->bias) return 7;
    return gemm(d->transa, d->transb, m, n, k, *(const float*)alpha, a, la->type, (int)la->ld, b, lb->type,
                (int)lb->ld, *(const float*)beta, dd, ld->type, (int)ld->ld, d->compute,
                d->epilogue == EPILOGUE_BIAS ? d->bias : nullptr);
}
}
