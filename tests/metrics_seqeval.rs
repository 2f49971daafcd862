//! Entity metrics against seqeval (default mode): hand-picked tricky cases and 300 random
//! corpora, recorded by scripts/golden_seqeval.py in tests/golden/seqeval/cases.json.
use deepcut_fast::eval::metrics::get_entities;
use deepcut_fast::eval::{entity_report, token_accuracy, Prf};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    gold: Vec<Vec<String>>,
    pred: Vec<Vec<String>>,
    micro: GoldPrf,
    per_type: BTreeMap<String, GoldPrf>,
    accuracy: Option<f64>,
}

#[derive(Deserialize)]
struct GoldPrf {
    precision: f64,
    recall: f64,
    f1: f64,
    support: usize,
    predicted: usize,
    correct: usize,
}

fn check(name: &str, what: &str, got: &Prf, want: &GoldPrf) {
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12;
    assert!(
        close(got.precision, want.precision) && close(got.recall, want.recall) && close(got.f1, want.f1),
        "{name} {what}: got P {} R {} F {}, seqeval P {} R {} F {}",
        got.precision,
        got.recall,
        got.f1,
        want.precision,
        want.recall,
        want.f1
    );
    assert_eq!(
        (got.support, got.predicted, got.correct),
        (want.support, want.predicted, want.correct),
        "{name} {what}: (support, predicted, correct)"
    );
}

fn cases() -> Vec<Case> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/seqeval/cases.json");
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str::<Cases>(&text).unwrap().cases
}

#[test]
fn metrics_seqeval_golden_cases() {
    let cases = cases();
    assert!(cases.len() >= 300, "tricky cases plus the random stress set");
    for c in &cases {
        let r = entity_report(&c.gold, &c.pred);
        check(&c.name, "micro", &r.micro, &c.micro);
        let got: Vec<&String> = r.per_type.keys().collect();
        let want: Vec<&String> = c.per_type.keys().collect();
        assert_eq!(got, want, "{}: entity types", c.name);
        for (ty, w) in &c.per_type {
            check(&c.name, ty, &r.per_type[ty], w);
        }
        if let Some(acc) = c.accuracy {
            assert!(
                (token_accuracy(&c.gold, &c.pred) - acc).abs() <= 1e-12,
                "{}: accuracy",
                c.name
            );
        }
    }
}

fn tags(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

#[test]
fn metrics_seqeval_chunk_rules() {
    // I- after O starts a chunk; a type change ends one; no chunk crosses sentences.
    let e = get_entities(&[tags("O I-PER I-PER B-LOC I-ORG"), tags("I-ORG O")]);
    let want = [("PER", 1, 2), ("LOC", 3, 3), ("ORG", 4, 4), ("ORG", 6, 6)];
    let got: Vec<(&str, usize, usize)> = e.iter().map(|(t, s, x)| (t.as_str(), *s, *x)).collect();
    assert_eq!(got, want);
}

#[test]
fn metrics_seqeval_zero_cases() {
    let r = entity_report(&[tags("O O")], &[tags("O O")]);
    assert_eq!(r.micro, Prf::default());
    assert!(r.per_type.is_empty());
    let r = entity_report(&[tags("B-A O")], &[tags("O O")]);
    assert_eq!(
        (r.micro.precision, r.micro.recall, r.micro.f1, r.micro.support),
        (0.0, 0.0, 0.0, 1)
    );
    assert_eq!(token_accuracy(&[], &[]), 0.0);
}
