//! Packed batches of windows, length-bucketed batch orders, and resumable streams.
use super::encode::Window;
use super::rng::{keyed_rng, shuffle, Purpose};
use crate::error::{Error, Result};
use crate::model::HostBatch;
use serde::{Deserialize, Serialize};

/// How position ids are numbered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PositionStyle {
    /// BERT: 0, 1, ..., L-1 on every sequence.
    Absolute,
    /// RoBERTa: transformers' `create_position_ids_from_input_ids` — real tokens count
    /// up from `pad_id + 1`, padding tokens get `pad_id` (the config's `pad_token_id`).
    Roberta { pad_id: u32 },
}

/// A packed batch: the model's input ([`HostBatch`]: the windows' tokens one after another,
/// no padding, `seqs` their offsets; positions per [`PositionStyle`], type ids 0, labels at
/// each word's first subword and [`IGNORE`](super::encode::IGNORE) elsewhere) plus which window each sequence
/// holds. Derefs to the `HostBatch`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub inputs: HostBatch,
    /// Row r holds window `windows[r]`: an index into the caller's window list for
    /// [`Batch::gather`], the position in the given slice for [`Batch::new`].
    pub windows: Vec<usize>,
}

impl std::ops::Deref for Batch {
    type Target = HostBatch;
    fn deref(&self) -> &HostBatch {
        &self.inputs
    }
}

impl Batch {
    /// Pack `windows`; `windows[r]` becomes sequence r.
    pub fn new(windows: &[&Window], style: PositionStyle) -> Batch {
        let index: Vec<usize> = (0..windows.len()).collect();
        Self::build(windows, index, style)
    }

    /// The batch of `all[idx[0]], all[idx[1]], ...`, with `windows = idx`.
    /// Panics if an index is out of range (indices come from the batchers, not users).
    pub fn gather(all: &[Window], idx: &[usize], style: PositionStyle) -> Batch {
        let rows: Vec<&Window> = idx.iter().map(|&i| &all[i]).collect();
        Self::build(&rows, idx.to_vec(), style)
    }

    fn build(rows: &[&Window], index: Vec<usize>, style: PositionStyle) -> Batch {
        let b = rows.len();
        let t = rows.iter().map(|w| w.ids.len()).max().unwrap_or(0);
        let n: usize = rows.iter().map(|w| w.ids.len()).sum();
        let mut batch = HostBatch {
            b,
            t,
            seqs: Vec::with_capacity(b + 1),
            dup: 0,
            input_ids: Vec::with_capacity(n),
            position_ids: vec![0; n],
            type_ids: vec![0; n],
            labels: Vec::with_capacity(n),
        };
        batch.seqs.push(0);
        for w in rows {
            let s0 = batch.input_ids.len();
            batch.input_ids.extend(w.ids.iter().map(|&id| id as i32));
            batch.labels.extend_from_slice(&w.labels);
            let s1 = batch.input_ids.len();
            fill_positions(&mut batch.position_ids[s0..s1], &batch.input_ids[s0..s1], style);
            batch.seqs.push(s1 as i32);
        }
        Batch {
            inputs: batch,
            windows: index,
        }
    }
}

/// Position ids of one sequence of `ids`.
fn fill_positions(pos: &mut [i32], ids: &[i32], style: PositionStyle) {
    match style {
        PositionStyle::Absolute => pos.iter_mut().enumerate().for_each(|(i, p)| *p = i as i32),
        PositionStyle::Roberta { pad_id } => {
            // Literally transformers: mask = ids != pad; pos = cumsum(mask) * mask + pad.
            // (So a real token whose id is the pad id is numbered as padding, as there.)
            let pad = pad_id as i32;
            let mut count = 0;
            for (p, &id) in pos.iter_mut().zip(ids) {
                let real = (id != pad) as i32;
                count += real;
                *p = count * real + pad;
            }
        }
    }
}

/// Items per sort chunk, in batches: large enough that batches are nearly uniform in
/// length (the GPU attention grid is sized for the longest), small enough that batch
/// composition stays random.
const CHUNK_BATCHES: usize = 50;

/// Length-bucketed training order over items `0..lengths.len()`: shuffle, cut into
/// chunks of `50 * batch`, sort each chunk by length, cut chunks into batches of
/// `batch` (the last of a chunk may be smaller), shuffle the batch order. The same
/// (seed, epoch) gives the same batches on every machine. `batch` 0 is taken as 1
/// (callers validate the option).
pub fn bucketed_batches(lengths: &[usize], batch: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let batch = batch.max(1);
    let mut rng = keyed_rng(seed, Purpose::Buckets, epoch);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    shuffle(&mut rng, &mut order);
    let mut batches = Vec::with_capacity(lengths.len().div_ceil(batch));
    for chunk in order.chunks_mut(CHUNK_BATCHES * batch) {
        // Stable sort: equal lengths keep their shuffled order, so the result is a
        // function of the shuffle alone.
        chunk.sort_by_key(|&i| lengths[i]);
        batches.extend(chunk.chunks(batch).map(<[usize]>::to_vec));
    }
    shuffle(&mut rng, &mut batches);
    batches
}

/// Most rows of an evaluation batch: far above what a token budget gives at real lengths,
/// and well inside the grid limits of the CUDA kernels (65,535 in y and z).
pub const MAX_EVAL_ROWS: usize = 4096;

/// Evaluation order: items sorted by length (ties by index), each batch as many items as
/// fit `max_tokens` in all (batches are packed: a batch costs the sum of its lengths; at
/// most [`MAX_EVAL_ROWS`] items; an item longer than `max_tokens` alone). Sorting keeps the
/// sequences of a batch alike in length, which the GPU's attention grid (sized for the
/// longest) likes. No randomness; every item once.
pub fn token_batches(lengths: &[usize], max_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (lengths[i], i));
    let mut batches: Vec<Vec<usize>> = vec![];
    let mut cur: Vec<usize> = vec![];
    let mut sum = 0;
    for i in order {
        if !cur.is_empty() && (sum + lengths[i] > max_tokens || cur.len() == MAX_EVAL_ROWS) {
            batches.push(std::mem::take(&mut cur));
            sum = 0;
        }
        cur.push(i);
        sum += lengths[i];
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

/// Where a [`Stream`] is: everything needed, with the same item set and batch size,
/// to continue it exactly. Saved in checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    pub seed: u64,
    /// Completed passes over the items (the current pass is shuffled with this key).
    pub epoch: u64,
    /// Items of the current pass already drawn (always below the number of items).
    pub position: usize,
}

/// An endless source of fixed-size batches over a set of items (SPEC 4: the forget and
/// retain streams). Each pass is a fresh shuffle keyed by (seed, epoch); a batch that
/// runs past the end of a pass is completed from the start of the next one, so a batch
/// that straddles two passes can hold an item twice when `batch` is close to the set
/// size.
#[derive(Clone, Debug)]
pub struct Stream {
    items: Vec<usize>,
    batch: usize,
    state: StreamState,
    /// `items` in the order of the current pass.
    order: Vec<usize>,
}

impl Stream {
    /// A stream over `items` (e.g. sentence indices) from its start.
    pub fn new(items: Vec<usize>, batch: usize, seed: u64) -> Result<Stream> {
        Self::from_state(
            items,
            batch,
            StreamState {
                seed,
                epoch: 0,
                position: 0,
            },
        )
    }

    /// Continue a stream from a saved state; `items` and `batch` must be the ones it was
    /// created with.
    pub fn from_state(items: Vec<usize>, batch: usize, state: StreamState) -> Result<Stream> {
        if items.is_empty() {
            return Err(Error::invalid("a batch stream needs at least one item"));
        }
        if batch == 0 {
            return Err(Error::invalid("batch size must be at least 1"));
        }
        if state.position > items.len() {
            return Err(Error::invalid(format!(
                "stream state position {} is past the {} items of the stream (saved for another set?)",
                state.position,
                items.len()
            )));
        }
        let order = pass_order(&items, state.seed, state.epoch);
        let mut stream = Stream {
            items,
            batch,
            state,
            order,
        };
        stream.next_pass_if_done();
        Ok(stream)
    }

    /// The state to save; [`Stream::from_state`] with it yields the same next batches.
    pub fn state(&self) -> StreamState {
        self.state
    }

    /// Completed passes plus the fraction of the current one (for stopping rules).
    pub fn passes(&self) -> f64 {
        self.state.epoch as f64 + self.state.position as f64 / self.items.len() as f64
    }

    /// The next `batch` items.
    pub fn next_batch(&mut self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.batch);
        while out.len() < self.batch {
            let take = (self.batch - out.len()).min(self.order.len() - self.state.position);
            out.extend_from_slice(&self.order[self.state.position..self.state.position + take]);
            self.state.position += take;
            self.next_pass_if_done();
        }
        out
    }

    /// At the end of a pass, start the next one (so `epoch` counts completed passes).
    fn next_pass_if_done(&mut self) {
        if self.state.position == self.order.len() {
            self.state.epoch += 1;
            self.state.position = 0;
            self.order = pass_order(&self.items, self.state.seed, self.state.epoch);
        }
    }
}

fn pass_order(items: &[usize], seed: u64, epoch: u64) -> Vec<usize> {
    let mut order = items.to_vec();
    shuffle(&mut keyed_rng(seed, Purpose::Stream, epoch), &mut order);
    order
}
