//! Shared pieces of the benchmarks and the tour: synthetic Llama-shaped data, the STREAM-style
//! read-bandwidth reference, and timing helpers that report medians.

use std::time::{Duration, Instant};

use kernels_core::{CounterRng, Element};
use kernels_cpu::{Cpu, Simd, WithSimd};

/// Shapes of a decoder MLP layer.
#[derive(Clone, Copy, Debug)]
pub struct MlpShape {
    /// Model name, for reports.
    pub name: &'static str,
    /// Hidden size.
    pub hidden: usize,
    /// Intermediate (MLP) size.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
}

/// SmolLM2-135M: hidden 576, intermediate 1536, 30 layers.
pub const SMOLLM2_135M: MlpShape = MlpShape {
    name: "SmolLM2-135M",
    hidden: 576,
    intermediate: 1536,
    layers: 30,
};
/// Llama-2-7B: hidden 4096, intermediate 11008, 32 layers.
pub const LLAMA2_7B: MlpShape = MlpShape {
    name: "Llama-2-7B",
    hidden: 4096,
    intermediate: 11008,
    layers: 32,
};

/// Cheap deterministic data in `[-0.5, 0.5]` for element-wise kernels, whose speed the values
/// do not change; `seed` shifts the pattern between models.
#[must_use]
pub fn cheap_data<T: Element>(n: usize, seed: usize) -> Vec<T> {
    (0..n)
        .map(|i| T::from_f32(((i * 7 + seed * 13) % 101) as f32 * 0.01 - 0.5))
        .collect()
}

/// `n` draws of `N(0, scale^2)` from the counter-based generator, as `T`.
#[must_use]
pub fn normal<T: Element>(n: usize, scale: f32, seed: u64) -> Vec<T> {
    let rng = CounterRng::new(seed);
    (0..n as u64)
        .map(|i| T::from_f32(rng.normal_at(i) as f32 * scale))
        .collect()
}

/// Heavy-tailed draws shaped like post-SiLU activations or task vectors: a normal times an
/// independent normal, so most entries are small and a few are large.
#[must_use]
pub fn heavy_tailed(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let (a, b) = (
        CounterRng::new(seed),
        CounterRng::new(seed ^ 0x9E37_79B9_7F4A_7C15),
    );
    (0..n as u64)
        .map(|i| (a.normal_at(i) * b.normal_at(i)) as f32 * scale)
        .collect()
}

/// The threshold at which a fraction `sparsity` of `values` is inactive (`|v| <= t`): the
/// `sparsity`-quantile of `|values|`, or a negative threshold (dense) at 0.
#[must_use]
pub fn threshold_for_sparsity(values: &[f32], sparsity: f64) -> f32 {
    if sparsity <= 0.0 {
        return -1.0;
    }
    kernels_core::ops::sparse::calibrate_threshold_ref(&[values], sparsity).expect("finite samples")
}

/// Median of `runs` timings of `f` (after one warm-up call).
pub fn median_time(runs: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut times: Vec<Duration> = (0..runs.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// Decimal gigabytes per second.
#[must_use]
pub fn gb_per_s(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e9
}

/// Sequential streams each thread reads at once, and accumulators per stream: several streams
/// keep more hardware prefetchers busy than one (a 4-row GEMV reads four), and two accumulators per
/// stream hide the add latency.
const STREAMS_PER_THREAD: usize = 4;

/// Entries (64 KiB and one 64-byte line) between the end of one stream and the start of the next.
/// Streams a power of two apart conflict: on the Zen 4 VM four streams 256 MiB apart (a 1 GiB
/// buffer on one thread) read 13.9 to 15 GB/s, skewed so 21 to 27 GB/s, as four streams of a
/// 1e9-byte buffer do; a skew of one line only gave 15 GB/s.
const STREAM_SKEW: usize = 16400;

struct ReadSum<'a>(&'a [f32]);

impl WithSimd for ReadSum<'_> {
    type Output = f32;

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> f32 {
        let lanes = S::LANES;
        let step = 2 * lanes;
        let n = self.0.len();
        let len =
            n.saturating_sub((STREAMS_PER_THREAD - 1) * STREAM_SKEW) / STREAMS_PER_THREAD / step
                * step;
        let stride = if len == 0 { 0 } else { len + STREAM_SKEW };
        let streams: [&[f32]; STREAMS_PER_THREAD] =
            core::array::from_fn(|k| &self.0[k * stride..k * stride + len]);
        let mut acc = [[s.zero(); 2]; STREAMS_PER_THREAD];
        let mut c = 0;
        while c < len {
            for (a, stream) in acc.iter_mut().zip(&streams) {
                a[0] = s.add(a[0], s.load(&stream[c..c + lanes]));
                a[1] = s.add(a[1], s.load(&stream[c + lanes..c + step]));
            }
            c += step;
        }
        let total = acc.iter().flatten().fold(s.zero(), |t, a| s.add(t, *a));
        // What the streams skipped: the skews between them and the end.
        let rest: f32 = (0..STREAMS_PER_THREAD)
            .map(|k| {
                let end = if k + 1 < STREAMS_PER_THREAD {
                    (k + 1) * stride
                } else {
                    n
                };
                self.0[k * stride + len..end].iter().sum::<f32>()
            })
            .sum();
        s.reduce_sum(total) + rest
    }
}

/// The STREAM-style read bandwidth reference: every thread sums its contiguous share of `buffer`
/// with several independent vector accumulators. Returns the sum, so nothing is optimised away.
#[must_use]
pub fn stream_read(cpu: &Cpu, buffer: &[f32], threads: usize) -> f32 {
    let threads = threads.max(1);
    let share = buffer.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = buffer
            .chunks(share)
            .map(|part| scope.spawn(move || cpu.dispatch(ReadSum(part))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("stream thread panicked"))
            .sum()
    })
}

/// Median STREAM read bandwidth in GB/s over a buffer of `bytes`, using every core.
#[must_use]
pub fn measure_stream_read(cpu: &Cpu, bytes: usize, runs: usize) -> f64 {
    let buffer = vec![1.0f32; bytes / 4];
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let time = median_time(runs, || {
        std::hint::black_box(stream_read(cpu, &buffer, threads));
    });
    gb_per_s(buffer.len() * 4, time)
}

/// Benchmarks the STREAM-style read of 1 GiB on all of `cpu`'s threads as `{group}/read_1GiB`, the
/// reference each bench's GB/s are compared with in the same run.
pub fn bench_stream_read(c: &mut criterion::Criterion, group: &str, cpu: &Cpu) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    let buffer = vec![1.0f32; (1 << 30) / 4];
    g.throughput(criterion::Throughput::Bytes(1 << 30));
    g.bench_function(
        criterion::BenchmarkId::new("read_1GiB", format!("{}t", cpu.threads())),
        |b| b.iter(|| stream_read(cpu, &buffer, cpu.threads())),
    );
    g.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_read_sums_everything_on_every_isa() {
        // Shorter and longer than the skews between streams; every partial sum is an integer
        // below 2^24, so exact in any order.
        for len in [10_007, 3 * STREAM_SKEW + 100_003] {
            let buffer: Vec<f32> = (0..len).map(|i| (i % 3) as f32).collect();
            let expect: f32 = buffer.iter().sum();
            for cpu in Cpu::all_available() {
                for threads in [1, 2, 3] {
                    assert_eq!(
                        stream_read(&cpu, &buffer, threads),
                        expect,
                        "{} threads={threads} len={len}",
                        cpu.isa()
                    );
                }
            }
        }
    }
}
