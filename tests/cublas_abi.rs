//! The CUDA backend calls cuBLAS and cuBLASLt through cudarc's CUDA 12.6 bindings, and on a
//! machine whose only cuBLAS is CUDA 13's (PyTorch's cu13 wheels, the lent H200) it runs
//! them against `libcublas.so.13` (src/backend/cuda/libs.rs). That holds only if every enum
//! value and struct layout the backend passes, and every function it calls, are the same in
//! the library it meets. These tests check that without a GPU:
//! - the table below names every cuBLAS constant src/backend/cuda uses (always runs);
//! - its values, as cudarc has them, equal those of the cuBLAS headers found here, read by
//!   a C++ probe (CUDA 12 or 13: the wheels' `nvidia/cu13/include` or `nvidia/cublas/include`
//!   of the python3 on PATH, a toolkit, or DEEPCUT_CUBLAS_INCLUDE);
//! - the cuBLAS libraries found where the backend looks for one (libs.rs `library_dirs`)
//!   export every function the backend calls.
//!
//! Where no headers or libraries are found they say SKIPPED and why (CI has neither: its
//! wheels are NVRTC and the runtime headers); a real GPU run checks the rest by computing.
mod common;
use common::loud;
use cudarc::cublas::sys as blas;
use cudarc::cublaslt::sys as lt;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every cuBLAS / CUDA data-type constant the backend passes, with cudarc's value for it.
fn constants() -> Vec<(&'static str, i64)> {
    use blas::cublasGemmAlgo_t::*;
    use blas::cublasMath_t::*;
    use blas::cublasOperation_t::*;
    use lt::cublasComputeType_t::*;
    use lt::cublasLtEpilogue_t::*;
    use lt::cublasLtMatmulDescAttributes_t::*;
    use lt::cublasLtMatmulPreferenceAttributes_t::*;
    use lt::cudaDataType_t::*;
    vec![
        ("CUBLASLT_EPILOGUE_BIAS", CUBLASLT_EPILOGUE_BIAS as i64),
        ("CUBLASLT_EPILOGUE_DEFAULT", CUBLASLT_EPILOGUE_DEFAULT as i64),
        (
            "CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE",
            CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE as i64,
        ),
        (
            "CUBLASLT_MATMUL_DESC_BIAS_POINTER",
            CUBLASLT_MATMUL_DESC_BIAS_POINTER as i64,
        ),
        ("CUBLASLT_MATMUL_DESC_EPILOGUE", CUBLASLT_MATMUL_DESC_EPILOGUE as i64),
        ("CUBLASLT_MATMUL_DESC_TRANSA", CUBLASLT_MATMUL_DESC_TRANSA as i64),
        ("CUBLASLT_MATMUL_DESC_TRANSB", CUBLASLT_MATMUL_DESC_TRANSB as i64),
        (
            "CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES",
            CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES as i64,
        ),
        ("CUBLAS_COMPUTE_32F", CUBLAS_COMPUTE_32F as i64),
        ("CUBLAS_COMPUTE_32F_FAST_16BF", CUBLAS_COMPUTE_32F_FAST_16BF as i64),
        ("CUBLAS_COMPUTE_32F_FAST_16F", CUBLAS_COMPUTE_32F_FAST_16F as i64),
        ("CUBLAS_DEFAULT_MATH", CUBLAS_DEFAULT_MATH as i64),
        // cudarc names CUBLAS_GEMM_DEFAULT `CUBLAS_GEMM_DFALT` (the header's alias)
        ("CUBLAS_GEMM_DEFAULT", CUBLAS_GEMM_DFALT as i64),
        ("CUBLAS_OP_N", CUBLAS_OP_N as i64),
        ("CUBLAS_OP_T", CUBLAS_OP_T as i64),
        ("CUDA_R_16BF", CUDA_R_16BF as i64),
        ("CUDA_R_16F", CUDA_R_16F as i64),
        ("CUDA_R_32F", CUDA_R_32F as i64),
        (
            "CUBLAS_STATUS_SUCCESS",
            lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS as i64,
        ),
    ]
}

/// The layout of the one struct cuBLASLt fills in for the backend (the heuristic's answer,
/// whose `algo` is handed back to cublasLtMatmul): (C++ expression, cudarc's value).
fn layouts() -> Vec<(&'static str, i64)> {
    let h: lt::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
    let base = &h as *const _ as usize;
    let off = |p: usize| (p - base) as i64;
    vec![
        (
            "sizeof(cublasLtMatmulHeuristicResult_t)",
            std::mem::size_of_val(&h) as i64,
        ),
        (
            "offsetof(cublasLtMatmulHeuristicResult_t, algo)",
            off(&h.algo as *const _ as usize),
        ),
        (
            "offsetof(cublasLtMatmulHeuristicResult_t, workspaceSize)",
            off(&h.workspaceSize as *const _ as usize),
        ),
        (
            "offsetof(cublasLtMatmulHeuristicResult_t, state)",
            off(&h.state as *const _ as usize),
        ),
        (
            "sizeof(cublasLtMatmulAlgo_t)",
            std::mem::size_of::<lt::cublasLtMatmulAlgo_t>() as i64,
        ),
    ]
}

/// The functions the backend reaches through cudarc (src/backend/cuda/gemm.rs, blaslt.rs;
/// cudarc's `CudaBlas` and `cublaslt::result` wrappers), by library.
const CUBLAS_FUNCTIONS: &[&str] = &[
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasSetMathMode",
    "cublasGemmEx",
];
const CUBLASLT_FUNCTIONS: &[&str] = &[
    "cublasLtCreate",
    "cublasLtDestroy",
    "cublasLtMatmulDescCreate",
    "cublasLtMatmulDescDestroy",
    "cublasLtMatmulDescSetAttribute",
    "cublasLtMatrixLayoutCreate",
    "cublasLtMatrixLayoutDestroy",
    "cublasLtMatmulPreferenceCreate",
    "cublasLtMatmulPreferenceDestroy",
    "cublasLtMatmulPreferenceSetAttribute",
    "cublasLtMatmulAlgoGetHeuristic",
    "cublasLtMatmul",
];

fn backend_sources() -> Vec<(PathBuf, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/backend/cuda");
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| (p.clone(), std::fs::read_to_string(&p).unwrap()))
        .collect();
    v.sort();
    v
}

/// Identifiers in `text` that start with one of `prefixes`.
fn identifiers(text: &str, prefixes: &[&str]) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| prefixes.iter().any(|p| w.starts_with(p)))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_table_names_every_cublas_constant_the_backend_uses() {
    let table: BTreeSet<&str> = constants().iter().map(|(n, _)| *n).collect();
    let mut missing = vec![];
    for (path, text) in backend_sources() {
        // constants are upper case; the C names of types and functions are not
        for name in identifiers(&text, &["CUBLAS", "CUDA_R_"]) {
            let name = if name == "CUBLAS_GEMM_DFALT" {
                "CUBLAS_GEMM_DEFAULT".to_string()
            } else {
                name
            };
            if name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                && !table.contains(name.as_str())
            {
                missing.push(format!("{name} ({})", path.display()));
            }
        }
        for f in identifiers(&text, &["cublas"]) {
            let called = text.contains(&format!("{f}(")) && f.chars().nth(6).is_some_and(|c| c.is_ascii_uppercase());
            if called && !CUBLAS_FUNCTIONS.contains(&f.as_str()) && !CUBLASLT_FUNCTIONS.contains(&f.as_str()) {
                missing.push(format!("function {f} ({})", path.display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "src/backend/cuda uses cuBLAS names tests/cublas_abi.rs does not check; add them: {missing:?}"
    );
}

/// Where CUDA libraries and headers may be: DEEPCUT_CUBLAS_INCLUDE (headers, `:`-separated),
/// a toolkit, and the nvidia wheels (and Triton's copy of the CUDA headers, which the cu13
/// wheels need for crt/host_defines.h) of the python3 on PATH.
fn python_dirs() -> Vec<PathBuf> {
    let code = "import importlib, os\n\
        for m in ('nvidia', 'triton'):\n\
        \x20   try:\n\
        \x20       print(*importlib.import_module(m).__path__, sep='\\n')\n\
        \x20   except Exception:\n\
        \x20       pass";
    let Ok(o) = Command::new("python3").args(["-c", code]).output() else {
        return vec![];
    };
    String::from_utf8_lossy(&o.stdout).lines().map(PathBuf::from).collect()
}

fn toolkits() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .collect();
    v.push("/usr/local/cuda".into());
    v
}

/// Include folders that hold cublasLt.h and what it includes, or why there are none.
fn cublas_include() -> Result<Vec<PathBuf>, String> {
    if let Some(v) = std::env::var_os("DEEPCUT_CUBLAS_INCLUDE") {
        return Ok(std::env::split_paths(&v).collect());
    }
    for t in toolkits() {
        if t.join("include/cublasLt.h").exists() {
            return Ok(vec![t.join("include")]);
        }
    }
    let py = python_dirs();
    let mut dirs = vec![];
    for p in &py {
        for sub in [
            "cu13/include",
            "cu13/include/cccl",
            "cublas/include",
            "cuda_runtime/include",
            "cuda_cccl/include",
            "backends/nvidia/include",
        ] {
            if p.join(sub).is_dir() {
                dirs.push(p.join(sub));
            }
        }
    }
    if dirs.iter().any(|d| d.join("cublasLt.h").exists()) {
        Ok(dirs)
    } else {
        Err(format!(
            "no cublasLt.h in DEEPCUT_CUBLAS_INCLUDE, a toolkit ({:?}) or the nvidia wheels of the python3 on PATH ({py:?})",
            toolkits()
        ))
    }
}

#[test]
fn cudarc_values_equal_the_cublas_headers_found_here() {
    let include = match cublas_include() {
        Ok(d) => d,
        Err(why) => {
            return loud(&format!(
                "SKIPPED: {why}; the cuBLAS enum values and layouts are not checked"
            ))
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let mut probe = String::from(
        "#include <cstddef>\n#include <cstdio>\n#include <cublasLt.h>\n#include <cublas_v2.h>\nint main() {\n",
    );
    probe += "    printf(\"version %d\\n\", (int)CUBLAS_VERSION);\n";
    let all: Vec<(&str, i64)> = constants().into_iter().chain(layouts()).collect();
    for (name, _) in &all {
        probe += &format!("    printf(\"{name} %lld\\n\", (long long)({name}));\n");
    }
    probe += "}\n";
    std::fs::write(dir.path().join("probe.cpp"), probe).unwrap();
    let mut cc = Command::new("c++");
    cc.current_dir(dir.path())
        .args(["-std=c++17", "-w", "probe.cpp", "-o", "probe"]);
    for d in &include {
        cc.arg("-I").arg(d);
    }
    let o = cc.output().expect("run c++");
    let log = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() && log.contains("No such file or directory") {
        let line = log.lines().find(|l| l.contains("No such file")).unwrap_or("");
        return loud(&format!(
            "SKIPPED: the cuBLAS headers in {include:?} are incomplete here ({line})"
        ));
    }
    assert!(
        o.status.success(),
        "the probe did not compile against {include:?}:\n{log}"
    );
    let out = Command::new(dir.path().join("probe")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let headers: std::collections::BTreeMap<&str, i64> = text
        .lines()
        .filter_map(|l| l.rsplit_once(' ').map(|(n, v)| (n, v.parse().unwrap())))
        .collect();
    let wrong: Vec<String> = all
        .iter()
        .filter(|(n, v)| headers.get(n) != Some(v))
        .map(|(n, v)| format!("{n}: cudarc {v}, headers {:?}", headers.get(n)))
        .collect();
    assert!(
        wrong.is_empty(),
        "cuBLAS {} headers in {include:?} differ from cudarc's bindings: {wrong:?}",
        headers["version"]
    );
    loud(&format!(
        "checked {} values against cuBLAS {} headers in {include:?}",
        all.len(),
        headers["version"]
    ));
}

#[test]
fn the_cublas_libraries_found_here_export_every_function_the_backend_calls() {
    // where the backend itself looks for a cuBLAS to link (src/backend/cuda/libs.rs), each
    // folder once
    let dirs: BTreeSet<PathBuf> = deepcut_fast::backend::cuda::libs::library_dirs()
        .into_iter()
        .filter_map(|d| d.canonicalize().ok())
        .collect();
    let mut checked = 0;
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        let mut names: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names
            .iter()
            .filter(|n| n.starts_with("libcublas.so.") || n.starts_with("libcublasLt.so."))
        {
            let wanted = if name.starts_with("libcublasLt") {
                CUBLASLT_FUNCTIONS
            } else {
                CUBLAS_FUNCTIONS
            };
            // SAFETY: loading runs cuBLAS's initialisers, which need no GPU (as `loaded()` does)
            let lib = match unsafe { libloading::Library::new(d.join(name)) } {
                Ok(l) => l,
                Err(e) => panic!("{} does not load: {e}", d.join(name).display()),
            };
            let absent: Vec<&&str> = wanted
                .iter()
                .filter(|f| unsafe { lib.get::<unsafe extern "C" fn()>(f.as_bytes()) }.is_err())
                .collect();
            assert!(absent.is_empty(), "{} lacks {absent:?}", d.join(name).display());
            loud(&format!(
                "{}: all {} functions present",
                d.join(name).display(),
                wanted.len()
            ));
            checked += 1;
        }
    }
    if checked == 0 {
        loud("SKIPPED: no libcublas.so.N / libcublasLt.so.N where the backend looks (libs.rs library_dirs)");
    }
}
