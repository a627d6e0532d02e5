//! Memory-bound reference points: STREAM-style read bandwidth (all cores) and `sum_squares` (one
//! thread and all).
//!
//! Working sets are 1 GiB, far beyond this machine's ~300 MiB L3, so every pass streams from DRAM.
//! Run: `cargo bench -p kernels-benches --bench bandwidth`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;
use kernels_benches::stream_read;
use kernels_cpu::{Cpu, merge::sum_squares};

const WORKING_SET_BYTES: usize = 1 << 30;

fn bandwidth(c: &mut Criterion) {
    let cpu = Cpu::detect();
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut group = c.benchmark_group("bandwidth");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(WORKING_SET_BYTES as u64));

    let f32_data = vec![0.5f32; WORKING_SET_BYTES / 4];
    group.bench_function(
        BenchmarkId::new("stream_read", format!("{threads}t")),
        |b| {
            b.iter(|| stream_read(&cpu, &f32_data, threads));
        },
    );
    let single = cpu.with_threads(1).expect("one thread");
    for cpu in [single, cpu] {
        group.bench_function(
            BenchmarkId::new(
                "sum_squares_f32",
                format!("{}t/{}", cpu.threads(), cpu.isa()),
            ),
            |b| {
                b.iter(|| sum_squares(&cpu, &f32_data).unwrap());
            },
        );
    }
    drop(f32_data);
    let bf16_data = vec![bf16::from_f32(0.5); WORKING_SET_BYTES / 2];
    for cpu in [single, cpu] {
        group.bench_function(
            BenchmarkId::new(
                "sum_squares_bf16",
                format!("{}t/{}", cpu.threads(), cpu.isa()),
            ),
            |b| {
                b.iter(|| sum_squares(&cpu, &bf16_data).unwrap());
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bandwidth);
criterion_main!(benches);
