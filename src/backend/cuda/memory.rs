//! Device memory, and which driver allocator provides it.
//!
//! cudarc picks its allocator from one device attribute: with memory pools listed
//! (data-centre GPUs) it allocates with cuMemAllocAsync and frees with cuMemFreeAsync,
//! otherwise cuMemAlloc / cuMemFree; it offers no way to choose. A GPU reached through a
//! sandbox's driver proxy may list pools yet refuse stream-ordered allocation (the lent
//! H200s may run under gVisor, where frameworks are seen working but all of them allocate with
//! plain cuMemAlloc). So the backend allocates through [`DevMem`]: cudarc's own allocation
//! when the stream-ordered allocator works ([`Allocator::StreamOrdered`]), else a block
//! from cuMemAlloc that cudarc never frees ([`Allocator::Plain`]). `Cuda::new` tries the
//! first and falls back to the second, saying why (`DeviceInfo::allocator_note`);
//! `DEEPCUT_CUDA_ALLOCATOR=plain|stream-ordered` forces one.
use cudarc::driver::{result, CudaSlice, CudaStream, DeviceRepr, DriverError, ValidAsZeroBits};
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

/// The driver calls device memory comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocator {
    /// cudarc's choice on a device with memory pools: cuMemAllocAsync / cuMemFreeAsync,
    /// in stream order, no host wait on free.
    StreamOrdered,
    /// cuMemAlloc / cuMemFree, a stream synchronisation before each free (what cudarc does
    /// on a device without pools, and here also on one whose pools refuse).
    Plain,
}

impl Allocator {
    /// The allocation call, for messages and the `devices` report.
    pub fn api(self) -> &'static str {
        match self {
            Allocator::StreamOrdered => "cuMemAllocAsync",
            Allocator::Plain => "cuMemAlloc",
        }
    }

    /// Its value of `DEEPCUT_CUDA_ALLOCATOR`.
    pub fn env_value(self) -> &'static str {
        match self {
            Allocator::StreamOrdered => "stream-ordered",
            Allocator::Plain => "plain",
        }
    }

    /// `DEEPCUT_CUDA_ALLOCATOR`: None (unset or `auto`: stream-ordered when the device has
    /// memory pools and the allocation works), or the one asked for.
    pub fn from_env() -> std::result::Result<Option<Allocator>, String> {
        match std::env::var("DEEPCUT_CUDA_ALLOCATOR").as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(None),
            Ok("plain") => Ok(Some(Allocator::Plain)),
            Ok("stream-ordered") => Ok(Some(Allocator::StreamOrdered)),
            Ok(other) => Err(format!(
                "DEEPCUT_CUDA_ALLOCATOR={other}: expected auto, plain or stream-ordered"
            )),
        }
    }
}

/// A device buffer of `len` elements of `T`, a [`CudaSlice`] to every kernel and copy, freed
/// by the allocator that made it.
pub struct DevMem<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
    how: Allocator,
}

impl<T> Deref for DevMem<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> DerefMut for DevMem<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T> Drop for DevMem<T> {
    fn drop(&mut self) {
        // SAFETY: taken once, here; the field is never used again
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        match self.how {
            // cudarc frees it with the call that matches its allocation
            Allocator::StreamOrdered => drop(slice),
            Allocator::Plain => {
                let stream = slice.stream().clone();
                let ptr = slice.leak();
                // cuMemFree does not wait for the stream: work enqueued before may still
                // read or write the block (cudarc synchronises here too)
                let ctx = stream.context();
                ctx.record_err(ctx.bind_to_thread());
                ctx.record_err(stream.synchronize());
                // SAFETY: allocated by cuMemAlloc in `uninit`, leaked from cudarc above,
                // freed once, after the stream's last use of it
                ctx.record_err(unsafe { result::free_sync(ptr) });
            }
        }
    }
}

/// `n` elements of `T` from `how`, contents undefined.
///
/// # Safety
/// The memory is uninitialised: the caller writes it before any read.
pub unsafe fn uninit<T: DeviceRepr>(
    stream: &Arc<CudaStream>, n: usize, how: Allocator,
) -> Result<DevMem<T>, DriverError> {
    let slice = match how {
        Allocator::StreamOrdered => stream.alloc::<T>(n)?,
        Allocator::Plain => {
            stream.context().bind_to_thread()?;
            // (cuMemAlloc refuses 0 bytes; cudarc's stream-ordered path takes them)
            let ptr = result::malloc_sync((n * std::mem::size_of::<T>()).max(1))?;
            // cudarc takes the pointer for kernels and copies, never frees it (DevMem's drop
            // leaks it back first)
            stream.upgrade_device_ptr::<T>(ptr, n)
        }
    };
    Ok(DevMem {
        slice: ManuallyDrop::new(slice),
        how,
    })
}

/// `n` zeroed elements of `T` from `how` (the memset is enqueued on `stream`).
pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>, n: usize, how: Allocator,
) -> Result<DevMem<T>, DriverError> {
    // SAFETY: zeroed before anything can read it (the memset is first in stream order)
    let mut m = unsafe { uninit::<T>(stream, n, how) }?;
    stream.memset_zeros(&mut *m)?;
    Ok(m)
}

/// A device copy of `host` from `how` (the copy is enqueued on `stream`).
pub fn from_host<T: DeviceRepr>(
    stream: &Arc<CudaStream>, host: &[T], how: Allocator,
) -> Result<DevMem<T>, DriverError> {
    // SAFETY: the copy below writes every element before anything can read it
    let mut m = unsafe { uninit::<T>(stream, host.len(), how) }?;
    stream.memcpy_htod(host, &mut *m)?;
    Ok(m)
}
