//! comparison.html: several runs on one page — a table of their metrics and the
//! forget-F1 versus retain-F1 trade-off picture, with the original and the retrained
//! reference as points of their own (the picture a choice of settings argues with).
use super::svg::scatter_with;
use serde_json::Value;

fn f1(m: &Value, split: &str) -> f64 {
    m[split]["f1"].as_f64().unwrap_or(f64::NAN)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A short description of a run's settings: the method and the options most often varied
/// (the contrastive ones only for DeepCUT).
pub fn settings(r: &Value) -> String {
    let u = &r["config"]["unlearning"];
    let method = r["method"].as_str().unwrap_or("?");
    let mut keys = vec![("lr", "lr"), ("max_forget_epochs", "passes")];
    if method == "deepcut" {
        keys.extend([("gamma", "gamma"), ("tau", "tau"), ("anchors", "anchors")]);
    }
    let mut s = method.to_string();
    for (k, name) in keys {
        match u.get(k) {
            // f32 options are stored widened to f64; print them as the f32 they were
            Some(Value::Number(n)) => s += &format!(" {name}={}", n.as_f64().unwrap_or(f64::NAN) as f32),
            Some(Value::String(t)) => s += &format!(" {name}={t}"),
            _ => {}
        }
    }
    s
}

/// The page for `runs` (name, report.json).
pub fn render(runs: &[(String, Value)]) -> String {
    let mut rows = String::new();
    let mut pts = vec![];
    let mut class = vec![];
    let mut names = vec![];
    let mut add_point = |name: String, m: &Value, pts: &mut Vec<(f64, f64)>| {
        let p = (f1(m, "forget"), f1(m, "retain"));
        if p.0.is_finite() && p.1.is_finite() {
            class.push(names.len());
            names.push(name);
            pts.push(p);
        }
    };
    if let Some((_, first)) = runs.first() {
        add_point("original".into(), &first["reference"]["original"], &mut pts);
        if !first["reference"]["retrain"].is_null() {
            add_point("retrained".into(), &first["reference"]["retrain"], &mut pts);
        }
    }
    for (i, (name, r)) in runs.iter().enumerate() {
        let m = &r["metrics"];
        add_point(
            format!("{} {}", i + 1, r["method"].as_str().unwrap_or("?")),
            m,
            &mut pts,
        );
        rows += &format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td><td>{:.0}</td></tr>",
            i + 1,
            esc(name),
            esc(&settings(r)),
            f1(m, "forget"),
            f1(m, "retain"),
            f1(m, "dev"),
            f1(m, "test"),
            m["mia_auc"].as_f64().unwrap_or(f64::NAN),
            r["cost"]["steps"],
            r["cost"]["seconds"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let plot = scatter_with(
        "trade-off: forget F1 against retain F1",
        ("forget F1", "retain F1"),
        5.0,
        &pts,
        &class,
        &names,
        None,
    );
    format!(
        r#"<!DOCTYPE html><html><head><meta charset="utf-8"><title>deepcut-fast: comparison</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style></head><body>
<h1>Comparison of {n} runs</h1>
<table><tr><th>#</th><th>run</th><th>settings</th><th>forget F1</th><th>retain F1</th><th>dev F1</th><th>test F1</th><th>MIA AUC</th><th>steps</th><th>seconds</th></tr>{rows}</table>
<p>Lower forget F1 and higher retain F1 are better; the retrained model marks the forget F1 that unlearning should reach, not undercut.</p>
{plot}
</body></html>"#,
        n = runs.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_and_points_for_each_run() {
        let r = json!({
            "method": "deepcut",
            "config": {"unlearning": {"lr": 3e-5, "gamma": 0.1, "max_forget_epochs": 10.0, "anchors": "all", "tau": 0.1}},
            "metrics": {"forget": {"f1": 0.6}, "retain": {"f1": 0.98}, "dev": {"f1": 0.5}, "test": {"f1": 0.4}, "mia_auc": 0.6},
            "reference": {"original": {"forget": {"f1": 1.0}, "retain": {"f1": 0.99}}, "retrain": {"forget": {"f1": 0.7}, "retain": {"f1": 0.98}}},
            "cost": {"steps": 40, "seconds": 12.0}
        });
        let html = render(&[("a".into(), r.clone()), ("b<x>".into(), r)]);
        assert_eq!(html.matches("<tr><td>").count(), 2);
        assert!(html.contains("b&lt;x&gt;"));
        assert_eq!(html.matches("<circle").count(), 4, "original, retrained and two runs");
        let fin = settings(&json!({"method": "finetune", "config": {"unlearning": {"lr": 5e-5, "gamma": 0.1}}}));
        assert!(fin.contains("lr=0.00005") && !fin.contains("gamma"), "{fin}");
    }
}
