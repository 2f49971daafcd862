//! A tiny BERT (hidden 32, 2 layers, MiniLM's tokenizer and 30,522-word vocabulary) with
//! and without a head, and a 48-sentence slice of WNUT17: the inputs of the tests that
//! run the real binary (bad input, kill-and-resume, determinism). Building it takes a
//! fraction of a second; every command on it runs in well under a second.
use deepcut_fast::data::{read_conll, write_conll, LabelMap, Sentence};
use deepcut_fast::model::{copy_tokenizer_files, random_init, save_model_dir, ModelConfig};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Fixture {
    /// Encoder without a classification head (what `train` starts from).
    pub base: PathBuf,
    /// The same encoder with a random head for exactly the labels of `data`'s train
    /// (what `run`, `eval` and `predict` take directly).
    pub model: PathBuf,
    /// train (48 sentences), dev (12) and test (12) of WNUT17.
    pub data: PathBuf,
    pub train: Vec<Sentence>,
    pub labels: LabelMap,
}

pub fn tiny_config_json() -> serde_json::Value {
    json!({
        "model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 128,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02
    })
}

pub fn build(dir: &Path) -> Fixture {
    let minilm = super::shared().join("models/all-MiniLM-L6-v2");
    let cfg = ModelConfig::from_json(tiny_config_json(), &dir.join("config.json")).unwrap();
    let base = dir.join("tiny-bert");
    save_model_dir(&base, &cfg, &random_init(&cfg, None, 7)).unwrap();
    copy_tokenizer_files(&minilm, &base).unwrap();

    let all = read_conll(&super::shared().join("data/wnut17/train.conll"), true).unwrap();
    let train = all[..48].to_vec();
    let data = dir.join("data");
    write_dataset(&data, &train, &train[..12], &train[12..24]);

    let labels = LabelMap::from_sentences(&train);
    let mut hcfg = cfg.clone();
    hcfg.id2label = Some(labels.labels.clone());
    let model = dir.join("tiny-bert-ner");
    save_model_dir(&model, &hcfg, &random_init(&hcfg, Some(labels.len()), 7)).unwrap();
    copy_tokenizer_files(&minilm, &model).unwrap();
    Fixture {
        base,
        model,
        data,
        train,
        labels,
    }
}

/// Writes `dir/{train,dev,test}.conll`.
pub fn write_dataset(dir: &Path, train: &[Sentence], dev: &[Sentence], test: &[Sentence]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, s) in [("train", train), ("dev", dev), ("test", test)] {
        let tags: Vec<Vec<String>> = s.iter().map(|s| s.tags.clone()).collect();
        write_conll(&dir.join(format!("{name}.conll")), s, &tags).unwrap();
    }
}

/// Copies a folder (flat or nested) to `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &to);
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

/// Every file under `path` (or `path` itself) with its bytes; `None` if it does not exist.
pub fn snapshot(path: &Path) -> Option<BTreeMap<PathBuf, Vec<u8>>> {
    fn walk(p: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        if p.is_dir() {
            out.insert(p.join(""), vec![]);
            for e in std::fs::read_dir(p).unwrap() {
                walk(&e.unwrap().path(), out);
            }
        } else {
            out.insert(p.to_path_buf(), std::fs::read(p).unwrap());
        }
    }
    if std::fs::symlink_metadata(path).is_err() {
        return None;
    }
    let mut out = BTreeMap::new();
    walk(path, &mut out);
    Some(out)
}

/// Files left by an interrupted atomic write (`.NAME.tmpPID`) anywhere under `dir`.
pub fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                found.extend(temp_files(&p));
            } else if p.file_name().unwrap().to_string_lossy().contains(".tmp") {
                found.push(p);
            }
        }
    }
    found
}

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_deepcut-fast"))
}

pub fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Arguments of a short `run` on the tiny fixture: `model` (any model folder; the
/// fixture's or a doctored copy), a quarter of `data`'s train forgotten, 4 forget + 8
/// retain sentences per step, `steps` steps, quiet, on the CPU, into `out`; `extra`
/// options (checkpointing, learning rate, precision, threads, ...) appended.
pub fn run_args(model: &Path, data: &Path, out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    run_args_on("cpu", model, data, out, steps, extra)
}

/// Arguments of a short `train` of `model` on `data` (batches of 8, quiet, on the CPU) for
/// `epochs` epochs into `out`; `extra` options appended.
pub fn train_args(model: &Path, data: &Path, out: &Path, epochs: u32, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--model",
        &s(model),
        "--data",
        &s(data),
        "--epochs",
        &epochs.to_string(),
        "--batch",
        "8",
        "--quiet",
        "--device",
        "cpu",
        "--out",
        &s(out),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

/// `run_args` on `device` (cpu, cuda, ...).
pub fn run_args_on(device: &str, model: &Path, data: &Path, out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "run",
        "--model",
        &s(model),
        "--data",
        &s(data),
        "--forget-ratio",
        "0.25",
        "--steps",
        &steps.to_string(),
        "--bf",
        "4",
        "--br",
        "8",
        "--quiet",
        "--device",
        device,
        "--out",
        &s(out),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}
