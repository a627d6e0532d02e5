//! The ops mergekit's methods added (issue 14) at n = 1e8 (cold: every input far beyond the L3
//! cache), f32 and bf16, three fine-tuned models, with STREAM read bandwidth in the same run:
//! `linear_combination`, `gram` (centred on the base), `slerp`, `model_stock`, TIES under
//! mergekit's election (`ties_elect_with`), DELLA (`della`, rows of 4000) and the L1-preserving
//! rescale (`preserve_l1`, reading the task vector and the sparse one, rewriting the latter). GB/s count every
//! byte touched once: the inputs read and the output written (`gram` writes nothing; `slerp` and
//! `model_stock` read their inputs twice, once for the Gram matrix, counted once).
//!
//! Run: `cargo bench -p kernels-benches --bench interpolate && python3 benches/medians.py interpolate`

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;
use kernels_benches::{bench_stream_read, cheap_data as data, heavy_tailed};
use kernels_cpu::prelude::*;

const N: usize = 100_000_000;
const MODELS: usize = 3;
const DELLA_COLS: usize = 4000;

fn family<T: Element>(c: &mut Criterion, cpu: &Cpu) {
    let threads = cpu.threads();
    let mut group = c.benchmark_group(format!("interpolate/{}", T::DTYPE.name()));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let size = core::mem::size_of::<T>();
    let models: Vec<Vec<T>> = (0..MODELS).map(|k| data(N, k)).collect();
    let views: Vec<&[T]> = models.iter().map(Vec::as_slice).collect();
    let base: Vec<T> = data(N, 99);
    let mut out = vec![0.0f32; N];
    let id = |name: &str| BenchmarkId::new(format!("{name}_n{N}"), format!("{threads}t"));

    group.throughput(Throughput::Bytes((N * (MODELS * size + 4)) as u64));
    group.bench_function(id("linear_combination_models3"), |b| {
        b.iter(|| linear_combination(cpu, &views, &[0.5, 0.3, 0.2], &mut out).expect("lc"));
    });
    group.throughput(Throughput::Bytes((N * (MODELS + 1) * size) as u64));
    group.bench_function(id("gram_centred_models3"), |b| {
        let mut g = [0.0f64; MODELS * MODELS];
        b.iter(|| gram(cpu, &views, Some(&base), &mut g).expect("gram"));
    });
    group.throughput(Throughput::Bytes((N * (2 * size + 4)) as u64));
    group.bench_function(id("slerp"), |b| {
        b.iter(|| slerp(cpu, &base, views[0], 0.4, &mut out).expect("slerp"));
    });
    group.throughput(Throughput::Bytes((N * ((MODELS + 1) * size + 4)) as u64));
    group.bench_function(id("model_stock_models3"), |b| {
        b.iter(|| model_stock(cpu, &base, &views, &mut out).expect("model stock"));
    });
    let rule = TiesElection::default()
        .with_zero_sum_elects_positive(true)
        .with_normalize(false);
    group.bench_function(id("ties_elect_mergekit_models3"), |b| {
        b.iter(|| {
            ties_elect_with(cpu, &base, &views, &[1.0; MODELS], 1.0, rule, &mut out).expect("ties");
        });
    });
    // DELLA ranks each row by magnitude: a heavy-tailed task vector, as fine-tuning deltas are.
    let tau: Vec<T> = heavy_tailed(N, 1e-3, 5)
        .iter()
        .map(|&v| T::from_f32(v))
        .collect();
    group.throughput(Throughput::Bytes((N * (size + 4)) as u64));
    group.bench_function(id("della_cols4000"), |b| {
        let params = DellaParams::new(0.5, 0.1, 7);
        b.iter(|| della(cpu, &tau, DELLA_COLS, params, 0, &mut out).expect("della"));
    });
    // DELLA's output as the sparse tensor (half its entries kept), rescaled in place.
    group.throughput(Throughput::Bytes((N * (size + 8)) as u64));
    group.bench_function(id("preserve_l1"), |b| {
        b.iter(|| preserve_l1(cpu, &tau, &mut out).expect("preserve_l1"));
    });
}

fn interpolate(c: &mut Criterion) {
    let cpu = Cpu::detect();
    bench_stream_read(c, "interpolate/stream", &cpu);
    family::<f32>(c, &cpu);
    family::<bf16>(c, &cpu);
}

criterion_group!(benches, interpolate);
criterion_main!(benches);
