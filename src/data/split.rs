//! The forget / retain split of train (SPEC section 1): by ratio and seed, or from a
//! file of 0-based sentence indices. Forget sets are returned sorted.
use super::rng::{below, keyed_rng, Purpose};
use crate::error::{Error, Result};
use crate::util::write_atomic;
use std::collections::HashMap;
use std::path::Path;

/// `round(ratio * n)` (at least 1) train sentences drawn uniformly without replacement,
/// keyed by `seed` only: the same indices on every machine and every run. Sorted.
/// Errors name `--forget-ratio`: a ratio outside (0, 1), or one that would forget all
/// of train.
pub fn forget_by_ratio(n_train: usize, ratio: f64, seed: u64) -> Result<Vec<usize>> {
    if !(ratio > 0.0 && ratio < 1.0) {
        return Err(Error::invalid(format!("--forget-ratio {ratio} must be in (0, 1)")));
    }
    let count = ((ratio * n_train as f64).round() as usize).max(1);
    if count >= n_train {
        return Err(Error::invalid(format!(
            "--forget-ratio {ratio} selects {count} of {n_train} train sentences: nothing would be retained"
        )));
    }
    // Partial Fisher-Yates: the first `count` slots become a uniform sample.
    let mut rng = keyed_rng(seed, Purpose::ForgetSplit, 0);
    let mut all: Vec<usize> = (0..n_train).collect();
    for i in 0..count {
        let j = i + below(&mut rng, (n_train - i) as u64) as usize;
        all.swap(i, j);
    }
    let mut forget = all[..count].to_vec();
    forget.sort_unstable();
    Ok(forget)
}

/// Read forget indices from `path`: one 0-based train sentence index per line; blank
/// lines and `#` comments (whole-line or after the number) are skipped. Sorted.
/// Errors name the file and line: not a number, out of range (with the train size),
/// listed twice (both lines); and the file when it lists nothing or all of train.
pub fn read_indices(path: &Path, n_train: usize) -> Result<Vec<usize>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut seen: HashMap<usize, usize> = HashMap::new(); // index -> line
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let field = raw.split('#').next().unwrap_or("").trim();
        if field.is_empty() {
            continue;
        }
        let idx: usize = field
            .parse()
            .map_err(|_| Error::line(path, line_no, format!("`{field}` is not a 0-based sentence index")))?;
        if idx >= n_train {
            return Err(Error::line(
                path,
                line_no,
                format!(
                    "index {idx} is out of range: train has {n_train} sentences (0..={})",
                    n_train.saturating_sub(1)
                ),
            ));
        }
        if let Some(first) = seen.insert(idx, line_no) {
            return Err(Error::line(
                path,
                line_no,
                format!("index {idx} is listed twice (lines {first} and {line_no})"),
            ));
        }
        out.push(idx);
    }
    if out.is_empty() {
        return Err(Error::file(path, "the forget set is empty (no indices in the file)"));
    }
    if out.len() == n_train {
        return Err(Error::file(
            path,
            format!("the forget set is all {n_train} train sentences: nothing would be retained"),
        ));
    }
    out.sort_unstable();
    Ok(out)
}

/// Write indices one per line (after a comment header) atomically, so the chosen forget
/// set goes into the run folder as `forget.txt` and can be passed back as a file.
pub fn write_indices(path: &Path, indices: &[usize]) -> Result<()> {
    let mut out = String::from("# 0-based sentence indices into train.conll\n");
    for i in indices {
        out.push_str(&i.to_string());
        out.push('\n');
    }
    write_atomic(path, out.as_bytes())
}

/// `0..n_train` without the (sorted or unsorted) forget indices, ascending.
pub fn retain_indices(n_train: usize, forget: &[usize]) -> Vec<usize> {
    let mut is_forget = vec![false; n_train];
    for &i in forget {
        if let Some(f) = is_forget.get_mut(i) {
            *f = true;
        }
    }
    (0..n_train).filter(|&i| !is_forget[i]).collect()
}
