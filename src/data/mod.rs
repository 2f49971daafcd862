//! NER data: CoNLL files, label maps, tokenisation into windows, forget/retain splits,
//! packed batches and resumable batch streams (SPEC sections 1, 2, 4).
//!
//! Nothing here knows about models beyond their tokenizer and pad id.
pub mod batch;
pub mod conll;
pub mod encode;
pub mod labels;
pub mod rng;
pub mod split;

pub use batch::{bucketed_batches, token_batches, Batch, PositionStyle, Stream, StreamState};
pub use conll::{read_conll, write_conll, Sentence};
pub use encode::{Encoder, SpecialIds, TokenizerKind, Window, DEFAULT_MAX_LEN, IGNORE};
pub use labels::LabelMap;
pub use split::{forget_by_ratio, read_indices, retain_indices, write_indices};
