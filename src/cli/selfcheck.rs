//! The device self-check behind `--device auto` and `--device cuda`: before a command runs
//! on a GPU, one whole DeepCUT step (forward with dropout, CE and class-masked InfoNCE,
//! backward, clipped AdamW decided on the device and read back as `run` does it; in fp16
//! with loss scaling) of a tiny random model runs on it and on the CPU backend from
//! the same inputs, at the command's precision and at both head sizes real encoders use
//! (32: MiniLM; 64: BERT / RoBERTa base), with sequences of unequal lengths packed. The GPU is used only if every
//! gradient and updated weight agrees with the CPU reference (tests/gpu_parity.rs's
//! whole-step tolerances). It takes well under a second on a GPU; it is what lets `auto`
//! pick a GPU that nobody checked by hand, and what stops a broken driver, toolkit or card
//! from producing a wrong model quietly.
use crate::backend::cpu::Cpu;
use crate::backend::cuda::Cuda;
use crate::backend::{Backend, InfoNceOptions, Precision, IGNORE_INDEX};
use crate::data::{PositionStyle, Window};
use crate::model::{Dims, Mode, Model};
use crate::train::optim::{LossScaling, OptimConfig, Optimizer};
use crate::train::readback::Readback;
use crate::unlearn::deepcut::{self, Anchors, Contrast};
use crate::util::Lcg;
use std::sync::OnceLock;
use std::time::Instant;

/// The self-check that passed in this process, if one did (for `bench`'s report).
static PASSED: OnceLock<SelfCheck> = OnceLock::new();

/// The self-check that passed in this process, if any.
pub fn passed() -> Option<&'static SelfCheck> {
    PASSED.get()
}

/// `self_check`, or a skip when DEEPCUT_SKIP_SELF_CHECK=1 (profiling, debugging a
/// disagreement); Ok is the line to print.
pub fn check(ordinal: usize, precision: Precision) -> Result<String, String> {
    if std::env::var("DEEPCUT_SKIP_SELF_CHECK").is_ok_and(|v| v == "1") {
        return Ok("self-check skipped (DEEPCUT_SKIP_SELF_CHECK=1): results unverified".into());
    }
    eprintln!("self-check of cuda:{ordinal} ({precision}): one DeepCUT step against the CPU backend ...");
    let r = self_check(ordinal, precision).map_err(|e| format!("its self-check failed: {e}"))?;
    let line = format!("{}; {}", r.device, r.describe());
    let _ = PASSED.set(r);
    Ok(line)
}

/// What the self-check found.
#[derive(Clone, Debug)]
pub struct SelfCheck {
    /// The device's name.
    pub device: String,
    /// The largest relative L2 difference from the CPU, and where.
    pub worst: f64,
    pub worst_what: String,
    /// The bound it was held to.
    pub tol: f64,
    pub seconds: f64,
}

impl SelfCheck {
    pub fn describe(&self) -> String {
        format!(
            "self-check passed in {:.2} s: a whole DeepCUT step within {:.1e} of the CPU (bound {:.0e}; worst: {})",
            self.seconds, self.worst, self.tol, self.worst_what
        )
    }
}

/// The bound of a whole step against the CPU: SPEC section 7's 1e-4 in fp32; in bf16 /
/// fp16 the 2e-2 of tests/gpu_parity.rs (rounding flips propagate through a step).
fn tolerance(precision: Precision) -> f64 {
    match precision {
        Precision::Fp32 => 1e-4,
        Precision::Bf16 | Precision::Fp16 => 2e-2,
    }
}

/// Runs the check on CUDA device `ordinal` at `precision`; Err says what disagreed (or
/// what failed: a CUDA error inside an op is caught and reported).
pub fn self_check(ordinal: usize, precision: Precision) -> Result<SelfCheck, String> {
    let t0 = Instant::now();
    let tol = tolerance(precision);
    let mut device = String::new();
    let (mut worst, mut worst_what) = (0.0f64, String::new());
    for head_dim in [32, 64] {
        let cuda = Cuda::new(ordinal).map_err(|e| e.to_string())?;
        device = cuda.name();
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| one_step(cuda, precision, head_dim)))
            .map_err(|e| {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic".into());
                format!("the CUDA backend failed during the step: {msg}")
            })?;
        let mut got = got;
        if std::env::var("DEEPCUT_SELF_CHECK_FAULT").is_ok_and(|v| v == "1") {
            // fault injection for the tests of what a failed check does (tests/gpu_cli.rs)
            got.grads[0].1[0] += 1.0;
        }
        let want = one_step(Cpu, precision, head_dim);
        if got.update != want.update {
            return Err(format!(
                "head size {head_dim}, {precision}: the update was {} on the GPU, {} on the CPU",
                got.update, want.update
            ));
        }
        let mut check = |what: String, e: f64| -> Result<(), String> {
            if !e.is_finite() || e > tol {
                return Err(format!(
                    "head size {head_dim}, {precision}: {what} differs from the CPU reference by {e:.2e} (bound {tol:.0e})"
                ));
            }
            if e > worst {
                worst = e;
                worst_what = format!("{what}, head size {head_dim}");
            }
            Ok(())
        };
        check("the losses".into(), rel_l2(&got.losses, &want.losses))?;
        // A gradient that is zero in exact arithmetic (the attention key bias: softmax
        // ignores a shift; in 16 bits the rounding of k leaves noise of the 2^-8 order) is
        // noise on both sides: it is held, as tests/gpu_parity.rs holds it, to an absolute
        // bound against the whole gradient, and its update (lr times the noise's sign) is
        // not compared.
        let total = norm(want.grads.iter().flat_map(|(_, g)| g));
        for (((name, g), (_, w)), ((_, gw), (_, ww))) in got
            .grads
            .iter()
            .zip(&want.grads)
            .zip(got.weights.iter().zip(&want.weights))
        {
            if name.ends_with("attention.self.key.bias") || norm(w.iter()) < 1e-5 * total {
                let diff = norm(g.iter().zip(w).map(|(a, b)| a - b).collect::<Vec<_>>().iter());
                check(
                    format!("the gradient of {name} (~0 exactly; against the whole gradient)"),
                    diff / total,
                )?;
                continue;
            }
            check(format!("the gradient of {name}"), rel_l2(g, w))?;
            check(format!("{name} after AdamW"), rel_l2(gw, ww))?;
        }
    }
    Ok(SelfCheck {
        device,
        worst,
        worst_what,
        tol,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Relative L2 of `a` against `b` (NaN anywhere gives NaN; both zero gives 0).
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        d += (x as f64 - y as f64).powi(2);
        n += (y as f64).powi(2);
    }
    if d == 0.0 {
        0.0
    } else {
        (d / n.max(1e-30)).sqrt()
    }
}

/// What one step gave: the losses, then every gradient and every updated weight, in
/// parameter order.
struct Outcome {
    /// What the update did: "applied", or why not.
    update: String,
    losses: Vec<f32>,
    grads: Vec<(String, Vec<f32>)>,
    weights: Vec<(String, Vec<f32>)>,
}

fn norm<'a>(v: impl Iterator<Item = &'a f32>) -> f64 {
    v.map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}

/// One DeepCUT step and its update on `be`.
fn one_step<B: Backend>(be: B, precision: Precision, head_dim: usize) -> Outcome {
    let heads = 2;
    let dims = Dims {
        vocab: 60,
        max_pos: 40,
        type_vocab: 2,
        hidden: heads * head_dim,
        layers: 1,
        heads,
        ffn: 2 * heads * head_dim,
        labels: 5,
        eps: 1e-12,
        hidden_dropout: 0.1,
        attn_dropout: 0.1,
        classifier_dropout: 0.1,
    };
    let mut rng = Lcg::new(17 + head_dim as u64);
    // sequences of 6 to 29 tokens, packed: each attends within its own span
    let windows: Vec<Window> = (0..6)
        .map(|r| {
            let len = 6 + (r * 11) % 24;
            let mut ids = vec![1u32];
            let mut labels = vec![IGNORE_INDEX];
            for _ in 1..len - 1 {
                ids.push(3 + rng.below(dims.vocab - 3) as u32);
                labels.push(rng.below(dims.labels) as i32);
            }
            ids.push(2);
            labels.push(IGNORE_INDEX);
            Window {
                sentence: r,
                first_word: 0,
                word_pos: vec![],
                ids,
                labels,
            }
        })
        .collect();
    let mut model = Model::new(be, dims.clone(), 256, |name, shape| {
        let n: usize = shape.iter().product();
        if name.ends_with("LayerNorm.weight") {
            (0..n).map(|_| 1.0 + 0.1 * (rng.next_unit() - 0.5)).collect()
        } else {
            (0..n).map(|_| 0.4 * (rng.next_unit() - 0.5)).collect()
        }
    })
    .with_precision(precision);
    let mut cb = Contrast::new(&model.be, 256, dims.hidden);
    // the optimiser as `run` drives it: the update decided on the device (clipping, and in
    // fp16 the loss scale and its overflow check), its numbers read back through staging
    let mut opt = Optimizer::new(
        &model,
        OptimConfig {
            lr: 1e-3,
            weight_decay: 0.01,
            warmup: 0,
            total: 10,
            clip: 1.0,
        },
    )
    .with_precision(
        precision,
        LossScaling {
            init: 1024.0,
            growth_interval: 2000,
        },
    );
    let (batch, z) = deepcut::assemble(
        &windows,
        &[0, 1],
        &[2, 3, 4, 5],
        PositionStyle::Absolute,
        0,
        Anchors::All,
    );
    model.set_loss_scale(opt.loss_scale());
    let mut rb = Readback::new(&model.be, 256);
    deepcut::step_enqueue(
        &mut model,
        &mut cb,
        &batch,
        &z,
        InfoNceOptions::default(),
        0.5,
        Mode::Train { seed: 5, step: 0 },
        &mut opt,
        &mut rb,
    );
    let f = rb.finish(&model.be, &mut opt).expect("the step just started");
    let update = match f.update {
        Ok(u) if u.skipped => "skipped (an fp16 overflow)".to_string(),
        Ok(_) => "applied".to_string(),
        Err(e) => format!("refused: {e}"),
    };
    let l = f.losses;
    let grads = model.export_grads();
    Outcome {
        update,
        losses: vec![l.ce, l.contrast],
        grads,
        weights: model.export().into_iter().map(|(n, _, w)| (n, w)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference step applies its update at every precision and head size (a skipped
    /// or refused update would leave the weights' comparison with nothing to compare).
    #[test]
    fn the_reference_step_applies_its_update() {
        for precision in [Precision::Fp32, Precision::Bf16, Precision::Fp16] {
            for head_dim in [32, 64] {
                let o = one_step(Cpu, precision, head_dim);
                assert_eq!(o.update, "applied", "{precision}, head size {head_dim}");
                assert!(o.losses.iter().all(|l| l.is_finite()));
            }
        }
    }
}
