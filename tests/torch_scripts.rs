//! The PyTorch side of the comparisons reads what the engine writes: scripts/deepcut-torch.py
//! replays a run from its report.json (issue #6's end-to-end comparison, run on a GPU by
//! scripts/gpu-check.sh). Its `--plan` is everything it takes from a report, read without
//! torch, so these tests run wherever python3 does (CI has no torch). They catch a report
//! the replay misreads: the precision object that once stopped every GPU replay, a run that
//! fine-tuned its original first, the stopping rule's checks.
mod common;
use common::fixture::{self, bin, run_args, s};
use common::loud;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

/// Whether python3 is here; says the test skipped when not (never a silent pass).
fn python3_found() -> bool {
    let ok = Command::new("python3")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        loud("SKIPPED: python3 not found; scripts/deepcut-torch.py --plan not checked");
    }
    ok
}

/// `deepcut-torch.py --report OUT/report.json --plan --device DEVICE`, as it ran.
fn plan_output(out: &Path, device: &str) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/deepcut-torch.py");
    Command::new("python3")
        .arg(&script)
        .args(["--report", &s(&out.join("report.json")), "--plan", "--device", device])
        .output()
        .expect("run python3")
}

/// The plan printed by `plan_output`, which must succeed.
fn plan(out: &Path, device: &str) -> Value {
    let o = plan_output(out, device);
    assert!(
        o.status.success(),
        "deepcut-torch.py --plan failed on {}: {}",
        out.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("--plan prints JSON")
}

fn run(args: &[String]) -> Value {
    let o = bin().args(args).output().unwrap();
    assert!(o.status.success(), "run failed: {}", String::from_utf8_lossy(&o.stderr));
    let out = args.iter().position(|a| a == "--out").map(|i| &args[i + 1]).unwrap();
    serde_json::from_str(&std::fs::read_to_string(Path::new(out).join("report.json")).unwrap()).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

#[test]
fn replay_plan_of_a_bf16_run_that_fine_tuned_its_original_first() {
    if !python3_found() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture::build(dir.path());
    let out = dir.path().join("run-bf16");
    // the encoder without a head: the run fine-tunes it first (into OUT/original)
    let rep = run(&run_args(
        &fx.base,
        &fx.data,
        &out,
        3,
        &["--precision", "bf16", "--train-epochs", "1"],
    ));
    assert!(
        rep["original_training"].is_object(),
        "the fixture's base should need a fine-tune"
    );

    let p = plan(&out, "cuda");
    assert_eq!(p["precision"], "bf16");
    assert_eq!(p["autocast"], "bf16");
    // the replay starts where the unlearning did: the run's own fine-tuned original
    assert_eq!(p["model_dir"], s(&out.join("original/model")));
    assert_eq!(p["steps"], 3);
    assert_eq!(p["fixed_steps"], true);
    let forget: Vec<u64> = std::fs::read_to_string(out.join("forget.txt"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split('#').next().unwrap().trim().parse().ok())
        .collect();
    assert_eq!(p["forget"], serde_json::json!(forget));
    assert_eq!(forget.len() as u64, rep["forget"]["count"].as_u64().unwrap());
    assert_eq!(p["train_sentences"], fx.train.len());
    // our wall clock without the fine-tune, which the replay does not redo
    let ft = rep["original_training"]["record"]["seconds"].as_f64().unwrap();
    assert!(ft > 0.0);
    assert_eq!(p["finetune_seconds_left_out"].as_f64().unwrap(), ft);
    let wall = rep["cost"]["wall_seconds"].as_f64().unwrap();
    assert!(close(p["ours_seconds"]["wall"].as_f64().unwrap(), wall - ft));
    for k in ["forget", "retain", "dev", "test"] {
        assert_eq!(p["ours_unlearned"][k], rep["metrics"][k]["f1"], "{k}");
    }
}

#[test]
fn replay_plan_of_a_stopping_rule_run_and_of_fp16_on_either_device() {
    if !python3_found() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture::build(dir.path());

    // fp32, the stopping rule checked every step for one pass over the forget set
    let out = dir.path().join("run-rule");
    let mut args = run_args(
        &fx.model,
        &fx.data,
        &out,
        0,
        &["--max-forget-epochs", "1", "--check-every", "1"],
    );
    let i = args.iter().position(|a| a == "--steps").unwrap();
    args.drain(i..i + 2);
    let rep = run(&args);
    assert!(rep["original_training"].is_null());
    let p = plan(&out, "cuda");
    assert_eq!(p["precision"], "fp32");
    assert!(p["autocast"].is_null());
    assert_eq!(p["model_dir"], s(&fx.model));
    assert_eq!(p["fixed_steps"], false);
    let checks: Vec<u64> = rep["history"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_u64().unwrap())
        .collect();
    assert!(!checks.is_empty(), "a stopping-rule run checks");
    // the checks score the forget set tokenised once (infer::encode_for_run): the last
    // check, at the last step, gives the final evaluation's forget F1
    assert_eq!(
        checks.last(),
        rep["cost"]["steps"].as_u64().as_ref(),
        "checked every step"
    );
    let last = rep["history"]["checks"].as_array().unwrap().last().unwrap();
    assert_eq!(
        last["forget_f1"], rep["metrics"]["forget"]["f1"],
        "the last check against the final metrics"
    );
    assert_eq!(p["check_steps"], serde_json::json!(checks));
    assert_eq!(p["steps"], rep["cost"]["steps"]);
    assert!(p["finetune_seconds_left_out"].is_null());
    assert!(close(
        p["ours_seconds"]["wall"].as_f64().unwrap(),
        rep["cost"]["wall_seconds"].as_f64().unwrap()
    ));

    // fp16: autocast on CUDA (with its GradScaler), fp32 on the CPU
    let out = dir.path().join("run-fp16");
    run(&run_args(&fx.model, &fx.data, &out, 2, &["--precision", "fp16"]));
    assert_eq!(plan(&out, "cuda")["autocast"], "fp16");
    assert!(plan(&out, "cpu")["autocast"].is_null());
}

#[test]
fn replay_refuses_a_run_it_cannot_replay_and_names_the_report() {
    if !python3_found() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture::build(dir.path());
    let out = dir.path().join("run-all");
    run(&run_args(
        &fx.model,
        &fx.data,
        &out,
        1,
        &["--contrast-denominator", "all"],
    ));
    let report = out.join("report.json");
    let o = plan_output(&out, "cpu");
    assert!(!o.status.success(), "a non-default InfoNCE option must be refused");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&s(&report)) && err.contains("contrast_denominator"),
        "the refusal names the report and the option: {err}"
    );
}
