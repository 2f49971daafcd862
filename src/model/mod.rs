//! The encoder model: its config and its weights on the host.
pub mod checkpoint;
pub mod config;

pub use checkpoint::{
    copy_tokenizer_files, init_head, load_model_dir, load_weights, param_specs, random_init,
    same_dir, save_model_dir, save_weights, HostTensor, HostWeights,
};
pub use config::{ModelConfig, ModelType};
