//! SISA (Bourtoule et al., "Machine Unlearning", IEEE S&P 2021), the sharded baseline of
//! SPEC section 5. Train is split into S shards by a seeded permutation; one model per
//! shard is fine-tuned from the pretrained encoder with the `train` recipe; the ensemble
//! predicts a word by the argmax of the shards' mean softmax (`eval::ensemble`).
//! Unlearning retrains, from the encoder, only the shards that hold forget sentences, on
//! the shard minus those sentences; the other shards are kept byte for byte. (No slices
//! inside a shard: a shard is a fifth of train, and its retraining is the cost reported.)
//!
//! The original shard models are the expensive, one-time part (together about the cost of
//! one fine-tune on all of train), so they live in a cache folder (`--sisa-shards DIR`,
//! default `OUT/sisa/original`) with a manifest of everything that fixes them (base
//! weights, train sentences, labels, seed, S, recipe, assignment). A later run whose
//! manifest matches reuses them; one that does not is refused; a partly trained cache is
//! completed, each shard resuming from its checkpoint.
//!
//! Folders: `CACHE/manifest.json`, `CACHE/shards.json`, `CACHE/shard-K/{model/,train.json}`
//! (original shards); `OUT/sisa/shards.json`, `OUT/sisa/retrain/shard-K/{model/,train.json}`
//! (retrained shards); `OUT/model/shard-K/` + `OUT/model/ensemble.json` (the unlearned
//! ensemble). Each `train.json` records the train sentence indices the shard model was
//! trained on. A shard's checkpoints are deleted once its train.json is written.
use crate::backend::Backend;
use crate::data::rng::{keyed_rng, shuffle, Purpose};
use crate::data::{LabelMap, Sentence};
use crate::error::{Error, Result};
use crate::eval::ensemble::Ensemble;
use crate::eval::evaluate::Dataset;
use crate::infer::Classifier;
use crate::train::finetune::{finetune, Base, FinetuneConfig, FinetuneResult};
use crate::util::{remove_stale_temp_files, write_atomic, Fnv};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Default `--shards` (SPEC section 5).
pub const DEFAULT_SHARDS: usize = 5;

/// `--shards`: a seeded permutation of the train indices `0..n_train` split into `shards`
/// contiguous parts of near-equal size (sizes differ by at most one), each sorted. The
/// same (n_train, shards, seed) give the same assignment on every machine.
pub fn assign_shards(n_train: usize, shards: usize, seed: u64) -> Result<Vec<Vec<usize>>> {
    if shards < 2 {
        return Err(Error::invalid(format!(
            "--shards {shards}: SISA needs at least 2 shards (1 shard is retraining)"
        )));
    }
    if shards > n_train {
        return Err(Error::invalid(format!(
            "--shards {shards}: train has only {n_train} sentences, so at most {n_train} shards"
        )));
    }
    let mut perm: Vec<usize> = (0..n_train).collect();
    shuffle(&mut keyed_rng(seed, Purpose::SisaShards, 0), &mut perm);
    Ok((0..shards)
        .map(|k| {
            let mut part = perm[k * n_train / shards..(k + 1) * n_train / shards].to_vec();
            part.sort_unstable();
            part
        })
        .collect())
}

/// Fingerprint of an assignment.
pub fn assignment_hash(assignment: &[Vec<usize>]) -> String {
    let mut h = Fnv::default();
    for part in assignment {
        for &i in part {
            h.eat(&(i as u64).to_le_bytes());
        }
        h.eat(&u64::MAX.to_le_bytes());
    }
    h.hex()
}

/// Everything that fixes the original shard models. A cache folder holds one; a run
/// with another is refused (paths are recorded for the reader, not compared: a moved
/// folder with the same contents is the same input).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub base: PathBuf,
    /// Fingerprint of the pretrained encoder's tensors (names and bytes).
    pub base_weights: String,
    pub data: PathBuf,
    /// Fingerprint of train's words and tags.
    pub train: String,
    pub train_sentences: usize,
    pub labels: Vec<String>,
    pub seed: u64,
    pub shards: usize,
    /// The fine-tuning recipe of every shard (run's --train-* options).
    pub recipe: FinetuneConfig,
    pub assignment: String,
}

const MANIFEST_FORMAT: &str = "deepcut-fast sisa shards 1";

impl Manifest {
    /// The fields where `self` and `other` differ (empty: the same shard models).
    fn differences(&self, other: &Manifest) -> Vec<String> {
        let mut d = vec![];
        let mut check = |name: &str, same: bool, a: String, b: String| {
            if !same {
                d.push(format!("{name} (cache: {a}; this run: {b})"));
            }
        };
        check(
            "format",
            self.format == other.format,
            self.format.clone(),
            other.format.clone(),
        );
        check(
            "base weights",
            self.base_weights == other.base_weights,
            format!("{} of {}", self.base_weights, self.base.display()),
            format!("{} of {}", other.base_weights, other.base.display()),
        );
        check(
            "train sentences",
            self.train == other.train && self.train_sentences == other.train_sentences,
            format!("{} sentences of {}", self.train_sentences, self.data.display()),
            format!("{} sentences of {}", other.train_sentences, other.data.display()),
        );
        check(
            "labels",
            self.labels == other.labels,
            self.labels.join(","),
            other.labels.join(","),
        );
        check(
            "seed",
            self.seed == other.seed,
            self.seed.to_string(),
            other.seed.to_string(),
        );
        check(
            "shards",
            self.shards == other.shards,
            self.shards.to_string(),
            other.shards.to_string(),
        );
        check(
            "training recipe",
            self.recipe == other.recipe,
            serde_json::to_string(&self.recipe).unwrap_or_default(),
            serde_json::to_string(&other.recipe).unwrap_or_default(),
        );
        check(
            "assignment",
            self.assignment == other.assignment,
            self.assignment.clone(),
            other.assignment.clone(),
        );
        d
    }
}

impl Manifest {
    /// The manifest of the original shard models `cfg` asks for, from `base` on `data`.
    pub fn new(base: &Base, labels: &LabelMap, data: &Dataset, cfg: &SisaConfig) -> Result<Manifest> {
        let assignment = assign_shards(data.train.len(), cfg.shards, cfg.seed)?;
        Ok(Manifest {
            format: MANIFEST_FORMAT.into(),
            base: base.dir.clone(),
            base_weights: weights_fingerprint(base),
            data: data.dir.clone(),
            train: train_fingerprint(&data.train),
            train_sentences: data.train.len(),
            labels: labels.labels.clone(),
            seed: cfg.seed,
            shards: cfg.shards,
            recipe: cfg.recipe.clone(),
            assignment: assignment_hash(&assignment),
        })
    }
}

/// Whether `dir` can hold the original shard models of `manifest`: it does not exist, is
/// empty, or has a manifest.json with the same settings (returns true then). A folder
/// with other settings, or with other contents, is an error naming what differs.
pub fn check_cache(dir: &Path, manifest: &Manifest) -> Result<bool> {
    let path = dir.join("manifest.json");
    if path.exists() {
        let saved: Manifest = read_json(&path)?;
        let diff = saved.differences(manifest);
        if !diff.is_empty() {
            return Err(Error::file(
                dir,
                format!(
                    "--sisa-shards: these shard models were trained with other settings; they differ in {}. \
                     Use another folder, or the settings of the cache",
                    diff.join("; ")
                ),
            ));
        }
        return Ok(true);
    }
    if dir.exists() && std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.next().is_some() {
        return Err(Error::file(
            dir,
            "--sisa-shards: this folder is not empty and has no manifest.json (it is not a SISA shard folder)",
        ));
    }
    Ok(false)
}

/// A shard model's `train.json`: what it was trained on, and how it went.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShardRecord {
    pub shard: usize,
    /// The 0-based train sentence indices it was trained on, ascending.
    pub sentences: Vec<usize>,
    pub config: FinetuneConfig,
    pub record: FinetuneResult,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, e.to_string()))
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::file(path, e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

fn shard_name(k: usize) -> String {
    format!("shard-{k}")
}

/// One process at a time per cache folder: `DIR/lock` holds the owner's pid, and a lock
/// whose process is gone (killed) is taken over. Removed when dropped.
struct CacheLock(PathBuf);

impl CacheLock {
    fn take(dir: &Path) -> Result<CacheLock> {
        let path = dir.join("lock");
        let me = std::process::id();
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(me.to_string().as_bytes())
                        .map_err(|e| Error::io(&path, e))?;
                    return Ok(CacheLock(path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&path).unwrap_or_default();
                    let pid = owner.trim().parse::<u32>().ok();
                    if let Some(pid) = pid.filter(|&p| p != me && Path::new(&format!("/proc/{p}")).exists()) {
                        return Err(Error::file(
                            dir,
                            format!("the SISA shard folder is in use by process {pid}; wait for it, or use another --sisa-shards folder"),
                        ));
                    }
                    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::file(&path, "could not take the lock"))
    }
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Fine-tunes the model of shard `k` on the train sentences `ids` from `base` into `dir`
/// (`dir/model`, `dir/train.json`), resuming from `dir/checkpoints` when they exist. A
/// shard whose train.json exists is reused (after checking it was trained on `ids` with
/// `recipe`). Returns the record and whether it was trained now.
#[allow(clippy::too_many_arguments)]
fn train_shard<B: Backend>(
    mk: &dyn Fn() -> Result<B>, base: &Base, labels: &LabelMap, data: &Dataset, k: usize, ids: &[usize],
    recipe: &FinetuneConfig, dir: &Path, quiet: bool, what: &str,
) -> Result<(ShardRecord, bool)> {
    let rec_path = dir.join("train.json");
    if rec_path.exists() {
        let r: ShardRecord = read_json(&rec_path)?;
        if r.sentences != ids || r.config != *recipe {
            return Err(Error::file(
                &rec_path,
                "this shard model was trained on other sentences or with another recipe than this run asks for",
            ));
        }
        return Ok((r, false));
    }
    let train: Vec<Sentence> = ids.iter().map(|&i| data.train[i].clone()).collect();
    let resume = dir.join("checkpoints").exists();
    eprintln!(
        "{what} shard {k}: {} {} sentences ({} epochs, lr {}) in {}",
        if resume {
            "resuming the fine-tune on"
        } else {
            "fine-tuning on"
        },
        train.len(),
        recipe.epochs,
        recipe.lr,
        dir.display()
    );
    let (_, record) = finetune(
        mk()?,
        base.classifier(labels, recipe.seed)?,
        &base.dir,
        &train,
        data,
        recipe,
        dir,
        resume,
        quiet,
    )?;
    let r = ShardRecord {
        shard: k,
        sentences: ids.to_vec(),
        config: recipe.clone(),
        record,
    };
    write_json(&rec_path, &r)?;
    // The finished model needs no checkpoints (train.json marks it done); they are three
    // times its size.
    let ckpt = dir.join("checkpoints");
    if ckpt.exists() {
        std::fs::remove_dir_all(&ckpt).map_err(|e| Error::io(&ckpt, e))?;
    }
    Ok((r, true))
}

/// Hard-links (or, across file systems, copies) the files of model folder `src` into a
/// fresh `dst`: the ensemble's unchanged shards are the original's bytes, not a re-save.
fn link_model_dir(src: &Path, dst: &Path) -> Result<()> {
    if dst.exists() {
        std::fs::remove_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    }
    std::fs::create_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    for entry in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let path = entry.map_err(|e| Error::io(src, e))?.path();
        if !path.is_file() || path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            continue;
        }
        let to = dst.join(path.file_name().unwrap_or_default());
        if std::fs::hard_link(&path, &to).is_err() {
            std::fs::copy(&path, &to).map_err(|e| Error::io(&to, e))?;
        }
    }
    Ok(())
}

/// What SISA needs from the run.
pub struct SisaConfig {
    pub shards: usize,
    /// Seed of the assignment.
    pub seed: u64,
    /// Fine-tuning recipe of every shard model.
    pub recipe: FinetuneConfig,
    /// The cache folder of the original shard models (`--sisa-shards`), or None for
    /// `OUT/sisa/original`.
    pub cache: Option<PathBuf>,
}

/// The original ensemble: assignment, the cache folder and each shard's record.
pub struct Sisa {
    pub assignment: Vec<Vec<usize>>,
    pub cache: PathBuf,
    pub manifest: Manifest,
    pub original: Vec<ShardRecord>,
    /// Original shards this run trained (the rest came from the cache).
    pub trained_now: Vec<usize>,
}

/// The unlearned ensemble and what making it cost.
pub struct Unlearned {
    pub ensemble: Ensemble,
    /// The retrained shards' records (shard, sentences, training record).
    pub retrained: Vec<ShardRecord>,
    /// Shards all of whose sentences were forgotten: left out of the ensemble.
    pub dropped: Vec<usize>,
    /// Forget sentences per shard.
    pub forget_per_shard: Vec<usize>,
}

impl Unlearned {
    pub fn seconds(&self) -> f64 {
        self.retrained.iter().map(|r| r.record.seconds).sum()
    }
    pub fn steps(&self) -> u64 {
        self.retrained.iter().map(|r| r.record.steps).sum()
    }
    pub fn tokens(&self) -> u64 {
        self.retrained.iter().map(|r| r.record.tokens).sum()
    }
}

fn train_fingerprint(train: &[Sentence]) -> String {
    let mut h = Fnv::default();
    for s in train {
        s.words.iter().for_each(|w| {
            h.eat_str(w);
        });
        h.eat(&[0xfe]);
        s.tags.iter().for_each(|t| {
            h.eat_str(t);
        });
        h.eat(&[0xfd]);
    }
    h.hex()
}

fn weights_fingerprint(base: &Base) -> String {
    let mut h = Fnv::default();
    for (name, t) in &base.weights.tensors {
        h.eat_str(name);
        h.eat(bytemuck::cast_slice(&t.data));
    }
    h.hex()
}

impl Sisa {
    /// Assigns the shards, writes `OUT/sisa/shards.json`, and trains the original shard
    /// models that the cache does not hold yet (all of them on a first run).
    pub fn original_shards<B: Backend>(
        mk: &dyn Fn() -> Result<B>, base: &Base, labels: &LabelMap, data: &Dataset, cfg: &SisaConfig, out: &Path,
        quiet: bool,
    ) -> Result<Sisa> {
        let assignment = assign_shards(data.train.len(), cfg.shards, cfg.seed)?;
        let manifest = Manifest::new(base, labels, data, cfg)?;
        let shards_json = json!({
            "shards": cfg.shards, "seed": cfg.seed, "train_sentences": data.train.len(),
            "assignment_hash": manifest.assignment, "assignment": assignment,
        });
        write_json(&out.join("sisa").join("shards.json"), &shards_json)?;

        let cache = cfg.cache.clone().unwrap_or_else(|| out.join("sisa").join("original"));
        let manifest_path = cache.join("manifest.json");
        let existing = check_cache(&cache, &manifest)?;
        std::fs::create_dir_all(&cache).map_err(|e| Error::io(&cache, e))?;
        let _lock = CacheLock::take(&cache)?;
        if !existing {
            write_json(&manifest_path, &manifest)?;
            write_json(&cache.join("shards.json"), &shards_json)?;
        }
        remove_stale_temp_files(&cache)?;
        let done = (0..cfg.shards)
            .filter(|&k| cache.join(shard_name(k)).join("train.json").exists())
            .count();
        if done == cfg.shards {
            eprintln!(
                "sisa: reusing the {} original shard models in {} (its manifest matches: base, data, labels, seed, shards, recipe)",
                cfg.shards,
                cache.display()
            );
        } else {
            eprintln!(
                "sisa: training the original shard models into {} ({done} of {} already there): the one-time cost",
                cache.display(),
                cfg.shards
            );
        }
        let mut original = vec![];
        let mut trained_now = vec![];
        for (k, ids) in assignment.iter().enumerate() {
            let dir = cache.join(shard_name(k));
            let (r, now) = train_shard(
                mk,
                base,
                labels,
                data,
                k,
                ids,
                &cfg.recipe,
                &dir,
                quiet,
                "sisa: original",
            )?;
            if now {
                trained_now.push(k);
            }
            original.push(r);
        }
        Ok(Sisa {
            assignment,
            cache,
            manifest,
            original,
            trained_now,
        })
    }

    /// The original ensemble (every shard model of the cache).
    pub fn original_ensemble(&self) -> Result<Ensemble> {
        let names: Vec<String> = (0..self.assignment.len()).map(shard_name).collect();
        let members = names
            .iter()
            .map(|n| Classifier::load(&self.cache.join(n).join("model")))
            .collect::<Result<Vec<_>>>()?;
        Ensemble::new(names, members)
    }

    /// Unlearns `forget` (sorted train indices): retrains the shards holding any of them
    /// from `base` on the rest of their sentences (into `OUT/sisa/retrain/shard-K`,
    /// resumable), writes the ensemble into `OUT/model`, and returns it loaded from there.
    #[allow(clippy::too_many_arguments)]
    pub fn unlearn<B: Backend>(
        &self, mk: &dyn Fn() -> Result<B>, base: &Base, labels: &LabelMap, data: &Dataset, recipe: &FinetuneConfig,
        forget: &[usize], out: &Path, quiet: bool,
    ) -> Result<Unlearned> {
        let mut is_forget = vec![false; data.train.len()];
        forget.iter().for_each(|&i| is_forget[i] = true);
        let forget_per_shard: Vec<usize> = self
            .assignment
            .iter()
            .map(|ids| ids.iter().filter(|&&i| is_forget[i]).count())
            .collect();
        let affected: Vec<usize> = (0..self.assignment.len())
            .filter(|&k| forget_per_shard[k] > 0)
            .collect();
        eprintln!(
            "sisa: the forget set touches shard(s) {:?} of {}; retraining only those, from {}",
            affected,
            self.assignment.len(),
            base.dir.display()
        );
        let model_dir = out.join("model");
        std::fs::create_dir_all(&model_dir).map_err(|e| Error::io(&model_dir, e))?;
        let (mut retrained, mut dropped, mut names) = (vec![], vec![], vec![]);
        for (k, ids) in self.assignment.iter().enumerate() {
            let name = shard_name(k);
            let src = if forget_per_shard[k] == 0 {
                self.cache.join(&name).join("model")
            } else {
                let kept: Vec<usize> = ids.iter().copied().filter(|&i| !is_forget[i]).collect();
                if kept.is_empty() {
                    eprintln!("sisa: every sentence of shard {k} is forgotten: it leaves the ensemble");
                    dropped.push(k);
                    continue;
                }
                let dir = out.join("sisa").join("retrain").join(&name);
                let (r, _) = train_shard(mk, base, labels, data, k, &kept, recipe, &dir, quiet, "sisa: retrain")?;
                retrained.push(r);
                dir.join("model")
            };
            link_model_dir(&src, &model_dir.join(&name))?;
            names.push(name);
        }
        let about = json!({
            "method": "sisa", "shards": self.assignment.len(),
            "retrained": retrained.iter().map(|r| r.shard).collect::<Vec<_>>(), "dropped": dropped,
            "original_shards": self.cache,
        });
        Ensemble::write_manifest(&model_dir, &names, labels, about)?;
        Ok(Unlearned {
            ensemble: Ensemble::load(&model_dir)?,
            retrained,
            dropped,
            forget_per_shard,
        })
    }

    /// The one-time cost of the original shard models (from their records, whether trained
    /// by this run or an earlier one).
    pub fn original_cost(&self) -> Value {
        let seconds: f64 = self.original.iter().map(|r| r.record.seconds).sum();
        let tokens: u64 = self.original.iter().map(|r| r.record.tokens).sum();
        json!({
            "seconds": seconds,
            "steps": self.original.iter().map(|r| r.record.steps).sum::<u64>(),
            "tokens": tokens,
            "tokens_per_second": tokens as f64 / seconds.max(1e-9),
            "trained_by_this_run": self.trained_now,
        })
    }

    /// report.json's `sisa` section.
    pub fn report(&self, u: &Unlearned) -> Value {
        let per_shard: Vec<Value> = self
            .original
            .iter()
            .enumerate()
            .map(|(k, o)| {
                let r = u.retrained.iter().find(|r| r.shard == k);
                let rec = |r: &ShardRecord| {
                    json!({"sentences": r.sentences.len(), "steps": r.record.steps, "tokens": r.record.tokens,
                           "seconds": r.record.seconds, "best_epoch": r.record.best_epoch, "best_dev_f1": r.record.best_dev_f1})
                };
                json!({
                    "shard": k,
                    "sentences": o.sentences.len(),
                    "forget_sentences": u.forget_per_shard[k],
                    "retrained": r.is_some(),
                    "dropped": u.dropped.contains(&k),
                    "original": rec(o),
                    "retrain": r.map(rec),
                })
            })
            .collect();
        json!({
            "shards": self.assignment.len(),
            "assignment": "sisa/shards.json",
            "assignment_hash": self.manifest.assignment,
            "original_shards": {"folder": self.cache, "reused": self.trained_now.is_empty(), "trained_by_this_run": self.trained_now},
            "retrained": u.retrained.iter().map(|r| r.shard).collect::<Vec<_>>(),
            "dropped": u.dropped,
            "combine": crate::eval::ensemble::COMBINE,
            "per_shard": per_shard,
        })
    }
}
