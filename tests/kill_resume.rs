//! Kill-and-resume with real SIGKILLs (issue 7). A `run` and a `train` on the tiny
//! fixture are killed at chosen moments -- while the original model is evaluated, while
//! a checkpoint is being written (its temp file exists), in the middle of a step, while
//! the final model is evaluated and written -- and resumed with --resume each time; a
//! checkpoint damaged between kill and resume (truncated, or bytes flipped) must be
//! detected, the previous one used, and stderr must say so. At the end the model bytes
//! and the report's metrics equal those of an uninterrupted run with the same seed, and
//! no temp file of an interrupted write is left in the run folder.
//!
//! Kills are triggered by what the process leaves on disk and on stderr (polled every
//! millisecond), not by timers, so the test is not at the mercy of a slow machine: a
//! trigger that never fires before the process ends is a failure.
mod common;
use common::fixture::{self, bin, temp_files};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A process under test: stderr goes to a file that triggers can read.
struct Proc {
    child: Child,
    log: PathBuf,
    started: Instant,
}

fn spawn(args: &[String], log: &Path) -> Proc {
    let f = std::fs::File::create(log).unwrap();
    let child = bin()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::from(f))
        .spawn()
        .unwrap();
    Proc {
        child,
        log: log.to_path_buf(),
        started: Instant::now(),
    }
}

impl Proc {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `trigger` until it holds, then SIGKILLs the process. Panics if the process
    /// ends first (the moment was never reached).
    fn kill_when(mut self, what: &str, trigger: impl Fn(&Proc) -> bool) -> String {
        loop {
            if trigger(&self) {
                self.child.kill().unwrap(); // SIGKILL
                let st = self.child.wait().unwrap();
                assert_eq!(
                    std::os::unix::process::ExitStatusExt::signal(&st),
                    Some(9),
                    "{what}: the process was not killed"
                );
                eprintln!("killed {what} after {:.2} s", self.started.elapsed().as_secs_f64());
                return self.stderr();
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!(
                    "{what}: the process ended ({st}) before the moment came:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Waits for a normal end; returns stderr.
    fn finish(mut self) -> String {
        let st = self.child.wait().unwrap();
        let err = self.stderr();
        assert!(st.success(), "{st}:\n{err}");
        err
    }
}

fn has_temp(dir: &Path, prefix: &str) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
    })
}

/// A number in the state of the newest complete checkpoint (0 when there is none yet).
/// Reads only the header: this is polled while the process runs.
fn checkpoint_step(ckpt: &Path, key: &[&str]) -> u64 {
    let read = || -> Option<u64> {
        let mut f = std::fs::File::open(ckpt.join("checkpoint.safetensors")).ok()?;
        let mut n = [0u8; 8];
        f.read_exact(&mut n).ok()?;
        let mut header = vec![0u8; u64::from_le_bytes(n) as usize];
        f.read_exact(&mut header).ok()?;
        let h: Value = serde_json::from_slice(&header).ok()?;
        let state: Value = serde_json::from_str(h["__metadata__"]["state"].as_str()?).ok()?;
        key.iter().fold(&state, |v, k| &v[*k]).as_u64()
    };
    read().unwrap_or(0)
}

/// Kills a process (started by `start`) while the temp file `prefix*` exists in `dir`,
/// until one such kill leaves the temp file behind: the write finishing between the
/// check and the kill is possible, if unlikely. Returns the orphaned files.
fn kill_during_write(what: &str, dir: &Path, prefix: &str, start: impl Fn() -> Proc) -> Vec<PathBuf> {
    for _ in 0..5 {
        start().kill_when(what, |_| has_temp(dir, prefix));
        let left: Vec<PathBuf> = temp_files(dir);
        if !left.is_empty() {
            return left;
        }
    }
    panic!("{what}: five kills while {prefix}* existed, none left it behind");
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn with(args: &[String], extra: &[&str]) -> Vec<String> {
    let mut v = args.to_vec();
    v.extend(extra.iter().map(|a| a.to_string()));
    v
}

#[test]
fn run_killed_at_every_kind_of_moment_resumes_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture::build(tmp.path());
    let steps = 8u64;
    let args = |out: &Path| fixture::run_args(&fx.model, &fx.data, out, steps, &["--checkpoint-every", "1"]);
    let full = tmp.path().join("run-full");
    let t0 = Instant::now();
    spawn(&args(&full), &tmp.path().join("full.log")).finish();
    eprintln!("uninterrupted run: {:.2} s", t0.elapsed().as_secs_f64());

    let out = tmp.path().join("run");
    let ckpt = out.join("checkpoints");
    let log = tmp.path().join("run.log");
    let a = args(&out);
    let resume = with(&a, &["--resume"]);

    // 1. while the original model is evaluated (before any checkpoint exists)
    spawn(&a, &log).kill_when("run: evaluating the original", |p| {
        p.stderr().contains("evaluating the original model")
    });
    // 2. while a checkpoint is being written: its temp file exists
    let orphans = kill_during_write(
        "run: writing a checkpoint",
        &ckpt,
        ".checkpoint.safetensors.tmp",
        || spawn(&resume, &log),
    );
    // 3. in the middle of a step: just after a checkpoint beyond step 2 completed
    let err = spawn(&resume, &log).kill_when("run: in a step", |_| checkpoint_step(&ckpt, &["state", "step"]) >= 3);
    assert!(
        err.contains("removed 1 temp file(s) left by an interrupted write"),
        "{err}"
    );
    assert!(orphans.iter().all(|p| !p.exists()), "{orphans:?} not removed on resume");
    // 4. during the final evaluation and the writing of model/ and the reports
    let err = spawn(&resume, &log).kill_when("run: final evaluation", |_| {
        checkpoint_step(&ckpt, &["state", "step"]) == steps
    });
    assert!(err.contains("resuming from"), "{err}");
    // 5. the newest checkpoint damaged between kill and resume (flipped bytes in its data)
    let cur = ckpt.join("checkpoint.safetensors");
    let mut b = std::fs::read(&cur).unwrap();
    let n = b.len();
    for x in &mut b[n - 4096..n - 4000] {
        *x ^= 0x5a;
    }
    std::fs::write(&cur, &b).unwrap();
    let err = spawn(&resume, &log).finish();
    assert!(
        err.contains("checksum mismatch") && err.contains("trying the previous checkpoint"),
        "the damaged checkpoint must be detected and said: {err}"
    );
    assert!(
        err.contains("resuming from") && err.contains("checkpoint.prev.safetensors"),
        "the previous checkpoint must be used: {err}"
    );
    assert!(ckpt.join("checkpoint.damaged.safetensors").exists());

    let model = |d: &Path| std::fs::read(d.join("model/model.safetensors")).unwrap();
    assert!(model(&out) == model(&full), "resumed run: different model bytes");
    assert!(
        model(&out) != std::fs::read(fx.model.join("model.safetensors")).unwrap(),
        "the run changed nothing"
    );
    let (r, rf) = (json(&out.join("report.json")), json(&full.join("report.json")));
    assert_eq!(r["metrics"], rf["metrics"]);
    assert_eq!(r["reference"], rf["reference"]);
    assert_eq!(
        r["history"]["steps"], rf["history"]["steps"],
        "same losses step by step"
    );
    assert_eq!(r["cost"]["steps"], steps);
    assert_eq!(
        temp_files(&out),
        Vec::<PathBuf>::new(),
        "temp files left in the run folder"
    );
}

#[test]
fn train_killed_while_writing_resumes_to_the_same_bytes_and_skips_a_torn_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture::build(tmp.path());
    // --fit-f1 0: the best dev epoch is kept whatever its train F1, so the model is written at
    // the end of epoch 1 (step 2 below); the tiny model never fits its data, and with the
    // default threshold only the last epoch would be written
    let args = |out: &Path| {
        fixture::train_args(
            &fx.base,
            &fx.data,
            out,
            3,
            &["--checkpoint-every", "2", "--fit-f1", "0"],
        )
    };
    let full = tmp.path().join("train-full");
    let t0 = Instant::now();
    spawn(&args(&full), &tmp.path().join("full.log")).finish();
    eprintln!("uninterrupted train: {:.2} s", t0.elapsed().as_secs_f64());

    let out = tmp.path().join("train");
    let ckpt = out.join("checkpoints");
    let log = tmp.path().join("train.log");
    let a = args(&out);
    let resume = with(&a, &["--resume"]);

    // 1. while the first mid-epoch checkpoint is written (a kill before any checkpoint
    //    exists leaves checkpoints/ empty, and --resume starts from the beginning)
    kill_during_write(
        "train: writing a checkpoint",
        &ckpt,
        ".checkpoint.safetensors.tmp",
        || spawn(if out.exists() { &resume } else { &a }, &log),
    );
    // 2. at the end of epoch 1: dev F1 evaluated, the best model being written to model/
    let orphans = kill_during_write(
        "train: writing model/",
        &out.join("model"),
        ".model.safetensors.tmp",
        || spawn(&resume, &log),
    );
    // 3. in epoch 3, after a checkpoint
    let err = spawn(&resume, &log).kill_when("train: in epoch 3", |_| checkpoint_step(&ckpt, &["epoch"]) >= 2);
    assert!(err.contains("left by an interrupted write"), "{err}");
    assert!(orphans.iter().all(|p| !p.exists()), "{orphans:?} not removed on resume");
    // 4. the newest checkpoint torn (truncated) between kill and resume
    let cur = ckpt.join("checkpoint.safetensors");
    let b = std::fs::read(&cur).unwrap();
    std::fs::write(&cur, &b[..b.len() / 2]).unwrap();
    let err = spawn(&resume, &log).finish();
    assert!(
        err.contains("not a readable checkpoint") && err.contains("trying the previous checkpoint"),
        "the torn checkpoint must be detected and said: {err}"
    );
    assert!(err.contains("checkpoint.prev.safetensors"), "{err}");

    let model = |d: &Path| std::fs::read(d.join("model/model.safetensors")).unwrap();
    assert!(model(&out) == model(&full), "resumed train: different model bytes");
    let (t, tf) = (json(&out.join("train.json")), json(&full.join("train.json")));
    assert_eq!(t["metrics"], tf["metrics"]);
    assert_eq!(t["record"]["step_losses"], tf["record"]["step_losses"]);
    assert_eq!(t["record"]["best_epoch"], tf["record"]["best_epoch"]);
    assert_eq!(
        temp_files(&out),
        Vec::<PathBuf>::new(),
        "temp files left in the run folder"
    );
}

/// The default checkpoint schedule (no --checkpoint-every) spaces periodic checkpoints at
/// least 30 s apart (src/unlearn/run.rs CHECKPOINT_MIN_SECONDS) and always saves the last
/// step: a 25-step run of a few seconds writes one checkpoint, of step 25, so there is no
/// previous one; with --checkpoint-every 10 it writes three (10, 20, 25).
#[test]
fn default_checkpoints_are_spaced_in_time_and_the_last_step_is_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture::build(tmp.path());
    let step_of = |dir: &Path, file: &str| -> Option<u64> {
        let bytes = std::fs::read(dir.join("checkpoints").join(file)).ok()?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let state: Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["state"]).unwrap();
        state["state"]["step"].as_u64()
    };
    for (extra, previous) in [(&[][..], None), (&["--checkpoint-every", "10"][..], Some(20))] {
        let out = tmp.path().join(format!("run-{}", extra.len()));
        let t0 = Instant::now();
        spawn(
            &fixture::run_args(&fx.model, &fx.data, &out, 25, extra),
            &tmp.path().join("run.log"),
        )
        .finish();
        let took = t0.elapsed().as_secs_f64();
        assert!(
            took < 30.0,
            "the run took {took:.1} s: too slow to show the default's 30 s spacing"
        );
        assert_eq!(
            step_of(&out, "checkpoint.safetensors"),
            Some(25),
            "{extra:?}: the last step is saved"
        );
        assert_eq!(
            step_of(&out, "checkpoint.prev.safetensors"),
            previous,
            "{extra:?}: the one before"
        );
    }
}
