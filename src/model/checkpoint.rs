//! Weights on the host: load and save Hugging Face `model.safetensors`, and seeded init.
//!
//! Canonical tensor names are the transformers names without the model prefix
//! (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`,
//! ..., `classifier.weight`). [`param_specs`] lists them, with shapes, in one fixed
//! order; everything else in the engine refers to weights by these names.
//!
//! Loading accepts what real checkpoints contain:
//! - names bare (a saved `BertModel`, like all-MiniLM-L6-v2) or with the prefix of the
//!   config's own model type (`bert.` / `roberta.`, a saved `*ForTokenClassification`).
//!   The other family's prefix is an error, not a silent rename: a `roberta.` tensor
//!   under a bert config means config and weights do not belong together;
//! - old TF-era `LayerNorm.gamma` / `LayerNorm.beta`, read as `weight` / `bias`;
//! - f32, f16 and bf16 data, converted to f32.
//!
//! It silently skips what a token classifier does not use: buffers (`*position_ids`,
//! `*token_type_ids`), the pooler (`pooler.*`) and language-model heads (`cls.*`,
//! `lm_head.*`). Any other tensor is an error, so a config with too few layers cannot
//! quietly drop half a checkpoint.
//!
//! Saving writes f32 with exactly the names `BertForTokenClassification` /
//! `RobertaForTokenClassification` expect: `bert.`/`roberta.` + encoder names, and a
//! bare `classifier.*`.
use crate::error::{Error, Result};
use crate::model::config::{ModelConfig, ModelType};
use crate::model::encoder::Dims;
use crate::util::write_atomic;
use half::{bf16, f16};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, SafeTensorError, TensorView, View};
use safetensors::SafeTensors;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Weights file inside a model folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Config file inside a model folder.
pub const CONFIG_FILE: &str = "config.json";
/// Files a tokenizer may need, copied next to a saved model by [`copy_tokenizer_files`].
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
];

pub const WORD_EMBEDDINGS: &str = "embeddings.word_embeddings.weight";
pub const POSITION_EMBEDDINGS: &str = "embeddings.position_embeddings.weight";
pub const TOKEN_TYPE_EMBEDDINGS: &str = "embeddings.token_type_embeddings.weight";
pub const CLASSIFIER_WEIGHT: &str = "classifier.weight";
pub const CLASSIFIER_BIAS: &str = "classifier.bias";

/// One f32 tensor in host memory, row-major.
#[derive(Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn zeros(shape: &[usize]) -> HostTensor {
        HostTensor {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Shape and a few values only: a derived Debug would print millions of floats.
impl std::fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head = &self.data[..self.data.len().min(4)];
        write!(
            f,
            "HostTensor {{ shape: {:?}, data[..{}]: {head:?} }}",
            self.shape,
            head.len()
        )
    }
}

/// All weights of one model, by canonical name (see the module doc). The map iterates
/// in name order; walk [`param_specs`] when model order matters.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HostWeights {
    pub tensors: BTreeMap<String, HostTensor>,
}

impl HostWeights {
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut HostTensor> {
        self.tensors.get_mut(name)
    }

    pub fn insert(&mut self, name: impl Into<String>, t: HostTensor) {
        self.tensors.insert(name.into(), t);
    }

    /// Rows of `classifier.weight`, or None for an encoder without a head.
    pub fn num_labels(&self) -> Option<usize> {
        self.get(CLASSIFIER_WEIGHT).and_then(|t| t.shape.first().copied())
    }

    pub fn num_params(&self) -> usize {
        self.tensors.values().map(HostTensor::numel).sum()
    }
}

/// Every parameter of the model with its shape, in a fixed order: embeddings, then
/// layer by layer, then the classifier (only when `num_labels` is Some).
pub fn param_specs(cfg: &ModelConfig, num_labels: Option<usize>) -> Vec<(String, Vec<usize>)> {
    // One list for the whole engine: the encoder stores its parameters in this order.
    Dims::from_config(cfg, num_labels.unwrap_or(0)).param_specs()
}

/// The classifier's two tensors: weight [L, C] and bias [L].
fn head_specs(cfg: &ModelConfig, num_labels: usize) -> [(String, Vec<usize>); 2] {
    [
        (CLASSIFIER_WEIGHT.into(), vec![num_labels, cfg.hidden_size]),
        (CLASSIFIER_BIAS.into(), vec![num_labels]),
    ]
}

// ---------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------

/// A tensor of the file under its canonical name, remembering the name it had there.
struct Found<'a> {
    file_name: String,
    view: TensorView<'a>,
}

/// Load `model.safetensors` for `cfg`. Returns the weights and whether a
/// classification head (`classifier.*`) was present. See the module doc for what
/// names and dtypes are accepted; every error names the file and the tensor.
pub fn load_weights(path: &Path, cfg: &ModelConfig) -> Result<(HostWeights, bool)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::file(path, describe_format_error(&e, &bytes)))?;
    let found = canonical_tensors(path, cfg, &st)?;
    let num_labels = head_labels(path, cfg, &found)?;
    let specs = param_specs(cfg, num_labels);
    check_unexpected(path, cfg, &found, &specs)?;
    let views = specs
        .iter()
        .map(|(name, shape)| checked_view(path, cfg, &found, name, shape))
        .collect::<Result<Vec<&Found>>>()?;
    // The only per-element work; tensors convert in parallel, errors in spec order.
    let converted: Vec<Result<HostTensor>> = views.par_iter().map(|t| to_host(path, t)).collect();
    let mut w = HostWeights::default();
    for ((name, _), t) in specs.iter().zip(converted) {
        w.insert(name.clone(), t?);
    }
    Ok((w, num_labels.is_some()))
}

/// Read `dir/config.json` and `dir/model.safetensors`.
pub fn load_model_dir(dir: &Path) -> Result<(ModelConfig, HostWeights, bool)> {
    if !dir.is_dir() {
        return Err(Error::file(
            dir,
            format!("not a directory; expected a model folder with {CONFIG_FILE} and {WEIGHTS_FILE}"),
        ));
    }
    let cfg_path = dir.join(CONFIG_FILE);
    if !cfg_path.is_file() {
        return Err(Error::file(
            &cfg_path,
            "missing: expected the model's config (Hugging Face config.json)",
        ));
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.is_file() {
        let hint = if dir.join("pytorch_model.bin").exists() {
            "; the folder has pytorch_model.bin, which is not read: convert it to safetensors first"
        } else {
            ""
        };
        return Err(Error::file(
            &weights_path,
            format!("missing: expected the model's weights in safetensors format{hint}"),
        ));
    }
    let cfg = ModelConfig::from_file(&cfg_path)?;
    let (w, has_head) = load_weights(&weights_path, &cfg)?;
    Ok((cfg, w, has_head))
}

/// What went wrong in a file the safetensors parser refused, in words a user can act on.
fn describe_format_error(e: &SafeTensorError, bytes: &[u8]) -> String {
    let len = bytes.len();
    let claimed = bytes.get(..8).map(|b| {
        let mut n = [0u8; 8];
        n.copy_from_slice(b);
        u64::from_le_bytes(n)
    });
    let what = match e {
        SafeTensorError::HeaderTooSmall => {
            format!("the file has {len} bytes, fewer than the 8-byte header length")
        }
        SafeTensorError::HeaderTooLarge => {
            format!(
                "the header claims {} bytes (more than the 100 MB limit)",
                claimed.unwrap_or(0)
            )
        }
        SafeTensorError::InvalidHeaderLength => {
            format!(
                "the header claims {} bytes but the file has only {len}",
                claimed.unwrap_or(0)
            )
        }
        SafeTensorError::InvalidHeader
        | SafeTensorError::InvalidHeaderStart
        | SafeTensorError::InvalidHeaderDeserialization => "the header is not valid UTF-8 JSON".to_string(),
        SafeTensorError::MetadataIncompleteBuffer => {
            format!("the tensor data described by the header does not match the file's {len} bytes")
        }
        SafeTensorError::InvalidOffset(name) => format!("tensor `{name}` has invalid data offsets"),
        SafeTensorError::TensorInvalidInfo => "a tensor's byte range does not match its shape and dtype".into(),
        SafeTensorError::ValidationOverflow => "a tensor's shape overflows when multiplied out".into(),
        other => other.to_string(),
    };
    format!("not a valid safetensors file ({what}); is it truncated or corrupt?")
}

/// Map the file's tensors to canonical names, dropping what we ignore on purpose.
fn canonical_tensors<'a>(path: &Path, cfg: &ModelConfig, st: &SafeTensors<'a>) -> Result<BTreeMap<String, Found<'a>>> {
    let mut found: BTreeMap<String, Found<'a>> = BTreeMap::new();
    for (file_name, view) in st.tensors() {
        let Some(name) = canonical_name(path, cfg, &file_name)? else {
            continue;
        };
        if let Some(prev) = found.get(&name) {
            return Err(Error::tensor(
                path,
                &file_name,
                format!("duplicates `{}`: both are `{name}`", prev.file_name),
            ));
        }
        found.insert(name, Found { file_name, view });
    }
    Ok(found)
}

/// The canonical name of a tensor in the file, or None if it is one we skip.
fn canonical_name(path: &Path, cfg: &ModelConfig, file_name: &str) -> Result<Option<String>> {
    let own = cfg.model_type.prefix();
    let other = match cfg.model_type {
        ModelType::Bert => ModelType::Roberta,
        ModelType::Roberta => ModelType::Bert,
    };
    if file_name.starts_with(other.prefix()) {
        return Err(Error::tensor(
            path,
            file_name,
            format!(
                "has the `{}` prefix of a {} checkpoint, but the config's model_type is \"{}\"",
                other.prefix(),
                other.name(),
                cfg.model_type.name()
            ),
        ));
    }
    let name = file_name.strip_prefix(own).unwrap_or(file_name);
    let skipped = name.ends_with("position_ids")
        || name.ends_with("token_type_ids")
        || ["pooler.", "cls.", "lm_head."].iter().any(|p| name.starts_with(p));
    if skipped {
        return Ok(None);
    }
    let name = if let Some(stem) = name.strip_suffix("LayerNorm.gamma") {
        format!("{stem}LayerNorm.weight")
    } else if let Some(stem) = name.strip_suffix("LayerNorm.beta") {
        format!("{stem}LayerNorm.bias")
    } else {
        name.to_string()
    };
    Ok(Some(name))
}

/// Number of labels if the file has a head. `classifier.weight` decides; its rows
/// must agree with the config's `id2label` when the config has labels.
fn head_labels(path: &Path, cfg: &ModelConfig, found: &BTreeMap<String, Found>) -> Result<Option<usize>> {
    let Some(w) = found.get(CLASSIFIER_WEIGHT) else {
        return match found.get(CLASSIFIER_BIAS) {
            Some(b) => Err(Error::tensor(path, &b.file_name, "present without `classifier.weight`")),
            None => Ok(None),
        };
    };
    let shape = w.view.shape();
    if shape.len() != 2 || shape[0] == 0 || shape[1] != cfg.hidden_size {
        return Err(Error::tensor(
            path,
            &w.file_name,
            format!("shape {shape:?} is not [num_labels, hidden_size = {}]", cfg.hidden_size),
        ));
    }
    let labels = shape[0];
    if let Some(n) = cfg.num_labels() {
        if n != labels {
            return Err(Error::tensor(
                path,
                &w.file_name,
                format!("has {labels} labels (rows) but the config's id2label has {n}"),
            ));
        }
    }
    Ok(Some(labels))
}

/// Any tensor left over after the ones we expect is a mismatch between file and config.
fn check_unexpected(
    path: &Path, cfg: &ModelConfig, found: &BTreeMap<String, Found>, specs: &[(String, Vec<usize>)],
) -> Result<()> {
    let expected: std::collections::HashSet<&str> = specs.iter().map(|(n, _)| n.as_str()).collect();
    match found.iter().find(|(name, _)| !expected.contains(name.as_str())) {
        None => Ok(()),
        Some((_, t)) => Err(Error::tensor(
            path,
            &t.file_name,
            format!(
                "unexpected: not a parameter of a {} encoder with {} layers \
                 (names are accepted bare or with the `{}` prefix)",
                cfg.model_type.name(),
                cfg.num_hidden_layers,
                cfg.model_type.prefix()
            ),
        )),
    }
}

/// The file's tensor for `name`, checked for presence, shape and dtype.
fn checked_view<'f, 'a>(
    path: &Path, cfg: &ModelConfig, found: &'f BTreeMap<String, Found<'a>>, name: &str, shape: &[usize],
) -> Result<&'f Found<'a>> {
    let t = found.get(name).ok_or_else(|| {
        Error::tensor(
            path,
            name,
            format!(
                "missing (expected shape {shape:?}; names are accepted bare or with the `{}` prefix)",
                cfg.model_type.prefix()
            ),
        )
    })?;
    if t.view.shape() != shape {
        return Err(Error::tensor(
            path,
            &t.file_name,
            format!(
                "shape {:?} does not match the config: expected {shape:?}",
                t.view.shape()
            ),
        ));
    }
    if !matches!(t.view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return Err(Error::tensor(
            path,
            &t.file_name,
            format!(
                "dtype {:?} is not supported (expected F32, F16 or BF16)",
                t.view.dtype()
            ),
        ));
    }
    Ok(t)
}

/// Decode little-endian f32/f16/bf16 bytes to f32 and refuse non-finite values.
/// Byte chunks rather than a cast: the data need not be 4-byte aligned in the file.
fn to_host(path: &Path, t: &Found) -> Result<HostTensor> {
    let bytes = t.view.data();
    let data: Vec<f32> = match t.view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::tensor(
                path,
                &t.file_name,
                format!("dtype {other:?} is not supported"),
            ));
        }
    };
    check_finite(path, &t.file_name, &data)?;
    Ok(HostTensor {
        shape: t.view.shape().to_vec(),
        data,
    })
}

fn check_finite(path: &Path, name: &str, data: &[f32]) -> Result<()> {
    if data.iter().all(|x| x.is_finite()) {
        return Ok(());
    }
    let i = data.iter().position(|x| !x.is_finite()).unwrap_or(0);
    Err(Error::tensor(
        path,
        name,
        format!("non-finite value {} at flat index {i}", data[i]),
    ))
}

// ---------------------------------------------------------------------------------
// Saving
// ---------------------------------------------------------------------------------

/// An f32 tensor borrowed for safetensors serialisation (no copy on little-endian hosts).
struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        if cfg!(target_endian = "little") {
            Cow::Borrowed(bytemuck::cast_slice(self.data))
        } else {
            Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// Write `w` as f32 safetensors under the names transformers'
/// `*ForTokenClassification` expects, atomically. The weights must be exactly
/// `param_specs(cfg, head)` (a head is saved iff `w` has `classifier.weight`), all
/// finite, and the head must agree with `cfg.id2label` when that is set.
pub fn save_weights(path: &Path, cfg: &ModelConfig, w: &HostWeights) -> Result<()> {
    check_weights(path, cfg, w)?;
    let prefix = cfg.model_type.prefix();
    let views = w.tensors.iter().map(|(name, t)| {
        let file_name = if name.starts_with("classifier.") {
            name.clone()
        } else {
            format!("{prefix}{name}")
        };
        (
            file_name,
            F32View {
                shape: &t.shape,
                data: &t.data,
            },
        )
    });
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let bytes = safetensors::serialize(views, &metadata)
        .map_err(|e| Error::file(path, format!("could not serialise the weights: {e}")))?;
    write_atomic(path, &bytes)
}

/// The in-memory weights must be a complete, finite model for `cfg`; `path` is where
/// they were going, for the error message.
fn check_weights(path: &Path, cfg: &ModelConfig, w: &HostWeights) -> Result<()> {
    let num_labels = w.num_labels();
    if let (Some(l), Some(n)) = (num_labels, cfg.num_labels()) {
        if l != n {
            return Err(Error::tensor(
                path,
                CLASSIFIER_WEIGHT,
                format!("has {l} labels but the config's id2label has {n}"),
            ));
        }
    }
    let specs = param_specs(cfg, num_labels);
    for (name, shape) in &specs {
        let t = w
            .get(name)
            .ok_or_else(|| Error::tensor(path, name, "missing from the weights to save"))?;
        if &t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
            return Err(Error::tensor(
                path,
                name,
                format!(
                    "shape {:?} ({} values) does not match the config: expected {shape:?}",
                    t.shape,
                    t.data.len()
                ),
            ));
        }
    }
    if let Some(extra) = w.tensors.keys().find(|n| !specs.iter().any(|(s, _)| s == *n)) {
        return Err(Error::tensor(
            path,
            extra,
            "not a parameter of this model; refusing to save it",
        ));
    }
    let finite: Vec<Result<()>> = specs
        .par_iter()
        .map(|(n, _)| w.get(n).map_or(Ok(()), |t| check_finite(path, n, &t.data)))
        .collect();
    finite.into_iter().collect()
}

/// Write a model folder that transformers loads: `config.json` (pretty, from
/// [`ModelConfig::to_json`]) and `model.safetensors`. If the weights have a head but
/// the config no labels, labels are named `LABEL_0..` as transformers itself does, so
/// the config's label count always matches the head.
///
/// Refusing to overwrite the folder a model was loaded from is the caller's call;
/// [`same_dir`] answers the question.
pub fn save_model_dir(dir: &Path, cfg: &ModelConfig, w: &HostWeights) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut cfg = cfg.clone();
    if let (Some(l), None) = (w.num_labels(), &cfg.id2label) {
        cfg.id2label = Some((0..l).map(|i| format!("LABEL_{i}")).collect());
    }
    save_weights(&dir.join(WEIGHTS_FILE), &cfg, w)?;
    let cfg_path = dir.join(CONFIG_FILE);
    let mut text = serde_json::to_string_pretty(&cfg.to_json())
        .map_err(|e| Error::file(&cfg_path, format!("could not serialise the config: {e}")))?;
    text.push('\n');
    write_atomic(&cfg_path, text.as_bytes())
}

/// Copy the tokenizer files of [`TOKENIZER_FILES`] that exist in `src_dir` into
/// `dst_dir` (atomically each). Returns the files copied; an error if there were none,
/// since a model folder without its tokenizer is not usable. Same folder: nothing to do.
pub fn copy_tokenizer_files(src_dir: &Path, dst_dir: &Path) -> Result<Vec<PathBuf>> {
    let present: Vec<&str> = TOKENIZER_FILES
        .iter()
        .copied()
        .filter(|f| src_dir.join(f).is_file())
        .collect();
    if present.is_empty() {
        return Err(Error::file(
            src_dir,
            format!("no tokenizer files found (looked for {})", TOKENIZER_FILES.join(", ")),
        ));
    }
    if same_dir(src_dir, dst_dir) {
        return Ok(present.iter().map(|f| dst_dir.join(f)).collect());
    }
    std::fs::create_dir_all(dst_dir).map_err(|e| Error::io(dst_dir, e))?;
    let mut copied = Vec::with_capacity(present.len());
    for f in present {
        let src = src_dir.join(f);
        let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
        let dst = dst_dir.join(f);
        write_atomic(&dst, &bytes)?;
        copied.push(dst);
    }
    Ok(copied)
}

/// Whether two paths name the same folder (after resolving `..` and symlinks).
/// Paths that do not exist yet are compared as absolute paths.
pub fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => match (std::path::absolute(a), std::path::absolute(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        },
    }
}

// ---------------------------------------------------------------------------------
// Seeded initialisation
// ---------------------------------------------------------------------------------

/// Values drawn from one RNG stream. Each chunk of each tensor has its own stream,
/// so the result does not depend on thread count or on which other tensors exist.
const INIT_CHUNK: usize = 1 << 16;

/// How transformers' `_init_weights` sets a parameter.
enum Init {
    /// normal(0, initializer_range), with the embedding's padding_idx row zeroed.
    Normal {
        zero_row: Option<usize>,
    },
    Zeros,
    Ones,
}

fn init_kind(cfg: &ModelConfig, name: &str) -> Init {
    let pad = cfg.pad_token_id as usize;
    if name.ends_with("LayerNorm.weight") {
        Init::Ones
    } else if name.ends_with(".bias") {
        Init::Zeros
    } else if name == WORD_EMBEDDINGS {
        Init::Normal { zero_row: Some(pad) }
    } else if name == POSITION_EMBEDDINGS && cfg.model_type == ModelType::Roberta {
        // RobertaEmbeddings gives its position table padding_idx = pad_token_id too.
        Init::Normal { zero_row: Some(pad) }
    } else {
        Init::Normal { zero_row: None }
    }
}

/// A fresh model as transformers initialises one: Linear and Embedding weights
/// normal(0, initializer_range), biases 0, LayerNorm weight 1 and bias 0, padding rows
/// 0. The same seed gives bit-identical weights on every machine: ChaCha8 streams and
/// a normal sampler built from IEEE basic operations only (no platform libm).
pub fn random_init(cfg: &ModelConfig, num_labels: Option<usize>, seed: u64) -> HostWeights {
    let mut w = HostWeights::default();
    for (name, shape) in param_specs(cfg, num_labels) {
        let t = init_tensor(cfg, &name, &shape, seed);
        w.insert(name, t);
    }
    w
}

/// Add (or replace) a freshly initialised classifier with `num_labels` rows. With the
/// same seed it equals the head of `random_init(cfg, Some(num_labels), seed)`.
pub fn init_head(w: &mut HostWeights, cfg: &ModelConfig, num_labels: usize, seed: u64) -> Result<()> {
    if num_labels == 0 {
        return Err(Error::invalid("cannot create a classification head with 0 labels"));
    }
    for (name, shape) in head_specs(cfg, num_labels) {
        let t = init_tensor(cfg, &name, &shape, seed);
        w.insert(name, t);
    }
    Ok(())
}

fn init_tensor(cfg: &ModelConfig, name: &str, shape: &[usize], seed: u64) -> HostTensor {
    let mut t = HostTensor::zeros(shape);
    match init_kind(cfg, name) {
        Init::Zeros => {}
        Init::Ones => t.data.fill(1.0),
        Init::Normal { zero_row } => {
            fill_normal(&mut t.data, cfg.initializer_range as f64, seed, name);
            let cols = shape.get(1).copied().unwrap_or(0);
            if let Some(row) = zero_row.filter(|&r| r < shape[0]) {
                t.data[row * cols..(row + 1) * cols].fill(0.0);
            }
        }
    }
    t
}

/// Fill `out` with normal(0, std) values for tensor `name` (see [`INIT_CHUNK`]).
fn fill_normal(out: &mut [f32], std: f64, seed: u64, name: &str) {
    let key = init_key(seed, name);
    out.par_chunks_mut(INIT_CHUNK).enumerate().for_each(|(chunk, values)| {
        let mut rng = ChaCha8Rng::from_seed(key);
        rng.set_stream(chunk as u64);
        for pair in values.chunks_mut(2) {
            let (a, b) = normal_pair(&mut rng);
            pair[0] = (a * std) as f32;
            if let Some(x) = pair.get_mut(1) {
                *x = (b * std) as f32;
            }
        }
    });
}

/// ChaCha key from the seed and the tensor name (FNV-1a), spelled out byte by byte so
/// it does not depend on `seed_from_u64`'s expansion.
fn init_key(seed: u64, name: &str) -> [u8; 32] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&h.to_le_bytes());
    key
}

/// Uniform in [0, 1) with 53 random bits.
fn unit_f64(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Two independent standard normals (Marsaglia's polar method: only +, *, /, sqrt
/// and our own ln, all exactly specified by IEEE 754).
fn normal_pair(rng: &mut ChaCha8Rng) -> (f64, f64) {
    loop {
        let u = 2.0 * unit_f64(rng) - 1.0;
        let v = 2.0 * unit_f64(rng) - 1.0;
        let s = u * u + v * v;
        if s > 0.0 && s < 1.0 {
            let f = (-2.0 * portable_ln(s) / s).sqrt();
            return (u * f, v * f);
        }
    }
}

/// ln(x) for positive normal x from basic IEEE operations, so results are the same on
/// every platform (std's `ln` calls the platform libm). x = m * 2^e with m in
/// [sqrt(1/2), sqrt(2)); ln m = 2 atanh(s), s = (m-1)/(m+1), |s| < 0.172, summed as
/// an odd series; 14 terms bring the truncation error below 1e-19.
fn portable_ln(x: f64) -> f64 {
    const LN_2: f64 = std::f64::consts::LN_2;
    const TERMS: usize = 14;
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    // Horner on 1 + s2/3 + s2^2/5 + ...
    let mut p = 1.0 / (2 * TERMS + 1) as f64;
    for k in (0..TERMS).rev() {
        p = p * s2 + 1.0 / (2 * k + 1) as f64;
    }
    e as f64 * LN_2 + 2.0 * s * p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_ln_matches_std() {
        let mut x = 1e-30_f64;
        while x <= 1.0 {
            let (ours, std) = (portable_ln(x), x.ln());
            assert!(
                (ours - std).abs() <= 4e-16 * std.abs().max(1.0),
                "ln({x}): {ours} vs {std}"
            );
            x *= 1.0173;
        }
        assert_eq!(portable_ln(1.0), 0.0);
    }

    #[test]
    fn normal_pairs_have_unit_variance() {
        let mut rng = ChaCha8Rng::from_seed([7; 32]);
        let n = 200_000;
        let (mut sum, mut sq) = (0.0, 0.0);
        for _ in 0..n / 2 {
            let (a, b) = normal_pair(&mut rng);
            sum += a + b;
            sq += a * a + b * b;
        }
        let mean = sum / n as f64;
        let var = sq / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }
}
