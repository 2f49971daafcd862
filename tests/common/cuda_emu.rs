//! Builds the CPU emulator of the CUDA driver and cuBLAS (tests/cuda_emu) with every
//! kernels/*.cu compiled as C++ into it: a folder holding libcuda.so, libcublas.so and
//! libnvToolsExt.so that cudarc opens in place of NVIDIA's when the folder leads
//! LD_LIBRARY_PATH. The CUDA
//! backend then runs unchanged on the CPU (see tests/cuda_emu/runtime.cpp for what that
//! does and does not show).
use std::path::{Path, PathBuf};
use std::process::Command;

/// The emulator's folder under the cargo target dir, built (or rebuilt when a source is
/// newer than the libraries) with the system C++ compiler (`CXX`, default c++). Built once
/// per process: tests running side by side must not rebuild a library another one is
/// loading.
pub fn build() -> Result<PathBuf, String> {
    build_with(Sanitizer::None)
}

/// How the emulator is built: plain, instrumented (tests/cuda_emu/runtime.cpp, "Sanitizer
/// builds"), or with its kernels' arithmetic contracted into FMAs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sanitizer {
    None,
    /// AddressSanitizer and UBSan over kernels, runtime and cuBLAS, with device buffers and
    /// dynamic shared memory at their exact sizes: memcheck.
    Address,
    /// ThreadSanitizer over the kernels, each thread of a block a TSan fiber: racecheck.
    Thread,
    /// No sanitizer: the kernels compiled with a*b+c contracted into fused multiply-adds
    /// wherever the compiler likes (-mfma -ffp-contract=fast), as NVRTC compiles them for a
    /// GPU (its default --fmad=true) and as the plain build (-ffp-contract=off) does not. The
    /// places differ from NVRTC's, so it shows whether parity hangs on where they fall.
    /// Needs an x86-64 CPU with FMA.
    Fma,
}

impl Sanitizer {
    fn folder(self) -> &'static str {
        match self {
            Sanitizer::None => "cuda-emu",
            Sanitizer::Address => "cuda-emu-asan",
            Sanitizer::Thread => "cuda-emu-tsan",
            Sanitizer::Fma => "cuda-emu-fma",
        }
    }

    /// How many copies of every kernel the build links in: the blocks ThreadSanitizer is told
    /// run at the same time (tests/cuda_emu/runtime.cpp, "Slots"). The other builds order
    /// every block after the one before, as blocks really run in the emulator.
    fn slots(self) -> usize {
        match self {
            Sanitizer::Thread => 4,
            _ => 1,
        }
    }

    /// The sanitizer's runtime, which a process that loads this build must preload
    /// (`LD_PRELOAD`): the Rust test binary itself is not instrumented.
    pub fn runtime(self) -> Result<Option<PathBuf>, String> {
        let lib = match self {
            Sanitizer::None | Sanitizer::Fma => return Ok(None),
            Sanitizer::Address => "libasan.so",
            Sanitizer::Thread => "libtsan.so",
        };
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = Command::new(&cxx)
            .arg(format!("-print-file-name={lib}"))
            .output()
            .map_err(|e| format!("{cxx} -print-file-name={lib}: {e}"))?;
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if path.is_absolute() && path.exists() {
            Ok(Some(path))
        } else {
            Err(format!("{cxx} has no {lib} (install the compiler's sanitizer runtime)"))
        }
    }
}

/// Makes `cmd` run on the `san` build of the emulator: its folder first on LD_LIBRARY_PATH,
/// and for a sanitizer build its runtime preloaded, with options under which a report fails
/// the process (AddressSanitizer, UBSan) or is printed for `sanitizer_report`
/// (ThreadSanitizer). The ThreadSanitizer build also runs with
/// - fresh device memory and every block's shared memory all NaN (runtime.cpp,
///   CUDA_EMU_FILL): a read of memory nobody wrote, hidden by a multiplication by zero,
///   shows in the numbers;
/// - blocks y fastest (CUDA_EMU_BLOCK_ORDER): the blocks of a column of a (columns, row
///   chunks) grid, which meet in a last-block reduction, fall in its window of unordered
///   blocks.
pub fn sanitized(cmd: &mut Command, san: Sanitizer) -> Result<(), String> {
    on_emulator(cmd, &build_with(san)?)?;
    let Some(rt) = san.runtime()? else {
        return Ok(());
    };
    cmd.env("LD_PRELOAD", rt);
    if san == Sanitizer::Thread {
        cmd.env("CUDA_EMU_FILL", "nan").env("CUDA_EMU_BLOCK_ORDER", "y-first");
    }
    // the Rust side is not instrumented: its allocations are not ours to judge, and the
    // interceptors (memcpy, ...) are judged only where the kernels call them, since the
    // Rust side synchronises through atomics TSan does not see
    cmd.env("ASAN_OPTIONS", "detect_leaks=0:halt_on_error=1:abort_on_error=0")
        .env("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
        .env(
            "TSAN_OPTIONS",
            "halt_on_error=0:report_signal_unsafe=0:ignore_noninstrumented_modules=1",
        );
    Ok(())
}

/// The first sanitizer report in a process's `stderr`, from its banner on, if any.
pub fn sanitizer_report(stderr: &str) -> Option<String> {
    const BANNERS: [&str; 4] = [
        "ERROR: AddressSanitizer",
        "WARNING: ThreadSanitizer",
        "runtime error:",
        "ERROR: LeakSanitizer",
    ];
    let at = BANNERS.iter().filter_map(|b| stderr.find(b)).min()?;
    let start = stderr[..at].rfind('\n').map_or(0, |i| i + 1);
    Some(stderr[start..].chars().take(6000).collect())
}

/// `build` for one instrumentation; each has its own folder.
pub fn build_with(san: Sanitizer) -> Result<PathBuf, String> {
    type Built = std::sync::OnceLock<Result<PathBuf, String>>;
    static BUILT: [Built; 4] = [Built::new(), Built::new(), Built::new(), Built::new()];
    BUILT[san as usize].get_or_init(|| build_now(san)).clone()
}

fn build_now(san: Sanitizer) -> Result<PathBuf, String> {
    if !cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        // runtime.cpp switches fiber stacks with x86-64 System V assembly
        return Err("the CUDA emulator (tests/cuda_emu) is written for x86-64 Linux".into());
    }
    let repo = super::repo();
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(san.folder());
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let emu = repo.join("tests/cuda_emu");
    let sources: Vec<PathBuf> = std::fs::read_dir(repo.join("kernels"))
        .map_err(|e| format!("kernels/: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let mut kernels: Vec<PathBuf> = sources
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .cloned()
        .collect();
    kernels.sort();
    // kernels with planted bugs, for the sanitizer builds' own test
    kernels.push(emu.join("planted.cu"));
    let mut inputs: Vec<PathBuf> = kernels.clone();
    // the shared headers (common.cuh, mma.cuh, ...)
    inputs.extend(
        sources
            .iter()
            .filter(|p| p.extension().is_some_and(|x| x == "cuh"))
            .cloned(),
    );
    inputs.extend(
        [
            "cuda_emu.h",
            "mma_model.h",
            "runtime.cpp",
            "cublas.cpp",
            "nvtx.cpp",
            "include/cuda_bf16.h",
            "include/cuda_fp16.h",
        ]
        .iter()
        .map(|f| emu.join(f)),
    );
    // this file: the flags
    inputs.push(repo.join("tests/common/cuda_emu.rs"));
    let cublaslt = out.join("libcublasLt.so");
    let (cuda, cublas, nvtx) = (
        out.join("libcuda.so"),
        out.join("libcublas.so"),
        out.join("libnvToolsExt.so"),
    );
    let newest = inputs.iter().filter_map(|p| mtime(p)).max();
    let oldest_out = [&cuda, &cublas, &cublaslt, &nvtx]
        .iter()
        .map(|p| mtime(p))
        .min()
        .flatten();
    if let (Some(i), Some(o)) = (newest, oldest_out) {
        if o > i {
            return Ok(out);
        }
    }
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    // What each kind of file is built with: `Kernel` the kernels/*.cu translation units,
    // `Runtime` runtime.cpp (and the final link of libcuda.so), `Blas` cublas.cpp / nvtx.cpp.
    #[derive(Clone, Copy, PartialEq)]
    enum Part {
        Kernel,
        Runtime,
        Blas,
    }
    let base = |cmd: &mut Command, part: Part| {
        match (san, part) {
            (Sanitizer::None, _) | (Sanitizer::Fma, Part::Runtime | Part::Blas) => {}
            (Sanitizer::Fma, Part::Kernel) => {
                cmd.args(["-mfma", "-ffp-contract=fast"]);
            }
            (Sanitizer::Address, _) => {
                cmd.args([
                    "-fsanitize=address,undefined",
                    "-fno-sanitize=vptr",
                    "-fno-omit-frame-pointer",
                    "-g",
                    "-DEMU_ASAN=1",
                ]);
            }
            // Only the kernels are instrumented: the runtime's own scheduler state is
            // shared by every fiber by design, and it tells TSan what orders what.
            (Sanitizer::Thread, Part::Kernel) => {
                cmd.args(["-fsanitize=thread", "-g", "-DEMU_TSAN_KERNELS=1"]);
            }
            (Sanitizer::Thread, Part::Runtime) => {
                cmd.args(["-DEMU_TSAN=1", "-g"]);
            }
            (Sanitizer::Thread, Part::Blas) => {}
        }
        cmd.arg(format!("-DEMU_SLOTS={}", san.slots())).args([
            "-std=c++20",
            "-O2",
            "-fPIC",
            "-pthread",
            "-w",
            "-fno-fast-math",
        ]);
        if !(san == Sanitizer::Fma && part == Part::Kernel) {
            cmd.arg("-ffp-contract=off");
        }
        cmd.arg("-I")
            .arg(emu.join("include"))
            .arg("-I")
            .arg(repo.join("kernels"));
    };
    // Each kernel file as its own translation unit: the extern __shared__ arrays become the
    // launch's dynamic shared memory, and every entry point is registered by name. Its code
    // (with the headers it includes) sits in an anonymous namespace, so the statics of its
    // inline helpers (common.cuh's `__shared__` flags) are its own, and it is compiled once
    // per slot (-DEMU_SLOT): each copy of a kernel has its own static shared memory.
    let slots = san.slots();
    let mut jobs: Vec<(String, Command)> = Vec::new();
    let mut objects: Vec<Vec<PathBuf>> = vec![Vec::new(); slots];
    for k in &kernels {
        let stem = k.file_stem().unwrap().to_string_lossy().to_string();
        let src = std::fs::read_to_string(k).map_err(|e| format!("{}: {e}", k.display()))?;
        let body = src
            .replace(
                "extern __shared__ float smem[];",
                "float* smem = (float*)emu_dyn_smem();",
            )
            .replace(
                "extern __shared__ __align__(16) float smem[];",
                "float* smem = (float*)emu_dyn_smem();", // malloc'd: 16-byte aligned
            )
            .replace("extern \"C\" __global__", "__global__");
        // (the emulator's CUDA headers include system headers: outside the namespace)
        let mut text = format!(
            "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\nnamespace {{\n#line 1 \"{}\"\n{body}\n",
            k.display()
        );
        for name in entry_points(&src) {
            text.push_str(&format!("EMU_REGISTER({name})\n"));
        }
        text.push_str("}  // namespace\n");
        let cc = out.join(format!("{stem}.cc"));
        std::fs::write(&cc, text).map_err(|e| format!("{}: {e}", cc.display()))?;
        for (slot, objs) in objects.iter_mut().enumerate() {
            let obj = out.join(format!("{stem}.{slot}.o"));
            let mut cmd = Command::new(&cxx);
            base(&mut cmd, Part::Kernel);
            cmd.arg(format!("-DEMU_SLOT={slot}"))
                .arg("-include")
                .arg(emu.join("cuda_emu.h"))
                .arg("-c")
                .arg(&cc)
                .arg("-o")
                .arg(&obj);
            jobs.push((k.display().to_string(), cmd));
            objs.push(obj);
        }
    }
    // Each library is linked under a temporary name and renamed into place once all four
    // exist, so no process ever opens a half-written one.
    let staged = |p: &Path| p.with_extension("so.tmp");
    for (src, lib) in [("cublas.cpp", &cublas), ("nvtx.cpp", &nvtx)] {
        let mut cmd = Command::new(&cxx);
        base(&mut cmd, Part::Blas);
        cmd.arg("-shared").arg(emu.join(src)).arg("-o").arg(staged(lib));
        jobs.push((format!("tests/cuda_emu/{src}"), cmd));
    }
    // runtime.cpp compiled on its own: in the ThreadSanitizer build the link below is
    // instrumented (the kernels call into libtsan) and the runtime must not be
    let runtime = out.join("runtime.o");
    let mut cmd = Command::new(&cxx);
    base(&mut cmd, Part::Runtime);
    cmd.arg("-c").arg(emu.join("runtime.cpp")).arg("-o").arg(&runtime);
    jobs.push(("tests/cuda_emu/runtime.cpp".into(), cmd));
    run_all(jobs)?;
    // cublas.cpp also holds the cuBLASLt calls: the same library under cuBLASLt's name
    std::fs::copy(staged(&cublas), staged(&cublaslt)).map_err(|e| format!("{}: {e}", cublaslt.display()))?;
    // Static __shared__ variables are function statics: zero-initialised, in the kernel
    // objects' .bss. This linker script gathers each slot's into one section between two
    // symbols, so the runtime can refill them before each block (CUDA_EMU_FILL=nan), as it
    // does the dynamic shared memory; otherwise a block starts on the values the block
    // before it left, or on zeros, and a kernel that reads them before writing passes. All
    // eight slots' symbols are defined (the runtime refers to them all); past `slots` the
    // ranges are empty.
    let script = out.join("static_shared.ld");
    let mut sections = String::new();
    for (slot, objs) in objects.iter().enumerate() {
        let inputs: String = objs
            .iter()
            .map(|o| format!("    */{}(.bss .bss.*)\n", o.file_name().unwrap().to_string_lossy()))
            .collect();
        sections.push_str(&format!(
            "  .emu_static_shared_{slot} (NOLOAD) : ALIGN(64)\n  {{\n    \
             __emu_static_shared_start_{slot} = .;\n{inputs}    __emu_static_shared_end_{slot} = .;\n  }}\n"
        ));
    }
    let empty: String = (slots..8)
        .map(|s| format!("  __emu_static_shared_start_{s} = .;\n  __emu_static_shared_end_{s} = .;\n"))
        .collect();
    let text = format!(
        "/* written by tests/common/cuda_emu.rs: the kernels' static __shared__ variables */\n\
         SECTIONS\n{{\n{sections}{empty}}}\nINSERT AFTER .bss;\n"
    );
    std::fs::write(&script, text).map_err(|e| format!("{}: {e}", script.display()))?;
    let mut cmd = Command::new(&cxx);
    base(&mut cmd, Part::Runtime);
    if san == Sanitizer::Thread {
        cmd.arg("-fsanitize=thread");
    }
    cmd.arg("-shared")
        .arg(format!("-Wl,-T,{}", script.display()))
        .arg(&runtime)
        .args(objects.iter().flatten())
        .arg("-o")
        .arg(staged(&cuda));
    wait("linking libcuda.so for the emulator", spawn(cmd)?)?;
    for lib in [&cublas, &cublaslt, &nvtx, &cuda] {
        std::fs::rename(staged(lib), lib).map_err(|e| format!("{}: {e}", lib.display()))?;
    }
    Ok(out)
}

/// Makes `cmd` open the emulator in `dir` (its folder first on LD_LIBRARY_PATH), with every
/// launch held to the kernels' ptxas report when this build has one ([`kernel_report`]).
pub fn on_emulator(cmd: &mut Command, dir: &Path) -> Result<(), String> {
    cmd.env("LD_LIBRARY_PATH", library_path(dir));
    if let Some(report) = kernel_report()? {
        cmd.env("CUDA_EMU_KERNEL_REPORT", report);
    }
    Ok(())
}

/// build.rs's ptxas report of this build's kernels (registers and static shared memory per
/// kernel and target), which the emulator holds every launch to (runtime.cpp, "what a GPU
/// would refuse to launch"). None when this build compiled no kernels (no NVRTC), which it
/// says; an error if kernels were required (DEEPCUT_REQUIRE_KERNELS=1, as in CI) and the
/// report is missing.
pub fn kernel_report() -> Result<Option<PathBuf>, String> {
    let path = Path::new(env!("OUT_DIR")).join("kernel-report.txt");
    if path.is_file() {
        return Ok(Some(path));
    }
    if std::env::var("DEEPCUT_REQUIRE_KERNELS").is_ok_and(|v| v == "1") {
        return Err(format!(
            "DEEPCUT_REQUIRE_KERNELS=1 but build.rs wrote no ptxas report at {}",
            path.display()
        ));
    }
    eprintln!(
        "cuda_emu: no ptxas report at {} (this build compiled no kernels), so launches are \
         not checked against the kernels' registers and shared memory",
        path.display()
    );
    Ok(None)
}

/// LD_LIBRARY_PATH with the emulator's folder `dir` first (cudarc then opens its libraries).
pub fn library_path(dir: &Path) -> String {
    match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", dir.display()),
        _ => dir.display().to_string(),
    }
}

/// `extern "C" __global__ void NAME(` entry points, as build.rs finds them.
fn entry_points(src: &str) -> Vec<String> {
    src.lines()
        .filter_map(|l| l.trim_start().strip_prefix("extern \"C\" __global__ void "))
        .filter_map(|rest| rest.split('(').next())
        .map(|n| n.trim().to_string())
        .collect()
}

fn mtime(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Runs the compiler `jobs` (what each builds, its command), two per core at most (the
/// ThreadSanitizer build has four copies of every kernel file), and fails with the first
/// failure's compiler output.
fn run_all(jobs: Vec<(String, Command)>) -> Result<(), String> {
    let width = 2 * std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut running: std::collections::VecDeque<(String, std::process::Child)> = Default::default();
    for (what, cmd) in jobs {
        if running.len() >= width {
            let (w, child) = running.pop_front().unwrap();
            wait(&w, child)?;
        }
        running.push_back((what, spawn(cmd)?));
    }
    for (w, child) in running {
        wait(&w, child)?;
    }
    Ok(())
}

fn spawn(mut cmd: Command) -> Result<std::process::Child, String> {
    cmd.stderr(std::process::Stdio::piped());
    cmd.spawn()
        .map_err(|e| format!("running {cmd:?}: {e} (a C++ compiler is needed: set CXX)"))
}

fn wait(what: &str, child: std::process::Child) -> Result<(), String> {
    let out = child.wait_with_output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "compiling {what} for the emulator failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
