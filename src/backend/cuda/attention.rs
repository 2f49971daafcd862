//! Fused multi-head self-attention: kernels/attention.cu (fp32, CUDA cores) and
//! kernels/attention_mma.cu (bf16 / fp16 inputs, tensor cores). CPU twin: cpu/attention.rs.
use super::{check, ensure, int, need, Cuda, CudaBuf, DropoutArgs};
use crate::backend::{Dropout, Precision};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// ATT_TILE, ATT_WARPS and ATT_DMAX of kernels/attention.cu.
const TILE: usize = 32;
const WARPS: usize = 8;
pub const MAX_HEAD_DIM: usize = 128;
/// AM_ROWS and AM_WARPS of kernels/attention_mma.cu.
const MMA_ROWS: usize = 64;
const MMA_WARPS: usize = 4;

/// Every entry point of kernels/attention_mma.cu: the parameters of each are those of its
/// fp32 twin (`attention_fwd_mma_bf16_d64` <-> `attention_fwd_f32`) and `io` last
/// (tests/cuda_build.rs checks it), so the launches below push the same arguments, then io.
const MMA_KERNELS: [&str; 18] = [
    "attention_fwd_mma_bf16_d32",
    "attention_fwd_mma_bf16_d64",
    "attention_fwd_mma_bf16_d128",
    "attention_fwd_mma_f16_d32",
    "attention_fwd_mma_f16_d64",
    "attention_fwd_mma_f16_d128",
    "attention_bwd_dq_mma_bf16_d32",
    "attention_bwd_dq_mma_bf16_d64",
    "attention_bwd_dq_mma_bf16_d128",
    "attention_bwd_dq_mma_f16_d32",
    "attention_bwd_dq_mma_f16_d64",
    "attention_bwd_dq_mma_f16_d128",
    "attention_bwd_dkdv_mma_bf16_d32",
    "attention_bwd_dkdv_mma_bf16_d64",
    "attention_bwd_dkdv_mma_bf16_d128",
    "attention_bwd_dkdv_mma_f16_d32",
    "attention_bwd_dkdv_mma_f16_d64",
    "attention_bwd_dkdv_mma_f16_d128",
];

/// The tensor-core kernel `kernel` (fwd, bwd_dq, bwd_dkdv) for 16-bit `inputs` and head dim
/// d (padded to 32, 64 or 128, the instantiations), with its launch shape (static shared
/// memory).
fn mma_kernel(kernel: &str, inputs: Precision, b: usize, t: usize, h: usize, d: usize) -> (&'static str, LaunchConfig) {
    let ty = match inputs {
        Precision::Bf16 => "bf16",
        Precision::Fp16 => "f16",
        Precision::Fp32 => unreachable!("fp32 attention runs the SIMT kernels"),
    };
    let dp = [32, 64, 128].into_iter().find(|&p| d <= p).expect("head dim checked");
    let cfg = LaunchConfig {
        grid_dim: (t.div_ceil(MMA_ROWS) as u32, h as u32, b as u32),
        block_dim: ((MMA_WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let name = format!("attention_{kernel}_mma_{ty}_d{dp}");
    let name = MMA_KERNELS
        .iter()
        .find(|n| **n == name)
        .expect("an instantiated kernel");
    (name, cfg)
}

/// The tensor-core kernels' `io`: 1 when the activation buffers are stored in 16 bits (all
/// of them, of the precision `inputs` names), 0 when they are fp32. Panics naming `what`
/// on a mix, or on 16-bit storage of another type than `inputs`.
fn io_code(what: &str, bufs: &[&CudaBuf], inputs: Precision) -> i32 {
    let p = bufs[0].precision();
    assert!(
        bufs.iter().all(|b| b.precision() == p),
        "{what}: the activation buffers are stored in different types"
    );
    match p {
        Precision::Fp32 => 0,
        p if p == inputs => 1,
        p => panic!("{what}: {p} buffers with {inputs} inputs"),
    }
}

fn cfg(b: usize, t: usize, h: usize, smem_floats: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (t.div_ceil(WARPS) as u32, h as u32, b as u32),
        block_dim: ((WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: (smem_floats * 4) as u32,
    }
}

/// The shape of a packed (varlen) attention call: b sequences of at most t tokens, n
/// tokens in all, h heads of width d (`Backend::attention_fwd`).
#[derive(Clone, Copy, Debug)]
pub struct Packed {
    pub b: usize,
    pub n: usize,
    pub t: usize,
    pub h: usize,
    pub d: usize,
}

impl Packed {
    /// Checks the sizes the kernels index by: every activation buffer holds n * h * d, lse
    /// (and D) n * h, seqs b + 1 offsets, the dropout counter fits 64 bits and the rest
    /// the kernels' int arithmetic. The offsets themselves are the host's (the batcher
    /// builds them, `cpu::attention::spans` states the contract) and are not read back.
    fn check(&self, what: &str, bufs: &[usize], lse: usize, seqs: usize) -> (i32, i32, i32, i32) {
        let Packed { b, n, t, h, d } = *self;
        assert!(
            d <= MAX_HEAD_DIM,
            "{what}: head dim {d} > {MAX_HEAD_DIM} is not supported by kernels/attention.cu"
        );
        assert!(n <= b * t, "{what}: {n} tokens in {b} sequences of at most {t}");
        int(n * h * d, "attention n*h*d");
        int(b * h * t, "attention b*h*t");
        for &len in bufs {
            need(len, n * h * d, what);
        }
        need(lse, n * h, what);
        need(seqs, b + 1, what);
        (int(b, "b"), int(t, "t"), int(h, "h"), int(d, "d"))
    }
}

/// out = softmax(q k^T / sqrt(d)) v within each packed sequence, with dropout on the
/// probabilities; lse [n, h] saved. q, k, v, out [n, h*d]; seqs [b+1] (`Backend::
/// attention_fwd`). `inputs` bf16 / fp16: the tensor-core kernel, on fp32 buffers or on
/// 16-bit ones of that type (all four alike).
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd(
    cu: &Cuda, out: &mut CudaBuf, lse: &mut CudaSlice<f32>, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf,
    seqs: &CudaSlice<i32>, shape: Packed, dropout: Dropout, inputs: Precision,
) {
    let Packed { b, n, t, h, d } = shape;
    if n * h == 0 {
        return;
    }
    let _r = cu.range("attention_fwd");
    let bufs = [out.len(), q.len(), k.len(), v.len()];
    let (bi, ti, hi, di) = shape.check("attention_fwd", &bufs, lse.len(), seqs.len());
    let args = DropoutArgs::from(dropout);
    if inputs != Precision::Fp32 {
        let io = io_code("attention_fwd", &[out, q, k, v], inputs);
        let (name, cfg) = mma_kernel("fwd", inputs, b, t, h, d);
        let s = &cu.stream;
        let (po, pq, pk, pv) = (out.addr(s), q.addr(s), k.addr(s), v.addr(s));
        let mut l = cu.stream.launch_builder(cu.func(name));
        l.arg(&po).arg(lse).arg(&pq).arg(&pk).arg(&pv).arg(seqs);
        l.arg(&bi).arg(&ti).arg(&hi).arg(&di).arg(&args).arg(&io);
        // SAFETY: the same signature, reads and writes as attention_fwd_f32 below, out, q,
        // k and v untyped and then `int io` (1: they are 16-bit buffers, checked above);
        // shared memory is static (< 20 KiB for d <= 128).
        check(unsafe { l.launch(cfg) }, name);
        return;
    }
    let w = "attention_fwd (fp32)";
    let smem = 2 * TILE * (d + 1) + WARPS * d + TILE;
    let mut l = cu.stream.launch_builder(cu.func("attention_fwd_f32"));
    l.arg(out.f32_mut(w))
        .arg(lse)
        .arg(q.f32(w))
        .arg(k.f32(w))
        .arg(v.f32(w))
        .arg(seqs);
    l.arg(&bi).arg(&ti).arg(&hi).arg(&di).arg(&args);
    // SAFETY: (float* out, float* lse, const float* q, const float* k, const float* v, const
    // int* seqs, int b, int t, int h, int d, DropoutArgs drop); block (query tile, head,
    // sequence) reads the rows seqs[bi] .. seqs[bi+1] (< n, the batcher's offsets) of its
    // head of q, k, v, writes its query rows of out and lse; sizes checked above; dynamic
    // shared memory as the kernel's comment specifies (< 48 KiB for d <= 128).
    check(unsafe { l.launch(cfg(b, t, h, smem)) }, "attention_fwd_f32");
}

/// dq, dk, dv (overwritten) from dout, recomputing the probabilities from lse; two
/// kernels (dq and D = rowsum(dO * O); then dk, dv), no atomics; tensor cores for
/// `inputs` bf16 / fp16.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    cu: &Cuda, dq: &mut CudaBuf, dk: &mut CudaBuf, dv: &mut CudaBuf, dout: &CudaBuf, q: &CudaBuf, k: &CudaBuf,
    v: &CudaBuf, out: &CudaBuf, lse: &CudaSlice<f32>, seqs: &CudaSlice<i32>, shape: Packed, dropout: Dropout,
    inputs: Precision,
) {
    let Packed { b, n, t, h, d } = shape;
    if n * h == 0 {
        return;
    }
    let _r = cu.range("attention_bwd");
    let bufs = [
        dq.len(),
        dk.len(),
        dv.len(),
        dout.len(),
        q.len(),
        k.len(),
        v.len(),
        out.len(),
    ];
    let (bi, ti, hi, di) = shape.check("attention_bwd", &bufs, lse.len(), seqs.len());
    let args = DropoutArgs::from(dropout);
    let mut guard = cu.scratch.lock().unwrap();
    let dvec = ensure(cu, &mut guard.f32_b, n * h);

    if inputs != Precision::Fp32 {
        let io = io_code("attention_bwd", &[dq, dk, dv, dout, q, k, v, out], inputs);
        let (dq_kernel, dkdv_kernel) = (
            mma_kernel("bwd_dq", inputs, b, t, h, d),
            mma_kernel("bwd_dkdv", inputs, b, t, h, d),
        );
        let s = &cu.stream;
        let (pq, pk, pv, pg, po) = (q.addr(s), k.addr(s), v.addr(s), dout.addr(s), out.addr(s));
        let (pdq, pdk, pdv) = (dq.addr(s), dk.addr(s), dv.addr(s));
        let mut l = cu.stream.launch_builder(cu.func(dq_kernel.0));
        l.arg(&pdq)
            .arg(&mut *dvec)
            .arg(&pg)
            .arg(&pq)
            .arg(&pk)
            .arg(&pv)
            .arg(&po)
            .arg(lse)
            .arg(seqs);
        l.arg(&bi).arg(&ti).arg(&hi).arg(&di).arg(&args).arg(&io);
        // SAFETY: as attention_bwd_dq_f32 below, the activations untyped and then `int io`
        // (1: they are 16-bit buffers, checked above).
        check(unsafe { l.launch(dq_kernel.1) }, dq_kernel.0);
        let mut l = cu.stream.launch_builder(cu.func(dkdv_kernel.0));
        l.arg(&pdk)
            .arg(&pdv)
            .arg(&pg)
            .arg(&pq)
            .arg(&pk)
            .arg(&pv)
            .arg(lse)
            .arg(&*dvec)
            .arg(seqs);
        l.arg(&bi).arg(&ti).arg(&hi).arg(&di).arg(&args).arg(&io);
        // SAFETY: as attention_bwd_dkdv_f32 below, the activations untyped and then `int io`;
        // dvec written by the launch before on the same stream.
        check(unsafe { l.launch(dkdv_kernel.1) }, dkdv_kernel.0);
        return;
    }
    let w = "attention_bwd (fp32)";
    let (dq, dk, dv) = (dq.f32_mut(w), dk.f32_mut(w), dv.f32_mut(w));
    let (dout, q, k, v, out) = (dout.f32(w), q.f32(w), k.f32(w), v.f32(w), out.f32(w));
    let cfg_dq = cfg(b, t, h, 2 * TILE * (d + 1) + 2 * WARPS * d + TILE);
    let cfg_dkdv = cfg(b, t, h, 2 * TILE * (d + 1) + 2 * WARPS * d + 2 * TILE);
    let mut l = cu.stream.launch_builder(cu.func("attention_bwd_dq_f32"));
    l.arg(dq)
        .arg(&mut *dvec)
        .arg(dout)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(out)
        .arg(lse)
        .arg(seqs);
    l.arg(&bi).arg(&ti).arg(&hi).arg(&di).arg(&args);
    // SAFETY: (float* dq, float* dvec, const float* dout, const float* q, const float* k,
    // const float* v, const float* out, const float* lse, const int* seqs, int b, int t,
    // int h, int d, DropoutArgs drop); each block writes its query rows of dq and dvec
    // [n, h] (ensure), reads the rows of its sequence and head; sizes checked above.
    check(unsafe { l.launch(cfg_dq) }, "attention_bwd_dq_f32");

    let mut l = cu.stream.launch_builder(cu.func("attention_bwd_dkdv_f32"));
    l.arg(dk)
        .arg(dv)
        .arg(dout)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(lse)
        .arg(&*dvec)
        .arg(seqs);
    l.arg(&bi).arg(&ti).arg(&hi).arg(&di).arg(&args);
    // SAFETY: (float* dk, float* dv, const float* dout, const float* q, const float* k,
    // const float* v, const float* lse, const float* dvec, const int* seqs, int b, int t,
    // int h, int d, DropoutArgs drop); each block writes its key rows of dk and dv, reads
    // the rows of its sequence and head and dvec written by the launch before on the
    // same stream.
    check(unsafe { l.launch(cfg_dkdv) }, "attention_bwd_dkdv_f32");
}
