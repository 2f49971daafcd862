//! Page-locked staging for the uploads inside a step (token ids, positions, labels, the
//! contrastive rows: about ten small copies per step). A host-to-device copy from pageable
//! memory "may synchronize with the stream" (CUDA's API synchronisation notes) to stage
//! it, which would make the host wait for the step before; from page-locked memory it is
//! fully asynchronous. So `upload` copies the host data into one of two page-locked
//! halves and enqueues the copy from there. A half is reused only after the event recorded
//! when it was last left has completed: in a training loop that is many steps back, so the
//! wait is instant. Copies larger than a half go the pageable way (model loading), and so
//! does every copy where the driver gives no page-locked memory (`Cuda::new`).
use cudarc::driver::{result, CudaEvent, CudaStream, DriverError};
use std::sync::Arc;

/// Bytes per half: a roberta-base step at bf 32 / br 128 / seq 128 uploads about 1.2 MB.
pub(super) const HALF_BYTES: usize = 16 << 20;

struct Half {
    ptr: *mut u8,
    /// Recorded after the last copy from this half when the other half took over.
    left: CudaEvent,
    recorded: bool,
}

pub(super) struct Uploads {
    stream: Arc<CudaStream>,
    /// Bytes per half (HALF_BYTES; smaller in tests, to exercise the switch).
    half: usize,
    /// Allocated on the first upload (none until then).
    halves: Vec<Half>,
    /// False where the driver gives no page-locked memory: every upload then goes the
    /// pageable way (`Cuda::new`, `DeviceInfo::pageable_why`).
    page_locked: bool,
    cur: usize,
    off: usize,
}

// SAFETY: the raw pointers are page-locked host blocks owned by this value alone; the
// backend reaches it through a Mutex.
unsafe impl Send for Uploads {}

impl Uploads {
    pub fn new(stream: Arc<CudaStream>, half: usize, page_locked: bool) -> Uploads {
        Uploads {
            stream,
            half,
            halves: Vec::new(),
            page_locked,
            cur: 0,
            off: 0,
        }
    }

    /// Enqueues a copy of `bytes` to the device address `dst` from page-locked memory;
    /// false (nothing done) when `bytes` is larger than a half, or there is no page-locked
    /// memory.
    ///
    /// # Safety
    /// `dst` must be a live device allocation of at least `bytes.len()` bytes, not freed
    /// before the stream has run the copy.
    pub unsafe fn copy(&mut self, dst: u64, bytes: &[u8]) -> Result<bool, DriverError> {
        if bytes.len() > self.half || !self.page_locked {
            return Ok(false);
        }
        // the raw copy below needs the context current on this thread (the driver's is per
        // thread); cudarc's own calls bind it, and this may be a thread's first call
        self.stream.context().bind_to_thread()?;
        if self.halves.is_empty() {
            for _ in 0..2 {
                let left = self.stream.context().new_event(None)?;
                let ptr = result::malloc_host(self.half, 0)? as *mut u8;
                self.halves.push(Half {
                    ptr,
                    left,
                    recorded: false,
                });
            }
        }
        if self.off + bytes.len() > self.half {
            let h = &mut self.halves[self.cur];
            h.left.record(&self.stream)?;
            h.recorded = true;
            self.cur ^= 1;
            self.off = 0;
            let h = &self.halves[self.cur];
            if h.recorded {
                // the copies from this half were enqueued a whole half of uploads ago
                h.left.synchronize()?;
            }
        }
        let p = self.halves[self.cur].ptr.add(self.off);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        result::memcpy_htod_async(dst, std::slice::from_raw_parts(p, bytes.len()), self.stream.cu_stream())?;
        // 256-byte steps keep every staged copy aligned for the DMA engine
        self.off += bytes.len().next_multiple_of(256);
        Ok(true)
    }
}

impl Drop for Uploads {
    fn drop(&mut self) {
        if self.halves.is_empty() {
            return;
        }
        // copies may still read the halves
        let _ = self.stream.synchronize();
        for h in &self.halves {
            // SAFETY: allocated by malloc_host above, freed once, after the stream drained
            let _ = unsafe { result::free_host(h.ptr as _) };
        }
    }
}
