//! The encoder's `config.json`, in Hugging Face layout.
//!
//! We read only what fixes the computation (sizes, eps, dropouts, labels) and keep the
//! whole original JSON in `raw`, so keys we do not know (`transformers_version`,
//! `bos_token_id`, ...) survive a load/save round trip untouched.
//!
//! Keys that fix tensor shapes are required: a silent default there would turn a
//! broken config into a confusing shape error later. Everything else falls back to the
//! defaults of `BertConfig` / `RobertaConfig` in transformers.
use crate::error::{Error, Result};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// The two encoder families we implement (post-LayerNorm, GELU, absolute positions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    Bert,
    Roberta,
}

impl ModelType {
    /// Values of `model_type` we accept, for error messages.
    pub const SUPPORTED: &'static str = "\"bert\", \"roberta\"";

    /// The `model_type` string in config.json.
    pub fn name(self) -> &'static str {
        match self {
            ModelType::Bert => "bert",
            ModelType::Roberta => "roberta",
        }
    }

    /// Prefix of encoder tensors in a `*ForTokenClassification` checkpoint.
    pub fn prefix(self) -> &'static str {
        match self {
            ModelType::Bert => "bert.",
            ModelType::Roberta => "roberta.",
        }
    }

    /// The transformers class a saved model is meant to be loaded as.
    pub fn token_classification_arch(self) -> &'static str {
        match self {
            ModelType::Bert => "BertForTokenClassification",
            ModelType::Roberta => "RobertaForTokenClassification",
        }
    }

    fn parse(s: &str) -> Option<ModelType> {
        match s {
            "bert" => Some(ModelType::Bert),
            "roberta" => Some(ModelType::Roberta),
            _ => None,
        }
    }
}

/// Everything the engine needs from config.json, plus the original JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
    pub pad_token_id: u32,
    pub hidden_dropout_prob: f32,
    pub attention_probs_dropout_prob: f32,
    pub classifier_dropout: Option<f32>,
    pub initializer_range: f32,
    /// Label names, index = label id (HF `id2label`); `None` when the config has none.
    pub id2label: Option<Vec<String>>,
    /// The JSON this config was read from, so unknown keys survive a round trip.
    pub raw: Value,
}

/// Sanity limits checked before anything is sized from a config: a config is read
/// before its weights, and an absurd layer count or size would otherwise exhaust memory
/// (found by fuzzing) instead of failing with a message. Real BERT/RoBERTa encoders have
/// at most a few dozen layers and a few billion parameters.
pub const MAX_LAYERS: usize = 1024;
pub const MAX_PARAMETERS: u128 = 1 << 40;

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: &[&str] = &["minilm-l6", "bert-base", "roberta-base"];

impl ModelConfig {
    /// Read and validate a Hugging Face config.json.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
        Self::from_json(raw, path)
    }

    /// Validate an already parsed config; `origin` names it in error messages.
    pub fn from_json(raw: Value, origin: &Path) -> Result<ModelConfig> {
        let obj = raw
            .as_object()
            .ok_or_else(|| Error::file(origin, "expected a JSON object at the top level"))?;
        let keys = Keys { obj, path: origin };
        let model_type = keys.model_type()?;
        let default_pad = match model_type {
            ModelType::Bert => 0,
            ModelType::Roberta => 1,
        };
        let pad = keys.usize_or("pad_token_id", default_pad)?;
        let cfg = ModelConfig {
            model_type,
            vocab_size: keys.positive("vocab_size")?,
            hidden_size: keys.positive("hidden_size")?,
            num_hidden_layers: keys.positive("num_hidden_layers")?,
            num_attention_heads: keys.positive("num_attention_heads")?,
            intermediate_size: keys.positive("intermediate_size")?,
            max_position_embeddings: keys.positive("max_position_embeddings")?,
            type_vocab_size: keys.positive("type_vocab_size")?,
            layer_norm_eps: keys.f32_or("layer_norm_eps", 1e-12)?,
            pad_token_id: u32::try_from(pad).map_err(|_| keys.bad("pad_token_id", "does not fit in 32 bits"))?,
            hidden_dropout_prob: keys.f32_or("hidden_dropout_prob", 0.1)?,
            attention_probs_dropout_prob: keys.f32_or("attention_probs_dropout_prob", 0.1)?,
            classifier_dropout: keys.opt_f32("classifier_dropout")?,
            initializer_range: keys.f32_or("initializer_range", 0.02)?,
            id2label: keys.labels()?,
            raw: raw.clone(),
        };
        keys.check_fixed_choices()?;
        cfg.check_ranges(&keys)?;
        Ok(cfg)
    }

    /// A built-in config: "minilm-l6", "bert-base" or "roberta-base" (no labels).
    pub fn preset(name: &str) -> Result<ModelConfig> {
        let raw = match name {
            "minilm-l6" => bert_json(6, 384, 12, 1536),
            "bert-base" => bert_json(12, 768, 12, 3072),
            "roberta-base" => roberta_base_json(),
            _ => {
                return Err(Error::invalid(format!(
                    "unknown model preset `{name}`; valid presets: {}",
                    PRESETS.join(", ")
                )))
            }
        };
        Self::from_json(raw, &PathBuf::from(format!("<preset {name}>")))
    }

    /// The config as transformers should read it: `raw` with our fields written over it.
    ///
    /// `architectures` names the token-classification class; `dtype` is float32
    /// because we only save f32 (transformers 5 loads with `dtype="auto"`, so a stale
    /// "float16" would silently change predictions). `num_labels` is dropped: HF
    /// derives it from `id2label`, and a stale value could disagree.
    pub fn to_json(&self) -> Value {
        let mut obj = match &self.raw {
            Value::Object(m) => m.clone(),
            _ => Map::new(),
        };
        let arch = self.model_type.token_classification_arch();
        obj.insert("architectures".into(), json!([arch]));
        obj.insert("model_type".into(), json!(self.model_type.name()));
        let ints = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
            ("pad_token_id", self.pad_token_id as usize),
        ];
        for (key, v) in ints {
            obj.insert(key.into(), json!(v));
        }
        let floats = [
            ("layer_norm_eps", Some(self.layer_norm_eps)),
            ("hidden_dropout_prob", Some(self.hidden_dropout_prob)),
            ("attention_probs_dropout_prob", Some(self.attention_probs_dropout_prob)),
            ("classifier_dropout", self.classifier_dropout),
            ("initializer_range", Some(self.initializer_range)),
        ];
        for (key, v) in floats {
            let value = match v {
                Some(x) => f32_to_json(obj.get(key), x),
                None => Value::Null,
            };
            obj.insert(key.into(), value);
        }
        obj.insert("hidden_act".into(), json!("gelu"));
        obj.insert("position_embedding_type".into(), json!("absolute"));
        obj.remove("torch_dtype");
        obj.insert("dtype".into(), json!("float32"));
        obj.remove("num_labels");
        obj.remove("id2label");
        obj.remove("label2id");
        if let Some(labels) = &self.id2label {
            let id2label: Map<String, Value> = labels
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), json!(l)))
                .collect();
            let label2id: Map<String, Value> = labels.iter().enumerate().map(|(i, l)| (l.clone(), json!(i))).collect();
            obj.insert("id2label".into(), Value::Object(id2label));
            obj.insert("label2id".into(), Value::Object(label2id));
        }
        Value::Object(obj)
    }

    /// Dropout before the classifier: `classifier_dropout`, else `hidden_dropout_prob`
    /// (as `BertForTokenClassification` does).
    pub fn classifier_dropout_prob(&self) -> f32 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }

    /// Size of one attention head (hidden_size / num_attention_heads).
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Parameters of the encoder (no head); saturating, so absurd sizes cannot overflow.
    fn parameter_count(&self) -> u128 {
        let (h, f) = (self.hidden_size as u128, self.intermediate_size as u128);
        let rows = self.vocab_size as u128 + self.max_position_embeddings as u128 + self.type_vocab_size as u128;
        let embeddings = rows.saturating_mul(h).saturating_add(2 * h);
        // q, k, v, output projections with biases; two LayerNorms; the feed-forward pair
        let layer = (h.saturating_mul(h) + h)
            .saturating_mul(4)
            .saturating_add(4 * h)
            .saturating_add(h.saturating_mul(f).saturating_mul(2))
            .saturating_add(f + h);
        embeddings.saturating_add((self.num_hidden_layers as u128).saturating_mul(layer))
    }

    /// Number of labels in `id2label`, if any.
    pub fn num_labels(&self) -> Option<usize> {
        self.id2label.as_ref().map(Vec::len)
    }

    fn check_ranges(&self, keys: &Keys) -> Result<()> {
        if self.num_hidden_layers > MAX_LAYERS {
            return Err(keys.bad(
                "num_hidden_layers",
                format!(
                    "{} is not a BERT/RoBERTa encoder this engine can hold (at most {MAX_LAYERS})",
                    self.num_hidden_layers
                ),
            ));
        }
        let params = self.parameter_count();
        if params > MAX_PARAMETERS {
            return Err(Error::file(
                keys.path,
                format!(
                    "vocab_size {}, hidden_size {}, intermediate_size {}, num_hidden_layers {} make {params} parameters, \
                     more than this engine can hold ({MAX_PARAMETERS})",
                    self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers
                ),
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(keys.bad(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if self.pad_token_id as usize >= self.vocab_size {
            return Err(keys.bad(
                "pad_token_id",
                format!("{} is not below vocab_size {}", self.pad_token_id, self.vocab_size),
            ));
        }
        // RoBERTa numbers positions from pad_token_id + 1, so the table must reach past it.
        if self.model_type == ModelType::Roberta && self.max_position_embeddings <= self.pad_token_id as usize + 1 {
            return Err(keys.bad(
                "max_position_embeddings",
                format!(
                    "{} leaves no room: RoBERTa positions start at pad_token_id + 1 = {}",
                    self.max_position_embeddings,
                    self.pad_token_id + 1
                ),
            ));
        }
        let probs = [
            ("hidden_dropout_prob", Some(self.hidden_dropout_prob)),
            ("attention_probs_dropout_prob", Some(self.attention_probs_dropout_prob)),
            ("classifier_dropout", self.classifier_dropout),
        ];
        for (key, p) in probs {
            if let Some(p) = p {
                if !(0.0..1.0).contains(&p) {
                    return Err(keys.bad(key, format!("{p} is not a probability in [0, 1)")));
                }
            }
        }
        for (key, v) in [
            ("layer_norm_eps", self.layer_norm_eps),
            ("initializer_range", self.initializer_range),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(keys.bad(key, format!("{v} must be a positive finite number")));
            }
        }
        Ok(())
    }
}

/// Typed access to the keys of one config object; every error names the file and key.
struct Keys<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Keys<'_> {
    fn bad(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        Error::file(self.path, format!("key `{key}`: {msg}"))
    }

    /// A key whose absence means "use the default": missing or JSON null.
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn model_type(&self) -> Result<ModelType> {
        let v = self
            .get("model_type")
            .ok_or_else(|| self.bad("model_type", format!("missing; supported: {}", ModelType::SUPPORTED)))?;
        let s = v
            .as_str()
            .ok_or_else(|| self.bad("model_type", format!("expected a string, found {v}")))?;
        ModelType::parse(s).ok_or_else(|| {
            self.bad(
                "model_type",
                format!("unsupported value \"{s}\"; supported: {}", ModelType::SUPPORTED),
            )
        })
    }

    /// A required size (> 0). Shape keys have no default, see the module doc.
    fn positive(&self, key: &str) -> Result<usize> {
        let v = self
            .get(key)
            .ok_or_else(|| self.bad(key, "missing (it fixes tensor shapes, so there is no safe default)"))?;
        let n = self.as_usize(key, v)?;
        if n == 0 {
            return Err(self.bad(key, "must be greater than 0"));
        }
        Ok(n)
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        self.get(key).map_or(Ok(default), |v| self.as_usize(key, v))
    }

    fn as_usize(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.bad(key, format!("expected a non-negative integer, found {v}")))
    }

    fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        Ok(self.opt_f32(key)?.unwrap_or(default))
    }

    fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| self.bad(key, format!("expected a number, found {v}"))),
        }
    }

    /// Keys whose only supported value is the one our kernels implement.
    fn check_fixed_choices(&self) -> Result<()> {
        let choices = [
            ("hidden_act", "gelu", "only \"gelu\" (erf form) is implemented"),
            (
                "position_embedding_type",
                "absolute",
                "only \"absolute\" position embeddings are implemented",
            ),
        ];
        for (key, want, why) in choices {
            let Some(v) = self.get(key) else { continue };
            if v.as_str() != Some(want) {
                return Err(self.bad(key, format!("unsupported value {v}; {why}")));
            }
        }
        Ok(())
    }

    /// `id2label` ({"0": "O", "1": "B-PER", ...}) as a Vec indexed by id, checked
    /// against `label2id` and `num_labels` when those are present.
    fn labels(&self) -> Result<Option<Vec<String>>> {
        let Some(v) = self.get("id2label") else {
            if self.get("label2id").is_some() {
                return Err(self.bad("label2id", "present without `id2label`"));
            }
            return Ok(None);
        };
        let map = v
            .as_object()
            .ok_or_else(|| self.bad("id2label", format!("expected an object, found {v}")))?;
        if map.is_empty() {
            return Err(self.bad("id2label", "is empty"));
        }
        let labels = self.labels_by_id(map)?;
        self.check_label2id(&labels)?;
        if let Some(n) = self.get("num_labels") {
            if self.as_usize("num_labels", n)? != labels.len() {
                return Err(self.bad(
                    "num_labels",
                    format!("{n} disagrees with id2label's {} labels", labels.len()),
                ));
            }
        }
        Ok(Some(labels))
    }

    fn labels_by_id(&self, map: &Map<String, Value>) -> Result<Vec<String>> {
        let n = map.len();
        let mut slots: Vec<Option<String>> = vec![None; n];
        for (k, v) in map {
            let id = k.parse::<usize>().ok().filter(|&id| id < n).ok_or_else(|| {
                self.bad(
                    "id2label",
                    format!("key \"{k}\" is not a label id; ids must be \"0\"..\"{}\"", n - 1),
                )
            })?;
            let label = v
                .as_str()
                .ok_or_else(|| self.bad("id2label", format!("label of id {id} is {v}, expected a string")))?;
            if slots[id].is_some() {
                return Err(self.bad("id2label", format!("id {id} appears twice")));
            }
            slots[id] = Some(label.to_string());
        }
        let labels: Vec<String> = slots.into_iter().flatten().collect();
        for (i, l) in labels.iter().enumerate() {
            if let Some(j) = labels[..i].iter().position(|m| m == l) {
                return Err(self.bad("id2label", format!("label \"{l}\" appears at ids {j} and {i}")));
            }
        }
        Ok(labels)
    }

    fn check_label2id(&self, labels: &[String]) -> Result<()> {
        let Some(v) = self.get("label2id") else {
            return Ok(());
        };
        let map = v
            .as_object()
            .ok_or_else(|| self.bad("label2id", format!("expected an object, found {v}")))?;
        if map.len() != labels.len() {
            return Err(self.bad(
                "label2id",
                format!("has {} labels but id2label has {}", map.len(), labels.len()),
            ));
        }
        for (id, label) in labels.iter().enumerate() {
            let found = map.get(label).and_then(Value::as_u64);
            if found != Some(id as u64) {
                let shown = map.get(label).map_or("nothing".to_string(), Value::to_string);
                return Err(self.bad(
                    "label2id",
                    format!("\"{label}\" maps to {shown}, but id2label gives it id {id}"),
                ));
            }
        }
        Ok(())
    }
}

/// An f32 as JSON. Keeps the original JSON number when it reads back to the same f32
/// (so 1e-12 stays 1e-12); otherwise writes the shortest decimal that round-trips,
/// never the widened f64 (0.1f32 would become 0.10000000149011612).
fn f32_to_json(original: Option<&Value>, x: f32) -> Value {
    if let Some(v) = original {
        if v.as_f64().map(|o| o as f32) == Some(x) {
            return v.clone();
        }
    }
    let shortest: f64 = x.to_string().parse().unwrap_or(x as f64);
    json!(shortest)
}

fn bert_json(layers: usize, hidden: usize, heads: usize, ffn: usize) -> Value {
    json!({
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": ffn,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "model_type": "bert",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "type_vocab_size": 2,
        "vocab_size": 30522
    })
}

fn roberta_base_json() -> Value {
    json!({
        "architectures": ["RobertaModel"],
        "attention_probs_dropout_prob": 0.1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 768,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-5,
        "max_position_embeddings": 514,
        "model_type": "roberta",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "position_embedding_type": "absolute",
        "type_vocab_size": 1,
        "vocab_size": 50265
    })
}
