//! What can be checked about the CUDA backend without a GPU (these run in CI):
//! - the build compiled every kernel file for every target (when NVRTC was there, and
//!   always under DEEPCUT_REQUIRE_KERNELS=1);
//! - the image choice per device (cubin of the same major version, else PTX);
//! - every kernel name a launcher uses exists, every f32 kernel has a launcher, and each
//!   launch pushes as many arguments as the kernel takes, in the order its SAFETY comment
//!   states, which must be the kernel's own parameter order.
//!
//! Numerical parity with the CPU backend needs a GPU: tests/gpu_parity.rs.
mod common;
use common::loud;
use deepcut_fast::backend::cuda::images;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_kernel_file_is_compiled_for_every_target() {
    let required = std::env::var("DEEPCUT_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    if let Some(why) = images::NOT_COMPILED {
        assert!(
            !required,
            "DEEPCUT_REQUIRE_KERNELS=1 but the kernels were not compiled: {why}"
        );
        loud(&format!("SKIPPED: kernels not compiled in this build ({why})"));
        return;
    }
    let targets: Vec<&str> = {
        let mut t: Vec<&str> = images::IMAGES.iter().map(|(_, t, _)| *t).collect();
        t.sort();
        t.dedup();
        t
    };
    assert!(!targets.is_empty());
    let mut files: Vec<String> = std::fs::read_dir(repo().join("kernels"))
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "cu").then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    files.sort();
    assert_eq!(images::modules().map(String::from).collect::<Vec<_>>(), files);
    for f in &files {
        for t in &targets {
            let img = images::IMAGES
                .iter()
                .find(|(m, tt, _)| m == f && tt == t)
                .unwrap_or_else(|| panic!("kernels/{f}.cu has no {t} image"));
            assert!(img.2.len() > 100, "kernels/{f}.cu {t}: image of {} bytes", img.2.len());
            if t.starts_with("compute_") {
                assert!(
                    img.2.starts_with(b"//") && img.2.ends_with(&[0]),
                    "{f} {t}: not NUL-terminated PTX"
                );
            } else {
                assert!(img.2.starts_with(b"\x7fELF"), "{f} {t}: a cubin is an ELF file");
            }
        }
    }
    eprintln!(
        "{} kernel files x {:?}, {} entry points, NVRTC {}",
        files.len(),
        targets,
        images::all_entry_points().count(),
        images::NVRTC_VERSION
    );
}

#[test]
fn image_choice_follows_binary_compatibility() {
    let imgs: &[(&str, &str, &[u8])] = &[
        ("k", "sm_80", b"a"),
        ("k", "sm_90", b"b"),
        ("k", "compute_90", b"c\0"),
        ("other", "sm_86", b"d"),
    ];
    let pick = |maj, min| images::select_from(imgs, "k", maj, min).map(|i| i.target);
    assert_eq!(pick(8, 0), Some("sm_80"));
    assert_eq!(pick(8, 6), Some("sm_80"), "sm_80 SASS runs on 8.6");
    assert_eq!(pick(8, 9), Some("sm_80"));
    assert_eq!(pick(9, 0), Some("sm_90"));
    assert_eq!(pick(10, 0), Some("compute_90"), "newer majors JIT the PTX");
    assert_eq!(pick(12, 0), Some("compute_90"));
    assert_eq!(pick(7, 5), None, "nothing runs on sm_75");
    assert!(!images::select_from(imgs, "k", 9, 0).unwrap().bytes.is_empty());
    assert!(images::select_from(imgs, "k", 12, 0).is_some_and(|i| !i.cubin));
}

/// Parameter names of `extern "C" __global__ void NAME(...)` for every kernel.
fn kernel_params() -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(repo().join("kernels")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "cu") {
            continue;
        }
        let src = std::fs::read_to_string(&p).unwrap();
        let mut rest = src.as_str();
        while let Some(i) = rest.find("extern \"C\" __global__ void ") {
            rest = &rest[i + "extern \"C\" __global__ void ".len()..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            let open = rest.find('(').unwrap();
            let close = open + rest[open..].find(')').unwrap();
            out.insert(name, param_names(&rest[open + 1..close]));
        }
    }
    out
}

/// The last identifier of each comma-separated parameter, ignoring parenthesised remarks.
fn param_names(list: &str) -> Vec<String> {
    let mut depth = 0;
    let mut clean = String::new();
    for ch in list.chars() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ if depth == 0 => clean.push(ch),
            _ => {}
        }
    }
    clean
        .split(',')
        .map(|p| {
            p.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .rfind(|w| !w.is_empty())
                .unwrap_or("")
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// One `launch_builder(cu.func("NAME"))` site: its argument count and the parameter names
/// of its SAFETY comment.
struct Launch {
    file: String,
    kernel: String,
    args: usize,
    safety: Vec<String>,
}

fn launches() -> (Vec<Launch>, Vec<String>) {
    let mut sites = Vec::new();
    let mut names = Vec::new();
    for e in std::fs::read_dir(repo().join("src/backend/cuda")).unwrap() {
        let p = e.unwrap().path();
        let file = p.file_name().unwrap().to_string_lossy().into_owned();
        let src = std::fs::read_to_string(&p).unwrap();
        // Every kernel-like string literal (launchers that pick the kernel by variable name
        // pass these literals in).
        for part in src.split('"').skip(1).step_by(2) {
            if (part.ends_with("_f32") || part.ends_with("_f64") || part.ends_with("_bf16") || part.contains("_mma_"))
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && part.contains('_')
            {
                names.push(part.to_string());
            }
        }
        let lines: Vec<&str> = src.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            // `cu.func("name")`, or `cu.func(name)` with the name picked just above from
            // literals (`"kernel_f32"`) and families (`format!("prefix_{..}")`, every entry
            // point that starts with the prefix): each gets this site's checks.
            let kernels: Vec<String> = if let Some(pos) = line.find("launch_builder(cu.func(\"") {
                vec![line[pos + 24..].chars().take_while(|c| *c != '"').collect()]
            } else if line.contains("launch_builder(cu.func(") {
                let mut picked = Vec::new();
                // (not from an earlier launch's `check(.., "name")`)
                for back in lines[i.saturating_sub(4)..i].iter().filter(|l| !l.contains("check(")) {
                    let parts: Vec<&str> = back.split('"').collect();
                    for k in (1..parts.len()).step_by(2) {
                        let part = parts[k];
                        if parts[k - 1].ends_with("format!(") {
                            let prefix: String = part.chars().take_while(|c| *c != '{').collect();
                            picked.push(format!("{prefix}*"));
                        } else if part.ends_with("_f32") {
                            picked.push(part.to_string());
                        }
                    }
                }
                picked
            } else {
                continue;
            };
            let mut args = 0;
            let mut safety = String::new();
            let mut in_safety = false;
            for l in &lines[i..] {
                let t = l.trim();
                if !t.starts_with("//") && !t.contains("None =>") {
                    args += t.matches(".arg(").count();
                }
                if let Some(s) = t.strip_prefix("// SAFETY:") {
                    in_safety = true;
                    safety.push_str(s);
                } else if in_safety && t.starts_with("//") {
                    safety.push(' ');
                    safety.push_str(t.trim_start_matches('/'));
                }
                if t.contains(".launch(") || (in_safety && !t.starts_with("//")) {
                    break;
                }
            }
            let sig = safety.trim().strip_prefix('(').map(|s| {
                let mut depth = 1;
                let end = s
                    .char_indices()
                    .find(|&(_, c)| {
                        depth += (c == '(') as i32 - (c == ')') as i32;
                        depth == 0
                    })
                    .map_or(s.len(), |(i, _)| i);
                param_names(&s[..end])
            });
            for kernel in kernels {
                sites.push(Launch {
                    file: file.clone(),
                    kernel,
                    args,
                    safety: sig.clone().unwrap_or_default(),
                });
            }
        }
    }
    (sites, names)
}

#[test]
fn launchers_match_the_kernels_they_launch() {
    let params = kernel_params();
    let from_build: Vec<&str> = images::all_entry_points().collect();
    assert_eq!(
        params.keys().map(String::as_str).collect::<Vec<_>>(),
        {
            let mut v = from_build.clone();
            v.sort();
            v
        },
        "build.rs and this test must find the same entry points"
    );
    let (sites, names) = launches();
    assert!(sites.len() >= 25, "found only {} launch sites", sites.len());
    for name in &names {
        assert!(
            params.contains_key(name),
            "a launcher names `{name}`, which no kernels/*.cu defines"
        );
    }
    // A family site (`prefix*`) launches every entry point with that prefix, all of which
    // must take the same parameters.
    let families: Vec<&str> = sites.iter().filter_map(|s| s.kernel.strip_suffix('*')).collect();
    let family_of = |k: &str| families.iter().copied().find(|f| k.starts_with(f));
    for f in &families {
        let members: Vec<_> = params.iter().filter(|(k, _)| k.starts_with(f)).collect();
        assert!(
            !members.is_empty(),
            "a launcher picks `{f}*`, which no kernels/*.cu defines"
        );
        for (k, p) in &members {
            assert_eq!(*p, members[0].1, "{k}: parameters differ from {}'s", members[0].0);
        }
    }
    for k in params.keys() {
        assert!(
            names.contains(k) || family_of(k).is_some(),
            "kernel {k} has no launcher in src/backend/cuda"
        );
    }
    // The tensor-core kernels are launched by a computed name with their fp32 twin's
    // arguments and then `io`, the activations' storage (src/backend/cuda/attention.rs):
    // their parameters must be the twin's and io.
    let mut mma = 0;
    for (k, p) in params.iter().filter(|(k, _)| k.contains("_mma_")) {
        let twin = format!("{}_f32", &k[..k.find("_mma_").unwrap()]);
        let mut want = params.get(&twin).cloned().unwrap_or_default();
        want.push("io".to_string());
        assert_eq!(p, &want, "{k}: parameters differ from {twin}'s and io");
        mma += 1;
    }
    assert_eq!(mma, 18, "tensor-core attention entry points");
    for s in &sites {
        let p = match s.kernel.strip_suffix('*') {
            Some(f) => params.iter().find(|(k, _)| k.starts_with(f)).unwrap().1,
            None => &params[&s.kernel],
        };
        assert_eq!(
            s.args,
            p.len(),
            "{}: launch of {} pushes {} arguments, the kernel takes {} ({:?})",
            s.file,
            s.kernel,
            s.args,
            p.len(),
            p
        );
        assert_eq!(
            &s.safety, p,
            "{}: the SAFETY comment of {} must list the kernel's parameters in order",
            s.file, s.kernel
        );
    }
}
