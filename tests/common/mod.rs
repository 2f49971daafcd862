//! Helpers shared by the integration tests.
#![allow(dead_code)]
use std::path::PathBuf;

pub mod cuda_emu;
pub mod fixture;
pub mod golden;

/// Printed straight to stderr, past libtest's output capture (which takes `eprintln!`),
/// so CI logs show it: a skipped check says so, never passing silently.
pub fn loud(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// Small portable generator for test inputs (xorshift64*).
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// ||a - b|| / ||b|| over whole tensors (SPEC section 7's measure).
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((*x as f64) - (*y as f64)).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// ../shared next to the repository (CI lays it there too).
pub fn shared() -> PathBuf {
    repo().join("../shared")
}

/// Options of a tiny `bench` (after the subcommand): tests/golden/tiny-bert's shape, 2
/// forget + 2 retain sequences of 8 tokens, 5 labels, 2 timed steps after `warmup`, a
/// 32^3 GEMM for the rate, on `device` in `precision`.
pub fn tiny_bench_args(device: &str, precision: &str, warmup: u32) -> Vec<String> {
    let cfg = repo().join("tests/golden/tiny-bert/config.json");
    [
        "--config",
        &cfg.display().to_string(),
        "--bf",
        "2",
        "--br",
        "2",
        "--seq-len",
        "8",
        "--steps",
        "2",
        "--warmup",
        &warmup.to_string(),
        "--labels",
        "5",
        "--matmul-size",
        "32",
        "--device",
        device,
        "--precision",
        precision,
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

/// A window of `sentence` with these token ids and labels; its words are the labelled
/// positions.
pub fn window(sentence: usize, ids: &[u32], labels: &[i32]) -> deepcut_fast::data::Window {
    let word_pos = labels
        .iter()
        .enumerate()
        .filter(|(_, &y)| y >= 0)
        .map(|(i, _)| i)
        .collect();
    deepcut_fast::data::Window {
        sentence,
        first_word: 0,
        ids: ids.to_vec(),
        labels: labels.to_vec(),
        word_pos,
    }
}

/// `n` random windows of `min_len .. min_len + span` tokens: [CLS]=1, word ids in
/// 3..3+vocab, [SEP]=2; about four words in five labelled with one of 5 classes.
pub fn random_windows(
    rng: &mut Rng, n: usize, min_len: usize, span: usize, vocab: usize,
) -> Vec<deepcut_fast::data::Window> {
    use deepcut_fast::backend::IGNORE_INDEX;
    (0..n)
        .map(|s| {
            let len = min_len + rng.below(span);
            let mut ids = vec![1u32];
            let mut labels = vec![IGNORE_INDEX];
            for _ in 1..len - 1 {
                ids.push(3 + rng.below(vocab) as u32);
                labels.push(if rng.below(5) == 0 {
                    IGNORE_INDEX
                } else {
                    rng.below(5) as i32
                });
            }
            ids.push(2);
            labels.push(IGNORE_INDEX);
            window(s, &ids, &labels)
        })
        .collect()
}
