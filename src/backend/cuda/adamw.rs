//! AdamW, global gradient norm and rescaling (kernels/adamw.cu). CPU twin: cpu/adamw.rs.
use super::{check, ensure, grid_1d, int, need, Cuda, BLOCK};
use crate::backend::cpu::adamw::REDUCE_CHUNK;
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

/// Scalars of one step as kernels/adamw.cu's AdamArgs.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AdamArgs {
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
    w1: f32,
    w2: f32,
    beta2: f32,
    eps: f32,
    pad: f32,
}
// SAFETY: #[repr(C)] plain data with the field order and types of the CUDA struct.
unsafe impl DeviceRepr for AdamArgs {}

/// One AdamW step (PyTorch semantics) on param, m, v [n] with grad [n]; step is 1-based.
/// The scalar factors are formed in f64 exactly as the CPU twin forms them. One launch per
/// buffer: the trait hands the optimiser one parameter at a time (one fused launch over
/// every parameter needs the parameters in one arena, a model-level change). The kernel
/// can also write a bf16 copy of the weights in the same pass; fp32 mode passes null.
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    cu: &Cuda, param: &mut CudaSlice<f32>, grad: &CudaSlice<f32>, m: &mut CudaSlice<f32>, v: &mut CudaSlice<f32>,
    n: usize, lr: f32, beta1: f32, beta2: f32, eps: f32, weight_decay: f32, step: u64,
) {
    assert!(step >= 1, "adamw: step is 1-based");
    if n == 0 {
        return;
    }
    let _r = cu.range("adamw");
    for (len, what) in [
        (param.len(), "param"),
        (grad.len(), "grad"),
        (m.len(), "m"),
        (v.len(), "v"),
    ] {
        need(len, n, what);
    }
    let (lr64, b1, b2) = (lr as f64, beta1 as f64, beta2 as f64);
    let args = AdamArgs {
        decay: (1.0 - lr64 * weight_decay as f64) as f32,
        step_size: (lr64 / (1.0 - b1.powf(step as f64))) as f32,
        bc2_sqrt: (1.0 - b2.powf(step as f64)).sqrt() as f32,
        w1: (1.0 - b1) as f32,
        w2: (1.0 - b2) as f32,
        beta2,
        eps,
        pad: 0.0,
    };
    let ni = int(n, "adamw n");
    let null: u64 = 0;
    let mut l = cu.stream.launch_builder(cu.func("adamw_f32"));
    l.arg(param).arg(grad).arg(m).arg(v).arg(&null).arg(&ni).arg(&args);
    // SAFETY: (float* param, const float* grad, float* m, float* v, bf16* param_bf16 (null:
    // no copy), int n, AdamArgs a); one thread per element < n; all four buffers hold n
    // floats (checked above).
    check(unsafe { l.launch(grid_1d(n, BLOCK)) }, "adamw_f32");
}

/// sum(x[..n]^2) in f64: REDUCE_CHUNK-element partials (a fixed tree per block), summed in
/// order by one thread, one f64 copied back. Deterministic; differs from the CPU's
/// sequential sums only in f64 rounding.
pub fn sum_squares(cu: &Cuda, x: &CudaSlice<f32>, n: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let _r = cu.range("sum_squares");
    need(x.len(), n, "sum_squares x");
    let chunks = n.div_ceil(REDUCE_CHUNK);
    let (ni, ki) = (int(n, "sum_squares n"), int(chunks, "sum_squares chunks"));
    let mut guard = cu.scratch.lock().unwrap();
    let s = &mut *guard;
    let partials = ensure(&cu.stream, &mut s.f64_a, chunks);
    let out = ensure(&cu.stream, &mut s.f64_b, 1);
    let cfg = LaunchConfig {
        grid_dim: (chunks as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = cu.stream.launch_builder(cu.func("sum_squares_partials_f32"));
    l.arg(&mut *partials).arg(x).arg(&ni);
    // SAFETY: (double* partials, const float* x, int n); block k reads x[k*4096..][..4096]
    // below n and writes partials[k]; partials holds `chunks` doubles (ensure), x n floats.
    check(unsafe { l.launch(cfg) }, "sum_squares_partials_f32");
    let mut l = cu.stream.launch_builder(cu.func("sum_partials_f64"));
    l.arg(&mut *out).arg(&*partials).arg(&ki);
    // SAFETY: (double* out, const double* partials, int k); one thread reads partials[..k]
    // and writes out[0]; sizes from ensure.
    check(
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            })
        },
        "sum_partials_f64",
    );
    let v = check(cu.stream.clone_dtoh(&out.slice(..1)), "sum_squares download");
    cu.synchronize();
    v[0]
}

/// x[..n] *= alpha.
pub fn scale_inplace(cu: &Cuda, x: &mut CudaSlice<f32>, n: usize, alpha: f32) {
    if n == 0 {
        return;
    }
    let _r = cu.range("scale");
    need(x.len(), n, "scale x");
    let ni = int(n, "scale n");
    let mut l = cu.stream.launch_builder(cu.func("scale_f32"));
    l.arg(x).arg(&ni).arg(&alpha);
    // SAFETY: (float* x, int n, float alpha); one thread per element < n; x holds n floats.
    check(unsafe { l.launch(grid_1d(n, BLOCK)) }, "scale_f32");
}
