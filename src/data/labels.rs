//! The label map (SPEC section 1): full BIO tags are the classes (B-PER and I-PER are
//! different classes), sorted with `O` first; a model that already has a map keeps it.
use super::conll::Sentence;
use crate::error::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Class id -> tag. `labels[id]` is the tag of class `id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelMap {
    pub labels: Vec<String>,
}

impl LabelMap {
    /// All tags found in `sentences`, sorted (byte order), `O` first. `O` is always
    /// present, even if no sentence uses it: it is what an untagged word means.
    pub fn from_sentences(sentences: &[Sentence]) -> LabelMap {
        let mut set: BTreeSet<&str> = sentences
            .iter()
            .flat_map(|s| s.tags.iter().map(String::as_str))
            .collect();
        set.remove("O");
        let mut labels = vec!["O".to_string()];
        labels.extend(set.into_iter().map(str::to_string));
        LabelMap { labels }
    }

    /// From a Hugging Face `id2label` map (ids `0..n`, each once, no tag twice). The
    /// model's order is kept as it is: its classifier rows are in that order.
    pub fn from_id2label(map: &BTreeMap<usize, String>) -> Result<LabelMap> {
        let mut labels = Vec::with_capacity(map.len());
        for (expect, (&id, tag)) in map.iter().enumerate() {
            if id != expect {
                return Err(Error::invalid(format!(
                    "id2label: ids must be 0..{} without gaps, but id {expect} is missing",
                    map.len()
                )));
            }
            if labels.contains(tag) {
                return Err(Error::invalid(format!("id2label: tag `{tag}` appears twice")));
            }
            labels.push(tag.clone());
        }
        if labels.is_empty() {
            return Err(Error::invalid("id2label is empty"));
        }
        Ok(LabelMap { labels })
    }

    /// The `id2label` map to store in config.json (serialises with string keys "0", "1", ...).
    pub fn id2label(&self) -> BTreeMap<usize, String> {
        self.labels.iter().cloned().enumerate().collect()
    }

    /// The `label2id` map to store in config.json.
    pub fn label2id(&self) -> BTreeMap<String, usize> {
        self.labels.iter().cloned().enumerate().map(|(i, t)| (t, i)).collect()
    }

    /// Class id of `tag`. A linear scan: label sets are tens of tags.
    pub fn id(&self, tag: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == tag)
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Error naming the first tag of `sentences` (read from `path`) that the map lacks:
    /// a dataset tag the model cannot predict must not be silently remapped (SPEC 1).
    pub fn check_covers(&self, sentences: &[Sentence], path: &Path) -> Result<()> {
        for (si, s) in sentences.iter().enumerate() {
            for (wi, tag) in s.tags.iter().enumerate() {
                if self.id(tag).is_none() {
                    return Err(Error::file(
                        path,
                        format!(
                            "sentence {si} (0-based), word {wi} `{}`: tag `{tag}` is not in the model's label map [{}]",
                            s.words.get(wi).map(String::as_str).unwrap_or(""),
                            self.labels.join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
