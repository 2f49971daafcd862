//! Class-masked InfoNCE (kernels/infonce.cu). CPU twin: cpu/infonce.rs.
use super::{check, ensure, grid_1d, int, need, round_code, Cuda};
use crate::backend::{Denominator, InfoNceOptions, OwnView, Precision};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

/// kernels/infonce.cu's InfoNceArgs.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct InfoNceArgs {
    inv_tau: f32,
    scale: f32,
    denom_all: i32,
    own_exclude: i32,
    /// 0: fp32 dot products on CUDA cores; 1 / 2: z rounded to bf16 / fp16, tensor cores.
    round: i32,
}
// SAFETY: #[repr(C)] plain data with the field order and types of the CUDA struct.
unsafe impl DeviceRepr for InfoNceArgs {}

impl InfoNceArgs {
    fn new(opts: &InfoNceOptions, scale: f32, inputs: Precision) -> Self {
        InfoNceArgs {
            inv_tau: 1.0 / opts.tau,
            scale,
            denom_all: (opts.denominator == Denominator::All) as i32,
            own_exclude: (opts.own_view == OwnView::Exclude) as i32,
            round: round_code(inputs),
        }
    }
}

/// One block of 256 threads per 32-row tile.
fn tiles(m: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (m.div_ceil(32) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[allow(clippy::too_many_arguments)]
fn check_inputs(
    what: &str, z: &CudaSlice<f32>, labels: &CudaSlice<i32>, anchor: &CudaSlice<i32>, partner: &CudaSlice<i32>,
    m: usize, c: usize,
) {
    need(z.len(), m * c, what);
    for len in [labels.len(), anchor.len(), partner.len()] {
        need(len, m, what);
    }
    int(m * c, "infonce m*c");
}

/// |P_i| and validity of every row into npos, valid [m].
#[allow(clippy::too_many_arguments)]
fn counts(
    cu: &Cuda, npos: &mut CudaSlice<i32>, valid: &mut CudaSlice<i32>, labels: &CudaSlice<i32>, anchor: &CudaSlice<i32>,
    partner: &CudaSlice<i32>, m: usize, args: &InfoNceArgs,
) {
    let mi = int(m, "infonce m");
    let mut l = cu.stream.launch_builder(cu.func("infonce_counts_f32"));
    l.arg(npos)
        .arg(valid)
        .arg(labels)
        .arg(anchor)
        .arg(partner)
        .arg(&mi)
        .arg(args);
    // SAFETY: (int* npos, int* valid, const int* labels, const int* anchor, const int*
    // partner, int m, InfoNceArgs a); thread i < m reads labels[..m], anchor[i], partner[i]
    // (partner in -1..m by contract, as on the CPU) and writes npos[i], valid[i]; npos and
    // valid hold m ints (ensure), inputs checked by the caller.
    check(unsafe { l.launch(grid_1d(m, 256)) }, "infonce_counts_f32");
}

/// loss [m] = L_i on valid anchors (0 elsewhere), lse [m] saved for backward.
#[allow(clippy::too_many_arguments)]
pub fn infonce_fwd(
    cu: &Cuda, loss: &mut CudaSlice<f32>, lse: &mut CudaSlice<f32>, z: &CudaSlice<f32>, labels: &CudaSlice<i32>,
    anchor: &CudaSlice<i32>, partner: &CudaSlice<i32>, m: usize, c: usize, opts: InfoNceOptions, inputs: Precision,
) {
    if m == 0 {
        return;
    }
    let _r = cu.range("infonce_fwd");
    check_inputs("infonce_fwd", z, labels, anchor, partner, m, c);
    need(loss.len(), m, "infonce_fwd loss");
    need(lse.len(), m, "infonce_fwd lse");
    let args = InfoNceArgs::new(&opts, 1.0, inputs);
    let (mi, ci) = (int(m, "infonce m"), int(c, "infonce c"));
    let mut guard = cu.scratch.lock().unwrap();
    let s = &mut *guard;
    let npos = ensure(&cu.stream, &mut s.i32_a, m);
    let valid = ensure(&cu.stream, &mut s.i32_b, m);
    counts(cu, npos, valid, labels, anchor, partner, m, &args);
    let mut l = cu.stream.launch_builder(cu.func("infonce_fwd_f32"));
    l.arg(loss)
        .arg(lse)
        .arg(z)
        .arg(labels)
        .arg(&*npos)
        .arg(&*valid)
        .arg(partner);
    l.arg(&mi).arg(&ci).arg(&args);
    // SAFETY: (float* loss, float* lse, const float* z, const int* labels, const int* npos,
    // const int* valid, const int* partner, int m, int c, InfoNceArgs a); block k reads z
    // rows < m and the per-row arrays [m], writes loss and lse of its 32 rows below m;
    // sizes checked above and by ensure.
    check(unsafe { l.launch(tiles(m)) }, "infonce_fwd_f32");
}

/// dz [m, c] (overwritten) = scale * d(sum of valid L_i)/dz from the saved lse: anchor
/// rows always, column rows when `opts.detach_columns` is false.
#[allow(clippy::too_many_arguments)]
pub fn infonce_bwd(
    cu: &Cuda, dz: &mut CudaSlice<f32>, z: &CudaSlice<f32>, lse: &CudaSlice<f32>, labels: &CudaSlice<i32>,
    anchor: &CudaSlice<i32>, partner: &CudaSlice<i32>, m: usize, c: usize, opts: InfoNceOptions, scale: f32,
    inputs: Precision,
) {
    if m == 0 {
        return;
    }
    let _r = cu.range("infonce_bwd");
    check_inputs("infonce_bwd", z, labels, anchor, partner, m, c);
    need(dz.len(), m * c, "infonce_bwd dz");
    need(lse.len(), m, "infonce_bwd lse");
    let args = InfoNceArgs::new(&opts, scale, inputs);
    let (mi, ci) = (int(m, "infonce m"), int(c, "infonce c"));
    check(
        cu.stream.memset_zeros(&mut dz.slice_mut(..m * c)),
        "infonce_bwd zero dz",
    );
    let mut guard = cu.scratch.lock().unwrap();
    let s = &mut *guard;
    let npos = ensure(&cu.stream, &mut s.i32_a, m);
    let valid = ensure(&cu.stream, &mut s.i32_b, m);
    counts(cu, npos, valid, labels, anchor, partner, m, &args);

    let mut l = cu.stream.launch_builder(cu.func("infonce_bwd_rows_f32"));
    l.arg(&mut *dz)
        .arg(z)
        .arg(lse)
        .arg(labels)
        .arg(&*npos)
        .arg(&*valid)
        .arg(partner);
    l.arg(&mi).arg(&ci).arg(&args);
    // SAFETY: (float* dz, const float* z, const float* lse, const int* labels, const int*
    // npos, const int* valid, const int* partner, int m, int c, InfoNceArgs a); block k
    // reads z rows < m and writes dz rows of its own tile (zeroed just before); sizes
    // checked above and by ensure.
    check(unsafe { l.launch(tiles(m)) }, "infonce_bwd_rows_f32");
    if opts.detach_columns {
        return;
    }
    let dzc = ensure(&cu.stream, &mut s.f32_b, m * c);
    check(
        cu.stream.memset_zeros(&mut dzc.slice_mut(..m * c)),
        "infonce_bwd zero scratch",
    );
    let mut l = cu.stream.launch_builder(cu.func("infonce_bwd_cols_f32"));
    l.arg(&mut *dz)
        .arg(&mut *dzc)
        .arg(z)
        .arg(lse)
        .arg(labels)
        .arg(&*npos)
        .arg(&*valid)
        .arg(partner);
    l.arg(&mi).arg(&ci).arg(&args);
    // SAFETY: (float* dz, float* dzc, const float* z, const float* lse, const int* labels,
    // const int* npos, const int* valid, const int* partner, int m, int c, InfoNceArgs a);
    // block k owns column rows 32k.. of dzc and dz (both m*c floats, checked / ensured),
    // reads z rows < m.
    check(unsafe { l.launch(tiles(m)) }, "infonce_bwd_cols_f32");
}
