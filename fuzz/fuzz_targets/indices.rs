//! The forget-index reader on arbitrary bytes (properties: fuzz/checks.rs).
#![no_main]
#[path = "../checks.rs"]
mod checks;
use std::path::PathBuf;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = PathBuf::from(format!("/dev/shm/deepcut-fuzz-{}.txt", std::process::id()));
    checks::indices(data, &path);
});
