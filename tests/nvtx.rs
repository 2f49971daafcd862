//! The CUDA backend's NVTX ranges (src/backend/cuda/nvtx.rs) as a profiler receives them:
//! through a real NVTX front (`libnvtx3interop.so.1`, what CUDA 12.9+ and 13 ship instead of
//! libnvToolsExt) and NVTX's injection interface, into a small tool built against NVIDIA's
//! own NVTX 3 headers (tests/nvtx_tool/tool.cpp), as nsys injects its own. Both come from the
//! PyPI wheel `nvidia-nvtx` (the one PyTorch's CUDA 13 builds install), which .ci/run
//! installs. Without the wheel the test says it did not run, and fails under
//! DEEPCUT_REQUIRE_NVTX=1 (CI). The ranges of a whole DeepCUT step, names included, are
//! checked on the CPU emulator by tests/gpu_parity.rs.
use deepcut_fast::backend::cuda::nvtx::Nvtx;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The NVTX wheel's front and include folder: the CUDA 13 layout (`nvidia/cu13`) or the
/// CUDA 12 one (`nvidia/nvtx`), in the site-packages of the `python3` on PATH.
fn nvtx_wheel() -> Option<(PathBuf, PathBuf)> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import site; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()]))",
        ])
        .output()
        .ok()?;
    let sites = String::from_utf8_lossy(&out.stdout).into_owned();
    sites.lines().find_map(|s| {
        ["nvidia/cu13", "nvidia/nvtx"].iter().find_map(|sub| {
            let root = Path::new(s).join(sub);
            let lib = root.join("lib/libnvtx3interop.so.1");
            let inc = root.join("include");
            (lib.is_file() && inc.join("nvtx3/nvToolsExt.h").is_file()).then_some((lib, inc))
        })
    })
}

/// The tool, compiled with the C++ compiler the emulator uses, into `dir`.
fn build_tool(include: &Path, dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nvtx_tool/tool.cpp");
    let so = dir.join("libdeepcut_nvtx_tool.so");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args(["-std=c++17", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-I"])
        .arg(include)
        .arg(&src)
        .arg("-o")
        .arg(&so)
        .output()
        .unwrap_or_else(|e| panic!("{cxx}: {e}"));
    assert!(
        out.status.success(),
        "building {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    so
}

/// This test binary again, as the child that opens the ranges, with `env`.
fn child(env: &[(&str, &Path)]) -> (String, String) {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "ranges_reach_an_nvtx_tool",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env("DEEPCUT_NVTX_CHILD", "1")
    .env_remove("DEEPCUT_NVTX_LIB")
    .env_remove("NVTX_INJECTION64_PATH");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("re-run this test binary");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "the child failed:\n{stdout}\n{stderr}");
    (stdout, stderr)
}

/// The NVTX front a child found (its `nvtx front: ...`, after libtest's `test ... `).
fn front(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.split_once("nvtx front: ").map(|(_, f)| f))
        .unwrap_or_else(|| panic!("no front reported:\n{stdout}"))
        .to_string()
}

#[test]
fn ranges_reach_an_nvtx_tool() {
    if std::env::var_os("DEEPCUT_NVTX_CHILD").is_some() {
        // the child: two nested ranges, closed inner first, and a name with a NUL in it
        let n = Nvtx::get().expect("an NVTX library");
        println!("nvtx front: {}", n.from);
        let outer = n.range("deepcut outer");
        let inner = n.range("layer 0 fwd");
        drop(inner);
        drop(outer);
        drop(n.range("cut\0here"));
        return;
    }
    let Some((lib, include)) = nvtx_wheel() else {
        let msg = "ranges_reach_an_nvtx_tool: NOT RUN: no nvidia-nvtx wheel (libnvtx3interop.so.1 and the \
                   nvtx3 headers) for python3; install it with: python3 -m pip install nvidia-nvtx";
        assert!(std::env::var("DEEPCUT_REQUIRE_NVTX").as_deref() != Ok("1"), "{msg}");
        eprintln!("{msg}");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tool = build_tool(&include, dir.path());
    let want = "attached\nstart 1 deepcut outer\nstart 2 layer 0 fwd\nend 2\nend 1\nstart 3 cut\nend 3\n";

    // the front named by DEEPCUT_NVTX_LIB, the tool named as nsys names it
    let log = dir.path().join("tool.log");
    let (stdout, _) = child(&[
        ("DEEPCUT_NVTX_LIB", &lib),
        ("NVTX_INJECTION64_PATH", &tool),
        ("DEEPCUT_NVTX_TOOL_LOG", &log),
    ]);
    assert_eq!(front(&stdout), lib.display().to_string());
    assert_eq!(std::fs::read_to_string(&log).expect("the tool's log"), want);

    // found on its own, where the wheel put it (the machine has no other NVTX library on the
    // loader's path, as on a CUDA 13 machine); which front is found is reported, and any
    // real one passes the calls on
    let log2 = dir.path().join("tool2.log");
    let (stdout, _) = child(&[("NVTX_INJECTION64_PATH", &tool), ("DEEPCUT_NVTX_TOOL_LOG", &log2)]);
    eprintln!("NVTX front found without DEEPCUT_NVTX_LIB: {}", front(&stdout));
    assert_eq!(std::fs::read_to_string(&log2).expect("the tool's log"), want);

    // no tool attached: the ranges are no-ops, and nothing is written
    let log3 = dir.path().join("tool3.log");
    child(&[("DEEPCUT_NVTX_LIB", &lib), ("DEEPCUT_NVTX_TOOL_LOG", &log3)]);
    assert!(!log3.exists());
}
