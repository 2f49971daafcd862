//! config.json validation on arbitrary bytes (properties: fuzz/checks.rs).
#![no_main]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::config(data));
