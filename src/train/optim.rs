//! AdamW over every parameter with global-norm clipping and the linear schedule
//! (SPEC section 4), and fp16 dynamic loss scaling (SPEC section 7). Moments live on the
//! backend next to the weights; master weights and moments are fp32 on every backend.
use super::schedule::{decays, linear_warmup_decay};
use crate::backend::{clip_factor, AdamW, Backend, ClipState, ClipStats, ParamSlot, Precision};
use crate::error::{Error, Result};
use crate::model::encoder::Params;
use crate::model::Model;
use serde::{Deserialize, Serialize};

/// Optimiser settings of a run (recorded in its config).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct OptimConfig {
    pub lr: f32,
    pub weight_decay: f32,
    /// Steps of linear warm-up.
    pub warmup: u64,
    /// Total steps of the schedule (linear decay to 0 at this step).
    pub total: u64,
    /// Clip the global gradient norm to this value.
    pub clip: f32,
}

/// fp16 dynamic loss scaling settings (SPEC section 7; `--loss-scale-init`,
/// `--loss-scale-growth-interval`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct LossScaling {
    /// Scale of the first step: a power of two, so scaling and unscaling are exact.
    pub init: f32,
    /// Applied steps in a row without overflow after which the scale doubles.
    pub growth_interval: u64,
}

impl Default for LossScaling {
    /// SPEC section 7: 2^16, doubled after 2000 clean steps (PyTorch's GradScaler defaults).
    fn default() -> Self {
        LossScaling {
            init: 65536.0,
            growth_interval: 2000,
        }
    }
}

impl LossScaling {
    /// Largest scale growth goes to: fp16 holds at most 65504 < 2^16, so at 2^24 any
    /// gradient above 2^-8 overflows anyway; this also keeps the scale far from f32's range.
    pub const MAX_SCALE: f32 = 16_777_216.0;

    pub fn check(&self) -> Result<()> {
        let s = self.init;
        if !(s.is_finite() && (1.0..=2f32.powi(64)).contains(&s) && s.log2().fract() == 0.0) {
            return Err(Error::invalid(format!(
                "--loss-scale-init {s}: expected a power of two from 1 to 2^64"
            )));
        }
        if self.growth_interval == 0 {
            return Err(Error::invalid("--loss-scale-growth-interval must be at least 1"));
        }
        Ok(())
    }
}

/// State of dynamic loss scaling (fp16 only): the loss-gradient seed is multiplied by
/// `scale` so small gradients survive fp16, gradients are unscaled before clipping and
/// AdamW; a step whose gradients overflowed (inf/NaN) is skipped and the scale halved,
/// and the scale doubles after `growth_interval` clean steps. Saved in checkpoints.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LossScaler {
    pub cfg: LossScaling,
    pub scale: f32,
    /// Applied steps since the scale last changed.
    pub clean_steps: u64,
    /// Steps skipped because a gradient overflowed.
    pub skipped_steps: u64,
    /// Every change of the scale, in order.
    pub history: Vec<ScaleChange>,
}

/// One change of the loss scale.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ScaleChange {
    /// The attempted step (1-based, skipped steps included) after which it changed.
    pub attempt: u64,
    pub scale: f32,
    /// "overflow" (halved) or "growth" (doubled).
    pub reason: String,
}

impl LossScaler {
    pub fn new(cfg: LossScaling) -> Self {
        LossScaler {
            cfg,
            scale: cfg.init,
            clean_steps: 0,
            skipped_steps: 0,
            history: vec![],
        }
    }

    /// Attempted step `attempt` (1-based) overflowed: it is skipped and the scale halved.
    /// An error at scale 1, where halving cannot help.
    fn overflowed(&mut self, attempt: u64, norm: f64) -> Result<()> {
        if self.scale <= 1.0 {
            return Err(overflow_at_scale_one(norm, self.scale, attempt));
        }
        self.scale /= 2.0;
        self.clean_steps = 0;
        self.skipped_steps += 1;
        self.history.push(ScaleChange {
            attempt,
            scale: self.scale,
            reason: "overflow".into(),
        });
        Ok(())
    }

    /// Attempted step `attempt` applied: the scale doubles after `growth_interval` of them.
    fn applied(&mut self, attempt: u64) {
        self.clean_steps += 1;
        if self.clean_steps >= self.cfg.growth_interval && self.scale < LossScaling::MAX_SCALE {
            self.scale *= 2.0;
            self.clean_steps = 0;
            self.history.push(ScaleChange {
                attempt,
                scale: self.scale,
                reason: "growth".into(),
            });
        }
    }
}

/// fp16 gradients that overflow at loss scale `scale` <= 1, where halving cannot help:
/// the error `update` and `finish` give for attempted step `attempt`.
fn overflow_at_scale_one(norm: f64, scale: f32, attempt: u64) -> Error {
    Error::Numeric(format!(
        "fp16 gradients overflow (norm {norm}) even at loss scale {scale} at step {attempt}"
    ))
}

/// The `precision` object of a report: the precision, and for fp16 the loss scaling
/// (final scale, skipped steps, every change of the scale).
pub fn precision_json(precision: Precision, scaler: Option<&LossScaler>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "precision": precision,
        "describe": precision.describe(),
        "skipped_steps": scaler.map_or(0, |s| s.skipped_steps),
        "loss_scale_final": scaler.map(|s| s.scale),
    });
    if let Some(s) = scaler {
        v["loss_scale_init"] = serde_json::json!(s.cfg.init);
        v["loss_scale_growth_interval"] = serde_json::json!(s.cfg.growth_interval);
        v["loss_scale_history"] = serde_json::json!(s.history);
    }
    v
}

pub struct Optimizer<B: Backend> {
    pub cfg: OptimConfig,
    m: Vec<B::Buf>,
    v: Vec<B::Buf>,
    /// Updates applied so far (skipped fp16 steps are not counted): AdamW's bias
    /// correction and the learning-rate schedule both follow it.
    pub step: u64,
    /// fp16 dynamic loss scaling; None in fp32 and bf16.
    pub scaler: Option<LossScaler>,
    /// `Backend::clip_adamw_all`'s decision of the last enqueued update (ClipStats).
    stats: B::Buf,
    /// fp16: the overflows `finish` has reported since this optimiser was made (the
    /// device counts them in `stats`; an update enqueued before the host saw one is stale).
    overflows_seen: u32,
}

/// An update `Optimizer::update_enqueue` left in flight; `Optimizer::finish` completes it.
/// The norm, and whether the device skipped, come with the staged `ClipStats`.
#[derive(Clone, Copy, Debug)]
pub struct Enqueued {
    lr: f32,
    loss_scale: f32,
    /// The optimiser's state before this update, which assumed the update applies;
    /// `finish` goes back to it if the device says it did not.
    before: Before,
}

/// The optimiser's schedule and loss-scaler counters at one moment.
#[derive(Clone, Copy, Debug)]
struct Before {
    step: u64,
    scaler: Option<ScalerCounters>,
}

/// fp16: a `LossScaler`'s numbers, and the length of its history.
#[derive(Clone, Copy, Debug)]
struct ScalerCounters {
    scale: f32,
    clean_steps: u64,
    skipped_steps: u64,
    history: usize,
}

impl Before {
    /// The attempted step (1-based, skipped ones included) the update after this moment is.
    fn attempt(&self) -> u64 {
        self.step + self.scaler.map_or(0, |s| s.skipped_steps) + 1
    }
}

/// What a finished update did.
#[derive(Clone, Copy, Debug)]
pub enum Finish {
    /// Applied, or (fp16) skipped for an overflow: what `Optimizer::update` returns.
    Update(UpdateStats),
    /// fp16: computed with a loss scale an earlier step's overflow has halved since; the
    /// device applied nothing and the optimiser is as if it never ran. The caller enqueues
    /// the same step again.
    Stale,
}

/// What one update did.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct UpdateStats {
    pub lr: f32,
    /// Global gradient norm before clipping (unscaled; NaN on a skipped step).
    pub grad_norm: f64,
    /// fp16: the gradients overflowed, nothing was updated and the scale was halved.
    pub skipped: bool,
    /// The loss scale the step's gradients carried (1 without loss scaling).
    pub loss_scale: f32,
}

impl<B: Backend> Optimizer<B> {
    pub fn new(model: &Model<B>, cfg: OptimConfig) -> Self {
        let sizes: Vec<usize> = model.params.iter().iter().map(|p| p.numel()).collect();
        let be = &model.be;
        Optimizer {
            cfg,
            m: sizes.iter().map(|&n| be.alloc(n)).collect(),
            v: sizes.iter().map(|&n| be.alloc(n)).collect(),
            step: 0,
            scaler: None,
            stats: be.alloc(ClipStats::LEN),
            overflows_seen: 0,
        }
    }

    /// Dynamic loss scaling with `ls` when `precision` is fp16; nothing otherwise.
    pub fn with_precision(mut self, precision: Precision, ls: LossScaling) -> Self {
        self.scaler = (precision == Precision::Fp16).then(|| LossScaler::new(ls));
        self
    }

    /// What the next step's loss-gradient seed is multiplied by (1 without loss scaling).
    pub fn loss_scale(&self) -> f32 {
        self.scaler.as_ref().map_or(1.0, |s| s.scale)
    }

    /// Global gradient norm (summed in a fixed order, so deterministic; one device round
    /// trip on a GPU).
    pub fn grad_norm(model: &Model<B>) -> f64 {
        let _r = model.be.profile_range(format_args!("optimizer: gradient norm"));
        let params = model.params.iter();
        let grads: Vec<(&B::Buf, usize)> = params.iter().map(|p| (&p.g, p.numel())).collect();
        model.be.sum_squares_all(&grads).sqrt()
    }

    /// Clips, then applies one AdamW update with the scheduled learning rate.
    /// A non-finite gradient norm is an error and leaves the weights untouched, except
    /// with fp16 loss scaling, where it is an overflow: the step is skipped (weights,
    /// moments and `step` untouched), the scale halved, and `Ok` says `skipped`. With loss
    /// scaling the gradients are first unscaled (divided by the scale, exactly: a power of
    /// two), so clipping and AdamW see the true gradients.
    ///
    /// The learning-rate schedule follows applied steps (`self.step`), not attempted
    /// ones: a skipped step changes nothing, so the next batch is trained at the rate the
    /// skipped one would have had and the warm-up is never shortened by the skips of the
    /// first steps (while the scale comes down from 2^16), and AdamW's bias correction and
    /// the schedule share one counter (as the transformers Trainer does, which does not
    /// step its scheduler when the scaler skipped). The cost: after k skips the run ends
    /// k steps short of the schedule's end, at lr * k / (total - warmup) instead of 0.
    pub fn update(&mut self, model: &mut Model<B>) -> Result<UpdateStats> {
        let loss_scale = self.loss_scale();
        let mut norm = Self::grad_norm(model);
        if let Some(sc) = &mut self.scaler {
            let attempt = self.step + sc.skipped_steps + 1;
            if !norm.is_finite() {
                sc.overflowed(attempt, norm)?;
                return Ok(UpdateStats {
                    lr: linear_warmup_decay(self.cfg.lr, self.step, self.cfg.warmup, self.cfg.total),
                    grad_norm: f64::NAN,
                    skipped: true,
                    loss_scale,
                });
            }
            norm /= loss_scale as f64;
            sc.applied(attempt);
        }
        if !norm.is_finite() {
            return Err(Error::Numeric(format!(
                "gradient norm is {norm} at step {}",
                self.step + 1
            )));
        }
        let lr = linear_warmup_decay(self.cfg.lr, self.step, self.cfg.warmup, self.cfg.total);
        self.step += 1;
        // The gradients are read as g * clip / loss_scale inside AdamW (no pass of their
        // own). Dividing by the scale, a power of two, is exact, so this is the same f32 as
        // unscaling, then clipping, in place.
        let grad_scale = clip_factor(norm, self.cfg.clip) * (1.0 / loss_scale);
        let precision = model.precision();
        let hp = self.hyper(lr);
        let (m, v) = (&mut self.m, &mut self.v);
        let mut slots = slots(&mut model.params, m, v);
        let _r = model.be.profile_range(format_args!("optimizer: adamw"));
        // the rounded GEMM copies are written in the same pass, so the next forward pass
        // need not round the weights again
        model.be.adamw_all(&mut slots, hp, self.step, grad_scale, precision);
        drop(slots);
        model.mark_gemm_weights_fresh();
        Ok(UpdateStats {
            lr,
            grad_norm: norm,
            skipped: false,
            loss_scale,
        })
    }

    /// `update` without waiting for the device (issue #6: no host-device synchronisation
    /// inside a step): the norm, the clipping, the non-finite check and fp16's overflow
    /// check happen on the device (`Backend::clip_adamw_all`, the same decisions in the
    /// same arithmetic) and its `ClipStats` start back into `staged`. `finish` then gives
    /// what `update` would have returned, the same weights and moments bit for bit, or its
    /// error; a non-finite norm leaves the weights untouched as `update` does, and this
    /// and every later enqueued update apply nothing (the caller learns of it one step
    /// late).
    ///
    /// With fp16 loss scaling the next step's backward pass needs this one's outcome (an
    /// overflow halves its loss scale). Rather than wait for it, as PyTorch's
    /// GradScaler.step does (found_inf.item()), the optimiser assumes the update applies
    /// (the schedule, the scaler's clean-step count and growth move on at once) and
    /// `finish` puts that right in the rare step that overflowed; the step enqueued after
    /// it was computed with the old scale, so the device skips it as stale
    /// (`Finish::Stale`) and the caller enqueues it again. The steps, scales, weights
    /// and moments are those of `update` bit for bit.
    pub fn update_enqueue(&mut self, model: &mut Model<B>, staged: &mut B::Staging) -> Enqueued {
        let loss_scale = self.loss_scale();
        let before = Before {
            step: self.step,
            scaler: self.scaler.as_ref().map(|sc| ScalerCounters {
                scale: sc.scale,
                clean_steps: sc.clean_steps,
                skipped_steps: sc.skipped_steps,
                history: sc.history.len(),
            }),
        };
        if let Some(sc) = &mut self.scaler {
            sc.applied(before.attempt());
        }
        let lr = linear_warmup_decay(self.cfg.lr, self.step, self.cfg.warmup, self.cfg.total);
        self.step += 1;
        let precision = model.precision();
        let hp = self.hyper(lr);
        let seen = self.scaler.is_some().then_some(self.overflows_seen);
        let (m, v) = (&mut self.m, &mut self.v);
        let mut slots = slots(&mut model.params, m, v);
        let _r = model.be.profile_range(format_args!("optimizer: clip + adamw"));
        model.be.clip_adamw_all(
            &mut slots,
            hp,
            self.step,
            self.cfg.clip,
            loss_scale,
            seen,
            precision,
            &mut self.stats,
        );
        drop(slots);
        // skipped or not, the copies match the master weights (a skip changes neither)
        model.mark_gemm_weights_fresh();
        model.be.download_start(staged, &self.stats, ClipStats::LEN);
        Enqueued { lr, loss_scale, before }
    }

    /// Completes an `update_enqueue`: waits for its staged `ClipStats` and gives `update`'s
    /// result, or says the update was stale. Updates must be finished in the order they
    /// were enqueued.
    pub fn finish(&mut self, be: &B, e: Enqueued, staged: &B::Staging) -> Result<Finish> {
        let st = ClipStats::read(be.download_wait(staged, ClipStats::LEN));
        let done = |lr, grad_norm, skipped| {
            Finish::Update(UpdateStats {
                lr,
                grad_norm,
                skipped,
                loss_scale: e.loss_scale,
            })
        };
        let b = e.before;
        let fp16 = b.scaler.is_some();
        match st.state {
            ClipState::Applied => Ok(done(e.lr, st.norm, false)),
            ClipState::Stale if fp16 => Ok(Finish::Stale),
            ClipState::Overflowed if fp16 => {
                // back to before this update (and whatever was enqueued after it, which the
                // device skips as stale), then as `update` handles an overflow
                self.restore(b);
                let sc = self.scaler.as_mut().expect("fp16 updates have a scaler");
                sc.overflowed(b.attempt(), st.norm)?;
                self.overflows_seen += 1;
                let lr = linear_warmup_decay(self.cfg.lr, self.step, self.cfg.warmup, self.cfg.total);
                Ok(done(lr, f64::NAN, true))
            }
            ClipState::Failed => {
                // as `update` leaves the optimiser when it fails
                self.restore(b);
                Err(if fp16 && !st.norm.is_finite() && e.loss_scale <= 1.0 {
                    overflow_at_scale_one(st.norm, e.loss_scale, b.attempt())
                } else {
                    // the update's 1-based number
                    Error::Numeric(format!("gradient norm is {} at step {}", st.norm, b.step + 1))
                })
            }
            state => unreachable!("{state:?} without fp16 loss scaling"),
        }
    }

    /// Back to the schedule and scaler counters of `b` (the history cut back to its length).
    fn restore(&mut self, b: Before) {
        self.step = b.step;
        if let (Some(sc), Some(c)) = (&mut self.scaler, b.scaler) {
            sc.scale = c.scale;
            sc.clean_steps = c.clean_steps;
            sc.skipped_steps = c.skipped_steps;
            sc.history.truncate(c.history);
        }
    }

    fn hyper(&self, lr: f32) -> AdamW {
        AdamW {
            weight_decay: self.cfg.weight_decay,
            ..AdamW::with_lr(lr)
        }
    }

    /// Moments on the host (for checkpoints), in parameter order.
    pub fn export(&self, model: &Model<B>) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let sizes: Vec<usize> = model.params.iter().iter().map(|p| p.numel()).collect();
        let dl = |bufs: &Vec<B::Buf>| bufs.iter().zip(&sizes).map(|(b, &n)| model.be.download(b, n)).collect();
        (dl(&self.m), dl(&self.v))
    }

    /// Restores moments saved by `export`.
    pub fn import(&mut self, model: &Model<B>, m: &[Vec<f32>], v: &[Vec<f32>], step: u64) {
        for (dst, src) in self.m.iter_mut().zip(m) {
            model.be.upload(dst, src);
        }
        for (dst, src) in self.v.iter_mut().zip(v) {
            model.be.upload(dst, src);
        }
        self.step = step;
    }
}

/// Every parameter with its moments, as the fused optimiser step takes them.
fn slots<'a, B: Backend>(
    params: &'a mut Params<B>, m: &'a mut [B::Buf], v: &'a mut [B::Buf],
) -> Vec<ParamSlot<'a, B::Buf>> {
    params
        .iter_mut()
        .into_iter()
        .zip(m.iter_mut().zip(v.iter_mut()))
        .map(|(p, (m, v))| {
            let n = p.numel();
            let decays = decays(&p.name);
            let (param, grad, low) = p.update_parts();
            ParamSlot {
                param,
                grad,
                m,
                v,
                n,
                decays,
                low,
            }
        })
        .collect()
}
