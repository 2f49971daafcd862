//! `deepcut-fast compare`: one page comparing several run folders (table + trade-off plot).
use crate::error::{Error, Result};
use crate::util::write_atomic;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct CompareArgs {
    /// Run folders (each with report.json), e.g. one per method or setting on the same split.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Where to write the page.
    #[arg(long, default_value = "comparison.html")]
    out: PathBuf,
}

pub fn run(a: CompareArgs) -> Result<()> {
    let mut runs = vec![];
    for dir in &a.runs {
        let path = dir.join("report.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("not a run report: {e}")))?;
        if !v["metrics"].is_object() {
            return Err(Error::file(&path, "not a run report: no `metrics`"));
        }
        runs.push((dir.display().to_string(), v));
    }
    write_atomic(&a.out, crate::report::compare::render(&runs).as_bytes())?;
    eprintln!("compared {} runs -> {}", runs.len(), a.out.display());
    Ok(())
}
