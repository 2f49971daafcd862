//! Tokenisation into windows (SPEC 2): ids equal transformers' `is_split_into_words`
//! output (golden files from scripts/golden_tokenize.py), labels on first subwords,
//! windows that predict every word once.
use deepcut_fast::data::{Encoder, LabelMap, Sentence, TokenizerKind, Window, IGNORE};
use serde::Deserialize;
use std::path::{Path, PathBuf};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

const MINILM: &str = "../shared/models/all-MiniLM-L6-v2/tokenizer.json";
/// Committed by the lead, not by the data branch; see scripts/golden_tokenize.py.
const BPE: &str = "tests/golden/bpe/tokenizer.json";

fn encoder(rel: &str) -> Encoder {
    let path = repo(rel);
    assert!(
        path.exists(),
        "{} is missing (the BPE test tokenizer is committed with tests/golden/bpe/)",
        path.display()
    );
    Encoder::from_file(&path).unwrap()
}

#[derive(Deserialize)]
struct Golden {
    tokenizer: String,
    sentences: Vec<GoldenSentence>,
}

#[derive(Deserialize)]
struct GoldenSentence {
    source: String,
    words: Vec<String>,
    ids: Vec<u32>,
    word_ids: Vec<Option<usize>>,
}

fn golden(name: &str) -> Golden {
    let text = std::fs::read_to_string(repo(&format!("tests/golden/tokenize/{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn untagged(words: &[String]) -> Sentence {
    Sentence {
        words: words.to_vec(),
        tags: vec![],
    }
}

/// transformers' ids with `unk` put where a word got no token at all (our documented
/// deviation), and the position of each word's first subword.
fn expected(g: &GoldenSentence, unk: u32) -> (Vec<u32>, Vec<usize>) {
    let n = g.ids.len();
    let mut ids = vec![g.ids[0]]; // [CLS] / <s>
    let mut pos = Vec::new();
    for w in 0..g.words.len() {
        pos.push(ids.len());
        let pieces: Vec<u32> = (1..n - 1)
            .filter(|&i| g.word_ids[i] == Some(w))
            .map(|i| g.ids[i])
            .collect();
        if pieces.is_empty() {
            ids.push(unk);
        } else {
            ids.extend(pieces);
        }
    }
    ids.push(g.ids[n - 1]); // [SEP] / </s>
    (ids, pos)
}

fn check_golden(name: &str, rel: &str, kind: TokenizerKind) {
    let g = golden(name);
    assert_eq!(g.tokenizer, rel.trim_start_matches("./"));
    let enc = encoder(rel);
    assert_eq!(enc.kind(), kind);
    let sp = enc.special_ids();
    let sentences: Vec<Sentence> = g.sentences.iter().map(|s| untagged(&s.words)).collect();
    let windows = enc.encode_sentences(&sentences, None, 1 << 20).unwrap();
    assert_eq!(
        windows.len(),
        sentences.len(),
        "one window per sentence without a length limit"
    );
    let mut n_unk = 0;
    for (i, (w, gs)) in windows.iter().zip(&g.sentences).enumerate() {
        assert_eq!(w.sentence, i);
        assert_eq!(w.first_word, 0);
        assert_eq!((gs.ids[0], *gs.ids.last().unwrap()), (sp.cls, sp.sep), "{}", gs.source);
        let (ids, pos) = expected(gs, sp.unk);
        n_unk += ids.len() - gs.ids.len();
        assert_eq!(w.ids, ids, "{name} {}: ids differ from transformers", gs.source);
        assert_eq!(w.word_pos, pos, "{name} {}", gs.source);
        assert!(w.labels.iter().all(|&l| l == IGNORE));
    }
    if kind == TokenizerKind::WordPiece {
        assert_eq!(n_unk, 2, "the two synthetic lone zero-width-space words get [UNK]");
    }
}

#[test]
fn data_encode_matches_transformers_minilm() {
    check_golden("minilm", MINILM, TokenizerKind::WordPiece);
}

#[test]
fn data_encode_matches_transformers_bpe() {
    check_golden("bpe", BPE, TokenizerKind::ByteLevelBpe);
}

#[test]
fn data_encode_special_ids_from_tokenizer() {
    let m = encoder(MINILM).special_ids();
    assert_eq!((m.cls, m.sep, m.unk, m.pad), (101, 102, 100, 0));
    let enc = encoder(BPE);
    let b = enc.special_ids();
    let t = enc.tokenizer();
    let by_name = |s: &str| t.token_to_id(s).unwrap();
    assert_eq!(
        (b.cls, b.sep, b.unk, b.pad),
        (by_name("<s>"), by_name("</s>"), by_name("<unk>"), by_name("<pad>"))
    );
    assert_eq!(enc.n_special(), 2);
}

#[test]
fn data_encode_bpe_prefixes_every_word_with_a_space() {
    let enc = encoder(BPE);
    let words: Vec<String> = ["the", "the"].iter().map(|s| s.to_string()).collect();
    let sub = enc.word_subwords(&words).unwrap();
    assert_eq!(sub[0], sub[1], "the first word is encoded like every other word");
    let tok = enc.tokenizer().id_to_token(sub[0][0]).unwrap();
    assert!(
        tok.starts_with('\u{120}'),
        "byte-level space marker Ġ expected, got {tok}"
    );
}

/// Sentences with tags from a small tag set, for label checks.
fn tagged(words: &[&str], tags: &[&str]) -> Sentence {
    Sentence {
        words: words.iter().map(|s| s.to_string()).collect(),
        tags: tags.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn data_encode_labels_on_first_subword_only() {
    let enc = encoder(MINILM);
    let s = tagged(&["Unbelievably", "Zürich", "x"], &["O", "B-loc", "I-loc"]);
    let labels = LabelMap::from_sentences(std::slice::from_ref(&s));
    let w = &enc
        .encode_sentences(std::slice::from_ref(&s), Some(&labels), 128)
        .unwrap()[0];
    let sub = enc.word_subwords(&s.words).unwrap();
    assert!(sub[0].len() > 1, "test needs a multi-subword word");
    let mut want = vec![IGNORE];
    for (piece, tag) in sub.iter().zip(&s.tags) {
        want.push(labels.id(tag).unwrap() as i32);
        want.extend(std::iter::repeat_n(IGNORE, piece.len() - 1));
    }
    want.push(IGNORE);
    assert_eq!(w.labels, want);
    for (k, &p) in w.word_pos.iter().enumerate() {
        assert_eq!(w.labels[p], labels.id(&s.tags[k]).unwrap() as i32);
    }
}

/// Every word of every sentence is predicted by exactly one window, windows respect
/// `max_len`, and their subwords are the sentence's subwords (long words truncated).
fn check_windows(enc: &Encoder, sentences: &[Sentence], windows: &[Window], max_len: usize) {
    let room = max_len - enc.n_special();
    let sp = enc.special_ids();
    let mut next = vec![0usize; sentences.len()]; // next word expected per sentence
    let mut last_sentence = 0;
    for w in windows {
        assert!(w.sentence >= last_sentence, "windows in sentence order");
        last_sentence = w.sentence;
        assert!(w.len() <= max_len && w.n_words() > 0);
        assert_eq!(w.first_word, next[w.sentence], "consecutive words");
        assert_eq!((w.ids[0], *w.ids.last().unwrap()), (sp.cls, sp.sep));
        assert_eq!(w.labels.len(), w.ids.len());
        let words = &sentences[w.sentence].words[w.first_word..w.first_word + w.n_words()];
        let sub = enc.word_subwords(words).unwrap();
        let mut body = Vec::new();
        for (k, piece) in sub.iter().enumerate() {
            assert_eq!(w.word_pos[k], 1 + body.len());
            body.extend_from_slice(&piece[..piece.len().min(room)]);
        }
        assert_eq!(&w.ids[1..w.ids.len() - 1], &body[..]);
        next[w.sentence] += w.n_words();
    }
    for (s, n) in sentences.iter().zip(&next) {
        assert_eq!(*n, s.words.len(), "every word predicted exactly once");
    }
}

#[test]
fn data_encode_windows_split_long_sentences() {
    for rel in [MINILM, BPE] {
        let enc = encoder(rel);
        let g = golden("minilm");
        let sentences: Vec<Sentence> = g.sentences.iter().map(|s| untagged(&s.words)).collect();
        for max_len in [3, 4, 7, 16, 32, 128] {
            let windows = enc.encode_sentences(&sentences, None, max_len).unwrap();
            check_windows(&enc, &sentences, &windows, max_len);
        }
    }
}

#[test]
fn data_encode_overlong_word_is_truncated() {
    let enc = encoder(BPE);
    let long = "supercalifragilistic".repeat(10);
    let s = tagged(&["a", &long, "b"], &["O", "B-x", "O"]);
    let labels = LabelMap::from_sentences(std::slice::from_ref(&s));
    let max_len = 8;
    let w = enc
        .encode_sentences(std::slice::from_ref(&s), Some(&labels), max_len)
        .unwrap();
    assert_eq!(w.len(), 3, "a | long word alone | b");
    assert_eq!(w[1].ids.len(), max_len);
    assert_eq!(w[1].labels[1], labels.id("B-x").unwrap() as i32);
    let full = enc.word_subwords(&s.words[1..2]).unwrap();
    assert!(full[0].len() > max_len);
    assert_eq!(&w[1].ids[1..max_len - 1], &full[0][..max_len - 2]);
}

#[test]
fn data_encode_zero_width_word_gets_unk() {
    let enc = encoder(MINILM);
    let s = tagged(&["Hello", "\u{200b}", "world"], &["O", "B-x", "O"]);
    let labels = LabelMap::from_sentences(std::slice::from_ref(&s));
    let w = &enc
        .encode_sentences(std::slice::from_ref(&s), Some(&labels), 128)
        .unwrap()[0];
    assert_eq!(w.n_words(), 3);
    assert_eq!(w.ids[w.word_pos[1]], enc.special_ids().unk);
    assert_eq!(w.labels[w.word_pos[1]], labels.id("B-x").unwrap() as i32);
}

#[test]
fn data_encode_order_is_deterministic_with_many_sentences() {
    let enc = encoder(MINILM);
    let sentences: Vec<Sentence> = (0..500)
        .map(|i| untagged(&(0..(i % 37) + 1).map(|k| format!("w{i}x{k}")).collect::<Vec<_>>()))
        .collect();
    let a = enc.encode_sentences(&sentences, None, 16).unwrap();
    let b = enc.encode_sentences(&sentences, None, 16).unwrap();
    assert_eq!(a, b);
    check_windows(&enc, &sentences, &a, 16);
}

#[test]
fn data_encode_errors() {
    let enc = encoder(MINILM);
    let s = tagged(&["a"], &["B-x"]);
    let err = enc
        .encode_sentences(std::slice::from_ref(&s), None, 2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--max-len 2"), "{err}");
    let labels = LabelMap::from_sentences(&[tagged(&["a"], &["O"])]);
    let err = enc
        .encode_sentences(&[tagged(&["a"], &["O"]), s], Some(&labels), 16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sentence 1") && err.contains("`B-x`"), "{err}");
    let err = enc
        .encode_sentences(&[untagged(&["a".into()])], Some(&labels), 16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sentence 0") && err.contains("0 tags"), "{err}");

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("data_encode");
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("broken_tokenizer.json");
    std::fs::write(&bad, "{\"model\": 3").unwrap();
    let err = Encoder::from_file(&bad).err().unwrap().to_string();
    assert!(err.contains("broken_tokenizer.json"), "{err}");
    let err = Encoder::from_file(&dir.join("missing.json")).err().unwrap().to_string();
    assert!(err.contains("missing.json"), "{err}");
}

#[test]
fn data_encode_bpe_file_without_prefix_space_still_matches() {
    // roberta-base's own tokenizer.json says add_prefix_space = false; pre-split words
    // must still be encoded with a leading space, as transformers does when loaded
    // with add_prefix_space=True.
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(repo(BPE)).unwrap()).unwrap();
    json["pre_tokenizer"]["add_prefix_space"] = serde_json::Value::Bool(false);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("data_encode");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bpe_no_prefix_space.json");
    std::fs::write(&path, json.to_string()).unwrap();
    let enc = Encoder::from_file(&path).unwrap();
    let g = golden("bpe");
    let sentences: Vec<Sentence> = g.sentences.iter().map(|s| untagged(&s.words)).collect();
    let windows = enc.encode_sentences(&sentences, None, 1 << 20).unwrap();
    for (w, gs) in windows.iter().zip(&g.sentences) {
        assert_eq!(w.ids, expected(gs, enc.special_ids().unk).0, "{}", gs.source);
    }
}
