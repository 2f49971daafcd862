//! Run checkpoints: weights, AdamW moments and the caller's JSON state (step, stream
//! positions, history) in one safetensors file, written atomically (temp file, fsync,
//! rename). The previous checkpoint is kept beside it; a checkpoint that does not parse
//! or whose checksum does not match (torn or corrupted) is reported and the previous one
//! is used instead, so an interruption at any moment loses at most one interval.
use super::optim::Optimizer;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::util::write_atomic;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const CURRENT: &str = "checkpoint.safetensors";
pub const PREVIOUS: &str = "checkpoint.prev.safetensors";
/// Where a damaged current checkpoint is moved when the previous one is used instead.
pub const DAMAGED: &str = "checkpoint.damaged.safetensors";

/// FNV-1a over the tensor bytes, in a fixed order: detects a checkpoint whose data was
/// damaged after it was written.
fn checksum<'a>(parts: impl Iterator<Item = &'a [u8]>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for chunk in part.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            h ^= u64::from_le_bytes(w);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Saves model weights, optimiser moments and `state` into `dir` (created if needed).
/// A non-finite weight or moment is an error and nothing is written: the newest
/// checkpoint on disk is always one a run can continue from.
pub fn save<B: Backend>(dir: &Path, model: &Model<B>, opt: &Optimizer<B>, state: &Value) -> Result<()> {
    Snapshot::take(dir, model, opt, state)?.write()
}

/// What a checkpoint holds, copied to the host and checked: everything `save` needs from
/// the model and the optimiser, so the file can be written while training goes on.
pub struct Snapshot {
    dir: PathBuf,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    meta: HashMap<String, String>,
}

impl Snapshot {
    /// Copies the weights and moments to the host; a non-finite value is the error `save`
    /// gives (nothing will be written).
    pub fn take<B: Backend>(dir: &Path, model: &Model<B>, opt: &Optimizer<B>, state: &Value) -> Result<Snapshot> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let weights = model.export();
        let (m, v) = opt.export(model);
        let mut tensors = Vec::with_capacity(3 * weights.len());
        for ((name, shape, w), (m, v)) in weights.into_iter().zip(m.into_iter().zip(v)) {
            tensors.push((format!("w.{name}"), shape.clone(), w));
            tensors.push((format!("m.{name}"), shape.clone(), m));
            tensors.push((format!("v.{name}"), shape, v));
        }
        for (name, _, data) in &tensors {
            if let Some(x) = data.iter().find(|x| !x.is_finite()) {
                return Err(Error::Numeric(format!(
                    "step {}: `{name}` has the value {x} after the update; stopped without writing a checkpoint, {}",
                    opt.step,
                    last_good(dir)
                )));
            }
        }
        let mut meta: HashMap<String, String> = HashMap::from([
            ("state".to_string(), state.to_string()),
            ("optimizer_step".to_string(), opt.step.to_string()),
        ]);
        if let Some(sc) = &opt.scaler {
            let text = serde_json::to_string(sc).map_err(|e| Error::file(dir.join(CURRENT), e.to_string()))?;
            meta.insert("loss_scaler".to_string(), text);
        }
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            tensors,
            meta,
        })
    }

    /// Writes the checkpoint: checksum, serialisation, the current file kept as the
    /// previous one, the new one written atomically.
    pub fn write(mut self) -> Result<()> {
        let dir = &self.dir;
        let sum = checksum(self.tensors.iter().map(|(_, _, d)| bytemuck::cast_slice::<f32, u8>(d)));
        self.meta.insert("checksum".to_string(), sum.to_string());
        let mut views = vec![];
        for (name, shape, data) in &self.tensors {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(data))
                .map_err(|e| Error::tensor(dir.join(CURRENT), name, e.to_string()))?;
            views.push((name.clone(), view));
        }
        let bytes = safetensors::serialize(views, &Some(self.meta.clone()))
            .map_err(|e| Error::file(dir.join(CURRENT), e.to_string()))?;
        let cur = dir.join(CURRENT);
        if cur.exists() {
            std::fs::rename(&cur, dir.join(PREVIOUS)).map_err(|e| Error::io(&cur, e))?;
        }
        write_atomic(&cur, &bytes)
    }
}

/// Checkpoints written in the background: `save` copies the weights and moments to the
/// host and checks them (as `save` does), and a thread writes the file (checksum,
/// serialisation, fsync: about a second for MiniLM's 271 MB, mostly waiting for the disk)
/// while training goes on. One write at a time, in order; a write's error comes back from
/// the next `save` or from `wait`. Dropping the writer waits for the write in flight, so
/// a run that stops on an error still leaves its last checkpoint complete.
#[derive(Default)]
pub struct Writer {
    pending: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer::default()
    }

    /// Whether a checkpoint is still being written.
    pub fn busy(&self) -> bool {
        self.pending.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Waits for the write in flight (if any), then takes the snapshot and starts writing
    /// it. Errors: the previous write's, or the snapshot's (a non-finite value).
    pub fn save<B: Backend>(&mut self, dir: &Path, model: &Model<B>, opt: &Optimizer<B>, state: &Value) -> Result<()> {
        self.wait()?;
        self.save_with(dir, model, opt, state, || Ok(()))
    }

    /// `save`, with `first` written before the checkpoint on the same thread (fine-tuning's
    /// best model so far): the checkpoint that records it never lands before it does.
    pub fn save_with<B: Backend>(
        &mut self, dir: &Path, model: &Model<B>, opt: &Optimizer<B>, state: &Value,
        first: impl FnOnce() -> Result<()> + Send + 'static,
    ) -> Result<()> {
        self.wait()?;
        let snap = Snapshot::take(dir, model, opt, state)?;
        self.pending = Some(std::thread::spawn(move || {
            first()?;
            snap.write()
        }));
        Ok(())
    }

    /// The kill tests' fault injection (`util::maybe_abort_after`), once the write in
    /// flight is complete: the process is killed after a known checkpoint.
    pub fn maybe_abort_after(&mut self, step: u64) -> Result<()> {
        if crate::util::abort_due(step) {
            self.wait()?;
            crate::util::maybe_abort_after(step);
        }
        Ok(())
    }

    /// Waits for the checkpoint being written; its error, if any.
    pub fn wait(&mut self) -> Result<()> {
        match self.pending.take() {
            None => Ok(()),
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(Error::invalid("the checkpoint writer thread panicked"))),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            eprintln!("checkpoint: {e}");
        }
    }
}

/// `last_good`, once the checkpoint `writer` is writing (if any) is complete, so that the
/// message of a run that stops names it.
pub fn last_good_after(writer: &mut Writer, dir: &Path) -> String {
    let _ = writer.wait(); // a write that failed leaves the previous checkpoint, which this names
    last_good(dir)
}

/// Where the newest checkpoint of `dir` is, for the message of a run that stops.
pub fn last_good(dir: &Path) -> String {
    match [CURRENT, PREVIOUS].iter().map(|n| dir.join(n)).find(|p| p.exists()) {
        Some(p) => format!("the last good checkpoint is {}", p.display()),
        None => format!("no checkpoint had been written to {} yet", dir.display()),
    }
}

/// Reads one checkpoint file into the model and optimiser; returns its state.
fn load_file<B: Backend>(path: &Path, model: &mut Model<B>, opt: &mut Optimizer<B>) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) =
        SafeTensors::read_metadata(&bytes).map_err(|e| Error::file(path, format!("not a readable checkpoint: {e}")))?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| Error::file(path, format!("not a readable checkpoint: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let get_meta = |k: &str| {
        meta.get(k)
            .cloned()
            .ok_or_else(|| Error::file(path, format!("checkpoint metadata lacks `{k}`")))
    };
    let state: Value =
        serde_json::from_str(&get_meta("state")?).map_err(|e| Error::file(path, format!("checkpoint state: {e}")))?;
    let want_sum: u64 = get_meta("checksum")?
        .parse()
        .map_err(|_| Error::file(path, "checkpoint checksum is not a number"))?;
    let step: u64 = get_meta("optimizer_step")?
        .parse()
        .map_err(|_| Error::file(path, "optimizer_step is not a number"))?;

    let names: Vec<(String, usize)> = model
        .params
        .iter()
        .iter()
        .map(|p| (p.name.clone(), p.numel()))
        .collect();
    let mut tensors: HashMap<String, Vec<f32>> = HashMap::new();
    let mut order = vec![];
    for (name, n) in &names {
        for kind in ["w", "m", "v"] {
            let key = format!("{kind}.{name}");
            let t = st.tensor(&key).map_err(|_| {
                Error::tensor(
                    path,
                    &key,
                    "missing from the checkpoint (was it written by another model?)",
                )
            })?;
            if t.dtype() != Dtype::F32 || t.data().len() != n * 4 {
                return Err(Error::tensor(path, &key, format!("expected {n} f32 values")));
            }
            tensors.insert(key.clone(), bytemuck::pod_collect_to_vec(t.data()));
            order.push(key);
        }
    }
    let sum = checksum(order.iter().map(|k| bytemuck::cast_slice::<f32, u8>(&tensors[k])));
    if sum != want_sum {
        return Err(Error::file(path, "checksum mismatch: the checkpoint is damaged"));
    }
    model.load_params(|name| &tensors[&format!("w.{name}")]);
    let m: Vec<Vec<f32>> = names.iter().map(|(n, _)| tensors[&format!("m.{n}")].clone()).collect();
    let v: Vec<Vec<f32>> = names.iter().map(|(n, _)| tensors[&format!("v.{n}")].clone()).collect();
    opt.import(model, &m, &v, step);
    // fp16 loss scaling continues where it was (a checkpoint without it started fresh).
    if let (Some(sc), Some(text)) = (&mut opt.scaler, meta.get("loss_scaler")) {
        *sc = serde_json::from_str(text).map_err(|e| Error::file(path, format!("checkpoint loss_scaler: {e}")))?;
    }
    Ok(state)
}

/// Loads the newest good checkpoint of `dir` (None when there is none). A damaged
/// current checkpoint falls back to the previous one, and says so on stderr; the
/// damaged file is moved to [`DAMAGED`], so the next save does not rotate it over the
/// good previous one.
pub fn load<B: Backend>(dir: &Path, model: &mut Model<B>, opt: &mut Optimizer<B>) -> Result<Option<(Value, PathBuf)>> {
    let mut last_err = None;
    for name in [CURRENT, PREVIOUS] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        match load_file(&path, model, opt) {
            Ok(state) => {
                if name == PREVIOUS && last_err.is_some() {
                    let (cur, damaged) = (dir.join(CURRENT), dir.join(DAMAGED));
                    std::fs::rename(&cur, &damaged).map_err(|e| Error::io(&cur, e))?;
                    eprintln!("warning: the damaged checkpoint is kept as {}", damaged.display());
                }
                return Ok(Some((state, path)));
            }
            Err(e) => {
                eprintln!("warning: {e}; trying the previous checkpoint");
                last_err = Some(e);
            }
        }
    }
    match last_err {
        Some(e) => Err(Error::file(dir, format!("no usable checkpoint ({e})"))),
        None => Ok(None),
    }
}
