//! AdamW over every parameter with global-norm clipping and the linear schedule
//! (SPEC section 4). Moments live on the backend next to the weights; master weights
//! and moments are fp32 on every backend.
use super::schedule::{decays, linear_warmup_decay};
use crate::backend::{AdamW, Backend};
use crate::error::{Error, Result};
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

pub struct Optimizer<B: Backend> {
    pub cfg: OptimConfig,
    m: Vec<B::Buf>,
    v: Vec<B::Buf>,
    /// Updates done so far.
    pub step: u64,
}

/// What one update did.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct UpdateStats {
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
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
        }
    }

    /// Global gradient norm (summed in a fixed order, so deterministic).
    pub fn grad_norm(model: &Model<B>) -> f64 {
        model
            .params
            .iter()
            .iter()
            .map(|p| model.be.sum_squares(&p.g, p.numel()))
            .sum::<f64>()
            .sqrt()
    }

    /// Clips, then applies one AdamW update with the scheduled learning rate.
    /// A non-finite gradient norm is an error and leaves the weights untouched.
    pub fn update(&mut self, model: &mut Model<B>) -> Result<UpdateStats> {
        let norm = Self::grad_norm(model);
        if !norm.is_finite() {
            return Err(Error::Numeric(format!(
                "gradient norm is {norm} at step {}",
                self.step + 1
            )));
        }
        let lr = linear_warmup_decay(self.cfg.lr, self.step, self.cfg.warmup, self.cfg.total);
        self.step += 1;
        let clip = if norm > self.cfg.clip as f64 {
            (self.cfg.clip as f64 / norm) as f32
        } else {
            1.0
        };
        let be = &model.be;
        for (i, p) in model.params.iter_mut().into_iter().enumerate() {
            let n = p.numel();
            if clip != 1.0 {
                be.scale(&mut p.g, n, clip);
            }
            let wd = if decays(&p.name) { self.cfg.weight_decay } else { 0.0 };
            let hp = AdamW {
                weight_decay: wd,
                ..AdamW::with_lr(lr)
            };
            be.adamw(&mut p.w, &p.g, &mut self.m[i], &mut self.v[i], n, hp, self.step);
        }
        Ok(UpdateStats { lr, grad_norm: norm })
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
