//! deepcut-fast: DeepCUT machine unlearning for fine-tuned BERT/RoBERTa token classifiers.
//!
//! Layers, top to bottom (data flows one way):
//! `cli` -> `unlearn`/`train` -> `model` -> `backend` (cpu, later cuda) -> kernels.
//! Nothing below `model` knows about NER, forget sets or files.
pub mod backend;
pub mod cli;
pub mod data;
pub mod error;
pub mod eval;
pub mod infer;
pub mod model;
pub mod report;
pub mod train;
pub mod unlearn;
pub mod util;

pub use error::{Error, Result};
