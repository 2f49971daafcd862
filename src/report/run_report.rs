//! report.html of a run: one self-contained page (no scripts, no network) with the
//! metrics against the original (and retrained) model, the loss curves, the stopping
//! checks, and the PCA picture of the forget tokens' embeddings before and after,
//! coloured by class.
use super::pca::{pca2_axes, project};
use super::svg::{common_bounds, line_chart, scatter, Series};
use serde_json::Value;

fn f(v: &Value) -> String {
    v.as_f64().map_or("–".to_string(), |x| format!("{x:.4}"))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The metrics table: rows are models, columns forget/retain/dev/test F1 and MIA AUC.
fn metrics_table(r: &Value) -> String {
    let mut rows = vec![("original", &r["reference"]["original"])];
    if !r["reference"]["sisa_original"].is_null() {
        rows.push(("SISA ensemble before unlearning", &r["reference"]["sisa_original"]));
    }
    if !r["reference"]["retrain"].is_null() {
        rows.push(("retrained (reference)", &r["reference"]["retrain"]));
    }
    let method = format!("after {}", r["method"].as_str().unwrap_or("?"));
    rows.push((method.as_str(), &r["metrics"]));
    let mut s = String::from("<table><tr><th>model</th><th>forget F1</th><th>retain F1</th><th>dev F1</th><th>test F1</th><th>MIA AUC</th></tr>");
    for (name, m) in rows {
        s += &format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            f(&m["forget"]["f1"]),
            f(&m["retain"]["f1"]),
            f(&m["dev"]["f1"]),
            f(&m["test"]["f1"]),
            f(&m["mia_auc"])
        );
    }
    if let Some(g) = r["reference"]["gap_to_retrain"].as_object() {
        s += &format!(
            "<tr><td>gap to retrained</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>PrivLeak {}</td></tr>",
            f(&g["forget_f1"]),
            f(&g["retain_f1"]),
            f(&g["dev_f1"]),
            f(&g["test_f1"]),
            f(&r["reference"]["privleak"])
        );
    }
    s += "</table>";
    if let Some(w) = r["reference"]["original"]["warning"].as_str() {
        s += &format!("<p><b>Warning:</b> {}</p>", esc(w));
    }
    s
}

fn curves(r: &Value) -> String {
    let steps = r["history"]["steps"].as_array().cloned().unwrap_or_default();
    let series = |key: &str, name: &str| Series {
        name: name.to_string(),
        points: steps
            .iter()
            .map(|s| (s["step"].as_f64().unwrap_or(0.0), s[key].as_f64().unwrap_or(f64::NAN)))
            .collect(),
    };
    if r["method"] == "sisa" {
        return line_chart(
            "cross-entropy while retraining the affected shards (one after another)",
            "step",
            "loss",
            &[series("ce", "cross-entropy")],
        );
    }
    // One chart per term: their scales differ by an order of magnitude.
    let mut out = line_chart("retain cross-entropy", "step", "loss", &[series("ce", "cross-entropy")]);
    out += &line_chart(
        "forget term (DeepCUT: L_f; neggrad+: forget CE)",
        "step",
        "loss",
        &[series("contrast", "forget term")],
    );
    let checks = r["history"]["checks"].as_array().cloned().unwrap_or_default();
    if !checks.is_empty() {
        let target = r["stopping"]["target_f1"].as_f64().unwrap_or(f64::NAN);
        let pts: Vec<(f64, f64)> = checks
            .iter()
            .map(|c| {
                (
                    c["step"].as_f64().unwrap_or(0.0),
                    c["forget_f1"].as_f64().unwrap_or(f64::NAN),
                )
            })
            .collect();
        let last = pts.last().map_or(1.0, |p| p.0);
        out += &line_chart(
            "stopping rule: forget F1",
            "step",
            "F1",
            &[
                Series {
                    name: "forget F1".into(),
                    points: pts,
                },
                Series {
                    name: "target (original dev F1)".into(),
                    points: vec![(0.0, target), (last, target)],
                },
            ],
        );
    }
    out
}

/// SISA's shards: sizes, forget sentences, which were retrained, and what each cost.
fn sisa_section(r: &Value) -> String {
    let s = &r["sisa"];
    let Some(shards) = s["per_shard"].as_array() else {
        return String::new();
    };
    let mut t = String::from("<h2>SISA shards</h2><table><tr><th>shard</th><th>sentences</th><th>forget sentences</th><th>retrained</th><th>original: steps</th><th>original: seconds</th><th>retrain: steps</th><th>retrain: seconds</th></tr>");
    for sh in shards {
        t += &format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td></tr>",
            sh["shard"],
            sh["sentences"],
            sh["forget_sentences"],
            if sh["dropped"] == true {
                "dropped (all forgotten)"
            } else if sh["retrained"] == true {
                "yes"
            } else {
                "no (kept)"
            },
            sh["original"]["steps"],
            sh["original"]["seconds"].as_f64().unwrap_or(0.0),
            sh["retrain"]["steps"].as_u64().map_or("–".into(), |x| x.to_string()),
            sh["retrain"]["seconds"]
                .as_f64()
                .map_or("–".into(), |x| format!("{x:.1}")),
        );
    }
    let oc = &r["cost"]["original_shards"];
    t + &format!(
        "</table><p>Prediction: per word, the argmax of the shards' mean softmax. The cost above is the retraining \
         of the affected shards only; the original shard models cost {:.1} s, {} steps once ({}, folder {}).</p>",
        oc["seconds"].as_f64().unwrap_or(0.0),
        oc["steps"],
        if s["original_shards"]["reused"] == true {
            "reused from the cache by this run"
        } else {
            "trained by this run"
        },
        esc(s["original_shards"]["folder"].as_str().unwrap_or("?"))
    )
}

/// PCA of the forget tokens' final hidden states, axes fitted on the original's.
fn embeddings(before: &[f32], after: &[f32], labels: &[i32], names: &[String], c: usize) -> String {
    let m = labels.len();
    if m < 3 || before.len() != m * c || after.len() != m * c {
        return "<p>(too few forget tokens for a picture)</p>".into();
    }
    let (mean, axes) = pca2_axes(before, m, c);
    let (pb, pa) = (project(before, m, c, &mean, &axes), project(after, m, c, &mean, &axes));
    let bounds = common_bounds(&[&pb, &pa]);
    let class: Vec<usize> = labels.iter().map(|&y| y.max(0) as usize).collect();
    scatter("forget tokens, original model", &pb, &class, names, Some(bounds))
        + &scatter("forget tokens, after unlearning", &pa, &class, names, Some(bounds))
}

pub fn render(r: &Value, before: &[f32], after: &[f32], labels: &[i32], names: &[String], c: usize) -> String {
    let cost = &r["cost"];
    let emb = if r["method"] == "sisa" {
        "<p>Not drawn for SISA: its prediction averages the softmax of several shard models, each with its own \
         embedding space, so there is no one \"after\" embedding to set beside the original's.</p>"
            .to_string()
    } else {
        embeddings(before, after, labels, names, c)
    };
    format!(
        r#"<!DOCTYPE html><html><head><meta charset="utf-8"><title>deepcut-fast: {method}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}pre{{background:#f6f6f6;padding:8px;overflow-x:auto}}</style></head><body>
<h1>Unlearning report: {method}</h1>
<p>Forget set: {count} of {train} train sentences ({file}). Stopped: {reason}.</p>
<h2>Metrics (entity F1, seqeval)</h2>{table}
<p>MIA AUC: how well per-sentence loss tells forget sentences (members) from test sentences; 0.5 = indistinguishable.</p>
<h2>Cost</h2><table><tr><th>steps</th><th>seconds</th><th>tokens</th><th>tokens/s</th><th>peak memory (MiB)</th></tr>
<tr><td>{steps}</td><td>{secs:.1}</td><td>{tokens}</td><td>{tps:.0}</td><td>{mem:.0}</td></tr></table>
{sisa}<h2>Losses</h2>{curves}
<h2>Forget tokens' embeddings (PCA on the original's), coloured by gold class</h2>{emb}
<h2>Resolved configuration</h2><pre>{config}</pre>
</body></html>"#,
        method = esc(r["method"].as_str().unwrap_or("?")),
        count = r["forget"]["count"],
        train = r["forget"]["train_sentences"],
        file = esc(r["forget"]["file"].as_str().unwrap_or("")),
        reason = esc(r["stopping"]["reason"].as_str().unwrap_or("")),
        table = metrics_table(r),
        steps = cost["steps"],
        secs = cost["seconds"].as_f64().unwrap_or(0.0),
        tokens = cost["tokens"],
        tps = cost["tokens_per_second"].as_f64().unwrap_or(0.0),
        mem = cost["peak_memory_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        curves = curves(r),
        sisa = sisa_section(r),
        emb = emb,
        config = esc(&serde_json::to_string_pretty(&r["config"]).unwrap_or_default()),
    )
}

/// A few lines for stderr at the end of a run.
pub fn summary(r: &Value) -> String {
    let row = |name: &str, m: &Value| {
        format!(
            "\n{:<10} {:>8} {:>8} {:>8} {:>8} {:>8}",
            name,
            f(&m["forget"]["f1"]),
            f(&m["retain"]["f1"]),
            f(&m["dev"]["f1"]),
            f(&m["test"]["f1"]),
            f(&m["mia_auc"])
        )
    };
    let mut s = format!(
        "{:<10} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "model", "forget", "retain", "dev", "test", "MIA"
    );
    s += &row("original", &r["reference"]["original"]);
    if !r["reference"]["sisa_original"].is_null() {
        s += &row("sisa orig", &r["reference"]["sisa_original"]);
    }
    s += &row(r["method"].as_str().unwrap_or("?"), &r["metrics"]);
    if !r["reference"]["retrain"].is_null() {
        s += &row("retrained", &r["reference"]["retrain"]);
    }
    s += &format!(
        "\n{} steps, {:.1} s",
        r["cost"]["steps"],
        r["cost"]["seconds"].as_f64().unwrap_or(0.0)
    );
    let p = &r["precision"];
    if p["precision"] == "fp16" {
        s += &format!(
            " (fp16: {} skipped on gradient overflow, final loss scale {})",
            p["skipped_steps"], p["loss_scale_final"]
        );
    }
    if let Some(w) = r["reference"]["original"]["warning"].as_str() {
        s += &format!("\nwarning: {w}");
    }
    s
}
