//! The bad-input matrix (issue 7): broken CoNLL files, model folders, tokenizers and
//! options, each run through the real binary with the smallest command that reaches the
//! failure. Every case must: exit with status 1 (not a signal, not success), print
//! exactly one `error:` line naming the file / line / tensor / option, print no panic
//! or backtrace, change nothing that existed before (input models, data, an existing
//! output folder: compared byte for byte), and leave no output or temp file behind
//! when the failure is in the inputs.
//!
//! Root ignores file permissions, and these tests may run as root, so "read-only
//! output" is an output path under a regular file (ENOTDIR, for everyone) and, where
//! `mount` is permitted, a read-only tmpfs. A full disk is a 64 KiB tmpfs where
//! mounting is permitted (otherwise a message says the case was skipped), and always a
//! file-size limit (RLIMIT_FSIZE through `ulimit -f`, SIGXFSZ ignored so the write
//! fails with EFBIG instead of killing the process).
mod common;
use common::fixture::{self, bin, copy_dir, s, snapshot, temp_files, Fixture};
use deepcut_fast::model::{random_init, save_model_dir, ModelConfig};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Case {
    name: &'static str,
    args: Vec<String>,
    /// Each must appear in the `error:` line.
    needles: Vec<String>,
    /// Must be byte-identical after the command (files or folders).
    watch: Vec<PathBuf>,
    /// Must not exist after the command: outputs of a command whose inputs were bad.
    absent: Vec<PathBuf>,
    /// Folders that must hold no temp file of an interrupted atomic write afterwards.
    no_temp: Vec<PathBuf>,
    /// Wraps the command (e.g. in a shell that sets a file-size limit).
    wrap: Option<fn(Vec<String>) -> Command>,
}

impl Case {
    fn new<S: AsRef<str>>(name: &'static str, args: &[S], needles: &[&str]) -> Case {
        Case {
            name,
            args: args.iter().map(|a| a.as_ref().to_string()).collect(),
            needles: needles.iter().map(|n| n.to_string()).collect(),
            watch: vec![],
            absent: vec![],
            no_temp: vec![],
            wrap: None,
        }
    }
    fn watch(mut self, p: &Path) -> Case {
        self.watch.push(p.to_path_buf());
        self
    }
    fn absent(mut self, p: &Path) -> Case {
        self.absent.push(p.to_path_buf());
        self
    }
    fn no_temp(mut self, p: &Path) -> Case {
        self.no_temp.push(p.to_path_buf());
        self
    }

    /// Runs the case; returns the error line, or what was wrong.
    fn check(&self) -> Result<String, String> {
        let before: Vec<_> = self.watch.iter().map(|p| snapshot(p)).collect();
        let out = match self.wrap {
            Some(wrap) => wrap(self.args.clone()).output(),
            None => bin().args(&self.args).output(),
        }
        .map_err(|e| format!("could not start: {e}"))?;
        let err = String::from_utf8_lossy(&out.stderr);
        let mut problems = vec![];
        if out.status.code() != Some(1) {
            problems.push(format!("exit status {:?}, expected 1", out.status));
        }
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
        if errors.len() != 1 {
            problems.push(format!("{} `error` lines, expected one", errors.len()));
        }
        let line = errors.first().copied().unwrap_or("");
        for n in &self.needles {
            if !line.contains(n.as_str()) {
                problems.push(format!("the error does not name `{n}`"));
            }
        }
        for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
            if err.contains(bad) {
                problems.push(format!("stderr has `{bad}`"));
            }
        }
        for (p, b) in self.watch.iter().zip(before) {
            if snapshot(p) != b {
                problems.push(format!("{} changed", p.display()));
            }
        }
        for p in &self.absent {
            if p.exists() {
                problems.push(format!("{} was left behind", p.display()));
            }
        }
        for p in &self.no_temp {
            let t = temp_files(p);
            if !t.is_empty() {
                problems.push(format!("temp files left behind: {t:?}"));
            }
        }
        if problems.is_empty() {
            Ok(line.to_string())
        } else {
            Err(format!("{}\n  stderr: {err}", problems.join("; ")))
        }
    }
}

/// Runs every case, prints the matrix (case | command | message), fails listing every
/// case that did not behave.
fn run_matrix(cases: &[Case], root: &Path) {
    let mut failed = vec![];
    for c in cases {
        let cmd = c.args.join(" ").replace(&s(root), "$TMP");
        match c.check() {
            Ok(msg) => println!("| {} | `{}` | {} |", c.name, cmd, msg.replace(&s(root), "$TMP")),
            Err(e) => failed.push(format!("{}: `{cmd}`: {e}", c.name)),
        }
    }
    assert!(
        failed.is_empty(),
        "{} case(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// Rewrites a safetensors file tensor by tensor: `f(name, dtype, shape, bytes)` returns
/// the new dtype, shape and bytes.
fn rewrite_safetensors(path: &Path, f: impl Fn(&str, Dtype, &[usize], &[u8]) -> (Dtype, Vec<usize>, Vec<u8>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let (d, sh, b) = f(&n, t.dtype(), t.shape(), t.data());
            (n, d, sh, b)
        })
        .collect();
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, d, sh, b)| (n.clone(), TensorView::new(*d, sh.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, &None).unwrap()).unwrap();
}

/// A copy of `src` (a model folder) under `dir/name`, changed by `f`.
fn broken_model(fx_dir: &Path, src: &Path, name: &str, f: impl FnOnce(&Path)) -> PathBuf {
    let dst = fx_dir.join(name);
    copy_dir(src, &dst);
    f(&dst);
    dst
}

/// A copy of the fixture's data folder with `file` replaced by `bytes`.
fn broken_data(fx_dir: &Path, fx: &Fixture, name: &str, file: &str, bytes: &[u8]) -> PathBuf {
    let dst = fx_dir.join(name);
    copy_dir(&fx.data, &dst);
    std::fs::write(dst.join(file), bytes).unwrap();
    dst
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// The CoNLL text of the fixture's train with line `line` (1-based) replaced.
fn train_text_with(fx: &Fixture, line: usize, replacement: &str) -> String {
    let text = std::fs::read_to_string(fx.data.join("train.conll")).unwrap();
    let mut lines: Vec<&str> = text.split('\n').collect();
    lines[line - 1] = replacement;
    lines.join("\n")
}

/// `ulimit -f` (512-byte blocks) around the binary, SIGXFSZ ignored: writes past the
/// limit fail with EFBIG instead of killing the process.
fn with_file_size_limit(args: Vec<String>) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("trap '' XFSZ; ulimit -f 256 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_deepcut-fast"))
        .args(args);
    c
}

/// A tmpfs mounted for one test, unmounted on drop.
struct Mount(PathBuf);
impl Mount {
    fn tmpfs(at: &Path, opts: &str) -> Option<Mount> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(at)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        ok.then(|| Mount(at.to_path_buf()))
    }
}
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Says (past the test harness's capture) that a case could not run here.
fn skipped(what: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {what}: `mount -t tmpfs` is not permitted here"
    );
}

#[test]
fn bad_conll_files() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fx = fixture::build(root);
    let m = s(&fx.model);
    let preds = root.join("preds");
    std::fs::create_dir_all(&preds).unwrap();
    let pred_out = preds.join("pred.conll");
    let out = root.join("out");

    // gzip magic and deterministic noise: what a compressed file passed by mistake looks like
    let mut rng = common::Rng(0x9e37_79b9_7f4a_7c15);
    let mut garbage = vec![0x1f, 0x8b, 0x08, 0x00];
    garbage.extend((0..4096).map(|_| rng.next_u64() as u8));
    let garbage_f = root.join("garbage.conll");
    std::fs::write(&garbage_f, &garbage).unwrap();
    let empty_f = root.join("empty.conll");
    std::fs::write(&empty_f, "").unwrap();
    let long_f = root.join("long.conll");
    let mut long = vec![b'a'; 10 << 20];
    long.extend_from_slice(b"\tO\n");
    std::fs::write(&long_f, &long).unwrap();

    // line 5 of train has no tag; line 7 of dev has a tag that is not BIO2
    let no_tag = broken_data(
        root,
        &fx,
        "d-notag",
        "train.conll",
        train_text_with(&fx, 5, "lonely").as_bytes(),
    );
    let dev_text = std::fs::read_to_string(fx.data.join("dev.conll")).unwrap();
    let mut dev_lines: Vec<String> = dev_text.split('\n').map(str::to_string).collect();
    let w7 = dev_lines[6].split('\t').next().unwrap().to_string();
    dev_lines[6] = format!("{w7}\tB_person");
    let bad_tag = broken_data(root, &fx, "d-badtag", "dev.conll", dev_lines.join("\n").as_bytes());
    // Latin-1 bytes on line 7 of test
    let mut latin1 = std::fs::read(fx.data.join("test.conll")).unwrap();
    let at = latin1.iter().enumerate().filter(|(_, &b)| b == b'\n').nth(5).unwrap().0 + 1;
    latin1.splice(at..at, b"caf\xe9\tO\n".iter().copied());
    let bad_utf8 = broken_data(root, &fx, "d-latin1", "test.conll", &latin1);
    // old Mac line endings: the whole file is one line
    let cr = std::fs::read_to_string(fx.data.join("train.conll"))
        .unwrap()
        .replace('\n', "\r");
    let cr_data = broken_data(root, &fx, "d-cr", "train.conll", cr.as_bytes());
    // a zero-filled tail, as a crash on some filesystems leaves behind
    let mut zeros = std::fs::read(fx.data.join("dev.conll")).unwrap();
    let dev_lines_n = zeros.iter().filter(|&&b| b == b'\n').count();
    zeros.extend(std::iter::repeat_n(0u8, 4096));
    let nul_data = broken_data(root, &fx, "d-nul", "dev.conll", &zeros);
    let nul_line = format!("dev.conll:{}:", dev_lines_n + 1);
    // a tag the model has no label for
    let new_tag = broken_data(root, &fx, "d-newtag", "test.conll", b"Enterprise\tB-spaceship\n\n");

    let cases = vec![
        Case::new(
            "CoNLL: binary garbage",
            &[
                "predict",
                "--model",
                &m,
                "--input",
                &s(&garbage_f),
                "--output",
                &s(&pred_out),
                "--device",
                "cpu",
            ],
            &["garbage.conll:1:", "invalid UTF-8"],
        )
        .absent(&pred_out),
        Case::new(
            "CoNLL: a line with no tag",
            &[
                "train",
                "--model",
                &s(&fx.base),
                "--data",
                &s(&no_tag),
                "--out",
                &s(&out),
                "--device",
                "cpu",
            ],
            &["train.conll:5:", "lonely"],
        )
        .absent(&out),
        Case::new(
            "CoNLL: a tag that is not BIO2",
            &["eval", "--model", &m, "--data", &s(&bad_tag), "--device", "cpu"],
            &["dev.conll:7:", "`B_person`"],
        ),
        Case::new(
            "CoNLL: an empty file",
            &[
                "predict",
                "--model",
                &m,
                "--input",
                &s(&empty_f),
                "--output",
                &s(&pred_out),
                "--device",
                "cpu",
            ],
            &["empty.conll", "no sentences"],
        )
        .absent(&pred_out),
        Case::new(
            "CoNLL: a 10 MB single line",
            &[
                "predict",
                "--model",
                &m,
                "--input",
                &s(&long_f),
                "--output",
                &s(&pred_out),
                "--device",
                "cpu",
            ],
            &["long.conll:1:", "bytes long"],
        )
        .absent(&pred_out),
        Case::new(
            "CoNLL: invalid UTF-8",
            &["eval", "--model", &m, "--data", &s(&bad_utf8), "--device", "cpu"],
            &["test.conll:7:", "invalid UTF-8"],
        ),
        Case::new(
            "CoNLL: CR-only line endings",
            &[
                "train",
                "--model",
                &s(&fx.base),
                "--data",
                &s(&cr_data),
                "--out",
                &s(&out),
                "--device",
                "cpu",
            ],
            &["train.conll:1:", "carriage return"],
        )
        .absent(&out),
        Case::new(
            "CoNLL: NUL bytes (zero-filled tail)",
            &["eval", "--model", &m, "--data", &s(&nul_data), "--device", "cpu"],
            &[&nul_line, "NUL"],
        ),
        Case::new(
            "CoNLL: a tag the model has no label for",
            &["eval", "--model", &m, "--data", &s(&new_tag), "--device", "cpu"],
            &["test.conll", "`B-spaceship`"],
        ),
    ];
    let cases: Vec<Case> = cases
        .into_iter()
        .map(|c| c.watch(&fx.model).watch(&fx.base).watch(&fx.data))
        .collect();
    run_matrix(&cases, root);
}

/// SPEC section 1 and seqeval (default mode) read `I-x` after `O` (or after another
/// type) as the start of an `x` entity, and the shared data has such tags. The reader
/// accepts them and the metrics count them as entities.
#[test]
fn an_i_tag_whose_type_never_opened_is_an_entity() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture::build(tmp.path());
    let ty = fx
        .labels
        .labels
        .iter()
        .find_map(|l| l.strip_prefix("I-"))
        .expect("the fixture has an I- label")
        .to_string();
    let dev = format!("the\tO\nx\tI-{ty}\ny\tI-{ty}\n\nz\tI-{ty}\nw\tO\n\n");
    let data = broken_data(tmp.path(), &fx, "d-iafter", "dev.conll", dev.as_bytes());
    let json = tmp.path().join("m.json");
    let o = bin()
        .args([
            "eval",
            "--model",
            &s(&fx.model),
            "--data",
            &s(&data),
            "--json",
            &s(&json),
        ])
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        v["dev"]["per_type"][&ty]["support"], 2,
        "two `{ty}` entities, each opened by an I- tag: {}",
        v["dev"]
    );
}

#[test]
fn bad_model_folders_and_tokenizers() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fx = fixture::build(root);
    let preds = root.join("preds");
    std::fs::create_dir_all(&preds).unwrap();
    let pred_out = preds.join("pred.conll");
    let input = fx.data.join("test.conll");
    let out = root.join("out");
    let w = "model.safetensors";

    let no_cfg = broken_model(root, &fx.model, "m-nocfg", |d| {
        std::fs::remove_file(d.join("config.json")).unwrap()
    });
    let gpt2 = broken_model(root, &fx.model, "m-gpt2", |d| {
        edit_json(&d.join("config.json"), |v| v["model_type"] = "gpt2".into())
    });
    let shape = broken_model(root, &fx.base, "m-shape", |d| {
        edit_json(&d.join("config.json"), |v| v["hidden_size"] = 64.into())
    });
    let trunc = broken_model(root, &fx.model, "m-trunc", |d| {
        let b = std::fs::read(d.join(w)).unwrap();
        std::fs::write(d.join(w), &b[..b.len() * 3 / 5]).unwrap();
    });
    let header = broken_model(root, &fx.model, "m-header", |d| {
        let mut b = std::fs::read(d.join(w)).unwrap();
        let claim = b.len() as u64 + 1000;
        b[..8].copy_from_slice(&claim.to_le_bytes());
        std::fs::write(d.join(w), &b).unwrap();
    });
    let f64_model = broken_model(root, &fx.model, "m-f64", |d| {
        rewrite_safetensors(&d.join(w), |name, dt, shape, b| {
            if name == "classifier.bias" {
                let wide: Vec<u8> = b
                    .chunks_exact(4)
                    .flat_map(|c| (f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).to_le_bytes())
                    .collect();
                (Dtype::F64, shape.to_vec(), wide)
            } else {
                (dt, shape.to_vec(), b.to_vec())
            }
        })
    });
    let nan_tensor = "bert.encoder.layer.1.output.dense.weight";
    let nan = broken_model(root, &fx.model, "m-nan", |d| {
        rewrite_safetensors(&d.join(w), |name, dt, shape, b| {
            let mut b = b.to_vec();
            if name == nan_tensor {
                b[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
            }
            (dt, shape.to_vec(), b)
        })
    });
    let no_weights = broken_model(root, &fx.base, "m-noweights", |d| {
        std::fs::remove_file(d.join(w)).unwrap()
    });
    let bad_tok = broken_model(root, &fx.model, "m-badtok", |d| {
        let t = std::fs::read(d.join("tokenizer.json")).unwrap();
        std::fs::write(d.join("tokenizer.json"), &t[..t.len() / 2]).unwrap();
    });
    let no_unk = broken_model(root, &fx.model, "m-nounk", |d| {
        edit_json(&d.join("tokenizer.json"), |v| {
            v["model"]["vocab"].as_object_mut().unwrap().remove("[UNK]");
            v["added_tokens"]
                .as_array_mut()
                .unwrap()
                .retain(|t| t["content"] != "[UNK]");
        })
    });
    let no_post = broken_model(root, &fx.model, "m-nopost", |d| {
        edit_json(&d.join("tokenizer.json"), |v| v["post_processor"] = Value::Null)
    });
    let no_tok = broken_model(root, &fx.base, "m-notok", |d| {
        std::fs::remove_file(d.join("tokenizer.json")).unwrap()
    });
    // a model whose embedding table has 1,000 rows, with a tokenizer of 30,522 ids
    let small_vocab = root.join("m-smallvocab");
    {
        let mut raw = fixture::tiny_config_json();
        raw["vocab_size"] = 1000.into();
        let mut cfg = ModelConfig::from_json(raw, Path::new("config.json")).unwrap();
        cfg.id2label = Some(fx.labels.labels.clone());
        save_model_dir(&small_vocab, &cfg, &random_init(&cfg, Some(fx.labels.len()), 7)).unwrap();
        for f in [
            "tokenizer.json",
            "vocab.txt",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            if fx.model.join(f).exists() {
                std::fs::copy(fx.model.join(f), small_vocab.join(f)).unwrap();
            }
        }
    }

    let predict = |model: &Path| -> Vec<String> {
        [
            "predict",
            "--model",
            &s(model),
            "--input",
            &s(&input),
            "--output",
            &s(&pred_out),
            "--device",
            "cpu",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let cases = vec![
        Case::new(
            "model: config.json missing",
            &predict(&no_cfg),
            &["m-nocfg/config.json", "missing"],
        )
        .watch(&no_cfg),
        Case::new(
            "model: unknown model_type",
            &["eval", "--model", &s(&gpt2), "--data", &s(&fx.data), "--device", "cpu"],
            &["m-gpt2/config.json", "`model_type`", "\"gpt2\""],
        )
        .watch(&gpt2),
        Case::new(
            "model: config and weights disagree on shapes",
            &[
                "train",
                "--model",
                &s(&shape),
                "--data",
                &s(&fx.data),
                "--out",
                &s(&out),
                "--device",
                "cpu",
            ],
            &[
                "m-shape/model.safetensors",
                "embeddings.word_embeddings.weight`",
                "[30522, 64]",
            ],
        )
        .watch(&shape)
        .absent(&out),
        Case::new(
            "model: truncated model.safetensors",
            &predict(&trunc),
            &["m-trunc/model.safetensors", "not a valid safetensors file"],
        )
        .watch(&trunc),
        Case::new(
            "model: header claims more bytes than the file has",
            &predict(&header),
            &["m-header/model.safetensors", "header claims"],
        )
        .watch(&header),
        Case::new(
            "model: a tensor of the wrong dtype",
            &predict(&f64_model),
            &["m-f64/model.safetensors", "tensor `classifier.bias`", "F64"],
        )
        .watch(&f64_model),
        Case::new(
            "model: NaN weights",
            &[
                "run",
                "--model",
                &s(&nan),
                "--data",
                &s(&fx.data),
                "--forget-ratio",
                "0.25",
                "--out",
                &s(&out),
                "--device",
                "cpu",
            ],
            &["m-nan/model.safetensors", nan_tensor, "NaN"],
        )
        .watch(&nan)
        .absent(&out),
        Case::new(
            "model: model.safetensors missing",
            &[
                "train",
                "--model",
                &s(&no_weights),
                "--data",
                &s(&fx.data),
                "--out",
                &s(&out),
                "--device",
                "cpu",
            ],
            &["m-noweights/model.safetensors", "missing"],
        )
        .watch(&no_weights)
        .absent(&out),
        Case::new(
            "tokenizer: tokenizer.json does not parse",
            &[
                "eval",
                "--model",
                &s(&bad_tok),
                "--data",
                &s(&fx.data),
                "--device",
                "cpu",
            ],
            &["m-badtok/tokenizer.json", "cannot parse"],
        )
        .watch(&bad_tok),
        Case::new(
            "tokenizer: WordPiece vocabulary without [UNK]",
            &predict(&no_unk),
            &["m-nounk/tokenizer.json", "unknown token"],
        )
        .watch(&no_unk),
        Case::new(
            "tokenizer: no post-processor (no [CLS]/[SEP])",
            &predict(&no_post),
            &["m-nopost/tokenizer.json", "[CLS]"],
        )
        .watch(&no_post),
        Case::new(
            "tokenizer: tokenizer.json missing",
            &[
                "train",
                "--model",
                &s(&no_tok),
                "--data",
                &s(&fx.data),
                "--out",
                &s(&out),
                "--device",
                "cpu",
            ],
            &["m-notok/tokenizer.json"],
        )
        .watch(&no_tok)
        .absent(&out),
        Case::new(
            "tokenizer: ids beyond the model's vocab_size",
            &predict(&small_vocab),
            &["m-smallvocab/tokenizer.json", "vocab_size 1000"],
        )
        .watch(&small_vocab),
    ];
    let cases: Vec<Case> = cases.into_iter().map(|c| c.watch(&fx.data).absent(&pred_out)).collect();
    run_matrix(&cases, root);
}

#[test]
fn bad_options_and_output_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fx = fixture::build(root);
    let (m, d) = (s(&fx.model), s(&fx.data));
    let out = root.join("out");
    let run = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["run", "--model", &m, "--data", &d, "--device", "cpu", "--quiet"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        v.extend(extra.iter().map(|a| a.to_string()));
        v
    };
    let idx_range = root.join("range.txt");
    std::fs::write(&idx_range, "3\n4000\n").unwrap();
    let idx_dup = root.join("dup.txt");
    std::fs::write(&idx_dup, "3\n7 # seven\n3\n").unwrap();
    let idx_word = root.join("word.txt");
    std::fs::write(&idx_word, "# forget these\n12\nseventeen\n").unwrap();
    // an earlier run's folder (one file is enough to make it precious)
    let existing = root.join("earlier-run");
    std::fs::create_dir_all(existing.join("model")).unwrap();
    std::fs::write(existing.join("report.json"), "{\"earlier\": true}").unwrap();
    std::fs::write(existing.join("model/model.safetensors"), b"weights of an earlier run").unwrap();
    let nan = broken_model(root, &fx.model, "m-nan", |d| {
        rewrite_safetensors(&d.join("model.safetensors"), |name, dt, shape, b| {
            let mut b = b.to_vec();
            if name == "classifier.weight" {
                b[..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
            }
            (dt, shape.to_vec(), b)
        })
    });
    let a_file = root.join("a-file");
    std::fs::write(&a_file, "not a folder").unwrap();
    let under_file = a_file.join("run");
    let long_sentence = root.join("long-sentence.conll");
    std::fs::write(&long_sentence, "hello\n".repeat(300)).unwrap();
    let preds = root.join("preds");
    std::fs::create_dir_all(&preds).unwrap();
    let pred_out = preds.join("p.conll");
    let empty_out = root.join("empty-out");
    std::fs::create_dir_all(&empty_out).unwrap();
    let limited = root.join("limited");

    let mut cases = vec![
        Case::new(
            "options: forget index out of range",
            &run(&["--forget", &s(&idx_range), "--out", &s(&out)]),
            &["range.txt:2:", "4000", "out of range"],
        )
        .absent(&out),
        Case::new(
            "options: forget index listed twice",
            &run(&["--forget", &s(&idx_dup), "--out", &s(&out)]),
            &["dup.txt:3:", "listed twice"],
        )
        .absent(&out),
        Case::new(
            "options: forget index not a number",
            &run(&["--forget", &s(&idx_word), "--out", &s(&out)]),
            &["word.txt:3:", "`seventeen`"],
        )
        .absent(&out),
        Case::new(
            "options: forget index out of range (eval)",
            &[
                "eval",
                "--model",
                &m,
                "--data",
                &d,
                "--forget",
                &s(&idx_range),
                "--device",
                "cpu",
            ],
            &["range.txt:2:", "out of range"],
        ),
        Case::new(
            "options: --forget-ratio 0",
            &run(&["--forget-ratio", "0", "--out", &s(&out)]),
            &["--forget-ratio 0"],
        )
        .absent(&out),
        Case::new(
            "options: --forget-ratio 1",
            &run(&["--forget-ratio", "1", "--out", &s(&out)]),
            &["--forget-ratio 1"],
        )
        .absent(&out),
        Case::new(
            "options: --lr inf",
            &run(&["--forget-ratio", "0.25", "--lr", "inf", "--out", &s(&out)]),
            &["--lr", "finite"],
        )
        .absent(&out),
        Case::new(
            "output: the folder exists",
            &run(&["--forget-ratio", "0.25", "--out", &s(&existing)]),
            &["--out", "earlier-run", "--force"],
        )
        .watch(&existing),
        Case::new(
            "output: --force over an earlier run, with a bad model",
            &[
                "run",
                "--model",
                &s(&nan),
                "--data",
                &d,
                "--forget-ratio",
                "0.25",
                "--out",
                &s(&existing),
                "--force",
                "--device",
                "cpu",
            ],
            &["m-nan/model.safetensors", "tensor `classifier.weight`", "inf"],
        )
        .watch(&existing)
        .watch(&nan),
        Case::new(
            "output: --resume without checkpoints",
            &[
                "train",
                "--model",
                &s(&fx.base),
                "--data",
                &d,
                "--out",
                &s(&empty_out),
                "--resume",
                "--device",
                "cpu",
            ],
            &["--resume", "empty-out", "no checkpoints"],
        )
        .watch(&empty_out),
        Case::new(
            "output: read-only (a path under a regular file)",
            &run(&["--forget-ratio", "0.25", "--out", &s(&under_file)]),
            &["a-file/run", "Not a directory"],
        )
        .watch(&a_file),
        Case::new(
            "output: a file-size limit (RLIMIT_FSIZE)",
            &[
                "train",
                "--model",
                &s(&fx.base),
                "--data",
                &d,
                "--out",
                &s(&limited),
                "--epochs",
                "1",
                "--batch",
                "8",
            ],
            &["limited/", "File too large"],
        )
        .no_temp(&limited),
        Case::new(
            "options: --max-len beyond max_position_embeddings",
            &[
                "predict",
                "--model",
                &m,
                "--input",
                &s(&long_sentence),
                "--output",
                &s(&pred_out),
                "--max-len",
                "512",
                "--device",
                "cpu",
            ],
            &["--max-len 512", "max_position_embeddings", "128"],
        )
        .absent(&pred_out),
    ];
    cases.iter_mut().find(|c| c.name.contains("RLIMIT")).unwrap().wrap = Some(with_file_size_limit);

    // Where tmpfs can be mounted (root, or a container that allows it): a full disk and
    // a read-only file system.
    let full_at = root.join("mnt-full");
    let full = Mount::tmpfs(&full_at, "size=64k");
    let ro_at = root.join("mnt-ro");
    let ro = Mount::tmpfs(&ro_at, "ro,size=64k");
    match &full {
        Some(_) => cases.push(
            Case::new(
                "output: a full disk (64 KiB tmpfs)",
                &run(&[
                    "--forget-ratio",
                    "0.25",
                    "--steps",
                    "2",
                    "--bf",
                    "4",
                    "--br",
                    "8",
                    "--out",
                    &s(&full_at.join("run")),
                ]),
                &["mnt-full/run/", "No space left on device"],
            )
            .no_temp(&full_at),
        ),
        None => skipped("output: a full disk (64 KiB tmpfs)"),
    }
    match &ro {
        Some(_) => cases.push(
            Case::new(
                "output: a read-only file system",
                &[
                    "train",
                    "--model",
                    &s(&fx.base),
                    "--data",
                    &d,
                    "--out",
                    &s(&ro_at.join("run")),
                    "--device",
                    "cpu",
                ],
                &["mnt-ro/run", "Read-only file system"],
            )
            .watch(&ro_at),
        ),
        None => skipped("output: a read-only file system (tmpfs -o ro)"),
    }
    let cases: Vec<Case> = cases
        .into_iter()
        .map(|c| c.watch(&fx.model).watch(&fx.base).watch(&fx.data))
        .collect();
    run_matrix(&cases, root);
    drop((full, ro));
}
