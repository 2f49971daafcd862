//! Learning-rate schedule and parameter groups (SPEC section 4: linear warm-up then
//! linear decay; weight decay on weights only).

/// Linear warm-up over `warmup` steps to `peak`, then linear decay to 0 at `total`
/// (transformers' get_linear_schedule_with_warmup). `step` is 0-based: the rate used
/// for the update that makes step `step + 1`.
pub fn linear_warmup_decay(peak: f32, step: u64, warmup: u64, total: u64) -> f32 {
    if step < warmup {
        return peak * (step + 1) as f32 / warmup as f32;
    }
    if total <= warmup {
        return peak;
    }
    let remaining = total.saturating_sub(step) as f32 / (total - warmup) as f32;
    peak * remaining.clamp(0.0, 1.0)
}

/// Biases and LayerNorm parameters get no weight decay (the usual BERT recipe, and
/// SPEC section 4).
pub fn decays(param_name: &str) -> bool {
    !(param_name.ends_with(".bias") || param_name.contains("LayerNorm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        assert_eq!(linear_warmup_decay(1.0, 0, 4, 10), 0.25);
        assert_eq!(linear_warmup_decay(1.0, 3, 4, 10), 1.0);
        assert_eq!(linear_warmup_decay(1.0, 4, 4, 10), 1.0);
        assert!((linear_warmup_decay(1.0, 7, 4, 10) - 0.5).abs() < 1e-6);
        assert_eq!(linear_warmup_decay(1.0, 10, 4, 10), 0.0);
        assert_eq!(linear_warmup_decay(2.0, 5, 0, 0), 2.0);
    }

    #[test]
    fn no_decay_on_bias_and_layernorm() {
        assert!(decays("encoder.layer.0.attention.self.query.weight"));
        assert!(decays("classifier.weight"));
        assert!(!decays("classifier.bias"));
        assert!(!decays("embeddings.LayerNorm.weight"));
        assert!(!decays("encoder.layer.3.output.LayerNorm.bias"));
    }
}
