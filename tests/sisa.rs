//! SISA (`run --method sisa`, SPEC section 5) on the tiny fixture: the shard assignment is
//! a seeded partition; unlearning retrains exactly the shards that hold forget sentences,
//! on their sentences minus those (the others are the original shard models, byte for
//! byte); the ensemble predicts by the argmax of the shards' mean softmax; the original
//! shard models are cached and reused, a cache made with other settings is refused; a
//! killed run resumes to the same bytes; bad options fail clearly.
mod common;
use common::fixture::{self, bin, s, Fixture};
use deepcut_fast::eval::ensemble::Ensemble;
use deepcut_fast::infer::{run_sentences, Classifier};
use deepcut_fast::unlearn::sisa::assign_shards;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

fn run(args: &[String], env: Option<(&str, &str)>) -> Output {
    let mut c = bin();
    c.args(args);
    if let Some((k, v)) = env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    err
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// `run --method sisa` on the fixture with a short recipe; `extra` is appended.
fn sisa_args(fx: &Fixture, forget: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "run",
        "--method",
        "sisa",
        "--model",
        &s(&fx.model),
        "--base",
        &s(&fx.base),
        "--data",
        &s(&fx.data),
        "--forget",
        &s(forget),
        "--out",
        &s(out),
        "--train-epochs",
        "2",
        "--train-batch",
        "4",
        "--quiet",
        "--device",
        "cpu",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn write_forget(path: &Path, idx: &[usize]) {
    let text: String = idx.iter().map(|i| format!("{i}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn shard_assignment_is_a_seeded_partition() {
    for (n, k) in [(48, 5), (10, 3), (7, 7), (3394, 5)] {
        let a = assign_shards(n, k, 0).unwrap();
        assert_eq!(a.len(), k);
        let all: Vec<usize> = a.iter().flatten().copied().collect();
        assert_eq!(all.len(), n, "every sentence in exactly one shard");
        assert_eq!(all.iter().copied().collect::<BTreeSet<_>>(), (0..n).collect());
        let (lo, hi) = (
            a.iter().map(Vec::len).min().unwrap(),
            a.iter().map(Vec::len).max().unwrap(),
        );
        assert!(hi - lo <= 1, "near-equal sizes: {lo}..{hi}");
        assert!(a.iter().all(|p| p.windows(2).all(|w| w[0] < w[1])), "each shard sorted");
        assert_eq!(a, assign_shards(n, k, 0).unwrap(), "deterministic per seed");
    }
    assert_ne!(assign_shards(48, 5, 0).unwrap(), assign_shards(48, 5, 1).unwrap());
    // a permutation, not contiguous blocks of train
    assert_ne!(assign_shards(48, 5, 0).unwrap()[0], (0..9).collect::<Vec<_>>());
    for (k, needle) in [(0, "at least 2"), (1, "at least 2"), (49, "at most 48")] {
        let e = assign_shards(48, k, 0).unwrap_err().to_string();
        assert!(e.contains("--shards") && e.contains(needle), "{e}");
    }
}

/// Forget indices: two sentences of shard 1 and one of shard 3 (seed 0).
fn forget_in_shards_1_and_3() -> Vec<usize> {
    let a = assign_shards(48, 5, 0).unwrap();
    let mut f = vec![a[1][0], a[1][3], a[3][2]];
    f.sort();
    f
}

#[test]
fn sisa_retrains_only_the_touched_shards_and_reuses_its_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture::build(tmp.path());
    let forget = forget_in_shards_1_and_3();
    let forget_file = tmp.path().join("forget.txt");
    write_forget(&forget_file, &forget);
    let cache = tmp.path().join("shards-cache");
    let out = tmp.path().join("run");
    let err = ok(&run(
        &sisa_args(&fx, &forget_file, &out, &["--sisa-shards", &s(&cache)]),
        None,
    ));
    assert!(err.contains("training the original shard models"), "{err}");

    // the assignment in the run folder is assign_shards(48, 5, seed 0)
    let assignment = assign_shards(48, 5, 0).unwrap();
    let sj = read_json(&out.join("sisa/shards.json"));
    assert_eq!(sj["assignment"], serde_json::json!(assignment));
    assert_eq!(sj["shards"], 5);

    // report.json: the keys every method has, plus SISA's
    let r = read_json(&out.join("report.json"));
    assert_eq!(r["method"], "sisa");
    assert_eq!(r["config"]["unlearning"]["shards"], 5);
    for split in ["forget", "retain", "dev", "test"] {
        for k in ["precision", "recall", "f1"] {
            assert!(r["metrics"][split][k].is_number(), "metrics.{split}.{k}");
            assert!(r["reference"]["original"][split][k].is_number());
            assert!(r["reference"]["sisa_original"][split][k].is_number());
        }
    }
    assert!(r["metrics"]["mia_auc"].is_number() && r["reference"]["sisa_original"]["mia_auc"].is_number());
    for k in ["seconds", "steps", "tokens", "tokens_per_second", "peak_memory_bytes"] {
        assert!(r["cost"][k].is_number(), "cost.{k}");
        assert!(r["cost"]["original_shards"][k].is_number() || k == "peak_memory_bytes");
    }
    assert_eq!(r["cost"]["retrained_shards"], serde_json::json!([1, 3]));
    assert_eq!(r["sisa"]["retrained"], serde_json::json!([1, 3]));
    assert_eq!(r["sisa"]["original_shards"]["reused"], false);
    assert_eq!(r["forget"]["count"], 3);
    // cost = the two retrained shards' training, nothing else
    let per_shard = r["sisa"]["per_shard"].as_array().unwrap();
    let retrain_steps: u64 = per_shard.iter().filter_map(|p| p["retrain"]["steps"].as_u64()).sum();
    assert_eq!(r["cost"]["steps"].as_u64().unwrap(), retrain_steps);
    assert_eq!(r["history"]["steps"].as_array().unwrap().len() as u64, retrain_steps);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("SISA shards") && html.contains("SISA ensemble before unlearning") && html.contains("<svg"));
    assert!(!html.contains("<script"));

    // exactly shards 1 and 3 were retrained, on their sentences minus the forget set
    let retrain_dirs: BTreeSet<String> = std::fs::read_dir(out.join("sisa/retrain"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        retrain_dirs,
        ["shard-1", "shard-3"].iter().map(|x| x.to_string()).collect()
    );
    for k in [1usize, 3] {
        let tj = read_json(&out.join(format!("sisa/retrain/shard-{k}/train.json")));
        let seen: Vec<usize> = serde_json::from_value(tj["sentences"].clone()).unwrap();
        let expected: Vec<usize> = assignment[k].iter().copied().filter(|i| !forget.contains(i)).collect();
        assert_eq!(
            seen, expected,
            "shard {k} retrained on its sentences minus the forget set"
        );
        assert!(seen.iter().all(|i| !forget.contains(i)));
        assert!(!out.join(format!("sisa/retrain/shard-{k}/checkpoints")).exists());
    }
    // each original shard model was trained on exactly its shard
    for (k, part) in assignment.iter().enumerate() {
        let tj = read_json(&cache.join(format!("shard-{k}/train.json")));
        assert_eq!(tj["sentences"], serde_json::json!(part));
    }

    // model/: the untouched shards are the original shard models byte for byte, the
    // retrained ones are not; every member loads as an ordinary model folder
    let ej = read_json(&out.join("model/ensemble.json"));
    assert_eq!(ej["combine"], "mean-softmax");
    assert_eq!(ej["members"].as_array().unwrap().len(), 5);
    for k in 0..5 {
        let a = std::fs::read(out.join(format!("model/shard-{k}/model.safetensors"))).unwrap();
        let b = std::fs::read(cache.join(format!("shard-{k}/model/model.safetensors"))).unwrap();
        assert_eq!(a == b, k != 1 && k != 3, "shard {k}");
        assert_eq!(
            std::fs::read(out.join(format!("model/shard-{k}/config.json"))).unwrap(),
            std::fs::read(cache.join(format!("shard-{k}/model/config.json"))).unwrap()
        );
        Classifier::load(&out.join(format!("model/shard-{k}"))).unwrap();
    }

    // the ensemble's prediction is the argmax of the shards' mean softmax, by hand
    ensemble_equals_mean_softmax_by_hand(&out.join("model"), &fx.train[..6]);

    // eval and predict take the ensemble folder
    let ev = tmp.path().join("eval.json");
    ok(&run(
        &[
            "eval",
            "--model",
            &s(&out.join("model")),
            "--data",
            &s(&fx.data),
            "--forget",
            &s(&forget_file),
            "--json",
            &s(&ev),
            "--device",
            "cpu",
        ]
        .map(String::from),
        None,
    ));
    let ev = read_json(&ev);
    for split in ["forget", "retain", "dev", "test"] {
        assert_eq!(
            ev[split]["f1"], r["metrics"][split]["f1"],
            "eval of model/ = report ({split})"
        );
    }
    assert_eq!(ev["mia_auc"], r["metrics"]["mia_auc"]);

    // a second run on another forget set reuses the cached original shards
    let before: Vec<_> = (0..5)
        .map(|k| mtime(&cache.join(format!("shard-{k}/model/model.safetensors"))))
        .collect();
    let forget2 = tmp.path().join("forget2.txt");
    write_forget(&forget2, &[assignment[0][0]]);
    let out2 = tmp.path().join("run2");
    let err = ok(&run(
        &sisa_args(&fx, &forget2, &out2, &["--sisa-shards", &s(&cache)]),
        None,
    ));
    assert!(err.contains("reusing the 5 original shard models"), "{err}");
    assert!(
        !err.contains("sisa: original shard"),
        "no original shard trained: {err}"
    );
    let r2 = read_json(&out2.join("report.json"));
    assert_eq!(r2["sisa"]["original_shards"]["reused"], true);
    assert_eq!(r2["sisa"]["retrained"], serde_json::json!([0]));
    assert_eq!(
        r2["cost"]["original_shards"]["trained_by_this_run"],
        serde_json::json!([])
    );
    assert_eq!(
        r2["cost"]["original_shards"]["steps"],
        r["cost"]["original_shards"]["steps"]
    );
    let after: Vec<_> = (0..5)
        .map(|k| mtime(&cache.join(format!("shard-{k}/model/model.safetensors"))))
        .collect();
    assert_eq!(before, after, "the cache's models were not rewritten");
    assert!(!out2.join("sisa/original").exists());

    // a cache made with other settings is refused, naming what differs
    for (extra, needle) in [
        (vec!["--shards", "4"], "shards"),
        (vec!["--train-epochs", "3"], "recipe"),
        (vec!["--seed", "1"], "seed"),
    ] {
        let o3 = tmp.path().join("run3");
        let mut args = sisa_args(&fx, &forget2, &o3, &["--sisa-shards", &s(&cache), "--force"]);
        if extra[0] == "--train-epochs" {
            let i = args.iter().position(|a| a == "--train-epochs").unwrap();
            args[i + 1] = extra[1].to_string();
        } else {
            args.extend(extra.iter().map(|x| x.to_string()));
        }
        let o = run(&args, None);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} should be refused");
        assert!(
            err.contains("--sisa-shards") && err.contains(needle),
            "{extra:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(
        before,
        (0..5)
            .map(|k| mtime(&cache.join(format!("shard-{k}/model/model.safetensors"))))
            .collect::<Vec<_>>()
    );
}

/// Each member's logits, softmax in f64, mean over members, argmax: the ensemble's tags,
/// probabilities and per-sentence loss (-ln mean probability of the gold tag).
fn ensemble_equals_mean_softmax_by_hand(dir: &Path, sentences: &[deepcut_fast::data::Sentence]) {
    let ens = Ensemble::load(dir).unwrap();
    let mk = || -> deepcut_fast::Result<deepcut_fast::backend::cpu::Cpu> { Ok(deepcut_fast::backend::cpu::Cpu) };
    let out = ens.run_sentences(&mk, sentences, 128, 4096).unwrap();
    let tags = out.tags(ens.labels());
    let l = ens.labels().len();
    let members: Vec<_> = (0..5)
        .map(|k| {
            let clf = Classifier::load(&dir.join(format!("shard-{k}"))).unwrap();
            let mut model = clf.model(deepcut_fast::backend::cpu::Cpu, 4096);
            run_sentences(&clf, &mut model, sentences, 128).unwrap().logits
        })
        .collect();
    let mut argmax_differs_from_shard0 = 0;
    for (si, s) in sentences.iter().enumerate() {
        let mut loss = 0.0;
        for w in 0..s.words.len() {
            let mut mean = vec![0f64; l];
            for m in &members {
                let row = &m[si][w * l..(w + 1) * l];
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
                for (p, &x) in mean.iter_mut().zip(row) {
                    *p += (x as f64 - max).exp() / z / members.len() as f64;
                }
            }
            for (j, (p, q)) in mean.iter().zip(&out.probs[si][w * l..(w + 1) * l]).enumerate() {
                assert!((p - q).abs() < 1e-12, "sentence {si} word {w} label {j}");
            }
            let best = (0..l).fold(0, |b, j| if mean[j] > mean[b] { j } else { b });
            assert_eq!(tags[si][w], ens.labels().labels[best], "sentence {si} word {w}");
            let row0 = &members[0][si][w * l..(w + 1) * l];
            let best0 = (0..l).fold(0, |b, j| if row0[j] > row0[b] { j } else { b });
            argmax_differs_from_shard0 += (best0 != best) as usize;
            loss -= mean[ens.labels().id(&s.tags[w]).unwrap()].ln();
        }
        loss /= s.words.len() as f64;
        assert!(
            (loss - out.mean_loss[si]).abs() < 1e-9 * loss.abs().max(1.0),
            "loss of sentence {si}"
        );
    }
    eprintln!("words where the ensemble and shard 0 disagree: {argmax_differs_from_shard0}");
}

/// A run killed while training its shards, resumed with --resume, ends with the same
/// ensemble bytes as an uninterrupted run.
#[test]
fn a_killed_sisa_run_resumes_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture::build(tmp.path());
    let forget_file = tmp.path().join("forget.txt");
    write_forget(&forget_file, &forget_in_shards_1_and_3());
    let out = tmp.path().join("run");
    // step 4 of the first shard's fine-tune: after its epoch-1 checkpoint
    let o = run(
        &sisa_args(&fx, &forget_file, &out, &[]),
        Some(("DEEPCUT_ABORT_AFTER_STEP", "4")),
    );
    assert_eq!(o.status.code(), Some(86), "{}", String::from_utf8_lossy(&o.stderr));
    let mut resumed = sisa_args(&fx, &forget_file, &out, &[]);
    resumed.push("--resume".into());
    let err = ok(&run(&resumed, None));
    assert!(err.contains("resuming"), "{err}");
    let full = tmp.path().join("full");
    ok(&run(&sisa_args(&fx, &forget_file, &full, &[]), None));
    for k in 0..5 {
        let p = PathBuf::from(format!("model/shard-{k}/model.safetensors"));
        assert_eq!(
            std::fs::read(out.join(&p)).unwrap(),
            std::fs::read(full.join(&p)).unwrap(),
            "shard {k}"
        );
    }
    let (a, b) = (
        read_json(&out.join("report.json")),
        read_json(&full.join("report.json")),
    );
    assert_eq!(a["metrics"], b["metrics"]);
    assert_eq!(a["reference"]["sisa_original"], b["reference"]["sisa_original"]);
}

#[test]
fn bad_sisa_options_fail_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture::build(tmp.path());
    let forget_file = tmp.path().join("forget.txt");
    write_forget(&forget_file, &[0, 1]);
    let out = tmp.path().join("o");
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let base_args = sisa_args(&fx, &forget_file, &out, &[]);
    let without_base: Vec<String> = {
        let i = base_args.iter().position(|a| a == "--base").unwrap();
        [&base_args[..i], &base_args[i + 2..]].concat()
    };
    let with = |extra: &[&str]| sisa_args(&fx, &forget_file, &out, extra);
    let deepcut: Vec<String> = ["run", "--model", &s(&fx.model), "--data", &s(&fx.data)]
        .iter()
        .map(|x| x.to_string())
        .chain(
            ["--forget", &s(&forget_file), "--out", &s(&out), "--shards", "3"]
                .iter()
                .map(|x| x.to_string()),
        )
        .collect();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (with(&["--shards", "0"]), "--shards 0"),
        (with(&["--shards", "1"]), "at least 2"),
        (with(&["--shards", "49"]), "at most 48"),
        (without_base, "--base"),
        (deepcut, "only to --method sisa"),
        (with(&["--sisa-shards", &s(&foreign)]), "no manifest.json"),
    ];
    for (args, needle) in cases {
        let o = run(&args, None);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: message should name `{needle}`: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(std::fs::read_to_string(foreign.join("notes.txt")).unwrap(), "mine");
    assert_eq!(
        std::fs::read_dir(&foreign).unwrap().count(),
        1,
        "a foreign folder is left alone"
    );
}
