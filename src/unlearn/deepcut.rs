//! One DeepCUT step (SPEC section 4): forward over [forget view a | forget view b |
//! retain] as one batch (the forget sentences embedded once; the dropout-duplicate pass
//! writes both views with independent masks, and from there they are separate sequences),
//! CE on retain tokens, class-masked InfoNCE over the L2-normalised final hidden states of
//! all labelled tokens with the forget tokens as anchors, one backward pass
//! with the contrastive gradient entering at the final hidden states.
use crate::backend::{infonce_loss_host, Backend, InfoNceOptions, IGNORE_INDEX};
use crate::data::{Batch, PositionStyle, Window};
use crate::model::{Mode, Model};
use crate::train::optim::Optimizer;
use crate::train::readback::Contrastive;
pub use crate::train::readback::{Finished, Readback, StepLosses};
use serde::{Deserialize, Serialize};

/// Which forget tokens are anchors (`--anchors`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Anchors {
    /// Every labelled forget token (the default).
    All,
    /// Forget tokens whose gold tag is not O.
    Entities,
}

/// Device buffers of the contrastive term, planned once for the largest step.
pub struct Contrast<B: Backend> {
    idx: B::IBuf,
    labels: B::IBuf,
    anchor: B::IBuf,
    partner: B::IBuf,
    zraw: B::Buf,
    z: B::Buf,
    norm: B::Buf,
    loss: B::Buf,
    lse: B::Buf,
    dz: B::Buf,
    dzraw: B::Buf,
    dhidden: B::Buf,
}

/// Host-side layout of one step's contrastive rows.
pub struct ZRows {
    /// Token of the packed batch each Z row comes from.
    pub idx: Vec<i32>,
    pub labels: Vec<i32>,
    pub anchor: Vec<i32>,
    pub partner: Vec<i32>,
}

impl<B: Backend> Contrast<B> {
    pub fn new(be: &B, max_rows: usize, c: usize) -> Self {
        Contrast {
            idx: be.alloc_i32(max_rows),
            labels: be.alloc_i32(max_rows),
            anchor: be.alloc_i32(max_rows),
            partner: be.alloc_i32(max_rows),
            zraw: be.alloc(max_rows * c),
            z: be.alloc(max_rows * c),
            norm: be.alloc(max_rows),
            loss: be.alloc(max_rows),
            lse: be.alloc(max_rows),
            dz: be.alloc(max_rows * c),
            dzraw: be.alloc(max_rows * c),
            dhidden: be.alloc(max_rows * c),
        }
    }
}

/// The batch of a DeepCUT step and its contrastive rows. `forget` and `retain` index
/// `windows`. Forget rows keep their gold labels for the class masks but carry no CE.
pub fn assemble(
    windows: &[Window], forget: &[usize], retain: &[usize], style: PositionStyle, o_id: i32, anchors: Anchors,
) -> (Batch, ZRows) {
    let bf = forget.len();
    let mut rows: Vec<usize> = forget.to_vec();
    rows.extend_from_slice(forget);
    rows.extend_from_slice(retain);
    let mut batch = Batch::gather(windows, &rows, style);
    let gold = batch.inputs.labels.clone();
    let mut z = ZRows {
        idx: vec![],
        labels: vec![],
        anchor: vec![],
        partner: vec![],
    };
    // Z rows of view a, in order; view b repeats the same positions, so row k of view a
    // and row k of view b are partners.
    let mut first_view_b = 0;
    for r in 0..rows.len() {
        if r == bf {
            first_view_b = z.idx.len();
        }
        for tok in batch.span(r) {
            let y = gold[tok];
            if y == IGNORE_INDEX {
                continue;
            }
            z.idx.push(tok as i32);
            z.labels.push(y);
            let is_forget = r < 2 * bf;
            z.anchor
                .push((is_forget && (anchors == Anchors::All || y != o_id)) as i32);
            z.partner.push(-1);
        }
    }
    let per_view = first_view_b;
    for k in 0..per_view.min(z.idx.len().saturating_sub(per_view)) {
        z.partner[k] = (per_view + k) as i32;
        z.partner[per_view + k] = k as i32;
    }
    // CE only on retain rows.
    let forget_tokens = batch.seqs[2 * bf] as usize;
    batch.inputs.labels[..forget_tokens].fill(IGNORE_INDEX);
    // view b repeats view a: embedded once, both views made by the dropout-duplicate pass
    batch.inputs.dup = bf;
    (batch, z)
}

/// Forward, losses and backward of one DeepCUT step; parameter gradients are left in the
/// model (zeroed first), multiplied by `model.loss_scale()` (fp16 loss scaling; the
/// optimiser unscales them). The optimiser step is the caller's.
pub fn step<B: Backend>(
    model: &mut Model<B>, cb: &mut Contrast<B>, batch: &Batch, z: &ZRows, opts: InfoNceOptions, gamma: f32, mode: Mode,
) -> StepLosses {
    let count = enqueue(model, cb, batch, z, opts, gamma, mode);
    let m = z.idx.len();
    // The losses come back only now, with the whole step enqueued: on a GPU reading them
    // between forward and backward would stall the device twice per step. Neither buffer
    // is written by the backward pass.
    let ce = model.ce_loss(&batch.inputs);
    let lf = infonce_loss_host(&model.be.download(&cb.loss, m), count);
    StepLosses {
        ce,
        contrast: lf,
        total: ce + gamma * lf,
        anchors: count,
    }
}

/// `step` and `opt.update_enqueue`, with no host-device synchronisation (issue #6): the
/// losses and the update's stats start back into `rb`, whose `finish` returns them. Enqueue
/// the next step before finishing this one and the device never waits for the host
/// (`Ring::finish_before` says when an fp16 overflow makes the next step run again). `rb`
/// must not hold a step in flight (`Readback::start` panics). The loss scale is
/// `model.loss_scale()`, which the caller sets from `opt.loss_scale()`.
#[allow(clippy::too_many_arguments)]
pub fn step_enqueue<B: Backend>(
    model: &mut Model<B>, cb: &mut Contrast<B>, batch: &Batch, z: &ZRows, opts: InfoNceOptions, gamma: f32, mode: Mode,
    opt: &mut Optimizer<B>, rb: &mut Readback<B>,
) {
    let anchors = enqueue(model, cb, batch, z, opts, gamma, mode);
    let c = Contrastive {
        rows: z.idx.len(),
        anchors,
        gamma,
    };
    rb.start(model, batch.labelled(), Some((&cb.loss, c)), opt)
}

/// Everything of `step` but reading the losses back; returns the count of valid anchors.
fn enqueue<B: Backend>(
    model: &mut Model<B>, cb: &mut Contrast<B>, batch: &Batch, z: &ZRows, opts: InfoNceOptions, gamma: f32, mode: Mode,
) -> usize {
    let _step = model.be.profile_range(format_args!("deepcut step"));
    let m = z.idx.len();
    let c = model.dims.hidden;
    let valid = opts.valid_anchors(&z.labels, &z.anchor, &z.partner, m);
    let count = valid.iter().filter(|&&v| v).count();
    model.forward(&batch.inputs, mode);
    let ce_count = batch.labelled();
    let be = &model.be;
    let contrast_fwd = be.profile_range(format_args!("loss: infonce fwd"));
    be.upload_i32(&mut cb.idx, &z.idx);
    be.upload_i32(&mut cb.labels, &z.labels);
    be.upload_i32(&mut cb.anchor, &z.anchor);
    be.upload_i32(&mut cb.partner, &z.partner);
    be.gather_rows(&mut cb.zraw, model.hidden(), &cb.idx, m, c);
    be.l2norm_fwd(&mut cb.z, &mut cb.norm, &cb.zraw, m, c);
    be.infonce_fwd(
        &mut cb.loss,
        &mut cb.lse,
        &cb.z,
        &cb.labels,
        &cb.anchor,
        &cb.partner,
        m,
        c,
        opts,
        model.precision(),
    );
    drop(contrast_fwd);

    let n = batch.tokens();
    let loss_scale = model.loss_scale();
    let contrast_bwd = be.profile_range(format_args!("loss: infonce bwd"));
    be.zero(&mut cb.dhidden, n * c);
    if count > 0 && gamma != 0.0 {
        be.infonce_bwd(
            &mut cb.dz,
            &cb.z,
            &cb.lse,
            &cb.labels,
            &cb.anchor,
            &cb.partner,
            m,
            c,
            opts,
            loss_scale * gamma / count as f32,
            model.precision(),
        );
        be.l2norm_bwd(&mut cb.dzraw, &cb.dz, &cb.z, &cb.norm, m, c);
        be.scatter_add_rows(&mut cb.dhidden, &cb.dzraw, &cb.idx, m, c);
    }
    drop(contrast_bwd);
    model.zero_grads();
    let ce_scale = if ce_count > 0 {
        loss_scale / ce_count as f32
    } else {
        0.0
    };
    model.backward(ce_scale, Some(&cb.dhidden));
    count
}
