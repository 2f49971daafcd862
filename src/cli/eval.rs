//! `deepcut-fast eval`: entity F1 on forget/retain/dev/test and the MIA AUC.
use super::{with_backend, DeviceArgs};
use crate::data::{read_indices, DEFAULT_MAX_LEN};
use crate::error::{Error, Result};
use crate::eval::ensemble::Ensemble;
use crate::eval::evaluate::{evaluate, Dataset};
use crate::infer::Classifier;
use crate::util::write_atomic;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    /// Model folder with a classification head, or an ensemble folder (ensemble.json, as
    /// `run --method sisa` writes into OUT/model).
    #[arg(long)]
    model: PathBuf,
    /// Dataset folder with train.conll, dev.conll, test.conll.
    #[arg(long)]
    data: PathBuf,
    /// File of 0-based train sentence indices (the forget set), one per line.
    #[arg(long)]
    forget: Option<PathBuf>,
    /// Write the metrics as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value_t = DEFAULT_MAX_LEN)]
    max_len: usize,
    /// Most tokens per batch (packed: real tokens only); windows are batched by length. The
    /// CPU backend runs at most 512 a thread (at least 1,024), which keeps its activations
    /// in cache.
    #[arg(long, default_value_t = 8192)]
    batch_tokens: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(mut a: EvalArgs) -> Result<()> {
    let device = a.device.init()?;
    let data = Dataset::load(&a.data)?;
    let forget = a
        .forget
        .as_ref()
        .map(|f| read_indices(f, data.train.len()))
        .transpose()?;
    let max_tokens = a.batch_tokens.max(a.max_len);
    let ev = if Ensemble::is_ensemble_dir(&a.model) {
        let mut ens = Ensemble::load(&a.model)?;
        ens.precision = a.device.precision;
        data.check_labels(ens.labels())?;
        with_backend!(device, mk => ens.evaluate(&mk, &data, forget.as_deref(), true, a.max_len, max_tokens)?)
    } else {
        let clf = Classifier::load(&a.model)?;
        data.check_labels(&clf.labels)?;
        with_backend!(device, mk => {
            let mut model = clf.model(mk()?, max_tokens).with_precision(a.device.precision);
            evaluate(&clf, &mut model, &data, forget.as_deref(), true, a.max_len)?
        })
    };
    print!("{}", ev.table());
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&ev).map_err(|e| Error::file(path, e.to_string()))?;
        write_atomic(path, text.as_bytes())?;
    }
    Ok(())
}
