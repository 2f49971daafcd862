//! AdamW, per tensor and fused over all tensors, and the global gradient norm
//! (kernels/adamw.cu). CPU twin: cpu/adamw.rs.
use super::{check, ensure, grid_1d, int, need, Cuda, CudaBuf, BLOCK};
use crate::backend::cpu::adamw::REDUCE_CHUNK;
use crate::backend::{AdamW, Backend, ParamSlot, Precision};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

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

impl AdamArgs {
    /// The scalars of step `step` (1-based), formed in f64 exactly as the CPU twin forms them.
    fn new(lr: f32, beta1: f32, beta2: f32, eps: f32, weight_decay: f32, step: u64) -> AdamArgs {
        assert!(step >= 1, "adamw: step is 1-based");
        let (lr64, b1, b2) = (lr as f64, beta1 as f64, beta2 as f64);
        AdamArgs {
            decay: (1.0 - lr64 * weight_decay as f64) as f32,
            step_size: (lr64 / (1.0 - b1.powf(step as f64))) as f32,
            bc2_sqrt: (1.0 - b2.powf(step as f64)).sqrt() as f32,
            w1: (1.0 - b1) as f32,
            w2: (1.0 - b2) as f32,
            beta2,
            eps,
            pad: 0.0,
        }
    }
}

/// One AdamW step (PyTorch semantics) on param, m, v [n] with gradient grad * grad_scale;
/// step is 1-based. (`adamw_all` also writes the GEMMs' rounded weight copies.)
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    cu: &Cuda, param: &mut CudaSlice<f32>, grad: &CudaSlice<f32>, m: &mut CudaSlice<f32>, v: &mut CudaSlice<f32>,
    n: usize, lr: f32, beta1: f32, beta2: f32, eps: f32, weight_decay: f32, step: u64, grad_scale: f32,
) {
    let args = AdamArgs::new(lr, beta1, beta2, eps, weight_decay, step);
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
    let ni = int(n, "adamw n");
    let mut l = cu.stream.launch_builder(cu.func("adamw_f32"));
    l.arg(param)
        .arg(grad)
        .arg(m)
        .arg(v)
        .arg(&ni)
        .arg(&args)
        .arg(&grad_scale);
    // SAFETY: (float* param, const float* grad, float* m, float* v, int n, AdamArgs a, float
    // grad_scale); one thread per element < n; all four buffers hold n floats (checked
    // above).
    check(unsafe { l.launch(grid_1d(n, BLOCK)) }, "adamw_f32");
}

/// Elements per block of `adamw_multi_f32` (MULTI_CHUNK in kernels/adamw.cu).
const MULTI_CHUNK: usize = 2048;
// The kernels' MULTI_THREADS and REDUCE_THREADS: each thread's elements of its chunk are
// fixed at compile time (MULTI_CHUNK and the norm's REDUCE_CHUNK multiples of it).
const _: () =
    assert!(BLOCK == 256 && MULTI_CHUNK.is_multiple_of(BLOCK as usize) && REDUCE_CHUNK.is_multiple_of(BLOCK as usize));

/// kernels/adamw.cu's AdamTensor: one tensor of the fused AdamW launch.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct AdamTensor {
    param: u64,
    grad: u64,
    m: u64,
    v: u64,
    param_low: u64,
    n: i64,
    first_block: i32,
    decays: i32,
}
// SAFETY: #[repr(C)] plain data with the field order and types of the CUDA struct (five
// pointers, long long, two ints: 56 bytes, 8-aligned, no padding).
unsafe impl DeviceRepr for AdamTensor {}

/// kernels/adamw.cu's SquaresTensor: one tensor of the fused squared-norm reduction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SquaresTensor {
    x: u64,
    n: i64,
    first_block: i32,
    nblocks: i32,
}
// SAFETY: #[repr(C)] plain data with the field order and types of the CUDA struct (24 bytes).
unsafe impl DeviceRepr for SquaresTensor {}

/// A tensor table on the device with the host copy it was uploaded from: reused while the
/// host table (the buffers' addresses and sizes) is unchanged, so a training loop uploads
/// it once.
pub(super) struct Table<T> {
    host: Vec<T>,
    device: super::DevMem<T>,
}

/// The device copy of `host`, uploaded only when it differs from the cached one.
fn table<'a, T: DeviceRepr + PartialEq + Clone>(
    cu: &Cuda, slot: &'a mut Option<Table<T>>, host: Vec<T>, what: &str,
) -> &'a CudaSlice<T> {
    if slot.as_ref().is_none_or(|t| t.host != host) {
        *slot = None;
        let device = check(cu.copy_of(&host), what);
        *slot = Some(Table { host, device });
    }
    &slot.as_ref().unwrap().device
}

/// `blocks` blocks of BLOCK threads (one per tensor chunk of the fused kernels).
fn blocks_of(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn addr<T: DevicePtr<f32>>(cu: &Cuda, buf: &T) -> u64 {
    let (p, _sync) = buf.device_ptr(&cu.stream);
    p
}

/// `Backend::adamw_all`: every slot's AdamW step in one launch of `adamw_multi_f32`,
/// element for element the update of `adamw` (same device function, same scalars; the
/// non-decaying tensors use decay 1, which is what 1 - lr * 0 gives), and each slot's
/// rounded copy written in the same pass with kernels/quantize.cu's rounding.
pub fn adamw_all(
    cu: &Cuda, slots: &mut [ParamSlot<'_, CudaBuf>], hp: AdamW, step: u64, grad_scale: f32, low_precision: Precision,
) {
    adamw_multi(cu, slots, hp, step, grad_scale, 0, low_precision)
}

/// `adamw_all`, with `stats` (a device address, or 0) holding sum_partials_multi_f64's
/// clipping decision: the kernel then skips, or takes its gradient scale from there.
fn adamw_multi(
    cu: &Cuda, slots: &mut [ParamSlot<'_, CudaBuf>], hp: AdamW, step: u64, grad_scale: f32, stats: u64,
    low_precision: Precision,
) {
    let args = AdamArgs::new(hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, step);
    let _r = cu.range("adamw_all");
    let mut host = Vec::with_capacity(slots.len());
    let mut blocks = 0usize;
    // the storage of every rounded copy (one launch writes them all alike)
    let mut low_storage: Option<Precision> = None;
    for s in slots.iter_mut().filter(|s| s.n > 0) {
        let w = "adamw_all";
        let (param, grad) = (s.param.f32_mut(w), s.grad.f32(w));
        let (m, v) = (s.m.f32_mut(w), s.v.f32_mut(w));
        for (len, what) in [
            (param.len(), "param"),
            (grad.len(), "grad"),
            (m.len(), "m"),
            (v.len(), "v"),
        ] {
            need(len, s.n, what);
        }
        let param_low = match s.low.as_deref_mut() {
            Some(low) => {
                need(low.len(), s.n, "low");
                let p = low.precision();
                assert!(
                    low_storage.replace(p).is_none_or(|q| q == p),
                    "adamw_all: the rounded copies are stored in different types"
                );
                assert!(
                    p == Precision::Fp32 || p == low_precision,
                    "adamw_all: a {p} copy rounded to {low_precision}"
                );
                low.addr(&cu.stream)
            }
            None => 0,
        };
        host.push(AdamTensor {
            param: addr_mut(cu, param),
            grad: addr(cu, grad),
            m: addr_mut(cu, m),
            v: addr_mut(cu, v),
            param_low,
            n: s.n as i64,
            first_block: int(blocks, "adamw_all blocks"),
            decays: s.decays as i32,
        });
        blocks += s.n.div_ceil(MULTI_CHUNK);
    }
    if host.is_empty() {
        return;
    }
    int(blocks, "adamw_all blocks");
    let nt = int(host.len(), "adamw_all tensors");
    // kernels/adamw.cu LOW_*: how param_low rounds
    let low_mode: i32 = match low_precision {
        Precision::Fp32 => 0,
        Precision::Bf16 => 1,
        Precision::Fp16 => 2,
    };
    let low_t = super::round_code(low_storage.unwrap_or(Precision::Fp32));
    let mut guard = cu.scratch.lock().unwrap();
    let t = table(cu, &mut guard.adam_tables, host, "adamw_all table upload");
    let mut l = cu.stream.launch_builder(cu.func("adamw_multi_f32"));
    l.arg(t)
        .arg(&nt)
        .arg(&args)
        .arg(&grad_scale)
        .arg(&stats)
        .arg(&low_mode)
        .arg(&low_t);
    // SAFETY: (const AdamTensor* tensors, int nt, AdamArgs a, float grad_scale, const
    // float* stats, int low_mode, int low_t); stats is null or a live buffer of
    // ClipStats::LEN floats (the caller's); block b updates elements of the one tensor whose
    // first_block..first_block + ceil(n/2048) holds b, below its n; every pointer in the
    // table is a live buffer of this backend holding at least n floats (param_low n
    // elements of low_t's storage, or null; checked above); the slots' borrows keep them
    // alive and unaliased until the call returns, and freeing is stream-ordered after the
    // kernel.
    check(unsafe { l.launch(blocks_of(blocks)) }, "adamw_multi_f32");
}

fn addr_mut<T: DevicePtrMut<f32>>(cu: &Cuda, buf: &mut T) -> u64 {
    let (p, _sync) = buf.device_ptr_mut(&cu.stream);
    p
}

/// `Backend::sum_squares_all`: the partials of every tensor in one launch, their in-order
/// sums in a second, one f64 copied back: the per-tensor `sum_squares` calls summed in
/// order on the host, bit for bit, with one synchronisation instead of one per tensor.
pub fn sum_squares_all(cu: &Cuda, xs: &[(&CudaSlice<f32>, usize)]) -> f64 {
    let _r = cu.range("sum_squares_all");
    if !squares(cu, xs, None) {
        return 0.0;
    }
    let guard = cu.scratch.lock().unwrap();
    let out = guard.f64_b.as_ref().expect("squares filled it");
    let v = check(cu.stream.clone_dtoh(&out.slice(..1)), "sum_squares_all download");
    cu.synchronize();
    v[0]
}

/// `Backend::clip_adamw_all`: the reductions of `sum_squares_all`, whose last thread
/// decides the clipping into `stats`, then `adamw_all` reading that decision. Three
/// launches, nothing copied back: the host goes on to the next step at once.
#[allow(clippy::too_many_arguments)]
pub fn clip_adamw_all(
    cu: &Cuda, slots: &mut [ParamSlot<'_, CudaBuf>], hp: AdamW, step: u64, clip: f32, loss_scale: f32,
    overflows_seen: Option<u32>, low_precision: Precision, stats: &mut CudaBuf,
) {
    let _r = cu.range("clip_adamw_all");
    let w = "clip_adamw_all stats";
    let st = stats.f32_mut(w);
    need(st.len(), crate::backend::ClipStats::LEN, w);
    let st = addr_mut(cu, st);
    let grads: Vec<(&CudaSlice<f32>, usize)> = slots.iter().map(|s| (s.grad.f32("clip_adamw_all"), s.n)).collect();
    let seen = match overflows_seen {
        Some(n) => int(n as usize, "clip_adamw_all overflows seen"),
        None => -1,
    };
    if !squares(cu, &grads, Some((st, clip, loss_scale, seen))) {
        // no gradient at all (no parameters): norm 0, nothing to update
        use crate::backend::{ClipState, ClipStats};
        let prev = cu.download(stats, ClipStats::LEN);
        let (state, overflows) = ClipState::decide(&prev, overflows_seen, 0.0, loss_scale);
        let scale = if state.skipped() { 0.0 } else { 1.0 / loss_scale };
        cu.upload(stats, &ClipStats::encode(0.0, state, scale, overflows));
        return;
    }
    drop(grads);
    adamw_multi(cu, slots, hp, step, 0.0, st, low_precision);
}

/// The SquaresTensor table of (address, buffer length, n) tensors, empty ones left out, and
/// its number of REDUCE_CHUNK chunks.
fn squares_table(xs: &[(u64, usize, usize)], what: &str) -> (Vec<SquaresTensor>, usize) {
    let mut host = Vec::with_capacity(xs.len());
    let mut blocks = 0usize;
    for &(x, len, n) in xs.iter().filter(|&&(_, _, n)| n > 0) {
        need(len, n, what);
        let nb = n.div_ceil(REDUCE_CHUNK);
        host.push(SquaresTensor {
            x,
            n: n as i64,
            first_block: int(blocks, what),
            nblocks: int(nb, what),
        });
        blocks += nb;
    }
    int(blocks, what);
    (host, blocks)
}

/// `Backend::zero_all`: x[..n] = 0 for every tensor, one launch of `zero_multi_f32` over
/// the same table as the gradient norm's (so a training step uploads it once).
pub fn zero_all(cu: &Cuda, xs: &mut [(&mut CudaSlice<f32>, usize)]) {
    let xs: Vec<(u64, usize, usize)> = xs.iter_mut().map(|(x, n)| (addr_mut(cu, *x), x.len(), *n)).collect();
    let (host, blocks) = squares_table(&xs, "zero_all");
    if host.is_empty() {
        return;
    }
    let _r = cu.range("zero_grads");
    let nti = int(host.len(), "zero_all tensors");
    let mut guard = cu.scratch.lock().unwrap();
    let s = &mut *guard;
    let t = table(cu, &mut s.squares_tables, host, "zero_all table upload");
    let mut l = cu.stream.launch_builder(cu.func("zero_multi_f32"));
    l.arg(t).arg(&nti);
    // SAFETY: (const SquaresTensor* tensors, int nt); block b writes zeros to its tensor's
    // REDUCE_CHUNK chunk below n; every x is a live buffer of at least n floats (checked
    // in squares_table) and the table has one chunk per block.
    check(unsafe { l.launch(blocks_of(blocks)) }, "zero_multi_f32");
}

/// Threads of the in-order partial sums (kernels/adamw.cu `SUM_BLOCK`: their shared tile).
const SUM_BLOCK: u32 = 256;

/// Enqueues `sum_squares_all`'s two reductions into the scratch f64_b[0], and with `clip`
/// = (stats address, clip, loss scale, overflows seen or -1) the clipping decision into
/// stats. False (nothing enqueued) when every tensor is empty.
fn squares(cu: &Cuda, xs: &[(&CudaSlice<f32>, usize)], clip: Option<(u64, f32, f32, i32)>) -> bool {
    let xs: Vec<(u64, usize, usize)> = xs.iter().map(|&(x, n)| (addr(cu, x), x.len(), n)).collect();
    let (host, blocks) = squares_table(&xs, "sum_squares_all");
    if host.is_empty() {
        return false;
    }
    let nt = host.len();
    let nti = int(nt, "sum_squares_all tensors");
    let mut guard = cu.scratch.lock().unwrap();
    let s = &mut *guard;
    table(cu, &mut s.squares_tables, host, "sum_squares_all table upload");
    let t: &CudaSlice<_> = &s.squares_tables.as_ref().unwrap().device;
    let partials = ensure(cu, &mut s.f64_a, blocks);
    let out = ensure(cu, &mut s.f64_b, 1);
    let per_tensor = ensure(cu, &mut s.f64_c, nt);
    let counter = ensure(cu, &mut s.counters, 1);
    let mut l = cu.stream.launch_builder(cu.func("sum_squares_multi_partials_f32"));
    l.arg(&mut *partials).arg(t).arg(&nti);
    // SAFETY: (double* partials, const SquaresTensor* tensors, int nt); block b reads
    // REDUCE_CHUNK elements of its tensor below n (live buffers of at least n floats,
    // checked above) and writes partials[b]; partials holds `blocks` doubles (ensure).
    check(unsafe { l.launch(blocks_of(blocks)) }, "sum_squares_multi_partials_f32");
    let (stats, clip, loss_scale, overflows_seen) = clip.unwrap_or((0, 0.0, 1.0, -1));
    let mut l = cu.stream.launch_builder(cu.func("sum_partials_multi_f64"));
    l.arg(&mut *out)
        .arg(&mut *per_tensor)
        .arg(&*partials)
        .arg(t)
        .arg(&nti)
        .arg(&stats)
        .arg(&clip)
        .arg(&loss_scale)
        .arg(&overflows_seen)
        .arg(&mut *counter);
    // SAFETY: (double* out, double* per_tensor, const double* partials, const
    // SquaresTensor* tensors, int nt, float* stats, float clip, float loss_scale, int
    // overflows_seen, unsigned* counter); block k reads tensor k's partials as the table
    // says (below `blocks`) and writes per_tensor[k], the last block reads per_tensor[..nt]
    // and writes out[0]; sizes from ensure; counter[0] is zero (ensure's contract) and left
    // zero; stats is null or a live buffer of ClipStats::LEN floats (clip_adamw_all checked
    // it). Blocks of SUM_BLOCK threads, the kernel's shared tile.
    check(
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (nt as u32, 1, 1),
                block_dim: (SUM_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            })
        },
        "sum_partials_multi_f64",
    );
    true
}

/// sum(x[..n]^2) in f64: REDUCE_CHUNK-element partials (a fixed tree per block), summed in
/// order by one block, one f64 copied back. Deterministic; differs from the CPU's
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
    let partials = ensure(cu, &mut s.f64_a, chunks);
    let out = ensure(cu, &mut s.f64_b, 1);
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
    // SAFETY: (double* out, const double* partials, int k); one block reads partials[..k]
    // and writes out[0]; sizes from ensure; SUM_BLOCK threads, the kernel's shared tile.
    check(
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (SUM_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            })
        },
        "sum_partials_f64",
    );
    let v = check(cu.stream.clone_dtoh(&out.slice(..1)), "sum_squares download");
    cu.synchronize();
    v[0]
}
