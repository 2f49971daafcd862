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

/// Kernels that opt in to more than 48 KiB of dynamic shared memory (`Cuda::new`).
pub(super) const OPTS_IN_TO_SMEM: [&str; 2] = ["infonce_fwd16_", "infonce_bwd_rows16_"];

/// One block of 256 threads per 32-row tile, with `smem` bytes of dynamic shared memory.
fn tiles(m: usize, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (m.div_ceil(32) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// The 16-bit kernels' 8-wide accumulator blocks per warp, instantiated in
/// kernels/infonce.cu (`infonce_bwd_rows16_*_nbN`): hidden sizes up to 32 N.
const ROWS16_NB: [usize; 3] = [12, 24, 32];

/// The 16-bit shared-memory kernels' plan at width c: kernel type, accumulator blocks nb,
/// column-tile buffers and dynamic shared bytes.
#[derive(Clone, Copy, Debug)]
struct Smem16 {
    ty: &'static str,
    nb: usize,
    nbuf: usize,
    bytes: usize,
}

/// Which 16-bit shared-memory kernels run InfoNCE at width c: Some when `inputs` is
/// 16-bit, the path is on, c fits the widest instantiation and the anchor tile plus one or
/// (preferably) two column tiles fit the device's shared memory; None: the SIMT kernels
/// (which compute the same in 16-bit modes, with 32-element chunks streamed from z).
fn smem16(cu: &Cuda, inputs: Precision, c: usize) -> Option<Smem16> {
    let ty = match inputs {
        Precision::Fp32 => return None,
        Precision::Bf16 => "bf16",
        Precision::Fp16 => "f16",
    };
    if !cu.use_smem16 {
        return None;
    }
    let c16 = c.div_ceil(16) * 16;
    let nb = *ROWS16_NB.iter().find(|&&nb| c16 <= 32 * nb)?;
    let room = |name: String| cu.dyn_smem.get(name.as_str()).copied().unwrap_or(0);
    let room = room(format!("infonce_fwd16_{ty}")).min(room(format!("infonce_bwd_rows16_{ty}_nb{nb}")));
    let tile = 32 * zr_ld(c) * 2; // [32][c16 + 8] halves
    (1..=cu.smem16_buffers.clamp(1, 2))
        .rev()
        .map(|nbuf| Smem16 {
            ty,
            nb,
            nbuf,
            bytes: (1 + nbuf) * tile,
        })
        .find(|p| p.bytes <= room)
}

/// Row stride of zr (`infonce_round16_*`), in halves: c rounded up to 16, plus 8.
fn zr_ld(c: usize) -> usize {
    c.div_ceil(16) * 16 + 8
}

/// zr = z [m, c] rounded to 16 bits (`plan.ty`) in rows of `zr_ld(c)` halves, m rounded
/// up to 32 rows, zero padded: what the 16-bit shared-memory kernels copy tiles from.
fn round16<'a>(
    cu: &Cuda, slot: &'a mut Option<super::DevMem<u16>>, z: &CudaSlice<f32>, m: usize, c: usize, plan: Smem16,
) -> &'a CudaSlice<u16> {
    let (rows, ld) = (m.div_ceil(32) * 32, zr_ld(c));
    let zr = ensure(cu, slot, rows * ld);
    let (mi, ci, ri, li) = (
        int(m, "infonce m"),
        int(c, "infonce c"),
        int(rows, "infonce rows"),
        int(ld, "infonce ld"),
    );
    int(rows * ld, "infonce zr elements");
    let name = name_of(cu, format!("infonce_round16_{}", plan.ty));
    let mut l = cu.stream.launch_builder(cu.func(name));
    l.arg(&mut *zr).arg(z).arg(&mi).arg(&ci).arg(&ri).arg(&li);
    // SAFETY: (unsigned short* zr, const float* z, int m, int c, int rows, int ldh); writes
    // zr [rows][ldh] (ensured above), reads z [m][c] (checked by the caller); the 16-byte
    // stores are aligned: ldh is a multiple of 8 and zr starts an allocation.
    check(unsafe { l.launch(grid_1d(rows * ld / 8, 256)) }, name);
    zr
}

/// A kernel name from the instantiated set (`Cuda::func` needs the static name).
fn name_of(cu: &Cuda, name: String) -> &'static str {
    cu.funcs
        .keys()
        .find(|n| **n == name)
        .copied()
        .unwrap_or_else(|| panic!("CUDA kernel {name} is not instantiated in kernels/infonce.cu"))
}

/// Which InfoNCE kernels run at width c in precision `inputs` on this backend, in words
/// (`Cuda::infonce_path`; the bench's JSON reports it).
pub fn path(cu: &Cuda, inputs: Precision, c: usize) -> &'static str {
    match (inputs, smem16(cu, inputs, c)) {
        (Precision::Fp32, _) => "kernels/infonce.cu, fp32 on CUDA cores",
        (_, Some(Smem16 { nbuf: 2, .. })) => {
            "kernels/infonce.cu, 16-bit z tiles in shared memory (column tiles double-buffered), every product on \
             tensor cores (mma.sync)"
        }
        (_, Some(_)) => {
            "kernels/infonce.cu, 16-bit z tiles in shared memory (one column-tile buffer), every product on tensor \
             cores (mma.sync)"
        }
        (_, None) => {
            "kernels/infonce.cu, similarities on tensor cores (mma.sync), 16-bit gradient products on CUDA cores"
        }
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

/// |P_i|, validity and class representative of every row into npos, valid, rep [m].
#[allow(clippy::too_many_arguments)]
fn counts(
    cu: &Cuda, npos: &mut CudaSlice<i32>, valid: &mut CudaSlice<i32>, rep: &mut CudaSlice<i32>,
    labels: &CudaSlice<i32>, anchor: &CudaSlice<i32>, partner: &CudaSlice<i32>, m: usize, args: &InfoNceArgs,
) {
    let mi = int(m, "infonce m");
    let mut l = cu.stream.launch_builder(cu.func("infonce_counts_f32"));
    l.arg(npos)
        .arg(valid)
        .arg(rep)
        .arg(labels)
        .arg(anchor)
        .arg(partner)
        .arg(&mi)
        .arg(args);
    // SAFETY: (int* npos, int* valid, int* rep, const int* labels, const int* anchor,
    // const int* partner, int m, InfoNceArgs a); thread i < m reads labels[..m], anchor[i],
    // partner[i] (partner in -1..m by contract, as on the CPU) and writes npos[i],
    // valid[i], rep[i]; those hold m ints (ensure), inputs checked by the caller.
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
    let npos = ensure(cu, &mut s.i32_a, m);
    let valid = ensure(cu, &mut s.i32_b, m);
    let rep = ensure(cu, &mut s.i32_c, m);
    counts(cu, npos, valid, rep, labels, anchor, partner, m, &args);
    let Some(plan) = smem16(cu, inputs, c) else {
        let mut l = cu.stream.launch_builder(cu.func("infonce_fwd_f32"));
        l.arg(loss)
            .arg(lse)
            .arg(z)
            .arg(labels)
            .arg(&*npos)
            .arg(&*valid)
            .arg(partner);
        l.arg(&mi).arg(&ci).arg(&args);
        // SAFETY: (float* loss, float* lse, const float* z, const int* labels, const int*
        // npos, const int* valid, const int* partner, int m, int c, InfoNceArgs a); block k
        // reads z rows < m and the per-row arrays [m], writes loss and lse of its 32 rows
        // below m; sizes checked above and by ensure.
        check(unsafe { l.launch(tiles(m, 0)) }, "infonce_fwd_f32");
        return;
    };
    let zr = round16(cu, &mut s.u16_a, z, m, c, plan);
    let name = name_of(cu, format!("infonce_fwd16_{}", plan.ty));
    let nbuf = plan.nbuf as i32;
    let mut l = cu.stream.launch_builder(cu.func(name));
    l.arg(loss)
        .arg(lse)
        .arg(zr)
        .arg(labels)
        .arg(&*npos)
        .arg(&*valid)
        .arg(partner);
    l.arg(&mi).arg(&ci).arg(&nbuf).arg(&args);
    // SAFETY: (float* loss, float* lse, const unsigned short* zr, const int* labels, const
    // int* npos, const int* valid, const int* partner, int m, int c, int nbuf, InfoNceArgs
    // a); block k copies zr rows of its tile and every column tile (zr holds m rounded up
    // to 32 rows of zr_ld(c) halves: `round16`), reads the per-row arrays [m], writes loss
    // and lse of its 32 rows below m; its (1 + nbuf) [32][c16 + 8] half tiles are the
    // `bytes` of dynamic shared memory it is given, within its opt-in (`smem16`).
    check(unsafe { l.launch(tiles(m, plan.bytes)) }, name);
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
    let npos = ensure(cu, &mut s.i32_a, m);
    let valid = ensure(cu, &mut s.i32_b, m);
    let rep = ensure(cu, &mut s.i32_c, m);
    counts(cu, npos, valid, rep, labels, anchor, partner, m, &args);

    if let Some(plan) = smem16(cu, inputs, c) {
        // z rounded, the linear term's per-class sums, then the anchor rows on tensor cores
        let zr = round16(cu, &mut s.u16_a, z, m, c, plan);
        let sums = ensure(cu, &mut s.f64_d, (m + 1) * c);
        let list = ensure(cu, &mut s.i32_d, m);
        let count = ensure(cu, &mut s.u32_count, 1);
        check(cu.stream.memset_zeros(&mut *count), "infonce_bwd zero count");
        let mut l = cu.stream.launch_builder(cu.func("infonce_rep_list_f32"));
        l.arg(&mut *list).arg(&mut *count).arg(&*rep).arg(&mi);
        // SAFETY: (int* list, unsigned* count, const int* rep, int m); thread r < m reads
        // rep[r] and appends r to list when rep[r] = r: at most m entries, list holds m
        // (ensure); count (one, ensured) was zeroed just above.
        check(unsafe { l.launch(grid_1d(m, 256)) }, "infonce_rep_list_f32");
        let mut l = cu.stream.launch_builder(cu.func("infonce_class_sums_f32"));
        l.arg(&mut *sums)
            .arg(z)
            .arg(&*rep)
            .arg(&*list)
            .arg(&*count)
            .arg(&mi)
            .arg(&ci)
            .arg(&args);
        // 16 blocks a column block, looping over the (few) classes and the total
        let cfg = LaunchConfig {
            grid_dim: (16, c.div_ceil(32) as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: (double* sums, const float* z, const int* rep, const int* list, const
        // unsigned* count, int m, int c, InfoNceArgs a); block (x, y) writes sums[r, 32y ..]
        // (elements below c) for the listed representatives r < m and r = m; sums holds
        // (m + 1) c doubles (ensure); reads z [m, c], rep [m] and list [*count <= m], just
        // written by `counts` and infonce_rep_list_f32.
        check(unsafe { l.launch(cfg) }, "infonce_class_sums_f32");
        let name = name_of(cu, format!("infonce_bwd_rows16_{}_nb{}", plan.ty, plan.nb));
        let nbuf = plan.nbuf as i32;
        let mut l = cu.stream.launch_builder(cu.func(name));
        l.arg(&mut *dz)
            .arg(&*sums)
            .arg(zr)
            .arg(lse)
            .arg(labels)
            .arg(&*npos)
            .arg(&*valid)
            .arg(partner)
            .arg(&*rep);
        l.arg(&mi).arg(&ci).arg(&nbuf).arg(&args);
        // SAFETY: (float* dz, const double* sums, const unsigned short* zr, const float*
        // lse, const int* labels, const int* npos, const int* valid, const int* partner,
        // const int* rep, int m, int c, int nbuf, InfoNceArgs a); block k copies zr rows of
        // its tile and every column tile (m rounded up to 32 rows: `round16`), reads sums
        // rows rep[i] and m, and writes dz rows of its own tile, elements below c; sizes
        // checked above and by ensure; `bytes` of dynamic shared memory within its opt-in
        // (`smem16`), and nb 8-wide blocks per warp cover c (`smem16`).
        check(unsafe { l.launch(tiles(m, plan.bytes)) }, name);
    } else {
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
        check(unsafe { l.launch(tiles(m, 0)) }, "infonce_bwd_rows_f32");
    }
    if opts.detach_columns {
        return;
    }
    let dzc = ensure(cu, &mut s.f32_b, m * c);
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
    check(unsafe { l.launch(tiles(m, 0)) }, "infonce_bwd_cols_f32");
}
