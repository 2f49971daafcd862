//! Dropout from Philox counters (kernels/dropout.cu). CPU twin: cpu/dropout.rs.
use super::{check, grid_1d, int, need, round_code, Cuda, CudaBuf, DropoutArgs, BLOCK};
use crate::backend::{Dropout, Precision};
use cudarc::driver::PushKernelArg;

/// out = inp * mask / (1-p) (a copy when p = 0), rounded to `rounding`.
pub fn dropout_fwd(cu: &Cuda, out: &mut CudaBuf, inp: &CudaBuf, n: usize, d: Dropout, rounding: Precision) {
    launch_elementwise(cu, "dropout_fwd_f32", out, inp, n, d, rounding);
}

/// dinp = dout * mask / (1-p), the forward's mask regenerated, rounded to `rounding`.
pub fn dropout_bwd(cu: &Cuda, dinp: &mut CudaBuf, dout: &CudaBuf, n: usize, d: Dropout, rounding: Precision) {
    launch_elementwise(cu, "dropout_bwd_f32", dinp, dout, n, d, rounding);
}

/// The two launches above (out and inp in any storage).
fn launch_elementwise(
    cu: &Cuda, kernel: &str, out: &mut CudaBuf, inp: &CudaBuf, n: usize, d: Dropout, rounding: Precision,
) {
    if n == 0 {
        return;
    }
    let _r = cu.range(kernel);
    need(out.len(), n, kernel);
    need(inp.len(), n, kernel);
    let (ni, args) = (int(n, "dropout n"), DropoutArgs::from(d));
    let mut l = cu.stream.launch_builder(cu.func(kernel));
    let round = round_code(rounding);
    let (po, to, pi, ti) = (out.addr(&cu.stream), out.code(), inp.addr(&cu.stream), inp.code());
    l.arg(&po).arg(&to).arg(&pi).arg(&ti).arg(&ni).arg(&args).arg(&round);
    // SAFETY: (void* out, int out_t, const void* inp, int inp_t, int n, DropoutArgs d, int
    // round), as dropout_bwd_f32's; one thread per group of four elements reads inp[..n]
    // and writes out[..n], each of its type's storage; both hold n elements (checked above).
    check(unsafe { l.launch(grid_1d(n.div_ceil(4), BLOCK)) }, kernel);
}

/// out [n + n_dup] = dropout of [inp[..n_dup] | inp[..n_dup] | inp[n_dup..n]] from one read
/// of inp [n], rounded to `rounding` (`Backend::dropout_duplicate`); any storage.
pub fn dropout_duplicate(
    cu: &Cuda, out: &mut CudaBuf, inp: &CudaBuf, n_dup: usize, n: usize, d: Dropout, rounding: Precision,
) {
    if n == 0 {
        return;
    }
    let k = "dropout_duplicate_f32";
    let _r = cu.range("dropout_duplicate");
    assert!(n_dup <= n, "dropout_duplicate: {n_dup} duplicated of {n}");
    need(out.len(), n + n_dup, "dropout_duplicate out");
    need(inp.len(), n, "dropout_duplicate inp");
    int(n + n_dup, "dropout_duplicate n + n_dup"); // out's indices are ints too
    let (nd, ni, args) = (int(n_dup, "n_dup"), int(n, "n"), DropoutArgs::from(d));
    let round = round_code(rounding);
    let (po, to, pi, ti) = (out.addr(&cu.stream), out.code(), inp.addr(&cu.stream), inp.code());
    let mut l = cu.stream.launch_builder(cu.func(k));
    l.arg(&po)
        .arg(&to)
        .arg(&pi)
        .arg(&ti)
        .arg(&nd)
        .arg(&ni)
        .arg(&args)
        .arg(&round);
    // SAFETY: (void* out, int out_t, const void* inp, int inp_t, int n_dup, int n, DropoutArgs
    // d, int round); the thread of elements i0 .. i0 + 3 < n reads inp there and writes out
    // at n_dup + i and (i < n_dup) at i; out holds n + n_dup elements, inp n (checked above),
    // each in its type's storage.
    check(unsafe { l.launch(grid_1d(n.div_ceil(4), BLOCK)) }, k);
}

/// dinp [n] (overwritten) = dout [n + n_dup] through the masks, both views' gradients of
/// the duplicated elements summed (`Backend::dropout_duplicate_bwd`); any storage.
pub fn dropout_duplicate_bwd(cu: &Cuda, dinp: &mut CudaBuf, dout: &CudaBuf, n_dup: usize, n: usize, d: Dropout) {
    if n == 0 {
        return;
    }
    let k = "dropout_duplicate_bwd_f32";
    let _r = cu.range("dropout_duplicate_bwd");
    assert!(n_dup <= n, "dropout_duplicate_bwd: {n_dup} duplicated of {n}");
    need(dinp.len(), n, "dropout_duplicate_bwd dinp");
    need(dout.len(), n + n_dup, "dropout_duplicate_bwd dout");
    int(n + n_dup, "dropout_duplicate_bwd n + n_dup"); // dout's indices are ints too
    let (nd, ni, args) = (int(n_dup, "n_dup"), int(n, "n"), DropoutArgs::from(d));
    let (pd, td, pg, tg) = (dinp.addr(&cu.stream), dinp.code(), dout.addr(&cu.stream), dout.code());
    let mut l = cu.stream.launch_builder(cu.func(k));
    l.arg(&pd).arg(&td).arg(&pg).arg(&tg).arg(&nd).arg(&ni).arg(&args);
    // SAFETY: (void* dinp, int dinp_t, const void* dout, int dout_t, int n_dup, int n,
    // DropoutArgs d); the thread of elements i0 .. i0 + 3 < n writes dinp there and reads
    // dout at i (i < n_dup) and n_dup + i; sizes checked above.
    check(unsafe { l.launch(grid_1d(n.div_ceil(4), BLOCK)) }, k);
}
