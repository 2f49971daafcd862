//! Fine-tuning a token classifier with cross-entropy (the `train` command, the original
//! model of a run, the retrain reference, and the shards of SISA). Dev F1 after every
//! epoch, best model kept, checkpoints for --resume.
use super::checkpoint;
use super::optim::{LossScaler, LossScaling, OptimConfig, Optimizer};
use super::readback::{Finished, Ring};
use crate::backend::{Backend, Precision};
use crate::data::{bucketed_batches, Batch, Encoder, LabelMap, Sentence};
use crate::error::{Error, Result};
use crate::eval::evaluate::{evaluate_encoded, Dataset};
use crate::infer::{encode_for_run, model_from_weights, Classifier};
use crate::model::{copy_tokenizer_files, init_head, save_model_dir, HostWeights, Mode, Model, ModelConfig};
use crate::util::progress;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;

/// The recipe. Defaults: the measured recipe that fits WNUT17's training data with
/// MiniLM (BENCHMARKS.md); SPEC section 5 asks the original to reach train F1 >= 95.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FinetuneConfig {
    pub epochs: usize,
    pub lr: f32,
    /// Sentences (windows) per batch.
    pub batch: usize,
    pub max_len: usize,
    pub seed: u64,
    /// Fraction of all steps spent warming up.
    pub warmup_ratio: f32,
    pub weight_decay: f32,
    pub clip: f32,
    /// Write a checkpoint every this many steps (and at every epoch end).
    pub checkpoint_every: u64,
    /// Which epoch's weights become the model.
    #[serde(default)]
    pub select: Select,
    /// The training F1 an epoch must reach to be kept by `Select::Best` (SPEC section 5:
    /// FIT_F1); 0 keeps the best dev F1 of all epochs, without measuring the training F1.
    #[serde(default = "default_fit_f1")]
    pub fit_f1: f64,
    /// Precision of activations and GEMM inputs (SPEC section 7, `--precision`).
    #[serde(default)]
    pub precision: Precision,
    /// fp16 dynamic loss scaling (used only in fp16).
    #[serde(default)]
    pub loss_scaling: LossScaling,
}

/// `--select`: the epoch with the best dev F1 among those that fit their training data
/// (train F1 >= FIT_F1, SPEC section 5; the last epoch, said so, when none does), or the
/// last epoch. Dev F1 alone can pick an early epoch within noise of later ones that has not
/// fitted its data (measured: a WNUT17 retrain peaked at epoch 4 with train F1 .83; the
/// original's recipe at epoch 3 of 12, dev .5763 against .5748 at epoch 9, train F1 .74),
/// and a model that never fitted its data has nothing to unlearn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Select {
    #[default]
    Best,
    Last,
}

/// The training F1 from which a model counts as fitting its data (SPEC section 5: "train
/// F1 of 95 or more"); `--fit-f1`'s default.
pub const FIT_F1: f64 = 0.95;

fn default_fit_f1() -> f64 {
    FIT_F1
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            epochs: 12,
            lr: 1e-4,
            batch: 32,
            max_len: 128,
            seed: 0,
            warmup_ratio: 0.1,
            weight_decay: 0.01,
            clip: 1.0,
            checkpoint_every: 200,
            select: Select::Best,
            fit_f1: FIT_F1,
            precision: Precision::Fp32,
            loss_scaling: LossScaling::default(),
        }
    }
}

/// What the pretrained model folder gives fine-tuning: config, weights (with or without
/// a head) and tokenizer.
pub struct Base {
    pub dir: std::path::PathBuf,
    pub cfg: ModelConfig,
    pub weights: HostWeights,
    pub has_head: bool,
    pub encoder: Encoder,
}

impl Base {
    pub fn load(dir: &Path) -> Result<Base> {
        let (cfg, weights, has_head) = crate::model::load_model_dir(dir)?;
        let tok = dir.join("tokenizer.json");
        let mut encoder = Encoder::from_file(&tok)?;
        encoder.fit_model(&tok, cfg.vocab_size, crate::infer::max_window(&cfg))?;
        Ok(Base {
            dir: dir.to_path_buf(),
            cfg,
            weights,
            has_head,
            encoder,
        })
    }

    /// The label map a run on `data` uses (SPEC section 1): the model's own when it has a
    /// head (every tag of the data must be in it: an error naming the file otherwise),
    /// else the tags of train, sorted, O first.
    pub fn labels_for(&self, data: &Dataset) -> Result<LabelMap> {
        let labels = match (&self.cfg.id2label, self.has_head) {
            (Some(l), true) => LabelMap { labels: l.clone() },
            _ => LabelMap::from_sentences(&data.train),
        };
        data.check_labels(&labels).map_err(|e| {
            if self.has_head {
                Error::invalid(format!(
                    "the labels of the model in {} do not cover the data: {e}",
                    self.dir.display()
                ))
            } else {
                e
            }
        })?;
        Ok(labels)
    }

    /// Whether the head's labels are exactly `labels`.
    pub fn head_matches(&self, labels: &LabelMap) -> bool {
        self.has_head && self.cfg.id2label.as_ref() == Some(&labels.labels)
    }

    /// A classifier for `labels`: the existing head when it has these labels, else a
    /// fresh head (seeded).
    pub fn classifier(&self, labels: &LabelMap, seed: u64) -> Result<Classifier> {
        let mut cfg = self.cfg.clone();
        let mut weights = self.weights.clone();
        if !self.head_matches(labels) {
            weights.tensors.remove("classifier.weight");
            weights.tensors.remove("classifier.bias");
            init_head(&mut weights, &cfg, labels.len(), seed)?;
            cfg.id2label = Some(labels.labels.clone());
        }
        Ok(Classifier {
            cfg,
            labels: labels.clone(),
            encoder: self.encoder.clone(),
            weights,
        })
    }
}

/// Per-epoch record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train_loss: f64,
    pub dev_f1: f64,
    /// F1 on the training sentences (evaluation mode), measured where `--select best`
    /// needed it: epochs whose dev F1 beat every fitting epoch's before, and the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_f1: Option<f64>,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FinetuneResult {
    pub epochs: Vec<EpochRecord>,
    /// The epoch whose weights are the model (`--select`), and its dev F1.
    pub best_epoch: usize,
    pub best_dev_f1: f64,
    /// Whether the model fits its training data (train F1 >= `fit_f1`); None under
    /// `--select last`, which does not measure it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fits: Option<bool>,
    /// Steps attempted (batches drawn), skipped fp16 steps included.
    pub steps: u64,
    pub tokens: u64,
    pub seconds: f64,
    /// Training loss of every step (for the report's curves).
    pub step_losses: Vec<f32>,
    /// fp16 dynamic loss scaling at the end (final scale, skipped steps, history); None
    /// in fp32 and bf16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<LossScaler>,
}

impl FinetuneResult {
    /// Before the first epoch: nothing kept yet (a best dev F1 below any).
    fn empty() -> FinetuneResult {
        FinetuneResult {
            epochs: vec![],
            best_epoch: 0,
            best_dev_f1: -1.0,
            fits: None,
            steps: 0,
            tokens: 0,
            seconds: 0.0,
            step_losses: vec![],
            loss_scaler: None,
        }
    }
}

/// Fine-tunes `clf` on `train` (sentences), keeps the best dev-F1 weights in
/// `out/model` (Hugging Face layout), checkpoints into `out/checkpoints`.
/// Returns the best classifier and the record.
#[allow(clippy::too_many_arguments)]
pub fn finetune<B: Backend>(
    be: B, mut clf: Classifier, tokenizer_dir: &Path, train: &[Sentence], data: &Dataset, fc: &FinetuneConfig,
    out: &Path, resume: bool, quiet: bool,
) -> Result<(Classifier, FinetuneResult)> {
    if fc.batch == 0 || fc.epochs == 0 || !(fc.lr > 0.0 && fc.lr.is_finite()) {
        return Err(Error::invalid(
            "--batch, --epochs and --lr must be positive (and --lr finite)",
        ));
    }
    if !(0.0..=1.0).contains(&fc.fit_f1) {
        return Err(Error::invalid(format!(
            "--fit-f1 {}: must be between 0 and 1",
            fc.fit_f1
        )));
    }
    // encoded once: the training windows also serve the training F1 of `select_best`
    // (what encode_for_run gives labelled sentences), dev's every epoch's evaluation
    let windows = clf.encoder.encode_sentences(train, Some(&clf.labels), fc.max_len)?;
    let dev_windows = encode_for_run(&clf, &data.dev, fc.max_len)?;
    let lengths: Vec<usize> = windows.iter().map(|w| w.ids.len()).collect();
    let style = clf.position_style();
    let per_epoch = bucketed_batches(&lengths, fc.batch, fc.seed, 0).len() as u64;
    let total = per_epoch * fc.epochs as u64;
    let ocfg = OptimConfig {
        lr: fc.lr,
        weight_decay: fc.weight_decay,
        warmup: (total as f32 * fc.warmup_ratio).round() as u64,
        total,
        clip: fc.clip,
    };
    fc.loss_scaling.check()?;
    let mut model = model_from_weights(be, &clf.cfg, &clf.weights, clf.labels.len(), fc.batch * fc.max_len)
        .with_precision(fc.precision);
    let mut opt = Optimizer::new(&model, ocfg).with_precision(fc.precision, fc.loss_scaling);
    let ckpt_dir = out.join("checkpoints");
    let model_dir = out.join("model");

    let config_json = serde_json::to_value(fc).map_err(|e| Error::invalid(e.to_string()))?;
    let mut rec = FinetuneResult::empty();
    let (mut epoch, mut batch_in_epoch) = (0usize, 0usize);
    if resume {
        if let Some((state, path)) = checkpoint::load(&ckpt_dir, &mut model, &mut opt)? {
            if state["config"] != config_json {
                return Err(Error::file(path, "the checkpoint was written with other training options; rerun with the same options or without --resume"));
            }
            rec = serde_json::from_value(state["record"].clone())
                .map_err(|e| Error::invalid(format!("checkpoint record: {e}")))?;
            epoch = state["epoch"].as_u64().unwrap_or(0) as usize;
            batch_in_epoch = state["batch_in_epoch"].as_u64().unwrap_or(0) as usize;
            eprintln!(
                "resuming from {} at epoch {}, batch {}",
                path.display(),
                epoch + 1,
                batch_in_epoch
            );
        }
    }
    let t_start = std::time::Instant::now();
    let seconds_before = rec.seconds;
    let mut ring = Ring::new(&model.be, fc.batch * fc.max_len);
    // checkpoints, and the best model so far, are written in the background while the
    // steps go on
    let mut writer = checkpoint::Writer::new();
    while epoch < fc.epochs {
        let t_epoch = std::time::Instant::now();
        let batches = bucketed_batches(&lengths, fc.batch, fc.seed, epoch as u64);
        let pb = progress(batches.len() as u64, &format!("epoch {}", epoch + 1), quiet);
        pb.set_position(batch_in_epoch as u64);
        let mut sums = (0f64, 0usize);
        // Steps are pipelined (issue #6): step s's loss and update stats are read after
        // step s + 1 is enqueued (train::readback), except where a checkpoint or the end
        // of the epoch needs them at once. With fp16 loss scaling, s + 1 is enqueued at the
        // scale s leaves if it applies; in the rare step s that overflows, s + 1 is
        // enqueued again (`Ring::finish_before`).
        let mut flying: Option<u64> = None;
        while batch_in_epoch < batches.len() {
            let batch = Batch::gather(&windows, &batches[batch_in_epoch], style);
            // Dropout is keyed by the attempted step (equal to the applied one unless an
            // fp16 step was skipped), so a batch after a skipped step draws fresh masks.
            let step = rec.steps;
            let enqueue = |model: &mut Model<B>, opt: &mut Optimizer<B>, ring: &mut Ring<B>| {
                model.forward(&batch.inputs, Mode::Train { seed: fc.seed, step });
                model.zero_grads();
                model.backward(opt.loss_scale() / batch.labelled().max(1) as f32, None);
                // the loss is read after backward is enqueued (backward leaves the losses
                // as forward wrote them), with the update, a step later
                ring.slot(step).start(model, batch.labelled(), None, opt);
            };
            enqueue(&mut model, &mut opt, &mut ring);
            rec.steps += 1;
            rec.tokens += batch.tokens() as u64;
            batch_in_epoch += 1;
            if let Some(prev) = flying.take() {
                let (f, again) = ring.finish_before(prev, &model.be, &mut opt);
                record_step(f, prev, epoch, &mut rec, &mut sums, &opt, &pb, &ckpt_dir, &mut writer)?;
                if again {
                    // fp16: step prev overflowed, so this step ran with the loss scale
                    // that halved; the device skipped it
                    enqueue(&mut model, &mut opt, &mut ring);
                }
            }
            let save_now = rec.steps.is_multiple_of(fc.checkpoint_every);
            if save_now || batch_in_epoch == batches.len() {
                let f = ring.finish(step, &model.be, &mut opt).expect("the step just enqueued");
                record_step(f, step, epoch, &mut rec, &mut sums, &opt, &pb, &ckpt_dir, &mut writer)?;
            } else {
                flying = Some(step);
            }
            if save_now {
                rec.seconds = seconds_before + t_start.elapsed().as_secs_f64();
                let state =
                    json!({"config": config_json, "record": rec, "epoch": epoch, "batch_in_epoch": batch_in_epoch});
                writer.save(&ckpt_dir, &model, &opt, &state)?;
            }
            writer.maybe_abort_after(rec.steps)?;
        }
        let (loss_sum, loss_n) = sums;
        pb.finish_and_clear();
        let dev = evaluate_encoded(&clf, &mut model, &data.dev, &dev_windows);
        let train_loss = loss_sum / loss_n.max(1) as f64;
        let last = epoch + 1 == fc.epochs;
        let mut train_f1 = None;
        let write_model = match fc.select {
            Select::Last => {
                if last {
                    rec.best_dev_f1 = dev.f1;
                    rec.best_epoch = epoch + 1;
                }
                last
            }
            Select::Best => {
                let (kept, f1) = select_best(&mut rec, epoch + 1, dev.f1, last, fc.fit_f1, || {
                    Ok(evaluate_encoded(&clf, &mut model, train, &windows).f1)
                })?;
                train_f1 = f1;
                kept
            }
        };
        eprintln!(
            "epoch {}: train loss {:.4}, dev F1 {:.4}{}{} ({:.0} s)",
            epoch + 1,
            train_loss,
            dev.f1,
            train_f1.map_or(String::new(), |f| format!(", train F1 {f:.4}")),
            if write_model { ", kept" } else { "" },
            t_epoch.elapsed().as_secs_f64()
        );
        if rec.fits == Some(false) {
            eprintln!(
                "warning: no epoch reached train F1 {} (SPEC section 5: the model must fit its training data, or \
                 unlearning has little to remove): kept the last; more epochs or a higher --lr would fit it",
                fc.fit_f1
            );
        }
        rec.epochs.push(EpochRecord {
            epoch: epoch + 1,
            train_loss,
            dev_f1: dev.f1,
            train_f1,
            seconds: t_epoch.elapsed().as_secs_f64(),
        });
        epoch += 1;
        batch_in_epoch = 0;
        rec.seconds = seconds_before + t_start.elapsed().as_secs_f64();
        let state = json!({"config": config_json, "record": rec, "epoch": epoch, "batch_in_epoch": 0});
        if write_model {
            // written in the background before this epoch's checkpoint (90 MB for MiniLM,
            // mostly fsync), so the checkpoint that records it lands after it
            let (dir, cfg, weights, tok) = (
                model_dir.clone(),
                clf.cfg.clone(),
                model.to_host(),
                tokenizer_dir.to_path_buf(),
            );
            writer.save_with(&ckpt_dir, &model, &opt, &state, move || {
                save_model_dir(&dir, &cfg, &weights)?;
                copy_tokenizer_files(&tok, &dir).map(|_| ())
            })?;
        } else {
            writer.save(&ckpt_dir, &model, &opt, &state)?;
        }
    }
    // the last checkpoint and the best model are complete before training reports
    writer.wait()?;
    // The best epoch's weights are what this returns (and what out/model holds).
    let (_, best, _) = crate::model::load_model_dir(&model_dir)?;
    clf.weights = best;
    Ok((clf, rec))
}

/// `--select best`'s decision after epoch `epoch` (1-based) with dev F1 `dev_f1`: whether
/// its weights become the model (recorded in `rec`), and its training F1 where measured.
/// An epoch fits when that F1 is at least `fit`. `train_f1` measures it, and is called
/// only where it can change the choice: an epoch that beats every fitting one on dev, or
/// the last while none fits (never with `fit` <= 0, where every epoch fits). When no
/// epoch fits, the last is kept, with `rec.fits` false.
fn select_best(
    rec: &mut FinetuneResult, epoch: usize, dev_f1: f64, last: bool, fit: f64, train_f1: impl FnOnce() -> Result<f64>,
) -> Result<(bool, Option<f64>)> {
    let unfitted = rec.fits != Some(true);
    let better = dev_f1 > rec.best_dev_f1;
    let mut f1 = None;
    if better || (last && unfitted) {
        let fits = if fit > 0.0 {
            let t = train_f1()?;
            f1 = Some(t);
            t >= fit
        } else {
            true
        };
        if fits && (better || unfitted) {
            (rec.best_dev_f1, rec.best_epoch, rec.fits) = (dev_f1, epoch, Some(true));
            return Ok((true, f1));
        }
    }
    if last && unfitted {
        (rec.best_dev_f1, rec.best_epoch, rec.fits) = (dev_f1, epoch, Some(false));
        return Ok((true, f1));
    }
    Ok((false, f1))
}

/// An update's error in fine-tuning, said with the step's (finite) loss when known.
fn overflowed(e: Error, loss: Option<f32>, epoch: usize, ckpt_dir: &Path, writer: &mut checkpoint::Writer) -> Error {
    let with = loss.map_or(String::new(), |l| format!(", with a finite cross-entropy loss {l}"));
    Error::Numeric(format!(
        "{e} (epoch {}){with}: the backward pass overflowed (learning rate too high?); stopped, {}",
        epoch + 1,
        checkpoint::last_good_after(writer, ckpt_dir)
    ))
}

/// Records finished fine-tuning step `step` (0-based) of `epoch` (0-based), or gives the
/// error of a non-finite loss or gradient norm.
#[allow(clippy::too_many_arguments)]
fn record_step<B: Backend>(
    f: Finished, step: u64, epoch: usize, rec: &mut FinetuneResult, sums: &mut (f64, usize), opt: &Optimizer<B>,
    pb: &indicatif::ProgressBar, ckpt_dir: &Path, writer: &mut checkpoint::Writer,
) -> Result<()> {
    let loss = f.losses.ce;
    if !loss.is_finite() {
        pb.finish_and_clear();
        return Err(Error::Numeric(format!(
            "cross-entropy loss is {loss} at step {} (epoch {}); stopped, {}",
            step + 1,
            epoch + 1,
            checkpoint::last_good_after(writer, ckpt_dir)
        )));
    }
    let upd = f.update.map_err(|e| {
        pb.finish_and_clear();
        overflowed(e, Some(loss), epoch, ckpt_dir, writer)
    })?;
    rec.step_losses.push(loss);
    sums.0 += loss as f64;
    sums.1 += 1;
    rec.loss_scaler = opt.scaler.clone();
    pb.inc(1);
    pb.set_message(format!("loss {loss:.4}{}", scale_message(&upd, opt.scaler.as_ref())));
    Ok(())
}

/// The progress-bar suffix of a step with fp16 loss scaling ("" without): the scale the
/// next step uses and the steps skipped so far, and whether this one was.
pub fn scale_message(upd: &super::optim::UpdateStats, scaler: Option<&LossScaler>) -> String {
    match scaler {
        None => String::new(),
        Some(sc) => format!(
            " | fp16 loss scale 2^{} ({} skipped{})",
            sc.scale.log2(),
            sc.skipped_steps,
            if upd.skipped { ", this step overflowed" } else { "" }
        ),
    }
}

/// The record as JSON for reports.
pub fn record_json(rec: &FinetuneResult) -> Value {
    serde_json::to_value(rec).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `select_best` over epochs of (dev F1, train F1): (kept epochs in order, epochs
    /// whose train F1 was measured, the record).
    fn walk(epochs: &[(f64, f64)]) -> (Vec<usize>, Vec<usize>, FinetuneResult) {
        walk_at(epochs, FIT_F1)
    }
    fn walk_at(epochs: &[(f64, f64)], fit: f64) -> (Vec<usize>, Vec<usize>, FinetuneResult) {
        let mut rec = FinetuneResult::empty();
        let (mut kept, mut measured) = (vec![], vec![]);
        for (i, &(dev, train)) in epochs.iter().enumerate() {
            let last = i + 1 == epochs.len();
            let (k, f1) = select_best(&mut rec, i + 1, dev, last, fit, || {
                measured.push(i + 1);
                Ok(train)
            })
            .unwrap();
            assert_eq!(f1.is_some(), measured.last() == Some(&(i + 1)));
            if k {
                kept.push(i + 1);
            }
        }
        (kept, measured, rec)
    }

    #[test]
    fn best_is_the_best_dev_f1_among_the_epochs_that_fit() {
        // the original's recipe on WNUT17 (all-MiniLM-L6-v2, 12 epochs, lr 1e-4, CPU) as
        // measured: dev F1 and train F1 by epoch (train F1 not measured after epoch 9, where
        // no dev F1 beat .5748; any value >= .9785 there). Dev alone keeps epoch 3.
        let dev = [
            0.3765, 0.5280, 0.5763, 0.5489, 0.5591, 0.5743, 0.5500, 0.5557, 0.5748, 0.5730, 0.5744, 0.5722,
        ];
        let train = [
            0.2758, 0.5709, 0.7417, 0.8256, 0.8760, 0.9180, 0.9468, 0.9707, 0.9785, 0.98, 0.98, 0.98,
        ];
        let epochs: Vec<(f64, f64)> = dev.iter().copied().zip(train).collect();
        let (kept, measured, rec) = walk(&epochs);
        assert_eq!(kept, vec![8, 9]);
        assert_eq!((rec.best_epoch, rec.best_dev_f1, rec.fits), (9, 0.5748, Some(true)));
        // measured only where the choice could change: every epoch until one fits (each
        // beats the none-yet best), then those that beat the best fitting one on dev
        assert_eq!(measured, vec![1, 2, 3, 4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn without_a_fitting_epoch_the_last_is_kept_and_said_so() {
        let (kept, measured, rec) = walk(&[(0.5, 0.6), (0.6, 0.7), (0.55, 0.8)]);
        assert_eq!(kept, vec![3]);
        assert_eq!(measured, vec![1, 2, 3]);
        assert_eq!((rec.best_epoch, rec.best_dev_f1, rec.fits), (3, 0.55, Some(false)));
    }

    #[test]
    fn fit_zero_keeps_the_best_dev_f1_without_measuring_the_training_data() {
        let (kept, measured, rec) = walk_at(&[(0.5, 0.1), (0.6, 0.2), (0.55, 0.3)], 0.0);
        assert_eq!(kept, vec![1, 2]);
        assert!(measured.is_empty());
        assert_eq!((rec.best_epoch, rec.fits), (2, Some(true)));
    }

    #[test]
    fn a_fitting_last_epoch_below_the_best_dev_is_not_measured() {
        // epoch 2 fits and stays best; the last neither beats it nor is needed
        let (kept, measured, rec) = walk(&[(0.5, 0.96), (0.6, 0.97), (0.55, 0.99)]);
        assert_eq!(kept, vec![1, 2]);
        assert_eq!(measured, vec![1, 2]);
        assert_eq!((rec.best_epoch, rec.fits), (2, Some(true)));
    }
}
