//! Forget/retain splits: by ratio and seed, or from an index file; errors name file and line.
use deepcut_fast::data::{forget_by_ratio, read_indices, retain_indices, write_indices};
use std::path::PathBuf;

fn file(name: &str, text: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("data_split");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn data_split_ratio_count_sorted_and_seeded() {
    let f = forget_by_ratio(3394, 0.01, 0).unwrap();
    assert_eq!(f.len(), 34);
    assert!(f.windows(2).all(|w| w[0] < w[1]) && *f.last().unwrap() < 3394);
    assert_eq!(f, forget_by_ratio(3394, 0.01, 0).unwrap());
    assert_ne!(f, forget_by_ratio(3394, 0.01, 1).unwrap());
    assert_eq!(forget_by_ratio(10, 0.001, 0).unwrap().len(), 1, "at least one");
    assert_eq!(forget_by_ratio(10, 0.25, 0).unwrap().len(), 3, "round(2.5) = 3");
    assert_eq!(forget_by_ratio(1000, 0.5, 3).unwrap().len(), 500);
}

#[test]
fn data_split_ratio_is_portable() {
    // Pinned: the same seed must give the same forget set on every machine and build.
    assert_eq!(forget_by_ratio(100, 0.05, 42).unwrap(), PINNED_FORGET);
}
const PINNED_FORGET: [usize; 5] = [15, 50, 52, 84, 98];

#[test]
fn data_split_ratio_errors_name_option() {
    for r in [0.0, 1.0, -0.1, 1.5, f64::NAN] {
        let err = forget_by_ratio(100, r, 0).unwrap_err().to_string();
        assert!(err.contains("--forget-ratio"), "{err}");
    }
    let err = forget_by_ratio(2, 0.9, 0).unwrap_err().to_string();
    assert!(
        err.contains("--forget-ratio") && err.contains("nothing would be retained"),
        "{err}"
    );
}

#[test]
fn data_split_file_roundtrip_with_comments() {
    let p = file("forget.txt", "# my forget set\n12\n\n 3 \n7 # a comment\n");
    assert_eq!(read_indices(&p, 20).unwrap(), [3, 7, 12]);
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("data_split/written.txt");
    write_indices(&out, &[3, 7, 12]).unwrap();
    assert_eq!(read_indices(&out, 20).unwrap(), [3, 7, 12]);
}

fn err(name: &str, text: &str, n: usize) -> (PathBuf, String) {
    let p = file(name, text);
    let e = read_indices(&p, n).unwrap_err().to_string();
    (p, e)
}

#[test]
fn data_split_file_errors_name_file_and_line() {
    let (p, e) = err("range.txt", "1\n2\n\n20\n", 20);
    assert!(e.starts_with(&format!("{}:4:", p.display())), "{e}");
    assert!(e.contains("20 sentences"), "{e}");
    let (p, e) = err("dup.txt", "5\n# x\n6\n5\n", 20);
    assert!(e.starts_with(&format!("{}:4:", p.display())), "{e}");
    assert!(e.contains("lines 1 and 4"), "{e}");
    let (p, e) = err("nan.txt", "1\n-2\n", 20);
    assert!(
        e.starts_with(&format!("{}:2:", p.display())) && e.contains("`-2`"),
        "{e}"
    );
    let (p, e) = err("empty.txt", "# nothing\n\n", 20);
    assert!(e.starts_with(&p.display().to_string()) && e.contains("empty"), "{e}");
    let (p, e) = err("all.txt", "0\n1\n2\n", 3);
    assert!(e.starts_with(&p.display().to_string()) && e.contains("all 3"), "{e}");
    let missing = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("data_split/missing.txt");
    assert!(read_indices(&missing, 3)
        .unwrap_err()
        .to_string()
        .contains("missing.txt"));
}

#[test]
fn data_split_retain_is_the_complement() {
    assert_eq!(retain_indices(6, &[4, 1]), [0, 2, 3, 5]);
    let f = forget_by_ratio(500, 0.1, 9).unwrap();
    let r = retain_indices(500, &f);
    assert_eq!(r.len() + f.len(), 500);
    assert!(r.iter().all(|i| f.binary_search(i).is_err()));
}
