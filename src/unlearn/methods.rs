//! The baselines of SPEC section 5, as steps on the same streams as DeepCUT so every
//! method is compared on the same split with the same metrics.
use crate::backend::{Backend, IGNORE_INDEX};
use crate::data::rng::{below, keyed_rng, Purpose};
use crate::data::{Batch, PositionStyle, Window};
use crate::model::{Mode, Model};
use crate::unlearn::deepcut::StepLosses;

/// CE on a batch of `rows` with gradient scale `sign / labelled` (times the fp16 loss
/// scale, `model.loss_scale()`) accumulated into the model's gradients; returns the mean CE.
fn ce_pass<B: Backend>(model: &mut Model<B>, batch: &Batch, sign: f32, mode: Mode) -> f32 {
    model.forward(&batch.inputs, mode);
    let n = batch.labelled();
    if n > 0 {
        model.backward(sign * model.loss_scale() / n as f32, None);
    }
    // read after backward is enqueued (no device stall mid-step; backward leaves it)
    model.ce_loss(&batch.inputs)
}

/// finetune: CE on retain only.
pub fn finetune_step<B: Backend>(
    model: &mut Model<B>, windows: &[Window], retain: &[usize], style: PositionStyle, mode: Mode,
) -> StepLosses {
    model.zero_grads();
    let ce = ce_pass(model, &Batch::gather(windows, retain, style), 1.0, mode);
    StepLosses {
        ce,
        contrast: 0.0,
        total: ce,
        anchors: 0,
    }
}

/// gradient-ascent: maximise CE on forget (minimise -CE).
pub fn gradient_ascent_step<B: Backend>(
    model: &mut Model<B>, windows: &[Window], forget: &[usize], style: PositionStyle, mode: Mode,
) -> StepLosses {
    model.zero_grads();
    let ce_f = ce_pass(model, &Batch::gather(windows, forget, style), -1.0, mode);
    StepLosses {
        ce: ce_f,
        contrast: 0.0,
        total: -ce_f,
        anchors: 0,
    }
}

/// neggrad+: CE(retain) - beta * CE(forget), two passes accumulating gradients.
#[allow(clippy::too_many_arguments)]
pub fn neggrad_plus_step<B: Backend>(
    model: &mut Model<B>, windows: &[Window], forget: &[usize], retain: &[usize], style: PositionStyle, beta: f32,
    mode: Mode,
) -> StepLosses {
    model.zero_grads();
    let ce_r = ce_pass(model, &Batch::gather(windows, retain, style), 1.0, mode);
    // the second pass draws its own dropout masks (another step key)
    let mode_f = match mode {
        Mode::Train { seed, step } => Mode::Train {
            seed: seed ^ 0x5eed_f0f0,
            step,
        },
        m => m,
    };
    let ce_f = ce_pass(model, &Batch::gather(windows, forget, style), -beta, mode_f);
    StepLosses {
        ce: ce_r,
        contrast: ce_f,
        total: ce_r - beta * ce_f,
        anchors: 0,
    }
}

/// random-labels: CE over [forget with uniformly random wrong labels | retain].
#[allow(clippy::too_many_arguments)]
pub fn random_labels_step<B: Backend>(
    model: &mut Model<B>, windows: &[Window], forget: &[usize], retain: &[usize], style: PositionStyle,
    n_labels: usize, seed: u64, step: u64, mode: Mode,
) -> StepLosses {
    model.zero_grads();
    let mut rows = forget.to_vec();
    rows.extend_from_slice(retain);
    let mut batch = Batch::gather(windows, &rows, style);
    let forget_tokens = batch.seqs[forget.len()] as usize;
    let mut rng = keyed_rng(seed, Purpose::RandomLabels, step);
    for y in batch.inputs.labels[..forget_tokens].iter_mut() {
        if *y != IGNORE_INDEX && n_labels > 1 {
            // a label drawn uniformly among the n-1 wrong ones
            let r = below(&mut rng, n_labels as u64 - 1) as i32;
            *y = if r >= *y { r + 1 } else { r };
        }
    }
    let ce = ce_pass(model, &batch, 1.0, mode);
    StepLosses {
        ce,
        contrast: 0.0,
        total: ce,
        anchors: 0,
    }
}
