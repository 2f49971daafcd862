//! The real datasets under ../shared/data: sentence and word counts against a direct
//! count of the files, label coverage, and windowing at max_len 32 on a sample.
use deepcut_fast::data::{read_conll, Encoder, LabelMap, Sentence};
use std::path::{Path, PathBuf};

const DATASETS: [&str; 4] = ["wnut16", "wnut17", "ncbi_disease", "chemu"];
const SPLITS: [&str; 3] = ["train", "dev", "test"];

fn data(dataset: &str, split: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(dataset)
        .join(format!("{split}.conll"))
}

/// (sentences, words) counted straight from the text: a sentence is a maximal run of
/// non-blank lines.
fn direct_count(path: &Path) -> (usize, usize) {
    let text = std::fs::read_to_string(path).unwrap();
    let (mut sentences, mut words, mut in_sentence) = (0, 0, false);
    for line in text.lines() {
        let blank = line.trim().is_empty();
        if !blank {
            words += 1;
            sentences += !in_sentence as usize;
        }
        in_sentence = !blank;
    }
    (sentences, words)
}

#[test]
fn data_real_counts_match_the_files() {
    for ds in DATASETS {
        for split in SPLITS {
            let path = data(ds, split);
            let s = read_conll(&path, true).unwrap();
            let words: usize = s.iter().map(|x| x.words.len()).sum();
            assert_eq!((s.len(), words), direct_count(&path), "{}", path.display());
            assert!(s.iter().all(|x| x.tags.len() == x.words.len()));
        }
    }
}

#[test]
fn data_real_label_maps() {
    for ds in DATASETS {
        let train = read_conll(&data(ds, "train"), true).unwrap();
        let labels = LabelMap::from_sentences(&train);
        assert_eq!(labels.labels[0], "O");
        assert!(
            labels.labels[1..].windows(2).all(|w| w[0] < w[1]),
            "{ds}: sorted after O"
        );
        for split in ["dev", "test"] {
            let path = data(ds, split);
            let sents = read_conll(&path, true).unwrap();
            labels.check_covers(&sents, &path).unwrap();
        }
    }
}

/// The first 300 sentences and the 20 longest of a split.
fn sample(sentences: &[Sentence]) -> Vec<Sentence> {
    let mut out: Vec<Sentence> = sentences.iter().take(300).cloned().collect();
    let mut by_len: Vec<&Sentence> = sentences.iter().collect();
    by_len.sort_by_key(|s| std::cmp::Reverse(s.words.len()));
    out.extend(by_len.into_iter().take(20).cloned());
    out
}

#[test]
fn data_real_every_word_predicted_once_at_max_len_32() {
    let enc = Encoder::from_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/all-MiniLM-L6-v2/tokenizer.json"),
    )
    .unwrap();
    for ds in DATASETS {
        let train = read_conll(&data(ds, "train"), true).unwrap();
        let labels = LabelMap::from_sentences(&train);
        let sents = sample(&train);
        let windows = enc.encode_sentences(&sents, Some(&labels), 32).unwrap();
        let mut predicted: Vec<Vec<u32>> = sents.iter().map(|s| vec![0; s.words.len()]).collect();
        for w in &windows {
            assert!(w.len() <= 32);
            for (k, &p) in w.word_pos.iter().enumerate() {
                let word = w.first_word + k;
                predicted[w.sentence][word] += 1;
                let tag = &sents[w.sentence].tags[word];
                assert_eq!(
                    w.labels[p],
                    labels.id(tag).unwrap() as i32,
                    "{ds}: label at first subword"
                );
            }
            let n_labelled = w.labels.iter().filter(|&&l| l >= 0).count();
            assert_eq!(n_labelled, w.n_words(), "{ds}: one labelled position per word");
        }
        assert!(
            predicted.iter().flatten().all(|&c| c == 1),
            "{ds}: every word exactly once"
        );
        assert!(
            windows.len() > sents.len(),
            "{ds}: the longest sentences need several windows"
        );
    }
}
