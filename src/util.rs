//! Small helpers shared by every layer.
use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Write `bytes` to `path` atomically: a temp file in the same folder, fsync, rename,
/// fsync of the folder (so the rename itself survives a power loss). A crash leaves
/// either the old file or the new one, never a torn file; a killed process may leave
/// its temp file (`.NAME.tmpPID`, see [`remove_stale_temp_files`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| Error::file(path, "not a file path"))?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Some file systems cannot fsync a folder; the data itself is already synced.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Whether `name` is a temp file of [`write_atomic`]: `.NAME.tmpPID`.
pub fn is_atomic_temp_name(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(".tmp")
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes the temp files of [`write_atomic`] under `dir` (recursively) that a killed
/// process left behind; returns how many. Only for a folder this process owns (a run
/// folder being resumed): a live writer's temp file would be removed too.
pub fn remove_stale_temp_files(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() {
            removed += remove_stale_temp_files(&path)?;
        } else if kind.is_file() && is_atomic_temp_name(&entry.file_name().to_string_lossy()) {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// A progress bar on stderr with ETA and a message (current losses), or nothing with
/// `--quiet` (or when stderr is not a terminal, indicatif hides it by itself).
pub fn progress(len: u64, what: &str, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise}<{eta_precise} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// Seconds since the Unix epoch (for logs and reports).
pub fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Peak resident memory of this process in bytes (Linux: VmHWM), 0 where unknown.
pub fn peak_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        })
        .map_or(0, |kb| kb * 1024)
}

/// Fault injection for the kill-and-resume tests: when DEEPCUT_ABORT_AFTER_STEP=N is set,
/// the process exits abruptly (status 86, no cleanup, like a kill) after step N.
pub fn maybe_abort_after(step: u64) {
    if abort_due(step) {
        eprintln!("DEEPCUT_ABORT_AFTER_STEP={step}: aborting");
        std::process::exit(86);
    }
}

/// Whether `maybe_abort_after(step)` will abort (`checkpoint::Writer::maybe_abort_after`
/// first lets its write finish, so the tests kill a run at a known checkpoint).
pub fn abort_due(step: u64) -> bool {
    std::env::var("DEEPCUT_ABORT_AFTER_STEP").is_ok_and(|v| v.parse::<u64>().ok() == Some(step))
}

/// Knuth's MMIX 64-bit linear congruential generator: the cheap, stable value stream
/// behind synthetic benches, goldens and the GPU self-check, where only reproducibility
/// matters (data order uses `data::rng`'s ChaCha streams). Callers take different bits
/// of the state; the sequences are fixed, so bench inputs and goldens never move.
#[derive(Clone, Debug)]
pub struct Lcg {
    state: u64,
    increment: u64,
}

impl Lcg {
    pub fn new(seed: u64) -> Lcg {
        Lcg::with_increment(seed, 1442695040888963407)
    }
    /// The same multiplier with another increment (the model-weight streams of the
    /// step benches use 1).
    pub fn with_increment(seed: u64, increment: u64) -> Lcg {
        Lcg { state: seed, increment }
    }
    /// Advances and returns the whole new state.
    pub fn next_state(&mut self) -> u64 {
        self.state = self
            .state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(self.increment);
        self.state
    }
    /// Advances and returns the top 31 bits.
    pub fn next_u31(&mut self) -> u64 {
        self.next_state() >> 33
    }
    /// Advances and returns a value in [0, 1) from the top 24 bits.
    pub fn next_unit(&mut self) -> f32 {
        (self.next_state() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Advances and returns a value in 0..n, scaled from `next_unit` (slightly uneven
    /// for large n; for test inputs only).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_unit() * n as f32) as usize).min(n - 1)
    }
}

/// FNV-1a, 64 bits: a stable fingerprint of bytes (cache keys, manifests); not for
/// security. The same bytes give the same value on every machine and build.
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn eat(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }

    /// A string, followed by a separator byte (so "ab","c" and "a","bc" differ).
    pub fn eat_str(&mut self, s: &str) -> &mut Self {
        self.eat(s.as_bytes()).eat(&[0xff])
    }

    pub fn finish(&self) -> u64 {
        self.0
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}
