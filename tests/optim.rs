//! AdamW against torch.optim.AdamW, and the reductions gradient clipping uses.
mod common;
use common::Rng;
use deepcut_fast::backend::cpu::{adamw, Cpu};
use deepcut_fast::backend::{clip_factor, AdamW, Backend, ClipStats, ParamSlot, Precision};

/// Three steps on a 5-vector, lr 0.01, betas (0.9, 0.999), eps 1e-8, weight decay 0.1.
/// Expected values from torch 2.15 (CPU, fp32):
/// (one line in the shell):
/// python3 -c "import torch; p=torch.tensor([0.5,-1.25,2.0,0.0,-0.3],requires_grad=True);
/// o=torch.optim.AdamW([p],lr=0.01,betas=(0.9,0.999),eps=1e-8,weight_decay=0.1);
/// gs=[[0.1,-0.2,0.3,1.5,-0.05],[-0.4,0.2,0.0,1.0,0.25],[0.3,0.3,-0.7,-2.0,0.01]];
/// [(setattr(p,'grad',torch.tensor(g)), o.step(), print(p.tolist())) for g in gs]"
#[test]
fn adamw_matches_torch() {
    let grads: [[f32; 5]; 3] = [
        [0.1, -0.2, 0.3, 1.5, -0.05],
        [-0.4, 0.2, 0.0, 1.0, 0.25],
        [0.3, 0.3, -0.7, -2.0, 0.01],
    ];
    let expect: [[f64; 5]; 3] = [
        [
            0.4895000159740448,
            -1.2387499809265137,
            1.9880000352859497,
            -0.009999999776482582,
            -0.2897000312805176,
        ],
        [
            0.49460554122924805,
            -1.2380375862121582,
            1.979311466217041,
            -0.019693521782755852,
            -0.29539385437965393,
        ],
        [
            0.4938477575778961,
            -1.2417283058166504,
            1.981166124343872,
            -0.019946768879890442,
            -0.29997068643569946,
        ],
    ];
    let hp = AdamW {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let be = Cpu;
    let n = 5;
    let mut p = vec![0.5, -1.25, 2.0, 0.0, -0.3];
    let (mut m, mut v) = (be.alloc(n), be.alloc(n));
    for (step, (g, e)) in grads.iter().zip(&expect).enumerate() {
        be.adamw(&mut p, &g.to_vec(), &mut m, &mut v, n, hp, step as u64 + 1, 1.0);
        for (&a, &b) in p.iter().zip(e) {
            // the expected values are fp32 printed in full; compare within ~2 ulp
            assert!(
                (a as f64 - b).abs() <= 2.4e-7 * b.abs().max(1.0),
                "step {}: {p:?} vs {e:?}",
                step + 1
            );
        }
    }
}

#[test]
fn adamw_with_lr_has_spec_defaults() {
    let hp = AdamW::with_lr(3e-5);
    assert_eq!((hp.beta1, hp.beta2, hp.eps, hp.weight_decay), (0.9, 0.999, 1e-8, 0.01));
}

/// sum_squares is deterministic by construction (fixed chunks of REDUCE_CHUNK summed in
/// order, partials summed in order, whatever the thread count); here it must also agree
/// with a plain sequential f64 sum, and give the same bits under 1 and 2 threads.
#[test]
fn sum_squares_matches_sequential_and_threads() {
    let mut rng = Rng(11);
    for n in [0, 1, 7, adamw::REDUCE_CHUNK, 3 * adamw::REDUCE_CHUNK + 5, 100_003] {
        let x = rng.vec(n + 3, 2.0);
        let seq: f64 = x[..n].iter().map(|&v| v as f64 * v as f64).sum();
        let got = adamw::sum_squares(&x, n);
        assert!((got - seq).abs() <= 1e-12 * seq.max(1.0), "n={n}: {got} vs {seq}");
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let a = one.install(|| Cpu.sum_squares(&x, n));
        let b = two.install(|| Cpu.sum_squares(&x, n));
        assert_eq!(a.to_bits(), b.to_bits());
        assert_eq!(a.to_bits(), got.to_bits());
    }
}

/// AdamW reads its gradient as grad * grad_scale: bit for bit the update after scaling the
/// gradient in place (what clipping did before it was folded in), and grad stays untouched.
#[test]
fn adamw_grad_scale_equals_scaling_first() {
    let mut rng = Rng(12);
    let n = 20_011;
    let (p0, g0, m0) = (rng.vec(n, 1.0), rng.vec(n, 3.0), rng.vec(n, 0.1));
    let v0: Vec<f32> = rng.vec(n, 0.01).iter().map(|x| x.abs()).collect();
    let hp = AdamW::with_lr(2e-4);
    // a clipping factor, and one with fp16's loss-scale division (2^-12) folded in
    for s in [0.3711_f32, 0.3711 * (1.0 / 4096.0)] {
        let (mut pa, mut ma, mut va) = (p0.clone(), m0.clone(), v0.clone());
        let mut ga = g0.clone();
        for x in &mut ga {
            *x *= s;
        }
        Cpu.adamw(&mut pa, &ga, &mut ma, &mut va, n, hp, 7, 1.0);
        let (mut pb, mut mb, mut vb) = (p0.clone(), m0.clone(), v0.clone());
        Cpu.adamw(&mut pb, &g0, &mut mb, &mut vb, n, hp, 7, s);
        for (what, a, b) in [("param", &pa, &pb), ("m", &ma, &mb), ("v", &va, &vb)] {
            let i = (0..n).find(|&i| a[i].to_bits() != b[i].to_bits());
            assert!(i.is_none(), "scale {s}: {what} differs at {i:?}");
        }
    }
}

/// The fused optimiser calls against the per-tensor ops: `sum_squares_all` is the in-order
/// sum of `sum_squares`, and `adamw_all` is `adamw` per slot with weight decay only where
/// the slot decays (an empty slot included). The CUDA backend overrides both; its parity
/// test (tests/gpu_parity.rs) holds it to these.
#[test]
fn fused_optimizer_calls_equal_per_tensor_calls() {
    let mut rng = Rng(13);
    let sizes = [1usize, 0, 4097, 2048, 30_000, 7];
    let mk = |rng: &mut Rng, s: f32| -> Vec<Vec<f32>> { sizes.iter().map(|&n| rng.vec(n, s)).collect() };
    let (p0, g0, m0) = (mk(&mut rng, 1.0), mk(&mut rng, 0.5), mk(&mut rng, 0.05));
    let v0: Vec<Vec<f32>> = mk(&mut rng, 0.01)
        .into_iter()
        .map(|v| v.iter().map(|x| x.abs()).collect())
        .collect();
    let grads: Vec<(&Vec<f32>, usize)> = g0.iter().zip(sizes).collect();
    let want: f64 = sizes.iter().zip(&g0).map(|(&n, g)| Cpu.sum_squares(g, n)).sum();
    assert_eq!(Cpu.sum_squares_all(&grads).to_bits(), want.to_bits());

    let hp = AdamW {
        weight_decay: 0.05,
        ..AdamW::with_lr(1e-3)
    };
    let decays = [true, true, false, true, false, false];
    let (mut pa, mut ma, mut va) = (p0.clone(), m0.clone(), v0.clone());
    for i in 0..sizes.len() {
        let wd = if decays[i] { hp.weight_decay } else { 0.0 };
        let h = AdamW { weight_decay: wd, ..hp };
        Cpu.adamw(&mut pa[i], &g0[i], &mut ma[i], &mut va[i], sizes[i], h, 3, 0.8);
    }
    let (mut pb, mut mb, mut vb) = (p0.clone(), m0.clone(), v0.clone());
    let mut slots: Vec<ParamSlot<'_, Vec<f32>>> = pb
        .iter_mut()
        .zip(&g0)
        .zip(mb.iter_mut().zip(vb.iter_mut()))
        .enumerate()
        .map(|(i, ((param, grad), (m, v)))| ParamSlot {
            param,
            grad,
            m,
            v,
            n: sizes[i],
            decays: decays[i],
            low: None,
        })
        .collect();
    Cpu.adamw_all(&mut slots, hp, 3, 0.8, Precision::Fp32);
    drop(slots);
    assert_eq!((&pa, &ma, &va), (&pb, &mb, &vb));
    // the non-decaying slots really took no decay: a decayed update of slot 2 differs
    let mut pd = p0[2].clone();
    let (mut md, mut vd) = (m0[2].clone(), v0[2].clone());
    Cpu.adamw(&mut pd, &g0[2], &mut md, &mut vd, sizes[2], hp, 3, 0.8);
    assert_ne!(pd, pb[2]);
}

/// A slot's rounded GEMM copy (`low`) is written in the update pass: after `adamw_all` it
/// is the updated weight rounded to bf16 / fp16, bit for bit what `quantize` gives.
#[test]
fn fused_update_writes_the_rounded_copy() {
    let mut rng = Rng(14);
    let n = 5000;
    for prec in [Precision::Bf16, Precision::Fp16] {
        let (mut p, g) = (rng.vec(n, 1.0), rng.vec(n, 0.5));
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let mut low = vec![f32::NAN; n];
        let mut slots = [ParamSlot {
            param: &mut p,
            grad: &g,
            m: &mut m,
            v: &mut v,
            n,
            decays: true,
            low: Some(&mut low),
        }];
        Cpu.adamw_all(&mut slots, AdamW::with_lr(1e-3), 1, 1.0, prec);
        let mut want = p.clone();
        Cpu.quantize(&mut want, n, prec);
        assert!(want.iter().zip(&low).all(|(a, b)| a.to_bits() == b.to_bits()), "{prec}");
        assert!(low.iter().zip(&p).any(|(a, b)| a != b), "{prec}: the copy is rounded");
    }
}

/// `clip_adamw_all` (the clipping decided where the gradients are, issue #6) against the
/// host's decision: `adamw_all` with clip / norm folded into the gradient scale when the
/// norm is above `clip` and 1 below, loss scale unscaled first; the `ClipStats` it leaves
/// say the unscaled norm and the scale. A non-finite gradient updates nothing, and the
/// skip sticks: a later call with finite gradients on the same stats updates nothing
/// either, while fresh stats do.
#[test]
fn clip_adamw_all_decides_as_the_host_and_a_skip_sticks() {
    let mut rng = Rng(15);
    let sizes = [300usize, 0, 5000, 17];
    let hp = AdamW::with_lr(1e-3);
    // one optimiser step from zero moments: `clip_adamw_all` with `stats`, or, without,
    // `adamw_all` at `want_scale`
    let update =
        |p: &mut Vec<Vec<f32>>, g: &[Vec<f32>], stats: Option<&mut Vec<f32>>, clip: f32, ls: f32, want_scale: f32| {
            let (mut m, mut v): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (
                sizes.iter().map(|&n| vec![0.0; n]).collect(),
                sizes.iter().map(|&n| vec![0.0; n]).collect(),
            );
            let mut slots: Vec<ParamSlot<'_, Vec<f32>>> = p
                .iter_mut()
                .zip(g)
                .zip(m.iter_mut().zip(v.iter_mut()))
                .enumerate()
                .map(|(i, ((param, grad), (m, v)))| ParamSlot {
                    param,
                    grad,
                    m,
                    v,
                    n: sizes[i],
                    decays: i % 2 == 0,
                    low: None,
                })
                .collect();
            match stats {
                Some(stats) => Cpu.clip_adamw_all(&mut slots, hp, 2, clip, ls, None, Precision::Fp32, stats),
                None => Cpu.adamw_all(&mut slots, hp, 2, want_scale, Precision::Fp32),
            }
        };
    let run = |p: &mut Vec<Vec<f32>>, g: &[Vec<f32>], stats: &mut Vec<f32>, clip: f32, ls: f32| {
        update(p, g, Some(stats), clip, ls, f32::NAN)
    };
    let p0: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n, 1.0)).collect();
    let g: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n, 0.5)).collect();
    let grads: Vec<(&Vec<f32>, usize)> = g.iter().zip(sizes).collect();
    let raw = Cpu.sum_squares_all(&grads).sqrt();
    for (clip, ls) in [(0.5f32, 1.0f32), (1e6, 1.0), (0.5, 1024.0), (1e6, 1024.0)] {
        let norm = raw / ls as f64;
        let want_scale = clip_factor(norm, clip) * (1.0 / ls);
        assert_eq!(
            want_scale == 1.0 / ls,
            norm <= clip as f64,
            "clip {clip}: the case it claims"
        );
        let mut want = p0.clone();
        update(&mut want, &g, None, clip, ls, want_scale);
        let mut got = p0.clone();
        let mut stats = vec![0.0; ClipStats::LEN];
        run(&mut got, &g, &mut stats, clip, ls);
        assert_eq!(got, want, "clip {clip}, loss scale {ls}");
        let st = ClipStats::read(&stats);
        assert!(!st.skipped() && st.grad_scale == want_scale);
        assert!((st.norm - norm).abs() <= 1e-14 * norm, "{} vs {norm}", st.norm);
    }
    // a NaN gradient: nothing moves, and the skip sticks for finite gradients after it
    let mut bad = g.clone();
    bad[2][77] = f32::NAN;
    let mut stats = vec![0.0; ClipStats::LEN];
    let mut p = p0.clone();
    run(&mut p, &bad, &mut stats, 1.0, 1.0);
    assert_eq!(p, p0, "a non-finite norm updates nothing");
    let st = ClipStats::read(&stats);
    assert!(st.skipped() && st.norm.is_nan());
    run(&mut p, &g, &mut stats, 1.0, 1.0);
    assert_eq!(p, p0, "the skip sticks");
    assert!(ClipStats::read(&stats).skipped());
    let mut fresh = vec![0.0; ClipStats::LEN];
    run(&mut p, &g, &mut fresh, 1.0, 1.0);
    assert_ne!(p, p0, "fresh stats update");
}
