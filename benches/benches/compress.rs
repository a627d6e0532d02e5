//! ComPEFT compression of a task vector at 1e6, 1e7 and 1e8 parameters (density 0.1, both
//! layouts), validating packed bytes, packed decode, ternary GEMV straight from the packed form
//! and decompress-and-add,
//! with STREAM read bandwidth in the same run. Before the timings it prints the packed format's
//! bits per parameter at densities 0.05, 0.1, 0.2 and 0.5 next to the entropy bound.
//!
//! Throughput counts the task vector read once (`4 n` bytes for compression), the packed bytes
//! read and the codes or weights written (decode, add), and the packed weights read (GEMV).
//!
//! Run: `cargo bench -p kernels-benches --bench compress && python3 benches/medians.py compress`

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;
use kernels_benches::{bench_stream_read, heavy_tailed};
use kernels_cpu::CounterRng;
use kernels_cpu::format::{self, entropy_bits_per_param};
use kernels_cpu::prelude::*;

const SIZES: [usize; 3] = [1_000_000, 10_000_000, 100_000_000];
const LAYOUTS: [(TernaryLayout, &str); 2] = [
    (TernaryLayout::Dense2Bit, "dense"),
    (TernaryLayout::SparseRice, "rice"),
];

/// Codes with i.i.d. positions at `density` and random signs.
fn codes(n: usize, density: f64, seed: u64) -> Vec<i8> {
    let rng = CounterRng::new(seed);
    (0..n as u64)
        .map(|i| {
            let u = f64::from(rng.uniform_at(i));
            if u < density / 2.0 {
                -1
            } else {
                i8::from(u < density)
            }
        })
        .collect()
}

fn print_bits_per_param() {
    println!(
        "packed ternary, 1e7 parameters: bits per parameter (sparse Rice, dense 2-bit) vs entropy"
    );
    for density in [0.05, 0.1, 0.2, 0.5] {
        let c = codes(10_000_000, density, 1);
        let size = |layout| {
            let bytes = format::encode(&c, &[c.len() as u64], 1.0, layout).expect("encode");
            format::TernaryHeader::parse(&bytes)
                .expect("parse")
                .bits_per_param()
        };
        let (rice, dense) = (
            size(TernaryLayout::SparseRice),
            size(TernaryLayout::Dense2Bit),
        );
        let bound = entropy_bits_per_param(density);
        println!(
            "density {density:4}: rice {rice:.4} ({:+.1} % of the bound), dense {dense:.4}, entropy bound {bound:.4}",
            (rice / bound - 1.0) * 100.0
        );
    }
}

fn compress(c: &mut Criterion) {
    print_bits_per_param();
    let cpu = Cpu::detect();
    let threads = format!("{}t", cpu.threads());
    bench_stream_read(c, "compress/stream", &cpu);

    let mut group = c.benchmark_group("compress/f32");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for n in SIZES {
        let tau = heavy_tailed(n, 1e-3, n as u64);
        let shape = [n as u64];
        let params = CompeftParams::default().with_keep(KeepRule::Density(0.1));
        group.throughput(Throughput::Bytes((n * 4) as u64));
        for (layout, name) in LAYOUTS {
            group.bench_function(
                BenchmarkId::new(format!("compeft_{name}_n{n}"), &threads),
                |b| {
                    b.iter(|| {
                        compeft(&cpu, &[(&tau[..], &shape[..])], params, layout).expect("compeft")
                    });
                },
            );
        }
        let c = codes(n, 0.1, 3);
        let rows = n / 10_000;
        for (layout, name) in LAYOUTS {
            let bytes = format::encode(&c, &[rows as u64, 10_000], 0.01, layout).expect("encode");
            // Validated once, as a user would hold it; each op then reads it as it is.
            let packed = PackedTernary::new(&cpu, &bytes).expect("valid");
            let mut out = vec![0i8; n];
            group.throughput(Throughput::Bytes((bytes.len() + n) as u64));
            group.bench_function(
                BenchmarkId::new(format!("decode_{name}_n{n}"), &threads),
                |b| {
                    b.iter(|| ternary_codes(&cpu, &packed, &mut out).expect("decode"));
                },
            );
            group.bench_function(
                BenchmarkId::new(format!("validate_{name}_n{n}"), &threads),
                |b| {
                    b.iter(|| PackedTernary::new(&cpu, &bytes).expect("valid"));
                },
            );
            let x = vec![0.5f32; 10_000];
            let mut y = vec![0.0f32; rows];
            group.throughput(Throughput::Bytes(bytes.len() as u64));
            group.bench_function(
                BenchmarkId::new(format!("gemv_{name}_n{n}"), &threads),
                |b| {
                    b.iter(|| ternary_gemv(&cpu, &packed, &x, &mut y).expect("gemv"));
                },
            );
            let mut theta = vec![bf16::from_f32(0.5); n];
            group.throughput(Throughput::Bytes((bytes.len() + 4 * n) as u64));
            group.bench_function(
                BenchmarkId::new(format!("add_bf16_{name}_n{n}"), &threads),
                |b| {
                    b.iter(|| ternary_add(&cpu, &mut theta, &packed, 1e-3).expect("add"));
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, compress);
criterion_main!(benches);
