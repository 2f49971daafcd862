//! Every input the fuzzers (fuzz/, run by hand: RELIABILITY.md) found to break a loader,
//! replayed in CI through the same properties the fuzz targets check (fuzz/checks.rs),
//! together with the fuzzers' seed inputs. Inputs live in tests/fuzz_corpus/TARGET/
//! (crashes, named after what they found) and fuzz/seeds/TARGET/.
#[path = "../fuzz/checks.rs"]
mod checks;
use std::path::{Path, PathBuf};

/// (path, bytes) of every file in tests/fuzz_corpus/TARGET and fuzz/seeds/TARGET.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = vec![];
    for dir in [
        repo.join("tests/fuzz_corpus").join(target),
        repo.join("fuzz/seeds").join(target),
    ] {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            out.push((p, bytes));
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no inputs for {target}");
    out
}

fn replay(target: &str, check: impl Fn(&[u8])) {
    for (p, bytes) in inputs(target) {
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&bytes))) {
            let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
            panic!("{}: {msg}", p.display());
        }
    }
}

#[test]
fn conll_reader() {
    replay("conll", checks::conll);
}

#[test]
fn config_loader() {
    replay("config", checks::config);
}

#[test]
fn safetensors_loader() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, cfg) = (tmp.path().join("model.safetensors"), checks::tiny_config());
    replay("safetensors", |b| checks::safetensors(b, &path, &cfg));
}

#[test]
fn forget_index_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("forget.txt");
    replay("indices", |b| checks::indices(b, &path));
}
