//! The properties the fuzz targets check, shared with tests/fuzz_regressions.rs (which
//! replays every committed crashing input through them in CI). Each takes the raw
//! input and panics when the loader misbehaves: a panic inside the loader, an error
//! that does not name the file, or a result that breaks the loader's contract.
#![allow(dead_code)]
use deepcut_fast::data::conll::{is_bio_tag, parse_conll};
use deepcut_fast::data::read_indices;
use deepcut_fast::model::{load_weights, param_specs, ModelConfig};
use std::path::Path;

/// The CoNLL reader, tagged and untagged: sentences that are non-empty, with one BIO2
/// tag per word (or none), and that read back the same after the canonical writer's
/// `word<TAB>tag` form; or an error naming the file.
pub fn conll(data: &[u8]) {
    let path = Path::new("fuzz.conll");
    for require_tags in [true, false] {
        match parse_conll(path, data, require_tags) {
            Ok(sentences) => {
                assert!(!sentences.is_empty());
                for s in &sentences {
                    assert!(!s.words.is_empty());
                    assert!(s.tags.is_empty() || s.tags.len() == s.words.len());
                    assert!(!require_tags || s.tags.len() == s.words.len());
                    assert!(s.tags.iter().all(|t| is_bio_tag(t)));
                    assert!(s.words.iter().all(|w| !w.is_empty() && !w.contains('\n')));
                }
                let mut text = String::new();
                for s in &sentences {
                    for (i, w) in s.words.iter().enumerate() {
                        text.push_str(w);
                        if let Some(t) = s.tags.get(i) {
                            text.push('\t');
                            text.push_str(t);
                        }
                        text.push('\n');
                    }
                    text.push('\n');
                }
                let again = parse_conll(path, text.as_bytes(), require_tags).expect("the canonical form reads back");
                assert_eq!(again, sentences, "not stable under write + read");
            }
            Err(e) => assert!(e.to_string().starts_with("fuzz.conll"), "{e}"),
        }
    }
}

/// config.json validation: an error naming the file, or a config whose parameter
/// shapes can be listed and written back (no overflow, no exhausted memory).
pub fn config(data: &[u8]) {
    let Ok(raw) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    match ModelConfig::from_json(raw, Path::new("config.json")) {
        Ok(cfg) => {
            let specs = param_specs(&cfg, cfg.num_labels());
            assert!(specs.iter().all(|(_, shape)| shape.iter().all(|&d| d > 0)));
            let again = ModelConfig::from_json(cfg.to_json(), Path::new("config.json")).expect("to_json reads back");
            assert_eq!(again.hidden_size, cfg.hidden_size);
            assert_eq!(again.id2label, cfg.id2label);
        }
        Err(e) => assert!(e.to_string().starts_with("config.json"), "{e}"),
    }
}

/// The tiny config the safetensors target loads against: hidden 4, one layer,
/// vocabulary 8, two labels (fuzz/seeds/safetensors holds valid files for it).
pub fn tiny_config() -> ModelConfig {
    let raw = serde_json::json!({
        "model_type": "bert", "vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": 8,
        "type_vocab_size": 2, "id2label": {"0": "O", "1": "B-X"}
    });
    ModelConfig::from_json(raw, Path::new("config.json")).unwrap()
}

/// model.safetensors loading, the bytes written at `path` first: an error naming the
/// file, or weights of exactly the config's shapes, all finite.
pub fn safetensors(data: &[u8], path: &Path, cfg: &ModelConfig) {
    std::fs::write(path, data).unwrap();
    match load_weights(path, cfg) {
        Ok((w, has_head)) => {
            let specs = param_specs(cfg, has_head.then_some(2));
            assert_eq!(w.tensors.len(), specs.len());
            for (name, shape) in specs {
                let t = w.get(&name).unwrap();
                assert_eq!(t.shape, shape);
                assert_eq!(t.data.len(), shape.iter().product::<usize>());
                assert!(t.data.iter().all(|x| x.is_finite()));
            }
        }
        Err(e) => assert!(e.to_string().starts_with(&path.display().to_string()), "{e}"),
    }
}

/// The forget-index reader: the first two bytes give the train size, the rest (written
/// at `path`) is the file. An error naming the file, or sorted, distinct, in-range
/// indices that leave something to retain.
pub fn indices(data: &[u8], path: &Path) {
    if data.len() < 2 {
        return;
    }
    let n_train = u16::from_le_bytes([data[0], data[1]]) as usize;
    std::fs::write(path, &data[2..]).unwrap();
    match read_indices(path, n_train) {
        Ok(idx) => {
            assert!(!idx.is_empty() && idx.len() < n_train);
            assert!(idx.windows(2).all(|w| w[0] < w[1]));
            assert!(idx.iter().all(|&i| i < n_train));
        }
        Err(e) => assert!(e.to_string().starts_with(&path.display().to_string()), "{e}"),
    }
}
