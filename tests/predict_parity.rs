//! `predict` and `eval` against transformers on real data (the done-when of the
//! foundation and data issues): a token classifier on all-MiniLM-L6-v2 whose head was
//! trained with transformers (tests/golden/minilm-*), and a small RoBERTa-type model
//! with a byte-level BPE tokenizer trained with transformers (tests/golden/roberta-*).
//! For every sentence that fits in 128 subwords (transformers does not window): the same
//! tag for every word and logits within 1e-4 (max abs); and `eval` gives the same
//! entity F1 as seqeval on transformers' predictions, to 0.01 points.
mod common;
use common::golden::Golden;
use deepcut_fast::data::read_conll;
use deepcut_fast::model::{copy_tokenizer_files, load_weights, save_model_dir, ModelConfig};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_deepcut-fast"))
}

/// The model folder for a golden case: the golden folder itself when it holds the whole
/// model, else all-MiniLM-L6-v2's encoder plus the golden head, saved with our writer.
fn model_dir(golden: &Path, tmp: &Path) -> PathBuf {
    if golden.join("model.safetensors").exists() {
        return golden.to_path_buf();
    }
    let base = common::shared().join("models/all-MiniLM-L6-v2");
    let cfg = ModelConfig::from_file(&golden.join("config.json")).unwrap();
    let (mut w, has_head) = load_weights(&base.join("model.safetensors"), &cfg).unwrap();
    assert!(!has_head);
    let head = Golden::load(&golden.join("head.safetensors"));
    for name in ["classifier.weight", "classifier.bias"] {
        let (shape, data) = head.f32s[name].clone();
        w.insert(name, deepcut_fast::model::HostTensor { shape, data });
    }
    let dir = tmp.join("model");
    save_model_dir(&dir, &cfg, &w).unwrap();
    copy_tokenizer_files(&base, &dir).unwrap();
    dir
}

fn check_dataset(golden_name: &str, dataset: &str, with_logits: bool) {
    let golden = common::repo().join("tests/golden").join(golden_name);
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(&golden, tmp.path());
    let test_file = common::shared().join("data").join(dataset).join("test.conll");
    let pred: Value = serde_json::from_str(&std::fs::read_to_string(golden.join("predictions.json")).unwrap()).unwrap();
    let included: Vec<usize> = pred["sentence_index"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let want_tags: Vec<Vec<String>> = serde_json::from_value(pred["predictions"].clone()).unwrap();

    // predict over the whole file (windowing the long sentences)
    let out = tmp.path().join("pred.conll");
    let logits_path = tmp.path().join("logits.safetensors");
    let st = bin()
        .args(["predict", "--device", "cpu", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&test_file)
        .arg("--output")
        .arg(&out)
        .arg("--logits")
        .arg(&logits_path)
        .status()
        .unwrap();
    assert!(st.success(), "predict failed");
    let sentences = read_conll(&test_file, true).unwrap();
    let predicted = read_conll(&out, true).unwrap();
    assert_eq!(predicted.len(), sentences.len(), "every sentence predicted");
    let ours = Golden::load(&logits_path);
    let labels = pred["labels"].as_array().unwrap().len();
    assert_eq!(
        ours.shape("logits"),
        &[sentences.iter().map(|s| s.words.len()).sum::<usize>(), labels]
    );
    let theirs = with_logits.then(|| Golden::load(&golden.join("logits.safetensors")));

    let offsets: Vec<usize> = sentences
        .iter()
        .scan(0, |acc, s| {
            let o = *acc;
            *acc += s.words.len();
            Some(o)
        })
        .collect();
    let (mut golden_word, mut max_diff, mut disagreements, mut near_ties) = (0usize, 0f32, 0usize, 0usize);
    for (k, &si) in included.iter().enumerate() {
        assert_eq!(predicted[si].words, sentences[si].words);
        for (wi, tag) in predicted[si].tags.iter().enumerate() {
            let ours_row = &ours.f("logits")[(offsets[si] + wi) * labels..(offsets[si] + wi + 1) * labels];
            let mut tie = false;
            if let Some(th) = &theirs {
                let row = &th.f("logits")[golden_word * labels..(golden_word + 1) * labels];
                for (a, b) in ours_row.iter().zip(row) {
                    max_diff = max_diff.max((a - b).abs());
                }
                let mut sorted = row.to_vec();
                sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
                tie = sorted[0] - sorted[1] < 1e-4; // argmax not decided at the tolerance
            }
            if tag != &want_tags[k][wi] {
                if tie {
                    near_ties += 1;
                } else {
                    disagreements += 1;
                }
            }
            golden_word += 1;
        }
    }
    assert_eq!(
        disagreements, 0,
        "{golden_name}: tags differ from transformers on {disagreements} words"
    );
    assert!(near_ties <= 1, "{golden_name}: {near_ties} near-tie words differ");
    assert!(max_diff <= 1e-4, "{golden_name}: logits differ by up to {max_diff:e}");
    if let Some(th) = &theirs {
        assert_eq!(golden_word, th.shape("logits")[0], "every golden word compared");
    }

    // eval on the sentences transformers could score, as a dataset folder of its own
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let subset: Vec<_> = included.iter().map(|&i| sentences[i].clone()).collect();
    for (split, n) in [("train", 5), ("dev", 5), ("test", subset.len())] {
        // only test is compared; small train/dev keep the run short
        let part = &subset[..n.min(subset.len())];
        let tags: Vec<Vec<String>> = part.iter().map(|s| s.tags.clone()).collect();
        deepcut_fast::data::write_conll(&data.join(format!("{split}.conll")), part, &tags).unwrap();
    }
    let json = tmp.path().join("eval.json");
    let st = bin()
        .args(["eval", "--device", "cpu", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--json")
        .arg(&json)
        .status()
        .unwrap();
    assert!(st.success(), "eval failed");
    let ev: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in ["precision", "recall", "f1"] {
        let ours = ev["test"][key].as_f64().unwrap();
        let want = pred["seqeval"][key].as_f64().unwrap();
        assert!(
            (ours - want).abs() <= 1e-4,
            "{golden_name}: eval {key} {ours} vs seqeval on transformers' predictions {want}"
        );
    }
    assert!(
        ev["test"]["f1"].as_f64().unwrap() > 0.0,
        "a model that predicts no entity proves little"
    );
}

#[test]
fn minilm_wnut17_predict_and_eval_match_transformers() {
    check_dataset("minilm-wnut17", "wnut17", true);
}

#[test]
fn minilm_ncbi_eval_matches_transformers() {
    let g = common::repo().join("tests/golden/minilm-ncbi");
    check_dataset("minilm-ncbi", "ncbi_disease", g.join("logits.safetensors").exists());
}

#[test]
fn roberta_bpe_wnut17_predict_and_eval_match_transformers() {
    check_dataset("roberta-wnut17", "wnut17", true);
}

#[test]
fn roberta_bpe_ncbi_eval_matches_transformers() {
    let g = common::repo().join("tests/golden/roberta-ncbi");
    check_dataset("roberta-ncbi", "ncbi_disease", g.join("logits.safetensors").exists());
}
