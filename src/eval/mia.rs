//! Membership inference (SPEC section 6): how well per-sentence losses tell the forget
//! set (members, trained on) from test sentences (non-members, never seen).
//!
//! A trained model has lower loss on what it was trained on, so the attack calls the
//! lower-loss sentence the member. AUC 0.5 means the forget set looks like unseen data.

/// AUC of the loss attack: P(member loss < non-member loss) + 0.5 P(tie), over all
/// (member, non-member) pairs. Members are expected to have the LOWER loss, so a model
/// that still remembers its forget set scores above 0.5.
///
/// This is the Mann-Whitney U statistic divided by m*n, computed with one sort in
/// O((m + n) log(m + n)). Ties count one half. NaN if either list is empty or any loss
/// is NaN.
pub fn auc(members: &[f64], nonmembers: &[f64]) -> f64 {
    if members.is_empty() || nonmembers.is_empty() || members.iter().chain(nonmembers).any(|x| x.is_nan()) {
        return f64::NAN;
    }
    let mut sorted = nonmembers.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    let n = sorted.len();
    // Twice the pair score, in integers: 2 per non-member above, 1 per tie.
    let mut twice: u128 = 0;
    for &m in members {
        let below_or_eq = sorted.partition_point(|&x| x <= m);
        let below = sorted.partition_point(|&x| x < m);
        twice += 2 * (n - below_or_eq) as u128 + (below_or_eq - below) as u128;
    }
    twice as f64 / (2.0 * members.len() as f64 * n as f64)
}

/// PrivLeak = (AUC_unlearned - AUC_retrain) / AUC_retrain: 0 when the unlearned model
/// leaks membership exactly as much as retraining; positive means it still remembers,
/// negative that it over-forgot (the forget set now looks less seen than unseen data).
pub fn privleak(auc_unlearned: f64, auc_retrain: f64) -> f64 {
    (auc_unlearned - auc_retrain) / auc_retrain
}
