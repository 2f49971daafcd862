//! The encoder model: its config, its weights on the host, and the encoder written once
//! against the Backend trait. Nothing here knows about NER, forget sets or runs.
pub mod checkpoint;
pub mod config;
pub mod encoder;

pub use checkpoint::{
    copy_tokenizer_files, init_head, load_model_dir, load_weights, param_specs, random_init, same_dir, save_model_dir,
    save_weights, HostTensor, HostWeights,
};
pub use config::{ModelConfig, ModelType};
pub use encoder::{Dims, HostBatch, Mode, Model};
