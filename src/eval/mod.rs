//! Evaluation: seqeval-exact entity metrics and membership inference (SPEC section 6).
pub mod metrics;

pub use metrics::{entity_report, token_accuracy, EntityReport, Prf};
