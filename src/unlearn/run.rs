//! The `run` driver: original model (fine-tuned first when the given model has no head
//! for the data's labels), forget set, reference metrics, the unlearning loop with its
//! stopping rule and checkpoints, final metrics, the run folder.
use super::deepcut::{self, Anchors, Contrast, StepLosses};
use super::methods;
use super::sisa;
use super::Method;
use crate::backend::Backend;
use crate::backend::{Denominator, InfoNceOptions, OwnView, Precision};
use crate::data::{write_indices, LabelMap, Stream, StreamState, Window};
use crate::error::{Error, Result};
use crate::eval::evaluate::{evaluate, evaluate_encoded, split_train, Dataset, Evaluation};
use crate::eval::mia::privleak;
use crate::infer::{encode_for_run, labelled_hidden, model_from_weights, Classifier};
use crate::model::{copy_tokenizer_files, save_model_dir, HostWeights, Mode};
use crate::train::checkpoint;
use crate::train::finetune::{finetune, scale_message, Base, FinetuneConfig, FIT_F1};
use crate::train::optim::{precision_json, LossScaler, LossScaling, OptimConfig, Optimizer};
use crate::train::readback::Ring;
use crate::util::{peak_memory_bytes, progress, write_atomic, Fnv};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Every resolved option of an unlearning run (recorded in report.json).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunConfig {
    pub method: Method,
    pub tau: f32,
    pub gamma: f32,
    pub contrast_denominator: Denominator,
    pub own_view: OwnView,
    pub anchors: Anchors,
    pub detach_columns: bool,
    pub bf: usize,
    pub br: usize,
    pub lr: f32,
    pub warmup_ratio: f32,
    pub weight_decay: f32,
    pub clip: f32,
    /// neggrad+'s weight of the forget term.
    pub beta: f32,
    pub max_forget_epochs: f64,
    /// A fixed number of steps instead of the stopping rule.
    pub steps: Option<u64>,
    pub check_every: u64,
    pub checkpoint_every: u64,
    /// Skip a periodic checkpoint while the previous one is still being written, or when
    /// one began less than CHECKPOINT_MIN_SECONDS ago (the default; an explicit
    /// --checkpoint-every clears it).
    #[serde(default)]
    pub checkpoint_skip_busy: bool,
    pub max_len: usize,
    pub seed: u64,
    /// Precision of activations and GEMM inputs of every model of the run (SPEC section 7).
    #[serde(default)]
    pub precision: Precision,
    /// fp16 dynamic loss scaling (used only in fp16).
    #[serde(default)]
    pub loss_scaling: LossScaling,
    /// SISA's number of shards (absent for the other methods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<usize>,
}

impl RunConfig {
    pub fn infonce(&self) -> InfoNceOptions {
        InfoNceOptions {
            tau: self.tau,
            denominator: self.contrast_denominator,
            own_view: self.own_view,
            detach_columns: self.detach_columns,
        }
    }
}

/// Where everything comes from and goes.
pub struct RunInputs {
    pub model: PathBuf,
    pub data: PathBuf,
    pub forget: Vec<usize>,
    pub forget_file: Option<PathBuf>,
    pub forget_ratio: Option<f64>,
    pub retrain_ref: Option<PathBuf>,
    /// Folder of cached reference evaluations (original, retrained), shared between runs.
    pub eval_cache: Option<PathBuf>,
    /// Pretrained encoder for `retrain` and `sisa`, `--base` as read by the caller
    /// (None: --model, when it has no head).
    pub base: Option<Base>,
    /// SISA's cache folder of original shard models (default: OUT/sisa/original).
    pub sisa_shards: Option<PathBuf>,
    pub out: PathBuf,
    pub train: FinetuneConfig,
    pub resume: bool,
    pub quiet: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct StepRecord {
    step: u64,
    ce: f32,
    contrast: f32,
    total: f32,
    lr: f32,
    /// None (null) on a skipped fp16 step, whose gradients overflowed.
    grad_norm: Option<f64>,
    /// fp16: the loss scale of the step (absent in fp32 and bf16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loss_scale: Option<f32>,
    /// fp16: the gradients overflowed and the step was skipped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    skipped: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Check {
    step: u64,
    forget_f1: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct LoopState {
    step: u64,
    tokens: u64,
    seconds: f64,
    eval_seconds: f64,
    forget_stream: Option<StreamState>,
    retain_stream: Option<StreamState>,
    steps: Vec<StepRecord>,
    checks: Vec<Check>,
    stop_reason: String,
    done: bool,
    /// fp16 dynamic loss scaling after the last step (None in fp32 and bf16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loss_scaler: Option<LossScaler>,
}

/// What a method hands back: one model, or SISA's ensemble with its record.
enum Final {
    Model(Box<Classifier>),
    Sisa(sisa::Unlearned),
}

/// History records of a fine-tune's step losses (retrain, SISA's retrained shards).
fn step_records(losses: impl Iterator<Item = f32>) -> Vec<StepRecord> {
    losses
        .enumerate()
        .map(|(i, l)| StepRecord {
            step: i as u64 + 1,
            ce: l,
            total: l,
            ..Default::default()
        })
        .collect()
}

/// retrain and sisa start from the pretrained encoder: `--base`, or `--model` when it has
/// no head for the data's labels. Called by the CLI before the output folder is touched.
pub fn check_pretrained(method: Method, has_base: bool, model: &Base, labels: &LabelMap) -> Result<()> {
    if matches!(method, Method::Retrain | Method::Sisa) && !has_base && model.head_matches(labels) {
        return Err(Error::invalid(format!(
            "--method {} needs the pretrained encoder: --model has a trained head, so pass --base DIR",
            method.name()
        )));
    }
    Ok(())
}

fn metrics_json(ev: &Evaluation) -> Value {
    let prf =
        |m: &crate::eval::evaluate::SplitMetrics| json!({"precision": m.precision, "recall": m.recall, "f1": m.f1});
    let mut v = json!({"dev": prf(&ev.dev), "test": prf(&ev.test), "mia_auc": ev.mia_auc});
    if let Some(f) = &ev.forget {
        v["forget"] = prf(f);
    }
    if let Some(r) = &ev.retain {
        v["retain"] = prf(r);
    }
    v
}

fn save_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::file(path, e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

/// Key of a reference evaluation: the weights of the model (every member of an
/// ensemble), the forget set, the data folder, max_len and the labels.
fn eval_key(
    weights: &[&HostWeights], data: &Dataset, forget: &[usize], max_len: usize, labels: &LabelMap, precision: Precision,
) -> u64 {
    let mut h = Fnv::default();
    for w in weights {
        for (name, t) in &w.tensors {
            h.eat(name.as_bytes());
            h.eat(bytemuck::cast_slice(&t.data));
        }
    }
    forget.iter().for_each(|i| {
        h.eat(&i.to_le_bytes());
    });
    h.eat(
        data.dir
            .canonicalize()
            .unwrap_or(data.dir.clone())
            .to_string_lossy()
            .as_bytes(),
    );
    h.eat(&max_len.to_le_bytes());
    labels.labels.iter().for_each(|l| {
        h.eat(l.as_bytes());
    });
    // Metrics depend on the precision (fp32 keys are those written before it existed).
    if precision != Precision::Fp32 {
        h.eat(precision.name().as_bytes());
    }
    h.finish()
}

/// Metrics of a reference model (forget, retain, dev, test, MIA AUC), cached in `cache`
/// under `key` ([`eval_key`]): evaluating the retain set is the slowest part of a short
/// run, and the same references recur across runs.
fn cached_eval(key: u64, cache: &Path, what: &str, compute: impl FnOnce() -> Result<Evaluation>) -> Result<Value> {
    let path = cache.join(format!("{key:016x}.json"));
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            eprintln!("{what}: metrics from the evaluation cache {}", path.display());
            return Ok(v);
        }
    }
    eprintln!("evaluating the {what} model (forget, retain, dev, test) ...");
    let v = metrics_json(&compute()?);
    std::fs::create_dir_all(cache).map_err(|e| Error::io(cache, e))?;
    save_json(&path, &v)?;
    Ok(v)
}

/// [`cached_eval`] of one classifier.
fn cached_eval_model<B: Backend>(
    clf: &Classifier, model: &mut crate::model::Model<B>, data: &Dataset, forget: &[usize], max_len: usize,
    cache: &Path, what: &str,
) -> Result<Value> {
    let key = eval_key(&[&clf.weights], data, forget, max_len, &clf.labels, model.precision());
    cached_eval(key, cache, what, || {
        evaluate(clf, model, data, Some(forget), true, max_len)
    })
}

/// The original (model to be unlearned): the given model when its head has the data's
/// labels, else a fine-tune of it with `train` (said on stderr, record returned).
fn original<B: Backend>(
    be: B, inp: &RunInputs, base: &Base, labels: &LabelMap, data: &Dataset,
) -> Result<(Classifier, Option<Value>)> {
    if base.head_matches(labels) {
        return base.classifier(labels, inp.train.seed).map(|c| (c, None));
    }
    let dir = inp.out.join("original");
    if dir.join("train.json").exists() {
        eprintln!("original: reusing the fine-tuned model in {}", dir.display());
        let clf = Classifier::load(&dir.join("model"))?;
        let rec: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("train.json")).map_err(|e| Error::io(dir.join("train.json"), e))?,
        )
        .map_err(|e| Error::file(dir.join("train.json"), e.to_string()))?;
        return Ok((clf, Some(rec)));
    }
    eprintln!(
        "{} has no classification head for the {} labels of {}: fine-tuning the original first ({} epochs, lr {}) into {}",
        inp.model.display(),
        labels.len(),
        inp.data.display(),
        inp.train.epochs,
        inp.train.lr,
        dir.display()
    );
    let resume = dir.join("checkpoints").exists();
    let (clf, rec) = finetune(
        be,
        base.classifier(labels, inp.train.seed)?,
        &inp.model,
        &data.train,
        data,
        &inp.train,
        &dir,
        resume,
        inp.quiet,
    )?;
    let rec = json!({"config": inp.train, "record": rec});
    save_json(&dir.join("train.json"), &rec)?;
    Ok((clf, Some(rec)))
}

/// Runs unlearning end to end and writes the run folder. `data` and `base` are the
/// dataset and model of `inp.data` / `inp.model`, read (and so checked) by the caller
/// before the output folder was touched. `mk` makes a backend handle for each model the
/// run needs (original/unlearned, reference).
pub fn run<B: Backend>(
    mk: &dyn Fn() -> Result<B>, data: Dataset, base: Base, inp: RunInputs, cfg: RunConfig,
) -> Result<()> {
    let t_all = Instant::now();
    let labels = base.labels_for(&data)?;
    let (orig, orig_training) = original(mk()?, &inp, &base, &labels, &data)?;
    let forget_path = inp.out.join("forget.txt");
    write_indices(&forget_path, &inp.forget)?;
    let (forget_sents, retain_sents) = split_train(&data.train, &inp.forget);
    eprintln!(
        "forget set: {} of {} train sentences -> {}",
        inp.forget.len(),
        data.train.len(),
        forget_path.display()
    );

    // Reference metrics of the original (cached so a resumed run does not redo them).
    let max_tokens = (2 * cfg.bf + cfg.br).max(8) * cfg.max_len;
    let mut model = model_from_weights(mk()?, &orig.cfg, &orig.weights, orig.labels.len(), max_tokens)
        .with_precision(cfg.precision);
    let windows = orig
        .encoder
        .encode_sentences(&data.train, Some(&orig.labels), cfg.max_len)?;
    let mut is_forget = vec![false; data.train.len()];
    inp.forget.iter().for_each(|&i| is_forget[i] = true);
    let forget_w: Vec<usize> = (0..windows.len()).filter(|&i| is_forget[windows[i].sentence]).collect();
    let retain_w: Vec<usize> = (0..windows.len())
        .filter(|&i| !is_forget[windows[i].sentence])
        .collect();
    let forget_windows: Vec<Window> = forget_w.iter().map(|&i| windows[i].clone()).collect();
    let style = orig.position_style();
    let t_eval = Instant::now();
    let cache = inp
        .eval_cache
        .clone()
        .unwrap_or_else(|| inp.out.join("checkpoints").join("eval-cache"));
    let ref_original = cached_eval_model(&orig, &mut model, &data, &inp.forget, cfg.max_len, &cache, "original")?;
    let orig_eval_seconds = t_eval.elapsed().as_secs_f64();
    let (emb_before, emb_labels) = labelled_hidden(&mut model, &forget_windows, style);
    let target = ref_original["dev"]["f1"].as_f64().unwrap_or(0.0);
    let orig_retain_f1 = ref_original["retain"]["f1"].as_f64().unwrap_or(f64::NAN);
    // SPEC section 5: the original fits its training data. The retain set is most of it.
    let orig_fits = orig_retain_f1 >= FIT_F1;
    eprintln!(
        "original: forget F1 {:.4}, retain F1 {:.4}, dev F1 {:.4}, test F1 {:.4}, MIA AUC {:.4}",
        ref_original["forget"]["f1"].as_f64().unwrap_or(f64::NAN),
        ref_original["retain"]["f1"].as_f64().unwrap_or(f64::NAN),
        target,
        ref_original["test"]["f1"].as_f64().unwrap_or(f64::NAN),
        ref_original["mia_auc"].as_f64().unwrap_or(f64::NAN)
    );
    if !orig_fits {
        eprintln!("warning: {}", unfitted_original(orig_retain_f1));
    }

    let mut state = LoopState::default();
    let mut sisa_parts: Option<(sisa::Sisa, Value)> = None;
    let mut sisa_ref_seconds = 0.0;
    let pretrained = inp.base.as_ref().unwrap_or(&base);
    let pretrained_dir = pretrained.dir.clone();
    let unlearned: Final = match cfg.method {
        Method::Retrain => {
            check_pretrained(cfg.method, inp.base.is_some(), &base, &labels)?;
            let t0 = Instant::now();
            let dir = inp.out.join("retrain");
            let resume = dir.join("checkpoints").exists();
            let (clf, rec) = finetune(
                mk()?,
                pretrained.classifier(&labels, inp.train.seed)?,
                &pretrained_dir,
                &retain_sents,
                &data,
                &inp.train,
                &dir,
                resume,
                inp.quiet,
            )?;
            state.steps = step_records(rec.step_losses.iter().copied());
            state.step = rec.steps;
            state.tokens = rec.tokens;
            state.seconds = t0.elapsed().as_secs_f64();
            state.stop_reason = format!("retrained {} epochs on the retain set", inp.train.epochs);
            state.loss_scaler = rec.loss_scaler;
            model = clf.model(mk()?, max_tokens).with_precision(cfg.precision);
            Final::Model(Box::new(clf))
        }
        Method::Sisa => {
            check_pretrained(cfg.method, inp.base.is_some(), &base, &labels)?;
            let scfg = sisa::SisaConfig {
                shards: cfg.shards.unwrap_or(sisa::DEFAULT_SHARDS),
                seed: cfg.seed,
                recipe: inp.train.clone(),
                cache: inp.sisa_shards.clone(),
            };
            let sisa = sisa::Sisa::original_shards(mk, pretrained, &labels, &data, &scfg, &inp.out, inp.quiet)?;
            let mut before = sisa.original_ensemble()?;
            before.precision = cfg.precision;
            let weights: Vec<&HostWeights> = before.members.iter().map(|m| &m.weights).collect();
            let key = eval_key(&weights, &data, &inp.forget, cfg.max_len, &labels, cfg.precision);
            let t_ref = Instant::now();
            let ref_sisa = cached_eval(key, &cache, "SISA original ensemble", || {
                before.evaluate(mk, &data, Some(&inp.forget), true, cfg.max_len, max_tokens)
            })?;
            sisa_ref_seconds = t_ref.elapsed().as_secs_f64();
            drop(before);
            let mut u = sisa.unlearn(
                mk,
                pretrained,
                &labels,
                &data,
                &inp.train,
                &inp.forget,
                &inp.out,
                inp.quiet,
            )?;
            u.ensemble.precision = cfg.precision;
            state.steps = step_records(u.retrained.iter().flat_map(|r| r.record.step_losses.iter().copied()));
            state.step = u.steps();
            state.tokens = u.tokens();
            state.seconds = u.seconds();
            let retrained: Vec<usize> = u.retrained.iter().map(|r| r.shard).collect();
            state.stop_reason = format!(
                "retrained shard(s) {retrained:?} of {} (those holding forget sentences) on their sentences minus the forget set",
                sisa.assignment.len()
            );
            sisa_parts = Some((sisa, ref_sisa));
            Final::Sisa(u)
        }
        _ => Final::Model(Box::new(unlearn_loop(
            &inp,
            &cfg,
            &orig,
            &mut model,
            &windows,
            &forget_w,
            &retain_w,
            &forget_sents,
            target,
            &mut state,
        )?)),
    };

    // Final metrics, the retrained reference, and the run folder.
    let t_final = Instant::now();
    let (ev, emb_after) = match &unlearned {
        Final::Model(clf) => {
            let ev = evaluate(clf, &mut model, &data, Some(&inp.forget), true, cfg.max_len)?;
            (ev, labelled_hidden(&mut model, &forget_windows, style).0)
        }
        // An ensemble has no one embedding space: report.html says so instead of a picture.
        Final::Sisa(u) => (
            u.ensemble
                .evaluate(mk, &data, Some(&inp.forget), true, cfg.max_len, max_tokens)?,
            vec![],
        ),
    };
    let metrics = metrics_json(&ev);
    let mut reference = json!({"original": ref_original});
    reference["original"]["fits_training_data"] = json!(orig_fits);
    if !orig_fits {
        reference["original"]["warning"] = json!(unfitted_original(orig_retain_f1));
    }
    if let Some((_, ref_sisa)) = &sisa_parts {
        reference["sisa_original"] = ref_sisa.clone();
    }
    if let Some(dir) = &inp.retrain_ref {
        let rclf = Classifier::load(dir)?;
        let mut rmodel = rclf.model(mk()?, max_tokens).with_precision(cfg.precision);
        let rm = cached_eval_model(
            &rclf,
            &mut rmodel,
            &data,
            &inp.forget,
            cfg.max_len,
            &cache,
            "retrained reference",
        )?;
        let gap: serde_json::Map<String, Value> = ["forget", "retain", "dev", "test"]
            .iter()
            .map(|s| {
                (
                    format!("{s}_f1"),
                    json!(metrics[s]["f1"].as_f64().unwrap_or(f64::NAN) - rm[s]["f1"].as_f64().unwrap_or(f64::NAN)),
                )
            })
            .collect();
        reference["privleak"] = json!(privleak(ev.mia_auc, rm["mia_auc"].as_f64().unwrap_or(f64::NAN)));
        reference["retrain"] = rm;
        reference["retrain"]["model"] = json!(dir);
        reference["gap_to_retrain"] = Value::Object(gap);
    }
    let final_eval_seconds = t_final.elapsed().as_secs_f64();
    if let Final::Model(clf) = &unlearned {
        let model_dir = inp.out.join("model");
        save_model_dir(&model_dir, &clf.cfg, &clf.weights)?;
        copy_tokenizer_files(&inp.model, &model_dir)?;
    }

    let rule = match (cfg.method, cfg.steps) {
        (Method::Retrain | Method::Sisa, _) => "none: trains to the end of the recipe",
        (_, Some(_)) => "fixed steps",
        (_, None) => "forget F1 <= original dev F1",
    };
    let mut report = json!({
        "method": cfg.method.name(),
        "config": {
            "unlearning": cfg,
            "original_training": inp.train,
            "model": inp.model, "data": inp.data, "out": inp.out,
            "retrain_ref": inp.retrain_ref,
            "backend": model.backend_line(),
            // the host's CPU, SIMD build and GEMM library: what the CPU's times depend on
            "host": crate::backend::cpu::host(),
            "precision": cfg.precision,
            "versions": {"deepcut-fast": env!("CARGO_PKG_VERSION")},
        },
        "forget": {"file": forget_path, "source": inp.forget_file, "ratio": inp.forget_ratio, "count": inp.forget.len(), "train_sentences": data.train.len()},
        "metrics": metrics,
        "reference": reference,
        "stopping": {"rule": rule, "target_f1": target, "check_every": cfg.check_every, "reason": state.stop_reason, "steps": state.step},
        "cost": {
            "seconds": state.seconds,
            "steps": state.step,
            "tokens": state.tokens,
            "tokens_per_second": state.tokens as f64 / state.seconds.max(1e-9),
            "peak_memory_bytes": peak_memory_bytes(),
            "stopping_rule_eval_seconds": state.eval_seconds,
            "reference_eval_seconds": orig_eval_seconds + sisa_ref_seconds + final_eval_seconds,
            "wall_seconds": t_all.elapsed().as_secs_f64(),
            "skipped_steps": state.loss_scaler.as_ref().map_or(0, |s| s.skipped_steps),
        },
        "precision": precision_json(cfg.precision, state.loss_scaler.as_ref()),
        "history": {"steps": state.steps, "checks": state.checks},
        "original_training": orig_training,
    });
    if let (Some((sisa, _)), Final::Sisa(u)) = (&sisa_parts, &unlearned) {
        report["config"]["sisa"] = json!({
            "shards": sisa.assignment.len(), "original_shards": sisa.cache, "base": pretrained_dir,
            "recipe": inp.train, "seed": cfg.seed,
        });
        report["cost"]["retrained_shards"] = json!(u.retrained.iter().map(|r| r.shard).collect::<Vec<_>>());
        report["cost"]["original_shards"] = sisa.original_cost();
        report["sisa"] = sisa.report(u);
    }
    save_json(&inp.out.join("report.json"), &report)?;
    let html = crate::report::run_report::render(
        &report,
        &emb_before,
        &emb_after,
        &emb_labels,
        &labels.labels,
        orig.cfg.hidden_size,
    );
    write_atomic(&inp.out.join("report.html"), html.as_bytes())?;
    eprintln!("{}", crate::report::run_report::summary(&report));
    eprintln!("run folder: {}", inp.out.display());
    Ok(())
}

/// What a run says of an original whose retain F1 is `f1`, below FIT_F1.
fn unfitted_original(f1: f64) -> String {
    format!(
        "the original's retain F1 is {f1:.4}, below {FIT_F1}: it does not fit its training data (SPEC section 5), so \
         unlearning has little to remove and the forget metrics say little; fine-tune it further (`deepcut-fast \
         train`, more epochs)"
    )
}

/// A step of the unlearning loop once enqueued: finished already (the baselines, which
/// read their losses as they go) or in flight in its DeepCUT readback slot.
enum Started {
    Ready(deepcut::Finished),
    Flying,
}

/// The error of a loss that is not finite at step `at`.
fn check_losses(
    losses: &StepLosses, at: u64, ckpt_dir: &std::path::Path, writer: &mut checkpoint::Writer,
) -> Result<()> {
    for (name, v) in [("cross-entropy", losses.ce), ("contrastive", losses.contrast)] {
        if !v.is_finite() {
            return Err(Error::Numeric(format!(
                "{name} loss is {v} at step {at}; stopped, {}",
                checkpoint::last_good_after(writer, ckpt_dir)
            )));
        }
    }
    Ok(())
}

/// An update's error, said with the step's (finite) losses when known.
fn overflowed(
    e: Error, losses: Option<&StepLosses>, ckpt_dir: &std::path::Path, writer: &mut checkpoint::Writer,
) -> Error {
    let with = losses.map_or(String::new(), |l| {
        format!(
            ", with finite losses (cross-entropy loss {}, contrastive loss {})",
            l.ce, l.contrast
        )
    });
    Error::Numeric(format!(
        "{e}{with}: the backward pass overflowed (learning rate too high?); stopped, {}",
        checkpoint::last_good_after(writer, ckpt_dir)
    ))
}

/// Records finished step `at` (1-based) in the loop state and the progress bar, or gives
/// the error of a non-finite loss or gradient norm.
fn record<B: Backend>(
    state: &mut LoopState, at: u64, f: deepcut::Finished, opt: &Optimizer<B>, pb: &indicatif::ProgressBar,
    ckpt_dir: &std::path::Path, writer: &mut checkpoint::Writer,
) -> Result<()> {
    let losses = f.losses;
    check_losses(&losses, at, ckpt_dir, writer)?;
    let upd = f.update.map_err(|e| overflowed(e, Some(&losses), ckpt_dir, writer))?;
    state.steps.push(StepRecord {
        step: at,
        ce: losses.ce,
        contrast: losses.contrast,
        total: losses.total,
        lr: upd.lr,
        grad_norm: (!upd.skipped).then_some(upd.grad_norm),
        loss_scale: opt.scaler.is_some().then_some(upd.loss_scale),
        skipped: upd.skipped,
    });
    state.loss_scaler = opt.scaler.clone();
    pb.inc(1);
    pb.set_message(format!(
        "ce {:.4} contrast {:.4}{}",
        losses.ce,
        losses.contrast,
        scale_message(&upd, opt.scaler.as_ref())
    ));
    Ok(())
}

/// The least time between two periodic checkpoints of the default schedule (no
/// --checkpoint-every): an interrupted run loses at most about this much work, and a run
/// on a GPU does not spend a tenth of its time taking snapshots (every 10 steps was about
/// every 0.1 s there). The last step is always saved.
const CHECKPOINT_MIN_SECONDS: f64 = 30.0;

/// The step loop of every method except retrain and sisa.
#[allow(clippy::too_many_arguments)]
fn unlearn_loop<B: Backend>(
    inp: &RunInputs, cfg: &RunConfig, orig: &Classifier, model: &mut crate::model::Model<B>, windows: &[Window],
    forget_w: &[usize], retain_w: &[usize], forget_sents: &[crate::data::Sentence], target: f64, state: &mut LoopState,
) -> Result<Classifier> {
    if cfg.bf == 0 || cfg.br == 0 {
        return Err(Error::invalid("--bf and --br must be at least 1"));
    }
    let budget = cfg
        .steps
        .unwrap_or_else(|| (cfg.max_forget_epochs * forget_w.len() as f64 / cfg.bf as f64).ceil() as u64)
        .max(1);
    let ocfg = OptimConfig {
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        warmup: (budget as f32 * cfg.warmup_ratio).round() as u64,
        total: budget,
        clip: cfg.clip,
    };
    cfg.loss_scaling.check()?;
    let mut opt = Optimizer::new(model, ocfg).with_precision(cfg.precision, cfg.loss_scaling);
    let ckpt_dir = inp.out.join("checkpoints");
    let cfg_json = serde_json::to_value(cfg).map_err(|e| Error::invalid(e.to_string()))?;
    let mut fs = Stream::new(forget_w.to_vec(), cfg.bf, cfg.seed)?;
    let mut rs = Stream::new(retain_w.to_vec(), cfg.br, cfg.seed.wrapping_add(1))?;
    // the stopping rule's sentences, tokenised once for all its checks (none with --steps)
    let check_windows = match cfg.steps {
        None => encode_for_run(orig, forget_sents, cfg.max_len)?,
        Some(_) => Vec::new(),
    };
    if inp.resume {
        if let Some((saved, path)) = checkpoint::load(&ckpt_dir, model, &mut opt)? {
            if saved["config"] != cfg_json {
                return Err(Error::file(path, "the checkpoint was written with other unlearning options; rerun with the same options or without --resume"));
            }
            *state = serde_json::from_value(saved["state"].clone())
                .map_err(|e| Error::invalid(format!("checkpoint state: {e}")))?;
            if let Some(s) = state.forget_stream {
                fs = Stream::from_state(forget_w.to_vec(), cfg.bf, s)?;
            }
            if let Some(s) = state.retain_stream {
                rs = Stream::from_state(retain_w.to_vec(), cfg.br, s)?;
            }
            eprintln!("resuming from {} at step {}", path.display(), state.step);
        }
    }
    let o_id = orig.labels.id("O").map_or(-1, |i| i as i32);
    let style = orig.position_style();
    let mut contrast = Contrast::new(&model.be, (2 * cfg.bf + cfg.br) * cfg.max_len, model.dims.hidden);
    let pb = progress(budget, cfg.method.name(), inp.quiet);
    pb.set_position(state.step);
    let t0 = Instant::now();
    let seconds_before = state.seconds;
    // checkpoints are written in the background while the steps go on
    let mut writer = checkpoint::Writer::new();
    // the run's start counts as the last checkpoint for the default schedule's interval
    let mut last_save = Instant::now();
    let save = |w: &mut checkpoint::Writer, model: &crate::model::Model<B>, opt: &Optimizer<B>, state: &LoopState| {
        w.save(&ckpt_dir, model, opt, &json!({"config": cfg_json, "state": state}))
    };
    // DeepCUT steps are pipelined (issue #6): step t is enqueued, then step t - 1's losses
    // and update stats are waited for, so the device goes on with t while the host
    // records t - 1 and assembles t + 1. Two readbacks alternate. A step whose numbers are
    // needed at once (a stopping-rule check, a checkpoint, the last step) is finished
    // before going on, so checkpoints and checks see every step up to their own. With
    // fp16 loss scaling, t is enqueued at the scale t - 1 leaves if it applies; in the
    // rare step t - 1 that overflows, t is enqueued again (`Ring::finish_before`).
    let max_tokens = (2 * cfg.bf + cfg.br) * cfg.max_len;
    let mut ring = Ring::new(&model.be, max_tokens);
    // the step (0-based) in flight, if any
    let mut flying: Option<u64> = None;
    let failed = |pb: &indicatif::ProgressBar, e: Error| {
        pb.finish_and_clear();
        e
    };
    while !state.done && state.step < budget {
        let step = state.step;
        let mode = Mode::Train { seed: cfg.seed, step };
        model.set_loss_scale(opt.loss_scale());
        let fb = fs.next_batch();
        let rb = rs.next_batch();
        let enqueue = |model: &mut crate::model::Model<B>,
                       contrast: &mut Contrast<B>,
                       opt: &mut Optimizer<B>,
                       ring: &mut Ring<B>,
                       (batch, z): &(crate::data::Batch, deepcut::ZRows)| {
            model.set_loss_scale(opt.loss_scale());
            let slot = ring.slot(step);
            deepcut::step_enqueue(model, contrast, batch, z, cfg.infonce(), cfg.gamma, mode, opt, slot);
        };
        // the DeepCUT step in flight: kept until it is finished, in case it has to run again
        let mut enqueued = None;
        let started = match cfg.method {
            Method::Deepcut => {
                let bz = deepcut::assemble(windows, &fb, &rb, style, o_id, cfg.anchors);
                state.tokens += bz.0.tokens() as u64;
                enqueue(model, &mut contrast, &mut opt, &mut ring, &bz);
                enqueued = Some(bz);
                Started::Flying
            }
            method => {
                let losses = match method {
                    Method::Finetune => methods::finetune_step(model, windows, &rb, style, mode),
                    Method::GradientAscent => methods::gradient_ascent_step(model, windows, &fb, style, mode),
                    Method::NeggradPlus => methods::neggrad_plus_step(model, windows, &fb, &rb, style, cfg.beta, mode),
                    Method::RandomLabels => methods::random_labels_step(
                        model,
                        windows,
                        &fb,
                        &rb,
                        style,
                        orig.labels.len(),
                        cfg.seed,
                        step,
                        mode,
                    ),
                    Method::Deepcut | Method::Retrain | Method::Sisa => {
                        unreachable!("deepcut is above; retrain and sisa are handled by the caller")
                    }
                };
                let rows: Vec<usize> = match method {
                    Method::Finetune => rb.clone(),
                    Method::GradientAscent => fb.clone(),
                    _ => fb.iter().chain(&rb).copied().collect(),
                };
                state.tokens += rows.iter().map(|&i| windows[i].ids.len() as u64).sum::<u64>();
                // the losses are checked before the update, which they would poison
                check_losses(&losses, step + 1, &ckpt_dir, &mut writer).map_err(|e| failed(&pb, e))?;
                let update = opt.update(model);
                Started::Ready(deepcut::Finished { losses, update })
            }
        };
        // `state.step` counts attempted steps (batches drawn, skipped fp16 steps included):
        // the budget, the stopping rule and the dropout keys follow it.
        state.step += 1;
        if let Some(prev) = flying.take() {
            let (f, again) = ring.finish_before(prev, &model.be, &mut opt);
            record(state, prev + 1, f, &opt, &pb, &ckpt_dir, &mut writer).map_err(|e| failed(&pb, e))?;
            if again {
                // fp16: step prev overflowed, so this step ran with the loss scale that
                // halved; the device skipped it
                let bz = enqueued.as_ref().expect("only DeepCUT steps are in flight");
                enqueue(model, &mut contrast, &mut opt, &mut ring, bz);
            }
        }
        let check = cfg.steps.is_none() && state.step.is_multiple_of(cfg.check_every);
        // By default a periodic checkpoint is skipped while the previous one is still being
        // written, or if one began less than CHECKPOINT_MIN_SECONDS ago: on a GPU ten steps
        // take less than writing one (~1 s for MiniLM), training must not wait for the disk,
        // and each snapshot still stops the loop to copy and check the weights and moments
        // (271 MB for MiniLM). --checkpoint-every makes them exact.
        let periodic = state.step.is_multiple_of(cfg.checkpoint_every)
            && !(cfg.checkpoint_skip_busy
                && (writer.busy() || last_save.elapsed().as_secs_f64() < CHECKPOINT_MIN_SECONDS));
        let save_now = periodic || state.step == budget;
        match started {
            Started::Ready(f) => {
                record(state, state.step, f, &opt, &pb, &ckpt_dir, &mut writer).map_err(|e| failed(&pb, e))?
            }
            Started::Flying if check || save_now => {
                let f = ring.finish(step, &model.be, &mut opt).expect("the step just enqueued");
                record(state, state.step, f, &opt, &pb, &ckpt_dir, &mut writer).map_err(|e| failed(&pb, e))?
            }
            Started::Flying => flying = Some(step),
        }
        if check {
            let te = Instant::now();
            let f1 = evaluate_encoded(orig, model, forget_sents, &check_windows).f1;
            state.eval_seconds += te.elapsed().as_secs_f64();
            state.checks.push(Check {
                step: state.step,
                forget_f1: f1,
            });
            pb.println(format!(
                "step {}: forget F1 {:.4} (target <= {:.4})",
                state.step, f1, target
            ));
            if f1 <= target {
                state.done = true;
                state.stop_reason = format!(
                    "forget F1 {f1:.4} <= original dev F1 {target:.4} at step {}",
                    state.step
                );
            }
        }
        state.forget_stream = Some(fs.state());
        state.retain_stream = Some(rs.state());
        state.seconds = seconds_before + t0.elapsed().as_secs_f64();
        if save_now || state.done {
            debug_assert!(flying.is_none(), "a checkpoint with a step in flight");
            save(&mut writer, model, &opt, state)?;
            last_save = Instant::now();
        }
        writer.maybe_abort_after(state.step)?;
    }
    // the last checkpoint is complete before the run reports
    writer.wait()?;
    // the loop ends on a finished step: the last of the budget, or a check that stopped it
    debug_assert!(flying.is_none(), "a step left in flight");
    pb.finish_and_clear();
    if state.stop_reason.is_empty() {
        state.stop_reason = match cfg.steps {
            Some(n) => format!("fixed budget of {n} steps"),
            None => format!(
                "budget of {} passes over the forget set ({budget} steps) reached",
                cfg.max_forget_epochs
            ),
        };
    }
    let mut clf = Classifier {
        cfg: orig.cfg.clone(),
        labels: orig.labels.clone(),
        encoder: orig.encoder.clone(),
        weights: model.to_host(),
    };
    clf.cfg.id2label = Some(orig.labels.labels.clone());
    Ok(clf)
}
