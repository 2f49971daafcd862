//! NVTX ranges (`nsys profile` shows each layer's forward and backward, the losses and the
//! optimiser step by name), through whichever NVTX library this machine has.
//!
//! NVTX itself is a thin front: the first call reads `NVTX_INJECTION64_PATH` (which nsys
//! sets), loads that tool and hands it the calls; without a tool every call is a no-op. The
//! front used to be `libnvToolsExt.so.1`, which CUDA 12.9 and 13 no longer ship: their
//! toolkits and PyPI wheels (`nvidia-nvtx-cu12` 12.9, `nvidia-nvtx` 13, as PyTorch installs
//! them) carry `libnvtx3interop.so.1` instead, the same C functions built from the
//! header-only NVTX 3. So this module looks for either, under the loader's search path
//! first and then where CUDA libraries live ([`super::libs::library_dirs`]: the toolkit, the
//! `nvidia` wheels' lib folders), and binds the two functions a range needs.
//! `DEEPCUT_NVTX_LIB` names the library to use instead.
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// nvtxRangeStartA: opens a process-wide range named by an ASCII string, returns its id.
type StartA = unsafe extern "C" fn(*const c_char) -> u64;
/// nvtxRangeEnd: closes the range with that id.
type End = unsafe extern "C" fn(u64);

/// The loaded NVTX front, alive for the rest of the process (ranges hold `&'static`).
pub struct Nvtx {
    start: StartA,
    end: End,
    /// Where it was loaded from (a file name when the loader's search path found it).
    pub from: String,
    _lib: libloading::Library,
}

/// The names the dynamic loader is asked for, oldest front first (the CPU emulator of the
/// tests provides `libnvToolsExt.so`).
const NAMES: [&str; 4] = [
    "libnvToolsExt.so",
    "libnvToolsExt.so.1",
    "libnvtx3interop.so",
    "libnvtx3interop.so.1",
];

impl Nvtx {
    /// The process's NVTX front, loaded on first use; None when there is none (ranges are
    /// then no-ops, as NVTX's are without a tool).
    pub fn get() -> Option<&'static Nvtx> {
        static NVTX: OnceLock<Option<Nvtx>> = OnceLock::new();
        NVTX.get_or_init(|| {
            if let Some(p) = std::env::var_os("DEEPCUT_NVTX_LIB") {
                let loaded = Nvtx::open(Path::new(&p));
                if loaded.is_none() {
                    eprintln!(
                        "note: DEEPCUT_NVTX_LIB={} could not be loaded as NVTX: no profiler ranges",
                        Path::new(&p).display()
                    );
                }
                return loaded;
            }
            NAMES
                .iter()
                .map(PathBuf::from)
                .chain(candidates(&super::libs::library_dirs()))
                .find_map(|p| Nvtx::open(&p))
        })
        .as_ref()
    }

    /// Loads `lib` (a path, or a bare name for the loader's search path) if it has both
    /// range functions.
    pub fn open(lib: &Path) -> Option<Nvtx> {
        // SAFETY: loading runs the library's initialisers; NVTX fronts have none beyond
        // their own state, and the two symbols are bound at the C signatures NVTX declares
        // (nvToolsExt.h: nvtxRangeId_t nvtxRangeStartA(const char*); void
        // nvtxRangeEnd(nvtxRangeId_t), nvtxRangeId_t being uint64_t).
        unsafe {
            let l = libloading::Library::new(lib.as_os_str()).ok()?;
            let start = *l.get::<StartA>(b"nvtxRangeStartA\0").ok()?;
            let end = *l.get::<End>(b"nvtxRangeEnd\0").ok()?;
            Some(Nvtx {
                start,
                end,
                from: lib.display().to_string(),
                _lib: l,
            })
        }
    }

    /// Opens a range named `name` (a NUL inside the name ends it); it ends when the
    /// returned guard drops.
    pub fn range(&'static self, name: &str) -> Range {
        let c = CString::new(name.split('\0').next().unwrap_or_default()).unwrap_or_default();
        // SAFETY: a NUL-terminated string that outlives the call (NVTX copies what it keeps).
        let id = unsafe { (self.start)(c.as_ptr()) };
        Range { nvtx: self, id }
    }
}

/// An open NVTX range.
#[must_use = "the range ends when this drops"]
pub struct Range {
    nvtx: &'static Nvtx,
    id: u64,
}

impl Drop for Range {
    fn drop(&mut self) {
        // SAFETY: the id nvtxRangeStartA returned, ended once.
        unsafe { (self.nvtx.end)(self.id) }
    }
}

/// The NVTX fronts present in `dirs`, in folder order, `libnvtx3interop.so.1` before
/// `libnvToolsExt.so.1` within a folder.
pub fn candidates(dirs: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter()
        .flat_map(|d| ["libnvtx3interop.so.1", "libnvToolsExt.so.1"].map(|n| d.join(n)))
        .filter(|p| p.is_file())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only existing files, folder by folder, the NVTX 3 front first in a folder.
    #[test]
    fn candidates_in_folder_order() {
        let t = tempfile::tempdir().unwrap();
        let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
        for d in [&a, &b, &c] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(a.join("libnvToolsExt.so.1"), b"").unwrap();
        std::fs::write(b.join("libnvToolsExt.so.1"), b"").unwrap();
        std::fs::write(b.join("libnvtx3interop.so.1"), b"").unwrap();
        std::fs::write(c.join("libnvtx3interop.so.2"), b"").unwrap();
        let missing = t.path().join("none");
        assert_eq!(
            candidates(&[missing, a.clone(), b.clone(), c]),
            vec![
                a.join("libnvToolsExt.so.1"),
                b.join("libnvtx3interop.so.1"),
                b.join("libnvToolsExt.so.1")
            ]
        );
    }

    /// A file that is not an NVTX library is passed over, not an error.
    #[test]
    fn open_refuses_what_is_not_nvtx() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("libnvToolsExt.so.1");
        std::fs::write(&f, b"not an ELF file").unwrap();
        assert!(Nvtx::open(&f).is_none());
        assert!(Nvtx::open(&t.path().join("absent.so")).is_none());
    }
}
