//! A training step's numbers coming back without the host waiting (issue #6: no
//! host-device synchronisation inside a step). After a step's backward pass is enqueued,
//! `Readback::start` enqueues its CE losses, its update (`Optimizer::update_enqueue`: the
//! clipping decided on the device) and copies of both into page-locked memory; the loop
//! then enqueues the next step before `finish` waits for these numbers, so the device
//! always has the next step queued. Two readbacks alternate (`Ring`);
//! `Ring::finish_before` also says when an fp16 overflow made the next step stale, to be
//! enqueued again. fine-tuning (`train`, the retrain baseline, SISA) and DeepCUT
//! (`deepcut::step_enqueue`, which adds InfoNCE's per-row losses) go through it.
use super::optim::{Enqueued, Finish, Optimizer, UpdateStats};
use crate::backend::{infonce_loss_host, Backend};
use crate::error::Result;
use crate::model::encoder::mean_ce;
use crate::model::Model;
use serde::{Deserialize, Serialize};

/// Losses of one step: the mean CE over labelled tokens, the contrastive term (0 without
/// one) and their weighted sum, and the anchors that entered the contrastive term.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct StepLosses {
    pub ce: f32,
    pub contrast: f32,
    pub total: f32,
    /// Anchors that entered L_f.
    pub anchors: usize,
}

/// Host memory one step's numbers come back to.
pub struct Readback<B: Backend> {
    ce: B::Staging,
    contrast: B::Staging,
    stats: B::Staging,
    pending: Option<Pending>,
}

struct Pending {
    n: usize,
    labelled: usize,
    /// The contrastive term, when the step has one.
    contrast: Option<Contrastive>,
    update: Enqueued,
}

/// A step's contrastive term as `Readback::start` takes it: InfoNCE's per-row losses
/// [rows] (0 off the valid anchors), the count of valid anchors (L_f is their mean) and
/// its weight gamma in the total.
#[derive(Clone, Copy, Debug)]
pub struct Contrastive {
    pub rows: usize,
    pub anchors: usize,
    pub gamma: f32,
}

/// A finished step: its losses, and its update's stats or error.
pub struct Finished {
    pub losses: StepLosses,
    pub update: Result<UpdateStats>,
}

impl Finished {
    /// fp16: the update overflowed (skipped, and the loss scale halved).
    pub fn overflowed(&self) -> bool {
        matches!(self.update, Ok(u) if u.skipped)
    }
}

/// What waiting for a step gave: the step, or (fp16, `Finish::Stale`) nothing applied
/// and the step to be enqueued again.
enum Outcome {
    Done(Finished),
    Stale,
}

impl<B: Backend> Readback<B> {
    /// For steps of up to `max_tokens` tokens (a batch's b * t; contrastive rows are fewer).
    pub fn new(be: &B, max_tokens: usize) -> Self {
        Readback {
            ce: be.staging(max_tokens),
            contrast: be.staging(max_tokens),
            stats: be.staging(crate::backend::ClipStats::LEN),
            pending: None,
        }
    }

    /// Whether a step is in flight here (started and not yet finished).
    pub fn in_flight(&self) -> bool {
        self.pending.is_some()
    }

    /// After the step's backward pass: enqueues its CE losses (`labelled` tokens carry
    /// CE) and, with a contrastive term, a copy of its per-row losses `rows_losses`; then
    /// the update. Panics if a step is still in flight here.
    pub fn start(
        &mut self, model: &mut Model<B>, labelled: usize, contrast: Option<(&B::Buf, Contrastive)>,
        opt: &mut Optimizer<B>,
    ) {
        assert!(
            self.pending.is_none(),
            "Readback::start: a step is still in flight here"
        );
        let n = model.token_losses_start(&mut self.ce);
        if let Some((rows_losses, c)) = contrast {
            model.be.download_start(&mut self.contrast, rows_losses, c.rows);
        }
        let update = opt.update_enqueue(model, &mut self.stats);
        self.pending = Some(Pending {
            n,
            labelled,
            contrast: contrast.map(|(_, c)| c),
            update,
        });
    }

    /// Waits for the step in flight here and returns its numbers (None if there is none):
    /// what the synchronous `Model::ce_loss`, `infonce_loss_host` and `Optimizer::update`
    /// give for the same step. Steps must be finished in the order they were started; a
    /// step is stale only when the one before it overflowed and was not finished first
    /// (`Ring::finish_before` does), and that panics.
    pub fn finish(&mut self, be: &B, opt: &mut Optimizer<B>) -> Option<Finished> {
        match self.finish_outcome(be, opt)? {
            Outcome::Done(f) => Some(f),
            Outcome::Stale => panic!("a step finished stale: the step before it was not finished first"),
        }
    }

    fn finish_outcome(&mut self, be: &B, opt: &mut Optimizer<B>) -> Option<Outcome> {
        let p = self.pending.take()?;
        let ce = mean_ce(be.download_wait(&self.ce, p.n), p.labelled);
        let losses = match p.contrast {
            None => StepLosses {
                ce,
                total: ce,
                ..StepLosses::default()
            },
            Some(c) => {
                let lf = infonce_loss_host(be.download_wait(&self.contrast, c.rows), c.anchors);
                StepLosses {
                    ce,
                    contrast: lf,
                    total: ce + c.gamma * lf,
                    anchors: c.anchors,
                }
            }
        };
        let update = match opt.finish(be, p.update, &self.stats) {
            Ok(Finish::Update(u)) => Ok(u),
            Ok(Finish::Stale) => return Some(Outcome::Stale),
            Err(e) => Err(e),
        };
        Some(Outcome::Done(Finished { losses, update }))
    }
}

/// Two readbacks taking steps in turn: `slot(step)` is where step `step` goes, and the
/// other one holds the step before it.
pub struct Ring<B: Backend>([Readback<B>; 2]);

impl<B: Backend> Ring<B> {
    pub fn new(be: &B, max_tokens: usize) -> Self {
        Ring([Readback::new(be, max_tokens), Readback::new(be, max_tokens)])
    }

    /// The readback of step `step` (0-based, any counter that goes up by one per step).
    pub fn slot(&mut self, step: u64) -> &mut Readback<B> {
        &mut self.0[(step % 2) as usize]
    }

    /// Finishes the step in flight in the slot of `step`, if any (`Readback::finish`).
    pub fn finish(&mut self, step: u64, be: &B, opt: &mut Optimizer<B>) -> Option<Finished> {
        self.slot(step).finish(be, opt)
    }

    /// Finishes step `prev` while step `next = prev + 1` is in flight in the other slot. If
    /// `prev` overflowed (fp16), `next` was computed with the loss scale the overflow
    /// halved: the device skipped it, and this finishes it as well and returns true: the
    /// caller enqueues `next` again, as its first attempt, with `opt.loss_scale()`.
    pub fn finish_before(&mut self, prev: u64, be: &B, opt: &mut Optimizer<B>) -> (Finished, bool) {
        let f = self.finish(prev, be, opt).expect("a step in flight");
        let next = prev + 1;
        if !f.overflowed() || !self.slot(next).in_flight() {
            return (f, false);
        }
        let g = self.slot(next).finish_outcome(be, opt).expect("in flight");
        assert!(
            matches!(g, Outcome::Stale),
            "step {next}, enqueued before step {prev}'s overflow was known, was not skipped"
        );
        (f, true)
    }
}
