//! GEMM through cuBLASLt (blaslt.rs; cuBLAS where it has no algorithm or is absent), on
//! fp32 or 16-bit storage, and the bias / column-sum / in-place add kernels of
//! kernels/gemm.cu. CPU twin: cpu/gemm.rs.
use super::blaslt::Lt;
use super::{check, grid_1d, int, need, Cuda, CudaBuf, BLOCK};
use crate::backend::cpu::gemm::REDUCE_ROWS;
use crate::backend::Precision;
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType_t};
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

/// c[m,n] = alpha * op(a) op(b) + beta * c, row-major; `ta`/`tb` mean a is stored [k,m],
/// b is stored [n,k]. The storage of a and b, then `inputs` (the trait's promise that they
/// hold values of that precision), picks the math:
/// - a, b stored in 16 bits (the bf16 / fp16 modes' activations and weight copies): bf16 /
///   fp16 operands as cuBLAS reads them natively, compute type CUBLAS_COMPUTE_32F (fp32
///   accumulation on tensor cores), c fp32 or 16-bit (rounded to nearest even on store);
/// - fp32 buffers, `inputs` fp32: `cublasSgemm` in the default math mode (no TF32);
/// - fp32 buffers, `inputs` bf16 / fp16: compute type CUBLAS_COMPUTE_32F_FAST_16BF / _16F,
///   cuBLAS converts the operands to 16 bits (exact for such values).
///
/// All three give the CPU's product up to summation order.
///
/// cuBLAS is column-major. A row-major [r, s] buffer read column-major is its transpose,
/// so the row-major product C = op(A) op(B) is computed as the column-major
/// C^T [n, m] = op(B)^T op(A)^T:
/// - cuBLAS's first operand is b: stored [k,n] (no tb) it already reads as op(B)^T
///   (N, lda = n); stored [n,k] (tb) it reads as op(B), so transpose it (T, lda = k);
/// - the second is a: stored [m,k] (no ta) it reads as op(A)^T (N, ldb = k); stored
///   [k,m] (ta) it reads as op(A) (T, ldb = m);
/// - cuBLAS's (M, N, K) = (n, m, k) and ldc = n.
///
/// cuBLASLt runs it when it has a plan for the shape; this cuBLAS path is the fallback.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    cu: &Cuda, c: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf, m: usize, n: usize, k: usize, ta: bool, tb: bool, alpha: f32,
    beta: f32, inputs: Precision,
) {
    if m == 0 || n == 0 {
        return;
    }
    // cuBLAS and cuBLASLt do not bind the context (cudarc binds only when it makes their
    // handles); on a thread with none current the CUDA runtime under them would take
    // device 0's primary context, the wrong device for `cuda:1`
    cu.bind("gemm");
    let operands = operand_storage("gemm", c, a, b);
    let _r = cu.range(match (operands, inputs) {
        (Precision::Fp32, Precision::Fp32) => "gemm",
        (Precision::Bf16, _) | (Precision::Fp32, Precision::Bf16) => "gemm_bf16_tc",
        (Precision::Fp16, _) | (Precision::Fp32, Precision::Fp16) => "gemm_fp16_tc",
    });
    need(c.len(), m * n, "gemm c");
    need(a.len(), m * k, "gemm a");
    need(b.len(), k * n, "gemm b");
    if with_lt(cu, |lt| {
        lt.matmul(cu, c, a, b, None, m, n, k, ta, tb, alpha, beta, inputs)
    }) {
        return;
    }
    gemm_cublas(cu, c, a, b, m, n, k, ta, tb, alpha, beta, inputs, operands);
}

/// The storage of a GEMM's operands a and b, which must agree (cuBLAS multiplies two
/// operands of one type); fp32 operands write an fp32 c. Panics naming `what` otherwise.
fn operand_storage(what: &str, c: &CudaBuf, a: &CudaBuf, b: &CudaBuf) -> Precision {
    let (pa, pb, pc) = (a.precision(), b.precision(), c.precision());
    assert!(
        pa == pb,
        "{what}: operands stored as {pa} and {pb}; both must be stored alike"
    );
    assert!(
        pa != Precision::Fp32 || pc == Precision::Fp32,
        "{what}: fp32 operands with a {pc} output"
    );
    pa
}

/// The cuBLAS data type of a buffer's storage.
fn data_type(p: Precision) -> cudaDataType_t {
    match p {
        Precision::Fp32 => cudaDataType_t::CUDA_R_32F,
        Precision::Bf16 => cudaDataType_t::CUDA_R_16BF,
        Precision::Fp16 => cudaDataType_t::CUDA_R_16F,
    }
}

/// `f` on the backend's cuBLASLt (opened on first use); false without it (no library, or
/// `Cuda::without_cublaslt`) or when `f` finds no plan.
fn with_lt(cu: &Cuda, f: impl FnOnce(&mut Lt) -> bool) -> bool {
    if !cu.use_lt {
        return false;
    }
    let mut lt = cu.lt.lock().unwrap();
    if lt.is_none() {
        *lt = Some(Lt::new(cu));
    }
    match lt.as_mut() {
        Some(Some(lt)) => f(lt),
        _ => false,
    }
}

/// `gemm` on cuBLAS: `cublasSgemm` for fp32, else `cublasGemmEx` with the operands' types
/// (`operands`: their storage, `operand_storage` of the caller).
#[allow(clippy::too_many_arguments)]
fn gemm_cublas(
    cu: &Cuda, c: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf, m: usize, n: usize, k: usize, ta: bool, tb: bool, alpha: f32,
    beta: f32, inputs: Precision, operands: Precision,
) {
    cu.count_gemm();
    let cfg = GemmConfig {
        transa: if tb { CUBLAS_OP_T } else { CUBLAS_OP_N },
        transb: if ta { CUBLAS_OP_T } else { CUBLAS_OP_N },
        m: int(n, "gemm n"),
        n: int(m, "gemm m"),
        k: int(k, "gemm k"),
        alpha,
        lda: int(if tb { k } else { n }.max(1), "gemm lda"),
        ldb: int(if ta { m } else { k }.max(1), "gemm ldb"),
        beta,
        ldc: int(n, "gemm ldc"),
    };
    let compute = match (operands, inputs) {
        (Precision::Fp32, Precision::Fp32) => {
            let w = "cublasSgemm";
            // SAFETY: the leading dimensions and sizes above describe exactly the m*k, k*n
            // and m*n elements the call touches, and each buffer holds at least that many
            // (checked by the caller).
            check(unsafe { cu.blas.gemm(cfg, b.f32(w), a.f32(w), c.f32_mut(w)) }, w);
            return;
        }
        (Precision::Fp32, Precision::Bf16) => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
        (Precision::Fp32, Precision::Fp16) => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16F,
        _ => cublasComputeType_t::CUBLAS_COMPUTE_32F,
    };
    let (pb, pa, pc) = (b.addr(&cu.stream), a.addr(&cu.stream), c.addr(&cu.stream));
    let (t_ab, t_c) = (data_type(operands), data_type(c.precision()));
    // SAFETY: the same operands, sizes and leading dimensions as the Sgemm branch (checked
    // by the caller), each buffer of the type given with it; alpha and beta are fp32 host
    // scalars, as the CUBLAS_COMPUTE_32F* compute types require (the handle is in host
    // pointer mode, cudarc's default).
    let r = unsafe {
        cudarc::cublas::result::gemm_ex(
            *cu.blas.handle(),
            cfg.transa,
            cfg.transb,
            cfg.m,
            cfg.n,
            cfg.k,
            (&alpha) as *const f32 as *const _,
            pb as *const _,
            t_ab,
            cfg.lda,
            pa as *const _,
            t_ab,
            cfg.ldb,
            (&beta) as *const f32 as *const _,
            pc as *mut _,
            t_c,
            cfg.ldc,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    };
    check(r, "cublasGemmEx (tensor cores)");
}

/// c[m, n] = op(a) op(b) + bias (bias [n] added to every row): cuBLASLt with the bias in
/// the GEMM's epilogue (blaslt.rs), else `gemm` and `add_bias`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bias(
    cu: &Cuda, c: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf, bias: &CudaSlice<f32>, m: usize, n: usize, k: usize,
    ta: bool, tb: bool, inputs: Precision,
) {
    if m == 0 || n == 0 {
        return;
    }
    cu.bind("gemm_bias"); // as in `gemm`
    let operands = operand_storage("gemm_bias", c, a, b);
    need(c.len(), m * n, "gemm_bias c");
    need(a.len(), m * k, "gemm_bias a");
    need(b.len(), k * n, "gemm_bias b");
    need(bias.len(), n, "gemm_bias bias");
    {
        let _r = cu.range("gemm_bias");
        if with_lt(cu, |lt| {
            lt.matmul(cu, c, a, b, Some(bias), m, n, k, ta, tb, 1.0, 0.0, inputs)
        }) {
            return;
        }
    }
    if c.precision() == Precision::Fp32 {
        gemm_cublas(cu, c, a, b, m, n, k, ta, tb, 1.0, 0.0, inputs, operands);
        add_bias(cu, c, bias, m, n);
        return;
    }
    // A 16-bit c is rounded once, after the bias, as the epilogue rounds it: the product and
    // the bias meet in an fp32 scratch buffer first (two passes more, on this fallback only).
    let slot = |g: &mut super::Scratch| g.gemm_f32.take();
    let mut tmp = CudaBuf::F32(match slot(&mut cu.scratch.lock().unwrap()) {
        Some(t) if t.len() >= m * n => t,
        _ => check(cu.zeros::<f32>(m * n), "gemm_bias scratch"),
    });
    gemm_cublas(cu, &mut tmp, a, b, m, n, k, ta, tb, 1.0, 0.0, inputs, operands);
    add_bias(cu, &mut tmp, bias, m, n);
    super::quantize::copy(cu, c, &tmp, m * n);
    if let CudaBuf::F32(t) = tmp {
        cu.scratch.lock().unwrap().gemm_f32 = Some(t);
    }
}

/// out[r, :] += bias for r < rows (out in any storage).
pub fn add_bias(cu: &Cuda, out: &mut CudaBuf, bias: &CudaSlice<f32>, rows: usize, cols: usize) {
    let total = rows * cols;
    if total == 0 {
        return;
    }
    let _r = cu.range("add_bias");
    need(out.len(), total, "add_bias out");
    need(bias.len(), cols, "add_bias bias");
    let (ri, ci) = (int(rows, "add_bias rows"), int(cols, "add_bias cols"));
    int(total, "add_bias rows*cols");
    let (po, to) = (out.addr(&cu.stream), out.code());
    let mut l = cu.stream.launch_builder(cu.func("add_bias_f32"));
    l.arg(&po).arg(&to).arg(bias).arg(&ri).arg(&ci);
    // SAFETY: (void* out, int out_t, const float* bias, int rows, int cols); one thread per
    // element of out[..rows*cols] (of out_t's type), reading bias[..cols]; sizes checked
    // above.
    check(unsafe { l.launch(grid_1d(total, BLOCK)) }, "add_bias_f32");
}

/// kernels/gemm.cu's ColSums: the (dst, src) pairs of one `col_sums_f32` launch.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ColSums {
    dst: [u64; COL_SUMS_MAX],
    src: [u64; COL_SUMS_MAX],
}
// SAFETY: #[repr(C)] plain data with the field order and types of the CUDA struct (eight
// pointers, 64 bytes).
unsafe impl DeviceRepr for ColSums {}

/// COL_SUMS_MAX of kernels/gemm.cu.
const COL_SUMS_MAX: usize = 4;

/// dst[j] += sum over rows of src[r, j] for every (dst, src) pair, all [rows, cols] with
/// sources of one storage type, deterministically: REDUCE_ROWS-row partials summed in row
/// order, then added to dst in chunk order (the CPU's `col_sums_into`); one launch of
/// `col_sums_f32` per COL_SUMS_MAX pairs (a layer's q, k and v bias gradients in one).
pub(super) fn col_sums_many(cu: &Cuda, pairs: &mut [(&mut CudaSlice<f32>, &CudaBuf)], rows: usize, cols: usize) {
    if rows == 0 || cols == 0 || pairs.is_empty() {
        return;
    }
    let code = pairs[0].1.code();
    for (dst, src) in pairs.iter() {
        need(dst.len(), cols, "column sums dst");
        need(src.len(), rows * cols, "column sums src");
        assert_eq!(
            src.code(),
            code,
            "column sums: sources of one launch share a storage type"
        );
    }
    let (ri, ci) = (int(rows, "rows"), int(cols, "cols"));
    int(rows * cols, "rows*cols");
    let (mut cfg, chunks) = column_grid(rows, cols, BLOCK);
    for group in pairs.chunks_mut(COL_SUMS_MAX) {
        cfg.grid_dim.2 = group.len() as u32;
        let mut t = ColSums {
            dst: [0; COL_SUMS_MAX],
            src: [0; COL_SUMS_MAX],
        };
        for (i, (dst, src)) in group.iter_mut().enumerate() {
            let (p, _sync) = dst.device_ptr_mut(&cu.stream);
            t.dst[i] = p;
            t.src[i] = src.addr(&cu.stream);
        }
        let mut guard = cu.scratch.lock().unwrap();
        let s = &mut *guard;
        let partial = super::ensure(cu, &mut s.f32_a, group.len() * chunks * cols);
        let counters = super::ensure(cu, &mut s.counters, group.len() * cfg.grid_dim.0 as usize);
        let mut l = cu.stream.launch_builder(cu.func("col_sums_f32"));
        l.arg(&t).arg(&code).arg(partial).arg(counters).arg(&ri).arg(&ci);
        // SAFETY: (ColSums t, int src_t, float* partial, unsigned* counters, int rows, int
        // cols); block (x, k, z) reads column block x of the rows of chunk k of src_z
        // [..rows*cols] (of src_t's type; checked above), writes partial[(z*chunks + k)*cols
        // + j] (tensors*chunks*cols floats, ensure) and counts in counters[z*gridx + x]
        // (tensors*gridx entries, ensure: zero, and left zero by every launch); the last
        // block of column block x updates dst_z[j] for j < cols (cols floats, checked above);
        // z < the group's length, whose entries are all set.
        check(unsafe { l.launch(cfg) }, "col_sums_f32");
    }
}

/// The grid of the one-launch column reductions over [rows, cols] (column blocks of
/// `block` threads, chunks of REDUCE_ROWS rows), and its number of row chunks.
pub(super) fn column_grid(rows: usize, cols: usize, block: u32) -> (LaunchConfig, usize) {
    let chunks = rows.div_ceil(REDUCE_ROWS);
    assert!(
        chunks <= 65_535,
        "column sums: {chunks} row chunks exceed the grid's 65535"
    );
    let cfg = LaunchConfig {
        grid_dim: (cols.div_ceil(block as usize) as u32, chunks as u32, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    };
    (cfg, chunks)
}

/// dbias += sum over rows of dout.
pub fn bias_grad(cu: &Cuda, dbias: &mut CudaSlice<f32>, dout: &CudaBuf, rows: usize, cols: usize) {
    let _r = cu.range("bias_grad");
    col_sums_many(cu, &mut [(dbias, dout)], rows, cols);
}

/// dst[..n] += src[..n]
pub fn add_inplace(cu: &Cuda, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>, n: usize) {
    if n == 0 {
        return;
    }
    let _r = cu.range("add_inplace");
    need(dst.len(), n, "add_inplace dst");
    need(src.len(), n, "add_inplace src");
    let ni = int(n, "add_inplace n");
    let mut l = cu.stream.launch_builder(cu.func("add_inplace_f32"));
    l.arg(dst).arg(src).arg(&ni);
    // SAFETY: (float* dst, const float* src, int n); one thread per element < n; both
    // buffers hold n floats (checked above).
    check(unsafe { l.launch(grid_1d(n, BLOCK)) }, "add_inplace_f32");
}

/// The bf16 tensor-core GEMM rate of this GPU in FLOP/s: C = A B^T at n x n x n with bf16
/// inputs and output and fp32 compute (cublasGemmEx, the path a bf16 backend would use),
/// one untimed call, then the best of `reps`. The `bench` command's MFU reference for
/// bf16 runs. Written without a GPU to run it on: unverified until it has run on one.
pub fn bf16_gemm_rate(cu: &Cuda, n: usize, reps: usize) -> crate::error::Result<f64> {
    bf16_gemm_rate_at(cu, (n, n, n), false, reps)
}

/// `bf16_gemm_rate` at m x n x k (column-major C [m, n] = A^T B, A [k, m], B [k, n] in
/// bf16), with an fp32 C when `f32_out`: what the step's GEMMs would run at with their
/// operands stored in bf16, against this backend's `gemm` on fp32 buffers holding bf16
/// values (tests/gpu_bench.rs `kernels` prints both).
pub fn bf16_gemm_rate_at(
    cu: &Cuda, (m, n, k): (usize, usize, usize), f32_out: bool, reps: usize,
) -> crate::error::Result<f64> {
    let err = |what: &str, e: String| crate::error::Error::Device(format!("bf16 GEMM rate: {what}: {e}"));
    let (mi, ni, ki) = (int(m, "bf16 gemm m"), int(n, "bf16 gemm n"), int(k, "bf16 gemm k"));
    // bf16 1.0 = 0x3f80 and 2^-8 = 0x3b80: finite products, no denormals.
    let a = cu
        .copy_of(&vec![0x3f80u16; k * m])
        .map_err(|e| err("upload", e.to_string()))?;
    let b = cu
        .copy_of(&vec![0x3b80u16; k * n])
        .map_err(|e| err("upload", e.to_string()))?;
    // an fp32 C takes m n floats: as many u16 pairs
    let mut c = cu
        .zeros::<u16>(if f32_out { 2 * m * n } else { m * n })
        .map_err(|e| err("allocation", e.to_string()))?;
    let c_type = if f32_out {
        cudaDataType_t::CUDA_R_32F
    } else {
        cudaDataType_t::CUDA_R_16BF
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    let mut best = f64::INFINITY;
    for rep in 0..=reps {
        cu.synchronize();
        let t0 = std::time::Instant::now();
        {
            let (pa, _ra) = a.device_ptr(&cu.stream);
            let (pb, _rb) = b.device_ptr(&cu.stream);
            let (pc, _rc) = c.device_ptr_mut(&cu.stream);
            // SAFETY: a holds k*m and b k*n bf16 elements, c m*n elements of c_type (u16
            // pairs for fp32); with op(A) = T, lda = k, ldb = k and ldc = m the call touches
            // exactly those; alpha and beta are fp32 host scalars as CUBLAS_COMPUTE_32F
            // requires.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *cu.blas.handle(),
                    CUBLAS_OP_T,
                    CUBLAS_OP_N,
                    mi,
                    ni,
                    ki,
                    (&alpha) as *const f32 as *const _,
                    pa as *const _,
                    cudaDataType_t::CUDA_R_16BF,
                    ki,
                    pb as *const _,
                    cudaDataType_t::CUDA_R_16BF,
                    ki,
                    (&beta) as *const f32 as *const _,
                    pc as *mut _,
                    c_type,
                    mi,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| err("cublasGemmEx", format!("{e:?}")))?;
        }
        cu.synchronize();
        if rep > 0 {
            best = best.min(t0.elapsed().as_secs_f64());
        }
    }
    Ok(2.0 * m as f64 * n as f64 * k as f64 / best)
}
