//! Class-masked InfoNCE forward + backward on the CPU backend at m = 2048 and 8192 rows
//! of width 384 (MiniLM's hidden size).
//!
//! The batch has DeepCUT's shape at the default B_f 8, B_r 32: a third of the rows are
//! forget-sentence tokens (views a and b, partners of each other, all anchors), the rest
//! retain tokens; 13 classes (WNUT17's BIO tags) with 'O' on ~80% of rows. Throughput is
//! in pairs/s with pairs = anchors x rows, the size of the similarity matrix the op
//! never stores (the same count for every option, whatever the masks skip).
//!
//! cargo bench --bench infonce
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use deepcut_fast::backend::cpu::infonce::synthetic_rows;
use deepcut_fast::backend::cpu::Cpu;
use deepcut_fast::backend::{Backend, Denominator, InfoNceOptions, OwnView, Precision};

struct Batch {
    z: Vec<f32>,
    labels: Vec<i32>,
    anchor: Vec<i32>,
    partner: Vec<i32>,
    anchors: usize,
}

fn batch(m: usize, c: usize) -> Batch {
    let (z, labels, anchor, partner) = synthetic_rows(m, c);
    let anchors = anchor.iter().filter(|&&a| a == 1).count();
    Batch {
        z,
        labels,
        anchor,
        partner,
        anchors,
    }
}

fn infonce(cr: &mut Criterion) {
    let be = Cpu;
    let c = 384;
    let mut g = cr.benchmark_group("infonce_fwd_bwd_cpu");
    g.sample_size(10);
    let configs = [
        ("same-class,detached", InfoNceOptions::default()),
        (
            "all,exclude,not-detached",
            InfoNceOptions {
                tau: 0.1,
                denominator: Denominator::All,
                own_view: OwnView::Exclude,
                detach_columns: false,
            },
        ),
    ];
    for m in [2048, 8192] {
        let b = batch(m, c);
        let (mut loss, mut lse, mut dz) = (be.alloc(m), be.alloc(m), be.alloc(m * c));
        g.throughput(Throughput::Elements((b.anchors * m) as u64));
        for (name, opts) in configs {
            g.bench_with_input(BenchmarkId::new(name, m), &m, |bench, &m| {
                bench.iter(|| {
                    be.infonce_fwd(
                        &mut loss,
                        &mut lse,
                        &b.z,
                        &b.labels,
                        &b.anchor,
                        &b.partner,
                        m,
                        c,
                        opts,
                        Precision::Fp32,
                    );
                    be.infonce_bwd(
                        &mut dz,
                        &b.z,
                        &lse,
                        &b.labels,
                        &b.anchor,
                        &b.partner,
                        m,
                        c,
                        opts,
                        1.0,
                        Precision::Fp32,
                    );
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, infonce);
criterion_main!(benches);
