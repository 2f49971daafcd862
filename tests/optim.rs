//! AdamW against torch.optim.AdamW, and the reductions gradient clipping uses.
mod common;
use common::Rng;
use deepcut_fast::backend::cpu::{adamw, Cpu};
use deepcut_fast::backend::{AdamW, Backend};

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
        be.adamw(&mut p, &g.to_vec(), &mut m, &mut v, n, hp, step as u64 + 1);
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

#[test]
fn scale_only_touches_n() {
    let mut x = vec![1.0, -2.0, 3.0, 4.0];
    Cpu.scale(&mut x, 3, 0.5);
    assert_eq!(x, vec![0.5, -1.0, 1.5, 4.0]);
}
