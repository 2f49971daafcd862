//! Packed batches, position ids, bucketed/sequential batch orders, resumable streams.
use deepcut_fast::data::{bucketed_batches, token_batches, Batch, PositionStyle, Stream, StreamState, Window, IGNORE};

fn window(ids: &[u32]) -> Window {
    let mut labels = vec![IGNORE; ids.len()];
    if ids.len() > 2 {
        labels[1] = 7;
    }
    Window {
        sentence: 0,
        first_word: 0,
        ids: ids.to_vec(),
        labels,
        word_pos: vec![1],
    }
}

#[test]
fn data_batch_packs_windows_without_padding() {
    let a = window(&[101, 5, 6, 102]);
    let b = window(&[101, 9, 102]);
    let batch = Batch::new(&[&a, &b], PositionStyle::Absolute);
    assert_eq!((batch.b, batch.t), (2, 4));
    assert_eq!(batch.seqs, [0, 4, 7]);
    assert_eq!(batch.input_ids, [101, 5, 6, 102, 101, 9, 102]);
    assert_eq!(batch.position_ids, [0, 1, 2, 3, 0, 1, 2]);
    assert_eq!(batch.type_ids, [0; 7]);
    assert_eq!(batch.labels, [IGNORE, 7, IGNORE, IGNORE, IGNORE, 7, IGNORE]);
    assert_eq!(batch.windows, [0, 1]);
    assert_eq!(batch.tokens(), 7);
    assert_eq!((batch.span(0), batch.span(1)), (0..4, 4..7));
    assert_eq!(batch.check(), Ok(()));
}

#[test]
fn data_batch_check_names_what_is_malformed() {
    let a = window(&[101, 5, 6, 102]);
    let good = Batch::new(&[&a, &a], PositionStyle::Absolute).inputs;
    let bad = |f: &dyn Fn(&mut deepcut_fast::model::HostBatch)| {
        let mut x = good.clone();
        f(&mut x);
        x.check().unwrap_err()
    };
    assert!(bad(&|x| x.seqs = vec![0, 4]).contains("2 sequence offsets for 2 sequences"));
    assert!(bad(&|x| x.seqs[2] = 7).contains("not 0 to n = 8"));
    assert!(bad(&|x| {
        x.t = 10;
        x.seqs[1] = 9
    })
    .contains("sequence 1 has -1 tokens"));
    assert!(bad(&|x| x.t = 3).contains("sequence 0 has 4 tokens (t = 3)"));
    assert!(bad(&|x| x.labels.pop().map_or((), |_| ())).contains("labels holds 7 entries for 8 tokens"));
}

#[test]
fn data_batch_roberta_positions_match_transformers() {
    // transformers: mask = ids.ne(pad); (cumsum(mask) * mask) + pad, with pad = 1.
    let a = window(&[0, 713, 16, 2]);
    let b = window(&[0, 50, 2]);
    let all = [b.clone(), a.clone()];
    let batch = Batch::gather(&all, &[1, 0], PositionStyle::Roberta { pad_id: 1 });
    assert_eq!(batch.input_ids, [0, 713, 16, 2, 0, 50, 2]);
    assert_eq!(batch.position_ids, [2, 3, 4, 5, 2, 3, 4]);
    assert_eq!(batch.windows, [1, 0]);
    // Literally transformers: a real token equal to the pad id is numbered as padding.
    let c = window(&[0, 1, 7, 2]);
    let batch = Batch::new(&[&c], PositionStyle::Roberta { pad_id: 1 });
    assert_eq!(batch.position_ids, [2, 1, 3, 4]);
}

#[test]
fn data_batch_empty_batch() {
    let batch = Batch::new(&[], PositionStyle::Absolute);
    assert_eq!((batch.b, batch.t), (0, 0));
    assert!(batch.input_ids.is_empty());
}

/// Lengths with many ties, like real sentence lengths.
fn lengths(n: usize) -> Vec<usize> {
    (0..n).map(|i| 3 + (i * 7919) % 41).collect()
}

fn assert_partition(batches: &[Vec<usize>], n: usize) {
    let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..n).collect::<Vec<_>>(), "every item exactly once");
}

#[test]
fn data_batch_bucketed_is_a_deterministic_partition() {
    let len = lengths(3394);
    let a = bucketed_batches(&len, 32, 42, 0);
    assert_partition(&a, len.len());
    assert!(a.iter().all(|b| !b.is_empty() && b.len() <= 32));
    assert_eq!(a, bucketed_batches(&len, 32, 42, 0), "same (seed, epoch), same batches");
    assert_ne!(a, bucketed_batches(&len, 32, 42, 1), "another epoch, another order");
    assert_ne!(a, bucketed_batches(&len, 32, 43, 0), "another seed, another order");
    // Buckets keep lengths close: far less padding than a random order.
    let pad = |bs: &[Vec<usize>]| -> usize {
        bs.iter()
            .map(|b| {
                let m = b.iter().map(|&i| len[i]).max().unwrap();
                b.iter().map(|&i| m - len[i]).sum::<usize>()
            })
            .sum()
    };
    let random: Vec<Vec<usize>> = bucketed_batches(&vec![0; len.len()], 32, 42, 0);
    assert!(
        pad(&a) * 10 < pad(&random),
        "bucketed {} vs random {}",
        pad(&a),
        pad(&random)
    );
}

#[test]
fn data_batch_bucketed_is_portable() {
    // Pinned output: a change here means runs and resumed checkpoints would see other
    // batches than before (RNG, shuffle or bucketing changed). Update only on purpose.
    let got = bucketed_batches(&[5, 1, 4, 1, 5, 9, 2, 6, 5, 3], 3, 7, 2);
    assert_eq!(got, PINNED_BUCKETS);
}
const PINNED_BUCKETS: [&[usize]; 4] = [&[9, 2, 0], &[4, 8, 7], &[5], &[3, 1, 6]];

/// Evaluation batches: sorted by length (ties by index), each as many items as fit the token
/// budget (packed: the sum of their lengths), every item once; an item over the budget goes
/// alone.
#[test]
fn data_batch_token_batches_fill_the_budget() {
    let len = [5, 1, 4, 1, 5, 9, 2, 6];
    // 12 tokens: 1,1,2,4 (8; a 5 would make 13); 5,5 (10; a 6: 16); 6 (a 9: 15); 9
    assert_eq!(
        token_batches(&len, 12),
        vec![vec![1, 3, 6, 2], vec![0, 4], vec![7], vec![5]]
    );
    // the total: one batch of everything sorted only if it fits
    assert_eq!(token_batches(&len, 33), vec![vec![1, 3, 6, 2, 0, 4, 7, 5]]);
    assert_eq!(token_batches(&len, 32).len(), 2);
    // an item over the budget goes alone
    assert_eq!(token_batches(&[3, 20, 3], 10), vec![vec![0, 2], vec![1]]);
    assert!(token_batches(&[], 12).is_empty());
    // every batch within the budget (or a single item), every item once, lengths sorted
    let len: Vec<usize> = (0..1000).map(|i| 3 + (i * 7919) % 125).collect();
    let b = token_batches(&len, 6144);
    let mut seen: Vec<usize> = b.concat();
    let flat = seen.clone();
    assert!(flat.windows(2).all(|w| (len[w[0]], w[0]) < (len[w[1]], w[1])));
    seen.sort_unstable();
    assert_eq!(seen, (0..1000).collect::<Vec<_>>());
    let sum = |batch: &[usize]| batch.iter().map(|&i| len[i]).sum::<usize>();
    for batch in &b {
        assert!(sum(batch) <= 6144, "{} tokens", sum(batch));
    }
    // and full: a batch ends only where the next item would not fit
    for w in b.windows(2) {
        let next = len[w[1][0]];
        assert!(sum(&w[0]) + next > 6144);
    }
    // the row cap
    let short = vec![1usize; 10_000];
    let b = token_batches(&short, 1 << 20);
    assert!(b.iter().all(|x| x.len() <= deepcut_fast::data::batch::MAX_EVAL_ROWS));
    assert_eq!(b[0].len(), deepcut_fast::data::batch::MAX_EVAL_ROWS);
}

#[test]
fn data_batch_stream_cycles_with_fixed_batch_size() {
    let items: Vec<usize> = (100..134).collect(); // 34 forget sentences
    let mut s = Stream::new(items.clone(), 8, 5).unwrap();
    let mut seen = Vec::new();
    for _ in 0..17 {
        let b = s.next_batch();
        assert_eq!(b.len(), 8);
        seen.extend(b);
    }
    // 136 draws = 4 full passes: each pass is a permutation of the items.
    for pass in seen.chunks(34) {
        let mut p = pass.to_vec();
        p.sort_unstable();
        assert_eq!(p, items);
    }
    assert_ne!(seen[..34], seen[34..68], "each pass reshuffled");
    assert_eq!(
        s.state(),
        StreamState {
            seed: 5,
            epoch: 4,
            position: 0
        }
    );
    assert_eq!(s.passes(), 4.0);
    // Batch larger than the set wraps across passes.
    let mut tiny = Stream::new(vec![1, 2, 3], 8, 0).unwrap();
    assert_eq!(tiny.next_batch().len(), 8);
}

#[test]
fn data_batch_stream_resumes_from_saved_state() {
    let items: Vec<usize> = (0..50).map(|i| i * 3).collect();
    let mut straight = Stream::new(items.clone(), 7, 11).unwrap();
    let mut resumed = Stream::new(items.clone(), 7, 11).unwrap();
    for _ in 0..9 {
        assert_eq!(straight.next_batch(), resumed.next_batch());
    }
    // Save through JSON (as a checkpoint would) and continue in a new stream.
    let json = serde_json::to_string(&resumed.state()).unwrap();
    let state: StreamState = serde_json::from_str(&json).unwrap();
    let mut resumed = Stream::from_state(items, 7, state).unwrap();
    for _ in 0..30 {
        assert_eq!(straight.next_batch(), resumed.next_batch());
    }
}

#[test]
fn data_batch_stream_errors() {
    assert!(Stream::new(vec![], 8, 0)
        .unwrap_err()
        .to_string()
        .contains("at least one item"));
    assert!(Stream::new(vec![1], 0, 0)
        .unwrap_err()
        .to_string()
        .contains("batch size"));
    let state = StreamState {
        seed: 0,
        epoch: 0,
        position: 9,
    };
    assert!(Stream::from_state(vec![1, 2], 1, state)
        .unwrap_err()
        .to_string()
        .contains("position 9"));
}
