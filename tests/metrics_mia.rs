//! Membership-inference AUC against a brute-force pair count, and PrivLeak.
use deepcut_fast::eval::{auc, privleak};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// P(member < non-member) + 0.5 P(tie), by counting every pair.
fn brute(members: &[f64], nonmembers: &[f64]) -> f64 {
    let mut score = 0.0;
    for &m in members {
        for &n in nonmembers {
            score += if m < n {
                1.0
            } else if m == n {
                0.5
            } else {
                0.0
            };
        }
    }
    score / (members.len() * nonmembers.len()) as f64
}

#[test]
fn metrics_mia_auc_matches_brute_force_with_ties() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for case in 0..200 {
        let m = 1 + (rng.next_u32() % 40) as usize;
        let n = 1 + (rng.next_u32() % 40) as usize;
        // Few distinct values (many ties); members drawn a little lower.
        let levels = 1 + case % 6;
        let mut draw = |shift: u32| ((rng.next_u32() % levels as u32) + shift) as f64 * 0.25;
        let members: Vec<f64> = (0..m).map(|_| draw(0)).collect();
        let nonmembers: Vec<f64> = (0..n).map(|_| draw(1)).collect();
        let (fast, slow) = (auc(&members, &nonmembers), brute(&members, &nonmembers));
        assert!((fast - slow).abs() < 1e-12, "case {case}: {fast} vs {slow}");
    }
}

#[test]
fn metrics_mia_auc_direction_and_edges() {
    assert_eq!(auc(&[0.1, 0.2], &[0.5, 0.9]), 1.0, "members lower: fully separable");
    assert_eq!(auc(&[0.5, 0.9], &[0.1, 0.2]), 0.0);
    assert_eq!(auc(&[1.0, 1.0], &[1.0]), 0.5, "all ties");
    assert!(auc(&[], &[1.0]).is_nan());
    assert!(auc(&[1.0], &[f64::NAN]).is_nan());
}

#[test]
fn metrics_mia_privleak() {
    assert_eq!(privleak(0.6, 0.5), (0.6 - 0.5) / 0.5);
    assert_eq!(privleak(0.5, 0.5), 0.0);
    assert!(privleak(0.4, 0.5) < 0.0);
}
