//! An ensemble of token classifiers, as SISA uses it (SPEC section 5): S members with the
//! same labels; a word's prediction is the argmax over labels of the members' mean
//! softmax, and a sentence's loss (membership inference, SPEC section 6) is the mean over
//! its labelled words of -ln(mean softmax probability of the gold tag).
//!
//! On disk an ensemble is a folder of member model folders (each an ordinary Hugging Face
//! token-classification folder) plus `ensemble.json`, which names them and how they are
//! combined. `eval` and `predict` take such a folder like a single model's.
use super::evaluate::{evaluate_with, Dataset, Evaluation, SplitMetrics};
use crate::backend::Backend;
use crate::data::{LabelMap, Sentence};
use crate::error::{Error, Result};
use crate::infer::{argmax, run_sentences, Classifier};
use crate::util::write_atomic;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The file that marks a folder as an ensemble.
pub const ENSEMBLE_FILE: &str = "ensemble.json";
/// The one combination rule (recorded in ensemble.json so a reader need not guess).
pub const COMBINE: &str = "mean-softmax";

/// ensemble.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnsembleManifest {
    pub format: String,
    /// How member outputs are combined: `mean-softmax` (per word, the mean over members of
    /// softmax(logits); prediction = argmax).
    pub combine: String,
    /// Member folders, relative to the ensemble folder.
    pub members: Vec<String>,
    /// The labels every member's head has, in head order.
    pub labels: Vec<String>,
    /// Free-form provenance (SISA: shards, which were retrained, the shard cache).
    #[serde(default)]
    pub about: serde_json::Value,
}

pub struct Ensemble {
    pub names: Vec<String>,
    pub members: Vec<Classifier>,
    /// Arithmetic every member runs in (`--precision`).
    pub precision: crate::backend::Precision,
}

/// What a pass of the ensemble over sentences produces.
pub struct EnsembleOutputs {
    /// Per sentence: [words * labels], each word's mean over members of the softmax of its
    /// logits (first subword, SPEC section 2), row-major.
    pub probs: Vec<Vec<f64>>,
    /// Per sentence: mean over its words of -ln(mean probability of the gold tag); NaN for
    /// sentences without tags.
    pub mean_loss: Vec<f64>,
    /// Tokens processed, all members together.
    pub tokens: usize,
}

impl EnsembleOutputs {
    /// Predicted tag of every word: argmax of the mean softmax (first label on ties).
    pub fn tags(&self, labels: &LabelMap) -> Vec<Vec<String>> {
        let l = labels.len();
        self.probs
            .iter()
            .map(|s| s.chunks(l).map(|row| labels.labels[argmax(row)].clone()).collect())
            .collect()
    }
}

/// log-softmax of one row of logits, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

impl Ensemble {
    /// An ensemble of `members` named `names`; every member must have the same labels.
    pub fn new(names: Vec<String>, members: Vec<Classifier>) -> Result<Ensemble> {
        let first = members
            .first()
            .ok_or_else(|| Error::invalid("an ensemble needs at least one member"))?;
        for (name, m) in names.iter().zip(&members) {
            if m.labels.labels != first.labels.labels {
                return Err(Error::invalid(format!(
                    "ensemble member {name} has other labels than {}: {:?} vs {:?}",
                    names[0], m.labels.labels, first.labels.labels
                )));
            }
        }
        Ok(Ensemble {
            names,
            members,
            precision: Default::default(),
        })
    }

    pub fn labels(&self) -> &LabelMap {
        &self.members[0].labels
    }

    /// Whether `dir` holds an ensemble (an `ensemble.json`).
    pub fn is_ensemble_dir(dir: &Path) -> bool {
        dir.join(ENSEMBLE_FILE).is_file()
    }

    /// Loads the ensemble folder `dir`: its ensemble.json and every member folder.
    pub fn load(dir: &Path) -> Result<Ensemble> {
        let path = dir.join(ENSEMBLE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let m: EnsembleManifest = serde_json::from_str(&text).map_err(|e| Error::file(&path, e.to_string()))?;
        if m.combine != COMBINE {
            return Err(Error::file(
                &path,
                format!("combine `{}` is unknown (this build knows `{COMBINE}`)", m.combine),
            ));
        }
        let members = m
            .members
            .iter()
            .map(|name| Classifier::load(&dir.join(name)))
            .collect::<Result<Vec<_>>>()?;
        let e = Ensemble::new(m.members.clone(), members)?;
        if e.labels().labels != m.labels {
            return Err(Error::file(&path, "its labels differ from the members' id2label"));
        }
        Ok(e)
    }

    /// Writes `dir/ensemble.json` for members already saved as `dir/NAME` folders.
    pub fn write_manifest(dir: &Path, names: &[String], labels: &LabelMap, about: serde_json::Value) -> Result<()> {
        let m = EnsembleManifest {
            format: "deepcut-fast ensemble 1".into(),
            combine: COMBINE.into(),
            members: names.to_vec(),
            labels: labels.labels.clone(),
            about,
        };
        let path = dir.join(ENSEMBLE_FILE);
        let text = serde_json::to_string_pretty(&m).map_err(|e| Error::file(&path, e.to_string()))?;
        write_atomic(&path, text.as_bytes())
    }

    /// Runs every member over `sentences` (one member's model in memory at a time, planned
    /// for batches of `max_tokens` tokens) and combines their per-word outputs.
    pub fn run_sentences<B: Backend>(
        &self, mk: &dyn Fn() -> Result<B>, sentences: &[Sentence], max_len: usize, max_tokens: usize,
    ) -> Result<EnsembleOutputs> {
        let labels = self.labels();
        let l = labels.len();
        let mut probs: Vec<Vec<f64>> = sentences.iter().map(|s| vec![0.0; s.words.len() * l]).collect();
        // ln of the summed gold probabilities, accumulated as a log-sum-exp over members.
        let mut log_gold: Vec<Vec<f64>> = sentences
            .iter()
            .map(|s| vec![f64::NEG_INFINITY; s.words.len()])
            .collect();
        let gold: Vec<Option<Vec<usize>>> = sentences
            .iter()
            .map(|s| {
                (s.tags.len() == s.words.len() && !s.tags.is_empty())
                    .then(|| s.tags.iter().map(|t| labels.id(t)).collect::<Option<Vec<usize>>>())
                    .flatten()
            })
            .collect();
        let mut tokens = 0;
        for clf in &self.members {
            let mut model = clf.model(mk()?, max_tokens).with_precision(self.precision);
            let out = run_sentences(clf, &mut model, sentences, max_len)?;
            tokens += out.tokens;
            for (si, logits) in out.logits.iter().enumerate() {
                for (w, row) in logits.chunks(l).enumerate() {
                    let lp = log_softmax(row);
                    for (p, x) in probs[si][w * l..(w + 1) * l].iter_mut().zip(&lp) {
                        *p += x.exp();
                    }
                    if let Some(g) = &gold[si] {
                        let (a, b) = (log_gold[si][w], lp[g[w]]);
                        let m = a.max(b);
                        log_gold[si][w] = m + ((a - m).exp() + (b - m).exp()).ln();
                    }
                }
            }
        }
        let s = self.members.len() as f64;
        probs.iter_mut().flatten().for_each(|p| *p /= s);
        let mean_loss = log_gold
            .iter()
            .zip(&gold)
            .map(|(lg, g)| match g {
                Some(_) if !lg.is_empty() => lg.iter().map(|&x| s.ln() - x).sum::<f64>() / lg.len() as f64,
                _ => f64::NAN,
            })
            .collect();
        Ok(EnsembleOutputs {
            probs,
            mean_loss,
            tokens,
        })
    }

    /// Scores the ensemble on `sentences` (the ensemble's twin of `evaluate_split`).
    pub fn evaluate_split<B: Backend>(
        &self, mk: &dyn Fn() -> Result<B>, sentences: &[Sentence], max_len: usize, max_tokens: usize,
    ) -> Result<SplitMetrics> {
        let out = self.run_sentences(mk, sentences, max_len, max_tokens)?;
        Ok(SplitMetrics::new(sentences, &out.tags(self.labels()), out.mean_loss))
    }

    /// Every split and the MIA AUC, as `evaluate` gives them for a single model.
    pub fn evaluate<B: Backend>(
        &self, mk: &dyn Fn() -> Result<B>, data: &Dataset, forget: Option<&[usize]>, with_retain: bool, max_len: usize,
        max_tokens: usize,
    ) -> Result<Evaluation> {
        evaluate_with(data, forget, with_retain, &mut |s| {
            self.evaluate_split(mk, s, max_len, max_tokens)
        })
    }
}
