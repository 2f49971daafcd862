//! `deepcut-fast bench`: times full DeepCUT training steps (SPEC section 4) on synthetic
//! tokens with random-init weights and prints one JSON object on stdout (a short line on
//! stderr): step-time median and spread, tokens/s, model FLOPs per step, achieved
//! TFLOP/s, MFU against the device's measured matmul rate, peak memory.
//!
//! A step is exactly what `run` does per step: `deepcut::assemble` (host), forward over
//! [forget view a | forget view b | retain] with dropout on, CE on retain tokens,
//! class-masked InfoNCE over the L2-normalised labelled tokens, one backward pass,
//! global-norm clipping and AdamW decided on the device (`Optimizer::update_enqueue`),
//! pipelined as `run` pipelines its steps (how that is timed: the comment in `bench`).
//!
//! Synthetic data (a step's cost does not depend on the values, only on the shapes and,
//! for the contrastive term, on how the labels split into classes): every sequence is
//! `--seq-len` real tokens (no padding), token ids uniform over the vocabulary (the pad id
//! avoided), the first and last position unlabelled (the special tokens), every other
//! position labelled, `O` (class 0) with probability 0.8 and otherwise uniform over the
//! other `--labels - 1` classes (WNUT17-like). scripts/compare-torch.py builds the same.
use super::{with_backend, DeviceArgs};
use crate::backend::cuda::optimes::OpTime;
use crate::backend::{cpu::Cpu, cuda::Cuda, Backend, InfoNceOptions, Precision, IGNORE_INDEX};
use crate::data::Window;
use crate::error::{Error, Result};
use crate::infer::{max_window, model_from_weights, position_style};
use crate::model::{random_init, Model, ModelConfig};
use crate::train::optim::{LossScaling, OptimConfig, Optimizer};
use crate::train::readback::Ring;
use crate::unlearn::deepcut::{self, Anchors, Contrast};
use clap::Args;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// Model shape: minilm-l6 | bert-base | roberta-base (random-init weights).
    #[arg(long, default_value = "minilm-l6", conflicts_with = "config")]
    preset: String,
    /// A config.json to take the shape from instead of a preset (weights random-init).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Forget sentences per step (each encoded twice: two dropout views).
    #[arg(long, default_value_t = 8)]
    bf: usize,
    /// Retain sentences per step.
    #[arg(long, default_value_t = 32)]
    br: usize,
    /// Tokens per sequence (special tokens included; no padding).
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first (allocation, caches, clocks).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Classes of the token-classification head (13: WNUT17's BIO tags).
    #[arg(long, default_value_t = 13)]
    labels: usize,
    /// Seed of the weights, the tokens and the dropout masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also time every op and phase of the timed steps with device events (GPU only;
    /// `op_times` in the JSON, the longest listed on stderr): where the step's time goes
    /// without Nsight. Each range then costs two event records on the host.
    #[arg(long)]
    op_times: bool,
    /// Size n of the n x n x n fp32 GEMM timed once at startup for the MFU reference
    /// (default 2048 on the CPU, 8192 on a GPU).
    #[arg(long)]
    matmul_size: Option<usize>,
    #[command(flatten)]
    device: DeviceArgs,
}

/// What the bench needs from a backend beyond [`Backend`]: a way to wait for queued work
/// (timing), the device's name and memory, and the matmul rates the MFU refers to.
pub trait BenchBackend: Backend {
    /// Waits until every queued op has finished.
    fn sync(&self);
    /// The device in words (CPU model and threads, GPU name).
    fn device_name(&self) -> String;
    /// Device memory in use (bytes), where the backend has its own memory; None on the CPU.
    fn device_memory_used(&self) -> Option<u64>;
    /// Default size of the rate GEMM on this device.
    fn default_matmul_size(&self) -> usize;
    /// Matmul rates other than the fp32 `Backend::gemm` path (the GPU's bf16 tensor-core
    /// rate), each measured at n x n x n.
    fn extra_matmul_rates(&self, n: usize) -> Vec<MatmulRate>;
    /// Whether numbers from this backend are verified (false for the CUDA backend until it
    /// has run on a GPU).
    fn verified(&self) -> bool;
    /// Which implementation the step's GEMM-with-bias and attention ran on (after the
    /// steps), for the JSON; null where there is one path.
    fn paths(&self, _precision: Precision, _hidden: usize) -> Value {
        Value::Null
    }
    /// (kernel launches, GEMM calls) enqueued so far, where the backend enqueues work on a
    /// device; None on the CPU.
    fn enqueued_calls(&self) -> Option<(u64, u64)> {
        None
    }
    /// Starts or stops timing each op and phase range (`--op-times`); a backend without
    /// device events ignores it.
    fn time_ops(&self, _on: bool) {}
    /// The ranges' device times since timing started, summed by name, longest first; None
    /// where the backend does not time ops.
    fn op_times(&self) -> Option<std::result::Result<Vec<OpTime>, String>> {
        None
    }
}

/// One measured matmul rate.
#[derive(Clone, Debug)]
pub struct MatmulRate {
    pub dtype: &'static str,
    pub n: usize,
    pub tflops: f64,
    /// Which code path was timed.
    pub path: String,
    /// False where the path has never run on real hardware (the CUDA backend).
    pub verified: bool,
}

impl MatmulRate {
    fn to_json(&self) -> Value {
        json!({
            "dtype": self.dtype,
            "shape": [self.n, self.n, self.n],
            "tflops": self.tflops,
            "path": self.path,
            "verified": self.verified,
        })
    }
}

impl BenchBackend for Cpu {
    fn sync(&self) {}
    fn device_name(&self) -> String {
        format!(
            "{} ({} threads)",
            crate::backend::cpu::cpu_model(),
            rayon::current_num_threads()
        )
    }
    fn device_memory_used(&self) -> Option<u64> {
        None
    }
    fn default_matmul_size(&self) -> usize {
        2048
    }
    fn extra_matmul_rates(&self, _n: usize) -> Vec<MatmulRate> {
        vec![]
    }
    fn verified(&self) -> bool {
        true
    }
    /// Which GEMM library and which SIMD build of the element-wise kernels this machine
    /// picked (both chosen at run time, so a CPU row means nothing without them).
    fn paths(&self, _precision: Precision, _hidden: usize) -> Value {
        json!({
            "gemm": crate::backend::cpu::gemm::kernel().describe(),
            "simd": crate::backend::cpu::simd::level().name(),
        })
    }
}

impl BenchBackend for Cuda {
    fn sync(&self) {
        self.synchronize()
    }
    fn device_name(&self) -> String {
        let i = self.info();
        format!("{} (sm_{}{})", i.name, i.major, i.minor)
    }
    fn device_memory_used(&self) -> Option<u64> {
        self.memory_used()
    }
    fn default_matmul_size(&self) -> usize {
        8192
    }
    fn extra_matmul_rates(&self, n: usize) -> Vec<MatmulRate> {
        match crate::backend::cuda::gemm::bf16_gemm_rate(self, n, 10) {
            Ok(flops) => vec![MatmulRate {
                dtype: "bf16",
                n,
                tflops: flops / 1e12,
                path: "cublasGemmEx bf16 inputs, fp32 compute".into(),
                verified: self.verified(),
            }],
            Err(e) => {
                eprintln!("bench: bf16 GEMM rate not measured: {e}");
                vec![]
            }
        }
    }
    fn verified(&self) -> bool {
        super::selfcheck::passed().is_some()
    }
    fn enqueued_calls(&self) -> Option<(u64, u64)> {
        Some(Cuda::enqueued_calls(self))
    }
    fn time_ops(&self, on: bool) {
        Cuda::time_ops(self, on)
    }
    fn op_times(&self) -> Option<std::result::Result<Vec<OpTime>, String>> {
        Some(Cuda::op_times(self))
    }
    fn paths(&self, precision: Precision, hidden: usize) -> Value {
        json!({
            "gemm": match self.cublaslt_plans(false) {
                Some((with, 0)) => format!("cuBLASLt ({with} shapes)"),
                Some((with, without)) => format!(
                    "cuBLASLt ({with} shapes); cuBLAS for {without} shapes cuBLASLt had no algorithm for"
                ),
                None => "cuBLAS (cuBLASLt not available)".to_string(),
            },
            "gemm_bias": match self.cublaslt_plans(true) {
                Some((with, 0)) => format!("cuBLASLt with the bias epilogue ({with} shapes)"),
                Some((with, without)) => format!(
                    "cuBLASLt with the bias epilogue ({with} shapes); cuBLAS GEMM + add_bias for {without} \
                     shapes cuBLASLt had no algorithm for"
                ),
                None => "cuBLAS GEMM + add_bias kernel (cuBLASLt not available)".to_string(),
            },
            "attention": if precision == Precision::Fp32 {
                "kernels/attention.cu, fp32 on CUDA cores"
            } else {
                "kernels/attention_mma.cu, mma.sync on tensor cores"
            },
            "infonce": self.infonce_path(precision, hidden),
            "storage": if precision == Precision::Fp32 {
                "fp32".to_string()
            } else {
                format!(
                    "{precision}: GEMM and attention operands, their rounded outputs and the GEMM weight copies \
                     in 16 bits (Backend::alloc_rounded); weights, gradients, optimiser state and statistics fp32"
                )
            },
            // the NVTX library the ranges go through (null: nsys shows no ranges)
            "nvtx": self.nvtx_library(),
        })
    }
}

/// fp32 GEMM rate (FLOP/s) of the backend's own `gemm` at n x n x n: for each operand
/// layout the step uses (A B^T for forward passes, A B for input gradients, A^T B for
/// weight gradients) one untimed call, then `reps` timed ones; the best of all (the peak
/// the MFU refers to).
pub fn gemm_rate<B: BenchBackend>(be: &B, n: usize, reps: usize) -> f64 {
    let mut a = be.alloc(n * n);
    let mut b = be.alloc(n * n);
    let vals: Vec<f32> = (0..n * n).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
    be.upload(&mut a, &vals);
    be.upload(&mut b, &vals);
    let mut c = be.alloc(n * n);
    let mut best = f64::INFINITY;
    for (ta, tb) in [(false, true), (false, false), (true, false)] {
        for rep in 0..=reps {
            be.sync();
            let t0 = Instant::now();
            be.gemm(
                &mut c,
                &a,
                &b,
                n,
                n,
                n,
                ta,
                tb,
                1.0,
                0.0,
                crate::backend::Precision::Fp32,
            );
            be.sync();
            if rep > 0 {
                best = best.min(t0.elapsed().as_secs_f64());
            }
        }
    }
    2.0 * (n as f64).powi(3) / best
}

/// Shapes of one DeepCUT step.
#[derive(Clone, Copy, Debug)]
pub struct StepShape {
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub labels: usize,
    pub bf: usize,
    pub br: usize,
    pub seq_len: usize,
    /// Labelled tokens per sequence.
    pub labelled: usize,
}

/// Model FLOPs of one step, by part.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepFlops {
    pub linear: f64,
    pub attention: f64,
    pub head: f64,
    pub contrast: f64,
}

impl StepFlops {
    pub fn total(&self) -> f64 {
        self.linear + self.attention + self.head + self.contrast
    }
}

impl StepShape {
    /// Sequences in the forward pass: both views of each forget sentence, then retain.
    pub fn sequences(&self) -> usize {
        2 * self.bf + self.br
    }
    pub fn tokens(&self) -> usize {
        self.sequences() * self.seq_len
    }
    /// Contrastive anchors (labelled forget tokens, both views) and columns (every
    /// labelled token of the step).
    pub fn anchors_columns(&self) -> (usize, usize) {
        (2 * self.bf * self.labelled, self.sequences() * self.labelled)
    }

    /// Model FLOPs of one training step, counted from the shapes (a multiply-add is 2
    /// FLOPs), the convention of MFU estimates (PaLM appendix B, nanoGPT): what the model
    /// needs, not what a kernel does; recomputation (attention backward rebuilding P)
    /// and element-wise work (embeddings, LayerNorm, GELU, softmax, dropout, AdamW) are
    /// not counted. With S = 2 B_f + B_r sequences of T tokens (each forget sentence
    /// counted in both views), N = S T rows, c hidden, f FFN width, L layers, l labels:
    /// ```text
    /// forward, per layer:  linear     2 N (4 c^2 + 2 c f)   q, k, v, output projection, FFN up and down
    ///                      attention  4 S T^2 c             Q K^T and P V over all heads (2 T^2 d each, h d = c)
    /// forward, head:                  2 N c l
    /// training = 3 x forward          backward = input gradients + weight gradients, each as large
    ///                                 as the forward (attention: dP, dV, dQ, dK = 2 x forward)
    /// contrastive:                    4 A M c   A anchors x M columns: the similarities Z_a Z_c^T
    ///                                           forward, and dZ_a = P Z_c backward (columns
    ///                                           detached, SPEC 4 point 6); counted dense, as a
    ///                                           straightforward implementation computes them
    ///                                           (ours skips the other classes' columns)
    /// ```
    pub fn flops(&self) -> StepFlops {
        let (s, t, c, f) = (
            self.sequences() as f64,
            self.seq_len as f64,
            self.hidden as f64,
            self.ffn as f64,
        );
        let n = s * t;
        let layers = self.layers as f64;
        let (a, m) = self.anchors_columns();
        StepFlops {
            linear: 3.0 * layers * 2.0 * n * (4.0 * c * c + 2.0 * c * f),
            attention: 3.0 * layers * 4.0 * s * t * t * c,
            head: 3.0 * 2.0 * n * c * self.labels as f64,
            contrast: 4.0 * a as f64 * m as f64 * c,
        }
    }
}

/// Median, spread and mean of a sample (seconds).
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub median: f64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub p10: f64,
    pub p90: f64,
    /// Median absolute deviation from the median.
    pub mad: f64,
}

/// Quantile q of sorted values, linear interpolation between closest ranks (numpy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl Spread {
    /// Statistics of a non-empty sample.
    pub fn of(xs: &[f64]) -> Spread {
        let mut v = xs.to_vec();
        v.sort_by(f64::total_cmp);
        let median = quantile(&v, 0.5);
        let mut dev: Vec<f64> = v.iter().map(|x| (x - median).abs()).collect();
        dev.sort_by(f64::total_cmp);
        Spread {
            median,
            mean: v.iter().sum::<f64>() / v.len() as f64,
            min: v[0],
            max: v[v.len() - 1],
            p10: quantile(&v, 0.1),
            p90: quantile(&v, 0.9),
            mad: quantile(&dev, 0.5),
        }
    }

    fn to_json(self) -> Value {
        json!({
            "median": self.median,
            "mean": self.mean,
            "min": self.min,
            "max": self.max,
            "p10": self.p10,
            "p90": self.p90,
            "mad": self.mad,
        })
    }
}

/// The synthetic windows: `rows` sequences of `t` tokens (see the module comment).
fn synthetic_windows(rows: usize, t: usize, vocab: usize, labels: usize, pad: u32, seed: u64) -> Vec<Window> {
    let mut rng = crate::util::Lcg::new(seed ^ 0x9E37_79B9_7F4A_7C15);
    let mut next = move || rng.next_u31();
    (0..rows)
        .map(|_| {
            let mut ids = Vec::with_capacity(t);
            let mut lab = Vec::with_capacity(t);
            for p in 0..t {
                let mut id = (next() % vocab as u64) as u32;
                if id == pad {
                    id = (pad + 1) % vocab as u32;
                }
                ids.push(id);
                let y = if p == 0 || p + 1 == t {
                    IGNORE_INDEX
                } else if next() % 10 < 8 || labels == 1 {
                    0
                } else {
                    1 + (next() % (labels as u64 - 1)) as i32
                };
                lab.push(y);
            }
            Window {
                sentence: 0,
                first_word: 0,
                word_pos: vec![],
                ids,
                labels: lab,
            }
        })
        .collect()
}

/// Load averages (1, 5, 15 min) from /proc/loadavg; the machine's load goes next to
/// every timing.
fn loadavg() -> Value {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| {
            s.split_whitespace()
                .take(3)
                .filter_map(|x| x.parse::<f64>().ok())
                .collect::<Vec<_>>()
        })
        .filter(|v| v.len() == 3)
        .map_or(Value::Null, |v| json!(v))
}

impl BenchArgs {
    fn validate(&self) -> Result<ModelConfig> {
        for (name, v) in [("--bf", self.bf), ("--br", self.br), ("--steps", self.steps)] {
            if v == 0 {
                return Err(Error::invalid(format!("{name} must be at least 1")));
            }
        }
        if self.labels < 2 {
            return Err(Error::invalid(
                "--labels must be at least 2 (the contrastive term needs another class)",
            ));
        }
        if self.matmul_size == Some(0) {
            return Err(Error::invalid("--matmul-size must be at least 1"));
        }
        let cfg = match &self.config {
            Some(p) => ModelConfig::from_file(p)?,
            None => ModelConfig::preset(&self.preset)?,
        };
        let max = max_window(&cfg);
        if self.seq_len < 3 || self.seq_len > max {
            return Err(Error::invalid(format!(
                "--seq-len {}: must be between 3 (two special tokens and a labelled one) and {max} (the model's position table)",
                self.seq_len
            )));
        }
        Ok(cfg)
    }

    fn model_name(&self) -> String {
        match &self.config {
            Some(p) => p.display().to_string(),
            None => self.preset.clone(),
        }
    }
}

pub fn run(mut args: BenchArgs) -> Result<()> {
    let cfg = args.validate()?;
    let device = args.device.init()?;
    with_backend!(device, mk => {
        let be = mk()?;
        let report = bench(&args, &cfg, be)?;
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| Error::invalid(e.to_string()))?);
        Ok(())
    })
}

fn bench<B: BenchBackend>(args: &BenchArgs, cfg: &ModelConfig, be: B) -> Result<Value> {
    let load_start = loadavg();
    let n_mm = args.matmul_size.unwrap_or_else(|| be.default_matmul_size());
    let rate_start = gemm_rate(&be, n_mm, 2) / 1e12;
    let extra = be.extra_matmul_rates(n_mm);

    let shape = StepShape {
        layers: cfg.num_hidden_layers,
        hidden: cfg.hidden_size,
        ffn: cfg.intermediate_size,
        labels: args.labels,
        bf: args.bf,
        br: args.br,
        seq_len: args.seq_len,
        labelled: args.seq_len - 2,
    };
    let weights = random_init(cfg, Some(args.labels), args.seed);
    let params: usize = weights.tensors.values().map(|t| t.data.len()).sum();
    let device_name = be.device_name();
    let backend_name = be.name();
    let precision = args.device.precision;
    let mut model = model_from_weights(be, cfg, &weights, args.labels, shape.tokens()).with_precision(precision);
    drop(weights);
    let pad = cfg.pad_token_id;
    let windows = synthetic_windows(
        args.bf + args.br,
        args.seq_len,
        cfg.vocab_size,
        args.labels,
        pad,
        args.seed,
    );
    let forget: Vec<usize> = (0..args.bf).collect();
    let retain: Vec<usize> = (args.bf..args.bf + args.br).collect();
    let total = (args.warmup + args.steps) as u64;
    let mut opt = Optimizer::new(
        &model,
        OptimConfig {
            lr: 5e-5,
            weight_decay: 0.01,
            warmup: 0,
            total: total + 1,
            clip: 1.0,
        },
    )
    .with_precision(precision, LossScaling::default());
    let mut contrast = Contrast::new(&model.be, shape.tokens(), model.dims.hidden);
    let style = position_style(cfg);
    let opts = InfoNceOptions::default();
    let gamma = 0.3;
    let mut times = Vec::with_capacity(args.steps);
    let mut losses = vec![];
    let mut anchors = 0;
    // Steps run as `run` runs them (deepcut::step_enqueue): step s + 1 is enqueued before
    // step s's numbers are waited for, so on a GPU the device never waits for the host.
    // A step's time is the interval between the moments its numbers and the previous
    // step's came back: in steady state, the time the device takes per step (on the CPU,
    // which computes as it enqueues, the next step's compute time). The first interval
    // also holds the pipeline's filling, one more reason for --warmup. One extra step runs
    // untimed at the end: finishing the last step without a next one in flight would time
    // only the wait on a GPU and nothing on the CPU.
    let mut ring = Ring::new(&model.be, shape.tokens());
    // fp16: steps enqueued a second time after the step before them overflowed
    let mut rerun = 0u64;
    // Returns whether step s + 1, in flight, must be enqueued again (an fp16 overflow of s).
    let mut done = |ring: &mut Ring<B>, be: &B, opt: &mut Optimizer<B>, s: u64, last: &mut Instant| -> Result<bool> {
        let (f, redo) = ring.finish_before(s, be, opt);
        f.update?;
        let now = Instant::now();
        if s >= args.warmup as u64 && s < total {
            times.push((now - *last).as_secs_f64());
        }
        if s < total {
            anchors = f.losses.anchors;
            losses.push(f.losses);
        }
        *last = now;
        Ok(redo)
    };
    // The host's side of each step: assembling the batch and enqueueing every launch. On a
    // GPU, when this comes near the step time the host is the bottleneck (launch overhead:
    // the case for CUDA graphs); on the CPU it is the whole step.
    let mut host = Vec::with_capacity(args.steps);
    // launches and GEMM calls of the timed steps' enqueueing (steps warmup..total)
    let mut calls = (None, None);
    model.be.sync();
    let mut last = Instant::now();
    for step in 0..=total {
        if step == args.warmup as u64 {
            calls.0 = model.be.enqueued_calls();
            model.be.time_ops(args.op_times);
        }
        if step == total {
            calls.1 = model.be.enqueued_calls();
            model.be.time_ops(false);
        }
        let t_host = Instant::now();
        let (batch, z) = deepcut::assemble(&windows, &forget, &retain, style, 0, Anchors::All);
        let enqueue = |model: &mut Model<B>, contrast: &mut Contrast<B>, opt: &mut Optimizer<B>, ring: &mut Ring<B>| {
            model.set_loss_scale(opt.loss_scale());
            let mode = crate::model::Mode::Train { seed: args.seed, step };
            deepcut::step_enqueue(model, contrast, &batch, &z, opts, gamma, mode, opt, ring.slot(step));
        };
        enqueue(&mut model, &mut contrast, &mut opt, &mut ring);
        if step >= args.warmup as u64 && step < total {
            host.push(t_host.elapsed().as_secs_f64());
        }
        if step > 0 && done(&mut ring, &model.be, &mut opt, step - 1, &mut last)? {
            // fp16: step - 1 overflowed, so this step ran with the loss scale it halved
            enqueue(&mut model, &mut contrast, &mut opt, &mut ring);
            rerun += 1;
        }
    }
    done(&mut ring, &model.be, &mut opt, total, &mut last)?;
    // the timed steps' ranges (steps warmup .. total; fp16 reruns included)
    let op_times = if args.op_times { model.be.op_times() } else { None };
    let device_memory = model.be.device_memory_used();
    // Measured again after the steps: on a shared machine one measurement can land in a
    // busy moment; the reference is the better of the two.
    let rate_end = gemm_rate(&model.be, n_mm, 2) / 1e12;
    let fp32 = MatmulRate {
        dtype: "fp32",
        n: n_mm,
        tflops: rate_start.max(rate_end),
        path: format!("Backend::gemm of {}", backend_name),
        verified: model.be.verified(),
    };
    // The MFU's reference: the GEMM rate of the math the step's GEMMs use. In bf16 / fp16
    // that is the tensor-core rate where the backend measured one (CUDA); the CPU emulates
    // the reduced precisions with fp32 GEMMs, so fp32 stays its reference.
    let reference = match precision {
        Precision::Fp32 => fp32.clone(),
        Precision::Bf16 | Precision::Fp16 => extra
            .iter()
            .find(|r| r.dtype == "bf16")
            .cloned()
            .unwrap_or_else(|| fp32.clone()),
    };
    let spread = Spread::of(&times);
    let host = Spread::of(&host);
    let calls_per_step = match calls {
        (Some((l0, g0)), Some((l1, g1))) if args.steps > 0 => json!({
            "kernel_launches": (l1 - l0) as f64 / args.steps as f64,
            "gemms": (g1 - g0) as f64 / args.steps as f64,
        }),
        _ => Value::Null,
    };
    let flops = shape.flops();
    let tokens = shape.tokens();
    let achieved = flops.total() / spread.median / 1e12;
    let (a, m) = shape.anchors_columns();
    let first = losses.first().copied().unwrap_or_default();
    let last = losses.last().copied().unwrap_or_default();
    // Several json! blocks merged in order (one block overflows the macro's recursion limit).
    let parts = [
        json!({
            "command": "bench",
            "model": args.model_name(),
            "model_type": cfg.model_type.name(),
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads,
            "ffn": cfg.intermediate_size,
            "vocab": cfg.vocab_size,
            "labels": args.labels,
            "parameters": params,
            // config.json of the benched shape, so another implementation builds the same model
            "model_config": cfg.to_json(),
        }),
        json!({
            "bf": args.bf,
            "br": args.br,
            "seq_len": args.seq_len,
            "sequences_per_step": shape.sequences(),
            "tokens_per_step": tokens,
            "labelled_per_sequence": shape.labelled,
            "anchors": a,
            "valid_anchors": anchors,
            "columns": m,
            "steps": args.steps,
            "warmup": args.warmup,
            "seed": args.seed,
        }),
        json!({
            "device": device_name,
            "backend": backend_name,
            "precision": precision.name(),
            "precision_detail": precision.describe(),
            "threads": rayon::current_num_threads(),
            "verified": model.be.verified(),
            "paths": model.be.paths(precision, shape.hidden),
            "step_time_s": spread.to_json(),
            "step_timing": "pipelined as run trains: step s + 1 enqueued before step s's losses are waited for; \
                            a step's time is the interval between two consecutive steps' numbers coming back",
            // host time to assemble and enqueue a step; near step_time_s on a GPU = launch-bound
            "host_enqueue_s": host.to_json(),
            "host_enqueue_fraction": host.median / spread.median,
            // what the host enqueues per step (null on the CPU): host_enqueue_s over their
            // sum is the host's cost per call
            "device_calls_per_step": calls_per_step,
            // waits for the device while a step is enqueued: none in any precision (fp16's
            // overflow check is decided on the device; a step after an overflow runs again)
            "host_syncs_per_step": 0,
            "fp16_steps_rerun": opt.scaler.is_some().then_some(rerun),
            "tokens_per_s": tokens as f64 / spread.median,
            "flops_per_step": flops.total(),
            "flops_breakdown": {
                "linear": flops.linear,
                "attention": flops.attention,
                "head": flops.head,
                "contrast": flops.contrast,
            },
            "flops_formula": "3 x forward (2 N (4c^2 + 2cf) per layer + 4 S T^2 c per layer + 2 N c l) + 4 A M c; \
                              S = 2 bf + br sequences, N = S T tokens, A anchors, M columns",
            "achieved_tflops": achieved,
            "matmul_rate": fp32.to_json(),
            "matmul_tflops_start_end": [rate_start, rate_end],
            "other_matmul_rates": extra.iter().map(MatmulRate::to_json).collect::<Vec<_>>(),
            "mfu": achieved / reference.tflops,
            "mfu_reference": reference.to_json(),
            "skipped_steps": opt.scaler.as_ref().map_or(0, |s| s.skipped_steps),
        }),
        json!({
            "peak_rss_bytes": crate::util::peak_memory_bytes(),
            "device_memory_bytes": device_memory,
            "losses": {
                "first": {"ce": first.ce, "contrast": first.contrast, "total": first.total},
                "last": {"ce": last.ce, "contrast": last.contrast, "total": last.total},
            },
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
            "unix_time": crate::util::unix_time(),
            "self_check": super::selfcheck::passed().map(|c| c.describe()),
            "op_times": op_times_json(&op_times, args.op_times, args.steps, spread.median),
            "note": if model.be.verified() { Value::Null } else {
                json!("the CUDA backend's self-check did not run (DEEPCUT_SKIP_SELF_CHECK=1): correctness unverified")
            },
        }),
    ];
    let mut report = serde_json::Map::new();
    for part in parts {
        if let Value::Object(o) = part {
            report.extend(o);
        }
    }
    let report = Value::Object(report);
    eprintln!(
        "bench {} bf {} br {} seq {}: median {:.4} s/step (p10 {:.4}, p90 {:.4}; host enqueue {:.4}), {:.0} tokens/s, {:.3} TFLOP/s, \
         MFU {:.1}% of the measured {:.3} TFLOP/s {} GEMM ({}), peak RSS {:.2} GiB, load {}",
        args.model_name(),
        args.bf,
        args.br,
        args.seq_len,
        spread.median,
        spread.p10,
        spread.p90,
        host.median,
        tokens as f64 / spread.median,
        achieved,
        100.0 * achieved / reference.tflops,
        reference.tflops,
        reference.dtype,
        precision,
        crate::util::peak_memory_bytes() as f64 / (1u64 << 30) as f64,
        load_start
    );
    if let Some(Ok(times)) = &op_times {
        print_op_times(times, args.steps, spread.median);
    }
    Ok(report)
}

/// `--op-times` in the JSON: per op and per phase, ms and calls per timed step and the
/// share of the median step; null when not asked for, a string saying why when the backend
/// does not time ops or its events failed.
fn op_times_json(
    times: &Option<std::result::Result<Vec<OpTime>, String>>, asked: bool, steps: usize, step_s: f64,
) -> Value {
    let per = steps.max(1) as f64;
    let list = |phase: bool, t: &[OpTime]| -> Vec<Value> {
        t.iter()
            .filter(|o| o.phase == phase)
            .map(|o| {
                json!({
                    "name": o.name,
                    "inside_another_op": o.nested,
                    "ms_per_step": o.ms / per,
                    "calls_per_step": o.calls as f64 / per,
                    "share_of_step": o.ms / per / 1e3 / step_s,
                })
            })
            .collect()
    };
    match times {
        _ if !asked => Value::Null,
        None => json!("not timed: this backend has no device events (CPU)"),
        Some(Err(why)) => json!(format!("not timed: {why}")),
        Some(Ok(t)) => json!({
            "what": "device time between CUDA events recorded around each range, summed over the timed steps \
                     and divided by their number; a phase (layer, loss, optimiser) includes the ops inside it \
                     and the gaps between them; an op inside another op's range is part of that op's time",
            "ops": list(false, t),
            "phases": list(true, t),
        }),
    }
}

/// The longest ops on stderr, with their share of the median step.
fn print_op_times(times: &[OpTime], steps: usize, step_s: f64) {
    let per = steps.max(1) as f64;
    let ops: Vec<&OpTime> = times.iter().filter(|o| !o.phase).collect();
    let total: f64 = ops.iter().filter(|o| !o.nested).map(|o| o.ms).sum::<f64>() / per;
    eprintln!(
        "op times per step (device events; ops sum to {total:.3} ms of a {:.3} ms step):",
        step_s * 1e3
    );
    for o in ops.iter().take(15) {
        eprintln!(
            "  {:<28} {:>9.3} ms {:>6.1}%  {:>6.1} calls{}",
            o.name,
            o.ms / per,
            100.0 * o.ms / per / 1e3 / step_s,
            o.calls as f64 / per,
            if o.nested { " (inside another op)" } else { "" }
        );
    }
}
