//! Determinism across thread counts (README, "What the engine guarantees"): on the CPU
//! backend the same seed gives bit-identical results whatever --threads is (reductions
//! use fixed chunks; the GEMM libraries' threads split output blocks, never a sum).
//! Checked through the real binary: `run` and `train` model bytes, `predict` logits,
//! with each of the two CPU GEMM libraries (cpu/gemm.rs). The fixture's batches are ~600
//! tokens, so the feed-forward GEMMs (~600 x 64 x 32) pass both threading thresholds
//! (matrixmultiply: m*k + k*n >= 2^14; the `gemm` crate: m*n*k >= 48*48*256); the rayon
//! ops split their rows differently for each count. With 6 threads (more than
//! matrixmultiply's 4) its model GEMMs are split by output rows over rayon's pool
//! instead (cpu/gemm.rs `configure_threads`): the same bits again.
mod common;
use common::fixture::{self, bin, s};
use std::path::Path;

fn ok(lib: &str, args: &[String]) {
    let o = bin().env("DEEPCUT_CPU_GEMM", lib).args(args).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    let threads = args.iter().skip_while(|a| *a != "--threads").nth(1).unwrap();
    assert!(
        err.contains(&format!(", {threads} threads)")),
        "the backend must say it uses {threads} threads: {err}"
    );
}

fn argv(v: &[&str]) -> Vec<String> {
    v.iter().map(|a| a.to_string()).collect()
}

#[test]
fn run_train_and_predict_are_bit_identical_for_1_2_3_and_6_threads_with_matrixmultiply() {
    bit_identical_for_1_2_3_and_6_threads("matrixmultiply");
}

#[test]
fn run_train_and_predict_are_bit_identical_for_1_2_3_and_6_threads_with_the_gemm_crate() {
    bit_identical_for_1_2_3_and_6_threads("gemm");
}

/// Both CPU GEMM libraries (cpu/gemm.rs picks one per machine; DEEPCUT_CPU_GEMM forces it).
fn bit_identical_for_1_2_3_and_6_threads(lib: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture::build(tmp.path());
    let (m, b, d) = (s(&fx.model), s(&fx.base), s(&fx.data));
    let threads = ["1", "2", "3", "6"];
    let read = |p: &Path| std::fs::read(p).unwrap();

    let mut runs = vec![];
    for t in threads {
        let out = tmp.path().join(format!("run-{t}"));
        ok(lib, &fixture::run_args(&fx.model, &fx.data, &out, 3, &["--threads", t]));
        runs.push(read(&out.join("model/model.safetensors")));
    }
    assert!(
        runs[0] != read(&fx.model.join("model.safetensors")),
        "the run changed nothing"
    );
    for (t, r) in threads.iter().zip(&runs).skip(1) {
        assert!(
            *r == runs[0],
            "run: --threads {t} gives other model bytes than --threads 1"
        );
    }

    let mut trains = vec![];
    for t in threads {
        let out = tmp.path().join(format!("train-{t}"));
        ok(
            lib,
            &argv(&[
                "train",
                "--model",
                &b,
                "--data",
                &d,
                "--epochs",
                "1",
                "--batch",
                "16",
                "--quiet",
                "--device",
                "cpu",
                "--threads",
                t,
                "--out",
                &s(&out),
            ]),
        );
        trains.push(read(&out.join("model/model.safetensors")));
    }
    for (t, r) in threads.iter().zip(&trains).skip(1) {
        assert!(
            *r == trains[0],
            "train: --threads {t} gives other model bytes than --threads 1"
        );
    }

    let mut logits = vec![];
    for t in threads {
        let (pred, lg) = (
            tmp.path().join(format!("p-{t}.conll")),
            tmp.path().join(format!("l-{t}.st")),
        );
        ok(
            lib,
            &argv(&[
                "predict",
                "--model",
                &m,
                "--input",
                &s(&fx.data.join("train.conll")),
                "--output",
                &s(&pred),
                "--logits",
                &s(&lg),
                "--device",
                "cpu",
                "--threads",
                t,
            ]),
        );
        logits.push(read(&lg));
    }
    for (t, l) in threads.iter().zip(&logits).skip(1) {
        assert!(
            *l == logits[0],
            "predict: --threads {t} gives other logits than --threads 1"
        );
    }
}
