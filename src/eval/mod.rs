//! Evaluation: seqeval-exact entity metrics and membership inference (SPEC section 6).
pub mod ensemble;
pub mod evaluate;
pub mod metrics;
pub mod mia;

pub use metrics::{entity_report, token_accuracy, EntityReport, Prf};
pub use mia::{auc, privleak};
