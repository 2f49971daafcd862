//! The CPU backend: fp32 everywhere, threads on every core (rayon for element-wise and
//! row ops; matrixmultiply or the `gemm` crate for GEMMs, gemm.rs). It is the reference for every CUDA
//! kernel: each op lives in a file named after its kernel family and keeps the kernel's
//! argument order, and the free functions are what the parity tests call. Hot row loops
//! run in AVX-512/AVX2 builds picked at run time (simd.rs), bit-identical to the
//! baseline build.
pub mod adamw;
pub mod attention;
pub mod dropout;
pub mod embedding;
pub mod gelu;
pub mod gemm;
pub mod infonce;
pub mod l2norm;
pub mod layernorm;
pub mod mma_probe;
pub mod quantize;
pub mod rows;
pub mod simd;
pub mod softmax_ce;

use super::{AdamW, Backend, Dropout, InfoNceOptions, Precision};

/// CPU model name from /proc/cpuinfo ("unknown CPU" elsewhere).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string())
}

/// The host as the CPU backend sees it: model, rayon threads, the SIMD build of the
/// element-wise kernels and the GEMM library (both picked at run time), for `devices` and
/// the run report: CPU times mean little without them.
pub fn host() -> serde_json::Value {
    serde_json::json!({
        "model": cpu_model(),
        "threads": rayon::current_num_threads(),
        "simd": simd::level().name(),
        "gemm": gemm::kernel().name(),
    })
}

/// fp32 CPU backend. Buffers are plain vectors.
#[derive(Default, Clone)]
pub struct Cpu;

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type IBuf = Vec<i32>;
    type Staging = Vec<f32>;

    fn name(&self) -> String {
        format!("cpu (fp32, {} threads)", rayon::current_num_threads())
    }
    /// 512 tokens a thread, at least 1024: MiniLM's FFN activations of 1024 tokens are 6 MiB.
    /// `eval` of WNUT17 (5,690 sentences, 2 threads) took 15.1 s in batches of up to 8,192
    /// tokens, 13.9 s at 1,024-1,536, 15.2 s at 512 (BENCHMARKS.md).
    fn eval_batch_tokens(&self) -> Option<usize> {
        Some((512 * rayon::current_num_threads()).max(1024))
    }
    fn alloc(&self, n: usize) -> Vec<f32> {
        vec![0.0; n]
    }
    fn alloc_i32(&self, n: usize) -> Vec<i32> {
        vec![0; n]
    }
    fn upload(&self, dst: &mut Vec<f32>, src: &[f32]) {
        dst[..src.len()].copy_from_slice(src);
    }
    fn upload_i32(&self, dst: &mut Vec<i32>, src: &[i32]) {
        dst[..src.len()].copy_from_slice(src);
    }
    fn download(&self, src: &Vec<f32>, n: usize) -> Vec<f32> {
        src[..n].to_vec()
    }
    fn staging(&self, n: usize) -> Vec<f32> {
        vec![0.0; n]
    }
    fn download_start(&self, dst: &mut Vec<f32>, src: &Vec<f32>, n: usize) {
        dst[..n].copy_from_slice(&src[..n]);
    }
    fn download_wait<'a>(&self, src: &'a Vec<f32>, n: usize) -> &'a [f32] {
        &src[..n]
    }
    fn zero(&self, buf: &mut Vec<f32>, n: usize) {
        buf[..n].fill(0.0);
    }
    fn add_inplace(&self, dst: &mut Vec<f32>, src: &Vec<f32>, n: usize) {
        for (d, s) in dst[..n].iter_mut().zip(&src[..n]) {
            *d += s;
        }
    }
    fn copy(&self, dst: &mut Vec<f32>, src: &Vec<f32>, n: usize) {
        dst[..n].copy_from_slice(&src[..n]);
    }
    fn quantize(&self, x: &mut Vec<f32>, n: usize, precision: Precision) {
        quantize::quantize(x, n, precision)
    }
    fn gemm(
        &self, c: &mut Vec<f32>, a: &Vec<f32>, b: &Vec<f32>, m: usize, n: usize, k: usize, ta: bool, tb: bool,
        alpha: f32, beta: f32, _inputs: Precision,
    ) {
        // fp32 on any inputs: for values of `_inputs` this equals a bf16/fp16-input GEMM
        // with fp32 accumulation (the products are exact in fp32).
        gemm::gemm(c, a, b, m, n, k, ta, tb, alpha, beta)
    }
    fn add_bias(&self, out: &mut Vec<f32>, bias: &Vec<f32>, rows: usize, cols: usize) {
        gemm::add_bias(out, bias, rows, cols)
    }
    fn bias_grad(&self, dbias: &mut Vec<f32>, dout: &Vec<f32>, rows: usize, cols: usize) {
        gemm::bias_grad(dbias, dout, rows, cols)
    }
    fn embedding_fwd(
        &self, out: &mut Vec<f32>, ids: &Vec<i32>, pos: &Vec<i32>, types: &Vec<i32>, wte: &Vec<f32>, wpe: &Vec<f32>,
        wtt: &Vec<f32>, n: usize, c: usize,
    ) {
        embedding::embedding_fwd(out, ids, pos, types, wte, wpe, wtt, n, c)
    }
    fn embedding_bwd(
        &self, dwte: &mut Vec<f32>, dwpe: &mut Vec<f32>, dwtt: &mut Vec<f32>, dout: &Vec<f32>, ids: &Vec<i32>,
        pos: &Vec<i32>, types: &Vec<i32>, order: &Vec<i32>, n: usize, c: usize,
    ) {
        embedding::embedding_bwd(dwte, dwpe, dwtt, dout, ids, pos, types, order, n, c)
    }
    fn dropout_layernorm_fwd(
        &self, out: &mut Vec<f32>, mean: &mut Vec<f32>, rstd: &mut Vec<f32>, inp: &Vec<f32>, dropout: Dropout,
        residual: Option<&Vec<f32>>, weight: &Vec<f32>, bias: &Vec<f32>, n: usize, c: usize, eps: f32,
        rounding: Precision,
    ) {
        let res = residual.map(|r| r.as_slice());
        layernorm::layernorm_fwd(out, mean, rstd, inp, dropout, res, weight, bias, n, c, eps, rounding)
    }
    fn dropout_layernorm_bwd(
        &self, dsum: &mut Vec<f32>, mut dinp: Option<&mut Vec<f32>>, dinp_bias: Option<&mut Vec<f32>>,
        dweight: &mut Vec<f32>, dbias: &mut Vec<f32>, dout: &Vec<f32>, inp: &Vec<f32>, dropout: Dropout,
        residual: Option<&Vec<f32>>, weight: &Vec<f32>, mean: &Vec<f32>, rstd: &Vec<f32>, n: usize, c: usize,
        rounding: Precision,
    ) {
        assert!(
            dinp_bias.is_none() || dinp.is_some(),
            "dropout_layernorm_bwd: dinp_bias needs dinp"
        );
        let res = residual.map(|r| r.as_slice());
        layernorm::layernorm_bwd(
            dsum,
            dinp.as_deref_mut().map(|d| d.as_mut_slice()),
            dweight,
            dbias,
            dout,
            inp,
            dropout,
            res,
            weight,
            mean,
            rstd,
            n,
            c,
            rounding,
        );
        if let (Some(db), Some(d)) = (dinp_bias, dinp) {
            gemm::bias_grad(db, d, n, c);
        }
    }
    fn bias_gelu_fwd(
        &self, out: &mut Vec<f32>, inp: &Vec<f32>, bias: &Vec<f32>, n: usize, c: usize, rounding: Precision,
    ) {
        gelu::bias_gelu_fwd(out, inp, bias, n, c, rounding)
    }
    fn bias_gelu_bwd(
        &self, dinp: &mut Vec<f32>, dbias: &mut Vec<f32>, dout: &Vec<f32>, inp: &Vec<f32>, bias: &Vec<f32>, n: usize,
        c: usize, rounding: Precision,
    ) {
        gelu::bias_gelu_bwd(dinp, dbias, dout, inp, bias, n, c, rounding)
    }
    fn attention_fwd(
        &self, out: &mut Vec<f32>, lse: &mut Vec<f32>, q: &Vec<f32>, k: &Vec<f32>, v: &Vec<f32>, seqs: &Vec<i32>,
        b: usize, n: usize, t: usize, h: usize, d: usize, dropout: Dropout, inputs: Precision,
    ) {
        attention::attention_fwd(out, lse, q, k, v, seqs, b, n, t, h, d, dropout, inputs)
    }
    fn attention_bwd(
        &self, dq: &mut Vec<f32>, dk: &mut Vec<f32>, dv: &mut Vec<f32>, dout: &Vec<f32>, q: &Vec<f32>, k: &Vec<f32>,
        v: &Vec<f32>, out: &Vec<f32>, lse: &Vec<f32>, seqs: &Vec<i32>, b: usize, n: usize, t: usize, h: usize,
        d: usize, dropout: Dropout, inputs: Precision,
    ) {
        attention::attention_bwd(
            dq, dk, dv, dout, q, k, v, out, lse, seqs, b, n, t, h, d, dropout, inputs,
        )
    }
    fn dropout_fwd(&self, out: &mut Vec<f32>, inp: &Vec<f32>, n: usize, d: Dropout, rounding: Precision) {
        dropout::dropout_fwd(out, inp, n, d, rounding)
    }
    fn dropout_bwd(&self, dinp: &mut Vec<f32>, dout: &Vec<f32>, n: usize, d: Dropout, rounding: Precision) {
        dropout::dropout_bwd(dinp, dout, n, d, rounding)
    }
    fn dropout_duplicate(
        &self, out: &mut Vec<f32>, inp: &Vec<f32>, n_dup: usize, n: usize, d: Dropout, rounding: Precision,
    ) {
        dropout::dropout_duplicate(out, inp, n_dup, n, d, rounding)
    }
    fn dropout_duplicate_bwd(&self, dinp: &mut Vec<f32>, dout: &Vec<f32>, n_dup: usize, n: usize, d: Dropout) {
        dropout::dropout_duplicate_bwd(dinp, dout, n_dup, n, d)
    }
    fn softmax_ce_fwd(&self, losses: &mut Vec<f32>, logits: &Vec<f32>, labels: &Vec<i32>, n: usize, v: usize) {
        softmax_ce::softmax_ce_fwd(losses, logits, labels, n, v)
    }
    fn softmax_ce_bwd(
        &self, dlogits: &mut Vec<f32>, logits: &Vec<f32>, labels: &Vec<i32>, n: usize, v: usize, scale: f32,
    ) {
        softmax_ce::softmax_ce_bwd(dlogits, logits, labels, n, v, scale)
    }
    fn gather_rows(&self, out: &mut Vec<f32>, src: &Vec<f32>, idx: &Vec<i32>, m: usize, c: usize) {
        rows::gather_rows(out, src, idx, m, c)
    }
    fn scatter_add_rows(&self, dst: &mut Vec<f32>, src: &Vec<f32>, idx: &Vec<i32>, m: usize, c: usize) {
        rows::scatter_add_rows(dst, src, idx, m, c)
    }
    fn l2norm_fwd(&self, out: &mut Vec<f32>, norm: &mut Vec<f32>, inp: &Vec<f32>, m: usize, c: usize) {
        l2norm::l2norm_fwd(out, norm, inp, m, c)
    }
    fn l2norm_bwd(&self, dinp: &mut Vec<f32>, dout: &Vec<f32>, out: &Vec<f32>, norm: &Vec<f32>, m: usize, c: usize) {
        l2norm::l2norm_bwd(dinp, dout, out, norm, m, c)
    }
    fn infonce_fwd(
        &self, loss: &mut Vec<f32>, lse: &mut Vec<f32>, z: &Vec<f32>, labels: &Vec<i32>, anchor: &Vec<i32>,
        partner: &Vec<i32>, m: usize, c: usize, opts: InfoNceOptions, inputs: Precision,
    ) {
        infonce::infonce_fwd(loss, lse, z, labels, anchor, partner, m, c, opts, inputs)
    }
    fn infonce_bwd(
        &self, dz: &mut Vec<f32>, z: &Vec<f32>, lse: &Vec<f32>, labels: &Vec<i32>, anchor: &Vec<i32>,
        partner: &Vec<i32>, m: usize, c: usize, opts: InfoNceOptions, scale: f32, inputs: Precision,
    ) {
        infonce::infonce_bwd(dz, z, lse, labels, anchor, partner, m, c, opts, scale, inputs)
    }
    fn adamw(
        &self, param: &mut Vec<f32>, grad: &Vec<f32>, m: &mut Vec<f32>, v: &mut Vec<f32>, n: usize, hp: AdamW,
        step: u64, grad_scale: f32,
    ) {
        adamw::adamw(
            param,
            grad,
            m,
            v,
            n,
            hp.lr,
            hp.beta1,
            hp.beta2,
            hp.eps,
            hp.weight_decay,
            step,
            grad_scale,
        )
    }
    fn sum_squares(&self, x: &Vec<f32>, n: usize) -> f64 {
        adamw::sum_squares(x, n)
    }
}
