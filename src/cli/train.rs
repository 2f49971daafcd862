//! `deepcut-fast train`: fine-tune a pretrained encoder into a token classifier (the
//! model to be unlearned, or, with --exclude, the retrained reference).
use super::{prepare_out_dir, with_backend, DeviceArgs, LossScaleArgs};
use crate::data::{read_indices, retain_indices};
use crate::error::{Error, Result};
use crate::eval::evaluate::{evaluate_split, Dataset};
use crate::infer::model_from_weights;
use crate::train::finetune::{finetune, Base, FinetuneConfig, Select, FIT_F1};
use crate::train::optim::precision_json;
use crate::util::write_atomic;
use clap::Args;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args, Clone)]
pub struct TrainOpts {
    /// Epochs over the training sentences.
    #[arg(long, default_value_t = FinetuneConfig::default().epochs)]
    pub epochs: usize,
    /// Peak learning rate (linear warm-up over 10% of steps, then linear decay).
    #[arg(long, default_value_t = FinetuneConfig::default().lr)]
    pub lr: f32,
    /// Sentences per batch.
    #[arg(long, default_value_t = FinetuneConfig::default().batch)]
    pub batch: usize,
    /// Subwords per window, special tokens included.
    #[arg(long, default_value_t = FinetuneConfig::default().max_len)]
    pub max_len: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint every this many steps (and at every epoch end).
    #[arg(long, default_value_t = FinetuneConfig::default().checkpoint_every)]
    pub checkpoint_every: u64,
    /// Which epoch becomes the model: `best`, the best dev F1 among the epochs whose train F1
    /// reaches 0.95 (SPEC section 5; the last when none does), or the last.
    #[arg(long, value_enum, default_value = "best")]
    pub select: Select,
    /// The training F1 an epoch must reach for `--select best` to keep it (SPEC section 5);
    /// 0: the best dev F1 of all epochs, the training data not evaluated.
    #[arg(long, default_value_t = FIT_F1)]
    pub fit_f1: f64,
}

impl TrainOpts {
    pub fn config(&self) -> FinetuneConfig {
        FinetuneConfig {
            epochs: self.epochs,
            lr: self.lr,
            batch: self.batch,
            max_len: self.max_len,
            seed: self.seed,
            checkpoint_every: self.checkpoint_every.max(1),
            select: self.select,
            fit_f1: self.fit_f1,
            ..FinetuneConfig::default()
        }
    }
}

#[derive(Args)]
pub struct TrainArgs {
    /// Pretrained model folder (Hugging Face layout); never modified.
    #[arg(long)]
    model: PathBuf,
    /// Dataset folder with train.conll, dev.conll, test.conll.
    #[arg(long)]
    data: PathBuf,
    /// Output folder: model/ (the epoch `--select` keeps), train.json, checkpoints/.
    #[arg(long)]
    out: PathBuf,
    /// File of 0-based train sentence indices to leave out (how the retrain reference is made).
    #[arg(long)]
    exclude: Option<PathBuf>,
    #[command(flatten)]
    opts: TrainOpts,
    #[command(flatten)]
    loss_scale: LossScaleArgs,
    /// Continue an interrupted run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Overwrite an existing --out.
    #[arg(long)]
    force: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(mut a: TrainArgs) -> Result<()> {
    let device = a.device.init()?;
    // Every input is read and checked before --out is touched (--force empties it).
    let data = Dataset::load(&a.data)?;
    let base = Base::load(&a.model)?;
    let labels = base.labels_for(&data)?;
    let fc = FinetuneConfig {
        precision: a.device.precision,
        loss_scaling: a.loss_scale.config()?,
        ..a.opts.config()
    };
    let kept: Vec<usize> = match &a.exclude {
        Some(f) => retain_indices(data.train.len(), &read_indices(f, data.train.len())?),
        None => (0..data.train.len()).collect(),
    };
    if kept.is_empty() {
        return Err(Error::invalid("--exclude leaves no training sentence"));
    }
    prepare_out_dir(&a.out, &a.model, a.resume, a.force)?;
    let train: Vec<_> = kept.iter().map(|&i| data.train[i].clone()).collect();
    let clf = base.classifier(&labels, fc.seed)?;
    if !base.head_matches(&labels) {
        eprintln!(
            "{}: new classification head for the {} labels of {}",
            a.model.display(),
            labels.len(),
            a.data.display()
        );
    }
    eprintln!(
        "fine-tuning on {} of {} train sentences: {} epochs, lr {}, batch {}",
        train.len(),
        data.train.len(),
        fc.epochs,
        fc.lr,
        fc.batch
    );
    let (rec, tr, dev, test) = with_backend!(device, mk => {
        let (clf, rec) = finetune(mk()?, clf, &a.model, &train, &data, &fc, &a.out, a.resume, a.quiet)?;
        let mut model = model_from_weights(mk()?, &clf.cfg, &clf.weights, clf.labels.len(), fc.batch * fc.max_len)
            .with_precision(fc.precision);
        let tr = evaluate_split(&clf, &mut model, &train, fc.max_len)?;
        let dev = evaluate_split(&clf, &mut model, &data.dev, fc.max_len)?;
        let test = evaluate_split(&clf, &mut model, &data.test, fc.max_len)?;
        (rec, tr, dev, test)
    });
    println!("{:<6} {:>9} {:>9} {:>9}", "split", "precision", "recall", "f1");
    for (n, m) in [("train", &tr), ("dev", &dev), ("test", &test)] {
        println!("{:<6} {:>9.4} {:>9.4} {:>9.4}", n, m.precision, m.recall, m.f1);
    }
    let report = json!({
        "config": fc,
        "model": a.model, "data": a.data, "exclude": a.exclude,
        "train_sentences": train.len(),
        "metrics": {"train": tr, "dev": dev, "test": test},
        "precision": precision_json(fc.precision, rec.loss_scaler.as_ref()),
        "record": rec,
        "version": env!("CARGO_PKG_VERSION"),
    });
    let path = a.out.join("train.json");
    write_atomic(
        &path,
        serde_json::to_string_pretty(&report)
            .map_err(|e| Error::file(&path, e.to_string()))?
            .as_bytes(),
    )?;
    let why = match rec.fits {
        Some(true) if fc.fit_f1 > 0.0 => format!(
            "best dev F1 {:.4} of the epochs whose train F1 reached {}",
            rec.best_dev_f1, fc.fit_f1
        ),
        Some(true) => format!("best dev F1 {:.4}", rec.best_dev_f1),
        Some(false) => format!("no epoch fits its training data; dev F1 {:.4}", rec.best_dev_f1),
        None => format!("last, dev F1 {:.4}", rec.best_dev_f1),
    };
    eprintln!(
        "kept epoch {} ({why}); model in {}",
        rec.best_epoch,
        a.out.join("model").display()
    );
    Ok(())
}
