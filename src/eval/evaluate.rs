//! Evaluating a classifier on a dataset: entity P/R/F1 per split (forget, retain, dev,
//! test) and the membership-inference AUC (SPEC section 6). Used by `eval`, and by
//! `train` and `run` for their reports.
use super::metrics::{entity_report, token_accuracy, EntityReport};
use super::mia::auc;
use crate::backend::Backend;
use crate::data::{read_conll, LabelMap, Sentence, Window};
use crate::error::Result;
use crate::infer::{encode_for_run, run_windows, Classifier};
use crate::model::Model;
use serde::Serialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A dataset folder: train/dev/test CoNLL files (SPEC section 1).
pub struct Dataset {
    pub dir: PathBuf,
    pub train: Vec<Sentence>,
    pub dev: Vec<Sentence>,
    pub test: Vec<Sentence>,
}

impl Dataset {
    pub fn load(dir: &Path) -> Result<Dataset> {
        Ok(Dataset {
            dir: dir.to_path_buf(),
            train: read_conll(&dir.join("train.conll"), true)?,
            dev: read_conll(&dir.join("dev.conll"), true)?,
            test: read_conll(&dir.join("test.conll"), true)?,
        })
    }

    /// Every tag of every split must be one of the model's labels (SPEC section 1: a
    /// missing tag is an error, never a silent remap); the error names the file.
    pub fn check_labels(&self, labels: &LabelMap) -> Result<()> {
        for (name, s) in [("train", &self.train), ("dev", &self.dev), ("test", &self.test)] {
            labels.check_covers(s, &self.dir.join(format!("{name}.conll")))?;
        }
        Ok(())
    }
}

/// Metrics of one split.
#[derive(Clone, Debug, Serialize)]
pub struct SplitMetrics {
    pub sentences: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub token_accuracy: f64,
    /// Mean over sentences of the per-sentence mean token loss.
    pub mean_loss: f64,
    pub per_type: Value,
    #[serde(skip)]
    pub sentence_losses: Vec<f64>,
}

impl SplitMetrics {
    /// Scores predicted tags against the gold tags of `sentences`; `losses` are the
    /// per-sentence mean token losses (membership inference).
    pub fn new(sentences: &[Sentence], pred: &[Vec<String>], losses: Vec<f64>) -> SplitMetrics {
        let gold: Vec<Vec<String>> = sentences.iter().map(|s| s.tags.clone()).collect();
        let rep: EntityReport = entity_report(&gold, pred);
        let finite: Vec<f64> = losses.iter().copied().filter(|x| x.is_finite()).collect();
        SplitMetrics {
            sentences: sentences.len(),
            precision: rep.micro.precision,
            recall: rep.micro.recall,
            f1: rep.micro.f1,
            token_accuracy: token_accuracy(&gold, pred),
            mean_loss: finite.iter().sum::<f64>() / finite.len().max(1) as f64,
            per_type: rep
                .per_type
                .iter()
                .map(|(k, p)| {
                    (
                        k.clone(),
                        json!({"precision": p.precision, "recall": p.recall, "f1": p.f1, "support": p.support}),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into(),
            sentence_losses: losses,
        }
    }
}

/// Runs the model over `sentences` and scores it against their gold tags.
pub fn evaluate_split<B: Backend>(
    clf: &Classifier, model: &mut Model<B>, sentences: &[Sentence], max_len: usize,
) -> Result<SplitMetrics> {
    let windows = encode_for_run(clf, sentences, max_len)?;
    Ok(evaluate_encoded(clf, model, sentences, &windows))
}

/// [`evaluate_split`] of sentences already encoded by `crate::infer::encode_for_run`.
pub fn evaluate_encoded<B: Backend>(
    clf: &Classifier, model: &mut Model<B>, sentences: &[Sentence], windows: &[Window],
) -> SplitMetrics {
    let out = run_windows(model, sentences, windows, clf.position_style());
    SplitMetrics::new(sentences, &out.tags(&clf.labels), out.mean_loss)
}

/// The full set of numbers of `eval` and of the reports.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forget: Option<SplitMetrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retain: Option<SplitMetrics>,
    pub dev: SplitMetrics,
    pub test: SplitMetrics,
    /// AUC of telling members (the forget set; all of train when there is none) from
    /// test sentences by their mean token loss (members have lower loss).
    pub mia_auc: f64,
    pub mia_members: &'static str,
}

/// Evaluates on dev and test, and on forget/retain when `forget` (sorted train indices)
/// is given. `with_retain` = false skips the (large) retain split.
pub fn evaluate<B: Backend>(
    clf: &Classifier, model: &mut Model<B>, data: &Dataset, forget: Option<&[usize]>, with_retain: bool, max_len: usize,
) -> Result<Evaluation> {
    evaluate_with(data, forget, with_retain, &mut |s| {
        evaluate_split(clf, model, s, max_len)
    })
}

/// [`evaluate`] for any predictor: `split` scores one list of sentences (a single model's
/// [`evaluate_split`], or an ensemble's). The splits, the members of membership inference
/// and the AUC are decided here, once for every kind of model.
pub fn evaluate_with(
    data: &Dataset, forget: Option<&[usize]>, with_retain: bool,
    split: &mut dyn FnMut(&[Sentence]) -> Result<SplitMetrics>,
) -> Result<Evaluation> {
    let dev = split(&data.dev)?;
    let test = split(&data.test)?;
    let (forget_m, retain_m, members) = match forget {
        Some(idx) => {
            let (f, r) = split_train(&data.train, idx);
            let fm = split(&f)?;
            let rm = if with_retain { Some(split(&r)?) } else { None };
            (Some(fm), rm, "forget")
        }
        None => (None, None, "train"),
    };
    let member_losses = match &forget_m {
        Some(f) => f.sentence_losses.clone(),
        None => split(&data.train)?.sentence_losses,
    };
    let finite = |v: &[f64]| v.iter().copied().filter(|x| x.is_finite()).collect::<Vec<f64>>();
    let mia_auc = auc(&finite(&member_losses), &finite(&test.sentence_losses));
    Ok(Evaluation {
        forget: forget_m,
        retain: retain_m,
        dev,
        test,
        mia_auc,
        mia_members: members,
    })
}

/// (forget sentences, retain sentences) of train for sorted forget indices.
pub fn split_train(train: &[Sentence], forget: &[usize]) -> (Vec<Sentence>, Vec<Sentence>) {
    let mut is_forget = vec![false; train.len()];
    forget.iter().for_each(|&i| is_forget[i] = true);
    let f = forget.iter().map(|&i| train[i].clone()).collect();
    let r = train
        .iter()
        .zip(&is_forget)
        .filter(|(_, &x)| !x)
        .map(|(s, _)| s.clone())
        .collect();
    (f, r)
}

impl Evaluation {
    /// A readable table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<8} {:>9} {:>9} {:>9} {:>9}\n",
            "split", "sentences", "precision", "recall", "f1"
        );
        for (name, m) in [
            ("forget", self.forget.as_ref()),
            ("retain", self.retain.as_ref()),
            ("dev", Some(&self.dev)),
            ("test", Some(&self.test)),
        ] {
            if let Some(m) = m {
                s += &format!(
                    "{:<8} {:>9} {:>9.4} {:>9.4} {:>9.4}\n",
                    name, m.sentences, m.precision, m.recall, m.f1
                );
            }
        }
        s += &format!(
            "membership inference AUC ({} vs test): {:.4}\n",
            self.mia_members, self.mia_auc
        );
        s
    }
}
