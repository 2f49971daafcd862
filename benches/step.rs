//! One forward+backward step of the MiniLM shape (6 layers, hidden 384, 12 heads,
//! FFN 1536) on a batch of 32 x 128 tokens, CPU backend. Throughput is reported in
//! tokens/s; the model FLOPs of a step are ~6 * params * tokens + attention.
//!
//! cargo bench --bench step
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use deepcut_fast::backend::cpu::Cpu;
use deepcut_fast::model::{Dims, HostBatch, Mode, Model};
use deepcut_fast::util::Lcg;

/// The all-MiniLM-L6-v2 shape with a 13-label head (WNUT17).
fn minilm_dims() -> Dims {
    let cfg = deepcut_fast::model::ModelConfig::preset("minilm-l6").expect("built-in preset");
    Dims::from_config(&cfg, 13)
}

fn step(c: &mut Criterion) {
    let dims = minilm_dims();
    let (b, t) = (32, 128);
    let mut rng = Lcg::with_increment(1, 1);
    let mut model = Model::new(Cpu, dims.clone(), b * t, |_, shape| {
        (0..shape.iter().product::<usize>())
            .map(|_| (rng.next_unit() - 0.5) * 0.04)
            .collect()
    });
    let batch = HostBatch::synthetic(b, t, dims.vocab, dims.labels, 0);
    let mut g = c.benchmark_group("minilm_step_cpu");
    g.sample_size(10);
    g.throughput(Throughput::Elements((b * t) as u64));
    let mut step = 0;
    g.bench_function("fwd_bwd_32x128", |bench| {
        bench.iter(|| {
            step += 1;
            model.forward(&batch, Mode::Train { seed: 1, step });
            let loss = model.ce_loss(&batch);
            model.zero_grads();
            model.backward(1.0 / batch.labelled() as f32, None);
            loss
        })
    });
    g.finish();
}

criterion_group!(benches, step);
criterion_main!(benches);
