//! model.safetensors loading on arbitrary bytes for a tiny fixed config (properties:
//! fuzz/checks.rs). Seed with fuzz/seeds/safetensors (valid files for that config).
#![no_main]
#[path = "../checks.rs"]
mod checks;
use std::path::PathBuf;
use std::sync::OnceLock;

static CFG: OnceLock<deepcut_fast::model::ModelConfig> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // One file per process, rewritten each run: load_weights reads a path.
    let path = PathBuf::from(format!("/dev/shm/deepcut-fuzz-{}.safetensors", std::process::id()));
    checks::safetensors(data, &path, CFG.get_or_init(checks::tiny_config));
});
