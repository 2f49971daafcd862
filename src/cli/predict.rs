//! `deepcut-fast predict`: tag every word of a CoNLL file (first-subword rule, long
//! sentences windowed so every word is predicted exactly once).
use super::{with_backend, DeviceArgs};
use crate::data::{read_conll, write_conll, DEFAULT_MAX_LEN};
use crate::error::{Error, Result};
use crate::eval::ensemble::Ensemble;
use crate::infer::{run_sentences, Classifier};
use crate::util::write_atomic;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct PredictArgs {
    /// Model folder (config.json, model.safetensors, tokenizer.json) with a classification
    /// head, or an ensemble folder (ensemble.json, as `run --method sisa` writes).
    #[arg(long)]
    model: PathBuf,
    /// CoNLL file: one word per line (a tag column, if present, is ignored), blank line between sentences.
    #[arg(long)]
    input: PathBuf,
    /// Where to write `word<TAB>predicted tag`.
    #[arg(long)]
    output: PathBuf,
    /// Also write the logits: an f32 safetensors tensor `logits` [words, labels], input
    /// order (for an ensemble: ln of the members' mean softmax).
    #[arg(long)]
    logits: Option<PathBuf>,
    /// Subwords per window, special tokens included.
    #[arg(long, default_value_t = DEFAULT_MAX_LEN)]
    max_len: usize,
    /// Tokens per batch.
    #[arg(long, default_value_t = 8192)]
    batch_tokens: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(mut a: PredictArgs) -> Result<()> {
    let device = a.device.init()?;
    let ensemble = if Ensemble::is_ensemble_dir(&a.model) {
        Some(Ensemble {
            precision: a.device.precision,
            ..Ensemble::load(&a.model)?
        })
    } else {
        None
    };
    let clf = match ensemble {
        Some(_) => None,
        None => Some(Classifier::load(&a.model)?),
    };
    let sentences = read_conll(&a.input, false)?;
    let t0 = std::time::Instant::now();
    let max_tokens = a.batch_tokens.max(a.max_len);
    let (tags, logits, n_labels, tokens) = match (&ensemble, &clf) {
        (Some(ens), _) => {
            let out = with_backend!(device, mk => ens.run_sentences(&mk, &sentences, a.max_len, max_tokens)?);
            let log_probs: Vec<f32> = out.probs.iter().flatten().map(|&p| p.ln() as f32).collect();
            (out.tags(ens.labels()), log_probs, ens.labels().len(), out.tokens)
        }
        (None, Some(clf)) => {
            let out = with_backend!(device, mk => {
                let mut model = clf.model(mk()?, max_tokens).with_precision(a.device.precision);
                run_sentences(clf, &mut model, &sentences, a.max_len)?
            });
            (out.tags(&clf.labels), out.logits.concat(), clf.labels.len(), out.tokens)
        }
        (None, None) => unreachable!("one of the two is loaded"),
    };
    write_conll(&a.output, &sentences, &tags)?;
    let words: usize = sentences.iter().map(|s| s.words.len()).sum();
    if let Some(path) = &a.logits {
        let bytes: &[u8] = bytemuck::cast_slice(&logits);
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![words, n_labels], bytes)
            .map_err(|e| Error::file(path, format!("cannot build the logits tensor: {e}")))?;
        let data = safetensors::serialize([("logits", view)], &None)
            .map_err(|e| Error::file(path, format!("cannot serialise logits: {e}")))?;
        write_atomic(path, &data)?;
    }
    eprintln!(
        "predicted {words} words in {} sentences ({:.1} s, {:.0} tokens/s) -> {}",
        sentences.len(),
        t0.elapsed().as_secs_f64(),
        tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        a.output.display()
    );
    Ok(())
}
