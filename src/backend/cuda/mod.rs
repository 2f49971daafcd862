//! The CUDA backend: the [`Backend`] trait on one GPU (buffers are [`CudaBuf`]: fp32, or
//! 16-bit storage for `alloc_rounded`), kernels from kernels/*.cu (compiled by build.rs
//! with NVRTC and embedded), GEMMs through cuBLASLt.
//!
//! Status: checked on the CPU emulator of tests/cuda_emu in every CI, and on an H200
//! (2026-11-30, BENCHMARKS.md "First GPU runs": self-check, runs and 45 of 47 parity
//! tests pass; two 16-bit bounds do not). The CLI runs a self-check against the CPU
//! backend before it uses a device (src/cli/selfcheck.rs), so a GPU on which this backend
//! is wrong is refused.
//!
//! Layout mirrors the CPU backend: one file per op family with free functions of the
//! same name and argument order as the CPU twins (`cuda::layernorm::layernorm_fwd` <->
//! `cpu::layernorm::layernorm_fwd` <-> `layernorm_fwd_f32` in kernels/layernorm.cu).
//!
//! Design notes:
//! - cudarc with `dynamic-loading`: libcuda, libcublas and libnvToolsExt are opened on
//!   first use, so a machine without CUDA runs the same binary on the CPU backend.
//!   [`availability`] checks each library before anything could panic in cudarc's loader.
//! - One stream; cudarc's per-buffer event tracking is switched off (it only matters with
//!   several streams). Ops enqueue work and return; `download`, `sum_squares(_all)` and
//!   `download_wait` are the only calls that wait for the device, as the trait intends.
//!   Uploads go through page-locked staging (uploads.rs) and copies back can too
//!   (`download_start`), so a training step enqueues without ever waiting. Both record
//!   and wait for events of their own: with tracking off, cudarc records none for them.
//! - Device memory (memory.rs): every buffer is a [`DevMem`], from the stream-ordered
//!   allocator where the device has memory pools and it works (the H100/H200 case), else
//!   from plain cuMemAlloc, which `Cuda::new` falls back to when the pools refuse (as a
//!   sandbox's GPU proxy might) and `DEEPCUT_CUDA_ALLOCATOR` can force.
//! - GEMMs (gemm.rs, blaslt.rs): fp32 mode is fp32 (compute type 32F, no TF32). In bf16 /
//!   fp16 mode the operands are 16-bit buffers read natively on tensor cores with fp32
//!   accumulation (fp32 buffers holding rounded values also work: the FAST_16BF / _16F
//!   compute types convert them). `gemm_bias` rides the bias in cuBLASLt's epilogue (the
//!   GELU epilogue is the tanh approximation, not BERT's erf, so GELU stays a kernel).
//! - Attention: fp32 mode runs kernels/attention.cu on CUDA cores; bf16 / fp16 mode runs
//!   kernels/attention_mma.cu, whose every product is an mma.sync on tensor cores, with the
//!   probabilities and score gradients rounded where cpu/attention.rs rounds them.
//! - Reductions are deterministic: fixed chunking (the CPU's), fixed trees, no float
//!   atomics; scatter-adds use one owner block per destination row.
//! - Ops cannot return errors (the trait has no error channel): a CUDA error during an op
//!   panics with the op's name and CUDA's message. Setting up ([`Cuda::new`]) returns
//!   [`Error::Device`] instead.
//! - 16-bit storage: in bf16 / fp16 the encoder allocates what the GEMMs and attention
//!   read (and the weight copies they read) with `alloc_rounded`, which is 16-bit here:
//!   the kernels that touch those buffers take each as an address and a storage code
//!   (kernels/common.cuh `ld` / `st`) and compute in fp32, so the values are those of the
//!   CPU's fp32 emulation, bit for bit (tests/gpu_parity.rs
//!   `rounded_storage_matches_fp32_storage`), at half the memory and traffic.
//! - NVTX: every op opens a range named after it when libnvToolsExt is present (NVTX v2;
//!   CUDA 12 toolkits still ship it, header-only NVTX 3 installs do not and then there are
//!   no ranges). Layer-level ranges belong in the model: see [`Cuda::range`].
pub mod adamw;
pub mod attention;
pub mod blaslt;
pub mod dropout;
pub mod embedding;
pub mod gelu;
pub mod gemm;
pub mod images;
pub mod infonce;
pub mod l2norm;
pub mod layernorm;
pub mod libs;
pub mod memory;
pub mod mma_probe;
pub mod nvtx;
pub mod optimes;
pub mod quantize;
pub mod rows;
pub mod softmax_ce;
mod uploads;

use super::{AdamW, Backend, Dropout, InfoNceOptions, ParamSlot, Precision, RangeGuard};
use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, DriverError, LaunchConfig};
use memory::{Allocator, DevMem};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Threads per block of the element-wise kernels.
const BLOCK: u32 = 256;

/// What a usable device looks like, for messages and `Backend::name`.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub major: u32,
    pub minor: u32,
    pub memory_bytes: usize,
    /// Target of the images loaded ("sm_90", or "compute_90" when the driver JIT-compiles PTX).
    pub image_target: String,
    /// The driver lists memory pools (data-centre GPUs do; some virtual GPUs do not).
    pub memory_pools: bool,
    /// Where device memory comes from (memory.rs): stream-ordered when the device has
    /// pools and their allocation works, else plain cuMemAlloc.
    pub allocator: Allocator,
    /// Why the allocator is not the device's default, when it is not: the pools' refusal,
    /// or `DEEPCUT_CUDA_ALLOCATOR`.
    pub allocator_note: Option<String>,
    /// Why host copies go through pageable memory, when they do: the driver gives no
    /// page-locked memory. Then each upload may wait for the stream to stage it and each
    /// download waits for the work before it (correct, not overlapped); None: page-locked
    /// staging (uploads.rs, [`Staging`]), no wait inside a step.
    pub pageable_why: Option<String>,
}

/// One allocation, memset and free of each candidate before anything else, so that a
/// driver that lists memory pools but refuses stream-ordered allocation (as a sandbox's GPU
/// proxy might) falls back to cuMemAlloc here, saying so, and one that refuses both fails
/// here, naming the allocator, instead of inside the first op of a run.
fn choose_allocator(stream: &Arc<CudaStream>, memory_pools: bool) -> Result<(Allocator, Option<String>)> {
    let probe = |how: Allocator| -> std::result::Result<(), DriverError> {
        drop(memory::zeros::<u8>(stream, 256, how)?);
        stream.synchronize()
    };
    let forced = Allocator::from_env().map_err(Error::Device)?;
    let (first, note) = match forced {
        Some(Allocator::StreamOrdered) if !memory_pools => {
            return Err(Error::Device(
                "DEEPCUT_CUDA_ALLOCATOR=stream-ordered, but the driver lists no memory pools on this device".into(),
            ))
        }
        Some(how) => (how, Some(format!("DEEPCUT_CUDA_ALLOCATOR={}", how.env_value()))),
        None if memory_pools => (Allocator::StreamOrdered, None),
        None => (Allocator::Plain, None),
    };
    match probe(first) {
        Ok(()) => Ok((first, note)),
        // the pools refuse: plain allocations, unless stream-ordered was asked for
        Err(e) if first == Allocator::StreamOrdered && forced.is_none() => {
            let why = format!("the device lists memory pools but cuMemAllocAsync failed ({e})");
            // the failed call may leave its error with the context; a clean synchronise
            // below shows it did not
            probe(Allocator::Plain).map_err(|e2| {
                Error::Device(format!(
                    "CUDA: allocating device memory with cuMemAlloc: {e2} (after {why})"
                ))
            })?;
            Ok((Allocator::Plain, Some(why)))
        }
        Err(e) => Err(Error::Device(format!(
            "CUDA: allocating device memory with {}{}: {e}",
            first.api(),
            if first == Allocator::StreamOrdered {
                " (the driver says the device has memory pools)"
            } else {
                ""
            }
        ))),
    }
}

/// Whether this build and this machine can run the CUDA backend, without touching a GPU
/// more than listing devices: Ok(description of device 0) or Err(why not). Never panics.
pub fn availability() -> std::result::Result<String, String> {
    preflight()?;
    let n = CudaContext::device_count().map_err(|e| format!("CUDA driver: {e}"))?;
    if n < 1 {
        return Err("the CUDA driver reports no device".into());
    }
    Ok(format!("{n} CUDA device(s)"))
}

/// [`availability`] as a yes/no.
pub fn is_available() -> bool {
    availability().is_ok()
}

/// The checks that need no device: kernels compiled, libraries present.
fn preflight() -> std::result::Result<(), String> {
    if let Some(why) = images::NOT_COMPILED {
        return Err(format!("this binary was built without the CUDA kernels ({why})"));
    }
    // SAFETY: only tries to dlopen the library under its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("libcuda.so not found: no NVIDIA driver on this machine".into());
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(
            "libcublas.so not found, nor a libcublas.so.N / libcublasLt.so.N pair this driver runs where the CLI \
             looks (LD_LIBRARY_PATH, the CUDA toolkit, the nvidia wheels of the python3 on PATH): install the \
             CUDA toolkit or the nvidia-cublas-cu12 wheel, or add its lib folder to LD_LIBRARY_PATH"
                .into(),
        );
    }
    Ok(())
}

/// Scratch memory reused across ops (stream order makes reuse safe), grown on demand.
#[derive(Default)]
struct Scratch {
    /// Column-sum partials; LayerNorm's weight partials.
    f32_a: Option<DevMem<f32>>,
    /// LayerNorm's bias partials; attention's D vector; InfoNCE's column accumulator.
    f32_b: Option<DevMem<f32>>,
    /// LayerNorm's partials of its input gradient's column sums (`dinp_bias`).
    f32_c: Option<DevMem<f32>>,
    /// InfoNCE |P_i|, validity and class representatives.
    i32_a: Option<DevMem<i32>>,
    /// The column reductions' per-column-block counters (kernels/common.cuh
    /// `last_block_of_column`): zero when allocated, and each launch leaves them zero.
    counters: Option<DevMem<u32>>,
    i32_b: Option<DevMem<i32>>,
    i32_c: Option<DevMem<i32>>,
    /// sum_squares partials and result; the per-tensor sums of sum_squares_all.
    f64_a: Option<DevMem<f64>>,
    f64_b: Option<DevMem<f64>>,
    f64_c: Option<DevMem<f64>>,
    /// The fp32 product of `gemm_bias`'s cuBLAS fallback into a 16-bit output.
    gemm_f32: Option<DevMem<f32>>,
    /// InfoNCE's per-class sums [m + 1, c] (16-bit backward).
    f64_d: Option<DevMem<f64>>,
    /// InfoNCE's z rounded to 16 bits in padded rows (16-bit kernels, `infonce_round16_*`).
    u16_a: Option<DevMem<u16>>,
    /// scatter_add_rows' source rows per destination row.
    u32_rows: Option<DevMem<u32>>,
    /// InfoNCE's class representatives (16-bit backward) and their count.
    i32_d: Option<DevMem<i32>>,
    u32_count: Option<DevMem<u32>>,
    /// The tensor tables of the fused optimiser kernels, kept on the device while the
    /// parameters they point to stay where they are (kernels/adamw.cu).
    adam_tables: Option<adamw::Table<adamw::AdamTensor>>,
    squares_tables: Option<adamw::Table<adamw::SquaresTensor>>,
}

/// A buffer of at least `n` elements in `slot`, reallocated (zeroed) when too small.
fn ensure<'a, T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    cu: &Cuda, slot: &'a mut Option<DevMem<T>>, n: usize,
) -> &'a mut CudaSlice<T> {
    let n = n.max(1);
    if slot.as_ref().is_none_or(|s| s.len() < n) {
        *slot = None; // free first, then allocate
        *slot = Some(check(cu.zeros::<T>(n), "scratch allocation"));
    }
    slot.as_mut().unwrap()
}

/// A buffer of this backend: fp32, or 16-bit storage of bf16 / fp16 values
/// (`Backend::alloc_rounded`, the activations and GEMM weight copies of the bf16 / fp16
/// modes: half the memory and traffic of fp32, and GEMM operands cuBLASLt reads natively).
/// Ops that accept 16-bit buffers pass the kernel each one's address and storage code
/// ([`CudaBuf::code`]; kernels/common.cuh `ld` / `st`); the others take fp32 only
/// ([`CudaBuf::f32`]) and panic, naming the op, when handed a 16-bit buffer.
pub enum CudaBuf {
    F32(DevMem<f32>),
    /// bf16 or fp16 bit patterns, as the precision says (never `Precision::Fp32`).
    Half(DevMem<u16>, Precision),
}

impl CudaBuf {
    /// Elements (not bytes).
    pub fn len(&self) -> usize {
        match self {
            CudaBuf::F32(s) => s.len(),
            CudaBuf::Half(s, _) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The storage type: `Precision::Fp32` for fp32 buffers.
    pub fn precision(&self) -> Precision {
        match self {
            CudaBuf::F32(_) => Precision::Fp32,
            CudaBuf::Half(_, p) => *p,
        }
    }

    /// The storage code the kernels take next to the address (0 fp32, 1 bf16, 2 fp16).
    pub fn code(&self) -> i32 {
        round_code(self.precision())
    }

    /// The fp32 storage, for ops that take fp32 only; panics naming `what` otherwise.
    pub fn f32(&self, what: &str) -> &CudaSlice<f32> {
        match self {
            CudaBuf::F32(s) => s,
            CudaBuf::Half(_, p) => panic!("{what}: a {p} buffer where this op takes fp32 only"),
        }
    }

    /// `f32`, writable.
    pub fn f32_mut(&mut self, what: &str) -> &mut CudaSlice<f32> {
        match self {
            CudaBuf::F32(s) => s,
            CudaBuf::Half(_, p) => panic!("{what}: a {p} buffer where this op takes fp32 only"),
        }
    }

    /// The device address, as a kernel argument (`void*` next to its `code`). The backend's
    /// one stream orders every use, so no event is recorded (tracking is off).
    pub fn addr(&self, stream: &Arc<CudaStream>) -> u64 {
        use cudarc::driver::DevicePtr;
        match self {
            CudaBuf::F32(s) => s.device_ptr(stream).0,
            CudaBuf::Half(s, _) => s.device_ptr(stream).0,
        }
    }
}

/// The CUDA backend on one device.
pub struct Cuda {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// cuBLASLt for every GEMM, opened on first use (inner None: not available here);
    /// `use_lt` false sends the GEMMs to cuBLAS, gemm_bias to it + add_bias
    /// (`Cuda::without_cublaslt`).
    lt: Mutex<Option<Option<blaslt::Lt>>>,
    use_lt: bool,
    funcs: HashMap<&'static str, CudaFunction>,
    /// Dynamic shared memory (bytes) a launch of each kernel that opted in may ask for: the
    /// device's opt-in maximum less the kernel's static shared memory (infonce.rs `smem16`).
    dyn_smem: HashMap<&'static str, usize>,
    /// InfoNCE's 16-bit kernels with both z tiles in shared memory (the default); false
    /// keeps the streaming SIMT kernels (`Cuda::without_infonce_smem16`).
    use_smem16: bool,
    /// Column-tile buffers of InfoNCE's 16-bit shared-memory kernels where they fit: 2
    /// (the next tile's copy overlaps the current tile's products) or 1.
    smem16_buffers: usize,
    scratch: Mutex<Scratch>,
    /// Page-locked staging of `upload` / `upload_i32` (uploads.rs).
    uploads: Mutex<uploads::Uploads>,
    info: DeviceInfo,
    /// The NVTX library, when this machine has one (nvtx.rs).
    nvtx: Option<&'static nvtx::Nvtx>,
    /// Kernel launches and GEMM calls enqueued so far (`Cuda::enqueued_calls`).
    launches: AtomicU64,
    gemms: AtomicU64,
    /// Whether ranges record timing events (`Cuda::time_ops`), and their events (optimes.rs).
    timing: AtomicBool,
    op_timer: Arc<Mutex<optimes::OpTimer>>,
}

/// An op's range (`Cuda::range`): its NVTX range and, while ops are timed, its events.
/// Both end when this drops.
#[must_use = "the range ends when this drops"]
pub struct OpRange {
    _nvtx: Option<nvtx::Range>,
    _timed: Option<optimes::Timed>,
}

/// Whether a buffer at device address `addr` with storage code `code` (CudaBuf::code; 0 for
/// an fp32 slice, address 0 for none) can be read four elements at a time from any
/// 4-element boundary: 16 bytes aligned in fp32, 8 in 16 bits (kernels/common.cuh ld4 /
/// st4, the _vec4 kernels' loads and stores).
fn vec4_aligned(addr: u64, code: i32) -> bool {
    addr.is_multiple_of(if code == 0 { 16 } else { 8 })
}

/// Panics unless a buffer of `len` elements holds the `need` an op will touch: the host-side
/// bound check behind every launch's SAFETY comment.
fn need(len: usize, need: usize, what: &str) {
    assert!(len >= need, "{what}: buffer of {len} elements, the op needs {need}");
}

fn device_err(what: &str) -> impl Fn(DriverError) -> Error + '_ {
    move |e| Error::Device(format!("CUDA: {what}: {e}"))
}

/// Panics with the op's name on a CUDA error inside an op (the trait has no error path).
fn check<T, E: std::fmt::Debug>(r: std::result::Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("CUDA error in {what}: {e:?}"))
}

/// The code of a rounding precision as the kernels take it (`round_as` in
/// kernels/common.cuh): 0 fp32 (none), 1 bf16, 2 fp16.
fn round_code(p: Precision) -> i32 {
    match p {
        Precision::Fp32 => 0,
        Precision::Bf16 => 1,
        Precision::Fp16 => 2,
    }
}

/// A size as the i32 the kernels take.
fn int(x: usize, what: &str) -> i32 {
    i32::try_from(x).unwrap_or_else(|_| panic!("{what} = {x} exceeds the kernels' i32 range"))
}

/// Blocks of `block` threads covering `n` threads, 1-D.
fn grid_1d(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u64).div_ceil(block as u64).max(1) as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The Philox key of a dropout site as the kernels take it (kernels/common.cuh DropoutArgs).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct DropoutArgs {
    seed: u64,
    stream: u64,
    p: f32,
    scale: f32,
}
// SAFETY: #[repr(C)] plain data with the field order and types of the CUDA struct.
unsafe impl DeviceRepr for DropoutArgs {}

impl From<Dropout> for DropoutArgs {
    fn from(d: Dropout) -> Self {
        DropoutArgs {
            seed: d.seed,
            stream: d.stream,
            p: d.p,
            scale: if d.is_on() { d.scale() } else { 1.0 },
        }
    }
}

impl Cuda {
    /// Opens device `ordinal`: a context, one stream, a cuBLAS handle, every kernel module
    /// (the cubin for the device's architecture, else PTX). A clear [`Error::Device`] when
    /// there is no driver, no such device, or no kernel image the device can run.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        preflight().map_err(Error::Device)?;
        let count = CudaContext::device_count().map_err(device_err("listing devices"))?;
        if ordinal as i64 >= count as i64 {
            return Err(Error::Device(format!(
                "CUDA device {ordinal} requested, the driver reports {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(device_err("creating a context"))?;
        // SAFETY: event tracking only synchronises buffers shared between streams; this
        // backend uses one stream, and switches tracking off before allocating anything.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(device_err("creating a stream"))?;
        let memory_pools = ctx.has_async_alloc();
        let (allocator, allocator_note) = choose_allocator(&stream, memory_pools)?;
        // and page-locked host memory, which the upload and download staging take when the
        // driver gives it: without, the same copies go through pageable memory (below)
        // SAFETY: a block allocated and freed here, never read or written
        let pageable_why = match unsafe { cudarc::driver::result::malloc_host(4096, 0) } {
            Ok(block) => {
                // SAFETY: as above
                unsafe { cudarc::driver::result::free_host(block) }
                    .map_err(device_err("freeing page-locked host memory"))?;
                None
            }
            Err(e) => Some(format!("cuMemHostAlloc failed ({e})")),
        };
        let blas = CudaBlas::new(stream.clone()).map_err(|e| Error::Device(format!("cuBLAS: {e:?}")))?;
        // SAFETY: a valid handle; the default math mode never uses TF32 for sgemm.
        unsafe {
            cudarc::cublas::sys::cublasSetMathMode(
                *blas.handle(),
                cudarc::cublas::sys::cublasMath_t::CUBLAS_DEFAULT_MATH,
            )
            .result()
            .map_err(|e| Error::Device(format!("cuBLAS math mode: {e:?}")))?;
        }
        let (major, minor) = ctx.compute_capability().map_err(device_err("compute capability"))?;
        let (major, minor) = (major as u32, minor as u32);
        let name = ctx.name().map_err(device_err("device name"))?;
        let memory_bytes = ctx.total_mem().map_err(device_err("device memory"))?;

        let mut funcs = HashMap::new();
        let mut targets = Vec::new();
        for module in images::modules() {
            let img = images::select(module, major, minor).ok_or_else(|| {
                Error::Device(format!(
                    "no image of kernels/{module}.cu runs on {name} (sm_{major}{minor}); \
                     rebuild with DEEPCUT_CUDA_ARCHS including sm_{major}{minor}"
                ))
            })?;
            let ptx = if img.cubin {
                cudarc::nvrtc::Ptx::from_binary(img.bytes.to_vec())
            } else {
                let text = img.bytes.strip_suffix(&[0]).unwrap_or(img.bytes);
                cudarc::nvrtc::Ptx::from_src(String::from_utf8_lossy(text).into_owned())
            };
            let m = ctx.load_module(ptx).map_err(|e| {
                Error::Device(format!(
                    "loading kernels/{module}.cu ({}) on {name}: {e} (PTX needs a driver at least as new as \
                     NVRTC {})",
                    img.target,
                    images::NVRTC_VERSION
                ))
            })?;
            let entries = images::ENTRY_POINTS
                .iter()
                .find(|(m, _)| *m == module)
                .map_or(&[][..], |(_, e)| e);
            for &entry in entries {
                let f = m
                    .load_function(entry)
                    .map_err(|e| Error::Device(format!("kernel {entry} in kernels/{module}.cu: {e}")))?;
                funcs.insert(entry, f);
            }
            if !targets.contains(&img.target) {
                targets.push(img.target);
            }
        }
        // Kernels that take more than the default 48 KiB of dynamic shared memory opt in to
        // the device's maximum, less their static shared memory.
        let optin = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(device_err("shared memory opt-in limit"))?
            .max(0) as usize;
        let mut dyn_smem = HashMap::new();
        for (&name, f) in funcs
            .iter()
            .filter(|(n, _)| infonce::OPTS_IN_TO_SMEM.iter().any(|p| n.starts_with(p)))
        {
            use cudarc::driver::sys::CUfunction_attribute::*;
            let fixed = f
                .get_attribute(CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                .map_err(device_err(name))?
                .max(0) as usize;
            let room = optin.saturating_sub(fixed);
            f.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, room as i32)
                .map_err(device_err(name))?;
            dyn_smem.insert(name, room);
        }
        let nvtx = nvtx::Nvtx::get();
        Ok(Cuda {
            uploads: Mutex::new(uploads::Uploads::new(
                stream.clone(),
                uploads::HALF_BYTES,
                pageable_why.is_none(),
            )),
            stream,
            blas,
            lt: Mutex::new(None),
            use_lt: true,
            funcs,
            dyn_smem,
            use_smem16: true,
            smem16_buffers: 2,
            scratch: Mutex::new(Scratch::default()),
            info: DeviceInfo {
                ordinal,
                name,
                major,
                minor,
                memory_bytes,
                image_target: targets.join("+"),
                memory_pools,
                allocator,
                allocator_note,
                pageable_why,
            },
            nvtx,
            launches: AtomicU64::new(0),
            gemms: AtomicU64::new(0),
            timing: AtomicBool::new(false),
            op_timer: Arc::default(),
        })
    }

    /// `n` zeroed elements from this device's allocator.
    pub(crate) fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self, n: usize,
    ) -> std::result::Result<DevMem<T>, DriverError> {
        memory::zeros(&self.stream, n, self.info.allocator)
    }

    /// A device copy of `host` from this device's allocator.
    pub(crate) fn copy_of<T: DeviceRepr>(&self, host: &[T]) -> std::result::Result<DevMem<T>, DriverError> {
        memory::from_host(&self.stream, host, self.info.allocator)
    }

    /// `n` elements from this device's allocator, contents undefined.
    ///
    /// # Safety
    /// As [`memory::uninit`]: written before read.
    pub(crate) unsafe fn uninit<T: DeviceRepr>(&self, n: usize) -> std::result::Result<DevMem<T>, DriverError> {
        memory::uninit(&self.stream, n, self.info.allocator)
    }

    /// Makes the device's context current on this thread (the driver's is per thread),
    /// before calls that do not do so themselves: raw driver calls, cuBLAS. cudarc's safe
    /// calls bind it, but such a call may be the first a thread makes on this backend.
    fn bind(&self, what: &str) {
        check(self.stream.context().bind_to_thread(), what);
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// How `gemm_bias` (`bias`) or `gemm` has run so far: None before the first GEMM or
    /// without cuBLASLt (then it is cuBLAS, and `add_bias` for the bias), else (shapes
    /// cuBLASLt ran, with the bias epilogue for `gemm_bias`; shapes it had no algorithm for
    /// and that fell back to cuBLAS).
    pub fn cublaslt_plans(&self, bias: bool) -> Option<(usize, usize)> {
        match &*self.lt.lock().unwrap() {
            Some(Some(lt)) => Some(lt.plan_counts(bias)),
            _ => None,
        }
    }

    /// This backend with every GEMM on cuBLAS (`gemm_bias` a cuBLAS GEMM followed by the
    /// `add_bias` kernel), never cuBLASLt: the fallback path, for tests and for ruling
    /// cuBLASLt out.
    pub fn without_cublaslt(mut self) -> Self {
        self.use_lt = false;
        self
    }

    /// Which InfoNCE kernels run at embedding width c in precision `inputs`, in words.
    pub fn infonce_path(&self, inputs: Precision, c: usize) -> &'static str {
        infonce::path(self, inputs, c)
    }

    /// src[..n] on the host (tests; the trait reads back floats only).
    pub fn download_i32(&self, src: &CudaSlice<i32>, n: usize) -> Vec<i32> {
        need(src.len(), n, "download_i32");
        let v = check(self.stream.clone_dtoh(&src.slice(..n)), "download_i32");
        self.synchronize();
        v
    }

    /// This backend with `bytes` per half of the page-locked upload staging (16 MiB by
    /// default): small values make tests go through the switch between halves and the
    /// pageable path for large copies.
    pub fn with_upload_staging(mut self, bytes: usize) -> Self {
        let page_locked = self.info.pageable_why.is_none();
        self.uploads = Mutex::new(uploads::Uploads::new(self.stream.clone(), bytes, page_locked));
        self
    }

    /// This backend with InfoNCE's 16-bit modes on the streaming SIMT kernels (tensor-core
    /// similarities only), never the shared-memory kernels: the path for hidden sizes too
    /// wide for shared memory, for tests.
    pub fn without_infonce_smem16(mut self) -> Self {
        self.use_smem16 = false;
        self
    }

    /// This backend with InfoNCE's 16-bit shared-memory kernels on one column-tile buffer
    /// (the path where two do not fit in shared memory), for tests.
    pub fn with_infonce_single_buffer(mut self) -> Self {
        self.smem16_buffers = 1;
        self
    }

    /// Waits for every enqueued op (for timing and tests; ops do not need it).
    pub fn synchronize(&self) {
        check(self.stream.synchronize(), "synchronize");
    }

    /// Device memory in use on this GPU (total - free, all processes), for the bench's
    /// report; None if the driver does not answer.
    pub fn memory_used(&self) -> Option<u64> {
        let (free, total) = self.stream.context().mem_get_info().ok()?;
        Some(total.saturating_sub(free) as u64)
    }

    /// The NVTX library this backend's ranges go through (nvtx.rs), if any.
    pub fn nvtx_library(&self) -> Option<&'static str> {
        self.nvtx.map(|n| n.from.as_str())
    }

    /// An op's range named `name`, closed when the returned guard drops: an NVTX range when
    /// this machine has the library (nvtx.rs; `nsys profile` shows them), and timing events
    /// while `time_ops` is on (optimes.rs).
    pub fn range(&self, name: &str) -> OpRange {
        OpRange {
            _nvtx: self.nvtx.map(|n| n.range(name)),
            _timed: self.timed(name, false),
        }
    }

    fn timed(&self, name: &str, phase: bool) -> Option<optimes::Timed> {
        if !self.timing.load(Ordering::Relaxed) {
            return None;
        }
        optimes::Timed::open(&self.op_timer, self.stream.context(), &self.stream, name, phase)
    }

    /// Starts (true) or stops timing every op and phase range with CUDA events (optimes.rs;
    /// `deepcut-fast bench --op-times`). Ranges open when it stops are still timed.
    pub fn time_ops(&self, on: bool) {
        self.timing.store(on, Ordering::Relaxed);
    }

    /// The device time of each op and phase range since the last call, summed by name,
    /// longest first; waits for the work it covers. Err: why the events failed.
    pub fn op_times(&self) -> std::result::Result<Vec<optimes::OpTime>, String> {
        self.op_timer.lock().unwrap().collect()
    }

    /// dst[..src.len()] = src, enqueued from page-locked memory (uploads.rs) so the host
    /// never waits on it; a copy too large for the staging goes from pageable memory.
    fn upload_to<T: DeviceRepr + bytemuck::Pod>(&self, dst: &mut CudaSlice<T>, src: &[T], what: &str) {
        use cudarc::driver::DevicePtrMut;
        let addr = dst.device_ptr_mut(&self.stream).0;
        // SAFETY: dst holds at least src.len() elements (the callers' `need`), and frees
        // are ordered on this stream after the copy.
        let staged = check(
            unsafe { self.uploads.lock().unwrap().copy(addr, bytemuck::cast_slice(src)) },
            what,
        );
        if !staged {
            check(self.stream.memcpy_htod(src, &mut dst.slice_mut(..src.len())), what);
        }
    }

    /// (kernel launches, GEMM calls) enqueued on this device so far: `bench` reports them
    /// per step, so a GPU run shows what the host pays per call (`host_enqueue_s` over
    /// them) and whether launch overhead is worth CUDA graphs.
    pub fn enqueued_calls(&self) -> (u64, u64) {
        (
            self.launches.load(Ordering::Relaxed),
            self.gemms.load(Ordering::Relaxed),
        )
    }
    /// Counts one GEMM call (cuBLASLt or cuBLAS), from gemm.rs and blaslt.rs.
    pub(crate) fn count_gemm(&self) {
        self.gemms.fetch_add(1, Ordering::Relaxed);
    }
    fn func(&self, name: &str) -> &CudaFunction {
        // every launch looks its kernel up here once
        self.launches.fetch_add(1, Ordering::Relaxed);
        self.funcs
            .get(name)
            .unwrap_or_else(|| panic!("CUDA kernel {name} is not in the loaded modules (kernels/*.cu)"))
    }
}

/// Page-locked host memory a `download_start` copies into, and the event recorded after
/// that copy, which `download_wait` waits for (once: the one wait per copy back). Not
/// cudarc's `PinnedHostSlice`: it records its event after a copy only while cudarc tracks
/// events, which this backend switches off (`Cuda::new`), and a wait for an event never
/// recorded returns at once, before the copy has landed; its readers wait for that event
/// again besides. Where the driver gives no page-locked memory
/// ([`DeviceInfo::pageable_why`]) the block is pageable: the same copy into it is then
/// synchronous, so the one wait is already over.
pub struct Staging {
    ptr: *mut f32,
    len: usize,
    landed: cudarc::driver::CudaEvent,
    page_locked: bool,
}

// SAFETY: a host block owned by this value alone; it is read only through
// `download_wait` (after the copy into it landed) and written only by the copies
// `download_start` enqueues, which take it `&mut`.
unsafe impl Send for Staging {}
unsafe impl Sync for Staging {}

impl Drop for Staging {
    fn drop(&mut self) {
        // a copy may still be landing in it
        let _ = self.landed.synchronize();
        if self.page_locked {
            // SAFETY: allocated by malloc_host in `Cuda::staging`, freed once, after its
            // last copy
            let _ = unsafe { cudarc::driver::result::free_host(self.ptr as _) };
        } else {
            // SAFETY: a boxed slice of `len` floats leaked in `Cuda::staging`, taken back once
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
        }
    }
}

impl Backend for Cuda {
    type Buf = CudaBuf;
    type IBuf = DevMem<i32>;
    type Staging = Staging;

    fn profile_range(&self, name: std::fmt::Arguments<'_>) -> RangeGuard {
        if self.nvtx.is_none() && !self.timing.load(Ordering::Relaxed) {
            return RangeGuard::none();
        }
        let name = name.to_string();
        RangeGuard::new(Box::new(OpRange {
            _nvtx: self.nvtx.map(|n| n.range(&name)),
            _timed: self.timed(&name, true),
        }))
    }

    fn name(&self) -> String {
        let i = &self.info;
        format!(
            "cuda:{} ({}, sm_{}{}, {} MiB, kernels {} by NVRTC {}{}{})",
            i.ordinal,
            i.name,
            i.major,
            i.minor,
            i.memory_bytes >> 20,
            i.image_target,
            images::NVRTC_VERSION,
            // said only when it is not the device's own choice
            i.allocator_note
                .as_ref()
                .map_or(String::new(), |why| format!(", memory by {}: {why}", i.allocator.api())),
            i.pageable_why
                .as_ref()
                .map_or(String::new(), |why| format!(", pageable host copies: {why}"))
        )
    }
    fn alloc(&self, n: usize) -> CudaBuf {
        CudaBuf::F32(check(self.zeros::<f32>(n.max(1)), "alloc"))
    }
    /// 16-bit storage in bf16 / fp16 (zero bits are +0.0 in both).
    fn alloc_rounded(&self, n: usize, precision: Precision) -> CudaBuf {
        match precision {
            Precision::Fp32 => self.alloc(n),
            p => CudaBuf::Half(check(self.zeros::<u16>(n.max(1)), "alloc_rounded"), p),
        }
    }
    fn alloc_i32(&self, n: usize) -> DevMem<i32> {
        check(self.zeros::<i32>(n.max(1)), "alloc_i32")
    }
    fn upload(&self, dst: &mut CudaBuf, src: &[f32]) {
        if src.is_empty() {
            return;
        }
        need(dst.len(), src.len(), "upload");
        match dst {
            CudaBuf::F32(d) => self.upload_to(d, src, "upload"),
            // staged (page-locked or the driver's pageable staging) before the call
            // returns, so `bits` may drop
            CudaBuf::Half(d, p) => self.upload_to(d, &quantize::to_bits(src, *p), "upload"),
        }
    }
    fn upload_i32(&self, dst: &mut DevMem<i32>, src: &[i32]) {
        if !src.is_empty() {
            need(dst.len(), src.len(), "upload_i32");
            self.upload_to(dst, src, "upload_i32");
        }
    }
    fn download(&self, src: &CudaBuf, n: usize) -> Vec<f32> {
        if n == 0 {
            return Vec::new();
        }
        need(src.len(), n, "download");
        match src {
            CudaBuf::F32(s) => {
                let v = check(self.stream.clone_dtoh(&s.slice(..n)), "download");
                self.synchronize();
                v
            }
            CudaBuf::Half(s, p) => {
                let bits = check(self.stream.clone_dtoh(&s.slice(..n)), "download");
                self.synchronize();
                quantize::from_bits(&bits, *p)
            }
        }
    }
    fn staging(&self, n: usize) -> Self::Staging {
        // flags 0, not cudarc's default write-combined: the host reads this memory, and
        // reads from write-combined memory are uncached
        let len = n.max(1);
        self.bind("staging");
        let page_locked = self.info.pageable_why.is_none();
        let ptr = if page_locked {
            // SAFETY: the memory starts uninitialised; only download_wait reads it, after a
            // download_start has filled the first n it returns.
            check(
                unsafe { cudarc::driver::result::malloc_host(len * 4, 0) },
                "staging (page-locked host memory)",
            ) as *mut f32
        } else {
            Box::into_raw(vec![0f32; len].into_boxed_slice()) as *mut f32
        };
        let landed = check(self.stream.context().new_event(None), "staging event");
        Staging {
            ptr,
            len,
            landed,
            page_locked,
        }
    }
    fn download_start(&self, dst: &mut Self::Staging, src: &CudaBuf, n: usize) {
        if n == 0 {
            return;
        }
        let s = src.f32("download_start");
        need(s.len(), n, "download_start src");
        need(dst.len, n, "download_start staging");
        use cudarc::driver::DevicePtr;
        let (from, _) = s.device_ptr(&self.stream);
        // for the raw copy
        self.bind("download_start");
        // SAFETY: dst holds len >= n floats, owned and taken `&mut`, so nothing reads it
        // until download_wait has waited for this copy; the source holds n (`need`).
        check(
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(
                    std::slice::from_raw_parts_mut(dst.ptr, n),
                    from,
                    self.stream.cu_stream(),
                )
            },
            "download_start",
        );
        // download_wait waits for this event only, so the work enqueued after it runs on
        check(dst.landed.record(&self.stream), "download_start event");
    }
    fn download_wait<'a>(&self, src: &'a Self::Staging, n: usize) -> &'a [f32] {
        need(src.len, n, "download_wait");
        check(src.landed.synchronize(), "download_wait");
        // SAFETY: the copy into the first n floats has landed (the wait above); the slice
        // borrows src, so no download_start writes it while it lives.
        unsafe { std::slice::from_raw_parts(src.ptr, n) }
    }
    fn zero(&self, buf: &mut CudaBuf, n: usize) {
        if n == 0 {
            return;
        }
        need(buf.len(), n, "zero");
        match buf {
            CudaBuf::F32(b) => check(self.stream.memset_zeros(&mut b.slice_mut(..n)), "zero"),
            CudaBuf::Half(b, _) => check(self.stream.memset_zeros(&mut b.slice_mut(..n)), "zero"),
        }
    }
    fn zero_all(&self, xs: &mut [(&mut CudaBuf, usize)]) {
        // gradients, always fp32 (SPEC section 7)
        let mut xs: Vec<(&mut CudaSlice<f32>, usize)> =
            xs.iter_mut().map(|(x, n)| (x.f32_mut("zero_all"), *n)).collect();
        adamw::zero_all(self, &mut xs);
    }
    fn add_inplace(&self, dst: &mut CudaBuf, src: &CudaBuf, n: usize) {
        gemm::add_inplace(self, dst.f32_mut("add_inplace dst"), src.f32("add_inplace src"), n)
    }
    fn copy(&self, dst: &mut CudaBuf, src: &CudaBuf, n: usize) {
        quantize::copy(self, dst, src, n)
    }
    fn quantize(&self, x: &mut CudaBuf, n: usize, precision: Precision) {
        quantize::quantize(self, x, n, precision)
    }
    fn gemm(
        &self, c: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf, m: usize, n: usize, k: usize, ta: bool, tb: bool, alpha: f32,
        beta: f32, inputs: Precision,
    ) {
        gemm::gemm(self, c, a, b, m, n, k, ta, tb, alpha, beta, inputs)
    }
    fn add_bias(&self, out: &mut CudaBuf, bias: &CudaBuf, rows: usize, cols: usize) {
        gemm::add_bias(self, out, bias.f32("add_bias bias"), rows, cols)
    }
    fn gemm_bias(
        &self, c: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf, bias: &CudaBuf, m: usize, n: usize, k: usize, ta: bool,
        tb: bool, inputs: Precision,
    ) {
        gemm::gemm_bias(self, c, a, b, bias.f32("gemm_bias bias"), m, n, k, ta, tb, inputs)
    }
    fn bias_grad(&self, dbias: &mut CudaBuf, dout: &CudaBuf, rows: usize, cols: usize) {
        gemm::bias_grad(self, dbias.f32_mut("bias_grad dbias"), dout, rows, cols)
    }
    fn bias_grads(&self, pairs: &mut [(&mut CudaBuf, &CudaBuf)], rows: usize, cols: usize) {
        let _r = self.range("bias_grad");
        let mut pairs: Vec<(&mut CudaSlice<f32>, &CudaBuf)> = pairs
            .iter_mut()
            .map(|(d, s)| (d.f32_mut("bias_grads dbias"), &**s))
            .collect();
        gemm::col_sums_many(self, &mut pairs, rows, cols)
    }
    fn embedding_fwd(
        &self, out: &mut CudaBuf, ids: &DevMem<i32>, pos: &DevMem<i32>, types: &DevMem<i32>, wte: &CudaBuf,
        wpe: &CudaBuf, wtt: &CudaBuf, n: usize, c: usize,
    ) {
        let w = "embedding_fwd";
        embedding::embedding_fwd(
            self,
            out.f32_mut(w),
            ids,
            pos,
            types,
            wte.f32(w),
            wpe.f32(w),
            wtt.f32(w),
            n,
            c,
        )
    }
    fn embedding_bwd(
        &self, dwte: &mut CudaBuf, dwpe: &mut CudaBuf, dwtt: &mut CudaBuf, dout: &CudaBuf, ids: &DevMem<i32>,
        pos: &DevMem<i32>, types: &DevMem<i32>, order: &DevMem<i32>, n: usize, c: usize,
    ) {
        let w = "embedding_bwd";
        embedding::embedding_bwd(
            self,
            dwte.f32_mut(w),
            dwpe.f32_mut(w),
            dwtt.f32_mut(w),
            dout.f32(w),
            ids,
            pos,
            types,
            order,
            n,
            c,
        )
    }
    fn dropout_layernorm_fwd(
        &self, out: &mut CudaBuf, mean: &mut CudaBuf, rstd: &mut CudaBuf, inp: &CudaBuf, dropout: Dropout,
        residual: Option<&CudaBuf>, weight: &CudaBuf, bias: &CudaBuf, n: usize, c: usize, eps: f32,
        rounding: Precision,
    ) {
        let w = "layernorm_fwd";
        layernorm::layernorm_fwd(
            self,
            out,
            mean.f32_mut(w),
            rstd.f32_mut(w),
            inp,
            dropout,
            residual,
            weight.f32(w),
            bias.f32(w),
            n,
            c,
            eps,
            rounding,
        )
    }
    fn dropout_layernorm_bwd(
        &self, dsum: &mut CudaBuf, dinp: Option<&mut CudaBuf>, dinp_bias: Option<&mut CudaBuf>, dweight: &mut CudaBuf,
        dbias: &mut CudaBuf, dout: &CudaBuf, inp: &CudaBuf, dropout: Dropout, residual: Option<&CudaBuf>,
        weight: &CudaBuf, mean: &CudaBuf, rstd: &CudaBuf, n: usize, c: usize, rounding: Precision,
    ) {
        let w = "layernorm_bwd";
        layernorm::layernorm_bwd(
            self,
            dsum.f32_mut(w),
            dinp,
            dinp_bias.map(|b| b.f32_mut(w)),
            dweight.f32_mut(w),
            dbias.f32_mut(w),
            dout.f32(w),
            inp,
            dropout,
            residual,
            weight.f32(w),
            mean.f32(w),
            rstd.f32(w),
            n,
            c,
            rounding,
        )
    }
    fn bias_gelu_fwd(&self, out: &mut CudaBuf, inp: &CudaBuf, bias: &CudaBuf, n: usize, c: usize, rounding: Precision) {
        gelu::bias_gelu_fwd(self, out, inp, bias.f32("bias_gelu_fwd bias"), n, c, rounding)
    }
    fn bias_gelu_bwd(
        &self, dinp: &mut CudaBuf, dbias: &mut CudaBuf, dout: &CudaBuf, inp: &CudaBuf, bias: &CudaBuf, n: usize,
        c: usize, rounding: Precision,
    ) {
        let w = "bias_gelu_bwd";
        gelu::bias_gelu_bwd(self, dinp, dbias.f32_mut(w), dout, inp, bias.f32(w), n, c, rounding)
    }
    fn attention_fwd(
        &self, out: &mut CudaBuf, lse: &mut CudaBuf, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf, seqs: &DevMem<i32>,
        b: usize, n: usize, t: usize, h: usize, d: usize, dropout: Dropout, inputs: Precision,
    ) {
        let w = "attention_fwd";
        let shape = attention::Packed { b, n, t, h, d };
        attention::attention_fwd(self, out, lse.f32_mut(w), q, k, v, seqs, shape, dropout, inputs)
    }
    fn attention_bwd(
        &self, dq: &mut CudaBuf, dk: &mut CudaBuf, dv: &mut CudaBuf, dout: &CudaBuf, q: &CudaBuf, k: &CudaBuf,
        v: &CudaBuf, out: &CudaBuf, lse: &CudaBuf, seqs: &DevMem<i32>, b: usize, n: usize, t: usize, h: usize,
        d: usize, dropout: Dropout, inputs: Precision,
    ) {
        let w = "attention_bwd";
        let shape = attention::Packed { b, n, t, h, d };
        attention::attention_bwd(
            self,
            dq,
            dk,
            dv,
            dout,
            q,
            k,
            v,
            out,
            lse.f32(w),
            seqs,
            shape,
            dropout,
            inputs,
        )
    }
    fn dropout_fwd(&self, out: &mut CudaBuf, inp: &CudaBuf, n: usize, d: Dropout, rounding: Precision) {
        dropout::dropout_fwd(self, out, inp, n, d, rounding)
    }
    fn dropout_bwd(&self, dinp: &mut CudaBuf, dout: &CudaBuf, n: usize, d: Dropout, rounding: Precision) {
        dropout::dropout_bwd(self, dinp, dout, n, d, rounding)
    }
    fn dropout_duplicate(
        &self, out: &mut CudaBuf, inp: &CudaBuf, n_dup: usize, n: usize, d: Dropout, rounding: Precision,
    ) {
        dropout::dropout_duplicate(self, out, inp, n_dup, n, d, rounding)
    }
    fn dropout_duplicate_bwd(&self, dinp: &mut CudaBuf, dout: &CudaBuf, n_dup: usize, n: usize, d: Dropout) {
        dropout::dropout_duplicate_bwd(self, dinp, dout, n_dup, n, d)
    }
    fn softmax_ce_fwd(&self, losses: &mut CudaBuf, logits: &CudaBuf, labels: &DevMem<i32>, n: usize, v: usize) {
        let w = "softmax_ce_fwd";
        softmax_ce::softmax_ce_fwd(self, losses.f32_mut(w), logits.f32(w), labels, n, v)
    }
    fn softmax_ce_bwd(
        &self, dlogits: &mut CudaBuf, logits: &CudaBuf, labels: &DevMem<i32>, n: usize, v: usize, scale: f32,
    ) {
        let w = "softmax_ce_bwd";
        softmax_ce::softmax_ce_bwd(self, dlogits, logits.f32(w), labels, n, v, scale)
    }
    fn gather_rows(&self, out: &mut CudaBuf, src: &CudaBuf, idx: &DevMem<i32>, m: usize, c: usize) {
        rows::gather_rows(self, out, src, idx, m, c)
    }
    fn scatter_add_rows(&self, dst: &mut CudaBuf, src: &CudaBuf, idx: &DevMem<i32>, m: usize, c: usize) {
        let w = "scatter_add_rows";
        rows::scatter_add_rows(self, dst.f32_mut(w), src.f32(w), idx, m, c)
    }
    fn l2norm_fwd(&self, out: &mut CudaBuf, norm: &mut CudaBuf, inp: &CudaBuf, m: usize, c: usize) {
        let w = "l2norm_fwd";
        l2norm::l2norm_fwd(self, out.f32_mut(w), norm.f32_mut(w), inp.f32(w), m, c)
    }
    fn l2norm_bwd(&self, dinp: &mut CudaBuf, dout: &CudaBuf, out: &CudaBuf, norm: &CudaBuf, m: usize, c: usize) {
        let w = "l2norm_bwd";
        l2norm::l2norm_bwd(self, dinp.f32_mut(w), dout.f32(w), out.f32(w), norm.f32(w), m, c)
    }
    fn infonce_fwd(
        &self, loss: &mut CudaBuf, lse: &mut CudaBuf, z: &CudaBuf, labels: &DevMem<i32>, anchor: &DevMem<i32>,
        partner: &DevMem<i32>, m: usize, c: usize, opts: InfoNceOptions, inputs: Precision,
    ) {
        let w = "infonce_fwd";
        infonce::infonce_fwd(
            self,
            loss.f32_mut(w),
            lse.f32_mut(w),
            z.f32(w),
            labels,
            anchor,
            partner,
            m,
            c,
            opts,
            inputs,
        )
    }
    fn infonce_bwd(
        &self, dz: &mut CudaBuf, z: &CudaBuf, lse: &CudaBuf, labels: &DevMem<i32>, anchor: &DevMem<i32>,
        partner: &DevMem<i32>, m: usize, c: usize, opts: InfoNceOptions, scale: f32, inputs: Precision,
    ) {
        let w = "infonce_bwd";
        infonce::infonce_bwd(
            self,
            dz.f32_mut(w),
            z.f32(w),
            lse.f32(w),
            labels,
            anchor,
            partner,
            m,
            c,
            opts,
            scale,
            inputs,
        )
    }
    fn adamw(
        &self, param: &mut CudaBuf, grad: &CudaBuf, m: &mut CudaBuf, v: &mut CudaBuf, n: usize, hp: AdamW, step: u64,
        grad_scale: f32,
    ) {
        let w = "adamw";
        adamw::adamw(
            self,
            param.f32_mut(w),
            grad.f32(w),
            m.f32_mut(w),
            v.f32_mut(w),
            n,
            hp.lr,
            hp.beta1,
            hp.beta2,
            hp.eps,
            hp.weight_decay,
            step,
            grad_scale,
        )
    }
    fn adamw_all(
        &self, slots: &mut [ParamSlot<'_, CudaBuf>], hp: AdamW, step: u64, grad_scale: f32, low_precision: Precision,
    ) {
        adamw::adamw_all(self, slots, hp, step, grad_scale, low_precision)
    }
    fn sum_squares(&self, x: &CudaBuf, n: usize) -> f64 {
        adamw::sum_squares(self, x.f32("sum_squares"), n)
    }
    fn sum_squares_all(&self, xs: &[(&CudaBuf, usize)]) -> f64 {
        let xs: Vec<(&CudaSlice<f32>, usize)> = xs.iter().map(|&(x, n)| (x.f32("sum_squares_all"), n)).collect();
        adamw::sum_squares_all(self, &xs)
    }
    fn clip_adamw_all(
        &self, slots: &mut [ParamSlot<'_, CudaBuf>], hp: AdamW, step: u64, clip: f32, loss_scale: f32,
        overflows_seen: Option<u32>, low_precision: Precision, stats: &mut CudaBuf,
    ) {
        adamw::clip_adamw_all(
            self,
            slots,
            hp,
            step,
            clip,
            loss_scale,
            overflows_seen,
            low_precision,
            stats,
        )
    }
}
