//! CoNLL reader and writer (SPEC section 1).
//!
//! One word per line, `word<TAB>tag` (also space-separated, or several columns with the
//! tag last), a blank line between sentences. The reader is strict about what would
//! silently change the labels (bad tags, broken bytes) and lenient about layout (CRLF,
//! a BOM, `-DOCSTART-` lines, runs of blank lines, no final blank line).
//!
//! An `I-x` tag after `O` or after another type is accepted: SPEC section 6's seqeval
//! (default mode) reads it as the start of an `x` entity, and the shared data has such
//! tags (tests/bad_input.rs checks that the metrics count it).
use crate::error::{Error, Result};
use crate::util::write_atomic;
use std::path::Path;

/// One sentence: its words and, when the file has them, one BIO2 tag per word
/// (`tags` is empty for an untagged file read with `require_tags = false`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sentence {
    pub words: Vec<String>,
    pub tags: Vec<String>,
}

/// True for `O`, `B-<type>` and `I-<type>` with a non-empty type without whitespace.
/// seqeval would accept more (IOBES, bare `B`), but the engine's label set is BIO2 and
/// anything else in a file is far more likely a broken column than a scheme choice.
pub fn is_bio_tag(tag: &str) -> bool {
    if tag == "O" {
        return true;
    }
    match tag.strip_prefix("B-").or_else(|| tag.strip_prefix("I-")) {
        Some(ty) => !ty.is_empty() && !ty.chars().any(char::is_whitespace),
        None => false,
    }
}

/// Read a CoNLL file. With `require_tags` every word line must carry a tag; without it
/// a file may instead be all single-column lines (words only, as `predict` reads them),
/// and then every sentence has empty `tags`. A file must be one or the other.
///
/// Errors name the file and the 1-based line: a malformed line, a tag that is not
/// `O`/`B-x`/`I-x`, invalid UTF-8, a NUL byte, a line over [`MAX_LINE_BYTES`], a
/// carriage return inside a line; a file with no sentences names the file.
pub fn read_conll(path: &Path, require_tags: bool) -> Result<Vec<Sentence>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_conll(path, &bytes, require_tags)
}

/// Whether the file's word lines carry tags; decided by the first word line.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    Tagged { first_line: usize },
    Untagged { first_line: usize },
}

/// Parse the bytes of a CoNLL file; `path` is only used in error messages.
pub fn parse_conll(path: &Path, bytes: &[u8], require_tags: bool) -> Result<Vec<Sentence>> {
    let text = decode_utf8(path, bytes)?;
    let mut sentences = Vec::new();
    let mut current = Sentence::default();
    let mut layout: Option<Layout> = None;
    for (i, raw) in text.split('\n').enumerate() {
        let line_no = i + 1;
        check_raw_line(path, line_no, raw)?;
        // U+FEFF too: a byte-order mark where two files were concatenated is not part of a word.
        let line = raw.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
        if line.is_empty() || is_docstart(line) {
            // A blank (or whitespace-only) line ends a sentence; so does a document marker.
            flush(&mut sentences, &mut current);
            continue;
        }
        let (word, tag) = split_line(line);
        match (tag, require_tags) {
            (None, true) => {
                return Err(Error::line(
                    path,
                    line_no,
                    format!("expected `word<TAB>tag`, found one column `{}`", shown(line)),
                ))
            }
            (Some(tag), _) if !is_bio_tag(tag) => {
                return Err(Error::line(
                    path,
                    line_no,
                    format!("invalid tag `{}`: expected O, B-<type> or I-<type> (BIO2)", shown(tag)),
                ))
            }
            _ => {}
        }
        check_layout(path, line_no, &mut layout, tag.is_some())?;
        current.words.push(word.to_string());
        if let Some(tag) = tag {
            current.tags.push(tag.to_string());
        }
    }
    flush(&mut sentences, &mut current);
    if sentences.is_empty() {
        return Err(Error::file(
            path,
            "no sentences (the file is empty or has only blank lines)",
        ));
    }
    Ok(sentences)
}

/// Longest line the reader accepts. A CoNLL line is a word and a few columns (the
/// longest in ../shared/data is 276 bytes); a longer line is a file that is not CoNLL,
/// or one whose line breaks are not `\n` / `\r\n`, and would otherwise reach the
/// tokenizer as one enormous word.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// What no CoNLL line has: more than [`MAX_LINE_BYTES`], a NUL byte (a binary file, or
/// the zero-filled tail some file systems leave after a crash), a carriage return
/// inside it (CR-only line endings: the whole file would read as one line, with every
/// column but the first and last silently dropped).
fn check_raw_line(path: &Path, line_no: usize, raw: &str) -> Result<()> {
    if raw.len() > MAX_LINE_BYTES {
        return Err(Error::line(
            path,
            line_no,
            format!(
                "line is {} bytes long (limit {MAX_LINE_BYTES}): not a CoNLL file, or its line breaks are not \\n or \\r\\n",
                raw.len()
            ),
        ));
    }
    if raw.contains('\0') {
        return Err(Error::line(
            path,
            line_no,
            "NUL byte: a binary file, or one whose end was zero-filled by a crash",
        ));
    }
    if raw.trim_end_matches('\r').contains('\r') {
        return Err(Error::line(
            path,
            line_no,
            "carriage return inside the line: the file has CR-only (old Mac) line breaks; convert them to \\n",
        ));
    }
    Ok(())
}

/// A piece of a line for an error message: control characters escaped, at most 60
/// characters.
fn shown(s: &str) -> String {
    const MAX: usize = 60;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().nth(MAX).is_some() {
        out.push_str("...");
    }
    out
}

/// Strip a UTF-8 BOM and decode; invalid UTF-8 names the line of the first bad byte.
fn decode_utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        Error::line(path, line, format!("invalid UTF-8 (byte offset {at})"))
    })
}

fn is_docstart(line: &str) -> bool {
    line.split_whitespace().next() == Some("-DOCSTART-")
}

/// Split a trimmed, non-empty line into the word (first column) and the tag (last
/// column, if there are two or more). Tab-separated lines split on tabs only, so a
/// word may contain spaces there; otherwise columns are split on any whitespace.
fn split_line(line: &str) -> (&str, Option<&str>) {
    if line.contains('\t') {
        let mut cols = line.split('\t').map(str::trim);
        let word = cols.next().unwrap_or("");
        let tag = cols.next_back();
        (word, tag)
    } else {
        let mut cols = line.split_whitespace();
        let word = cols.next().unwrap_or("");
        (word, cols.last())
    }
}

/// A file is either all tagged or all untagged: a mix would give sentences whose tags
/// no longer line up with their words.
fn check_layout(path: &Path, line_no: usize, layout: &mut Option<Layout>, tagged: bool) -> Result<()> {
    match (*layout, tagged) {
        (None, true) => *layout = Some(Layout::Tagged { first_line: line_no }),
        (None, false) => *layout = Some(Layout::Untagged { first_line: line_no }),
        (Some(Layout::Tagged { first_line }), false) => {
            return Err(Error::line(
                path,
                line_no,
                format!("line has no tag, but earlier lines have one (first at line {first_line})"),
            ))
        }
        (Some(Layout::Untagged { first_line }), true) => {
            return Err(Error::line(
                path,
                line_no,
                format!("line has a tag, but earlier lines have none (first at line {first_line})"),
            ))
        }
        _ => {}
    }
    Ok(())
}

fn flush(sentences: &mut Vec<Sentence>, current: &mut Sentence) {
    if !current.words.is_empty() {
        sentences.push(std::mem::take(current));
    }
}

/// Write `word<TAB>tag` lines, a blank line after each sentence (the uniform format of
/// SPEC section 1), atomically. `tags[i]` must have one tag per word of `sentences[i]`.
pub fn write_conll(path: &Path, sentences: &[Sentence], tags: &[Vec<String>]) -> Result<()> {
    if sentences.len() != tags.len() {
        return Err(Error::invalid(format!(
            "writing {}: {} sentences but {} tag sequences",
            path.display(),
            sentences.len(),
            tags.len()
        )));
    }
    let mut out = String::new();
    for (i, (s, t)) in sentences.iter().zip(tags).enumerate() {
        if s.words.len() != t.len() {
            return Err(Error::invalid(format!(
                "writing {}: sentence {i} has {} words but {} tags",
                path.display(),
                s.words.len(),
                t.len()
            )));
        }
        for (w, tag) in s.words.iter().zip(t) {
            out.push_str(w);
            out.push('\t');
            out.push_str(tag);
            out.push('\n');
        }
        out.push('\n');
    }
    write_atomic(path, out.as_bytes())
}
