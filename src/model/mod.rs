//! The encoder and its checkpoints. Nothing here knows about NER, forget sets or runs.
pub mod encoder;

pub use encoder::{Dims, HostBatch, Mode, Model};
