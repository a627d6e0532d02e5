//! Dense and sparse-input GEMV, the CATS/TEAL MLP and decode attention (beside the plain loop the
//! decoder used before it) at Llama-2-7B and SmolLM2-135M sizes,
//! cold (weights rotated over >= 1.5 GiB of copies, as each layer's weights pass once per token in
//! decoding) and hot (one matrix), with STREAM read bandwidth measured in the same run.
//!
//! Run: `cargo bench -p kernels-benches --bench gemv && python3 benches/medians.py`
//! Filter, e.g.: `cargo bench -p kernels-benches --bench gemv -- 'gemv/llama'`

use std::time::Duration;

use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
    measurement::WallTime,
};
use half::bf16;
use kernels_benches::{
    LLAMA2_7B, MlpShape, SMOLLM2_135M, normal, stream_read, threshold_for_sparsity,
};
use kernels_cpu::prelude::*;

/// Cold working sets span at least this much memory (the L3 is ~300 MiB).
const COLD_BYTES: usize = 1536 << 20;
const SPARSITIES: [f64; 4] = [0.0, 0.5, 0.7, 0.9];

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
}

fn threads() -> [usize; 2] {
    [1, 2]
}

fn stream(c: &mut Criterion) {
    let cpu = Cpu::detect();
    let mut group = c.benchmark_group("stream");
    configure(&mut group);
    let buffer = vec![1.0f32; (1 << 30) / 4];
    group.throughput(Throughput::Bytes(1 << 30));
    for t in threads() {
        group.bench_function(BenchmarkId::new("read_1GiB", format!("{t}t")), |b| {
            b.iter(|| stream_read(&cpu, &buffer, t));
        });
    }
}

/// `copies` matrices of `rows x cols` weights, enough to span `COLD_BYTES` (or one, for hot).
fn matrices<T: Element>(rows: usize, cols: usize, cold: bool) -> Vec<Vec<T>> {
    let bytes = rows * cols * T::DTYPE.size_bytes();
    let copies = if cold {
        COLD_BYTES.div_ceil(bytes).max(2)
    } else {
        1
    };
    (0..copies)
        .map(|k| normal::<T>(rows * cols, 0.02, k as u64))
        .collect()
}

fn gemv_family<T: Element>(c: &mut Criterion, shape: MlpShape, cold: bool) {
    let cpu = Cpu::detect();
    let temp = if cold { "cold" } else { "hot" };
    let mut group = c.benchmark_group(format!("gemv/{}/{temp}/{}", shape.name, T::DTYPE.name()));
    configure(&mut group);
    // Dense W_gate [inter, hidden] and sparse-input W_down_t [inter, hidden] (x of length inter).
    let (inter, hidden) = (shape.intermediate, shape.hidden);
    let weights = matrices::<T>(inter, hidden, cold);
    let bytes = (inter * hidden * T::DTYPE.size_bytes()) as u64;
    let x = normal::<f32>(hidden, 1.0, 99);
    let h = normal::<f32>(inter, 1.0, 98);
    let mut y_inter = vec![0.0f32; inter];
    let mut y_hidden = vec![0.0f32; hidden];
    for t in threads() {
        let cpu = cpu.with_threads(t).expect("threads");
        group.throughput(Throughput::Bytes(bytes));
        let mut k = 0;
        group.bench_function(BenchmarkId::new("dense", format!("{t}t")), |b| {
            b.iter(|| {
                k += 1;
                let w =
                    MatRef::from_slice(&weights[k % weights.len()], inter, hidden).expect("shape");
                gemv(&cpu, w, &x, &mut y_inter).expect("gemv");
            });
        });
        for s in SPARSITIES {
            let threshold = threshold_for_sparsity(&h, s);
            // Bytes actually read: the active rows.
            group.throughput(Throughput::Bytes(((1.0 - s) * bytes as f64) as u64));
            let mut k = 0;
            group.bench_function(
                BenchmarkId::new(format!("sparse_input_s{s}"), format!("{t}t")),
                |b| {
                    b.iter(|| {
                        k += 1;
                        let w_t = MatRef::from_slice(&weights[k % weights.len()], inter, hidden)
                            .expect("shape");
                        sparse_input_gemv(&cpu, w_t, &h, threshold, &mut y_hidden).expect("sparse");
                    });
                },
            );
        }
    }
}

fn mlp_family<T: Element>(c: &mut Criterion, shape: MlpShape) {
    let cpu = Cpu::detect();
    let mut group = c.benchmark_group(format!("mlp/{}/cold/{}", shape.name, T::DTYPE.name()));
    configure(&mut group);
    let (inter, hidden) = (shape.intermediate, shape.hidden);
    let layer_bytes = 3 * inter * hidden * T::DTYPE.size_bytes();
    let layers = COLD_BYTES
        .div_ceil(layer_bytes)
        .clamp(2, shape.layers.max(2));
    let layers: Vec<[Vec<T>; 3]> = (0..layers)
        .map(|l| {
            [0, 1, 2].map(|p| {
                normal::<T>(
                    inter * hidden,
                    1.0 / (hidden as f32).sqrt(),
                    (l * 3 + p) as u64,
                )
            })
        })
        .collect();
    let x = normal::<f32>(hidden, 1.0, 97);
    let mut y = vec![0.0f32; hidden];
    // One scratch for every call, as a decode loop keeps it.
    let mut scratch = MlpScratch::new();
    // CATS thresholds from the first layer's gate activations.
    let mut g = vec![0.0f32; inter];
    gemv(
        &cpu,
        MatRef::from_slice(&layers[0][0], inter, hidden).expect("shape"),
        &x,
        &mut g,
    )
    .expect("gemv");
    let a: Vec<f32> = g
        .iter()
        .map(|&g| kernels_core::ops::sparse::silu_f32(g))
        .collect();
    group.throughput(Throughput::Bytes(layer_bytes as u64));
    for t in threads() {
        let cpu = cpu.with_threads(t).expect("threads");
        for s in SPARSITIES {
            let threshold = if s == 0.0 {
                -1.0
            } else {
                threshold_for_sparsity(&a, s)
            };
            let mut k = 0;
            group.bench_function(
                BenchmarkId::new(format!("cats_s{s}"), format!("{t}t")),
                |b| {
                    b.iter(|| {
                        k += 1;
                        let [gate, up, down_t] = &layers[k % layers.len()];
                        let weights = CatsMlpWeights {
                            gate: MatRef::from_slice(gate, inter, hidden).expect("shape"),
                            up: MatRef::from_slice(up, inter, hidden).expect("shape"),
                            down_t: MatRef::from_slice(down_t, inter, hidden).expect("shape"),
                        };
                        let xm = MatRef::from_slice(&x, 1, hidden).expect("shape");
                        cats_mlp(
                            &cpu,
                            xm,
                            weights,
                            threshold,
                            MatMut::from_slice(&mut y, 1, hidden).expect("shape"),
                            &mut scratch,
                        )
                        .expect("mlp");
                    });
                },
            );
        }
        // TEAL at 50 % input sparsity on every projection (gate/up read transposed).
        let t_x = threshold_for_sparsity(&x, 0.5);
        let mut k = 0;
        group.bench_function(BenchmarkId::new("teal_s0.5", format!("{t}t")), |b| {
            b.iter(|| {
                k += 1;
                let [gate_t, up_t, down_t] = &layers[k % layers.len()];
                let weights = TealMlpWeights {
                    gate_t: MatRef::from_slice(gate_t, hidden, inter).expect("shape"),
                    up_t: MatRef::from_slice(up_t, hidden, inter).expect("shape"),
                    down_t: MatRef::from_slice(down_t, inter, hidden).expect("shape"),
                };
                let xm = MatRef::from_slice(&x, 1, hidden).expect("shape");
                teal_mlp(
                    &cpu,
                    xm,
                    weights,
                    TealThresholds::new(t_x, 0.05),
                    MatMut::from_slice(&mut y, 1, hidden).expect("shape"),
                    &mut scratch,
                )
                .expect("mlp");
            });
        });
    }
}

/// Decode attention over `positions` cached f32 keys and values (`kernels-llm`'s cache), beside
/// the plain Rust loop the decoder ran before (scalar dot, softmax, AXPY per head); cold where
/// the cache passes the L3 (copies rotated, as each layer's cache is read once per token).
fn attention_family(c: &mut Criterion, name: &str, heads: AttentionHeads, positions: usize) {
    let kv = heads.kv_width();
    let bytes = 2 * positions * kv * 4;
    let copies = if bytes > (64 << 20) {
        COLD_BYTES.div_ceil(bytes)
    } else {
        1
    };
    let caches: Vec<(Vec<f32>, Vec<f32>)> = (0..copies as u64)
        .map(|k| {
            (
                normal(positions * kv, 1.0, 2 * k),
                normal(positions * kv, 1.0, 2 * k + 1),
            )
        })
        .collect();
    let q = normal::<f32>(heads.query_width(), 1.0, 99);
    let scale = 1.0 / (heads.head_dim as f32).sqrt();
    let mut out = vec![0.0f32; heads.query_width()];
    let mut group = c.benchmark_group(format!("attention/{name}_p{positions}"));
    configure(&mut group);
    group.throughput(Throughput::Bytes(bytes as u64));
    for t in threads() {
        let cpu = Cpu::detect().with_threads(t).unwrap().with_spinning_team();
        let mut k = 0;
        group.bench_function(BenchmarkId::new("ours", format!("{t}t")), |b| {
            b.iter(|| {
                let (keys, values) = &caches[k % copies];
                k += 1;
                let keys = MatRef::from_slice(keys, positions, kv).unwrap();
                let values = MatRef::from_slice(values, positions, kv).unwrap();
                attention(&cpu, heads, &q, keys, values, scale, &mut out).unwrap();
            });
        });
    }
    let mut scores = vec![0.0f32; positions];
    let mut k = 0;
    group.bench_function(BenchmarkId::new("naive", "1t"), |b| {
        b.iter(|| {
            let (keys, values) = &caches[k % copies];
            k += 1;
            naive_attention(heads, &q, keys, values, scale, &mut scores, &mut out);
        });
    });
}

/// The decoder's attention before `kernels_cpu::attention`: per head, scalar dots, a two-pass
/// softmax, then an AXPY per position.
fn naive_attention(
    heads: AttentionHeads,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (d, kv) = (heads.head_dim, heads.kv_width());
    for h in 0..heads.heads {
        let q = &q[h * d..(h + 1) * d];
        let g = heads.kv_head_of(h) * d;
        for (t, s) in scores.iter_mut().enumerate() {
            let k = &keys[t * kv + g..][..d];
            *s = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let out = &mut out[h * d..(h + 1) * d];
        out.fill(0.0);
        for (t, &p) in scores.iter().enumerate() {
            for (o, v) in out.iter_mut().zip(&values[t * kv + g..][..d]) {
                *o += p / sum * v;
            }
        }
    }
}

fn llama(c: &mut Criterion) {
    stream(c);
    gemv_family::<f32>(c, LLAMA2_7B, true);
    gemv_family::<bf16>(c, LLAMA2_7B, true);
    gemv_family::<f32>(c, LLAMA2_7B, false);
    gemv_family::<bf16>(c, LLAMA2_7B, false);
    mlp_family::<f32>(c, LLAMA2_7B);
    mlp_family::<bf16>(c, LLAMA2_7B);
    let heads = AttentionHeads {
        heads: 32,
        kv_heads: 32,
        head_dim: 128,
    };
    attention_family(c, "llama2_7b", heads, 2048);
}

fn smollm(c: &mut Criterion) {
    gemv_family::<f32>(c, SMOLLM2_135M, true);
    gemv_family::<bf16>(c, SMOLLM2_135M, true);
    mlp_family::<f32>(c, SMOLLM2_135M);
    mlp_family::<bf16>(c, SMOLLM2_135M);
    let heads = AttentionHeads {
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
    };
    attention_family(c, "smollm2_135m", heads, 165);
}

criterion_group!(benches, llama, smollm);
criterion_main!(benches);
