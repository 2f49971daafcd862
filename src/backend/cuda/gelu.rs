//! Bias + GELU (kernels/gelu.cu). CPU twin: cpu/gelu.rs.
use super::gemm::column_grid;
use super::{check, ensure, grid_1d, int, need, round_code, vec4_aligned, Cuda, CudaBuf, BLOCK};
use crate::backend::Precision;
use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};

/// out = gelu(inp + bias) (erf form), rows of width c, rounded to `rounding`; out and inp
/// in any storage.
pub fn bias_gelu_fwd(
    cu: &Cuda, out: &mut CudaBuf, inp: &CudaBuf, bias: &CudaSlice<f32>, n: usize, c: usize, rounding: Precision,
) {
    let total = n * c;
    if total == 0 {
        return;
    }
    let _r = cu.range("bias_gelu_fwd");
    need(out.len(), total, "bias_gelu_fwd out");
    need(inp.len(), total, "bias_gelu_fwd inp");
    need(bias.len(), c, "bias_gelu_fwd bias");
    let (ni, ci) = (int(n, "gelu n"), int(c, "gelu c"));
    int(total, "gelu n*c");
    let (po, to, pi, ti) = (out.addr(&cu.stream), out.code(), inp.addr(&cu.stream), inp.code());
    // four elements a thread where rows split into aligned groups of four (kernels/gelu.cu)
    let vec4 = c.is_multiple_of(4)
        && vec4_aligned(po, to)
        && vec4_aligned(pi, ti)
        && vec4_aligned(bias.device_ptr(&cu.stream).0, 0);
    let (name, threads) = if vec4 {
        ("bias_gelu_fwd_vec4_f32", total / 4)
    } else {
        ("bias_gelu_fwd_f32", total)
    };
    let mut l = cu.stream.launch_builder(cu.func(name));
    let round = round_code(rounding);
    l.arg(&po)
        .arg(&to)
        .arg(&pi)
        .arg(&ti)
        .arg(bias)
        .arg(&ni)
        .arg(&ci)
        .arg(&round);
    // SAFETY: (void* out, int out_t, const void* inp, int inp_t, const float* bias, int n,
    // int c, int round); one thread per element < n*c of out and inp (each of its type's
    // storage), bias[..c]; the _vec4 kernel one per group of four, with c % 4 == 0 and the
    // alignments checked above; sizes checked above.
    check(unsafe { l.launch(grid_1d(threads, BLOCK)) }, name);
}

/// dinp = dout * gelu'(inp + bias) (overwritten, rounded to `rounding`); dbias += column
/// sums of dinp as written. One launch of `bias_gelu_bwd_f32`.
#[allow(clippy::too_many_arguments)]
pub fn bias_gelu_bwd(
    cu: &Cuda, dinp: &mut CudaBuf, dbias: &mut CudaSlice<f32>, dout: &CudaBuf, inp: &CudaBuf, bias: &CudaSlice<f32>,
    n: usize, c: usize, rounding: Precision,
) {
    let total = n * c;
    if total == 0 {
        return;
    }
    let _r = cu.range("bias_gelu_bwd");
    for (len, what) in [(dinp.len(), "dinp"), (dout.len(), "dout"), (inp.len(), "inp")] {
        need(len, total, what);
    }
    need(bias.len(), c, "bias_gelu_bwd bias");
    let (ni, ci) = (int(n, "gelu n"), int(c, "gelu c"));
    int(total, "gelu n*c");
    need(dbias.len(), c, "bias_gelu_bwd dbias");
    let (cfg, chunks) = column_grid(n, c, BLOCK);
    let (pd, td) = (dinp.addr(&cu.stream), dinp.code());
    let (pg, tg, pi, ti) = (dout.addr(&cu.stream), dout.code(), inp.addr(&cu.stream), inp.code());
    let round = round_code(rounding);
    let mut guard = cu.scratch.lock().unwrap();
    let s = &mut *guard;
    let partial = ensure(cu, &mut s.f32_a, chunks * c);
    let counters = ensure(cu, &mut s.counters, cfg.grid_dim.0 as usize);
    let mut l = cu.stream.launch_builder(cu.func("bias_gelu_bwd_f32"));
    l.arg(&pd).arg(&td).arg(&pg).arg(&tg).arg(&pi).arg(&ti);
    l.arg(bias).arg(&ni).arg(&ci).arg(&round);
    l.arg(dbias).arg(&mut *partial).arg(&mut *counters);
    // SAFETY: (void* dinp, int dinp_t, const void* dout, int dout_t, const void* inp, int
    // inp_t, const float* bias, int n, int c, int round, float* dbias, float* partial,
    // unsigned* counters); block (x, k) reads and writes column block x of the rows of chunk
    // k of dinp, dout and inp (n*c elements, each of its type's storage) and bias[..c],
    // writes partial[k*c + j] (chunks*c floats, ensure), counts in counters[x] (grid x
    // entries, ensure: zero, left zero); the last block of column block x updates dbias[j]
    // for j < c (c floats); sizes checked above.
    check(unsafe { l.launch(cfg) }, "bias_gelu_bwd_f32");
}
