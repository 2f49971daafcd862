//! Entity-level precision, recall and F1 exactly as seqeval 1.2 computes them in its
//! default (conlleval-style) mode, micro-averaged and per type (SPEC section 6).
//!
//! seqeval flattens the sentences with an `O` between them, reads chunks with
//! conlleval's start/end rules (so `I-X` after `O` starts a chunk, and a type change
//! ends one), and counts a predicted chunk correct when type, start and end all match.
//! The rules below are a line-by-line port of `seqeval.metrics.sequence_labeling`
//! (`get_entities`, `end_of_chunk`, `start_of_chunk`, `precision_recall_fscore_support`);
//! they also cover IOBES and malformed tags the same way, though the engine only
//! produces BIO2.
use std::collections::BTreeMap;

/// Scores of one entity type, or of all together (micro).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Prf {
    /// correct / predicted, 0 when nothing was predicted.
    pub precision: f64,
    /// correct / support, 0 when there are no gold entities.
    pub recall: f64,
    /// 2 P R / (P + R), 0 when P + R = 0.
    pub f1: f64,
    /// Gold entities.
    pub support: usize,
    /// Predicted entities.
    pub predicted: usize,
    /// Predicted entities that match a gold one exactly (type, start, end).
    pub correct: usize,
}

impl Prf {
    /// seqeval's arithmetic, in its order of operations (so results agree to the bit).
    pub fn from_counts(correct: usize, predicted: usize, support: usize) -> Prf {
        let divide = |num: usize, den: usize| if den == 0 { 0.0 } else { num as f64 / den as f64 };
        let precision = divide(correct, predicted);
        let recall = divide(correct, support);
        let denom = precision + recall;
        let f1 = 2.0 * precision * recall / if denom == 0.0 { 1.0 } else { denom };
        Prf {
            precision,
            recall,
            f1,
            support,
            predicted,
            correct,
        }
    }
}

/// Micro-averaged and per-type scores.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EntityReport {
    pub micro: Prf,
    /// Every type that occurs in gold or predictions.
    pub per_type: BTreeMap<String, Prf>,
}

/// One chunk: (type, first token, last token), token offsets in the flattened corpus.
pub type Chunk = (String, usize, usize);

/// Entity scores of `pred` against `gold`, sentence by sentence. Sentence `i` of both
/// must have the same length (seqeval raises otherwise; here a mismatch is a caller bug
/// and is caught by a debug assertion).
pub fn entity_report(gold: &[Vec<String>], pred: &[Vec<String>]) -> EntityReport {
    debug_assert_eq!(gold.len(), pred.len(), "gold and predicted sentence counts differ");
    debug_assert!(
        gold.iter().zip(pred).all(|(g, p)| g.len() == p.len()),
        "sentence lengths differ"
    );
    let mut gold_chunks = get_entities(gold);
    let mut pred_chunks = get_entities(pred);
    gold_chunks.sort_unstable();
    pred_chunks.sort_unstable();

    // (correct, predicted, support) per type.
    let mut counts: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    for (ty, ..) in &gold_chunks {
        counts.entry(ty.clone()).or_default().2 += 1;
    }
    for (ty, ..) in &pred_chunks {
        counts.entry(ty.clone()).or_default().1 += 1;
    }
    for chunk in matches(&gold_chunks, &pred_chunks) {
        counts.entry(chunk.0.clone()).or_default().0 += 1;
    }

    let per_type: BTreeMap<String, Prf> = counts
        .iter()
        .map(|(ty, &(c, p, s))| (ty.clone(), Prf::from_counts(c, p, s)))
        .collect();
    let (c, p, s) = counts
        .values()
        .fold((0, 0, 0), |acc, v| (acc.0 + v.0, acc.1 + v.1, acc.2 + v.2));
    EntityReport {
        micro: Prf::from_counts(c, p, s),
        per_type,
    }
}

/// Chunks present in both sorted lists (each list has no duplicates: chunks of one
/// sequence never share a start).
fn matches<'a>(gold: &'a [Chunk], pred: &'a [Chunk]) -> Vec<&'a Chunk> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < gold.len() && j < pred.len() {
        match gold[i].cmp(&pred[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                out.push(&gold[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out
}

/// Fraction of words whose tag is right (seqeval's `accuracy_score`); 0 for no words.
pub fn token_accuracy(gold: &[Vec<String>], pred: &[Vec<String>]) -> f64 {
    let (mut right, mut total) = (0usize, 0usize);
    for (g, p) in gold.iter().zip(pred) {
        total += g.len();
        right += g.iter().zip(p).filter(|(a, b)| a == b).count();
    }
    if total == 0 {
        0.0
    } else {
        right as f64 / total as f64
    }
}

/// seqeval's `get_entities` on a list of sentences: flatten with an `O` after each
/// sentence, append one more `O`, and run the chunk state machine.
pub fn get_entities(sentences: &[Vec<String>]) -> Vec<Chunk> {
    let flat = sentences
        .iter()
        .flat_map(|s| s.iter().map(String::as_str).chain(std::iter::once("O")));
    let mut chunks = Vec::new();
    // seqeval starts from prev_tag 'O' and prev_type '' (not '_', the type of a real O).
    let (mut prev_tag, mut prev_type) = ('O', String::new());
    let mut begin = 0;
    for (i, chunk) in flat.chain(std::iter::once("O")).enumerate() {
        let (tag, ty) = split_tag(chunk);
        if end_of_chunk(prev_tag, tag, &prev_type, &ty) {
            chunks.push((prev_type.clone(), begin, i - 1));
        }
        if start_of_chunk(prev_tag, tag, &prev_type, &ty) {
            begin = i;
        }
        prev_tag = tag;
        prev_type = ty;
    }
    chunks
}

/// seqeval: `tag = chunk[0]`, `type = chunk[1:].split('-', 1)[-1] or '_'`.
fn split_tag(chunk: &str) -> (char, String) {
    let mut chars = chunk.chars();
    let tag = chars.next().unwrap_or('O'); // Python would fail on ""; treat it as O
    let rest = chars.as_str();
    let ty = match rest.split_once('-') {
        Some((_, after)) => after,
        None => rest,
    };
    (tag, if ty.is_empty() { "_".to_string() } else { ty.to_string() })
}

/// seqeval's `end_of_chunk`: did a chunk end just before this token?
fn end_of_chunk(prev_tag: char, tag: char, prev_type: &str, ty: &str) -> bool {
    matches!(prev_tag, 'E' | 'S')
        || (matches!(prev_tag, 'B' | 'I') && matches!(tag, 'B' | 'S' | 'O'))
        || (prev_tag != 'O' && prev_tag != '.' && prev_type != ty)
}

/// seqeval's `start_of_chunk`: does a chunk start at this token?
fn start_of_chunk(prev_tag: char, tag: char, prev_type: &str, ty: &str) -> bool {
    matches!(tag, 'B' | 'S')
        || (matches!(prev_tag, 'E' | 'S' | 'O') && matches!(tag, 'E' | 'I'))
        || (tag != 'O' && tag != '.' && prev_type != ty)
}
