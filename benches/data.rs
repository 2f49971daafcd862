//! Data pipeline throughput: tokenise all of WNUT17 train into windows with the MiniLM
//! tokenizer, and pad it into batches. Reports words/s and tokens/s.
//!
//! cargo bench --bench data
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use deepcut_fast::data::{bucketed_batches, read_conll, Batch, Encoder, LabelMap, PositionStyle, DEFAULT_MAX_LEN};
use std::hint::black_box;
use std::path::Path;

fn bench_data(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let train = read_conll(&root.join("../shared/data/wnut17/train.conll"), true).expect("wnut17 train");
    let enc = Encoder::from_file(&root.join("../shared/models/all-MiniLM-L6-v2/tokenizer.json")).expect("tokenizer");
    let labels = LabelMap::from_sentences(&train);
    let n_words: usize = train.iter().map(|s| s.words.len()).sum();
    let windows = enc
        .encode_sentences(&train, Some(&labels), DEFAULT_MAX_LEN)
        .expect("encode");
    let n_tokens: usize = windows.iter().map(|w| w.len()).sum();
    println!(
        "wnut17 train: {} sentences, {n_words} words, {} windows, {n_tokens} tokens",
        train.len(),
        windows.len()
    );

    let mut g = c.benchmark_group("wnut17_train");
    g.sample_size(20);
    g.throughput(Throughput::Elements(n_words as u64));
    g.bench_function("tokenize_windows", |b| {
        b.iter(|| {
            enc.encode_sentences(black_box(&train), Some(&labels), DEFAULT_MAX_LEN)
                .unwrap()
        })
    });
    g.throughput(Throughput::Elements(n_tokens as u64));
    g.bench_function("bucket_and_pad_batches_32", |b| {
        b.iter(|| {
            let lengths: Vec<usize> = windows.iter().map(|w| w.len()).collect();
            let batches = bucketed_batches(&lengths, 32, 0, 0);
            batches
                .iter()
                .map(|idx| Batch::gather(&windows, idx, PositionStyle::Absolute).b)
                .sum::<usize>()
        })
    });
    g.throughput(Throughput::Elements(n_words as u64));
    g.bench_function("tokenize_and_batch", |b| {
        b.iter(|| {
            let w = enc
                .encode_sentences(black_box(&train), Some(&labels), DEFAULT_MAX_LEN)
                .unwrap();
            let lengths: Vec<usize> = w.iter().map(|w| w.len()).collect();
            let batches = bucketed_batches(&lengths, 32, 0, 0);
            batches
                .iter()
                .map(|idx| Batch::gather(&w, idx, PositionStyle::Absolute).b)
                .sum::<usize>()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_data);
criterion_main!(benches);
