//! The encoder model: its config and its weights on the host.
pub mod config;

pub use config::{ModelConfig, ModelType};
