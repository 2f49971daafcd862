//! LayerNorm with an optional fused residual add and the input's dropout fused in
//! (kernels/layernorm.cu). CPU twin: cpu/layernorm.rs.
use super::gemm::column_grid;
use super::{check, ensure, int, need, round_code, vec4_aligned, Cuda, CudaBuf, DropoutArgs};
use crate::backend::{Dropout, Precision};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

/// Threads per row block (kernels/layernorm.cu LN_THREADS).
const LN_BLOCK: u32 = 128;
/// The widest row the _vec4 kernels take (kernels/layernorm.cu LN_MAX_C: four groups of
/// four per thread).
const LN_MAX_C: usize = 4 * 4 * LN_BLOCK as usize;

/// Whether the row kernels can read rows four elements at a time (kernels/layernorm.cu
/// `layernorm_fwd_vec4_f32`): width a multiple of 4 up to LN_MAX_C, and each buffer
/// (address, storage code; address 0: none) aligned to four of its elements.
fn vec4(c: usize, bufs: &[(u64, i32)]) -> bool {
    c.is_multiple_of(4) && c <= LN_MAX_C && bufs.iter().all(|&(a, t)| vec4_aligned(a, t))
}

fn row_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (LN_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// out = LayerNorm(dropout(inp) + residual) over rows of width c (rounded to `rounding`;
/// `Dropout::OFF`: no dropout); mean and 1/std saved per row. out, inp and residual in
/// any storage.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd(
    cu: &Cuda, out: &mut CudaBuf, mean: &mut CudaSlice<f32>, rstd: &mut CudaSlice<f32>, inp: &CudaBuf,
    dropout: Dropout, residual: Option<&CudaBuf>, weight: &CudaSlice<f32>, bias: &CudaSlice<f32>, n: usize, c: usize,
    eps: f32, rounding: Precision,
) {
    if n == 0 {
        return;
    }
    let _r = cu.range("layernorm_fwd");
    need(out.len(), n * c, "layernorm_fwd out");
    need(inp.len(), n * c, "layernorm_fwd inp");
    if let Some(r) = residual {
        need(r.len(), n * c, "layernorm_fwd residual");
    }
    need(mean.len(), n, "layernorm_fwd mean");
    need(rstd.len(), n, "layernorm_fwd rstd");
    need(weight.len(), c, "layernorm_fwd weight");
    need(bias.len(), c, "layernorm_fwd bias");
    let (ni, ci) = (int(n, "layernorm n"), int(c, "layernorm c"));
    int(n * c, "layernorm n*c");
    let (po, to, pi, ti) = (out.addr(&cu.stream), out.code(), inp.addr(&cu.stream), inp.code());
    let (pr, tr) = residual.map_or((0, 0), |r| (r.addr(&cu.stream), r.code()));
    let (pw, pb) = (weight.device_ptr(&cu.stream).0, bias.device_ptr(&cu.stream).0);
    let name = if vec4(c, &[(po, to), (pi, ti), (pr, tr), (pw, 0), (pb, 0)]) {
        "layernorm_fwd_vec4_f32"
    } else {
        "layernorm_fwd_f32"
    };
    let mut l = cu.stream.launch_builder(cu.func(name));
    l.arg(&po)
        .arg(&to)
        .arg(mean)
        .arg(rstd)
        .arg(&pi)
        .arg(&ti)
        .arg(&pr)
        .arg(&tr);
    let round = round_code(rounding);
    let drop = DropoutArgs::from(dropout);
    l.arg(weight)
        .arg(bias)
        .arg(&ni)
        .arg(&ci)
        .arg(&eps)
        .arg(&round)
        .arg(&drop);
    // SAFETY: (void* out, int out_t, float* mean, float* rstd, const void* inp, int inp_t,
    // const void* residual (null: none), int res_t, const float* weight, const float* bias,
    // int n, int c, float eps, int round, DropoutArgs drop); block r < n reads row r of inp
    // (and residual), weight and bias [c], writes row r of out, mean[r], rstd[r], each
    // buffer of its type's storage; sizes checked above; the _vec4 kernel only with the
    // widths and alignments `vec4` checked, LN_BLOCK threads.
    check(unsafe { l.launch(row_cfg(n)) }, name);
}

/// dsum = d loss / d(dropout(inp) + residual) (overwritten); with `dinp`, the gradient of
/// inp through the mask too (rounded to `rounding`), in the same pass; dweight, dbias
/// accumulated, with the CPU's fixed chunking (cpu::gemm::REDUCE_ROWS rows per partial,
/// partials added in order), and with `dinp_bias` the column sums of dinp as stored too,
/// in the same launch. dinp, inp and residual in any storage.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd(
    cu: &Cuda, dsum: &mut CudaSlice<f32>, dinp: Option<&mut CudaBuf>, dinp_bias: Option<&mut CudaSlice<f32>>,
    dweight: &mut CudaSlice<f32>, dbias: &mut CudaSlice<f32>, dout: &CudaSlice<f32>, inp: &CudaBuf, dropout: Dropout,
    residual: Option<&CudaBuf>, weight: &CudaSlice<f32>, mean: &CudaSlice<f32>, rstd: &CudaSlice<f32>, n: usize,
    c: usize, rounding: Precision,
) {
    if n == 0 {
        return;
    }
    let _r = cu.range("layernorm_bwd");
    for (len, what) in [(dsum.len(), "dsum"), (dout.len(), "dout"), (inp.len(), "inp")] {
        need(len, n * c, what);
    }
    if let Some(d) = &dinp {
        need(d.len(), n * c, "layernorm_bwd dinp");
    }
    assert!(
        dinp_bias.is_none() || dinp.is_some(),
        "layernorm_bwd: dinp_bias needs dinp"
    );
    if let Some(b) = &dinp_bias {
        need(b.len(), c, "layernorm_bwd dinp_bias");
    }
    if let Some(r) = residual {
        need(r.len(), n * c, "layernorm_bwd residual");
    }
    for (len, what) in [
        (weight.len(), "weight"),
        (dweight.len(), "dweight"),
        (dbias.len(), "dbias"),
    ] {
        need(len, c, what);
    }
    need(mean.len(), n, "layernorm_bwd mean");
    need(rstd.len(), n, "layernorm_bwd rstd");
    let (ni, ci) = (int(n, "layernorm n"), int(c, "layernorm c"));
    int(n * c, "layernorm n*c");
    let drop = DropoutArgs::from(dropout);
    let round = round_code(rounding);
    let (pd, td) = dinp.map_or((0, 0), |d| (d.addr(&cu.stream), d.code()));
    let (pi, ti) = (inp.addr(&cu.stream), inp.code());
    let (pr, tr) = residual.map_or((0, 0), |r| (r.addr(&cu.stream), r.code()));
    let (ps, pg, pw) = (
        dsum.device_ptr(&cu.stream).0,
        dout.device_ptr(&cu.stream).0,
        weight.device_ptr(&cu.stream).0,
    );
    let name = if vec4(c, &[(ps, 0), (pd, td), (pg, 0), (pi, ti), (pr, tr), (pw, 0)]) {
        "layernorm_bwd_dinp_vec4_f32"
    } else {
        "layernorm_bwd_dinp_f32"
    };
    let mut l = cu.stream.launch_builder(cu.func(name));
    l.arg(&mut *dsum)
        .arg(&pd)
        .arg(&td)
        .arg(dout)
        .arg(&pi)
        .arg(&ti)
        .arg(&pr)
        .arg(&tr);
    l.arg(weight)
        .arg(mean)
        .arg(rstd)
        .arg(&ni)
        .arg(&ci)
        .arg(&drop)
        .arg(&round);
    // SAFETY: (float* dsum, void* dinp (null: none), int dinp_t, const float* dout, const
    // void* inp, int inp_t, const void* residual (null: none), int res_t, const float*
    // weight, const float* mean, const float* rstd, int n, int c, DropoutArgs drop, int
    // round); block r < n reads row r of dout, inp, residual and mean/rstd[r], writes row r
    // of dsum and dinp, each buffer of its type's storage; sizes checked above; the _vec4
    // kernel only with the widths and alignments `vec4` checked, LN_BLOCK threads.
    check(unsafe { l.launch(row_cfg(n)) }, name);

    let (cfg, chunks) = column_grid(n, c, 128);
    let mut guard = cu.scratch.lock().unwrap();
    let s = &mut *guard;
    let pw = ensure(cu, &mut s.f32_a, chunks * c);
    let pb = ensure(cu, &mut s.f32_b, chunks * c);
    let pp = ensure(cu, &mut s.f32_c, if dinp_bias.is_some() { chunks * c } else { 1 });
    let counters = ensure(cu, &mut s.counters, cfg.grid_dim.0 as usize);
    let pdb = dinp_bias.map_or(0, |b| {
        let (p, _sync) = b.device_ptr_mut(&cu.stream);
        p
    });
    let mut l = cu.stream.launch_builder(cu.func("layernorm_bwd_params_f32"));
    l.arg(dweight)
        .arg(dbias)
        .arg(&pdb)
        .arg(&pd)
        .arg(&td)
        .arg(&mut *pw)
        .arg(&mut *pb)
        .arg(&mut *pp)
        .arg(&mut *counters)
        .arg(dout)
        .arg(&pi)
        .arg(&ti)
        .arg(&pr)
        .arg(&tr);
    l.arg(mean).arg(rstd).arg(&ni).arg(&ci).arg(&drop);
    // SAFETY: (float* dweight, float* dbias, float* dinp_bias (null: none), const void*
    // dinp, int dinp_t, float* pw, float* pb, float* pp, unsigned* counters, const float*
    // dout, const void* inp, int inp_t, const void* residual, int res_t, const float* mean,
    // const float* rstd, int n, int c, DropoutArgs drop); block (x, k) reads column block x
    // of the rows of chunk k (of dinp too, n*c of its storage, when dinp_bias is set) and
    // writes pw/pb (and pp with dinp_bias)[k*c + j] (chunks*c floats each, ensure), counts
    // in counters[x] (grid x entries, ensure: zero, left zero); the last block of column
    // block x updates dweight/dbias (and dinp_bias)[j] for j < c; the rest is checked above.
    check(unsafe { l.launch(cfg) }, "layernorm_bwd_params_f32");
}
