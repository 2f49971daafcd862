//! The backend interface: opaque buffers and one op per kernel family.
//!
//! The model (src/model) is written once against [`Backend`]. The CPU backend
//! (src/backend/cpu, fp32) is the reference for every op; a CUDA backend implements the
//! same trait with kernels of the same names and argument order (kernels/*.cu).
//!
//! Conventions, shared by every implementation:
//! - All matrices are row-major; sizes are passed explicitly, so a buffer may be larger
//!   than what an op uses (activations are planned once for the largest batch).
//! - Parameter gradients are *accumulated* (`+=`) so they can be zeroed once per step;
//!   activation gradients are *overwritten* unless an op says otherwise.
//! - Ops return nothing to the host; `download` is the only way back, so a GPU backend
//!   can run a whole step without synchronising.
pub mod cpu;
pub mod cuda;
pub mod philox;

pub use philox::Dropout;

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Target for tokens that carry no label (HF convention).
pub const IGNORE_INDEX: i32 = -100;

/// Which rows enter the logsumexp of an anchor (SPEC section 4, `--contrast-denominator`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Denominator {
    /// D_i = { j != i : y_j = y_i } (the paper's form; the default).
    SameClass,
    /// D_i = { j != i } (SupCon form).
    All,
}

/// What the anchor's own other dropout view is (SPEC section 4, `--own-view`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OwnView {
    /// Kept in D_i like any other row (the default).
    Negative,
    /// Removed from D_i.
    Exclude,
}

/// Options of the class-masked InfoNCE (`infonce_fwd/bwd`); recorded in a run's config.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct InfoNceOptions {
    /// Temperature: s_ij = z_i . z_j / tau.
    pub tau: f32,
    pub denominator: Denominator,
    pub own_view: OwnView,
    /// Gradients flow into the anchors' z only; the columns are constants (SPEC 4 point 6).
    pub detach_columns: bool,
}

impl Default for InfoNceOptions {
    /// SPEC section 4's defaults.
    fn default() -> Self {
        InfoNceOptions {
            tau: 0.1,
            denominator: Denominator::SameClass,
            own_view: OwnView::Negative,
            detach_columns: true,
        }
    }
}

impl InfoNceOptions {
    /// Which rows are valid anchors: anchor[i] != 0, |P_i| > 0 and |D_i| > 0 (SPEC
    /// section 4). Host-side on purpose: the batcher knows labels, anchors and partners,
    /// so the loss scale gamma / count is known before the forward pass, with no device
    /// round trip. `partner[i]` is the row of the same token in the other view or -1;
    /// with `OwnView::Exclude` it leaves D_i (P_i is defined by class alone).
    pub fn valid_anchors(&self, labels: &[i32], anchor: &[i32], partner: &[i32], m: usize) -> Vec<bool> {
        let mut count: HashMap<i32, usize> = HashMap::new();
        for &y in &labels[..m] {
            *count.entry(y).or_default() += 1;
        }
        (0..m)
            .map(|i| {
                if anchor[i] == 0 {
                    return false;
                }
                let y = labels[i];
                let same = count[&y];
                let p = partner[i];
                assert!(
                    p >= -1 && (p as isize) < m as isize,
                    "infonce: partner {p} of row {i} out of range"
                );
                let partner_in_d = self.own_view == OwnView::Exclude
                    && p >= 0
                    && p as usize != i
                    && (self.denominator == Denominator::All || labels[p as usize] == y);
                let d = match self.denominator {
                    Denominator::SameClass => same - 1,
                    Denominator::All => m - 1,
                } - partner_in_d as usize;
                m - same > 0 && d > 0
            })
            .collect()
    }
}

/// L_f on the host from the per-row losses `infonce_fwd` wrote (0 on rows that are not
/// valid anchors): their sum in f64 over the number of valid anchors, 0 when there are
/// none (as `Model::ce_loss` does for cross-entropy).
pub fn infonce_loss_host(per_row: &[f32], valid_count: usize) -> f32 {
    if valid_count == 0 {
        return 0.0;
    }
    (per_row.iter().map(|&x| x as f64).sum::<f64>() / valid_count as f64) as f32
}

/// Numeric precision of a model's activations and GEMM inputs (SPEC section 7,
/// `--precision`). Master weights, gradients, optimiser state, LayerNorm statistics,
/// softmax, logsumexp and losses are fp32 in every mode.
///
/// Values are rounded to the nearest bf16 / fp16 value (ties to even, fp16 overflow to
/// +-inf) at every point where a mixed-precision engine stores a GEMM (or attention) input
/// in 16 bits (`quantize`, or an op's `rounding`), and the GEMMs then accumulate those
/// values in fp32: the numbers of bf16-input / fp32-accumulate GEMMs. The CPU *emulates*
/// this on fp32 buffers at fp32 speed; the CUDA backend stores those buffers in 16 bits
/// (`alloc_rounded`) and runs the GEMMs and attention on tensor cores, with the same
/// values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// fp32 everywhere (the reference).
    #[default]
    Fp32,
    /// bf16 activations and GEMM inputs (8 exponent bits: fp32's range, 8-bit mantissa).
    Bf16,
    /// fp16 activations and GEMM inputs (5 exponent bits: overflow above 65504), trained
    /// with dynamic loss scaling (`train::optim::LossScaler`).
    Fp16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::Fp32, Precision::Bf16, Precision::Fp16];

    /// The flag value: fp32, bf16, fp16.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }

    /// One line for logs and reports.
    pub fn describe(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16 (GEMM and attention inputs in bf16, fp32 accumulation)",
            Precision::Fp16 => "fp16 (GEMM and attention inputs in fp16, fp32 accumulation, dynamic loss scaling)",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown precision `{s}`: expected fp32, bf16 or fp16"))
    }
}

/// AdamW hyper-parameters of one step (the schedule sets `lr` each step).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl AdamW {
    /// SPEC section 4's betas 0.9/0.999, eps 1e-8, weight decay 0.01 at learning rate `lr`.
    pub fn with_lr(lr: f32) -> Self {
        AdamW {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One parameter tensor of a fused optimiser step (`Backend::adamw_all`): the fp32 master
/// weights, their gradient, the two AdamW moments, the length, and whether weight decay
/// applies (not to biases and LayerNorm weights).
pub struct ParamSlot<'a, Buf> {
    pub param: &'a mut Buf,
    pub grad: &'a Buf,
    pub m: &'a mut Buf,
    pub v: &'a mut Buf,
    pub n: usize,
    pub decays: bool,
    /// Mixed precision: the rounded copy a GEMM reads, written in the same pass as
    /// `quantize(copy of the updated param)` would write it.
    pub low: Option<&'a mut Buf>,
}

/// An open profiler range (`Backend::profile_range`); the range ends when this drops.
#[must_use = "the range ends when the guard drops"]
pub struct RangeGuard(#[allow(dead_code)] Option<Box<dyn std::any::Any>>);

impl RangeGuard {
    /// No range (backends without a profiler).
    pub fn none() -> RangeGuard {
        RangeGuard(None)
    }
    /// A range held open by `inner`, whose drop closes it.
    pub fn new(inner: Box<dyn std::any::Any>) -> RangeGuard {
        RangeGuard(Some(inner))
    }
}

/// The token indices 0..idx.len() sorted by (idx, token): every run of equal indices, in
/// token order. What a deterministic scatter-add walks (`Backend::embedding_bwd`).
pub fn scatter_order(idx: &[i32]) -> Vec<i32> {
    let mut order: Vec<i32> = (0..idx.len() as i32).collect();
    order.sort_by_key(|&r| (idx[r as usize], r)); // stable and total: the same on every run
    order
}

/// `scatter_order` of the word, position and type indices of a batch, concatenated [3n]:
/// the `order` argument of `Backend::embedding_bwd`.
pub fn embedding_order(ids: &[i32], pos: &[i32], types: &[i32]) -> Vec<i32> {
    let mut order = scatter_order(ids);
    order.extend(scatter_order(pos));
    order.extend(scatter_order(types));
    order
}

pub trait Backend {
    /// A buffer of floats (fp32 on the CPU).
    type Buf;
    /// A buffer of i32 (token ids, positions, labels).
    type IBuf;
    /// Host memory a `download_start` copies into without the host waiting: page-locked
    /// on CUDA (a copy to pageable memory blocks until it lands), a `Vec` on the CPU.
    type Staging;

    fn name(&self) -> String;

    /// Opens a named range around the work enqueued until the guard drops: an NVTX range on
    /// CUDA, so `nsys profile` shows a step by layer, loss and optimiser phase; nothing on
    /// the CPU. The name is formatted only when a profiler can see it.
    fn profile_range(&self, _name: std::fmt::Arguments<'_>) -> RangeGuard {
        RangeGuard::none()
    }

    /// Tokens per evaluation batch (forward only, nothing kept for a backward) this backend
    /// runs fastest at, when fewer than a model is planned for: on the CPU the activations
    /// of a smaller batch stay in the caches from one op to the next. None: as many as
    /// planned (a GPU wants full batches).
    fn eval_batch_tokens(&self) -> Option<usize> {
        None
    }

    // ---- memory -------------------------------------------------------------------
    /// A zeroed buffer of `n` floats.
    fn alloc(&self, n: usize) -> Self::Buf;
    /// A zeroed buffer of `n` floats whose every value is seen rounded to `precision`: each
    /// op that writes it rounds to `precision` (its `rounding`), or every op that reads it
    /// rounds what it reads (a GEMM's or the attention core's 16-bit `inputs`). A backend
    /// may then store it in 16 bits: the CUDA backend does (half the memory and traffic,
    /// GEMM operands in cuBLASLt's native format, results unchanged); the CPU keeps fp32,
    /// as `alloc`. `Precision::Fp32` is `alloc`.
    fn alloc_rounded(&self, n: usize, precision: Precision) -> Self::Buf {
        let _ = precision;
        self.alloc(n)
    }
    fn alloc_i32(&self, n: usize) -> Self::IBuf;
    fn upload(&self, dst: &mut Self::Buf, src: &[f32]);
    fn upload_i32(&self, dst: &mut Self::IBuf, src: &[i32]);
    fn download(&self, src: &Self::Buf, n: usize) -> Vec<f32>;
    /// Host memory for `download_start` of up to `n` floats. Allocate it outside the step
    /// (page-locked allocation is slow and may synchronise the device).
    fn staging(&self, n: usize) -> Self::Staging;
    /// Starts copying src[..n] (an fp32 buffer) into `dst`, ordered after all the work
    /// enqueued so far, and returns without waiting for it on a GPU: how a step hands its
    /// losses back without a host-device synchronisation inside the step. Read the values
    /// with `download_wait`; `dst` must not be started again before that.
    fn download_start(&self, dst: &mut Self::Staging, src: &Self::Buf, n: usize);
    /// The values of the last `download_start` into `src`, waiting for that copy (and so
    /// the work enqueued before it) only.
    fn download_wait<'a>(&self, src: &'a Self::Staging, n: usize) -> &'a [f32];
    fn zero(&self, buf: &mut Self::Buf, n: usize);
    /// `zero` of every (buffer, n): the gradients before a step. The default is that
    /// loop; the CUDA backend zeroes them all in one launch (kernels/adamw.cu
    /// `zero_multi_f32`) instead of one memset per tensor.
    fn zero_all(&self, xs: &mut [(&mut Self::Buf, usize)]) {
        for (x, n) in xs.iter_mut() {
            self.zero(x, *n);
        }
    }
    /// dst[..n] += src[..n]
    fn add_inplace(&self, dst: &mut Self::Buf, src: &Self::Buf, n: usize);
    /// dst[..n] = src[..n]: bit for bit, or rounded as `quantize` would when dst is an
    /// `alloc_rounded` buffer that a backend stores in 16 bits.
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf, n: usize);
    /// x[..n] rounded in place to the nearest `precision` value, ties to even, as a store
    /// to a bf16 / fp16 buffer and a load back to fp32 give: fp16 overflow (|x| >= 65520)
    /// becomes +-inf, NaN stays NaN, fp16 subnormals are kept (no flush to zero). The
    /// identity for `Precision::Fp32` (nothing is touched).
    fn quantize(&self, x: &mut Self::Buf, n: usize, precision: Precision);

    // ---- linear algebra -------------------------------------------------------------
    /// c[m,n] = alpha * op(a) op(b) + beta * c, op(a) [m,k], op(b) [k,n]; `ta`/`tb`
    /// transpose the stored a [k,m] / b [n,k].
    ///
    /// `inputs` is a promise about a and b: every element they hold is a value of that
    /// precision (the caller `quantize`d them; `Precision::Fp32` promises nothing). A
    /// backend may then multiply in that format with fp32 accumulation, which is exact for
    /// such values (a product of two bf16 or fp16 significands fits fp32's): the CUDA
    /// backend runs bf16 / fp16 inputs on tensor cores, the CPU computes in fp32 either
    /// way. c, alpha and beta stay fp32. Passing a reduced precision for inputs that are
    /// not representable rounds them, as a bf16 engine would.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self, c: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf, m: usize, n: usize, k: usize, ta: bool, tb: bool,
        alpha: f32, beta: f32, inputs: Precision,
    );
    /// c[m, n] = op(a) op(b) + bias, bias [n] added to every row (a linear layer's
    /// x W^T + b): `gemm` with alpha 1, beta 0, then `add_bias`, which is this default; the
    /// CUDA backend adds the bias in the GEMM's epilogue (cuBLASLt) and saves the pass.
    #[allow(clippy::too_many_arguments)]
    fn gemm_bias(
        &self, c: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf, bias: &Self::Buf, m: usize, n: usize, k: usize,
        ta: bool, tb: bool, inputs: Precision,
    ) {
        self.gemm(c, a, b, m, n, k, ta, tb, 1.0, 0.0, inputs);
        self.add_bias(c, bias, m, n);
    }
    /// out[r, :] += bias for r < rows.
    fn add_bias(&self, out: &mut Self::Buf, bias: &Self::Buf, rows: usize, cols: usize);
    /// dbias += sum over rows of dout[rows, cols].
    fn bias_grad(&self, dbias: &mut Self::Buf, dout: &Self::Buf, rows: usize, cols: usize);
    /// `bias_grad` of every (dbias, dout) pair, all [rows, cols] (a layer's q, k and v
    /// biases). The default is that loop; the CUDA backend sums them in one launch.
    fn bias_grads(&self, pairs: &mut [(&mut Self::Buf, &Self::Buf)], rows: usize, cols: usize) {
        for (dbias, dout) in pairs.iter_mut() {
            self.bias_grad(dbias, dout, rows, cols);
        }
    }

    // ---- layers ---------------------------------------------------------------------
    // `rounding` (layernorm_fwd, bias_gelu_fwd/bwd, dropout_fwd/bwd): the output is written
    // rounded to that precision, as `quantize` would round it after the op (fp32: as
    // computed). Mixed precision rounds what the next GEMM reads this way, without a pass.
    /// out[n,c] = wte[ids] + wpe[pos] + wtt[types].
    #[allow(clippy::too_many_arguments)]
    fn embedding_fwd(
        &self, out: &mut Self::Buf, ids: &Self::IBuf, pos: &Self::IBuf, types: &Self::IBuf, wte: &Self::Buf,
        wpe: &Self::Buf, wtt: &Self::Buf, n: usize, c: usize,
    );
    /// Scatter-add dout into the three tables, each table row receiving its tokens' rows in
    /// token order (deterministic). `order` [3n] is [`embedding_order`] of the three index
    /// lists, built on the host where the batch is: it makes the work O(n c) on the device
    /// (one owner per table row walks its run of tokens) instead of a search per token.
    #[allow(clippy::too_many_arguments)]
    fn embedding_bwd(
        &self, dwte: &mut Self::Buf, dwpe: &mut Self::Buf, dwtt: &mut Self::Buf, dout: &Self::Buf, ids: &Self::IBuf,
        pos: &Self::IBuf, types: &Self::IBuf, order: &Self::IBuf, n: usize, c: usize,
    );
    /// out = LayerNorm(inp + residual) over rows of width c; saves mean and 1/std per row.
    /// `dropout_layernorm_fwd` with the dropout off.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_fwd(
        &self, out: &mut Self::Buf, mean: &mut Self::Buf, rstd: &mut Self::Buf, inp: &Self::Buf,
        residual: Option<&Self::Buf>, weight: &Self::Buf, bias: &Self::Buf, n: usize, c: usize, eps: f32,
        rounding: Precision,
    ) {
        let off = Dropout::OFF;
        self.dropout_layernorm_fwd(out, mean, rstd, inp, off, residual, weight, bias, n, c, eps, rounding)
    }
    /// dinp = d(loss)/d(inp + residual) (overwritten); dweight, dbias accumulated.
    /// `dropout_layernorm_bwd` with the dropout off and no input gradient apart.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_bwd(
        &self, dinp: &mut Self::Buf, dweight: &mut Self::Buf, dbias: &mut Self::Buf, dout: &Self::Buf, inp: &Self::Buf,
        residual: Option<&Self::Buf>, weight: &Self::Buf, mean: &Self::Buf, rstd: &Self::Buf, n: usize, c: usize,
    ) {
        let (off, fp32) = (Dropout::OFF, Precision::Fp32);
        self.dropout_layernorm_bwd(
            dinp, None, None, dweight, dbias, dout, inp, off, residual, weight, mean, rstd, n, c, fp32,
        )
    }
    /// out = LayerNorm(dropout(inp) + residual): `dropout_fwd` (fp32) and `layernorm_fwd`
    /// in one pass, bit for bit the two (BERT's hidden dropout before each residual
    /// LayerNorm). The dropped input is never stored: `dropout_layernorm_bwd` regenerates
    /// it from inp and the same `dropout`.
    #[allow(clippy::too_many_arguments)]
    fn dropout_layernorm_fwd(
        &self, out: &mut Self::Buf, mean: &mut Self::Buf, rstd: &mut Self::Buf, inp: &Self::Buf, dropout: Dropout,
        residual: Option<&Self::Buf>, weight: &Self::Buf, bias: &Self::Buf, n: usize, c: usize, eps: f32,
        rounding: Precision,
    );
    /// Backward of `dropout_layernorm_fwd`: dsum (overwritten) = d loss / d(dropout(inp) +
    /// residual), the residual's gradient; dinp, when given (overwritten) = `dropout_bwd`
    /// of dsum, rounded as `rounding` says, written in the same pass; dweight, dbias
    /// accumulated. Bit for bit `layernorm_bwd` then `dropout_bwd`. `dinp_bias` (only with
    /// dinp): += the column sums of dinp as written, `bias_grad` of the linear layer whose
    /// output inp is (on CUDA in the parameter gradients' launch, not one of its own).
    #[allow(clippy::too_many_arguments)]
    fn dropout_layernorm_bwd(
        &self, dsum: &mut Self::Buf, dinp: Option<&mut Self::Buf>, dinp_bias: Option<&mut Self::Buf>,
        dweight: &mut Self::Buf, dbias: &mut Self::Buf, dout: &Self::Buf, inp: &Self::Buf, dropout: Dropout,
        residual: Option<&Self::Buf>, weight: &Self::Buf, mean: &Self::Buf, rstd: &Self::Buf, n: usize, c: usize,
        rounding: Precision,
    );
    /// out = gelu(inp + bias) (erf form), rows of width c.
    fn bias_gelu_fwd(
        &self, out: &mut Self::Buf, inp: &Self::Buf, bias: &Self::Buf, n: usize, c: usize, rounding: Precision,
    );
    /// dinp = dout * gelu'(inp + bias) (overwritten, rounded as `rounding` says); dbias +=
    /// column sums of dinp as written.
    #[allow(clippy::too_many_arguments)]
    fn bias_gelu_bwd(
        &self, dinp: &mut Self::Buf, dbias: &mut Self::Buf, dout: &Self::Buf, inp: &Self::Buf, bias: &Self::Buf,
        n: usize, c: usize, rounding: Precision,
    );
    /// Multi-head self-attention core over packed sequences (FlashAttention's "varlen"):
    /// q, k, v, out [n, h*d] hold b sequences one after another, no padding: sequence r is
    /// tokens seqs[r] .. seqs[r+1] (seqs [b+1], seqs[0] = 0, seqs[b] = n), heads interleaved
    /// as the HF linear layers produce them; each token attends to the tokens of its own
    /// sequence. t >= every sequence's length (the longest): it bounds the work split and
    /// strides the dropout counter ((r h + hi) t + i) t + j of probability (i, j) of head hi
    /// of sequence r. lse [n, h] saved for the backward pass. Dropout on the probabilities.
    /// `inputs` bf16 / fp16: q, k, v (and in backward dout, out) are read rounded to 16
    /// bits, the products take 16-bit inputs (tensor cores on CUDA), the probabilities and
    /// score gradients are rounded before the products that read them, and out (dq, dk, dv)
    /// are written rounded (cpu/attention.rs says exactly where); fp32: all fp32.
    #[allow(clippy::too_many_arguments)]
    fn attention_fwd(
        &self, out: &mut Self::Buf, lse: &mut Self::Buf, q: &Self::Buf, k: &Self::Buf, v: &Self::Buf,
        seqs: &Self::IBuf, b: usize, n: usize, t: usize, h: usize, d: usize, dropout: Dropout, inputs: Precision,
    );
    /// Gradients of q, k, v (overwritten), recomputing probabilities from lse.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self, dq: &mut Self::Buf, dk: &mut Self::Buf, dv: &mut Self::Buf, dout: &Self::Buf, q: &Self::Buf,
        k: &Self::Buf, v: &Self::Buf, out: &Self::Buf, lse: &Self::Buf, seqs: &Self::IBuf, b: usize, n: usize,
        t: usize, h: usize, d: usize, dropout: Dropout, inputs: Precision,
    );
    /// out = inp * mask / (1-p), mask from Philox (identity when p = 0).
    fn dropout_fwd(&self, out: &mut Self::Buf, inp: &Self::Buf, n: usize, dropout: Dropout, rounding: Precision);
    /// dinp = dout * mask / (1-p), the mask regenerated.
    fn dropout_bwd(&self, dinp: &mut Self::Buf, dout: &Self::Buf, n: usize, dropout: Dropout, rounding: Precision);
    /// The dropout-duplicate pass of a DeepCUT step: the first n_dup elements of inp [n] (the
    /// forget sequences' embeddings) are needed twice, as views a and b with independent
    /// masks, and are read once: out [n + n_dup] = `dropout_fwd` over [inp[..n_dup] |
    /// inp[..n_dup] | inp[n_dup..n]], each element masked by its index in out (so bit for
    /// bit what `dropout_fwd` of the doubled input gives), rounded as `rounding` says.
    fn dropout_duplicate(
        &self, out: &mut Self::Buf, inp: &Self::Buf, n_dup: usize, n: usize, dropout: Dropout, rounding: Precision,
    );
    /// Backward of `dropout_duplicate`: dinp [n] (overwritten) = dout [n + n_dup] through
    /// the masks, the two views' gradients of each duplicated element summed.
    fn dropout_duplicate_bwd(&self, dinp: &mut Self::Buf, dout: &Self::Buf, n_dup: usize, n: usize, dropout: Dropout);
    /// losses[r] = -log softmax(logits[r])[labels[r]], 0 where labels[r] is IGNORE_INDEX.
    fn softmax_ce_fwd(&self, losses: &mut Self::Buf, logits: &Self::Buf, labels: &Self::IBuf, n: usize, v: usize);
    /// dlogits = scale * (softmax(logits) - onehot(label)), 0 on ignored rows.
    fn softmax_ce_bwd(
        &self, dlogits: &mut Self::Buf, logits: &Self::Buf, labels: &Self::IBuf, n: usize, v: usize, scale: f32,
    );

    // ---- DeepCUT contrastive term ---------------------------------------------------------
    /// out[r, :] = src[idx[r], :] for r < m (out [m, c]): labelled positions into Z, and the
    /// rows an evaluation keeps (`Model::forward_rows`). `out` may be a rounded buffer
    /// (`alloc_rounded`) when `src` is one of the same precision: a copy either way.
    fn gather_rows(&self, out: &mut Self::Buf, src: &Self::Buf, idx: &Self::IBuf, m: usize, c: usize);
    /// dst[idx[r], :] += src[r, :] for r < m. Accumulates (dZ joins the head's gradient
    /// of the final hidden states); deterministic even if indices repeat.
    fn scatter_add_rows(&self, dst: &mut Self::Buf, src: &Self::Buf, idx: &Self::IBuf, m: usize, c: usize);
    /// out = inp / max(||inp||, 1e-12) per row of width c; saves that norm [m].
    fn l2norm_fwd(&self, out: &mut Self::Buf, norm: &mut Self::Buf, inp: &Self::Buf, m: usize, c: usize);
    /// dinp = (dout - out (out . dout)) / norm (overwritten).
    fn l2norm_bwd(&self, dinp: &mut Self::Buf, dout: &Self::Buf, out: &Self::Buf, norm: &Self::Buf, m: usize, c: usize);
    /// Class-masked InfoNCE (SPEC section 4) over z [m, c] (unit rows; every row is a
    /// column), labels [m], anchor [m] (1/0), partner [m] (row of the other view or -1).
    /// Writes loss [m] = L_i on valid anchors and 0 elsewhere, and lse [m] (the
    /// denominator's logsumexp, saved for backward). L_f = `infonce_loss_host(loss,
    /// count)` with count from `InfoNceOptions::valid_anchors`. `inputs` bf16 / fp16: the
    /// similarities are products of z rounded to 16 bits (tensor cores on CUDA), fp32
    /// accumulated, and so are the anchor gradient's products (the probabilities rounded
    /// too); logsumexp, loss and the column-side gradient stay fp32 (cpu/infonce.rs says
    /// exactly where it rounds).
    #[allow(clippy::too_many_arguments)]
    fn infonce_fwd(
        &self, loss: &mut Self::Buf, lse: &mut Self::Buf, z: &Self::Buf, labels: &Self::IBuf, anchor: &Self::IBuf,
        partner: &Self::IBuf, m: usize, c: usize, opts: InfoNceOptions, inputs: Precision,
    );
    /// dz [m, c] (overwritten) = d(scale * sum of valid L_i)/dz; pass scale = gamma /
    /// count for gamma * L_f. Anchor-side gradient always; column-side only when
    /// `opts.detach_columns` is false.
    #[allow(clippy::too_many_arguments)]
    fn infonce_bwd(
        &self, dz: &mut Self::Buf, z: &Self::Buf, lse: &Self::Buf, labels: &Self::IBuf, anchor: &Self::IBuf,
        partner: &Self::IBuf, m: usize, c: usize, opts: InfoNceOptions, scale: f32, inputs: Precision,
    );

    // ---- optimiser --------------------------------------------------------------------
    /// One AdamW step (PyTorch semantics) on param, m, v [n] with gradient grad[..n] *
    /// grad_scale (clipping, and fp16's loss-scale division, folded into the read; grad
    /// itself is not written); step is 1-based.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self, param: &mut Self::Buf, grad: &Self::Buf, m: &mut Self::Buf, v: &mut Self::Buf, n: usize, hp: AdamW,
        step: u64, grad_scale: f32,
    );
    /// `adamw` on every slot, in order, with `hp.weight_decay` on the slots that decay and
    /// none on the others, then each slot's `low` (if any) = the updated param rounded to
    /// `low_precision`. The default is that loop (`copy` + `quantize` for the copies); the
    /// CUDA backend does every tensor, copies included, in one launch (kernels/adamw.cu
    /// `adamw_multi_f32`), element for element the same values.
    fn adamw_all(
        &self, slots: &mut [ParamSlot<'_, Self::Buf>], hp: AdamW, step: u64, grad_scale: f32, low_precision: Precision,
    ) {
        for s in slots.iter_mut() {
            let hp = AdamW {
                weight_decay: if s.decays { hp.weight_decay } else { 0.0 },
                ..hp
            };
            self.adamw(s.param, s.grad, s.m, s.v, s.n, hp, step, grad_scale);
            if let Some(low) = s.low.as_deref_mut() {
                self.copy(low, s.param, s.n);
                self.quantize(low, s.n, low_precision);
            }
        }
    }
    /// sum(x[..n]^2) in f64, deterministic for any thread count. Returns a host value
    /// (the clipping decision needs it); the CUDA backend reduces on the device and copies
    /// back one number.
    fn sum_squares(&self, x: &Self::Buf, n: usize) -> f64;
    /// The sum of `sum_squares` over the tensors, added in order: the squared global
    /// gradient norm. The default is that loop; the CUDA backend computes it with one copy
    /// back (one synchronisation per step instead of one per tensor), bit for bit the same.
    fn sum_squares_all(&self, xs: &[(&Self::Buf, usize)]) -> f64 {
        xs.iter().map(|&(x, n)| self.sum_squares(x, n)).sum()
    }
    /// Global-norm clipping and `adamw_all`, decided where the gradients are, so a GPU
    /// step needs no host round trip (issue #6). With `norm` = sqrt(`sum_squares_all` of
    /// the slots' gradients) / `loss_scale` (f64) and `f` = `clip / norm` if `norm > clip`,
    /// else 1 (rounded to f32): `adamw_all` with `grad_scale = f * (1 / loss_scale)`,
    /// exactly what `Optimizer::update` does on the host, unless `ClipState::decide` (from
    /// what `stats` held before, `overflows_seen` and the norm) says to skip: then nothing
    /// is updated. A failure sticks (the host learns of it a step late and the next step
    /// must not apply); with fp16 loss scaling (`overflows_seen` = the overflows the host
    /// has been told of) an overflow is counted in `stats`, and every update enqueued
    /// before the host saw it is stale and skipped too, since its gradients carry the loss
    /// scale the overflow halved. `stats` [`ClipStats::LEN`] is written; `ClipStats::read`
    /// decodes it. The default decides on the host; the CUDA backend in the reduction's
    /// last thread (kernels/adamw.cu `sum_partials_multi_f64`).
    #[allow(clippy::too_many_arguments)]
    fn clip_adamw_all(
        &self, slots: &mut [ParamSlot<'_, Self::Buf>], hp: AdamW, step: u64, clip: f32, loss_scale: f32,
        overflows_seen: Option<u32>, low_precision: Precision, stats: &mut Self::Buf,
    ) {
        let grads: Vec<(&Self::Buf, usize)> = slots.iter().map(|s| (s.grad, s.n)).collect();
        let norm = self.sum_squares_all(&grads).sqrt() / loss_scale as f64;
        let before = self.download(stats, ClipStats::LEN);
        let (state, overflows) = ClipState::decide(&before, overflows_seen, norm, loss_scale);
        let grad_scale = if state == ClipState::Applied {
            let gs = clip_factor(norm, clip) * (1.0 / loss_scale);
            self.adamw_all(slots, hp, step, gs, low_precision);
            gs
        } else {
            0.0
        };
        self.upload(stats, &ClipStats::encode(norm, state, grad_scale, overflows));
    }
}

/// The clipping factor of a global gradient norm: clip / norm (in f64, rounded to f32)
/// above `clip`, else 1. One definition for the host's decision and the CPU twin of
/// kernels/adamw.cu's device-side one.
pub fn clip_factor(norm: f64, clip: f32) -> f32 {
    if norm > clip as f64 {
        (clip as f64 / norm) as f32
    } else {
        1.0
    }
}

/// What `Backend::clip_adamw_all` decided for one update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipState {
    /// The update applied.
    Applied,
    /// A non-finite norm (or, with fp16 loss scaling, an overflow at loss scale 1), now or
    /// at an earlier update on the same stats: nothing updated, and nothing will be.
    Failed,
    /// fp16 loss scaling: the gradients overflowed; skipped, and the host halves the scale.
    Overflowed,
    /// fp16 loss scaling: enqueued before the host learned of an overflow, so its gradients
    /// carry a loss scale that has since been halved; skipped, to be computed again.
    Stale,
}

impl ClipState {
    /// The decision `Backend::clip_adamw_all` makes on the device, as the host writes it:
    /// from the stats of the previous update (`before`), the overflows the host has seen
    /// (`Some` with fp16 loss scaling) and this update's unscaled norm. Returns the state
    /// and the overflow count to store. kernels/adamw.cu `sum_partials_multi_f64` is the
    /// same decision in CUDA.
    pub fn decide(before: &[f32], overflows_seen: Option<u32>, norm: f64, loss_scale: f32) -> (ClipState, f32) {
        let prev = ClipStats::read(before);
        let state = if prev.state == ClipState::Failed {
            ClipState::Failed
        } else if overflows_seen.is_some_and(|s| prev.overflows != s as f32) {
            ClipState::Stale
        } else if norm.is_finite() {
            ClipState::Applied
        } else if overflows_seen.is_some() && loss_scale > 1.0 {
            ClipState::Overflowed
        } else {
            ClipState::Failed
        };
        let overflows = prev.overflows + (state == ClipState::Overflowed) as i32 as f32;
        (state, overflows)
    }

    /// Nothing was updated.
    pub fn skipped(self) -> bool {
        self != ClipState::Applied
    }

    /// The code in `ClipStats` (kernels/adamw.cu writes the same numbers).
    fn code(self) -> f32 {
        match self {
            ClipState::Applied => 0.0,
            ClipState::Failed => 1.0,
            ClipState::Overflowed => 2.0,
            ClipState::Stale => 3.0,
        }
    }

    fn from_code(c: f32) -> ClipState {
        match c as i32 {
            0 => ClipState::Applied,
            2 => ClipState::Overflowed,
            3 => ClipState::Stale,
            _ => ClipState::Failed,
        }
    }
}

/// What `Backend::clip_adamw_all` leaves in its `stats` buffer: the unscaled global
/// gradient norm as an f32 pair (hi + lo, so an f64 survives an fp32 buffer to about
/// 2^-48), the decision (`ClipState`, as a code; nonzero = skipped), the gradient scale
/// AdamW applied, and the overflows counted so far (fp16 loss scaling).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipStats {
    pub norm: f64,
    pub state: ClipState,
    pub grad_scale: f32,
    pub overflows: f32,
}

impl ClipStats {
    pub const LEN: usize = 5;

    /// The layout kernels/adamw.cu `sum_partials_multi_f64` writes.
    pub fn encode(norm: f64, state: ClipState, grad_scale: f32, overflows: f32) -> [f32; 5] {
        let hi = norm as f32;
        let lo = if norm.is_finite() {
            (norm - hi as f64) as f32
        } else {
            0.0
        };
        [hi, lo, state.code(), grad_scale, overflows]
    }

    pub fn read(v: &[f32]) -> ClipStats {
        let (hi, lo) = (v[0] as f64, v[1] as f64);
        ClipStats {
            norm: if hi.is_finite() { hi + lo } else { hi },
            state: ClipState::from_code(v[2]),
            grad_scale: v[3],
            overflows: v[4],
        }
    }

    /// Nothing was updated.
    pub fn skipped(&self) -> bool {
        self.state.skipped()
    }
}
