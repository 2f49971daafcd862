//! Non-finite values (issue 7): a `run` or a `train` whose loss blows up (an absurd
//! learning rate) stops with the step and the loss term named and exit status 1, and
//! its newest checkpoint is intact and finite: it loads, and a --resume from it
//! reaches the same failure at the same step (the run is deterministic to the end).
mod common;
use common::fixture::{self, bin};
use deepcut_fast::backend::cpu::Cpu;
use deepcut_fast::infer::model_from_weights;
use deepcut_fast::model::{random_init, ModelConfig};
use deepcut_fast::train::checkpoint;
use deepcut_fast::train::optim::{OptimConfig, Optimizer};
use safetensors::SafeTensors;
use std::path::Path;

/// The number after `at step ` in the error line.
fn failed_step(err: &str) -> u64 {
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    let rest = line
        .split("at step ")
        .nth(1)
        .unwrap_or_else(|| panic!("no step named: {line}"));
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Every weight and moment of the newest checkpoint is finite; returns its step.
fn checkpoint_is_finite(ckpt: &Path, step_key: &[&str]) -> u64 {
    let bytes = std::fs::read(ckpt.join("checkpoint.safetensors")).expect("a checkpoint must be kept");
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).expect("the kept checkpoint parses");
    for (name, t) in st.tensors() {
        let bad = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .position(|x| !x.is_finite());
        assert!(
            bad.is_none(),
            "checkpoint tensor {name} has a non-finite value at {bad:?}"
        );
    }
    let state: serde_json::Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["state"]).unwrap();
    step_key.iter().fold(&state, |v, k| &v[*k]).as_u64().unwrap()
}

fn fails(args: &[String]) -> String {
    let o = bin().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("error")).count(), 1, "{err}");
    println!("{}", err.lines().find(|l| l.starts_with("error")).unwrap()); // shown with --nocapture
    err
}

fn names_a_loss_term(err: &str) -> bool {
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap();
    ["cross-entropy loss", "contrastive loss"]
        .iter()
        .any(|t| line.contains(t))
        && ["NaN", "inf"].iter().any(|v| line.contains(v))
}

#[test]
fn a_run_whose_loss_blows_up_stops_naming_step_and_term_and_keeps_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture::build(tmp.path());
    let out = tmp.path().join("run");
    let args = fixture::run_args(
        &fx.model,
        &fx.data,
        &out,
        40,
        &["--lr", "1e6", "--checkpoint-every", "1"],
    );
    let err = fails(&args);
    assert!(
        names_a_loss_term(&err),
        "the loss term and its value must be named: {err}"
    );
    let step = failed_step(&err);
    assert!(err.contains("last good checkpoint"), "{err}");
    assert!(step > 1, "blew up at step {step}: nothing to keep");
    let kept = checkpoint_is_finite(&out.join("checkpoints"), &["state", "step"]);
    assert_eq!(kept, step - 1, "the checkpoint of the last good step is kept");
    assert!(!out.join("model").exists(), "no model/ from a failed run");

    // --resume loads it and meets the same failure at the same step
    let mut resume = args.clone();
    resume.push("--resume".into());
    let err2 = fails(&resume);
    assert!(
        err2.lines()
            .any(|l| l.starts_with("resuming from") && l.ends_with(&format!("at step {kept}"))),
        "resumed from step {kept}: {err2}"
    );
    assert_eq!(failed_step(&err2), step, "{err2}");
}

/// The guard behind "the newest checkpoint is always one a run can continue from":
/// weights that turned non-finite are not written, and the checkpoint on disk stays.
#[test]
fn a_checkpoint_of_non_finite_weights_is_refused_and_the_previous_one_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let mut raw = fixture::tiny_config_json();
    raw["vocab_size"] = 100.into();
    let cfg = ModelConfig::from_json(raw, Path::new("config.json")).unwrap();
    let ocfg = OptimConfig {
        lr: 1e-3,
        weight_decay: 0.0,
        warmup: 0,
        total: 10,
        clip: 1.0,
    };
    let mut w = random_init(&cfg, Some(3), 1);
    let good = model_from_weights(Cpu, &cfg, &w, 3, 64);
    let state = serde_json::json!({"step": 1});
    checkpoint::save(tmp.path(), &good, &Optimizer::new(&good, ocfg), &state).unwrap();
    let cur = tmp.path().join(checkpoint::CURRENT);
    let before = std::fs::read(&cur).unwrap();

    let name = "encoder.layer.1.attention.self.key.weight";
    w.get_mut(name).unwrap().data[17] = f32::NAN;
    let bad = model_from_weights(Cpu, &cfg, &w, 3, 64);
    let err = checkpoint::save(tmp.path(), &bad, &Optimizer::new(&bad, ocfg), &state)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("`w.{name}`")) && err.contains("NaN"), "{err}");
    assert!(err.contains("the last good checkpoint is"), "{err}");
    assert_eq!(std::fs::read(&cur).unwrap(), before, "the good checkpoint was replaced");
    assert!(!tmp.path().join(checkpoint::PREVIOUS).exists(), "nothing rotated");
}

#[test]
fn a_train_whose_loss_blows_up_stops_naming_step_and_term_and_keeps_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture::build(tmp.path());
    let out = tmp.path().join("train");
    let args = fixture::train_args(&fx.base, &fx.data, &out, 6, &["--lr", "1e6", "--checkpoint-every", "1"]);
    let err = fails(&args);
    assert!(
        names_a_loss_term(&err),
        "the loss term and its value must be named: {err}"
    );
    let step = failed_step(&err);
    assert!(step > 1 && err.contains("last good checkpoint"), "{err}");
    let kept = checkpoint_is_finite(&out.join("checkpoints"), &["record", "steps"]);
    assert_eq!(kept, step - 1, "the checkpoint of the last good step is kept");

    let mut resume = args.clone();
    resume.push("--resume".into());
    let err2 = fails(&resume);
    assert!(err2.contains("resuming from"), "{err2}");
    assert_eq!(failed_step(&err2), step, "{err2}");
}

/// Weights that are finite but so large that the logits overflow: the loss itself is
/// NaN at the first step, before any checkpoint exists, and the message says both.
#[test]
fn a_model_whose_logits_overflow_stops_at_step_1_naming_the_cross_entropy() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture::build(tmp.path());
    let huge = tmp.path().join("huge");
    fixture::copy_dir(&fx.model, &huge);
    let w = huge.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let mut b = t.data().to_vec();
            if n == "classifier.weight" {
                for c in b.chunks_exact_mut(4) {
                    let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    c.copy_from_slice(&(x.signum() * 3e38).to_le_bytes());
                }
            }
            (n, t.dtype(), t.shape().to_vec(), b)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, sh, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, sh.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(&w, safetensors::serialize(views, &None).unwrap()).unwrap();

    let out = tmp.path().join("run");
    let args = fixture::run_args(&huge, &fx.data, &out, 3, &[]);
    let err = fails(&args);
    assert!(names_a_loss_term(&err), "{err}");
    assert_eq!(failed_step(&err), 1, "{err}");
    assert!(err.contains("no checkpoint had been written"), "{err}");
}

/// The background checkpoint writer (what `run` and `train` use, so training does not
/// wait for the disk) writes the very file `save` writes, rotates the previous one as
/// `save` does, refuses non-finite weights the same way (naming the checkpoint whose write
/// it first lets finish), writes `save_with`'s other file first (fine-tuning's best model),
/// and a writer dropped with a write in flight completes it.
#[test]
fn the_background_writer_writes_what_save_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("sync"), tmp.path().join("async"));
    let cfg = ModelConfig::from_json(fixture::tiny_config_json(), Path::new("config.json")).unwrap();
    let ocfg = OptimConfig {
        lr: 1e-3,
        weight_decay: 0.0,
        warmup: 0,
        total: 10,
        clip: 1.0,
    };
    let mut w = random_init(&cfg, Some(3), 1);
    let model = model_from_weights(Cpu, &cfg, &w, 3, 64);
    let opt = Optimizer::new(&model, ocfg);
    let mut writer = checkpoint::Writer::new();
    for step in 1..=2 {
        let state = serde_json::json!({ "step": step });
        checkpoint::save(&a, &model, &opt, &state).unwrap();
        writer.save(&b, &model, &opt, &state).unwrap();
    }
    writer.wait().unwrap();
    assert!(!writer.busy());
    for name in [checkpoint::CURRENT, checkpoint::PREVIOUS] {
        same_checkpoint(&a.join(name), &b.join(name));
    }
    // non-finite weights: refused before anything is written, the message naming the
    // checkpoint on disk
    w.get_mut("classifier.weight").unwrap().data[0] = f32::INFINITY;
    let bad = model_from_weights(Cpu, &cfg, &w, 3, 64);
    let before = std::fs::read(b.join(checkpoint::CURRENT)).unwrap();
    let err = writer
        .save(&b, &bad, &Optimizer::new(&bad, ocfg), &serde_json::json!({"step": 3}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("the last good checkpoint is"), "{err}");
    assert_eq!(std::fs::read(b.join(checkpoint::CURRENT)).unwrap(), before);
    // save_with: its first write lands before the checkpoint, and if it fails the
    // checkpoint is not written and the error comes back
    let d = tmp.path().join("with");
    let marker = d.join("best-model-written");
    let m2 = marker.clone();
    writer
        .save_with(&d, &model, &opt, &serde_json::json!({"step": 1}), move || {
            assert!(
                !m2.parent().unwrap().join(checkpoint::CURRENT).exists(),
                "the checkpoint came first"
            );
            std::fs::write(&m2, b"").map_err(|e| deepcut_fast::Error::io(&m2, e))
        })
        .unwrap();
    writer.wait().unwrap();
    assert!(marker.exists() && d.join(checkpoint::CURRENT).exists());
    let e = tmp.path().join("with-error");
    writer
        .save_with(&e, &model, &opt, &serde_json::json!({"step": 1}), || {
            Err(deepcut_fast::Error::invalid("disk full"))
        })
        .unwrap();
    assert!(writer.wait().unwrap_err().to_string().contains("disk full"));
    assert!(
        !e.join(checkpoint::CURRENT).exists(),
        "no checkpoint after a failed first write"
    );
    // dropped right after a save: the write completes
    let c = tmp.path().join("dropped");
    {
        let mut w2 = checkpoint::Writer::new();
        w2.save(&c, &model, &opt, &serde_json::json!({"step": 1})).unwrap();
    }
    checkpoint::save(&a, &model, &opt, &serde_json::json!({"step": 1})).unwrap();
    same_checkpoint(&c.join(checkpoint::CURRENT), &a.join(checkpoint::CURRENT));
}

/// The same tensors (names, shapes, bytes) and the same metadata (safetensors writes a
/// map's keys in no fixed order, so files are compared by content).
fn same_checkpoint(x: &Path, y: &Path) {
    let (bx, by) = (std::fs::read(x).unwrap(), std::fs::read(y).unwrap());
    let (tx, ty) = (
        SafeTensors::deserialize(&bx).unwrap(),
        SafeTensors::deserialize(&by).unwrap(),
    );
    let mut names = tx.names();
    names.sort();
    let mut other = ty.names();
    other.sort();
    assert_eq!(names, other, "{}: tensor names", x.display());
    for n in names {
        let (a, b) = (tx.tensor(n).unwrap(), ty.tensor(n).unwrap());
        assert!(
            a.shape() == b.shape() && a.data() == b.data(),
            "{}: tensor {n}",
            x.display()
        );
    }
    let meta = |b: &[u8]| SafeTensors::read_metadata(b).unwrap().1.metadata().clone();
    assert_eq!(meta(&bx), meta(&by), "{}: metadata", x.display());
}
