//! cuBLAS where the dynamic loader does not look, under the names the CUDA 12 bindings look
//! for. cudarc (built with CUDA 12 bindings) opens `libcublas.so`, `libcublas.so.12`, ...
//! through the loader's search path. Two common machines have a cuBLAS it cannot open:
//! - one whose only cuBLAS is CUDA 13's `libcublas.so.13` (PyTorch's cu13 wheels, a runtime
//!   without the toolkit's unversioned links): the functions this backend calls have the
//!   same ABI in both (tests/cublas_abi.rs checks the values, layouts and functions against
//!   the headers and libraries it finds; cuBLAS 13.1 and 13.4 agree with the bindings);
//! - one whose cuBLAS 12 lives in a Python environment's `nvidia/cublas/lib` (PyTorch's cu12
//!   wheels, with no toolkit), off the loader's path.
//!
//! So before a command opens a GPU, [`ensure_cublas_names`] looks for a `libcublas.so.N` and
//! `libcublasLt.so.N` pair (N from 12 up to what the driver runs), links it under the
//! unversioned names in a private folder, and re-executes the binary with that folder first
//! on LD_LIBRARY_PATH: the dynamic loader reads that variable only when a process starts.
use std::path::{Path, PathBuf};

/// Set in the re-executed process (to the shim folder), so it never re-executes again.
const MARK: &str = "DEEPCUT_LIBSHIM";

/// If there is a driver, cuBLAS is not loadable under cudarc's names and a
/// `libcublas.so.N` / `libcublasLt.so.N` pair exists where CUDA libraries live (N from 12 up
/// to the driver's CUDA major version: a CUDA 12 driver cannot run cuBLAS 13), re-executes
/// this process with links to them first on LD_LIBRARY_PATH (and says so).
/// Returns otherwise, changing nothing: without a driver, with cuBLAS found, in the
/// re-executed process, or when anything fails (the device check then says what is missing).
pub fn ensure_cublas_names() {
    if std::env::var_os(MARK).is_some() {
        return;
    }
    // SAFETY: only try to dlopen the libraries under their usual names.
    let (driver, cublas, lt) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
            cudarc::cublaslt::sys::is_culib_present(),
        )
    };
    if !driver || (cublas && lt) {
        return;
    }
    let driver_major = driver_version().map(|(major, _)| major);
    let Some((blas, blas_lt)) = cublas_pair(&library_dirs(), driver_major) else {
        return;
    };
    let Some(shim) = shim_dir(&blas, &blas_lt) else {
        return;
    };
    let path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let path = if path.is_empty() {
        shim.display().to_string()
    } else {
        format!("{}:{path}", shim.display())
    };
    eprintln!(
        "note: cuBLAS found only as {} and {}: linked under the CUDA 12 names in {}",
        blas.display(),
        blas_lt.display(),
        shim.display()
    );
    let (Ok(exe), args) = (std::env::current_exe(), std::env::args_os().skip(1)) else {
        return;
    };
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe)
        .args(args)
        .env("LD_LIBRARY_PATH", path)
        .env(MARK, &shim)
        .exec();
    eprintln!("note: could not re-execute with the linked cuBLAS: {err}");
}

/// The CUDA version the driver supports, (major, minor) (13.0 for 13000); None without a
/// driver or when it does not say.
pub fn driver_version() -> Option<(u32, u32)> {
    // SAFETY: only tries to dlopen the driver under its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return None;
    }
    let mut version = 0;
    // SAFETY: the driver is present (above); cuDriverGetVersion needs no cuInit and writes
    // one int.
    let known =
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) } == cudarc::driver::sys::CUresult::CUDA_SUCCESS;
    (known && version > 0).then_some((version as u32 / 1000, version as u32 % 1000 / 10))
}

/// The CUDA libraries this process has open (`deepcut-fast devices` reports them): each the
/// file the dynamic loader mapped, links resolved; None where the library is absent.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub driver: Option<PathBuf>,
    pub cublas: Option<PathBuf>,
    pub cublas_lt: Option<PathBuf>,
    /// The folder of links [`ensure_cublas_names`] put first on LD_LIBRARY_PATH when it
    /// re-executed this process, if it did.
    pub shim: Option<PathBuf>,
}

/// Opens the driver, cuBLAS and cuBLASLt under the names the backend's bindings use (each
/// only if present; they stay open, as the bindings keep them) and says which files they are.
pub fn loaded() -> Loaded {
    use cudarc::{cublas, cublaslt, driver};
    // SAFETY: dlopen under the bindings' own names, each only when present (`culib` panics
    // otherwise); loading runs the libraries' initialisers, as any CUDA use does.
    unsafe {
        if driver::sys::is_culib_present() {
            driver::sys::culib();
        }
        if cublas::sys::is_culib_present() {
            cublas::sys::culib();
        }
        if cublaslt::sys::is_culib_present() {
            cublaslt::sys::culib();
        }
    }
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    Loaded {
        driver: mapped(&maps, "libcuda"),
        cublas: mapped(&maps, "libcublas"),
        cublas_lt: mapped(&maps, "libcublasLt"),
        shim: std::env::var_os(MARK).map(PathBuf::from),
    }
}

/// The file in a /proc/PID/maps text whose name is `stem.so` or `stem.so.*`.
fn mapped(maps: &str, stem: &str) -> Option<PathBuf> {
    let (exact, versioned) = (format!("{stem}.so"), format!("{stem}.so."));
    maps.lines()
        .filter_map(|l| l.find('/').map(|i| Path::new(&l[i..])))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == exact || n.starts_with(&versioned))
        })
        .map(Path::to_path_buf)
}

/// Where CUDA libraries live: LD_LIBRARY_PATH, the toolkit's folders, and the lib folders
/// of the `nvidia` Python wheels (PyTorch brings cuBLAS that way). Public for
/// tests/cublas_abi.rs, which checks the cuBLAS libraries found here.
pub fn library_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = std::env::var_os(var) {
            dirs.push(Path::new(&d).join("lib64"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(PathBuf::from))
        .collect();
    // the Python on PATH (a venv's or pyenv's bin/ folder's parent), then the usual places
    for d in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if d.ends_with("bin") {
            prefixes.extend(d.parent().map(Path::to_path_buf));
        }
    }
    prefixes.extend(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from));
    if let Some(home) = std::env::var_os("HOME") {
        let home = PathBuf::from(home);
        prefixes.push(home.join(".local"));
        prefixes.extend(subdirs(&home.join(".pyenv/versions")));
    }
    let mut site = vec![PathBuf::from("/usr/lib/python3/dist-packages")];
    for p in prefixes {
        for py in subdirs(&p.join("lib"))
            .into_iter()
            .filter(|d| name_of(d).starts_with("python3"))
        {
            site.push(py.join("site-packages"));
            site.push(py.join("dist-packages"));
        }
    }
    for s in site {
        for pkg in subdirs(&s.join("nvidia")) {
            dirs.push(pkg.join("lib"));
        }
    }
    dirs
}

fn subdirs(d: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(d) else {
        return vec![];
    };
    let mut v: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    v.sort();
    v
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The oldest cuBLAS major version the backend's bindings (CUDA 12.6 API) work with.
const MIN_MAJOR: u32 = 12;

/// The `libcublas.so.N` / `libcublasLt.so.N` pair in one of `dirs` with the largest N from
/// [`MIN_MAJOR`] up to `max_major` (the driver's; no cap when unknown), exact `.so.N` names
/// only; the first folder wins a tie. Both from one folder, so never two versions mixed.
fn cublas_pair(dirs: &[PathBuf], max_major: Option<u32>) -> Option<(PathBuf, PathBuf)> {
    let mut best: Option<(u32, PathBuf, PathBuf)> = None;
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(n) = name.strip_prefix("libcublas.so.").and_then(|v| v.parse::<u32>().ok()) else {
                continue;
            };
            let lt = d.join(format!("libcublasLt.so.{n}"));
            let fits = n >= MIN_MAJOR && max_major.is_none_or(|m| n <= m) && lt.exists();
            if fits && best.as_ref().is_none_or(|(m, _, _)| n > *m) {
                best = Some((n, e.path(), lt));
            }
        }
    }
    best.map(|(_, b, l)| (b, l))
}

/// A folder of this user's (under ~/.cache, not a shared temporary folder another user
/// could have prepared) holding `libcublas.so` and `libcublasLt.so` linked to the two
/// libraries; one per pair of targets, reused.
fn shim_dir(blas: &Path, blas_lt: &Path) -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
    let mut h = crate::util::Fnv::default();
    h.eat(blas.as_os_str().as_encoded_bytes())
        .eat(blas_lt.as_os_str().as_encoded_bytes());
    let dir = cache.join("deepcut-fast").join(format!("libshim-{:016x}", h.finish()));
    std::fs::create_dir_all(&dir).ok()?;
    for (name, target) in [("libcublas.so", blas), ("libcublasLt.so", blas_lt)] {
        let link = dir.join(name);
        if std::fs::read_link(&link).ok().as_deref() != Some(target) {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(target, &link).ok()?;
        }
    }
    Some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mapped library is found by its stem only: libcublas is not libcublasLt, libcuda is
    /// not libcudart, and a path with spaces is kept whole.
    #[test]
    fn mapped_finds_a_library_by_its_stem() {
        let maps = "\
7f00-7f01 r--p 00000000 08:01 11 /usr/lib/x86_64-linux-gnu/libcudart.so.12.9.79
7f01-7f02 r-xp 00001000 08:01 12 /opt/my env/nvidia/cu13/lib/libcublasLt.so.13
7f02-7f03 r-xp 00001000 08:01 13 /opt/my env/nvidia/cu13/lib/libcublas.so.13
7f03-7f04 rw-p 00000000 00:00 0 [heap]
7f04-7f05 r-xp 00001000 08:01 14 /usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05
7f05-7f06 r-xp 00001000 08:01 15 /usr/lib/libcudax.so
";
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(
            mapped(maps, "libcuda"),
            p("/usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05")
        );
        assert_eq!(
            mapped(maps, "libcublas"),
            p("/opt/my env/nvidia/cu13/lib/libcublas.so.13")
        );
        assert_eq!(
            mapped(maps, "libcublasLt"),
            p("/opt/my env/nvidia/cu13/lib/libcublasLt.so.13")
        );
        assert_eq!(mapped(maps, "libnvrtc"), None);
    }

    /// The largest major version from 12 up to the driver's, with its cuBLASLt in the same
    /// folder; exact `.so.N` names only (not `.so.13.0.1`, not another library's); the first
    /// folder wins a tie.
    #[test]
    fn cublas_pair_takes_the_largest_major_the_driver_runs() {
        let t = tempfile::tempdir().unwrap();
        let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
        for d in [&a, &b, &c] {
            std::fs::create_dir_all(d).unwrap();
        }
        let touch = |d: &Path, names: &[&str]| {
            for f in names {
                std::fs::write(d.join(f), b"").unwrap();
            }
        };
        // a: a 12 pair, a 13 without its Lt, an 11 pair, a full version name
        touch(
            &a,
            &[
                "libcublas.so.12",
                "libcublasLt.so.12",
                "libcublas.so.13",
                "libcublas.so.11",
                "libcublasLt.so.11",
                "libcublas.so.14.0.1",
                "libcublasLt.so.14.0.1",
            ],
        );
        // b: a 13 pair; c: a 13 pair too (b comes first)
        touch(&b, &["libcublas.so.13", "libcublasLt.so.13"]);
        touch(&c, &["libcublas.so.13", "libcublasLt.so.13"]);
        let dirs = vec![t.path().join("missing"), a.clone(), b.clone(), c.clone()];
        let pair = |d: &Path, n: u32| {
            Some((
                d.join(format!("libcublas.so.{n}")),
                d.join(format!("libcublasLt.so.{n}")),
            ))
        };
        assert_eq!(cublas_pair(&dirs, None), pair(&b, 13));
        assert_eq!(cublas_pair(&dirs, Some(13)), pair(&b, 13));
        // a CUDA 12 driver: never cuBLAS 13
        assert_eq!(cublas_pair(&dirs, Some(12)), pair(&a, 12));
        assert_eq!(cublas_pair(&dirs, Some(11)), None);
        assert_eq!(cublas_pair(&dirs[2..], Some(12)), None);
        touch(&c, &["libcublas.so.14", "libcublasLt.so.14"]);
        assert_eq!(cublas_pair(&dirs, None), pair(&c, 14));
        assert_eq!(cublas_pair(&dirs, Some(13)), pair(&b, 13));
    }
}
