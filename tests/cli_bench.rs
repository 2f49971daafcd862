//! `deepcut-fast bench`: a tiny run's JSON has every field, its numbers are positive and
//! agree with each other (tokens/s = tokens / median, FLOPs = the documented formula,
//! TFLOP/s and MFU derived from them), and bad options fail with a clear message.
use serde_json::Value;
use std::process::{Command, Output};

mod common;

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepcut-fast"))
        .arg("bench")
        .args(args)
        .output()
        .expect("run deepcut-fast")
}

fn tiny_config() -> String {
    common::repo()
        .join("tests/golden/tiny-bert/config.json")
        .display()
        .to_string()
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number in {v}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

#[test]
fn tiny_run_reports_consistent_numbers() {
    let (bf, br, t, labels) = (2usize, 3usize, 8usize, 5usize);
    let cfg = tiny_config();
    let out = bench(&[
        "--config",
        &cfg,
        "--bf",
        "2",
        "--br",
        "3",
        "--seq-len",
        "8",
        "--steps",
        "4",
        "--warmup",
        "1",
        "--labels",
        "5",
        "--matmul-size",
        "64",
        "--device",
        "cpu",
        "--threads",
        "2",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    assert!(stderr.contains("tokens/s"), "no human summary on stderr: {stderr}");
    let j: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");

    for key in [
        "command",
        "model",
        "model_type",
        "layers",
        "hidden",
        "heads",
        "ffn",
        "vocab",
        "labels",
        "parameters",
        "model_config",
        "bf",
        "br",
        "seq_len",
        "sequences_per_step",
        "tokens_per_step",
        "labelled_per_sequence",
        "anchors",
        "valid_anchors",
        "columns",
        "steps",
        "warmup",
        "seed",
        "device",
        "backend",
        "precision",
        "threads",
        "verified",
        "step_time_s",
        "tokens_per_s",
        "flops_per_step",
        "flops_breakdown",
        "flops_formula",
        "achieved_tflops",
        "matmul_rate",
        "matmul_tflops_start_end",
        "other_matmul_rates",
        "mfu",
        "mfu_reference",
        "skipped_steps",
        "peak_rss_bytes",
        "device_memory_bytes",
        "losses",
        "loadavg_start",
        "loadavg_end",
        "device_calls_per_step",
        "unix_time",
        "note",
    ] {
        assert!(j.get(key).is_some(), "field `{key}` missing from {j}");
    }
    assert_eq!(j["command"], "bench");
    assert_eq!(j["precision"], "fp32");
    assert_eq!(j["verified"], true);
    assert!(j["backend"].as_str().unwrap().starts_with("cpu"));
    assert_eq!(j["threads"], 2);
    assert!(j["device_memory_bytes"].is_null(), "the CPU has no device memory");
    assert!(j["device_calls_per_step"].is_null(), "the CPU enqueues no device calls");
    assert_eq!(j["model_config"]["hidden_size"], 32);

    // shapes
    let s = 2 * bf + br;
    assert_eq!(j["sequences_per_step"], s);
    assert_eq!(j["tokens_per_step"], s * t);
    assert_eq!(j["labelled_per_sequence"], t - 2);
    assert_eq!(j["anchors"], 2 * bf * (t - 2));
    assert_eq!(j["valid_anchors"], 2 * bf * (t - 2));
    assert_eq!(j["columns"], s * (t - 2));

    // timings: positive, ordered
    let st = &j["step_time_s"];
    let (min, p10, med, p90, max) = (
        num(st, "min"),
        num(st, "p10"),
        num(st, "median"),
        num(st, "p90"),
        num(st, "max"),
    );
    assert!(
        min > 0.0 && min <= p10 && p10 <= med && med <= p90 && p90 <= max,
        "{st}"
    );
    let mean = num(st, "mean");
    assert!(min <= mean && mean <= max, "{st}");
    assert!(num(st, "mad") >= 0.0 && num(st, "mad") <= max - min, "{st}");
    assert!(close(num(&j, "tokens_per_s"), (s * t) as f64 / med));

    // FLOPs: the formula documented in src/cli/bench.rs, recomputed from the shapes
    let (layers, c, f) = (2.0, 32.0, 64.0);
    let (sf, tf, n) = (s as f64, t as f64, (s * t) as f64);
    let (a, m) = ((2 * bf * (t - 2)) as f64, (s * (t - 2)) as f64);
    let fb = &j["flops_breakdown"];
    assert!(close(
        num(fb, "linear"),
        3.0 * layers * 2.0 * n * (4.0 * c * c + 2.0 * c * f)
    ));
    assert!(close(num(fb, "attention"), 3.0 * layers * 4.0 * sf * tf * tf * c));
    assert!(close(num(fb, "head"), 3.0 * 2.0 * n * c * labels as f64));
    assert!(close(num(fb, "contrast"), 4.0 * a * m * c));
    let total: f64 = ["linear", "attention", "head", "contrast"]
        .iter()
        .map(|k| num(fb, k))
        .sum();
    assert!(close(num(&j, "flops_per_step"), total));
    let achieved = num(&j, "achieved_tflops");
    assert!(close(achieved, total / med / 1e12));
    let mm = &j["matmul_rate"];
    assert_eq!(mm["dtype"], "fp32");
    assert_eq!(mm["shape"], serde_json::json!([64, 64, 64]));
    assert!(num(mm, "tflops") > 0.0);
    let se = &j["matmul_tflops_start_end"];
    let (start, end) = (se[0].as_f64().unwrap(), se[1].as_f64().unwrap());
    assert!(start > 0.0 && end > 0.0 && num(mm, "tflops") == start.max(end), "{se}");
    assert!(close(num(&j, "mfu"), achieved / num(mm, "tflops")));
    assert_eq!(
        j["mfu_reference"], j["matmul_rate"],
        "fp32: the MFU refers to the fp32 GEMM"
    );
    assert_eq!(j["skipped_steps"], 0);

    assert!(num(&j, "peak_rss_bytes") > 0.0);
    assert!(num(&j, "parameters") > 0.0);
    for which in ["first", "last"] {
        for k in ["ce", "contrast", "total"] {
            let v = num(&j["losses"][which], k);
            assert!(v.is_finite() && v > 0.0, "loss {which}.{k} = {v}");
        }
    }
}

#[test]
fn preset_names_the_model_and_runs() {
    let out = bench(&[
        "--preset",
        "minilm-l6",
        "--bf",
        "1",
        "--br",
        "1",
        "--seq-len",
        "4",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--matmul-size",
        "32",
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["model"], "minilm-l6");
    assert_eq!(j["layers"], 6);
    assert_eq!(j["hidden"], 384);
    assert_eq!(j["tokens_per_step"], 12);
}

/// `--precision` reaches the benched step: bf16 and fp16 change the losses (the GEMM and
/// attention inputs are rounded) but only by what 16-bit inputs can, the JSON names the
/// precision, and on the CPU (fp32 GEMMs emulating the reduced precisions) the MFU still
/// refers to the fp32 GEMM rate.
#[test]
fn precision_flag_reaches_the_step() {
    let run = |p: &str| -> Value {
        let args = common::tiny_bench_args("cpu", p, 0);
        let out = bench(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "{p}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let f32_run = run("fp32");
    let first = |j: &Value| num(&j["losses"]["first"], "total");
    for p in ["bf16", "fp16"] {
        let j = run(p);
        assert_eq!(j["precision"], p);
        assert!(
            j["precision_detail"].as_str().unwrap().contains(p),
            "{}",
            j["precision_detail"]
        );
        assert_eq!(j["mfu_reference"]["dtype"], "fp32", "{p} on the CPU");
        assert!(
            j["skipped_steps"].as_u64().is_some(),
            "{p}: skipped_steps {}",
            j["skipped_steps"]
        );
        // no precision waits for the device inside a step; fp16 says how many steps ran
        // again after an overflow
        assert_eq!(j["host_syncs_per_step"], 0, "{p}");
        assert_eq!(
            j["fp16_steps_rerun"].is_u64(),
            p == "fp16",
            "{p}: {}",
            j["fp16_steps_rerun"]
        );
        let (a, b) = (first(&j), first(&f32_run));
        assert!(
            a != b,
            "{p}: the first loss equals fp32's ({a}): precision did not reach the step"
        );
        assert!((a - b).abs() < 0.02 * b, "{p}: first loss {a} against fp32's {b}");
    }
}

#[test]
fn bad_options_fail_clearly() {
    let cfg = tiny_config();
    let cases: &[(&[&str], &str)] = &[
        (&["--bf", "0"], "--bf must be at least 1"),
        (&["--br", "0"], "--br must be at least 1"),
        (&["--steps", "0"], "--steps must be at least 1"),
        (&["--labels", "1"], "--labels must be at least 2"),
        (&["--matmul-size", "0"], "--matmul-size must be at least 1"),
        (&["--preset", "gpt2"], "unknown model preset `gpt2`"),
        (&["--seq-len", "2"], "--seq-len 2"),
        (&["--seq-len", "513"], "--seq-len 513"),
        (&["--config", &cfg, "--seq-len", "41"], "--seq-len 41"),
        (&["--config", "/nonexistent/config.json"], "/nonexistent/config.json"),
        (&["--preset", "minilm-l6", "--config", &cfg], "cannot be used with"),
        (&["--device", "tpu", "--seq-len", "4"], "--device tpu"),
        (&["--threads", "0", "--seq-len", "4"], "--threads must be at least 1"),
        (&["--bf", "x"], "invalid value 'x'"),
    ];
    for (args, msg) in cases {
        let out = bench(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
        assert!(stderr.contains(msg), "{args:?}: expected `{msg}` in: {stderr}");
    }
}

/// A small MiniLM-shaped CPU bench with `env` set; its JSON.
fn small_cpu_bench(env: (&str, &str)) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_deepcut-fast"))
        .env(env.0, env.1)
        .args([
            "bench",
            "--preset",
            "minilm-l6",
            "--bf",
            "2",
            "--br",
            "2",
            "--seq-len",
            "37",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--matmul-size",
            "16",
            "--device",
            "cpu",
        ])
        .output()
        .expect("run deepcut-fast");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The AVX-512, AVX2 and baseline builds of the element-wise kernels (src/backend/cpu/simd.rs)
/// give bit-identical steps: the losses of a step taken after an update (so every
/// forward and backward op, dropout on) are equal to the last bit. The JSON names the
/// build that ran.
#[test]
fn simd_builds_give_identical_steps() {
    let base = small_cpu_bench(("DEEPCUT_SIMD", "baseline"));
    assert_eq!(base["paths"]["simd"], "baseline", "{}", base["paths"]);
    let avx2 = small_cpu_bench(("DEEPCUT_SIMD", "avx2"));
    let native = small_cpu_bench(("DEEPCUT_SIMD", "native"));
    let named = |j: &Value| j["paths"]["simd"].as_str().unwrap_or_default().to_string();
    // capped at AVX2: AVX2 where the CPU has it, else the baseline
    assert!(
        ["avx2", "baseline"].contains(&named(&avx2).as_str()),
        "{}",
        avx2["paths"]
    );
    assert!(
        ["avx512", "avx2", "baseline"].contains(&named(&native).as_str()),
        "{}",
        native["paths"]
    );
    assert_eq!(avx2["losses"], base["losses"]);
    assert_eq!(native["losses"], base["losses"]);
}

/// The JSON names the CPU GEMM library, and `DEEPCUT_CPU_GEMM` picks it (each machine
/// otherwise picks one at run time, so a CPU row means nothing without it).
#[test]
fn cpu_gemm_library_is_named() {
    for (var, name) in [("matrixmultiply", "matrixmultiply"), ("gemm", "gemm crate")] {
        let j = small_cpu_bench(("DEEPCUT_CPU_GEMM", var));
        let gemm = j["paths"]["gemm"].as_str().unwrap_or_default();
        assert!(gemm.starts_with(name), "DEEPCUT_CPU_GEMM={var}: {}", j["paths"]);
    }
}
