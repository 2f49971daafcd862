//! The CLI with `--device cuda`: a short DeepCUT `run` on the CUDA backend against the
//! same run on the CPU backend (same seed; SPEC section 7: F1 within 1 point), and `bench
//! --device cuda`. On a machine with a GPU they run on it; without one, on the CPU
//! emulator of the CUDA driver (tests/cuda_emu), which runs the CUDA backend's launchers
//! and kernels for real but says nothing about GPU speed.
mod common;
use common::fixture;
use common::loud;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The library folder to put first on LD_LIBRARY_PATH (the emulator), or None on a GPU.
fn device_libs() -> Option<PathBuf> {
    if let Ok(d) = deepcut_fast::backend::cuda::availability() {
        eprintln!("gpu_cli: on the real device ({d})");
        return None;
    }
    let dir = common::cuda_emu::build().unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "gpu_cli: no GPU; on the CPU emulator of the CUDA driver ({})",
        dir.display()
    );
    Some(dir)
}

fn cli(libs: &Option<PathBuf>) -> Command {
    let mut c = fixture::bin();
    if let Some(dir) = libs {
        common::cuda_emu::on_emulator(&mut c, dir).unwrap_or_else(|e| panic!("{e}"));
    }
    c
}

fn run(libs: &Option<PathBuf>, model: &Path, data: &Path, out: &Path, device: &str, precision: &str) -> Value {
    let args = fixture::run_args_on(device, model, data, out, 4, &["--seed", "3", "--precision", precision]);
    let o = cli(libs).args(&args).output().expect("run deepcut-fast");
    assert!(
        o.status.success(),
        "run --device {device} --precision {precision} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json")).expect("report JSON")
}

/// A 4-step DeepCUT run with dropout on, of a small fine-tuned RoBERTa on a 48-sentence
/// WNUT17 slice, on CUDA and on the CPU, fp32, bf16 and fp16: every split's F1 within SPEC
/// section 7's 1 point, each step's loss within 1e-4 (fp32) / 1e-2 (bf16, fp16), and the
/// report names the backend it ran on.
#[test]
fn short_run_on_cuda_matches_the_cpu() {
    let libs = device_libs();
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture::build(tmp.path());
    // a small RoBERTa fine-tuned on WNUT17 (tests/golden), so the F1s compared are not ~0
    let model = common::repo().join("tests/golden/roberta-wnut17");
    for precision in ["fp32", "bf16", "fp16"] {
        let g = run(
            &libs,
            &model,
            &fx.data,
            &tmp.path().join(format!("gpu-{precision}")),
            "cuda",
            precision,
        );
        let c = run(
            &libs,
            &model,
            &fx.data,
            &tmp.path().join(format!("cpu-{precision}")),
            "cpu",
            precision,
        );
        let backend = g["config"]["backend"].as_str().unwrap_or_default();
        assert!(backend.starts_with("cuda"), "{precision}: report backend `{backend}`");
        assert!(c["config"]["backend"].as_str().unwrap_or_default().starts_with("cpu"));
        for split in ["forget", "retain", "dev", "test"] {
            let (a, b) = (g["metrics"][split]["f1"].as_f64(), c["metrics"][split]["f1"].as_f64());
            let (a, b) = (a.expect("GPU f1"), b.expect("CPU f1"));
            eprintln!("{precision} {split} F1: cuda {a:.4} cpu {b:.4}");
            assert!(
                (a - b).abs() * 100.0 <= 1.0,
                "{precision} {split} F1 cuda {a} cpu {b}: more than 1 point apart"
            );
        }
        let steps = |r: &Value| -> Vec<f64> {
            r["history"]["steps"]
                .as_array()
                .expect("history.steps")
                .iter()
                .map(|s| s["total"].as_f64().unwrap())
                .collect()
        };
        let (lg, lc) = (steps(&g), steps(&c));
        assert!(
            !lg.is_empty() && lg.len() == lc.len(),
            "{precision}: step counts {} and {}",
            lg.len(),
            lc.len()
        );
        let tol = if precision == "fp32" { 1e-4 } else { 1e-2 };
        for (i, (a, b)) in lg.iter().zip(&lc).enumerate() {
            assert!(
                (a - b).abs() <= tol * b.abs().max(1e-3),
                "{precision} step {i}: loss cuda {a} cpu {b}"
            );
        }
    }
}

/// `bench --device cuda` reports the CUDA backend, its device memory, and in bf16 an MFU
/// against the bf16 GEMM rate it measured.
#[test]
fn bench_on_cuda_reports_device_numbers() {
    let libs = device_libs();
    let o = cli(&libs)
        .arg("bench")
        .args(common::tiny_bench_args("cuda", "bf16", 1))
        .output()
        .expect("run deepcut-fast");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(j["backend"].as_str().unwrap().contains("cuda"), "{}", j["backend"]);
    assert_eq!(j["precision"], "bf16");
    assert!(
        j["device_memory_bytes"].as_f64().is_some_and(|m| m > 0.0),
        "{}",
        j["device_memory_bytes"]
    );
    assert_eq!(
        j["mfu_reference"]["dtype"], "bf16",
        "bf16 on CUDA refers to the bf16 GEMM rate"
    );
    for k in ["ce", "contrast", "total"] {
        assert!(j["losses"]["last"][k].as_f64().is_some_and(f64::is_finite), "loss {k}");
    }
    // the JSON says which paths ran: bf16 attention on tensor cores, InfoNCE's 16-bit
    // shared-memory kernels (the hidden size fits them on every card), the linear layers'
    // bias in cuBLASLt's epilogue and every other GEMM on cuBLASLt too (every shape, on the
    // emulator; a real cuBLASLt may decline some, and the JSON then says so)
    let attention = j["paths"]["attention"].as_str().unwrap_or_default();
    assert!(attention.contains("tensor cores"), "{}", j["paths"]);
    let infonce = j["paths"]["infonce"].as_str().unwrap_or_default();
    assert!(
        infonce.contains("tensor cores") && infonce.contains("shared memory"),
        "{}",
        j["paths"]
    );
    let gemm_bias = j["paths"]["gemm_bias"].as_str().unwrap_or_default();
    assert!(gemm_bias.starts_with("cuBLASLt"), "{}", j["paths"]);
    let gemm = j["paths"]["gemm"].as_str().unwrap_or_default();
    assert!(gemm.starts_with("cuBLASLt"), "{}", j["paths"]);
    // the NVTX library the ranges went through: on the emulator its stand-in, found by name
    // on the loader's path (a real machine's is reported as found, or null without one)
    if libs.is_some() {
        assert_eq!(j["paths"]["nvtx"], "libnvToolsExt.so", "{}", j["paths"]);
    } else {
        eprintln!("NVTX library: {}", j["paths"]["nvtx"]);
    }
    // what a step enqueues: per layer 6 GEMMs forward and 12 backward, and the
    // classifier's 1 + 2; the kernel launches, 12 per layer and 30 others in a bf16 step
    // (the emulator's count; a real card could pick another InfoNCE path). A change that
    // adds launches to the step has to say so here: InfoNCE's rounding of z (forward and
    // backward), its list of class representatives and scatter_add_rows' row counts took
    // 26 to 30.
    let layers = j["layers"].as_u64().unwrap();
    let calls = &j["device_calls_per_step"];
    assert_eq!(calls["gemms"].as_f64(), Some((18 * layers + 3) as f64), "{calls}");
    let launches = calls["kernel_launches"].as_f64().unwrap_or(0.0);
    assert!(launches > 0.0 && launches.fract() == 0.0, "{calls}");
    if libs.is_some() {
        assert_eq!(launches, (12 * layers + 30) as f64, "{calls}");
    }
}

/// `bench --op-times`: every op and phase range of the timed steps is timed with device
/// events and reported per step (on the emulator the events read 0 ms, so this checks what
/// was timed and how often, not the times); without the flag `op_times` is null, and on
/// the CPU a string saying it was not timed.
#[test]
fn bench_op_times_name_every_op_and_phase() {
    let libs = device_libs();
    let bench = |device: &str, extra: &[&str]| -> Value {
        let o = cli(&libs)
            .arg("bench")
            .args(common::tiny_bench_args(device, "bf16", 1))
            .args(extra)
            .output()
            .expect("run deepcut-fast");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        if !extra.is_empty() && device == "cuda" {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains("op times per step"), "{err}");
        }
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let j = bench("cuda", &["--op-times"]);
    let layers = j["layers"].as_u64().unwrap() as f64;
    let t = &j["op_times"];
    let calls = |kind: &str, name: &str| -> Option<f64> {
        t[kind]
            .as_array()
            .unwrap_or_else(|| panic!("op_times.{kind}: {t}"))
            .iter()
            .find(|o| o["name"] == name)
            .map(|o| {
                assert!(o["ms_per_step"].as_f64().is_some_and(|m| m >= 0.0), "{o}");
                o["calls_per_step"].as_f64().unwrap()
            })
    };
    // one forward and one backward per layer and step, whatever the steps' count (2)
    for op in ["attention_fwd", "attention_bwd", "bias_gelu_fwd", "bias_gelu_bwd"] {
        assert_eq!(calls("ops", op), Some(layers), "{op}: {t}");
    }
    // two residual LayerNorms per layer, and the embeddings'
    assert_eq!(calls("ops", "layernorm_fwd"), Some(2.0 * layers + 1.0), "{t}");
    for op in [
        "infonce_fwd",
        "infonce_bwd",
        "embedding_fwd",
        "embedding_bwd",
        "clip_adamw_all",
    ] {
        assert_eq!(calls("ops", op), Some(1.0), "{op}: {t}");
    }
    for li in 0..layers as usize {
        for dir in ["fwd", "bwd"] {
            assert_eq!(calls("phases", &format!("layer {li} {dir}")), Some(1.0), "{t}");
        }
    }
    assert_eq!(calls("phases", "deepcut step"), Some(1.0), "{t}");
    // the optimiser's update runs inside clip_adamw_all's range: marked, so sums skip it
    let nested = |name: &str| {
        t["ops"].as_array().unwrap().iter().find(|o| o["name"] == name).unwrap()["inside_another_op"].clone()
    };
    assert_eq!(nested("adamw_all"), true, "{t}");
    assert_eq!(nested("attention_fwd"), false, "{t}");
    assert!(bench("cuda", &[])["op_times"].is_null());
    let cpu = bench("cpu", &["--op-times"]);
    assert!(
        cpu["op_times"].as_str().is_some_and(|s| s.starts_with("not timed")),
        "{}",
        cpu["op_times"]
    );
}

/// Every launch of a step is one a GPU accepts at the largest shapes the issues measure and
/// beyond (roberta-base at bf 32 / br 128 / seq 128: 24,576 tokens, InfoNCE over 8,192 rows;
/// and at seq 512, RoBERTa's longest, 24,576 tokens in 48 sequences), in every precision:
/// grid limits (65,535 blocks in y and z), block sizes, and each kernel's registers and
/// shared memory against ptxas' report (tests/cuda_emu, "what a GPU would refuse to
/// launch"). The emulator's no-work mode checks and counts every launch and GEMM without
/// running it (and leaves device memory untouched), so these shapes take seconds and
/// little memory here; the numbers it returns are meaningless and not looked at. Emulator
/// only: on a GPU, scripts/gpu-check.sh runs these shapes for real.
#[test]
fn bench_launches_are_valid_at_the_largest_shapes() {
    let Some(emu) = emulator_only("bench_launches_are_valid_at_the_largest_shapes") else {
        return;
    };
    let report = common::cuda_emu::kernel_report().unwrap_or_else(|e| panic!("{e}"));
    for (bf, br, seq) in [("32", "128", "128"), ("8", "32", "512")] {
        for precision in ["bf16", "fp16", "fp32"] {
            let mut c = cli(&Some(emu.clone()));
            c.args([
                "bench",
                "--device",
                "cuda",
                "--preset",
                "roberta-base",
                "--precision",
                precision,
            ])
            .args([
                "--bf",
                bf,
                "--br",
                br,
                "--seq-len",
                seq,
                "--steps",
                "1",
                "--warmup",
                "1",
            ])
            .env("CUDA_EMU_NO_WORK", "1")
            .env("DEEPCUT_SKIP_SELF_CHECK", "1");
            let o = c.output().expect("run deepcut-fast");
            let stderr = String::from_utf8_lossy(&o.stderr);
            let case = format!("roberta-base {bf}/{br}/{seq} {precision}");
            assert!(
                o.status.success() && !stderr.contains("would refuse") && !stderr.contains("invalid launch"),
                "{case}: a launch a GPU would refuse:\n{stderr}"
            );
            assert!(
                stderr.contains("cuda_emu counters: launches"),
                "{case}: not run in the emulator's no-work mode:\n{stderr}"
            );
            if report.is_some() {
                assert!(
                    stderr.contains("launches held to the registers and shared memory"),
                    "{case}: the launches were not checked against ptxas' report:\n{stderr}"
                );
            }
        }
    }
}

/// The CLI's GPU work on the AddressSanitizer build of the emulator (tests/cuda_emu,
/// "Sanitizer builds"; every device buffer at exactly its size), so every launch and GEMM
/// of a whole command, with its real grid, stays inside its buffers:
/// - a bf16 `run --device cuda` of the small RoBERTa on the WNUT17 slice (evaluation
///   windows of every length, the pipelined DeepCUT steps, the membership-inference
///   features, the report);
/// - a bf16 `bench` step at the MiniLM shapes (hidden 384, 12 heads of 32, FFN 1536,
///   vocabulary 30522; one forget and two retain sentences of 45 tokens) with one encoder
///   layer, not six: the other five repeat the first's launches and shapes, and took 70%
///   of the ThreadSanitizer child's four minutes (235 s for six layers, 97 s for one).
///
/// And the same `bench` step, with a vocabulary of 2048, on the ThreadSanitizer build
/// (blocks y-first, memory NaN-filled:
/// common::cuda_emu::sanitized): at these shapes the column reductions have up to 6 column
/// blocks of up to 3 row chunks (64 rows each), whose last block must see every chunk's
/// partial (barrier and fence before the ticket), and no two nearby blocks may write the
/// same memory.
///
/// The parity tests' memcheck run (tests/gpu_parity.rs) covers every op at small awkward
/// shapes; these are the paths and shapes the engine ships. On a GPU, compute-sanitizer's
/// job (`scripts/gpu-check.sh --sanitize`).
#[test]
fn cli_on_cuda_under_memcheck_and_racecheck() {
    if let Ok(d) = deepcut_fast::backend::cuda::availability() {
        eprintln!(
            "cli_on_cuda_under_memcheck_and_racecheck: not run, a real device is present ({d}); \
             scripts/gpu-check.sh --sanitize runs compute-sanitizer there"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture::build(tmp.path());
    let model = common::repo().join("tests/golden/roberta-wnut17");
    let out = tmp.path().join("asan-run");
    let run = fixture::run_args_on(
        "cuda",
        &model,
        &fx.data,
        &out,
        3,
        &["--seed", "3", "--precision", "bf16"],
    );
    // the preset minilm-l6 with one layer
    let mut config = deepcut_fast::model::ModelConfig::preset("minilm-l6").unwrap();
    config.num_hidden_layers = 1;
    let one_layer = tmp.path().join("minilm-1-layer.json");
    std::fs::write(&one_layer, config.to_json().to_string()).unwrap();
    // and for ThreadSanitizer with a vocabulary of 2048: the whole-parameter kernels
    // (AdamW, the gradient norm's sums of squares, zeroing, conversions) are the same
    // grid-stride loops at any length, and over the 30522 x 384 word embeddings they took
    // 134 s of the child's 160 s in kernels (CUDA_EMU_PROFILE=1)
    const TSAN_VOCAB: usize = 2048;
    config.vocab_size = TSAN_VOCAB;
    let small_vocab = tmp.path().join(format!("minilm-1-layer-vocab-{TSAN_VOCAB}.json"));
    std::fs::write(&small_vocab, config.to_json().to_string()).unwrap();
    let bench_of = |config: &Path| -> Vec<String> {
        [
            "bench",
            "--device",
            "cuda",
            "--config",
            config.to_str().unwrap(),
            "--precision",
            "bf16",
            "--bf",
            "1",
            "--br",
            "2",
            "--seq-len",
            "45",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--matmul-size",
            "64",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    // side by side: each is one process on one core
    use common::cuda_emu::Sanitizer;
    let children: Vec<_> = [
        ("run", run, Sanitizer::Address),
        ("bench", bench_of(&one_layer), Sanitizer::Address),
        ("bench", bench_of(&small_vocab), Sanitizer::Thread),
    ]
    .into_iter()
    .map(|(what, args, san)| {
        let mut c = fixture::bin();
        c.args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        common::cuda_emu::sanitized(&mut c, san).unwrap_or_else(|e| panic!("{e}"));
        (what, san, c.spawn().expect("run deepcut-fast"))
    })
    .collect();
    for (what, san, child) in children {
        let o = child.wait_with_output().expect("deepcut-fast's output");
        let stderr = String::from_utf8_lossy(&o.stderr);
        if let Some(report) = common::cuda_emu::sanitizer_report(&stderr) {
            panic!("{san:?}Sanitizer on the emulator, bf16 `{what}`:\n{report}");
        }
        assert!(
            o.status.success(),
            "bf16 `{what}` on the {san:?}Sanitizer emulator:\n{stderr}"
        );
        if what == "run" {
            let j: Value =
                serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json")).unwrap();
            let backend = j["config"]["backend"].as_str().unwrap_or_default();
            assert!(backend.starts_with("cuda"), "run backend `{backend}`");
            for split in ["forget", "retain", "dev", "test"] {
                assert!(j["metrics"][split]["f1"].as_f64().is_some(), "{split} F1");
            }
        } else {
            let j: Value = serde_json::from_slice(&o.stdout).unwrap();
            assert!(j["backend"].as_str().unwrap().contains("cuda"), "{}", j["backend"]);
            assert_eq!(j["hidden"].as_u64(), Some(384), "{j}");
            let vocab = if san == Sanitizer::Thread { TSAN_VOCAB } else { 30522 };
            assert_eq!(j["vocab"].as_u64(), Some(vocab as u64), "{j}");
            assert_eq!(j["layers"].as_u64(), Some(1), "{j}");
            for k in ["ce", "contrast", "total"] {
                assert!(j["losses"]["last"][k].as_f64().is_some_and(f64::is_finite), "loss {k}");
            }
        }
        eprintln!("{san:?}Sanitizer on the emulator: bf16 `{what}` on cuda, no report");
    }
}

/// The device self-check (src/cli/selfcheck.rs): `--device auto` runs a whole DeepCUT step
/// on the GPU and the CPU and takes the GPU when they agree (the bench then says it was
/// verified); with a disagreement injected (DEEPCUT_SELF_CHECK_FAULT=1) auto falls back
/// to the CPU saying why, and `--device cuda` refuses with the same reason, unless
/// DEEPCUT_SKIP_SELF_CHECK=1 (and then the JSON says the results are unverified).
#[test]
fn the_self_check_decides_whether_the_gpu_is_used() {
    let libs = device_libs();
    let bench = |device: &str, env: &[(&str, &str)]| {
        let mut c = cli(&libs);
        c.arg("bench").args(common::tiny_bench_args(device, "bf16", 1));
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().expect("run deepcut-fast");
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        let j: Option<Value> = serde_json::from_slice(&o.stdout).ok();
        (o.status.success(), err, j)
    };
    let (ok, err, j) = bench("auto", &[]);
    assert!(ok, "{err}");
    assert!(err.contains("self-check passed"), "{err}");
    let j = j.expect("bench JSON");
    assert!(
        j["backend"].as_str().unwrap().starts_with("cuda"),
        "auto took the GPU: {}",
        j["backend"]
    );
    assert_eq!(j["verified"], true);
    assert!(
        j["self_check"].as_str().is_some_and(|s| s.contains("passed")),
        "{}",
        j["self_check"]
    );

    let fault = [("DEEPCUT_SELF_CHECK_FAULT", "1")];
    let (ok, err, j) = bench("auto", &fault);
    assert!(ok, "{err}");
    assert!(
        err.contains("self-check failed") && err.contains("differs from the CPU reference"),
        "{err}"
    );
    assert!(
        j.expect("bench JSON")["backend"].as_str().unwrap().starts_with("cpu"),
        "auto fell back"
    );

    let (ok, err, _) = bench("cuda", &fault);
    assert!(!ok, "--device cuda ran despite a failed self-check");
    assert!(
        err.contains("self-check failed") && err.contains("DEEPCUT_SKIP_SELF_CHECK"),
        "{err}"
    );

    let (ok, err, j) = bench(
        "cuda",
        &[("DEEPCUT_SELF_CHECK_FAULT", "1"), ("DEEPCUT_SKIP_SELF_CHECK", "1")],
    );
    assert!(ok, "{err}");
    let j = j.expect("bench JSON");
    assert_eq!(j["verified"], false);
    assert!(
        j["note"].as_str().is_some_and(|s| s.contains("unverified")),
        "{}",
        j["note"]
    );
}

/// The emulator's libraries linked into `dir` under the given names: (name, emulator file).
fn link_emulator(emu: &Path, dir: &Path, names: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, from) in names {
        std::os::unix::fs::symlink(emu.join(from), dir.join(name)).unwrap();
    }
}

/// The driver and NVTX of the emulator, without any cuBLAS.
const DRIVER_ONLY: [(&str, &str); 3] = [
    ("libcuda.so", "libcuda.so"),
    ("libcuda.so.1", "libcuda.so"),
    ("libnvToolsExt.so", "libnvToolsExt.so"),
];

/// `bench --device cuda` with `env`, the shim cache in `cache`: (succeeded, stderr, JSON).
fn bench_with_libs(env: &[(&str, &Path)], driver: &str, cache: &Path) -> (bool, String, Option<Value>) {
    let mut args = vec!["bench".to_string()];
    args.extend(common::tiny_bench_args("cuda", "bf16", 1));
    cli_with_libs(&args, env, driver, cache)
}

/// The CLI with `args` and `env`, under a CUDA `driver` version of the emulator, the shim
/// cache in `cache` and no shim or venv inherited: (succeeded, stderr, JSON on stdout).
fn cli_with_libs<S: AsRef<std::ffi::OsStr>>(
    args: &[S], env: &[(&str, &Path)], driver: &str, cache: &Path,
) -> (bool, String, Option<Value>) {
    let mut c = fixture::bin();
    c.args(args)
        .env("XDG_CACHE_HOME", cache)
        .env("CUDA_EMU_DRIVER_VERSION", driver)
        .env_remove("DEEPCUT_LIBSHIM")
        .env_remove("VIRTUAL_ENV");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run deepcut-fast");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    (o.status.success(), err, serde_json::from_slice(&o.stdout).ok())
}

/// The shim folder the CLI made under `cache`.
fn shim_dir(cache: &Path) -> PathBuf {
    std::fs::read_dir(cache.join("deepcut-fast"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

/// Where the two links of the shim folder the CLI made under `cache` point.
fn shim_links(cache: &Path) -> (PathBuf, PathBuf) {
    let shim = shim_dir(cache);
    (
        std::fs::read_link(shim.join("libcublas.so")).unwrap(),
        std::fs::read_link(shim.join("libcublasLt.so")).unwrap(),
    )
}

/// The emulator's folder ([`device_libs`]), or None (the test is skipped, and says so) on a
/// machine with a real driver.
fn emulator_only(test: &str) -> Option<PathBuf> {
    let emu = device_libs();
    if emu.is_none() {
        loud(&format!(
            "SKIPPED: {test} renames the CPU emulator's libraries; this machine has a real driver"
        ));
    }
    emu
}

/// CUDA 13's cuBLAS under its own names only (`libcublas.so.13`, `libcublasLt.so.13`, as
/// PyTorch's cu13 wheels ship it), under a CUDA 13 driver: the CLI, whose bindings look for
/// the CUDA 12 names, links them under those names in a folder of this user's and
/// re-executes itself with it on LD_LIBRARY_PATH (src/backend/cuda/libs.rs), and `--device
/// cuda` runs. Under a CUDA 12 driver, which cannot run cuBLAS 13, it does not link them and
/// says what is missing. Played with the emulator's libraries renamed, so it runs only there.
#[test]
fn cuda13_cublas_is_found_under_its_own_name() {
    let Some(emu) = emulator_only("cuda13_cublas_is_found_under_its_own_name") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("lib");
    link_emulator(&emu, &lib, &DRIVER_ONLY);
    link_emulator(
        &emu,
        &lib,
        &[
            ("libcublas.so.13", "libcublas.so"),
            ("libcublasLt.so.13", "libcublasLt.so"),
        ],
    );
    let cache = tmp.path().join("cache");
    let (ok, err, j) = bench_with_libs(&[("LD_LIBRARY_PATH", &lib)], "13000", &cache);
    assert!(ok, "{err}");
    assert_eq!(
        err.matches("linked under the CUDA 12 names").count(),
        1,
        "re-executed once: {err}"
    );
    let j = j.expect("bench JSON");
    assert!(j["backend"].as_str().unwrap().starts_with("cuda"), "{}", j["backend"]);
    assert_eq!(
        shim_links(&cache),
        (lib.join("libcublas.so.13"), lib.join("libcublasLt.so.13"))
    );
    // `devices` reports the link folder (scripts/gpu-check.sh puts it on the test binaries'
    // LD_LIBRARY_PATH) and the files behind it
    let (ok, err, d) = cli_with_libs(
        &["devices", "--no-self-check", "--json", "-"],
        &[("LD_LIBRARY_PATH", &lib)],
        "13000",
        &cache,
    );
    assert!(ok, "{err}");
    let d = d.expect("devices JSON");
    assert_eq!(
        d["cuda"]["cublas"]["shim"],
        shim_dir(&cache).display().to_string(),
        "{d}"
    );
    assert_eq!(d["cuda"]["driver"]["cuda_version"], "13.0");
    for (key, file) in [("library", "libcublas.so"), ("lt", "libcublasLt.so")] {
        assert_eq!(
            d["cuda"]["cublas"][key],
            emu.join(file).canonicalize().unwrap().display().to_string(),
            "{key}: {d}"
        );
    }

    let cache12 = tmp.path().join("cache12");
    let (ok, err, _) = bench_with_libs(&[("LD_LIBRARY_PATH", &lib)], "12090", &cache12);
    assert!(!ok, "cuBLAS 13 under a CUDA 12 driver: {err}");
    assert!(!err.contains("linked under"), "{err}");
    assert!(err.contains("libcublas.so not found"), "{err}");
}

/// cuBLAS 12 in a Python environment only (`VIRTUAL_ENV/lib/python3.X/site-packages/nvidia/
/// cublas/lib`, as PyTorch's cu12 wheels install it without a toolkit), off the loader's
/// path: the CLI finds it there, links it, and `--device cuda` runs.
#[test]
fn cuda12_wheel_cublas_is_found_off_the_loader_path() {
    let Some(emu) = emulator_only("cuda12_wheel_cublas_is_found_off_the_loader_path") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("lib");
    link_emulator(&emu, &lib, &DRIVER_ONLY);
    let venv = tmp.path().join("venv");
    let wheel = venv.join("lib/python3.12/site-packages/nvidia/cublas/lib");
    link_emulator(
        &emu,
        &wheel,
        &[
            ("libcublas.so.12", "libcublas.so"),
            ("libcublasLt.so.12", "libcublasLt.so"),
        ],
    );
    let cache = tmp.path().join("cache");
    let (ok, err, j) = bench_with_libs(&[("LD_LIBRARY_PATH", &lib), ("VIRTUAL_ENV", &venv)], "12090", &cache);
    assert!(ok, "{err}");
    assert!(err.contains("linked under the CUDA 12 names"), "{err}");
    assert!(j.expect("bench JSON")["backend"].as_str().unwrap().starts_with("cuda"));
    assert_eq!(
        shim_links(&cache),
        (wheel.join("libcublas.so.12"), wheel.join("libcublasLt.so.12"))
    );
}

/// `devices` on a GPU (or the emulator): the driver, cuBLAS and cuBLASLt files opened, GPU 0
/// with the kernel image it loaded and a passed self-check, and `auto` picking it; with a
/// disagreement injected, the self-check fails, says what differed, and `auto` is the CPU,
/// as `--device auto` then decides. The table says the same to a person.
#[test]
fn devices_reports_the_gpu_and_what_auto_picks() {
    let libs = device_libs();
    let devices = |env: &[(&str, &str)], json: bool| {
        let mut c = cli(&libs);
        c.arg("devices");
        if json {
            c.args(["--json", "-"]);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().expect("run deepcut-fast");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let d: Value = serde_json::from_str(&devices(&[], true)).expect("devices JSON");
    eprintln!("{d}");
    assert_eq!(d["cuda"]["available"], true, "{d}");
    for key in ["library", "lt"] {
        let f = d["cuda"]["cublas"][key]
            .as_str()
            .unwrap_or_else(|| panic!("cublas.{key}: {d}"));
        assert!(Path::new(f).is_file(), "cublas.{key} {f}");
    }
    assert!(
        d["cuda"]["driver"]["library"]
            .as_str()
            .is_some_and(|f| Path::new(f).is_file()),
        "{d}"
    );
    assert!(d["cuda"]["driver"]["cuda_version"]
        .as_str()
        .is_some_and(|v| v.contains('.')));
    let g = &d["cuda"]["gpus"][0];
    assert_eq!(g["error"], Value::Null, "{g}");
    assert!(g["memory_pools"].is_boolean(), "{g}");
    let image = g["kernel_image"].as_str().unwrap();
    assert!(
        d["kernels"]["targets"].as_array().unwrap().iter().any(|t| t == image),
        "GPU 0 loaded {image}, not one of the built-in targets: {d}"
    );
    assert_eq!(g["self_check"]["passed"], true, "{g}");
    assert_eq!(g["self_check"]["precision"], "bf16");
    let worst = g["self_check"]["worst"].as_f64().unwrap();
    assert!(worst < g["self_check"]["tolerance"].as_f64().unwrap(), "{g}");
    assert_eq!(d["auto"]["device"], "cuda:0", "{d}");
    assert_eq!(d["auto"]["precision"], "bf16");

    let fault = [("DEEPCUT_SELF_CHECK_FAULT", "1")];
    let d: Value = serde_json::from_str(&devices(&fault, true)).expect("devices JSON");
    let g = &d["cuda"]["gpus"][0];
    assert_eq!(g["self_check"]["passed"], false, "{g}");
    assert!(
        g["self_check"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("differs from the CPU reference")),
        "{g}"
    );
    assert_eq!(d["auto"]["device"], "cpu", "{d}");
    assert!(
        d["auto"]["why"].as_str().unwrap().contains("failed the self-check"),
        "{d}"
    );

    let table = devices(&[], false);
    eprintln!("{table}");
    assert!(table.contains("self-check bf16: passed"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("--device auto") && l.contains("cuda:0")),
        "{table}"
    );
    let table = devices(&fault, false);
    assert!(table.contains("self-check bf16: FAILED"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("--device auto") && l.contains("cpu")),
        "{table}"
    );

    // A device that lists memory pools (as data-centre GPUs do, and the emulator by
    // default) whose stream-ordered allocation fails, as under a GPU proxy that lacks it:
    // the backend falls back to cuMemAlloc, says why, and the device passes its self-check
    // and is what auto picks. Asked for stream-ordered allocation there, or without pools,
    // opening fails, naming the allocator. Without page-locked host memory, host copies go
    // through pageable memory, said so, and the device passes as well. (Emulator knobs:
    // not on a real GPU.)
    if libs.is_none() {
        return;
    }
    let json = |env: &[(&str, &str)]| -> Value { serde_json::from_str(&devices(env, true)).expect("devices JSON") };
    let g0 = |d: &Value| d["cuda"]["gpus"][0].clone();
    let d = json(&[]);
    assert_eq!(
        (
            g0(&d)["memory_pools"].clone(),
            g0(&d)["allocator"].clone(),
            g0(&d)["allocator_note"].clone()
        ),
        (Value::Bool(true), Value::from("cuMemAllocAsync"), Value::Null),
        "{d}"
    );
    // each refusal falls back, says why in the JSON and the table, and the device still
    // passes its self-check and is what auto picks
    for (knob, (flag, value), (note, why), said) in [
        (
            "CUDA_EMU_ASYNC_ALLOC",
            ("allocator", Value::from("cuMemAlloc")),
            (
                "allocator_note",
                "the device lists memory pools but cuMemAllocAsync failed",
            ),
            "memory by cuMemAlloc (the device lists memory pools but cuMemAllocAsync failed",
        ),
        (
            "CUDA_EMU_HOST_ALLOC",
            ("page_locked", Value::Bool(false)),
            ("page_locked_note", "cuMemHostAlloc failed"),
            "host copies through pageable memory, each waiting for the stream: cuMemHostAlloc failed",
        ),
    ] {
        let env = [(knob, "fail")];
        let d = json(&env);
        let g = g0(&d);
        assert_eq!(
            (g["error"].clone(), g[flag].clone()),
            (Value::Null, value),
            "{knob}: {d}"
        );
        assert!(
            g[note]
                .as_str()
                .is_some_and(|n| n.contains(why) && n.contains("NOT_SUPPORTED")),
            "{knob}: {d}"
        );
        assert_eq!(g["self_check"]["passed"], true, "{knob}: {d}");
        assert_eq!(d["auto"]["device"], "cuda:0", "{knob}: {d}");
        let table = devices(&env, false);
        assert!(table.contains(said), "{knob}: {table}");
    }
    assert_eq!(json(&[])["cuda"]["gpus"][0]["page_locked"], true);
    // forced either way, and a value that is neither
    let d = json(&[("DEEPCUT_CUDA_ALLOCATOR", "plain")]);
    assert_eq!(
        (g0(&d)["allocator"].clone(), g0(&d)["allocator_note"].clone()),
        (Value::from("cuMemAlloc"), Value::from("DEEPCUT_CUDA_ALLOCATOR=plain")),
        "{d}"
    );
    for (env, refused) in [
        (
            &[
                ("CUDA_EMU_ASYNC_ALLOC", "fail"),
                ("DEEPCUT_CUDA_ALLOCATOR", "stream-ordered"),
            ][..],
            "allocating device memory with cuMemAllocAsync",
        ),
        (
            &[
                ("CUDA_EMU_MEMORY_POOLS", "0"),
                ("DEEPCUT_CUDA_ALLOCATOR", "stream-ordered"),
            ],
            "the driver lists no memory pools",
        ),
        (
            &[("DEEPCUT_CUDA_ALLOCATOR", "pools")],
            "DEEPCUT_CUDA_ALLOCATOR=pools: expected auto, plain or stream-ordered",
        ),
    ] {
        let d = json(env);
        let e = g0(&d)["error"].as_str().unwrap_or_default().to_string();
        assert!(e.contains(refused), "{env:?}: {d}");
        assert_eq!(d["auto"]["device"], "cpu", "{env:?}: {d}");
    }
    // without pools: plain allocations, the device's own choice, so no note
    let d = json(&[("CUDA_EMU_MEMORY_POOLS", "0")]);
    let g = g0(&d);
    assert_eq!(
        (
            g["error"].clone(),
            g["memory_pools"].clone(),
            g["allocator"].clone(),
            g["allocator_note"].clone()
        ),
        (Value::Null, Value::Bool(false), Value::from("cuMemAlloc"), Value::Null),
        "{d}"
    );
}

/// `devices` where the loader finds no driver: no GPU, `auto` is the CPU and says why, and
/// the kernels built in are listed all the same. Needs a machine without a driver (CI's):
/// a real driver is found whatever LD_LIBRARY_PATH says.
#[test]
fn devices_without_a_driver_picks_the_cpu() {
    if deepcut_fast::backend::cuda::availability().is_ok() {
        loud("SKIPPED: devices_without_a_driver_picks_the_cpu needs a machine without an NVIDIA driver");
        return;
    }
    let empty = tempfile::tempdir().unwrap();
    let o = fixture::bin()
        .args(["devices", "--json", "-"])
        .env("LD_LIBRARY_PATH", empty.path())
        .output()
        .expect("run deepcut-fast");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d: Value = serde_json::from_slice(&o.stdout).expect("devices JSON");
    assert_eq!(d["cuda"]["available"], false, "{d}");
    assert!(
        d["cuda"]["why_not"].as_str().unwrap().contains("libcuda.so not found"),
        "{d}"
    );
    assert_eq!(d["cuda"]["driver"]["library"], Value::Null);
    assert_eq!(d["cuda"]["gpus"], serde_json::json!([]));
    assert_eq!(d["auto"]["device"], "cpu");
    assert_eq!(d["auto"]["precision"], "fp32");
    assert!(d["auto"]["why"].as_str().unwrap().contains("no usable GPU"), "{d}");
    // the CPU side: which SIMD build and GEMM library this machine picked
    assert!(
        ["avx512", "avx2", "baseline"].contains(&d["cpu"]["simd"].as_str().unwrap_or_default()),
        "{d}"
    );
    assert!(
        ["matrixmultiply", "gemm crate"].contains(&d["cpu"]["gemm"].as_str().unwrap_or_default()),
        "{d}"
    );
    assert_eq!(
        d["kernels"]["compiled"],
        deepcut_fast::backend::cuda::images::NOT_COMPILED.is_none(),
        "{d}"
    );
    let targets = d["kernels"]["targets"].as_array().unwrap();
    assert_eq!(
        targets.is_empty(),
        deepcut_fast::backend::cuda::images::NOT_COMPILED.is_some(),
        "{d}"
    );
}
