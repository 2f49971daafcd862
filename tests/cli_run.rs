//! `train` and `run` end to end through the real binary on a tiny BERT (random weights,
//! MiniLM's tokenizer) and a slice of WNUT17: the run folder's contents, determinism,
//! kill-and-resume giving the same model bytes, and clear errors for bad options.
mod common;
use deepcut_fast::data::{read_conll, write_conll};
use deepcut_fast::model::{copy_tokenizer_files, random_init, save_model_dir, ModelConfig};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_deepcut-fast"))
}

fn run_ok(args: &[&str], env: Option<(&str, &str)>) -> Output {
    let mut c = bin();
    c.args(args);
    if let Some((k, v)) = env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// A tiny encoder-only BERT with MiniLM's tokenizer, and a small dataset.
fn fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let minilm = common::shared().join("models/all-MiniLM-L6-v2");
    let raw = json!({
        "model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 128,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02
    });
    let cfg = ModelConfig::from_json(raw, &dir.join("config.json")).unwrap();
    let w = random_init(&cfg, None, 7);
    let model = dir.join("tiny-bert");
    save_model_dir(&model, &cfg, &w).unwrap();
    copy_tokenizer_files(&minilm, &model).unwrap();
    let train = read_conll(&common::shared().join("data/wnut17/train.conll"), true).unwrap();
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let part = &train[..48];
    let tags: Vec<Vec<String>> = part.iter().map(|s| s.tags.clone()).collect();
    write_conll(&data.join("train.conll"), part, &tags).unwrap();
    // dev/test from train so every tag is covered; the numbers are not the point here
    write_conll(&data.join("dev.conll"), &part[..12], &tags[..12]).unwrap();
    write_conll(&data.join("test.conll"), &part[12..24], &tags[12..24]).unwrap();
    (model, data)
}

/// Every file under `dir` (recursively) with its bytes.
fn hash_dir(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v.into_iter()
        .flat_map(|p| {
            if p.is_dir() {
                hash_dir(&p)
            } else {
                vec![(p.display().to_string(), std::fs::read(&p).unwrap())]
            }
        })
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `args` (whose `--out` is `out`) killed after step 3 then resumed, and again
/// uninterrupted into `full`; asserts both end with the same model bytes.
fn interrupted_equals_uninterrupted(args: &[&str], out: &Path, full: &Path) {
    let o = run_ok(args, Some(("DEEPCUT_ABORT_AFTER_STEP", "3")));
    assert_eq!(o.status.code(), Some(86), "{}", String::from_utf8_lossy(&o.stderr));
    let mut resumed = args.to_vec();
    resumed.push("--resume");
    let o = run_ok(&resumed, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let args_full: Vec<&str> = args.iter().map(|a| if *a == s(out) { s(full) } else { a }).collect();
    let o = run_ok(&args_full, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(out.join("model/model.safetensors")).unwrap(),
        std::fs::read(full.join("model/model.safetensors")).unwrap(),
        "{}: a resumed run must end with the same model bytes",
        args[0]
    );
}

#[test]
fn train_then_run_writes_the_run_folder_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = fixture(tmp.path());
    let before = hash_dir(&model);

    // train: fine-tune the tiny encoder (2 epochs), interrupted after step 3, resumed
    let tr = tmp.path().join("trained");
    let args = [
        "train",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&tr),
        "--epochs",
        "2",
        "--batch",
        "8",
        "--checkpoint-every",
        "2",
        "--quiet",
        "--device",
        "cpu",
    ];
    let full = tmp.path().join("trained-full");
    interrupted_equals_uninterrupted(&args, &tr, &full);
    let tj: Value = serde_json::from_str(&std::fs::read_to_string(tr.join("train.json")).unwrap()).unwrap();
    assert!(tj["metrics"]["dev"]["f1"].is_number() && tj["record"]["epochs"].as_array().unwrap().len() == 2);
    assert_eq!(hash_dir(&model), before, "the input model must not change");

    // run: DeepCUT on the trained model, interrupted after step 3 and resumed
    let trained = tr.join("model");
    let out = tmp.path().join("run");
    let args = [
        "run",
        "--model",
        s(&trained),
        "--data",
        s(&data),
        "--forget-ratio",
        "0.25",
        "--out",
        s(&out),
        "--steps",
        "5",
        "--bf",
        "4",
        "--br",
        "8",
        "--checkpoint-every",
        "2",
        "--quiet",
        "--device",
        "cpu",
    ];
    let full = tmp.path().join("run-full");
    interrupted_equals_uninterrupted(&args, &out, &full);

    let r: Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let rf: Value = serde_json::from_str(&std::fs::read_to_string(full.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["metrics"], rf["metrics"], "same metrics after resume");
    assert_eq!(r["method"], "deepcut");
    assert_eq!(r["forget"]["count"], 12);
    for split in ["forget", "retain", "dev", "test"] {
        for k in ["precision", "recall", "f1"] {
            assert!(r["metrics"][split][k].is_number(), "metrics.{split}.{k}");
        }
    }
    assert!(r["metrics"]["mia_auc"].is_number() && r["reference"]["original"]["forget"]["f1"].is_number());
    for k in ["seconds", "steps", "tokens", "tokens_per_second", "peak_memory_bytes"] {
        assert!(r["cost"][k].is_number(), "cost.{k}");
    }
    assert_eq!(r["cost"]["steps"], 5);
    assert_eq!(r["config"]["unlearning"]["tau"].as_f64().unwrap() as f32, 0.1);
    // the host the costs were measured on
    let host = &r["config"]["host"];
    assert!(host["threads"].as_u64().unwrap_or(0) >= 1, "{host}");
    assert!(
        ["avx512", "avx2", "baseline"].contains(&host["simd"].as_str().unwrap_or_default()),
        "{host}"
    );
    assert!(
        ["matrixmultiply", "gemm crate"].contains(&host["gemm"].as_str().unwrap_or_default()),
        "{host}"
    );
    assert!(!host["model"].as_str().unwrap_or_default().is_empty(), "{host}");
    assert_eq!(r["history"]["steps"].as_array().unwrap().len(), 5);
    let forget_txt = std::fs::read_to_string(out.join("forget.txt")).unwrap();
    assert_eq!(
        forget_txt
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .count(),
        12
    );
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("forget tokens, after unlearning"));
    // the tiny original never fitted its data (SPEC section 5): both reports say so
    let orig = &r["reference"]["original"];
    assert!(orig["retain"]["f1"].as_f64().unwrap() < 0.95);
    assert_eq!(orig["fits_training_data"], false);
    let warning = orig["warning"].as_str().expect("a warning in report.json");
    assert!(warning.contains("does not fit its training data"), "{warning}");
    assert!(html.contains("does not fit its training data"));
    assert!(!html.contains("<script"), "self-contained, no scripts");
    let (_, w, head) = deepcut_fast::model::load_model_dir(&out.join("model")).unwrap();
    assert!(head && w.num_labels().is_some());

    // every baseline runs on the same split
    let forget_file = out.join("forget.txt");
    for method in ["finetune", "gradient-ascent", "neggrad+", "random-labels"] {
        let o = tmp.path().join(format!("run-{method}"));
        let a = [
            "run",
            "--model",
            s(&trained),
            "--data",
            s(&data),
            "--forget",
            s(&forget_file),
            "--out",
            s(&o),
            "--steps",
            "2",
            "--bf",
            "4",
            "--br",
            "8",
            "--quiet",
            "--method",
            method,
        ];
        let res = run_ok(&a, None);
        assert!(
            res.status.success(),
            "{method}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        let r: Value = serde_json::from_str(&std::fs::read_to_string(o.join("report.json")).unwrap()).unwrap();
        assert_eq!(r["method"], method);
        assert_eq!(r["forget"]["count"], 12);
    }

    // one page comparing the runs
    let page = tmp.path().join("comparison.html");
    let mut cmp = vec!["compare", "--out", s(&page), s(&out)];
    let dirs: Vec<PathBuf> = ["finetune", "neggrad+"]
        .iter()
        .map(|m| tmp.path().join(format!("run-{m}")))
        .collect();
    cmp.extend(dirs.iter().map(|d| s(d)));
    let o = run_ok(&cmp, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(&page).unwrap();
    assert_eq!(html.matches("<tr><td>").count(), 3);
    assert!(html.contains("trade-off"));
    let o = run_ok(&["compare", "--out", s(&page), s(&data)], None);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("report.json"));

    // an existing output folder is refused without --force, and nothing in it changes
    let before_out = hash_dir(&out);
    let o = run_ok(&args, None);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(hash_dir(&out), before_out);
}

#[test]
fn bad_options_fail_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = fixture(tmp.path());
    let bad_idx = tmp.path().join("forget.txt");
    std::fs::write(&bad_idx, "3\n4000\n").unwrap();
    let out = tmp.path().join("o");
    let nope = tmp.path().join("nope");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["run", "--model", s(&model), "--data", s(&data), "--out", s(&out)],
            "--forget",
        ),
        (
            vec![
                "run",
                "--model",
                s(&model),
                "--data",
                s(&data),
                "--out",
                s(&out),
                "--forget-ratio",
                "1.5",
            ],
            "ratio",
        ),
        (
            vec![
                "run",
                "--model",
                s(&model),
                "--data",
                s(&data),
                "--out",
                s(&out),
                "--forget",
                s(&bad_idx),
            ],
            "forget.txt:2",
        ),
        (
            vec![
                "run",
                "--model",
                s(&model),
                "--data",
                s(&data),
                "--out",
                s(&model),
                "--forget-ratio",
                "0.1",
            ],
            "input model",
        ),
        (
            vec![
                "run",
                "--model",
                s(&model),
                "--data",
                s(&data),
                "--out",
                s(&out),
                "--forget-ratio",
                "0.1",
                "--tau",
                "0",
            ],
            "--tau",
        ),
        (
            vec!["train", "--model", s(&nope), "--data", s(&data), "--out", s(&out)],
            "nope",
        ),
        (
            vec![
                "train",
                "--model",
                s(&model),
                "--data",
                s(&data),
                "--out",
                s(&out),
                "--resume",
                "--force",
            ],
            "--resume",
        ),
    ];
    for (args, needle) in cases {
        let o = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: message should name `{needle}`: {err}");
        assert!(!err.contains("panicked"), "{args:?}: panicked: {err}");
    }
}

/// A model with a head keeps its label map (SPEC section 1): data whose train split
/// lacks some of the model's labels is unlearned with the existing head, and a data tag
/// the model has no label for is an error naming it.
#[test]
fn a_trained_head_keeps_its_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::repo().join("tests/golden/roberta-wnut17");
    let train = read_conll(&common::shared().join("data/wnut17/train.conll"), true).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // sentences with at most one entity type, so the slice misses most of the 13 labels
    let part: Vec<_> = train
        .iter()
        .filter(|s| s.tags.iter().all(|t| t == "O" || t.ends_with("person")))
        .take(40)
        .cloned()
        .collect();
    let tags: Vec<Vec<String>> = part.iter().map(|s| s.tags.clone()).collect();
    for split in ["train", "dev", "test"] {
        write_conll(&data.join(format!("{split}.conll")), &part, &tags).unwrap();
    }
    let out = tmp.path().join("run");
    let o = run_ok(
        &[
            "run",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--forget-ratio",
            "0.1",
            "--out",
            s(&out),
            "--steps",
            "2",
            "--quiet",
        ],
        None,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        !err.contains("fine-tuning the original"),
        "the existing head must be used: {err}"
    );
    let (cfg, _, _) = deepcut_fast::model::load_model_dir(&out.join("model")).unwrap();
    assert_eq!(cfg.id2label.unwrap().len(), 13, "the model's 13 labels are kept");

    let mut bad = part.clone();
    bad[0].tags[0] = "B-spaceship".into();
    let bad_tags: Vec<Vec<String>> = bad.iter().map(|s| s.tags.clone()).collect();
    write_conll(&data.join("train.conll"), &bad, &bad_tags).unwrap();
    let o = run_ok(
        &[
            "run",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--forget-ratio",
            "0.1",
            "--out",
            s(&tmp.path().join("r2")),
            "--steps",
            "2",
            "--quiet",
        ],
        None,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("B-spaceship") && err.contains("train.conll"), "{err}");
}

/// `--select last` keeps the final epoch's weights (those of the final checkpoint), not
/// the best dev epoch's.
#[test]
fn select_last_keeps_the_final_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = fixture(tmp.path());
    let out = tmp.path().join("t");
    let o = train_o(&model, &data, &out, &["--select", "last"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(keeps_the_last_epoch(&out));
    let tj: Value = serde_json::from_str(&std::fs::read_to_string(out.join("train.json")).unwrap()).unwrap();
    assert_eq!(tj["config"]["select"], "last");
}

/// `train` of the fixture's model for 3 epochs into `out` (common::fixture::train_args),
/// with `extra` options.
fn train_o(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    let a = common::fixture::train_args(model, data, out, 3, extra);
    run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>(), None)
}

/// Whether the model `train` wrote into `out` has the final checkpoint's weights (those
/// of the last epoch).
fn keeps_the_last_epoch(out: &Path) -> bool {
    let (_, w, _) = deepcut_fast::model::load_model_dir(&out.join("model")).unwrap();
    let bytes = std::fs::read(out.join("checkpoints/checkpoint.safetensors")).unwrap();
    let ck = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let last: Vec<f32> = ck
        .tensor("w.classifier.weight")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    w.get("classifier.weight").unwrap().data == last
}

/// `--select best` (the default) keeps only an epoch whose train F1 reaches `--fit-f1`
/// (SPEC section 5's 0.95 by default). The tiny fixture never gets there: the last epoch
/// is kept, every epoch's train F1 was measured, and the run says so. With the threshold
/// at a measured train F1, the epoch the rule picks from those numbers is kept.
#[test]
fn select_best_keeps_an_epoch_that_fits_its_training_data() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = fixture(tmp.path());
    let train = |out: &Path, extra: &[&str]| {
        let o = train_o(&model, &data, out, extra);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        let tj: Value = serde_json::from_str(&std::fs::read_to_string(out.join("train.json")).unwrap()).unwrap();
        (tj, err)
    };
    let out = tmp.path().join("t");
    let (tj, err) = train(&out, &[]);
    let rec = &tj["record"];
    assert!(err.contains("no epoch reached train F1 0.95"), "{err}");
    assert_eq!(
        (rec["fits"].as_bool(), rec["best_epoch"].as_u64()),
        (Some(false), Some(3))
    );
    assert!(keeps_the_last_epoch(&out));
    let epochs: Vec<(f64, f64)> = (0..3)
        .map(|k| {
            let e = &rec["epochs"][k];
            (
                e["dev_f1"].as_f64().unwrap(),
                e["train_f1"].as_f64().expect("every epoch measured"),
            )
        })
        .collect();
    // epoch 1's: every later epoch that fits too must beat it on dev to be kept
    let fit = epochs[0].1;
    assert!(fit > 0.0 && fit < 0.95, "{epochs:?}");

    // the rule by hand: the best dev F1 among the epochs whose train F1 reaches `fit`
    let (mut want, mut best) = (0, -1.0);
    for (k, &(dev, tr)) in epochs.iter().enumerate() {
        if dev > best && tr >= fit {
            (want, best) = (k + 1, dev);
        }
    }
    let out2 = tmp.path().join("t2");
    let (tj, err) = train(&out2, &["--fit-f1", &format!("{fit}")]);
    assert!(!err.contains("no epoch reached"), "{err}");
    assert_eq!(tj["record"]["fits"].as_bool(), Some(true));
    assert_eq!(tj["record"]["best_epoch"].as_u64(), Some(want as u64), "{epochs:?}");
    eprintln!("train F1 by epoch {epochs:?}; at --fit-f1 {fit}: epoch {want} kept");
    assert_eq!(keeps_the_last_epoch(&out2), want == 3);
    assert_eq!(tj["config"]["fit_f1"].as_f64(), Some(fit));

    let o = train_o(&model, &data, &tmp.path().join("t3"), &["--fit-f1", "1.5"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--fit-f1 1.5"), "{err}");
}
