//! CoNLL reader/writer and label map: layouts accepted, errors naming file and line.
use deepcut_fast::data::{read_conll, write_conll, LabelMap, Sentence};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A fresh file under the test target dir holding `bytes`.
fn file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("data_conll");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn words(s: &Sentence) -> Vec<&str> {
    s.words.iter().map(String::as_str).collect()
}

fn tags(s: &Sentence) -> Vec<&str> {
    s.tags.iter().map(String::as_str).collect()
}

/// The error text, asserting that reading failed.
fn read_err(name: &str, bytes: &[u8], require_tags: bool) -> (PathBuf, String) {
    let path = file(name, bytes);
    let err = read_conll(&path, require_tags)
        .expect_err("expected an error")
        .to_string();
    (path, err)
}

fn assert_names(err: &str, path: &std::path::Path, line: usize) {
    let want = format!("{}:{line}:", path.display());
    assert!(err.starts_with(&want), "error `{err}` should start with `{want}`");
}

#[test]
fn data_conll_reads_tab_separated() {
    let p = file(
        "tab.conll",
        b"EU\tB-ORG\nrejects\tO\n\nPeter\tB-PER\nBlackburn\tI-PER\n\n",
    );
    let s = read_conll(&p, true).unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(words(&s[0]), ["EU", "rejects"]);
    assert_eq!(tags(&s[0]), ["B-ORG", "O"]);
    assert_eq!(tags(&s[1]), ["B-PER", "I-PER"]);
}

#[test]
fn data_conll_reads_spaces_multicolumn_crlf_bom_docstart() {
    let text = "\u{feff}-DOCSTART- -X- -X- O\r\n\r\nEU NNP B-NP B-ORG\r\nrejects VBZ B-VP O\r\n\r\n\r\n\
                German JJ B-NP B-MISC\r\n-DOCSTART- -X- O\r\ncall NN I-NP O";
    let p = file("conll03.conll", text.as_bytes());
    let s = read_conll(&p, true).unwrap();
    assert_eq!(s.len(), 3);
    assert_eq!(words(&s[0]), ["EU", "rejects"]);
    assert_eq!(tags(&s[0]), ["B-ORG", "O"]);
    assert_eq!(words(&s[1]), ["German"]);
    assert_eq!(
        words(&s[2]),
        ["call"],
        "missing final blank line still ends the sentence"
    );
}

#[test]
fn data_conll_tab_columns_keep_spaces_in_words() {
    let p = file("spacey.conll", b"New York\tnoun\tB-loc\n\t\nx\tO\n");
    let s = read_conll(&p, true).unwrap();
    assert_eq!(words(&s[0]), ["New York"]);
    assert_eq!(tags(&s[0]), ["B-loc"]);
    assert_eq!(s.len(), 2, "a lone-TAB line separates sentences");
}

#[test]
fn data_conll_keeps_invisible_characters_in_words() {
    let p = file(
        "invisible.conll",
        "\u{200b}Why\tO\nDubbz\u{feff}\tB-person\n".as_bytes(),
    );
    let s = read_conll(&p, true).unwrap();
    assert_eq!(words(&s[0]), ["\u{200b}Why", "Dubbz\u{feff}"]);
}

#[test]
fn data_conll_i_after_o_is_not_a_reader_error() {
    let p = file("i_after_o.conll", b"a\tO\nb\tI-x\nc\tI-y\n");
    let s = read_conll(&p, true).unwrap();
    assert_eq!(tags(&s[0]), ["O", "I-x", "I-y"]);
}

#[test]
fn data_conll_untagged_for_predict() {
    let p = file("words.conll", b"hello\nworld\n\nagain\n");
    let s = read_conll(&p, false).unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(words(&s[0]), ["hello", "world"]);
    assert!(s[0].tags.is_empty() && s[1].tags.is_empty());
    // Tagged files read the same with require_tags = false.
    let p = file("tagged.conll", b"a\tB-x\n");
    assert_eq!(tags(&read_conll(&p, false).unwrap()[0]), ["B-x"]);
}

#[test]
fn data_conll_error_one_column_when_tags_required() {
    let (p, err) = read_err("onecol.conll", b"a\tO\n\nb\n", true);
    assert_names(&err, &p, 3);
    assert!(err.contains("one column"), "{err}");
}

#[test]
fn data_conll_error_mixed_tagged_and_untagged() {
    let (p, err) = read_err("mixed.conll", b"a\nb\tO\n", false);
    assert_names(&err, &p, 2);
    let (p, err) = read_err("mixed2.conll", b"a\tO\n\nb\n", false);
    assert_names(&err, &p, 3);
    assert!(err.contains("line 1"), "{err}");
}

#[test]
fn data_conll_error_invalid_tags() {
    for (i, bad) in ["B", "I-", "S-PER", "E-PER", "b-PER", "B_PER", "OO", "U-x"]
        .iter()
        .enumerate()
    {
        let text = format!("ok\tO\n\nw\t{bad}\n");
        let (p, err) = read_err(&format!("badtag{i}.conll"), text.as_bytes(), true);
        assert_names(&err, &p, 3);
        assert!(err.contains(&format!("`{bad}`")), "{err}");
    }
}

#[test]
fn data_conll_error_invalid_utf8_names_line() {
    let (p, err) = read_err("utf8.conll", b"a\tO\nb\tO\n\nc\xff\tO\n", true);
    assert_names(&err, &p, 4);
    assert!(err.contains("UTF-8"), "{err}");
    // With a BOM in front the line count is unchanged.
    let (p, err) = read_err("utf8bom.conll", b"\xEF\xBB\xBFa\tO\n\xc3\tO\n", true);
    assert_names(&err, &p, 2);
}

#[test]
fn data_conll_error_no_sentences() {
    for (name, bytes) in [
        ("empty.conll", &b""[..]),
        ("blank.conll", b"\n\n \t\n"),
        ("doc.conll", b"-DOCSTART- O\n\n"),
    ] {
        let (p, err) = read_err(name, bytes, true);
        assert!(err.starts_with(&p.display().to_string()), "{err}");
        assert!(err.contains("no sentences"), "{err}");
    }
}

#[test]
fn data_conll_error_missing_file_names_path() {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("data_conll/does_not_exist.conll");
    let err = read_conll(&p, true).unwrap_err().to_string();
    assert!(err.contains("does_not_exist.conll"), "{err}");
}

#[test]
fn data_conll_write_read_roundtrip() {
    let s = vec![
        Sentence {
            words: vec!["a".into(), "b c".into()],
            tags: vec![],
        },
        Sentence {
            words: vec!["d".into()],
            tags: vec![],
        },
    ];
    let t = vec![vec!["B-x".to_string(), "I-x".to_string()], vec!["O".to_string()]];
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("data_conll/written.conll");
    write_conll(&p, &s, &t).unwrap();
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "a\tB-x\nb c\tI-x\n\nd\tO\n\n");
    let back = read_conll(&p, true).unwrap();
    assert_eq!(words(&back[0]), ["a", "b c"]);
    assert_eq!(tags(&back[0]), ["B-x", "I-x"]);
    // Mismatched tag counts are refused and name the file.
    let err = write_conll(&p, &s, &t[..1]).unwrap_err().to_string();
    assert!(err.contains("written.conll"), "{err}");
    let bad = vec![vec!["O".to_string()], vec!["O".to_string()]];
    let err = write_conll(&p, &s, &bad).unwrap_err().to_string();
    assert!(err.contains("sentence 0"), "{err}");
}

fn sent(tags: &[&str]) -> Sentence {
    Sentence {
        words: tags.iter().map(|_| "w".to_string()).collect(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
    }
}

#[test]
fn data_labels_sorted_o_first() {
    let s = [sent(&["O", "B-per", "I-per"]), sent(&["B-LOC", "O", "B-per"])];
    let m = LabelMap::from_sentences(&s);
    assert_eq!(m.labels, ["O", "B-LOC", "B-per", "I-per"]);
    assert_eq!(m.id("B-per"), Some(2));
    assert_eq!(m.id("I-LOC"), None);
    // O is present even when unused.
    assert_eq!(LabelMap::from_sentences(&[sent(&["B-x"])]).labels, ["O", "B-x"]);
    let back = LabelMap::from_id2label(&m.id2label()).unwrap();
    assert_eq!(back, m);
    assert_eq!(m.label2id()["I-per"], 3);
}

#[test]
fn data_labels_from_id2label_keeps_model_order_and_checks() {
    let map: BTreeMap<usize, String> = [(0, "B-x"), (1, "O")]
        .into_iter()
        .map(|(i, t)| (i, t.to_string()))
        .collect();
    assert_eq!(LabelMap::from_id2label(&map).unwrap().labels, ["B-x", "O"]);
    let gap: BTreeMap<usize, String> = [(0, "O"), (2, "B-x")]
        .into_iter()
        .map(|(i, t)| (i, t.to_string()))
        .collect();
    assert!(LabelMap::from_id2label(&gap).unwrap_err().to_string().contains("id 1"));
    let dup: BTreeMap<usize, String> = [(0, "O"), (1, "O")]
        .into_iter()
        .map(|(i, t)| (i, t.to_string()))
        .collect();
    assert!(LabelMap::from_id2label(&dup).unwrap_err().to_string().contains("`O`"));
    // JSON id2label (string keys) deserialises straight into the map type.
    let json: BTreeMap<usize, String> = serde_json::from_str(r#"{"0":"O","1":"B-x"}"#).unwrap();
    assert_eq!(LabelMap::from_id2label(&json).unwrap().labels, ["O", "B-x"]);
}

#[test]
fn data_labels_check_covers_names_first_missing_tag() {
    let m = LabelMap::from_sentences(&[sent(&["O", "B-x"])]);
    let p = PathBuf::from("data/test.conll");
    assert!(m.check_covers(&[sent(&["B-x", "O"])], &p).is_ok());
    let err = m
        .check_covers(&[sent(&["O"]), sent(&["B-x", "I-x", "B-y"])], &p)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("data/test.conll:"), "{err}");
    assert!(
        err.contains("sentence 1") && err.contains("word 1") && err.contains("`I-x`"),
        "{err}"
    );
}
