//! cuBLASLt for every GEMM of the CUDA backend (`gemm`, and `gemm_bias` with the bias in
//! the epilogue: D = op(A) op(B) + bias in one kernel instead of a GEMM and an `add_bias`
//! pass over D). CPU twin: cpu/gemm.rs `gemm` (then `add_bias`, the trait's default).
//!
//! Plans (the matmul descriptor, the three layouts and the algorithm cuBLASLt's heuristic
//! picked, with the workspace below) are made once per shape and kept: the heuristic query
//! costs tens of microseconds of host time, a step repeats a handful of shapes. The bias
//! pointer is the only per-call attribute. A shape for which cuBLASLt offers no algorithm,
//! a machine without libcublasLt, or `Cuda::without_cublaslt` falls back to cuBLAS
//! (`cublasSgemm` / `cublasGemmEx`, then `add_bias`).
//!
//! The GELU epilogues are not used: cuBLASLt's GELU is the tanh approximation, BERT's is
//! the erf form (kernels/gelu.cu).
use super::Cuda;
use super::CudaBuf;
use crate::backend::Precision;
use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use std::collections::HashMap;
use std::ffi::c_void;

/// Hopper wants 32 MiB of workspace for its best kernels, earlier cards 4 MiB (NVIDIA's
/// recommendation, as cudarc's Workspace).
fn workspace_bytes(major: u32) -> usize {
    if major >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

/// (m, n, k, ta, tb, inputs, bias epilogue, storage of a and b, storage of c) of a
/// row-major GEMM.
type Key = (usize, usize, usize, bool, bool, Precision, bool, Precision, Precision);

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// The cuBLASLt handle, its workspace and the plans made so far (None: no algorithm for
/// that shape, use the fallback).
pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: super::DevMem<u8>,
    plans: HashMap<Key, Option<Plan>>,
}

// SAFETY: the handle and descriptors are plain host objects that cuBLASLt allows to be used
// from any thread, one call at a time; `Cuda` keeps `Lt` behind a Mutex.
unsafe impl Send for Lt {}

impl Lt {
    /// A handle and its workspace, or None when libcublasLt is absent or refuses.
    pub fn new(cu: &Cuda) -> Option<Lt> {
        // SAFETY: only tries to dlopen the library under its usual names.
        if !unsafe { sys::is_culib_present() } {
            return None;
        }
        let handle = result::create_handle().ok()?;
        // SAFETY: a workspace is scratch cuBLASLt overwrites; its contents never matter.
        let workspace = match unsafe { cu.uninit::<u8>(workspace_bytes(cu.info.major)) } {
            Ok(w) => w,
            Err(_) => {
                // SAFETY: created just above, used by nothing yet.
                let _ = unsafe { result::destroy_handle(handle) };
                return None;
            }
        };
        Some(Lt {
            handle,
            workspace,
            plans: HashMap::new(),
        })
    }

    /// (shapes with a cuBLASLt plan, shapes cuBLASLt had no algorithm for), of the GEMMs
    /// with the bias epilogue (`bias`) or without.
    pub fn plan_counts(&self, bias: bool) -> (usize, usize) {
        let kind = self.plans.iter().filter(|(k, _)| k.6 == bias);
        let (with, all) = kind.fold((0, 0), |(w, a), (_, p)| (w + p.is_some() as usize, a + 1));
        (with, all - with)
    }

    /// The plan of `key`, made on first use.
    fn plan(&mut self, key: Key) -> Option<&Plan> {
        if !self.plans.contains_key(&key) {
            let plan = make_plan(self.handle, key, self.workspace.len());
            self.plans.insert(key, plan);
        }
        self.plans.get(&key).and_then(|p| p.as_ref())
    }

    /// c[m, n] = alpha op(a) op(b) + beta c, plus bias [n] on every row when given (then
    /// alpha 1, beta 0), row-major as `gemm::gemm` (column-major C^T = op(B)^T op(A)^T, the
    /// bias then per column-major row). false when there is no plan for this shape, or k
    /// is 0 (C = beta C: an empty operand is not a shape to plan for): nothing was enqueued,
    /// the caller falls back.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &mut self, cu: &Cuda, c: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf, bias: Option<&CudaSlice<f32>>, m: usize,
        n: usize, k: usize, ta: bool, tb: bool, alpha: f32, beta: f32, inputs: Precision,
    ) -> bool {
        if k == 0 {
            return false;
        }
        let Some((desc, la, lb, lc, algo)) = self
            .plan((m, n, k, ta, tb, inputs, bias.is_some(), a.precision(), c.precision()))
            .map(|p| (p.desc, p.a, p.b, p.c, p.algo))
        else {
            return false;
        };
        cu.count_gemm();
        let (handle, ws_len) = (self.handle, self.workspace.len());
        let (pw, _rw) = self.workspace.device_ptr_mut(&cu.stream);
        let pbias = bias.map(|b| b.device_ptr(&cu.stream));
        let (pa, pb, pc) = (a.addr(&cu.stream), b.addr(&cu.stream), c.addr(&cu.stream));
        // SAFETY: the bias pointer attribute (a plan with the BIAS epilogue, made only for
        // calls with a bias) is a CUdeviceptr read when the matmul is enqueued below; the
        // layouts of the plan describe exactly the m*k, k*n and m*n elements the call
        // touches, of the types of a, b and c (part of the plan's key) and bias[..n] (sizes checked by the caller); alpha and beta are fp32 host
        // scalars (host pointer mode, the default); the workspace is this handle's own and
        // ws_len long.
        let r = unsafe {
            let set_bias = match &pbias {
                Some((p, _)) => result::set_matmul_desc_attribute(
                    desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    p as *const _ as *const c_void,
                    std::mem::size_of_val(p),
                ),
                None => Ok(()),
            };
            set_bias.and_then(|()| {
                result::matmul(
                    handle,
                    desc,
                    (&alpha) as *const f32 as *const c_void,
                    (&beta) as *const f32 as *const c_void,
                    pb as *const c_void,
                    lb,
                    pa as *const c_void,
                    la,
                    pc as *const c_void,
                    lc,
                    pc as *mut c_void,
                    lc,
                    &algo,
                    pw as *mut c_void,
                    ws_len,
                    cu.stream.cu_stream() as *mut _,
                )
            })
        };
        super::check(r, "cublasLtMatmul");
        true
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        for plan in self.plans.drain().filter_map(|(_, p)| p) {
            // SAFETY: each object was created by make_plan and is used by nothing else.
            unsafe {
                let _ = result::destroy_matrix_layout(plan.a);
                let _ = result::destroy_matrix_layout(plan.b);
                let _ = result::destroy_matrix_layout(plan.c);
                let _ = result::destroy_matmul_desc(plan.desc);
            }
        }
        // SAFETY: created in new, used by nothing else.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

/// The descriptor, layouts and best algorithm for `key`, or None if cuBLASLt has none.
/// cuBLASLt's operand A is our b and its B our a, as in `gemm::gemm`; the names below are
/// ours: `a` is the layout of our a.
fn make_plan(handle: sys::cublasLtHandle_t, key: Key, workspace: usize) -> Option<Plan> {
    let (m, n, k, ta, tb, inputs, bias, operands, c_storage) = key;
    // 16-bit operands are read as such (fp32 accumulation); fp32 operands holding 16-bit
    // values are converted by cuBLAS under the FAST compute types
    let compute = match (operands, inputs) {
        (Precision::Fp32, Precision::Bf16) => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
        (Precision::Fp32, Precision::Fp16) => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16F,
        _ => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
    };
    let f32_t = sys::cudaDataType_t::CUDA_R_32F;
    let lt_type = |p: Precision| match p {
        Precision::Fp32 => sys::cudaDataType_t::CUDA_R_32F,
        Precision::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
        Precision::Fp16 => sys::cudaDataType_t::CUDA_R_16F,
    };
    let (ab_t, c_t) = (lt_type(operands), lt_type(c_storage));
    let desc = result::create_matmul_desc(compute, f32_t).ok()?;
    let mut plan = Plan {
        desc,
        a: std::ptr::null_mut(),
        b: std::ptr::null_mut(),
        c: std::ptr::null_mut(),
        algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
    };
    let made = (|| -> Option<()> {
        let set = |attr, v: i32| {
            // SAFETY: attributes TRANSA / TRANSB / EPILOGUE take a 32-bit value.
            unsafe { result::set_matmul_desc_attribute(desc, attr, (&v) as *const i32 as *const c_void, 4).ok() }
        };
        use sys::cublasLtMatmulDescAttributes_t::*;
        let op = |t: bool| if t { 1 } else { 0 }; // CUBLAS_OP_T / CUBLAS_OP_N
        set(CUBLASLT_MATMUL_DESC_TRANSA, op(tb))?;
        set(CUBLASLT_MATMUL_DESC_TRANSB, op(ta))?;
        let epilogue = if bias {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        set(CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue as i32)?;
        if bias && c_storage != Precision::Fp32 {
            // the bias is the fp32 master vector; a 16-bit D would otherwise imply a 16-bit bias
            set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, f32_t as i32)?;
        }
        // column-major as stored: our b is [n, k] (tb) or [k, n]; our a is [k, m] (ta) or
        // [m, k]; C^T is n x m
        let (b_rows, b_cols) = if tb { (k, n) } else { (n, k) };
        let (a_rows, a_cols) = if ta { (m, k) } else { (k, m) };
        plan.b = result::create_matrix_layout(ab_t, b_rows as u64, b_cols as u64, b_rows as i64).ok()?;
        plan.a = result::create_matrix_layout(ab_t, a_rows as u64, a_cols as u64, a_rows as i64).ok()?;
        plan.c = result::create_matrix_layout(c_t, n as u64, m as u64, n as i64).ok()?;
        let pref = result::create_matmul_pref().ok()?;
        // SAFETY: the preference takes the workspace limit as a u64 (size_t); the layouts
        // and descriptor were created above.
        let heuristic = unsafe {
            let ws = workspace as u64;
            let limit = result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws) as *const u64 as *const c_void,
                8,
            );
            let h = limit
                .and_then(|()| result::get_matmul_algo_heuristic(handle, desc, plan.b, plan.a, plan.c, plan.c, pref));
            let _ = result::destroy_matmul_pref(pref);
            h.ok()?
        };
        plan.algo = heuristic.algo;
        Some(())
    })();
    if made.is_none() {
        // SAFETY: created above (null layouts are skipped), used by nothing else.
        unsafe {
            for l in [plan.a, plan.b, plan.c] {
                if !l.is_null() {
                    let _ = result::destroy_matrix_layout(l);
                }
            }
            let _ = result::destroy_matmul_desc(plan.desc);
        }
        return None;
    }
    Some(plan)
}
