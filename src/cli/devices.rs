//! `deepcut-fast devices`: what this binary and this machine can run on, as `--device auto`
//! sees it: the kernel images built in, the CPU, the CUDA driver and the files of the driver,
//! cuBLAS, cuBLASLt and NVTX actually opened, every GPU (compute capability, memory, the
//! kernel image it loads, the self-check's verdict) and what `auto` picks. The first thing to
//! run on a new machine, and what scripts/gpu-check.sh reads the cuBLAS link folder from.
use super::selfcheck;
use crate::backend::cuda::{self, images, libs, Cuda};
use crate::backend::Precision;
use crate::error::Result;
use crate::util::write_atomic;
use clap::Args;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct DevicesArgs {
    /// Also write the report as JSON to FILE ("-": print the JSON instead of the table).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Skip the self-check (one DeepCUT step of a tiny model on each GPU against the CPU
    /// backend, as `--device auto` runs it); then `auto` is what it would pick if GPU 0
    /// passed.
    #[arg(long)]
    no_self_check: bool,
    /// Precision of the self-check (default bf16, the CUDA default `auto` checks).
    #[arg(long, value_parser = super::parse_precision)]
    precision: Option<Precision>,
}

pub fn run(a: DevicesArgs) -> Result<()> {
    // The same cuBLAS lookup as `--device auto|cuda` (may re-execute this process).
    libs::ensure_cublas_names();
    let report = gather(a.precision, !a.no_self_check);
    let text = serde_json::to_string_pretty(&report).expect("JSON of a Value");
    match a.json.as_deref() {
        Some(p) if p == Path::new("-") => println!("{text}"),
        Some(p) => {
            write_atomic(p, format!("{text}\n").as_bytes())?;
            print!("{}", table(&report));
        }
        None => print!("{}", table(&report)),
    }
    Ok(())
}

fn path_json(p: &Option<PathBuf>) -> Value {
    p.as_ref().map_or(Value::Null, |p| json!(p.display().to_string()))
}

/// Everything the report says, as JSON (the table is made from it).
/// `flag`: --precision (the self-check's; bf16 without it, as `auto` checks).
fn gather(flag: Option<Precision>, self_check: bool) -> Value {
    let precision = flag.unwrap_or(Precision::Bf16);
    // the CPU backend's precision, as DeviceArgs::init sets it
    let cpu = flag.unwrap_or(Precision::Fp32).name();
    let mut targets: Vec<&str> = images::IMAGES.iter().map(|(_, t, _)| *t).collect();
    targets.sort_unstable();
    targets.dedup();
    let loaded = libs::loaded();
    let driver_version = libs::driver_version().map(|(ma, mi)| format!("{ma}.{mi}"));
    let availability = cuda::availability();
    let mut gpus = vec![];
    if availability.is_ok() {
        let n = cudarc::driver::CudaContext::device_count().unwrap_or(0).max(0) as usize;
        for ordinal in 0..n {
            gpus.push(gpu(ordinal, precision, self_check));
        }
    }
    // `auto`: GPU 0 if it is usable and its self-check passes (src/cli/mod.rs DeviceArgs::init)
    let auto = match (&availability, gpus.first()) {
        (Err(why), _) => json!({"device": "cpu", "precision": cpu, "why": format!("no usable GPU: {why}")}),
        (Ok(_), None) => json!({"device": "cpu", "precision": cpu, "why": "the CUDA driver lists no GPU"}),
        (Ok(_), Some(g)) => {
            if let Some(e) = g["error"].as_str() {
                json!({"device": "cpu", "precision": cpu, "why": format!("GPU 0 cannot be opened: {e}")})
            } else if g["self_check"]["passed"] == false {
                json!({"device": "cpu", "precision": cpu,
                       "why": format!("GPU 0 failed the self-check: {}", g["self_check"]["error"].as_str().unwrap_or("?"))})
            } else if g["self_check"].is_null() {
                json!({"device": "cuda:0", "precision": precision.name(),
                       "why": "GPU 0 opens; its self-check was not run (--no-self-check), and auto runs it first"})
            } else {
                json!({"device": "cuda:0", "precision": precision.name(), "why": "GPU 0 passed the self-check"})
            }
        }
    };
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "kernels": {
            "compiled": images::NOT_COMPILED.is_none(),
            "not_compiled": images::NOT_COMPILED,
            "targets": targets,
            "nvrtc": images::NVRTC_VERSION,
        },
        // the SIMD build and GEMM library are picked per machine (src/backend/cpu)
        "cpu": crate::backend::cpu::host(),
        "cuda": {
            "available": availability.is_ok(),
            "why_not": availability.as_ref().err(),
            "driver": {"library": path_json(&loaded.driver), "cuda_version": driver_version},
            "cublas": {
                "library": path_json(&loaded.cublas),
                "lt": path_json(&loaded.cublas_lt),
                "shim": path_json(&loaded.shim),
            },
            "nvtx": cuda::nvtx::Nvtx::get().map(|n| n.from.clone()),
            "gpus": gpus,
        },
        "auto": auto,
    })
}

/// One GPU: opened as the backend opens it (every kernel module loaded), then self-checked.
fn gpu(ordinal: usize, precision: Precision, self_check: bool) -> Value {
    let be = match Cuda::new(ordinal) {
        Ok(be) => be,
        Err(e) => return json!({"ordinal": ordinal, "error": e.to_string()}),
    };
    let i = be.info().clone();
    drop(be);
    let check = if !self_check {
        Value::Null
    } else {
        match selfcheck::self_check(ordinal, precision) {
            Ok(r) => json!({
                "precision": precision.name(), "passed": true, "seconds": r.seconds,
                "worst": r.worst, "worst_what": r.worst_what, "tolerance": r.tol,
            }),
            Err(e) => json!({"precision": precision.name(), "passed": false, "error": e}),
        }
    };
    json!({
        "ordinal": ordinal,
        "name": i.name,
        "compute_capability": format!("{}.{}", i.major, i.minor),
        "memory_bytes": i.memory_bytes,
        "kernel_image": i.image_target,
        "memory_pools": i.memory_pools,
        "allocator": i.allocator.api(),
        "allocator_note": i.allocator_note,
        "page_locked": i.pageable_why.is_none(),
        "page_locked_note": i.pageable_why,
        "error": null,
        "self_check": check,
    })
}

/// The report for a person.
fn table(r: &Value) -> String {
    let s = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| "none".into());
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<15}{v}\n"));
    line("deepcut-fast", s(&r["version"]));
    let k = &r["kernels"];
    line(
        "kernels",
        if k["compiled"] == true {
            let t: Vec<String> = k["targets"].as_array().into_iter().flatten().map(s).collect();
            format!("{} (NVRTC {})", t.join(", "), s(&k["nvrtc"]))
        } else {
            format!("not built in ({}): CPU only", s(&k["not_compiled"]))
        },
    );
    let c = &r["cpu"];
    line(
        "CPU",
        format!(
            "{}, {} threads, {} loops, {} GEMMs",
            s(&c["model"]),
            c["threads"],
            s(&c["simd"]),
            s(&c["gemm"])
        ),
    );
    let cu = &r["cuda"];
    line(
        "CUDA driver",
        match cu["driver"]["library"].as_str() {
            Some(lib) => format!("CUDA {} ({lib})", s(&cu["driver"]["cuda_version"])),
            None => "none".into(),
        },
    );
    let b = &cu["cublas"];
    line(
        "cuBLAS",
        match b["shim"].as_str() {
            Some(shim) => format!("{} (linked as libcublas.so in {shim})", s(&b["library"])),
            None => s(&b["library"]),
        },
    );
    line("cuBLASLt", s(&b["lt"]));
    line(
        "NVTX",
        cu["nvtx"]
            .as_str()
            .map_or("none (nsys shows no ranges)".into(), str::to_string),
    );
    if let Some(why) = cu["why_not"].as_str() {
        line("CUDA", format!("not usable: {why}"));
    }
    for g in cu["gpus"].as_array().into_iter().flatten() {
        let key = format!("GPU {}", g["ordinal"]);
        if let Some(e) = g["error"].as_str() {
            line(&key, format!("cannot be opened: {e}"));
            continue;
        }
        let gib = g["memory_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64;
        line(
            &key,
            format!(
                "{}, compute capability {}, {gib:.1} GiB, kernels {}, {}",
                s(&g["name"]),
                s(&g["compute_capability"]),
                s(&g["kernel_image"]),
                match (
                    g["memory_pools"] == true,
                    g["allocator"].as_str(),
                    g["allocator_note"].as_str()
                ) {
                    (true, Some("cuMemAllocAsync"), _) => "memory pools (stream-ordered allocation)".to_string(),
                    (false, _, None) => "no memory pools (cuMemAlloc)".to_string(),
                    (_, how, note) => format!("memory by {} ({})", how.unwrap_or("?"), note.unwrap_or("?")),
                }
            ),
        );
        if let Some(why) = g["page_locked_note"].as_str() {
            line(
                "",
                format!("host copies through pageable memory, each waiting for the stream: {why}"),
            );
        }
        let sc = &g["self_check"];
        if sc["passed"] == true {
            line(
                "",
                format!(
                    "self-check {}: passed in {:.2} s (worst {:.1e}, bound {:.0e}: {})",
                    s(&sc["precision"]),
                    sc["seconds"].as_f64().unwrap_or(0.0),
                    sc["worst"].as_f64().unwrap_or(0.0),
                    sc["tolerance"].as_f64().unwrap_or(0.0),
                    s(&sc["worst_what"])
                ),
            );
        } else if sc["passed"] == false {
            line(
                "",
                format!("self-check {}: FAILED: {}", s(&sc["precision"]), s(&sc["error"])),
            );
        }
    }
    let a = &r["auto"];
    line(
        "--device auto",
        format!("{} ({}): {}", s(&a["device"]), s(&a["precision"]), s(&a["why"])),
    );
    out
}
