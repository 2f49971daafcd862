//! Words -> subword windows (SPEC section 2).
//!
//! Each sentence's words are tokenised as pre-split words by the model's
//! `tokenizer.json`, exactly as transformers' `tokenizer(words, is_split_into_words=True)`
//! does (checked against golden files). The first subword of a word carries the word's
//! label; every other position carries [`IGNORE`]. A sentence longer than `max_len`
//! subwords becomes several windows of whole words, so every word is predicted once.
use super::conll::Sentence;
use super::labels::LabelMap;
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::ModelWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::Tokenizer;

/// Label of positions that count in no loss or metric (PyTorch's ignore index).
pub const IGNORE: i32 = -100;

/// Default `--max-len`: subwords per window, special tokens included.
pub const DEFAULT_MAX_LEN: usize = 128;

/// The two tokenizer families of BERT and RoBERTa models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// BERT: WordPiece with `##` continuations.
    WordPiece,
    /// RoBERTa / GPT-2: BPE over bytes; each pre-split word gets a leading space.
    ByteLevelBpe,
}

/// Special token ids, read from the tokenizer (never hard-coded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialIds {
    /// First token of every window: `[CLS]` / `<s>`.
    pub cls: u32,
    /// Last token of every window: `[SEP]` / `</s>`.
    pub sep: u32,
    /// `[UNK]` / `<unk>`: stands in for a word that tokenises to nothing.
    pub unk: u32,
    /// `[PAD]` / `<pad>`.
    pub pad: u32,
}

/// One model input: a run of consecutive whole words of one sentence with the special
/// tokens around them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// Index of the sentence in the list given to [`Encoder::encode_sentences`].
    pub sentence: usize,
    /// Index, in the sentence, of the first word in this window.
    pub first_word: usize,
    /// Token ids, special tokens included; `ids.len() <= max_len`.
    pub ids: Vec<u32>,
    /// Per token: the word's class id at its first subword, else [`IGNORE`]
    /// (all [`IGNORE`] when encoded without a label map).
    pub labels: Vec<i32>,
    /// Position in `ids` of the first subword of words `first_word..first_word + word_pos.len()`.
    pub word_pos: Vec<usize>,
}

impl Window {
    /// Number of tokens (special tokens included).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of words this window predicts.
    pub fn n_words(&self) -> usize {
        self.word_pos.len()
    }
}

/// The distinct words of a list of sentences and their subwords.
struct Vocab {
    /// Per sentence, per word: index into `pieces`.
    word_uid: Vec<Vec<u32>>,
    /// Subword ids of each distinct word (never empty).
    pieces: Vec<Vec<u32>>,
}

/// A `tokenizers::Tokenizer` set up for pre-split words, plus the special token layout.
#[derive(Clone)]
pub struct Encoder {
    tokenizer: Tokenizer,
    kind: TokenizerKind,
    special: SpecialIds,
    /// Tokens the post-processor puts before the words (`[CLS]`) and after them (`[SEP]`).
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    /// Most tokens per window the model's position table allows, once tied to a model
    /// by [`Encoder::fit_model`].
    max_window: Option<usize>,
}

impl Encoder {
    /// Load `tokenizer.json`. Truncation and padding stored in the file are switched off
    /// (windows are cut here and packed into batches, never padded). For byte-level BPE the ByteLevel
    /// pre-tokenizer gets `add_prefix_space = true`, as transformers does for pre-split
    /// words with `add_prefix_space=True`.
    pub fn from_file(path: &Path) -> Result<Encoder> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut tokenizer: Tokenizer = text
            .parse()
            .map_err(|e| Error::file(path, format!("cannot parse tokenizer: {e}")))?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::file(path, format!("cannot switch off truncation: {e}")))?;
        // The file's padding token, if it names one, before the settings are cleared.
        let file_pad = tokenizer.get_padding().map(|p| p.pad_id);
        tokenizer.with_padding(None);
        let kind = detect_kind(path, &tokenizer)?;
        if kind == TokenizerKind::ByteLevelBpe {
            set_prefix_space(&mut tokenizer);
        }
        let (prefix, suffix) = special_layout(path, &tokenizer)?;
        let special = SpecialIds {
            cls: prefix[0],
            sep: suffix[suffix.len() - 1],
            unk: unk_id(path, &tokenizer)?,
            pad: pad_id(path, &tokenizer, file_pad)?,
        };
        Ok(Encoder {
            tokenizer,
            kind,
            special,
            prefix,
            suffix,
            max_window: None,
        })
    }

    /// Ties the encoder to the model it feeds: every id it can produce must be a row of
    /// the model's embedding table (`vocab_size`), and no window may be longer than
    /// `max_window` tokens (what the position table holds). `path` names the tokenizer.
    pub fn fit_model(&mut self, path: &Path, vocab_size: usize, max_window: usize) -> Result<()> {
        let vocab_max = self.tokenizer.get_vocab(true).into_values().max();
        let max_id = self.prefix.iter().chain(&self.suffix).copied().chain(vocab_max).max();
        let max_id = max_id.unwrap_or(0).max(self.special.unk).max(self.special.pad);
        if max_id as usize >= vocab_size {
            return Err(Error::file(
                path,
                format!(
                    "the tokenizer has ids up to {max_id}, but the model (config.json) has vocab_size {vocab_size}: \
                     tokenizer and model do not belong together"
                ),
            ));
        }
        self.max_window = Some(max_window);
        Ok(())
    }

    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    pub fn special_ids(&self) -> SpecialIds {
        self.special
    }

    /// Number of special tokens around every window (2 for BERT and RoBERTa).
    pub fn n_special(&self) -> usize {
        self.prefix.len() + self.suffix.len()
    }

    /// The underlying tokenizer (for decoding ids in reports and tests).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Subword ids of each word (no special tokens). A word that tokenises to nothing
    /// gets `[unk]`, see [`Encoder::encode_sentences`].
    pub fn word_subwords(&self, words: &[String]) -> Result<Vec<Vec<u32>>> {
        words.iter().map(|w| self.encode_word(w)).collect()
    }

    /// Encode sentences into windows of at most `max_len` tokens (special tokens
    /// included), in sentence order, the windows of a sentence in word order.
    ///
    /// With `labels`, every sentence must have tags, all in the map. Without, all labels
    /// are [`IGNORE`] (prediction input). A sentence with no words gives no window.
    ///
    /// A word that tokenises to no subword at all (a lone U+200B zero-width space, which
    /// the BERT normaliser strips) is given the unknown token: transformers would give
    /// it no position, so it would get no prediction and the word alignment of the rest
    /// of the sentence would shift. `[UNK]` is what the model already sees for text it
    /// cannot represent. A word longer than one window keeps its first
    /// `max_len - specials` subwords (its label sits on the first one anyway).
    pub fn encode_sentences(
        &self, sentences: &[Sentence], labels: Option<&LabelMap>, max_len: usize,
    ) -> Result<Vec<Window>> {
        let min = self.n_special() + 1;
        if max_len < min {
            return Err(Error::invalid(format!(
                "--max-len {max_len} is too small: a window needs {} special tokens and at least one subword",
                self.n_special()
            )));
        }
        if let Some(limit) = self.max_window.filter(|&l| max_len > l) {
            return Err(Error::invalid(format!(
                "--max-len {max_len} is too large for this model: its max_position_embeddings (config.json) allows at most {limit} tokens per window"
            )));
        }
        let vocab = self.sentence_vocab(sentences)?;
        let per_sentence: Vec<Vec<Window>> = sentences
            .par_iter()
            .zip(&vocab.word_uid)
            .enumerate()
            .map(|(i, (s, uids))| {
                let word_labels = word_labels(i, s, labels)?;
                let pieces: Vec<&[u32]> = uids.iter().map(|&u| vocab.pieces[u as usize].as_slice()).collect();
                Ok(self.windows(i, &pieces, &word_labels, max_len))
            })
            .collect::<Result<_>>()?;
        Ok(per_sentence.into_iter().flatten().collect())
    }

    /// Subwords of one pre-split word, or `[unk]` if it has none. The tokenizer encodes
    /// each word of a pre-split input as its own sequence (transformers'
    /// `is_split_into_words=True` path), so word by word gives the same ids and needs no
    /// word ids (which `encode_fast` leaves empty for pre-split input in tokenizers 0.21).
    fn encode_word(&self, word: &String) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(std::slice::from_ref(word), false)
            .map_err(|e| Error::invalid(format!("tokenizer failed on word `{word}`: {e}")))?;
        Ok(if enc.get_ids().is_empty() {
            vec![self.special.unk]
        } else {
            enc.get_ids().to_vec()
        })
    }

    /// Tokenise each distinct word once: real text repeats words (WNUT17 train has 62,730
    /// words, 14,878 distinct), and one call into the tokenizer costs microseconds.
    fn sentence_vocab<'a>(&self, sentences: &'a [Sentence]) -> Result<Vocab> {
        let mut index: HashMap<&'a str, u32> = HashMap::new();
        let mut distinct: Vec<&'a String> = Vec::new();
        let word_uid = sentences
            .iter()
            .map(|s| {
                s.words
                    .iter()
                    .map(|w| {
                        *index.entry(w.as_str()).or_insert_with(|| {
                            distinct.push(w);
                            (distinct.len() - 1) as u32
                        })
                    })
                    .collect()
            })
            .collect();
        let pieces = distinct
            .par_iter()
            .map(|w| self.encode_word(w))
            .collect::<Result<_>>()?;
        Ok(Vocab { word_uid, pieces })
    }

    /// Greedily pack whole words into windows of at most `max_len` tokens.
    fn windows(&self, sentence: usize, pieces: &[&[u32]], word_labels: &[i32], max_len: usize) -> Vec<Window> {
        let room = max_len - self.n_special(); // subwords per window
        let n_words = pieces.len();
        let mut out = Vec::new();
        let mut w = 0;
        while w < n_words {
            let mut win = self.open_window(sentence, w, max_len);
            let mut used = 0;
            while w < n_words {
                let sub = pieces[w];
                let take = sub.len().min(room); // an over-long word alone is truncated
                if used > 0 && used + take > room {
                    break;
                }
                win.word_pos.push(win.ids.len());
                win.labels.push(word_labels[w]);
                win.labels.extend(std::iter::repeat_n(IGNORE, take - 1));
                win.ids.extend_from_slice(&sub[..take]);
                used += take;
                w += 1;
            }
            win.ids.extend_from_slice(&self.suffix);
            win.labels.extend(std::iter::repeat_n(IGNORE, self.suffix.len()));
            out.push(win);
        }
        out
    }

    fn open_window(&self, sentence: usize, first_word: usize, max_len: usize) -> Window {
        let mut ids = Vec::with_capacity(max_len);
        ids.extend_from_slice(&self.prefix);
        Window {
            sentence,
            first_word,
            labels: vec![IGNORE; ids.len()],
            ids,
            word_pos: Vec::new(),
        }
    }
}

/// Class id per word, or all [`IGNORE`] without a label map.
fn word_labels(i: usize, s: &Sentence, labels: Option<&LabelMap>) -> Result<Vec<i32>> {
    let Some(map) = labels else {
        return Ok(vec![IGNORE; s.words.len()]);
    };
    if s.tags.len() != s.words.len() {
        return Err(Error::invalid(format!(
            "sentence {i} (0-based) has {} words but {} tags; labelled encoding needs a tag per word",
            s.words.len(),
            s.tags.len()
        )));
    }
    s.tags
        .iter()
        .enumerate()
        .map(|(w, tag)| {
            map.id(tag).map(|id| id as i32).ok_or_else(|| {
                Error::invalid(format!(
                    "sentence {i} (0-based), word {w}: tag `{tag}` is not in the label map [{}]",
                    map.labels.join(", ")
                ))
            })
        })
        .collect()
}

/// WordPiece, or BPE with a ByteLevel pre-tokenizer; anything else is not a BERT or
/// RoBERTa tokenizer and is refused rather than encoded in some untested way.
fn detect_kind(path: &Path, tok: &Tokenizer) -> Result<TokenizerKind> {
    match tok.get_model() {
        ModelWrapper::WordPiece(_) => Ok(TokenizerKind::WordPiece),
        ModelWrapper::BPE(_) if tok.get_pre_tokenizer().is_some_and(has_byte_level) => {
            Ok(TokenizerKind::ByteLevelBpe)
        }
        ModelWrapper::BPE(_) => Err(Error::file(
            path,
            "BPE tokenizer without a ByteLevel pre-tokenizer is not supported (expected BERT WordPiece or RoBERTa byte-level BPE)",
        )),
        _ => Err(Error::file(
            path,
            "unsupported tokenizer model (expected BERT WordPiece or RoBERTa byte-level BPE)",
        )),
    }
}

fn has_byte_level(pt: &PreTokenizerWrapper) -> bool {
    match pt {
        PreTokenizerWrapper::ByteLevel(_) => true,
        PreTokenizerWrapper::Sequence(seq) => seq.as_ref().iter().any(has_byte_level),
        _ => false,
    }
}

/// Turn on `add_prefix_space` in every ByteLevel pre-tokenizer: each pre-split word is
/// then encoded as " word", the form words take inside running text.
fn set_prefix_space(tok: &mut Tokenizer) {
    fn visit(pt: &mut PreTokenizerWrapper) {
        match pt {
            PreTokenizerWrapper::ByteLevel(bl) => bl.add_prefix_space = true,
            PreTokenizerWrapper::Sequence(seq) => seq.as_mut().iter_mut().for_each(visit),
            _ => {}
        }
    }
    if let Some(mut pt) = tok.get_pre_tokenizer().cloned() {
        visit(&mut pt);
        tok.with_pre_tokenizer(Some(pt));
    }
}

/// The special tokens the post-processor adds around a single sequence, found by
/// encoding a probe word with and without them.
fn special_layout(path: &Path, tok: &Tokenizer) -> Result<(Vec<u32>, Vec<u32>)> {
    let probe = ["a".to_string()];
    // `encode`, not `encode_fast`: only the former fills in word ids.
    let enc = tok
        .encode(&probe[..], true)
        .map_err(|e| Error::file(path, format!("tokenizer cannot encode a probe word: {e}")))?;
    let words = enc.get_word_ids();
    let first = words.iter().position(Option::is_some);
    let last = words.iter().rposition(Option::is_some);
    let (Some(first), Some(last)) = (first, last) else {
        return Err(Error::file(path, "tokenizer encodes the probe word `a` to no token"));
    };
    let ids = enc.get_ids();
    let (prefix, suffix) = (ids[..first].to_vec(), ids[last + 1..].to_vec());
    if prefix.is_empty() || suffix.is_empty() {
        return Err(Error::file(
            path,
            "tokenizer adds no [CLS]/<s> and [SEP]/</s> tokens (post_processor missing?)",
        ));
    }
    Ok((prefix, suffix))
}

/// The model's unknown token, else the usual spellings.
fn unk_id(path: &Path, tok: &Tokenizer) -> Result<u32> {
    let from_model = match tok.get_model() {
        ModelWrapper::WordPiece(wp) => Some(wp.unk_token.clone()),
        ModelWrapper::BPE(bpe) => bpe.unk_token.clone(),
        _ => None,
    };
    let found = from_model
        .iter()
        .map(String::as_str)
        .chain(["[UNK]", "<unk>"])
        .find_map(|t| tok.token_to_id(t));
    found.ok_or_else(|| Error::file(path, "tokenizer has no unknown token ([UNK] or <unk>)"))
}

/// The padding token of the file's padding settings, else the usual spellings.
fn pad_id(path: &Path, tok: &Tokenizer, file_pad: Option<u32>) -> Result<u32> {
    file_pad
        .or_else(|| ["[PAD]", "<pad>"].iter().find_map(|t| tok.token_to_id(t)))
        .ok_or_else(|| Error::file(path, "tokenizer has no padding token ([PAD] or <pad>)"))
}
