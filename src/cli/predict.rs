//! `deepcut-fast predict`: tag every word of a CoNLL file (first-subword rule, long
//! sentences windowed so every word is predicted exactly once).
use super::{with_backend, DeviceArgs};
use crate::data::{read_conll, write_conll, DEFAULT_MAX_LEN};
use crate::error::{Error, Result};
use crate::infer::{run_sentences, Classifier};
use crate::util::write_atomic;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct PredictArgs {
    /// Model folder (config.json, model.safetensors, tokenizer.json) with a classification head.
    #[arg(long)]
    model: PathBuf,
    /// CoNLL file: one word per line (a tag column, if present, is ignored), blank line between sentences.
    #[arg(long)]
    input: PathBuf,
    /// Where to write `word<TAB>predicted tag`.
    #[arg(long)]
    output: PathBuf,
    /// Also write the logits: an f32 safetensors tensor `logits` [words, labels], input order.
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

pub fn run(a: PredictArgs) -> Result<()> {
    let device = a.device.init()?;
    let clf = Classifier::load(&a.model)?;
    let sentences = read_conll(&a.input, false)?;
    let t0 = std::time::Instant::now();
    let out = with_backend!(device, mk => {
        let mut model = clf.model(mk()?, a.batch_tokens.max(a.max_len)).with_precision(a.device.precision);
        run_sentences(&clf, &mut model, &sentences, a.max_len)?
    });
    let tags = out.tags(&clf.labels);
    write_conll(&a.output, &sentences, &tags)?;
    let words: usize = sentences.iter().map(|s| s.words.len()).sum();
    if let Some(path) = &a.logits {
        let flat: Vec<f32> = out.logits.concat();
        let bytes: &[u8] = bytemuck::cast_slice(&flat);
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![words, clf.labels.len()], bytes)
            .map_err(|e| Error::file(path, format!("cannot build the logits tensor: {e}")))?;
        let data = safetensors::serialize([("logits", view)], &None)
            .map_err(|e| Error::file(path, format!("cannot serialise logits: {e}")))?;
        write_atomic(path, &data)?;
    }
    eprintln!(
        "predicted {words} words in {} sentences ({:.1} s, {:.0} tokens/s) -> {}",
        sentences.len(),
        t0.elapsed().as_secs_f64(),
        out.tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        a.output.display()
    );
    Ok(())
}
