//! Exact magnitude selection over 1e6, 1e7 and 1e8 `f32` (k = 1 %, 10 %, 50 %): the k-th value,
//! the mask and the kept indices from the radix select, against `select_nth_unstable_by` on `|x|` over a copy, side by side, with STREAM read bandwidth
//! in the same run. Throughput counts the 4 bytes per element the selection must read once.
//!
//! Run: `cargo bench -p kernels-benches --bench select && python3 benches/medians.py select`

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kernels_benches::{bench_stream_read, heavy_tailed};
use kernels_cpu::prelude::*;

const SIZES: [usize; 3] = [1_000_000, 10_000_000, 100_000_000];
const DENSITIES: [(f64, &str); 3] = [(0.01, "1pc"), (0.1, "10pc"), (0.5, "50pc")];

fn select(c: &mut Criterion) {
    let cpu = Cpu::detect();
    let threads = format!("{}t", cpu.threads());
    bench_stream_read(c, "select/stream", &cpu);

    let mut group = c.benchmark_group("select/f32");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for n in SIZES {
        // Task-vector-like data: many small entries, a heavy tail, few exact ties.
        let x = heavy_tailed(n, 1e-3, n as u64);
        let mut mask = vec![0u64; n.div_ceil(64)];
        let mut indices = Vec::new();
        group.throughput(Throughput::Bytes((n * 4) as u64));
        for (density, name) in DENSITIES {
            let k = (density * n as f64) as u64;
            group.bench_function(
                BenchmarkId::new(format!("kth_n{n}_k{name}"), &threads),
                |b| b.iter(|| kth_largest_magnitude(&cpu, &[&x[..]], k).expect("kth")),
            );
            group.bench_function(
                BenchmarkId::new(format!("mask_n{n}_k{name}"), &threads),
                |b| b.iter(|| topk_mask(&cpu, &x, KeepRule::Count(k), &mut mask).expect("mask")),
            );
            // Into the caller's vector, reused from one call to the next.
            group.bench_function(
                BenchmarkId::new(format!("indices_n{n}_k{name}"), &threads),
                |b| {
                    b.iter(|| {
                        topk_indices(&cpu, &[&x[..]], KeepRule::Count(k), &mut indices)
                            .expect("indices");
                    });
                },
            );
            group.bench_function(
                BenchmarkId::new(format!("select_nth_unstable_n{n}_k{name}"), "1t"),
                |b| {
                    b.iter(|| {
                        let mut copy: Vec<f32> = x.iter().map(|v| v.abs()).collect();
                        let (_, kth, _) =
                            copy.select_nth_unstable_by(n - k as usize, f32::total_cmp);
                        *kth
                    });
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, select);
criterion_main!(benches);
