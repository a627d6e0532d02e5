//! Streaming merge reductions at 1e6, 1e7 and 1e8 elements with N = 2, 4, 8 models, the task
//! vector masks (DARE, TIES trim, Breadcrumbs) at the same sizes, and STREAM read bandwidth in the
//! same run. GB/s count every byte touched once: the N inputs (and base, Fisher diagonals) read
//! and the output written; the magnitude masks' selection passes re-read their input, which the
//! GB/s figure does not count.
//!
//! Run: `cargo bench -p kernels-benches --bench merge && python3 benches/medians.py merge`

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;
use kernels_benches::{bench_stream_read, cheap_data as data, heavy_tailed, normal};
use kernels_cpu::prelude::*;

const SIZES: [usize; 3] = [1_000_000, 10_000_000, 100_000_000];
const MODELS: [usize; 3] = [2, 4, 8];

fn family<T: Element>(c: &mut Criterion, cpu: &Cpu) {
    let threads = cpu.threads();
    let mut group = c.benchmark_group(format!("merge/{}", T::DTYPE.name()));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let size = core::mem::size_of::<T>();
    for n in SIZES {
        let models: Vec<Vec<T>> = (0..*MODELS.iter().max().expect("models"))
            .map(|k| data(n, k))
            .collect();
        let base: Vec<T> = data(n, 99);
        let fishers: Vec<Vec<f32>> = (0..*MODELS.iter().max().expect("models"))
            .map(|k| data::<f32>(n, 50 + k).iter().map(|f| f.abs()).collect())
            .collect();
        let mut out = vec![0.0f32; n];
        for count in MODELS {
            let views: Vec<&[T]> = models[..count].iter().map(Vec::as_slice).collect();
            let weights = vec![1.0f32; count];
            group.throughput(Throughput::Bytes((n * (count * size + 4)) as u64));
            group.bench_function(
                BenchmarkId::new(
                    format!("weighted_mean_n{n}_models{count}"),
                    format!("{threads}t"),
                ),
                |b| {
                    b.iter(|| weighted_mean(cpu, &views, &weights, &mut out).expect("mean"));
                },
            );
            group.throughput(Throughput::Bytes((n * ((count + 1) * size + 4)) as u64));
            group.bench_function(
                BenchmarkId::new(
                    format!("task_arithmetic_n{n}_models{count}"),
                    format!("{threads}t"),
                ),
                |b| {
                    b.iter(|| {
                        task_arithmetic(cpu, &base, &views, &weights, 0.5, &mut out).expect("ta");
                    });
                },
            );
        }
        // TIES's speed depends on the values: votes that cancel to within `f32` rounding take the
        // `f64` path, and the cheap pattern's 101 levels cancel exactly in 1 % of the elements;
        // normal draws, like task vectors, almost never do.
        let drawn: Vec<Vec<T>> = (0..*MODELS.iter().max().expect("models"))
            .map(|k| normal(n, 0.01, 700 + k as u64))
            .collect();
        for count in MODELS {
            let views: Vec<&[T]> = models[..count].iter().map(Vec::as_slice).collect();
            let drawn_views: Vec<&[T]> = drawn[..count].iter().map(Vec::as_slice).collect();
            let fisher_views: Vec<&[f32]> = fishers[..count].iter().map(Vec::as_slice).collect();
            let weights = vec![1.0f32; count];
            group.throughput(Throughput::Bytes((n * ((count + 1) * size + 4)) as u64));
            group.bench_function(
                BenchmarkId::new(
                    format!("ties_elect_n{n}_models{count}"),
                    format!("{threads}t"),
                ),
                |b| {
                    b.iter(|| {
                        ties_elect(cpu, &base, &drawn_views, &weights, 1.0, &mut out)
                            .expect("ties");
                    });
                },
            );
            group.throughput(Throughput::Bytes((n * (count * (size + 4) + 4)) as u64));
            group.bench_function(
                BenchmarkId::new(
                    format!("fisher_merge_n{n}_models{count}"),
                    format!("{threads}t"),
                ),
                |b| {
                    b.iter(|| {
                        let params = FisherParams::default();
                        fisher_merge(cpu, &views, &fisher_views, &weights, params, &mut out)
                            .expect("fisher merge");
                    });
                },
            );
        }
        // Masks read one task vector and write the masked one. Magnitude selection depends on the
        // values: a heavy-tailed task vector, as fine-tuning deltas are.
        let tau: Vec<T> = heavy_tailed(n, 1e-3, n as u64)
            .iter()
            .map(|&v| T::from_f32(v))
            .collect();
        group.throughput(Throughput::Bytes((n * (size + 4)) as u64));
        group.bench_function(
            BenchmarkId::new(format!("dare_n{n}"), format!("{threads}t")),
            |b| {
                let params = DareParams::default().with_drop(0.9).with_seed(7);
                b.iter(|| dare(cpu, &tau, params, 0, &mut out).expect("dare"));
            },
        );
        group.bench_function(
            BenchmarkId::new(format!("breadcrumbs_n{n}"), format!("{threads}t")),
            |b| {
                b.iter(|| {
                    breadcrumbs(cpu, &tau, BreadcrumbsParams::default(), &mut out)
                        .expect("breadcrumbs");
                });
            },
        );
        let mut trimmed = vec![T::from_f32(0.0); n];
        group.throughput(Throughput::Bytes((n * 2 * size) as u64));
        group.bench_function(
            BenchmarkId::new(format!("ties_trim_n{n}"), format!("{threads}t")),
            |b| {
                b.iter(|| {
                    ties_trim(cpu, &tau, KeepRule::Density(0.2), &mut trimmed).expect("trim");
                });
            },
        );
        // Fisher accumulation reads and writes the f32 Fisher and reads the gradient.
        group.throughput(Throughput::Bytes((n * (8 + size)) as u64));
        group.bench_function(
            BenchmarkId::new(format!("fisher_accumulate_n{n}"), format!("{threads}t")),
            |b| {
                b.iter(|| fisher_accumulate(cpu, &mut out, &models[0], 0.5).expect("fisher"));
            },
        );
    }
}

fn merge(c: &mut Criterion) {
    let cpu = Cpu::detect();
    bench_stream_read(c, "merge/stream", &cpu);
    family::<f32>(c, &cpu);
    family::<bf16>(c, &cpu);
}

criterion_group!(benches, merge);
criterion_main!(benches);
