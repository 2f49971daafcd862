//! Running a trained token classifier over sentences: per-word logits (the first
//! subword's, SPEC section 2) and per-sentence mean token loss (membership inference,
//! SPEC section 6). Shared by `predict`, `eval` and the reports of `train` and `run`.
use crate::backend::Backend;
use crate::data::{token_batches, Batch, Encoder, LabelMap, PositionStyle, Sentence, Window};
use crate::error::{Error, Result};
use crate::model::{load_model_dir, Dims, HostWeights, Model, ModelConfig, ModelType};
use std::path::Path;

/// A classifier ready to run: config, labels, tokenizer and weights on the host.
pub struct Classifier {
    pub cfg: ModelConfig,
    pub labels: LabelMap,
    pub encoder: Encoder,
    pub weights: HostWeights,
}

impl Classifier {
    /// Loads a model folder that has a token-classification head and a label map.
    pub fn load(dir: &Path) -> Result<Classifier> {
        let (cfg, weights, has_head) = load_model_dir(dir)?;
        if !has_head {
            return Err(Error::file(
                dir,
                "this model has no token-classification head (classifier.weight); fine-tune it first with `deepcut-fast train`",
            ));
        }
        let id2label = cfg.id2label.clone().ok_or_else(|| {
            Error::file(
                dir.join("config.json"),
                "no id2label: the labels of the head are unknown",
            )
        })?;
        let labels = LabelMap { labels: id2label };
        let tok = dir.join("tokenizer.json");
        let mut encoder = Encoder::from_file(&tok)?;
        encoder.fit_model(&tok, cfg.vocab_size, max_window(&cfg))?;
        Ok(Classifier {
            cfg,
            labels,
            encoder,
            weights,
        })
    }

    /// Position numbering of this model family.
    pub fn position_style(&self) -> PositionStyle {
        position_style(&self.cfg)
    }

    /// The model on backend `be`, planned for batches of up to `max_tokens` tokens,
    /// with the weights of `self`.
    pub fn model<B: Backend>(&self, be: B, max_tokens: usize) -> Model<B> {
        model_from_weights(be, &self.cfg, &self.weights, self.labels.len(), max_tokens)
    }
}

pub fn position_style(cfg: &ModelConfig) -> PositionStyle {
    match cfg.model_type {
        ModelType::Bert => PositionStyle::Absolute,
        ModelType::Roberta => PositionStyle::Roberta {
            pad_id: cfg.pad_token_id,
        },
    }
}

/// Most tokens per window (special tokens included) the position table holds: BERT
/// numbers positions from 0, RoBERTa from pad_token_id + 1.
pub fn max_window(cfg: &ModelConfig) -> usize {
    match cfg.model_type {
        ModelType::Bert => cfg.max_position_embeddings,
        ModelType::Roberta => cfg
            .max_position_embeddings
            .saturating_sub(cfg.pad_token_id as usize + 1),
    }
}

/// Builds a model from host weights (which must hold every tensor of the config).
pub fn model_from_weights<B: Backend>(
    be: B, cfg: &ModelConfig, w: &HostWeights, labels: usize, max_tokens: usize,
) -> Model<B> {
    Model::new(be, Dims::from_config(cfg, labels), max_tokens, |name, _| {
        w.get(name)
            .unwrap_or_else(|| panic!("checked by the loader: tensor {name} present"))
            .data
            .clone()
    })
}

/// What a pass over a list of sentences produces.
pub struct Outputs {
    /// Per sentence: [words * labels] logits of each word's first subword, row-major.
    pub logits: Vec<Vec<f32>>,
    /// Per sentence: mean cross-entropy over its labelled words (NaN when it has none).
    pub mean_loss: Vec<f64>,
    /// Tokens (real, not padding) processed.
    pub tokens: usize,
}

impl Outputs {
    /// Predicted tag of every word (argmax of its logits; first label on ties).
    pub fn tags(&self, labels: &LabelMap) -> Vec<Vec<String>> {
        let l = labels.len();
        self.logits
            .iter()
            .map(|s| s.chunks(l).map(|row| labels.labels[argmax(row)].clone()).collect())
            .collect()
    }
}

/// Index of the largest value of `row`, the first one on ties (a word's predicted label).
pub fn argmax<T: PartialOrd>(row: &[T]) -> usize {
    let mut best = 0;
    for (j, x) in row.iter().enumerate() {
        if *x > row[best] {
            best = j;
        }
    }
    best
}

/// One evaluation batch's logits and token losses on their way back: staged copies, and
/// the batch's windows.
struct EvalSlot<B: Backend> {
    /// (size in floats, buffer): `Model::take_staging`'s, given back at the end
    logits: (usize, B::Staging),
    losses: (usize, B::Staging),
    /// The windows of the batch in flight and the rows it computed: each window's
    /// `word_pos` in turn (`Model::forward_rows`).
    batch: Option<(Vec<usize>, usize)>,
}

/// Runs `model` (evaluation mode: no dropout) over `windows` of `sentences`, batches of
/// at most `model.max_tokens()` tokens (packed; fewer where the backend prefers:
/// `Backend::eval_batch_tokens`), sorted by length (many short windows to a batch, of
/// alike lengths), and collects per-word logits in input order and
/// per-sentence losses. Only the rows read here are computed past the last layer's
/// attention: each word's first sub-word (`Model::forward_rows`).
pub fn run_windows<B: Backend>(
    model: &mut Model<B>, sentences: &[Sentence], windows: &[Window], style: PositionStyle,
) -> Outputs {
    let l = model.dims.labels;
    let mut logits: Vec<Vec<f32>> = sentences.iter().map(|s| vec![0.0; s.words.len() * l]).collect();
    let mut loss_sum = vec![0f64; sentences.len()];
    let mut loss_count = vec![0usize; sentences.len()];
    let mut tokens = 0;
    let lengths: Vec<usize> = windows.iter().map(|w| w.ids.len()).collect();
    let budget = model
        .max_tokens()
        .min(model.be.eval_batch_tokens().unwrap_or(usize::MAX));
    // Batch i's logits and losses come back through page-locked memory while batch i + 1
    // runs: its forward pass is enqueued before batch i's numbers are waited for, so on a
    // GPU the device does not sit idle while the host gathers batches and files logits.
    // a batch holds at most `budget` tokens, or one window longer than that
    let cap = budget.max(lengths.iter().copied().max().unwrap_or(0));
    let mut slots: [EvalSlot<B>; 2] = [0, 1].map(|_| EvalSlot {
        logits: model.take_staging(cap * l),
        losses: model.take_staging(cap),
        batch: None,
    });
    let mut file = |slot: &mut EvalSlot<B>, be: &B| {
        let Some((rows_windows, m)) = slot.batch.take() else {
            return;
        };
        let out = be.download_wait(&slot.logits.1, m * l);
        let losses = be.download_wait(&slot.losses.1, m);
        // row o holds the o-th kept token: the windows' word_pos in turn
        let mut o = 0;
        for &wi in &rows_windows {
            let w = &windows[wi];
            for (k, &pos) in w.word_pos.iter().enumerate() {
                let word = w.first_word + k;
                logits[w.sentence][word * l..(word + 1) * l].copy_from_slice(&out[o * l..(o + 1) * l]);
                if w.labels[pos] >= 0 {
                    loss_sum[w.sentence] += losses[o] as f64;
                    loss_count[w.sentence] += 1;
                }
                o += 1;
            }
        }
    };
    for (i, idx) in token_batches(&lengths, budget).into_iter().enumerate() {
        let batch = Batch::gather(windows, &idx, style);
        let rows = word_rows(&batch, windows);
        model.forward_rows(&batch.inputs, &rows);
        let slot = &mut slots[i % 2];
        model.logits_start(&mut slot.logits.1);
        model.token_losses_start(&mut slot.losses.1);
        tokens += batch.tokens();
        slot.batch = Some((batch.windows, rows.len()));
        file(&mut slots[1 - i % 2], &model.be);
    }
    for slot in &mut slots {
        file(slot, &model.be);
    }
    for slot in slots {
        model.give_staging(slot.logits);
        model.give_staging(slot.losses);
    }
    let mean_loss = loss_sum
        .iter()
        .zip(&loss_count)
        .map(|(s, &c)| if c == 0 { f64::NAN } else { s / c as f64 })
        .collect();
    Outputs {
        logits,
        mean_loss,
        tokens,
    }
}

/// The token rows of `batch` (gathered from `windows`) an evaluation reads: each window's
/// words' first sub-words (`Window::word_pos`), window after window.
pub fn word_rows(batch: &Batch, windows: &[Window]) -> Vec<i32> {
    batch
        .windows
        .iter()
        .zip(&batch.inputs.seqs)
        .flat_map(|(&wi, &s0)| windows[wi].word_pos.iter().map(move |&pos| s0 + pos as i32))
        .collect()
}

/// Tokenises `sentences` with the classifier's tokenizer and runs them.
pub fn run_sentences<B: Backend>(
    clf: &Classifier, model: &mut Model<B>, sentences: &[Sentence], max_len: usize,
) -> Result<Outputs> {
    let windows = encode_for_run(clf, sentences, max_len)?;
    Ok(run_windows(model, sentences, &windows, clf.position_style()))
}

/// The windows `run_sentences` runs `sentences` as (with their labels where every sentence
/// has tags): for a caller that runs the same sentences many times, such as the stopping
/// rule's checks, which tokenised the forget set anew each time (6 ms for WNUT17's 339
/// forget sentences at ratio 0.10, a check every 2 steps: about half of a check on a GPU).
pub fn encode_for_run(clf: &Classifier, sentences: &[Sentence], max_len: usize) -> Result<Vec<Window>> {
    let with_labels = sentences
        .iter()
        .all(|s| s.tags.len() == s.words.len() && !s.tags.is_empty());
    clf.encoder
        .encode_sentences(sentences, with_labels.then_some(&clf.labels), max_len)
}

/// Final hidden states [m, c] of every labelled token of `windows` (evaluation mode), with
/// their label ids: the embeddings the report's PCA picture shows.
pub fn labelled_hidden<B: Backend>(
    model: &mut Model<B>, windows: &[Window], style: PositionStyle,
) -> (Vec<f32>, Vec<i32>) {
    let c = model.dims.hidden;
    let max_len = windows.iter().map(|w| w.ids.len()).max().unwrap_or(1).max(1);
    let rows = (model.max_tokens() / max_len).max(1);
    let (mut out, mut labels) = (vec![], vec![]);
    let all: Vec<usize> = (0..windows.len()).collect();
    for idx in all.chunks(rows) {
        let batch = Batch::gather(windows, idx, style);
        let keep: Vec<i32> = (0..batch.tokens() as i32)
            .filter(|&i| batch.inputs.labels[i as usize] >= 0)
            .collect();
        model.forward_rows(&batch.inputs, &keep);
        out.extend(model.hidden_host());
        labels.extend(keep.iter().map(|&i| batch.inputs.labels[i as usize]));
    }
    debug_assert_eq!(out.len(), labels.len() * c);
    (out, labels)
}
