//! The BERT/RoBERTa token classifier, written once against [`Backend`]: embeddings,
//! post-LN transformer layers, dropout, classification head and cross-entropy, with an
//! explicit forward and backward per layer. No autograd tape: every activation the
//! backward pass needs lives in a buffer planned up front for the largest batch
//! (`Model::new(.., max_tokens)`), and is reused by every step.
//!
//! Shapes: b sequences of t tokens, n = b*t rows; c hidden, h heads of d = c/h, f FFN
//! width, l labels. Weights keep the HF layout ([out, in] for linear layers), so a linear
//! layer is y = x W^T + bias.
//!
//! Precision (SPEC section 7, `backend::Precision`): in bf16 / fp16 every activation is
//! rounded (`Backend::quantize`) right after it is written (what the GEMMs, the attention
//! core, GELU and the LayerNorms read: SPEC's bf16 activations, as autocast stores them),
//! and in backward the incoming gradients the GEMMs read; the GEMMs read a rounded copy of
//! their weights (`Param::gemm_w`). The residual-stream gradient, LayerNorm statistics,
//! lse, logits, losses, weights, gradients and optimiser state stay fp32. Where
//! the op that writes such a buffer can round as it stores (LayerNorm, GELU and dropout,
//! forward and backward: their `rounding` argument), it does, and no separate pass runs;
//! the attention core rounds what it reads (q, k, v, its incoming gradient) and writes its
//! outputs (att, dq, dk, dv) rounded. Those buffers, and the weight copies, are allocated
//! with `Backend::alloc_rounded`: a backend may store them in 16 bits (the CUDA backend
//! does: half the memory and traffic, GEMM operands in their native type) with the same
//! results, since every value in them is seen rounded. In fp32 nothing is rounded and there
//! are no copies: the fp32 path is unchanged.
use crate::backend::{embedding_order, Backend, Dropout, Precision, IGNORE_INDEX};
use crate::model::checkpoint::{HostTensor, HostWeights};
use crate::model::config::ModelConfig;

/// The sizes the model needs (from config.json or a preset).
#[derive(Clone, Debug, PartialEq)]
pub struct Dims {
    pub vocab: usize,
    pub max_pos: usize,
    pub type_vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub ffn: usize,
    /// Number of labels of the classification head (0: encoder only).
    pub labels: usize,
    pub eps: f32,
    pub hidden_dropout: f32,
    pub attn_dropout: f32,
    pub classifier_dropout: f32,
}

impl Dims {
    /// The sizes of a model with `config` and a head of `labels` labels (0: none).
    pub fn from_config(cfg: &ModelConfig, labels: usize) -> Dims {
        Dims {
            vocab: cfg.vocab_size,
            max_pos: cfg.max_position_embeddings,
            type_vocab: cfg.type_vocab_size,
            hidden: cfg.hidden_size,
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            ffn: cfg.intermediate_size,
            labels,
            eps: cfg.layer_norm_eps,
            hidden_dropout: cfg.hidden_dropout_prob,
            attn_dropout: cfg.attention_probs_dropout_prob,
            classifier_dropout: cfg.classifier_dropout_prob(),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// (canonical HF name without model prefix, shape) of every parameter, in the order
    /// the model stores them: embeddings, layers, head.
    pub fn param_specs(&self) -> Vec<(String, Vec<usize>)> {
        let (c, f) = (self.hidden, self.ffn);
        let mut v = vec![
            ("embeddings.word_embeddings.weight".to_string(), vec![self.vocab, c]),
            (
                "embeddings.position_embeddings.weight".to_string(),
                vec![self.max_pos, c],
            ),
            (
                "embeddings.token_type_embeddings.weight".to_string(),
                vec![self.type_vocab, c],
            ),
            ("embeddings.LayerNorm.weight".to_string(), vec![c]),
            ("embeddings.LayerNorm.bias".to_string(), vec![c]),
        ];
        for i in 0..self.layers {
            let p = format!("encoder.layer.{i}.");
            for (name, out, inp) in [
                ("attention.self.query", c, c),
                ("attention.self.key", c, c),
                ("attention.self.value", c, c),
                ("attention.output.dense", c, c),
                ("attention.output.LayerNorm", c, 0),
                ("intermediate.dense", f, c),
                ("output.dense", c, f),
                ("output.LayerNorm", c, 0),
            ] {
                let wshape = if inp == 0 { vec![out] } else { vec![out, inp] };
                v.push((format!("{p}{name}.weight"), wshape));
                v.push((format!("{p}{name}.bias"), vec![out]));
            }
        }
        if self.labels > 0 {
            v.push(("classifier.weight".to_string(), vec![self.labels, c]));
            v.push(("classifier.bias".to_string(), vec![self.labels]));
        }
        v
    }

    /// Dropout sites, one id each so every site of a step draws its own mask.
    fn site_embeddings() -> u32 {
        0
    }
    fn site_attn_probs(layer: usize) -> u32 {
        1 + 3 * layer as u32
    }
    fn site_attn_out(layer: usize) -> u32 {
        2 + 3 * layer as u32
    }
    fn site_ffn_out(layer: usize) -> u32 {
        3 + 3 * layer as u32
    }
    fn site_classifier(&self) -> u32 {
        1 + 3 * self.layers as u32
    }
}

/// A parameter: weights and their accumulated gradient.
pub struct Param<B: Backend> {
    pub name: String,
    pub shape: Vec<usize>,
    pub w: B::Buf,
    pub g: B::Buf,
    /// bf16 / fp16 mode, GEMM weights only: `w` rounded to that precision (the copy a
    /// mixed-precision GEMM reads; `w` stays the fp32 master). Written by the optimiser in
    /// its update pass, or by the next forward pass when the weights changed otherwise
    /// (`Params::low_fresh`).
    low: Option<B::Buf>,
}

impl<B: Backend> Param<B> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The weights as a GEMM sees them: the rounded copy in bf16 / fp16, else `w`.
    pub fn gemm_w(&self) -> &B::Buf {
        self.low.as_ref().unwrap_or(&self.w)
    }

    /// Weights, gradient and the rounded GEMM copy (if any) at once, for the optimiser.
    pub fn update_parts(&mut self) -> (&mut B::Buf, &B::Buf, Option<&mut B::Buf>) {
        (&mut self.w, &self.g, self.low.as_mut())
    }
}

/// weight + bias (a linear layer or a LayerNorm).
pub struct Affine<B: Backend> {
    pub w: Param<B>,
    pub b: Param<B>,
}

pub struct LayerParams<B: Backend> {
    pub q: Affine<B>,
    pub k: Affine<B>,
    pub v: Affine<B>,
    pub attn_out: Affine<B>,
    pub ln1: Affine<B>,
    pub inter: Affine<B>,
    pub out: Affine<B>,
    pub ln2: Affine<B>,
}

pub struct Params<B: Backend> {
    pub wte: Param<B>,
    pub wpe: Param<B>,
    pub wtt: Param<B>,
    pub emb_ln: Affine<B>,
    pub layers: Vec<LayerParams<B>>,
    pub classifier: Option<Affine<B>>,
    /// The rounded GEMM copies (`Param::low`) hold the current weights: set by the
    /// optimiser after an update that wrote them, cleared by anything that may change the
    /// weights otherwise (`iter_mut`, `Model::with_precision`). When clear, the next forward
    /// pass rounds them anew.
    low_fresh: bool,
}

impl<B: Backend> Params<B> {
    /// Every parameter in `Dims::param_specs` order.
    pub fn iter(&self) -> Vec<&Param<B>> {
        let mut v = vec![&self.wte, &self.wpe, &self.wtt, &self.emb_ln.w, &self.emb_ln.b];
        for l in &self.layers {
            for a in [&l.q, &l.k, &l.v, &l.attn_out, &l.ln1, &l.inter, &l.out, &l.ln2] {
                v.push(&a.w);
                v.push(&a.b);
            }
        }
        if let Some(c) = &self.classifier {
            v.push(&c.w);
            v.push(&c.b);
        }
        v
    }

    /// Every parameter in `Dims::param_specs` order, writable: the rounded GEMM copies count
    /// as stale from here on (see `low_fresh`).
    pub fn iter_mut(&mut self) -> Vec<&mut Param<B>> {
        self.low_fresh = false;
        let mut v = vec![
            &mut self.wte,
            &mut self.wpe,
            &mut self.wtt,
            &mut self.emb_ln.w,
            &mut self.emb_ln.b,
        ];
        for l in &mut self.layers {
            for a in [
                &mut l.q,
                &mut l.k,
                &mut l.v,
                &mut l.attn_out,
                &mut l.ln1,
                &mut l.inter,
                &mut l.out,
                &mut l.ln2,
            ] {
                v.push(&mut a.w);
                v.push(&mut a.b);
            }
        }
        if let Some(c) = &mut self.classifier {
            v.push(&mut c.w);
            v.push(&mut c.b);
        }
        v
    }
}

/// Activations of one transformer layer, kept for backward.
struct LayerActs<B: Backend> {
    q: B::Buf,     // [n, c]
    k: B::Buf,     // [n, c]
    v: B::Buf,     // [n, c]
    att: B::Buf,   // [n, c] attention output before the output projection
    lse: B::Buf,   // [b, h, t]
    ao: B::Buf,    // [n, c] output projection (with bias)
    x1: B::Buf,    // [n, c] LN(dropout(ao) + x_in); the dropped ao is never stored
    mean1: B::Buf, // [n]
    rstd1: B::Buf, // [n]
    f1: B::Buf,    // [n, f] x1 W_i^T (bias added inside bias_gelu)
    g: B::Buf,     // [n, f] gelu(f1 + b_i)
    f2: B::Buf,    // [n, c] g W_o^T + b_o
    x2: B::Buf,    // [n, c] LN(dropout(f2) + x1): the layer output
    mean2: B::Buf,
    rstd2: B::Buf,
}

struct Acts<B: Backend> {
    ids: B::IBuf,
    pos: B::IBuf,
    types: B::IBuf,
    /// `backend::embedding_order` of ids, pos, types [3n], for the embedding backward.
    emb_order: B::IBuf,
    labels: B::IBuf,
    /// Sequence offsets [b+1] of the packed batch (`HostBatch::seqs`).
    seqs: B::IBuf,
    /// The token rows `Model::forward_rows` keeps [<= n].
    rows: B::IBuf,
    // emb .. emb_rstd: the embedded tokens (a repeated sequence's once, `HostBatch::dup`)
    emb: B::Buf,      // [ne, c] sum of the three embeddings
    emb_ln: B::Buf,   // [ne, c]
    emb_mean: B::Buf, // [ne]
    emb_rstd: B::Buf, // [ne]
    x0: B::Buf,       // [n, c] after dropout (both views of a repeat): input of layer 0
    layers: Vec<LayerActs<B>>,
    head_in: B::Buf, // [n, c] dropout(final hidden)
    logits: B::Buf,  // [n, l]
    losses: B::Buf,  // [n]
}

/// Gradient scratch, overwritten every backward pass.
struct GradScratch<B: Backend> {
    dx: B::Buf,   // [n, c] gradient flowing into the current layer's output
    dsum: B::Buf, // [n, c] gradient of a LayerNorm input (residual sum)
    dtmp: B::Buf, // [n, c]
    dq: B::Buf,
    dk: B::Buf,
    dv: B::Buf,
    datt: B::Buf,
    dg: B::Buf,      // [n, f]
    df: B::Buf,      // [n, f]
    dlogits: B::Buf, // [n, l]
}

/// One batch on the host: b sequences packed one after another with no padding
/// (FlashAttention's "varlen" layout): sequence r is tokens seqs[r] .. seqs[r+1] of the
/// per-token fields, which all hold n = seqs[b] entries. Every op but attention works on
/// the n tokens as rows; attention keeps each token within its sequence. A batch of short
/// sentences then costs its real tokens, not b times the longest.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostBatch {
    pub b: usize,
    /// The longest sequence (every length is <= t).
    pub t: usize,
    /// Token offsets of the sequences [b+1]: seqs[0] = 0, seqs[b] = n.
    pub seqs: Vec<i32>,
    /// Sequences 0 .. dup are repeated as sequences dup .. 2 dup, token for token (the
    /// DeepCUT step's two dropout views of each forget sentence). The model embeds them
    /// once and the dropout-duplicate pass makes both views from that one embedding
    /// (`Backend::dropout_duplicate`); every later op sees them as separate sequences with
    /// their own masks. 0: no repeats.
    pub dup: usize,
    pub input_ids: Vec<i32>,
    pub position_ids: Vec<i32>,
    pub type_ids: Vec<i32>,
    /// Label id per token, IGNORE_INDEX where no loss is taken.
    pub labels: Vec<i32>,
}

impl HostBatch {
    /// A batch of b sequences of t pseudo-random tokens and labels each, for benches: a
    /// step's cost does not depend on the values (models/README.md).
    pub fn synthetic(b: usize, t: usize, vocab: usize, labels: usize, seed: u64) -> HostBatch {
        let mut batch = HostBatch {
            b,
            t,
            ..Default::default()
        };
        let mut rng = crate::util::Lcg::new(seed.wrapping_add(12345));
        for _ in 0..b * t {
            let x = rng.next_state();
            batch.input_ids.push(((x >> 33) % vocab as u64) as i32);
            batch.labels.push(((x >> 20) % labels.max(1) as u64) as i32);
        }
        batch.seqs = (0..=b).map(|r| (r * t) as i32).collect();
        batch.position_ids = (0..b * t).map(|i| (i % t) as i32).collect();
        batch.type_ids = vec![0; b * t];
        batch
    }

    /// Number of tokens, n (all real: the batch is packed).
    pub fn tokens(&self) -> usize {
        self.input_ids.len()
    }

    /// Token range of sequence r.
    pub fn span(&self, r: usize) -> std::ops::Range<usize> {
        self.seqs[r] as usize..self.seqs[r + 1] as usize
    }

    /// Checks what the kernels index by: b + 1 offsets from 0 to n, none decreasing, no
    /// sequence longer than t, every per-token field n long. The CUDA kernels trust the
    /// offsets (reading them back would cost a synchronisation), so a batch is checked here
    /// on the host before it is uploaded.
    pub fn check(&self) -> Result<(), String> {
        let n = self.input_ids.len();
        if self.seqs.len() != self.b + 1 {
            return Err(format!("{} sequence offsets for {} sequences", self.seqs.len(), self.b));
        }
        if self.seqs[0] != 0 || self.seqs[self.b] as usize != n {
            return Err(format!(
                "offsets run from {} to {}, not 0 to n = {n}",
                self.seqs[0], self.seqs[self.b]
            ));
        }
        for r in 0..self.b {
            let len = self.seqs[r + 1] - self.seqs[r];
            if len < 0 || len as usize > self.t {
                return Err(format!("sequence {r} has {len} tokens (t = {})", self.t));
            }
        }
        if 2 * self.dup > self.b {
            return Err(format!("{} repeated sequences in a batch of {}", self.dup, self.b));
        }
        let nd = self.seqs[self.dup] as usize;
        if self.dup > 0 {
            for r in 0..self.dup {
                if self.span(r).len() != self.span(self.dup + r).len() {
                    return Err(format!("sequence {} is not a repeat of sequence {r}", self.dup + r));
                }
            }
            let same = |x: &[i32]| x.len() >= 2 * nd && x[..nd] == x[nd..2 * nd];
            if !(same(&self.input_ids) && same(&self.position_ids) && same(&self.type_ids)) {
                return Err(format!(
                    "sequences {}..{} are not token for token repeats of 0..{}",
                    self.dup,
                    2 * self.dup,
                    self.dup
                ));
            }
        }
        for (name, len) in [
            ("position_ids", self.position_ids.len()),
            ("type_ids", self.type_ids.len()),
            ("labels", self.labels.len()),
        ] {
            if len != n {
                return Err(format!("{name} holds {len} entries for {n} tokens"));
            }
        }
        Ok(())
    }
    /// Number of tokens that carry a label.
    pub fn labelled(&self) -> usize {
        self.labels.iter().filter(|&&y| y != IGNORE_INDEX).count()
    }
}

/// The shape and mode of a forward pass, which its backward replays.
#[derive(Clone, Copy, Debug)]
struct Pass {
    /// Sequences, tokens, the longest sequence.
    b: usize,
    n: usize,
    t: usize,
    /// Tokens of the repeated sequences (`HostBatch::dup`), embedded once.
    dup_tokens: usize,
    mode: Mode,
    /// Rows of the outputs (final hidden states, logits, token losses): n, or the rows
    /// `Model::forward_rows` kept.
    out_rows: usize,
}

/// Training (dropout on, keyed by seed and step) or evaluation.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    Eval,
    Train { seed: u64, step: u64 },
}

/// The dropout of `site` in `mode`: off in evaluation, keyed by (seed, step, site) in training.
fn dropout_for(mode: Mode, p: f32, site: u32) -> Dropout {
    match mode {
        Mode::Eval => Dropout::OFF,
        Mode::Train { seed, step } => Dropout::new(p, seed, step, site),
    }
}

/// Backward of a linear layer y = x W^T + b (W [out, inp]) from dy [n, out], in this
/// order: W.g += dy^T x; b.g += the column sums of dy (skipped when `bias` is false: a
/// fused op already summed them, as bias_gelu_bwd does); dx = dy W + dx_beta dx (beta 1
/// adds into a residual gradient in the GEMM instead of a separate pass). The GEMMs read
/// the weights' rounded copy in 16-bit modes (`Param::gemm_w`).
#[allow(clippy::too_many_arguments)]
fn linear_bwd<B: Backend>(
    be: &B, lin: &mut Affine<B>, bias: bool, dy: &B::Buf, x: &B::Buf, dx: &mut B::Buf, dx_beta: f32, n: usize,
    inp: usize, out: usize, precision: Precision,
) {
    be.gemm(&mut lin.w.g, dy, x, out, inp, n, true, false, 1.0, 1.0, precision);
    if bias {
        be.bias_grad(&mut lin.b.g, dy, n, out);
    }
    be.gemm(
        dx,
        dy,
        lin.w.gemm_w(),
        n,
        inp,
        out,
        false,
        false,
        1.0,
        dx_beta,
        precision,
    );
}

pub struct Model<B: Backend> {
    pub be: B,
    pub dims: Dims,
    pub params: Params<B>,
    acts: Acts<B>,
    scratch: GradScratch<B>,
    max_tokens: usize,
    /// The last forward pass (backward replays its dropout masks).
    cur: Option<Pass>,
    precision: Precision,
    /// What the training steps multiply their loss-gradient seeds by (fp16 dynamic loss
    /// scaling, set each step from `Optimizer::loss_scale`); 1 otherwise.
    loss_scale: f32,
    /// Staging buffers `infer::run_windows` copies logits and losses back through, with
    /// their sizes in floats, kept between its calls: the stopping rule evaluates every few
    /// steps, and on CUDA each new one is page-locked memory (a driver call to lock it and
    /// one to unlock it).
    eval_staging: Vec<(usize, B::Staging)>,
}

impl<B: Backend> Model<B> {
    /// Builds the model, asking `init(name, shape)` for each parameter's values
    /// (in `Dims::param_specs` order), and plans activations for batches of up to
    /// `max_tokens` tokens (packed: n real tokens, however many sequences).
    pub fn new(be: B, dims: Dims, max_tokens: usize, mut init: impl FnMut(&str, &[usize]) -> Vec<f32>) -> Self {
        let mut all = dims.param_specs().into_iter().map(|(name, shape)| {
            let data = init(&name, &shape);
            assert_eq!(data.len(), shape.iter().product::<usize>(), "init of {name}");
            let mut w = be.alloc(data.len());
            be.upload(&mut w, &data);
            Param {
                g: be.alloc(data.len()),
                w,
                name,
                shape,
                low: None,
            }
        });
        let mut next = || all.next().expect("param_specs lists every parameter");
        let wte = next();
        let wpe = next();
        let wtt = next();
        let emb_ln = Affine { w: next(), b: next() };
        let layers = (0..dims.layers)
            .map(|_| {
                let mut a = || Affine { w: next(), b: next() };
                LayerParams {
                    q: a(),
                    k: a(),
                    v: a(),
                    attn_out: a(),
                    ln1: a(),
                    inter: a(),
                    out: a(),
                    ln2: a(),
                }
            })
            .collect();
        let classifier = (dims.labels > 0).then(|| Affine { w: next(), b: next() });
        let params = Params {
            wte,
            wpe,
            wtt,
            emb_ln,
            layers,
            classifier,
            low_fresh: false,
        };

        let (n, c, f, l) = (max_tokens, dims.hidden, dims.ffn, dims.labels.max(1));
        let nh = n * dims.heads;
        let layer_acts = (0..dims.layers)
            .map(|_| LayerActs {
                q: be.alloc(n * c),
                k: be.alloc(n * c),
                v: be.alloc(n * c),
                att: be.alloc(n * c),
                lse: be.alloc(nh),
                ao: be.alloc(n * c),
                x1: be.alloc(n * c),
                mean1: be.alloc(n),
                rstd1: be.alloc(n),
                f1: be.alloc(n * f),
                g: be.alloc(n * f),
                f2: be.alloc(n * c),
                x2: be.alloc(n * c),
                mean2: be.alloc(n),
                rstd2: be.alloc(n),
            })
            .collect();
        let acts = Acts {
            ids: be.alloc_i32(n),
            pos: be.alloc_i32(n),
            types: be.alloc_i32(n),
            emb_order: be.alloc_i32(3 * n),
            labels: be.alloc_i32(n),
            seqs: be.alloc_i32(n + 1),
            rows: be.alloc_i32(n),
            emb: be.alloc(n * c),
            emb_ln: be.alloc(n * c),
            emb_mean: be.alloc(n),
            emb_rstd: be.alloc(n),
            x0: be.alloc(n * c),
            layers: layer_acts,
            head_in: be.alloc(n * c),
            logits: be.alloc(n * l),
            losses: be.alloc(n),
        };
        let scratch = GradScratch {
            dx: be.alloc(n * c),
            dsum: be.alloc(n * c),
            dtmp: be.alloc(n * c),
            dq: be.alloc(n * c),
            dk: be.alloc(n * c),
            dv: be.alloc(n * c),
            datt: be.alloc(n * c),
            dg: be.alloc(n * f),
            df: be.alloc(n * f),
            dlogits: be.alloc(n * l),
        };
        Model {
            be,
            dims,
            params,
            acts,
            scratch,
            max_tokens,
            cur: None,
            precision: Precision::Fp32,
            loss_scale: 1.0,
            eval_staging: Vec::new(),
        }
    }

    /// A staging buffer of at least `n` floats (with its size): one given back by
    /// `give_staging`, else a new one.
    pub fn take_staging(&mut self, n: usize) -> (usize, B::Staging) {
        match self.eval_staging.iter().position(|(len, _)| *len >= n) {
            Some(i) => self.eval_staging.swap_remove(i),
            None => (n, self.be.staging(n)),
        }
    }

    /// Keeps `s` for a later `take_staging`: the four largest are kept.
    pub fn give_staging(&mut self, s: (usize, B::Staging)) {
        self.eval_staging.push(s);
        if self.eval_staging.len() > 4 {
            self.eval_staging.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
            self.eval_staging.truncate(4);
        }
    }

    /// The model computing in `precision` (fp32 when built): in bf16 / fp16 every GEMM
    /// weight gets a rounded copy next to its fp32 master.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        let be = &self.be;
        let p = &mut self.params;
        let mut gemm_weights: Vec<&mut Param<B>> = vec![];
        for l in &mut p.layers {
            for a in [&mut l.q, &mut l.k, &mut l.v, &mut l.attn_out, &mut l.inter, &mut l.out] {
                gemm_weights.push(&mut a.w);
            }
        }
        if let Some(c) = &mut p.classifier {
            gemm_weights.push(&mut c.w);
        }
        for w in gemm_weights {
            w.low = (precision != Precision::Fp32).then(|| be.alloc_rounded(w.numel(), precision));
        }
        p.low_fresh = false;
        // The activations every reader sees rounded (module docs) may live in 16 bits
        // (`Backend::alloc_rounded`): what the GEMMs and the attention core read, what they
        // write for a reader that rounds (q, k, v, datt), and the GEMM outputs that are
        // rounded as activations (ao, f1, f2, dg: `quantize` after the GEMM, no pass when
        // the buffer is 16-bit). Rounding these four as well moved the MiniLM bf16 step's
        // worst tensor from 1.97e-2 to 2.02e-2 of fp32 (tests/precision.rs), run F1 by <0.2.
        let (n, c, f, l) = (
            self.max_tokens,
            self.dims.hidden,
            self.dims.ffn,
            self.dims.labels.max(1),
        );
        let low = |len: usize| be.alloc_rounded(len, precision);
        let a = &mut self.acts;
        a.x0 = low(n * c);
        a.head_in = low(n * c);
        for la in &mut a.layers {
            for buf in [
                &mut la.q,
                &mut la.k,
                &mut la.v,
                &mut la.att,
                &mut la.ao,
                &mut la.x1,
                &mut la.f2,
                &mut la.x2,
            ] {
                *buf = low(n * c);
            }
            la.f1 = low(n * f);
            la.g = low(n * f);
        }
        let s = &mut self.scratch;
        for buf in [&mut s.dtmp, &mut s.dq, &mut s.dk, &mut s.dv, &mut s.datt] {
            *buf = low(n * c);
        }
        s.dg = low(n * f);
        s.df = low(n * f);
        s.dlogits = low(n * l);
        self
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The backend line of a report: the backend's name, and the precision unless fp32.
    pub fn backend_line(&self) -> String {
        match self.precision {
            Precision::Fp32 => self.be.name(),
            p => format!("{}; precision {}", self.be.name(), p.describe()),
        }
    }

    /// See the field: the training loop sets it before each step.
    pub fn set_loss_scale(&mut self, scale: f32) {
        self.loss_scale = scale;
    }

    pub fn loss_scale(&self) -> f32 {
        self.loss_scale
    }

    /// Rounds every GEMM weight's master into its low-precision copy (no-op in fp32, and
    /// when the optimiser already wrote the copies with the weights they hold).
    fn refresh_gemm_weights(&mut self) {
        if self.params.low_fresh || self.precision == Precision::Fp32 {
            return;
        }
        let (be, precision) = (&self.be, self.precision);
        for p in self.params.iter_mut() {
            let n = p.numel();
            if let Some(low) = &mut p.low {
                be.copy(low, &p.w, n);
                be.quantize(low, n, precision);
            }
        }
        self.params.low_fresh = true;
    }

    /// The optimiser wrote every rounded GEMM copy from the weights it just stored.
    pub fn mark_gemm_weights_fresh(&mut self) {
        self.params.low_fresh = true;
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Parameter values on the host, in `param_specs` order: (name, shape, data).
    pub fn export(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        self.params
            .iter()
            .into_iter()
            .map(|p| (p.name.clone(), p.shape.clone(), self.be.download(&p.w, p.numel())))
            .collect()
    }

    /// Gradients on the host, in `param_specs` order.
    pub fn export_grads(&self) -> Vec<(String, Vec<f32>)> {
        self.params
            .iter()
            .into_iter()
            .map(|p| (p.name.clone(), self.be.download(&p.g, p.numel())))
            .collect()
    }

    /// Parameter values as host weights (for saving a checkpoint or a model folder).
    pub fn to_host(&self) -> HostWeights {
        let mut w = HostWeights::default();
        for (name, shape, data) in self.export() {
            w.insert(name, HostTensor { shape, data });
        }
        w
    }

    /// Overwrites every parameter with `get(name)` (in `param_specs` order).
    pub fn load_params<'a>(&mut self, mut get: impl FnMut(&str) -> &'a [f32]) {
        let be = &self.be;
        for p in self.params.iter_mut() {
            let data = get(&p.name);
            assert_eq!(data.len(), p.numel(), "load_params: {}", p.name);
            be.upload(&mut p.w, data);
        }
    }

    pub fn zero_grads(&mut self) {
        let mut grads: Vec<(&mut B::Buf, usize)> = self
            .params
            .iter_mut()
            .into_iter()
            .map(|p| {
                let n = p.numel();
                (&mut p.g, n)
            })
            .collect();
        self.be.zero_all(&mut grads);
    }

    /// Runs the encoder (and the head, when there is one) on `batch`.
    pub fn forward(&mut self, batch: &HostBatch, mode: Mode) {
        self.forward_impl(batch, mode, None)
    }

    /// An evaluation pass (no dropout) whose outputs are those of the token rows `rows` of
    /// `batch` alone, in that order: final hidden states, logits and token losses
    /// [rows.len(), ..], each row what `forward` gives it (up to the GEMMs' summation order
    /// for a different row count). Attention needs every token's keys and values, so all
    /// layers but the last run on all n tokens; the last runs its attention core on all of
    /// them and its output projection, LayerNorms, feed-forward and the head on `rows` only.
    /// An evaluation reads the logits of each word's first sub-word (`run_windows`): on
    /// WNUT17's sentences 62% of the tokens, which takes ~3% off a MiniLM pass on the CPU
    /// (BENCHMARKS.md, twenty-eighth session). No backward follows it.
    pub fn forward_rows(&mut self, batch: &HostBatch, rows: &[i32]) {
        let n = batch.tokens();
        if let Some(bad) = rows.iter().find(|&&r| r < 0 || r as usize >= n) {
            panic!("forward_rows: row {bad} of a batch of {n} tokens");
        }
        assert!(self.dims.layers > 0, "forward_rows: a model with no layers");
        self.forward_impl(batch, Mode::Eval, Some(rows))
    }

    fn forward_impl(&mut self, batch: &HostBatch, mode: Mode, keep: Option<&[i32]>) {
        if let Err(e) = batch.check() {
            panic!("forward: malformed batch: {e}");
        }
        let (b, n, t) = (batch.b, batch.tokens(), batch.t);
        assert!(
            n <= self.max_tokens && b <= self.max_tokens,
            "batch of {n} tokens in {b} sequences exceeds the planned {}",
            self.max_tokens
        );
        let out_rows = keep.map_or(n, <[i32]>::len);
        self.refresh_gemm_weights();
        let precision = self.precision;
        let d = &self.dims;
        let (c, f, h, hd) = (d.hidden, d.ffn, d.heads, d.head_dim());
        let be = &self.be;
        let a = &mut self.acts;
        let p = &self.params;
        // The embedded tokens: a repeated sequence's tokens once (`HostBatch::dup`).
        let nd = batch.seqs[batch.dup] as usize;
        let ne = n - nd;
        let embedded = |x: &[i32]| -> Vec<i32> { x[..nd].iter().chain(&x[2 * nd..]).copied().collect() };
        let (ids, pos, types) = (
            embedded(&batch.input_ids),
            embedded(&batch.position_ids),
            embedded(&batch.type_ids),
        );
        be.upload_i32(&mut a.ids, &ids);
        be.upload_i32(&mut a.pos, &pos);
        be.upload_i32(&mut a.types, &types);
        // the embedding backward's scatter order, sorted here where the indices are on the host
        be.upload_i32(&mut a.emb_order, &embedding_order(&ids, &pos, &types));
        be.upload_i32(&mut a.seqs, &batch.seqs);
        match keep {
            Some(rows) => {
                be.upload_i32(&mut a.rows, rows);
                let labels: Vec<i32> = rows.iter().map(|&r| batch.labels[r as usize]).collect();
                be.upload_i32(&mut a.labels, &labels);
            }
            None => be.upload_i32(&mut a.labels, &batch.labels),
        }

        let _fwd = be.profile_range(format_args!("forward"));
        let emb_range = be.profile_range(format_args!("embeddings fwd"));
        // Embeddings -> LayerNorm (ne tokens) -> dropout, which writes both views of a
        // repeated sequence (n tokens)
        be.embedding_fwd(
            &mut a.emb, &a.ids, &a.pos, &a.types, &p.wte.w, &p.wpe.w, &p.wtt.w, ne, c,
        );
        be.layernorm_fwd(
            &mut a.emb_ln,
            &mut a.emb_mean,
            &mut a.emb_rstd,
            &a.emb,
            None,
            &p.emb_ln.w.w,
            &p.emb_ln.b.w,
            ne,
            c,
            d.eps,
            Precision::Fp32,
        );
        let drop = dropout_for(mode, d.hidden_dropout, Dims::site_embeddings());
        if nd > 0 {
            be.dropout_duplicate(&mut a.x0, &a.emb_ln, nd * c, ne * c, drop, precision);
        } else {
            be.dropout_fwd(&mut a.x0, &a.emb_ln, n * c, drop, precision);
        }

        std::mem::drop(emb_range);
        for li in 0..d.layers {
            let _layer = be.profile_range(format_args!("layer {li} fwd"));
            let (done, rest) = a.layers.split_at_mut(li);
            let x_in = if li == 0 { &a.x0 } else { &done[li - 1].x2 };
            let la = &mut rest[0];
            let lp = &p.layers[li];
            // Self-attention: q, k, v projections, fused attention core, output projection.
            // (q, k, v unrounded: the attention core rounds what it reads)
            for (out, w) in [(&mut la.q, &lp.q), (&mut la.k, &lp.k), (&mut la.v, &lp.v)] {
                be.gemm_bias(out, x_in, w.w.gemm_w(), &w.b.w, n, c, c, false, true, precision);
            }
            let drop_p = dropout_for(mode, d.attn_dropout, Dims::site_attn_probs(li));
            be.attention_fwd(
                &mut la.att,
                &mut la.lse,
                &la.q,
                &la.k,
                &la.v,
                &a.seqs,
                b,
                n,
                t,
                h,
                hd,
                drop_p,
                precision,
            ); // att written rounded

            // The rest of the layer is row by row: on the last layer of `forward_rows`, the
            // kept rows alone. q and k are dead once the attention core has run (and no
            // backward follows such a pass), so they take the kept rows of its output and
            // of the residual.
            let keep_here = keep.filter(|_| li + 1 == d.layers);
            let r = keep_here.map_or(n, <[i32]>::len);
            if keep_here.is_some() {
                be.gather_rows(&mut la.q, &la.att, &a.rows, r, c);
                be.gather_rows(&mut la.k, x_in, &a.rows, r, c);
            }
            let (att, x_in) = if keep_here.is_some() {
                (&la.q, &la.k)
            } else {
                (&la.att, x_in)
            };
            be.gemm_bias(
                &mut la.ao,
                att,
                lp.attn_out.w.gemm_w(),
                &lp.attn_out.b.w,
                r,
                c,
                c,
                false,
                true,
                precision,
            );
            be.quantize(&mut la.ao, r * c, precision); // a 16-bit activation (no-op if stored so)
            let drop_a = dropout_for(mode, d.hidden_dropout, Dims::site_attn_out(li));
            be.dropout_layernorm_fwd(
                &mut la.x1,
                &mut la.mean1,
                &mut la.rstd1,
                &la.ao,
                drop_a,
                Some(x_in),
                &lp.ln1.w.w,
                &lp.ln1.b.w,
                r,
                c,
                d.eps,
                precision,
            );
            // Feed-forward: x1 -> gelu(x1 W_i^T + b_i) -> W_o -> dropout -> LN(+ x1)
            be.gemm(
                &mut la.f1,
                &la.x1,
                lp.inter.w.gemm_w(),
                r,
                f,
                c,
                false,
                true,
                1.0,
                0.0,
                precision,
            );
            be.quantize(&mut la.f1, r * f, precision);
            be.bias_gelu_fwd(&mut la.g, &la.f1, &lp.inter.b.w, r, f, precision);
            be.gemm_bias(
                &mut la.f2,
                &la.g,
                lp.out.w.gemm_w(),
                &lp.out.b.w,
                r,
                c,
                f,
                false,
                true,
                precision,
            );
            be.quantize(&mut la.f2, r * c, precision);
            let drop_f = dropout_for(mode, d.hidden_dropout, Dims::site_ffn_out(li));
            be.dropout_layernorm_fwd(
                &mut la.x2,
                &mut la.mean2,
                &mut la.rstd2,
                &la.f2,
                drop_f,
                Some(&la.x1),
                &lp.ln2.w.w,
                &lp.ln2.b.w,
                r,
                c,
                d.eps,
                precision,
            );
        }

        if let Some(cls) = &p.classifier {
            let _head = be.profile_range(format_args!("head fwd"));
            let l = d.labels;
            let hidden = a.layers.last().map_or(&a.x0, |la| &la.x2);
            let drop = dropout_for(mode, d.classifier_dropout, d.site_classifier());
            be.dropout_fwd(&mut a.head_in, hidden, out_rows * c, drop, precision);
            be.gemm_bias(
                &mut a.logits,
                &a.head_in,
                cls.w.gemm_w(),
                &cls.b.w,
                out_rows,
                l,
                c,
                false,
                true,
                precision,
            );
        }
        self.cur = Some(Pass {
            b,
            n,
            t,
            dup_tokens: nd,
            mode,
            out_rows,
        });
    }

    fn current(&self) -> Pass {
        self.cur.expect("forward must run before this call")
    }

    /// Final hidden states [n, c] of the last forward pass (the device buffer; the kept rows
    /// after `forward_rows`).
    pub fn hidden(&self) -> &B::Buf {
        self.acts.layers.last().map_or(&self.acts.x0, |la| &la.x2)
    }

    /// Final hidden states of the last forward pass, on the host.
    pub fn hidden_host(&self) -> Vec<f32> {
        let n = self.current().out_rows;
        self.be.download(self.hidden(), n * self.dims.hidden)
    }

    /// Logits [n, l] of the last forward pass, on the host (the kept rows' after
    /// `forward_rows`, as every output below).
    pub fn logits_host(&self) -> Vec<f32> {
        let n = self.current().out_rows;
        self.be.download(&self.acts.logits, n * self.dims.labels)
    }

    /// `logits_host` started into `dst` (`Backend::download_start`) without waiting;
    /// returns n * l, the count to `download_wait` for.
    pub fn logits_start(&self, dst: &mut B::Staging) -> usize {
        let n = self.current().out_rows;
        let nl = n * self.dims.labels;
        self.be.download_start(dst, &self.acts.logits, nl);
        nl
    }

    /// Per-token cross-entropy [n] of the last forward pass (0 on ignored tokens).
    pub fn token_losses(&mut self) -> Vec<f32> {
        let n = self.token_losses_enqueue();
        self.be.download(&self.acts.losses, n)
    }

    /// `token_losses` started into `dst` (`Backend::download_start`) without waiting;
    /// returns n, the count to `download_wait` for.
    pub fn token_losses_start(&mut self, dst: &mut B::Staging) -> usize {
        let n = self.token_losses_enqueue();
        self.be.download_start(dst, &self.acts.losses, n);
        n
    }

    fn token_losses_enqueue(&mut self) -> usize {
        let n = self.current().out_rows;
        let _r = self.be.profile_range(format_args!("loss: cross-entropy"));
        self.be.softmax_ce_fwd(
            &mut self.acts.losses,
            &self.acts.logits,
            &self.acts.labels,
            n,
            self.dims.labels,
        );
        n
    }

    /// Mean cross-entropy over labelled tokens (HF's CrossEntropyLoss(ignore_index=-100)).
    /// Summed in f64 on the host so the value does not depend on the thread count.
    pub fn ce_loss(&mut self, batch: &HostBatch) -> f32 {
        mean_ce(&self.token_losses(), batch.labelled())
    }

    /// Backward pass of the last forward. The loss is `ce_scale * sum(token CE)` (pass
    /// 1/labelled for the mean, 0 for none) plus any loss whose gradient w.r.t. the final
    /// hidden states is `dhidden` [n, c] (the contrastive term enters here).
    /// Parameter gradients are accumulated; call `zero_grads` first.
    pub fn backward(&mut self, ce_scale: f32, dhidden: Option<&B::Buf>) {
        let Pass {
            b,
            n,
            t,
            dup_tokens: nd,
            mode,
            out_rows,
        } = self.current();
        assert_eq!(
            out_rows, n,
            "backward after forward_rows, which keeps no backward's activations"
        );
        let d = self.dims.clone();
        let (c, f, h, hd) = (d.hidden, d.ffn, d.heads, d.head_dim());
        let be = &self.be;
        let a = &self.acts;
        let s = &mut self.scratch;
        let p = &mut self.params;
        let precision = self.precision;
        let _bwd = be.profile_range(format_args!("backward"));
        be.zero(&mut s.dx, n * c);
        if let Some(cls) = &mut p.classifier {
            if ce_scale != 0.0 {
                let _head = be.profile_range(format_args!("head bwd"));
                let l = d.labels;
                be.softmax_ce_bwd(&mut s.dlogits, &a.logits, &a.labels, n, l, ce_scale);
                // rounded: the GEMMs below read it
                be.quantize(&mut s.dlogits, n * l, precision);
                // dW_c, db_c; dhead_in into dsum, an fp32 buffer (the dropout's gradient
                // is not rounded)
                linear_bwd(
                    be,
                    cls,
                    true,
                    &s.dlogits,
                    &a.head_in,
                    &mut s.dsum,
                    0.0,
                    n,
                    c,
                    l,
                    precision,
                );
                let drop = dropout_for(mode, d.classifier_dropout, d.site_classifier());
                be.dropout_bwd(&mut s.dx, &s.dsum, n * c, drop, Precision::Fp32);
            }
        }
        if let Some(dh) = dhidden {
            be.add_inplace(&mut s.dx, dh, n * c);
        }
        let dropout = |pr: f32, site: u32| dropout_for(mode, pr, site);

        for li in (0..d.layers).rev() {
            let _layer = be.profile_range(format_args!("layer {li} bwd"));
            let la = &a.layers[li];
            let x_in = if li == 0 { &a.x0 } else { &a.layers[li - 1].x2 };
            let lp = &mut p.layers[li];
            // x2 = LN(dropout(f2) + x1): dsum to x1, dtmp (rounded) to f2, and f2's bias
            // gradient (the column sums of dtmp) in the same call
            be.dropout_layernorm_bwd(
                &mut s.dsum,
                Some(&mut s.dtmp),
                Some(&mut lp.out.b.g),
                &mut lp.ln2.w.g,
                &mut lp.ln2.b.g,
                &s.dx,
                &la.f2,
                dropout(d.hidden_dropout, Dims::site_ffn_out(li)),
                Some(&la.x1),
                &lp.ln2.w.w,
                &la.mean2,
                &la.rstd2,
                n,
                c,
                precision,
            );
            // f2 = g W_o^T + b_o (b_o's gradient summed above)
            linear_bwd(
                be,
                &mut lp.out,
                false,
                &s.dtmp,
                &la.g,
                &mut s.dg,
                0.0,
                n,
                f,
                c,
                precision,
            );
            be.quantize(&mut s.dg, n * f, precision);
            // g = gelu(f1 + b_i), f1 = x1 W_i^T
            be.bias_gelu_bwd(
                &mut s.df,
                &mut lp.inter.b.g,
                &s.dg,
                &la.f1,
                &lp.inter.b.w,
                n,
                f,
                precision,
            );
            // f1 = x1 W_i^T (its bias summed above); dx1 = the residual path (dsum) + df W_i,
            // the sum in the GEMM's beta term instead of a separate pass over [n, c]; dsum
            // then holds dx1 and the two swap roles
            linear_bwd(
                be,
                &mut lp.inter,
                false,
                &s.df,
                &la.x1,
                &mut s.dsum,
                1.0,
                n,
                c,
                f,
                precision,
            );
            std::mem::swap(&mut s.dx, &mut s.dsum);
            // x1 = LN(dropout(ao) + x_in): dsum to x_in, dtmp (rounded) to ao, and ao's
            // bias gradient
            be.dropout_layernorm_bwd(
                &mut s.dsum,
                Some(&mut s.dtmp),
                Some(&mut lp.attn_out.b.g),
                &mut lp.ln1.w.g,
                &mut lp.ln1.b.g,
                &s.dx,
                &la.ao,
                dropout(d.hidden_dropout, Dims::site_attn_out(li)),
                Some(x_in),
                &lp.ln1.w.w,
                &la.mean1,
                &la.rstd1,
                n,
                c,
                precision,
            );
            // ao = att W_ao^T + b_ao (b_ao's gradient summed above)
            linear_bwd(
                be,
                &mut lp.attn_out,
                false,
                &s.dtmp,
                &la.att,
                &mut s.datt,
                0.0,
                n,
                c,
                c,
                precision,
            );
            // (datt unrounded: the attention core rounds what it reads)
            let drop_p = dropout(d.attn_dropout, Dims::site_attn_probs(li));
            be.attention_bwd(
                &mut s.dq, &mut s.dk, &mut s.dv, &s.datt, &la.q, &la.k, &la.v, &la.att, &la.lse, &a.seqs, b, n, t, h,
                hd, drop_p, precision,
            );
            // (dq, dk, dv written rounded.) q/k/v = x_in W^T + b: parameter grads, then
            // dx_in = the residual path (dsum) plus the three paths, accumulated by the GEMMs
            // into dsum (no separate add pass), which then becomes dx
            for (dy, w) in [(&s.dq, &mut lp.q), (&s.dk, &mut lp.k), (&s.dv, &mut lp.v)] {
                linear_bwd(be, w, false, dy, x_in, &mut s.dsum, 1.0, n, c, c, precision);
            }
            // their three bias gradients in one call (one launch on CUDA)
            be.bias_grads(
                &mut [(&mut lp.q.b.g, &s.dq), (&mut lp.k.b.g, &s.dk), (&mut lp.v.b.g, &s.dv)],
                n,
                c,
            );
            std::mem::swap(&mut s.dx, &mut s.dsum);
        }

        // x0 = dropout(LN(emb)), in fp32 (dsum, then dx: neither gradient is rounded); the
        // two views of a repeated sequence meet in its one embedding
        let _emb = be.profile_range(format_args!("embeddings bwd"));
        let ne = n - nd;
        let drop_e = dropout(d.hidden_dropout, Dims::site_embeddings());
        if nd > 0 {
            be.dropout_duplicate_bwd(&mut s.dsum, &s.dx, nd * c, ne * c, drop_e);
        } else {
            be.dropout_bwd(&mut s.dsum, &s.dx, n * c, drop_e, Precision::Fp32);
        }
        be.layernorm_bwd(
            &mut s.dx,
            &mut p.emb_ln.w.g,
            &mut p.emb_ln.b.g,
            &s.dsum,
            &a.emb,
            None,
            &p.emb_ln.w.w,
            &a.emb_mean,
            &a.emb_rstd,
            ne,
            c,
        );
        be.embedding_bwd(
            &mut p.wte.g,
            &mut p.wpe.g,
            &mut p.wtt.g,
            &s.dx,
            &a.ids,
            &a.pos,
            &a.types,
            &a.emb_order,
            ne,
            c,
        );
    }
}

/// The mean of per-token CE losses over `labelled` tokens (`Model::ce_loss`), summed in
/// f64 so the value does not depend on the thread count; 0 tokens give 0.
pub fn mean_ce(token_losses: &[f32], labelled: usize) -> f32 {
    (token_losses.iter().map(|&x| x as f64).sum::<f64>() / labelled.max(1) as f64) as f32
}
