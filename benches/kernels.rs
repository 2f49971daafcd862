//! One criterion bench per CUDA kernel family, named after the `Backend` method (the
//! kernel's op: `attention_fwd/bf16`, `layernorm_bwd/residual`, ...), at the roberta-base
//! step shape (tests/common/kernel_suite.rs, shared with tests/gpu_bench.rs), with its
//! throughput: bytes/s for memory-bound kernels, FLOP/s (criterion's "elements") for the
//! matmul-bound ones. Without a usable GPU it prints SKIPPED and benches nothing.
//!
//! cargo bench --bench kernels [-- NAME]        e.g. -- attention_bwd
//!
//! The same ops on the CPU backend: benches/ops.rs. Each sample is a batch of calls closed
//! by one device synchronisation (ops only enqueue work).
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use deepcut_fast::backend::cuda::Cuda;
use deepcut_fast::backend::Backend;
use std::time::{Duration, Instant};

#[path = "../tests/common/kernel_suite.rs"]
mod kernel_suite;
use kernel_suite::{Shape, Work};

fn kernels(c: &mut Criterion) {
    let g = match Cuda::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("SKIPPED: benches/kernels.rs needs a usable CUDA device ({e})");
            return;
        }
    };
    let shape = if std::env::var("DEEPCUT_BENCH_SMALL").is_ok() {
        Shape::small()
    } else {
        Shape::roberta_step()
    };
    eprintln!("CUDA kernels on {} at {}", g.name(), shape.describe());
    kernel_suite::kernels(&g, shape, &mut |name, work, op| {
        let (family, variant) = name.split_once('/').unwrap_or((name, "step"));
        let mut group = c.benchmark_group(family);
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .throughput(match work {
                Work::Bytes(b) => Throughput::Bytes(b),
                Work::Flops(f) => Throughput::Elements(f),
            });
        group.bench_function(variant, |b| {
            b.iter_custom(|iters| {
                let t0 = Instant::now();
                for _ in 0..iters {
                    op();
                }
                g.synchronize();
                t0.elapsed()
            })
        });
        group.finish();
    });
}

criterion_group!(benches, kernels);
criterion_main!(benches);
