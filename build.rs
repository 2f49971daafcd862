//! Compiles every `kernels/*.cu` with NVRTC and embeds the images in the binary.
//!
//! - Targets: `DEEPCUT_CUDA_ARCHS` (default `sm_80,sm_90,compute_90`): each `sm_XY` gives
//!   a cubin (SASS for that architecture), each `compute_XY` gives PTX that the driver
//!   compiles for newer cards at load time.
//! - NVRTC is loaded at build time with `dlopen`, from `DEEPCUT_NVRTC_LIB` or found the
//!   way `scripts/nvrtc-env.sh` finds it (a CUDA toolkit, else the PyPI wheels
//!   nvidia-cuda-nvrtc-cu12 + nvidia-cuda-runtime-cu12). No GPU or driver is needed.
//! - No NVRTC: the build still succeeds, the CUDA backend is compiled but reports itself
//!   unavailable, and a `cargo:warning` says so. With `DEEPCUT_REQUIRE_KERNELS=1` (CI) a
//!   missing NVRTC is a build error.
//! - A kernel that fails to compile always fails the build, with NVRTC's log.
//! - ptxas' per-kernel report (registers, shared memory, spills) is written to
//!   `target/<profile>/kernel-report.txt`; its path is printed as a `cargo:warning`.
//! - Compiled images are cached in `target/nvrtc-cache` under a hash of the sources, the
//!   target, the options and the NVRTC version, so only a changed kernel file is
//!   recompiled, and `cargo build`, `cargo test` and `cargo clippy` share the images.
//!
//! Output: `$OUT_DIR/kernels.rs`, included by `src/backend/cuda/images.rs`.
use std::collections::hash_map::DefaultHasher;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

const DEFAULT_TARGETS: &str = "sm_80,sm_90,compute_90";
const ENV_VARS: &[&str] = &[
    "DEEPCUT_CUDA_ARCHS",
    "DEEPCUT_REQUIRE_KERNELS",
    "DEEPCUT_NVRTC_LIB",
    "DEEPCUT_CUDA_INCLUDE",
    "CUDA_PATH",
    "CUDA_HOME",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for v in ENV_VARS {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let kernel_dir = manifest.join("kernels");
    let required = env::var("DEEPCUT_REQUIRE_KERNELS").is_ok_and(|v| v == "1");

    let targets = parse_targets(&env::var("DEEPCUT_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_TARGETS.to_string()));
    let sources = kernel_sources(&kernel_dir);
    let entries: Vec<(String, Vec<String>)> = sources
        .iter()
        .map(|(stem, src)| (stem.clone(), entry_points(src)))
        .collect();

    let unavailable = |why: String| {
        if required {
            panic!(
                "DEEPCUT_REQUIRE_KERNELS=1 but the CUDA kernels cannot be compiled: {why}\n\
                 install NVRTC with: python3 -m pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12"
            );
        }
        println!(
            "cargo:warning=CUDA backend disabled: {why}. The CPU backend is unaffected. To enable it: \
             python3 -m pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12, then `touch build.rs` \
             (or set DEEPCUT_NVRTC_LIB and DEEPCUT_CUDA_INCLUDE)"
        );
        write_generated(&out_dir, &[], &entries, "", Some(&why));
    };

    let loc = match locate_nvrtc() {
        Ok(l) => l,
        Err(why) => return unavailable(why),
    };
    println!("cargo:rerun-if-changed={}", loc.lib.display());
    let nvrtc = match Nvrtc::load(&loc.lib) {
        Ok(n) => n,
        Err(why) => return unavailable(format!("{}: {why}", loc.lib.display())),
    };
    let version = nvrtc.version();

    // Headers shared by every kernel file enter every file's hash.
    let mut header_hash = DefaultHasher::new();
    for entry in sorted_dir(&kernel_dir) {
        if entry.extension().is_some_and(|e| e == "cuh") {
            entry.file_name().hash(&mut header_hash);
            fs::read(&entry).expect("read header").hash(&mut header_hash);
        }
    }
    let header_hash = header_hash.finish();
    // Shared by every profile (build, test, clippy each have their own OUT_DIR): names
    // carry the content hash, so a file is only ever written with the same bytes.
    let cache = out_dir
        .ancestors()
        .nth(4)
        .filter(|t| t.join("CACHEDIR.TAG").exists())
        .map(|t| t.join("nvrtc-cache"))
        .unwrap_or_else(|| out_dir.join("kernel-cache"));
    fs::create_dir_all(&cache).expect("create kernel cache");

    let jobs: Vec<(&String, &String, &Target)> = sources
        .iter()
        .flat_map(|(stem, src)| targets.iter().map(move |t| (stem, src, t)))
        .collect();
    let results: Vec<Result<Compiled, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|&(stem, src, target)| {
                let (nvrtc, loc, cache, kernel_dir) = (&nvrtc, &loc, &cache, &kernel_dir);
                let version = version.clone();
                s.spawn(move || {
                    compile_cached(
                        nvrtc,
                        stem,
                        src,
                        target,
                        kernel_dir,
                        &loc.include,
                        cache,
                        header_hash,
                        &version,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("compile thread")).collect()
    });
    let mut failures = String::new();
    let mut compiled = Vec::new();
    for r in results {
        match r {
            Ok(c) => compiled.push(c),
            Err(e) => failures.push_str(&e),
        }
    }
    if !failures.is_empty() {
        panic!("NVRTC failed to compile the CUDA kernels:\n{failures}");
    }

    let report = report(&compiled, &version, &loc);
    let report_path = profile_dir(&out_dir).join("kernel-report.txt");
    fs::write(out_dir.join("kernel-report.txt"), &report).expect("write kernel report");
    let _ = fs::write(&report_path, &report);
    let spills: Vec<String> = compiled
        .iter()
        .flat_map(|c| c.stats.iter().filter(|s| s.spill_stores + s.spill_loads > 0))
        .map(|s| format!("{} ({})", s.kernel, s.target))
        .collect();
    println!(
        "cargo:warning=CUDA kernels: {} files x {} targets compiled by NVRTC {version} ({} from cache); report: {}",
        sources.len(),
        targets.len(),
        compiled.iter().filter(|c| c.cached).count(),
        report_path.display()
    );
    if !spills.is_empty() {
        println!("cargo:warning=CUDA kernels with register spills: {}", spills.join(", "));
    }
    write_generated(&out_dir, &compiled, &entries, &version, None);
}

// ---- targets and sources ----------------------------------------------------------------

#[derive(Clone, Debug)]
struct Target {
    /// "sm_80" or "compute_90"
    name: String,
    cubin: bool,
}

fn parse_targets(spec: &str) -> Vec<Target> {
    let mut out = Vec::new();
    for t in spec.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (cubin, num) = if let Some(n) = t.strip_prefix("sm_") {
            (true, n)
        } else if let Some(n) = t.strip_prefix("compute_") {
            (false, n)
        } else if t.chars().all(|c| c.is_ascii_digit()) {
            (true, t)
        } else {
            panic!("DEEPCUT_CUDA_ARCHS: `{t}` is not sm_XY, compute_XY or XY (e.g. sm_80,sm_90,compute_90)");
        };
        assert!(
            num.len() >= 2 && num.chars().all(|c| c.is_ascii_digit()),
            "DEEPCUT_CUDA_ARCHS: `{t}` is not sm_XY, compute_XY or XY"
        );
        let name = format!("{}_{num}", if cubin { "sm" } else { "compute" });
        out.push(Target { name, cubin });
    }
    assert!(!out.is_empty(), "DEEPCUT_CUDA_ARCHS is empty");
    out
}

fn sorted_dir(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// (file stem, source) of every kernels/*.cu, sorted by name.
fn kernel_sources(dir: &Path) -> Vec<(String, String)> {
    sorted_dir(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|p| {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            let src = fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (stem, src)
        })
        .collect()
}

/// Names of the `extern "C" __global__ void NAME(` entry points of a source file.
fn entry_points(src: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in src.lines() {
        if let Some(rest) = line.trim_start().strip_prefix("extern \"C\" __global__") {
            let rest = rest.trim_start();
            let rest = rest.split("void").nth(1).unwrap_or("").trim_start();
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                names.push(name);
            }
        }
    }
    names
}

// ---- locating NVRTC ----------------------------------------------------------------------

struct Location {
    lib: PathBuf,
    include: PathBuf,
    /// Where it was found, for the report.
    how: String,
}

fn first_existing(cands: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    cands.into_iter().find(|p| p.exists())
}

fn locate_nvrtc() -> Result<Location, String> {
    let env_lib = env::var_os("DEEPCUT_NVRTC_LIB").map(PathBuf::from);
    let env_inc = env::var_os("DEEPCUT_CUDA_INCLUDE").map(PathBuf::from);
    if let (Some(lib), Some(include)) = (&env_lib, &env_inc) {
        if !lib.exists() {
            return Err(format!("DEEPCUT_NVRTC_LIB={} does not exist", lib.display()));
        }
        return Ok(Location {
            lib: lib.clone(),
            include: include.clone(),
            how: "DEEPCUT_NVRTC_LIB / DEEPCUT_CUDA_INCLUDE".into(),
        });
    }
    let mut found: Vec<Location> = Vec::new();
    // A CUDA toolkit.
    let roots = ["CUDA_PATH", "CUDA_HOME"]
        .iter()
        .filter_map(|v| env::var_os(v).map(PathBuf::from))
        .chain([PathBuf::from("/usr/local/cuda")]);
    for root in roots {
        let lib = first_existing(
            [
                "lib64/libnvrtc.so",
                "lib/libnvrtc.so",
                "targets/x86_64-linux/lib/libnvrtc.so",
            ]
            .iter()
            .map(|p| root.join(p))
            .chain(versioned(&root.join("lib64"), "libnvrtc.so.")),
        );
        if let Some(lib) = lib {
            if root.join("include/cuda_bf16.h").exists() {
                found.push(Location {
                    lib,
                    include: root.join("include"),
                    how: format!("CUDA toolkit at {}", root.display()),
                });
            }
        }
    }
    // The PyPI wheels (python3 -c "import nvidia").
    for root in python_nvidia_roots() {
        let cu12 = root.join("cuda_nvrtc/lib/libnvrtc.so.12");
        let inc12 = root.join("cuda_runtime/include");
        if cu12.exists() && inc12.join("cuda_bf16.h").exists() {
            found.push(Location {
                lib: cu12,
                include: inc12,
                how: format!(
                    "PyPI wheels nvidia-cuda-nvrtc-cu12 / nvidia-cuda-runtime-cu12 in {}",
                    root.display()
                ),
            });
        }
        let cu13 = root.join("cu13/lib/libnvrtc.so.13");
        let inc13 = root.join("cu13/include");
        if cu13.exists() && inc13.join("cuda_bf16.h").exists() {
            found.push(Location {
                lib: cu13,
                include: inc13,
                how: format!("PyPI CUDA 13 wheels in {}", root.display()),
            });
        }
    }
    let mut loc = found.into_iter().next().ok_or_else(|| {
        "no NVRTC found (no DEEPCUT_NVRTC_LIB, no CUDA toolkit in CUDA_PATH/CUDA_HOME//usr/local/cuda, \
         no nvidia-cuda-nvrtc-cu12 wheel visible to python3)"
            .to_string()
    })?;
    if let Some(lib) = env_lib {
        loc.lib = lib;
    }
    if let Some(inc) = env_inc {
        loc.include = inc;
    }
    Ok(loc)
}

fn versioned(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    sorted_dir(dir)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
        .collect()
}

fn python_nvidia_roots() -> Vec<PathBuf> {
    for py in ["python3", "python"] {
        let out = Command::new(py)
            .args(["-c", "import nvidia, os; print(os.pathsep.join(list(nvidia.__path__)))"])
            .output();
        if let Ok(out) = out {
            if out.status.success() {
                let s = String::from_utf8_lossy(&out.stdout);
                return env::split_paths(s.trim()).filter(|p| p.is_dir()).collect();
            }
        }
    }
    Vec::new()
}

// ---- NVRTC through dlopen ----------------------------------------------------------------

type Program = *mut c_void;
type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
type CreateFn = unsafe extern "C" fn(
    *mut Program,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type CompileFn = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int;
type SizeFn = unsafe extern "C" fn(Program, *mut usize) -> c_int;
type GetFn = unsafe extern "C" fn(Program, *mut c_char) -> c_int;
type DestroyFn = unsafe extern "C" fn(*mut Program) -> c_int;
type ErrStrFn = unsafe extern "C" fn(c_int) -> *const c_char;

/// The few NVRTC entry points the build needs (nvrtc.h, stable since CUDA 11.1).
struct Nvrtc {
    _lib: libloading::Library,
    version: VersionFn,
    create: CreateFn,
    compile: CompileFn,
    log_size: SizeFn,
    log: GetFn,
    cubin_size: SizeFn,
    cubin: GetFn,
    ptx_size: SizeFn,
    ptx: GetFn,
    destroy: DestroyFn,
    err_str: ErrStrFn,
}

impl Nvrtc {
    fn load(path: &Path) -> Result<Nvrtc, String> {
        // SAFETY: loading NVRTC runs its initialisers, which have no preconditions.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())?;
        // SAFETY: each symbol is looked up with the signature nvrtc.h declares for it.
        unsafe {
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get($name)
                        .map_err(|e| format!("{}: {e}", String::from_utf8_lossy($name)))?
                };
            }
            Ok(Nvrtc {
                version: sym!(b"nvrtcVersion"),
                create: sym!(b"nvrtcCreateProgram"),
                compile: sym!(b"nvrtcCompileProgram"),
                log_size: sym!(b"nvrtcGetProgramLogSize"),
                log: sym!(b"nvrtcGetProgramLog"),
                cubin_size: sym!(b"nvrtcGetCUBINSize"),
                cubin: sym!(b"nvrtcGetCUBIN"),
                ptx_size: sym!(b"nvrtcGetPTXSize"),
                ptx: sym!(b"nvrtcGetPTX"),
                destroy: sym!(b"nvrtcDestroyProgram"),
                err_str: sym!(b"nvrtcGetErrorString"),
                _lib: lib,
            })
        }
    }

    fn version(&self) -> String {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        unsafe { (self.version)(&mut major, &mut minor) };
        format!("{major}.{minor}")
    }

    fn err(&self, code: c_int) -> String {
        // SAFETY: nvrtcGetErrorString returns a static C string for any code.
        unsafe { CStr::from_ptr((self.err_str)(code)) }
            .to_string_lossy()
            .into_owned()
    }

    /// Compiles `src` with `opts`; returns (image, log) or the log on failure.
    fn compile(&self, name: &str, src: &str, opts: &[String], cubin: bool) -> Result<(Vec<u8>, String), String> {
        let csrc = CString::new(src).map_err(|e| e.to_string())?;
        let cname = CString::new(name).unwrap();
        let copts: Vec<CString> = opts.iter().map(|o| CString::new(o.as_str()).unwrap()).collect();
        let popts: Vec<*const c_char> = copts.iter().map(|o| o.as_ptr()).collect();
        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: the program handle is created, used and destroyed here; every pointer
        // passed lives until the end of this block; buffers are sized by NVRTC's own
        // size queries.
        unsafe {
            let rc = (self.create)(
                &mut prog,
                csrc.as_ptr(),
                cname.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            if rc != 0 {
                return Err(format!("nvrtcCreateProgram: {}", self.err(rc)));
            }
            let rc = (self.compile)(prog, popts.len() as c_int, popts.as_ptr());
            let mut n = 0usize;
            (self.log_size)(prog, &mut n);
            let mut log = vec![0u8; n.max(1)];
            (self.log)(prog, log.as_mut_ptr() as *mut c_char);
            // The log is NUL-terminated, and ptxas' part may carry NULs of its own.
            let log: String = String::from_utf8_lossy(&log).chars().filter(|&c| c != '\0').collect();
            if rc != 0 {
                (self.destroy)(&mut prog);
                return Err(format!("{} ({})\n{log}", self.err(rc), opts.join(" ")));
            }
            let (size_fn, get_fn) = if cubin {
                (self.cubin_size, self.cubin)
            } else {
                (self.ptx_size, self.ptx)
            };
            let mut n = 0usize;
            size_fn(prog, &mut n);
            let mut image = vec![0u8; n];
            get_fn(prog, image.as_mut_ptr() as *mut c_char);
            (self.destroy)(&mut prog);
            Ok((image, log))
        }
    }
}

// ---- compiling, with a cache -------------------------------------------------------------

struct Compiled {
    module: String,
    target: String,
    image: PathBuf,
    cached: bool,
    stats: Vec<KernelStats>,
    log: String,
}

fn options(target: &Target, kernel_dir: &Path, include: &Path) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={}", target.name),
        "-std=c++17".to_string(),
        "-lineinfo".to_string(),
        "-DNDEBUG".to_string(),
        format!("-I{}", kernel_dir.display()),
        format!("-I{}", include.display()),
    ];
    if target.cubin {
        // ptxas prints registers, shared memory and spills per kernel into the log.
        o.push("--ptxas-options=-v".to_string());
    }
    o
}

#[allow(clippy::too_many_arguments)]
fn compile_cached(
    nvrtc: &Nvrtc, stem: &str, src: &str, target: &Target, kernel_dir: &Path, include: &Path, cache: &Path,
    header_hash: u64, version: &str,
) -> Result<Compiled, String> {
    let opts = options(target, kernel_dir, include);
    let mut h = DefaultHasher::new();
    (src, header_hash, &target.name, &opts, version).hash(&mut h);
    let key = h.finish();
    let ext = if target.cubin { "cubin" } else { "ptx" };
    let image = cache.join(format!("{stem}.{}.{key:016x}.{ext}", target.name));
    let log_path = image.with_extension(format!("{ext}.log"));
    if image.exists() && log_path.exists() {
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        return Ok(Compiled {
            module: stem.to_string(),
            target: target.name.clone(),
            image,
            cached: true,
            stats: parse_ptxas(&log, &target.name),
            log,
        });
    }
    let (mut bytes, log) = nvrtc
        .compile(&format!("{stem}.cu"), src, &opts, target.cubin)
        .map_err(|e| format!("--- kernels/{stem}.cu for {}:\n{e}\n", target.name))?;
    if !target.cubin {
        // cuModuleLoadData takes PTX as a NUL-terminated string.
        if bytes.last() != Some(&0) {
            bytes.push(0);
        }
    }
    // Log first, image last, each through a temporary name: an image that exists has its
    // log, and a build killed halfway (or a concurrent one) leaves no truncated file.
    for (path, data) in [(&log_path, log.as_bytes()), (&image, &bytes[..])] {
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        fs::write(&tmp, data).map_err(|e| e.to_string())?;
        fs::rename(&tmp, path).map_err(|e| e.to_string())?;
    }
    Ok(Compiled {
        module: stem.to_string(),
        target: target.name.clone(),
        image,
        cached: false,
        stats: parse_ptxas(&log, &target.name),
        log,
    })
}

// ---- the ptxas report --------------------------------------------------------------------

#[derive(Default, Clone)]
struct KernelStats {
    kernel: String,
    target: String,
    registers: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

/// The numbers after a word in a ptxas line, e.g. "Used 32 registers, 4096 bytes smem".
fn number_before(line: &str, word: &str) -> Option<u32> {
    let idx = line.find(word)?;
    line[..idx].split_whitespace().last()?.parse().ok()
}

fn parse_ptxas(log: &str, target: &str) -> Vec<KernelStats> {
    let mut out: Vec<KernelStats> = Vec::new();
    let mut cur: Option<KernelStats> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            if let Some(k) = cur.take() {
                out.push(k);
            }
            cur = Some(KernelStats {
                kernel: rest.split('\'').next().unwrap_or("").to_string(),
                target: target.to_string(),
                ..Default::default()
            });
        } else if let Some(k) = cur.as_mut() {
            if line.contains("bytes stack frame") {
                k.stack = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = number_before(line, "registers").unwrap_or(0);
                k.smem = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out.extend(cur);
    out
}

/// The most threads a block may have at `regs` registers a thread (sm_80/sm_90: 64 Ki
/// registers a block, allocated per warp in units of 256; 1024 threads at most).
fn max_block(regs: u32) -> u32 {
    let per_warp = (regs.max(1) * 32).div_ceil(256) * 256;
    (65_536 / per_warp * 32).min(1024)
}

fn report(compiled: &[Compiled], version: &str, loc: &Location) -> String {
    let mut r = String::new();
    let _ = writeln!(r, "deepcut-fast CUDA kernels: ptxas report (written by build.rs)");
    let _ = writeln!(r, "NVRTC {version}: {} ({})", loc.lib.display(), loc.how);
    let _ = writeln!(r, "headers: {}", loc.include.display());
    let _ = writeln!(
        r,
        "smem = static shared memory per block; kernels that size shared memory at launch\n\
         (attention) show only their static part. A spill is local memory traffic: look first.\n\
         max block = the most threads a block of this kernel may have for its registers (64 Ki a\n\
         block, allocated per warp in units of 256); a launch with more fails on a GPU and on\n\
         the tests' CPU emulator, which reads this report.\n"
    );
    let _ = writeln!(
        r,
        "{:<34} {:<8} {:>5} {:>10} {:>7} {:>12} {:>11} {:>9}",
        "kernel", "target", "regs", "smem(B)", "stack", "spill st(B)", "spill ld(B)", "max block"
    );
    let mut rows: Vec<&KernelStats> = compiled.iter().flat_map(|c| &c.stats).collect();
    rows.sort_by(|a, b| (&a.kernel, &a.target).cmp(&(&b.kernel, &b.target)));
    for k in rows {
        let _ = writeln!(
            r,
            "{:<34} {:<8} {:>5} {:>10} {:>7} {:>12} {:>11} {:>9}{}",
            k.kernel,
            k.target,
            k.registers,
            k.smem,
            k.stack,
            k.spill_stores,
            k.spill_loads,
            max_block(k.registers),
            if k.spill_stores + k.spill_loads > 0 {
                "  SPILLS"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(r, "\nimages:");
    for c in compiled {
        let size = fs::metadata(&c.image).map(|m| m.len()).unwrap_or(0);
        let _ = writeln!(r, "  {}.cu {:<11} {:>8} bytes", c.module, c.target, size);
    }
    let _ = writeln!(r, "\nraw NVRTC logs:");
    for c in compiled {
        if !c.log.trim().is_empty() {
            let _ = writeln!(r, "--- {}.cu {}\n{}", c.module, c.target, c.log.trim_end());
        }
    }
    r
}

/// target/<profile> from OUT_DIR = target/<profile>/build/<pkg>-<hash>/out.
fn profile_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out_dir.to_path_buf())
}

// ---- generated Rust ----------------------------------------------------------------------

fn write_generated(
    out_dir: &Path, compiled: &[Compiled], entries: &[(String, Vec<String>)], version: &str, missing: Option<&str>,
) {
    let mut g = String::new();
    let _ = writeln!(g, "// Generated by build.rs; do not edit.");
    let _ = writeln!(
        g,
        "/// Why the kernels were not compiled (None: they were).\npub const NOT_COMPILED: Option<&str> = {};",
        match missing {
            Some(m) => format!("Some({m:?})"),
            None => "None".into(),
        }
    );
    let _ = writeln!(
        g,
        "/// NVRTC version that compiled the images.\npub const NVRTC_VERSION: &str = {version:?};"
    );
    let _ = writeln!(
        g,
        "/// Every compiled image: (kernel file, target, bytes). Cubins for sm_XY, NUL-terminated PTX for compute_XY.\n\
         pub const IMAGES: &[(&str, &str, &[u8])] = &["
    );
    for c in compiled {
        let _ = writeln!(
            g,
            "    ({:?}, {:?}, include_bytes!({:?})),",
            c.module,
            c.target,
            c.image.display().to_string()
        );
    }
    let _ = writeln!(g, "];");
    let _ = writeln!(
        g,
        "/// extern \"C\" entry points of each kernel file (from the sources).\npub const ENTRY_POINTS: &[(&str, &[&str])] = &["
    );
    for (m, names) in entries {
        let _ = writeln!(g, "    ({m:?}, &{names:?}),");
    }
    let _ = writeln!(g, "];");
    let path = out_dir.join("kernels.rs");
    // Rewrite only on change, so an unchanged build does not touch the file.
    if fs::read_to_string(&path).ok().as_deref() != Some(g.as_str()) {
        fs::write(&path, g).expect("write kernels.rs");
    }
}
