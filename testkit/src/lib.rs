//! What the test suites of the kernel crates share: data generators, edge shapes, tolerance
//! scales and comparisons, the test bodies every backend runs (GEMV, MLP, reductions), the
//! per-ISA and per-GPU-variant test macros.
//!
//! Not published: the kernel crates' tests depend on it from the workspace, so the packaged crates
//! carry no `#[path]` reaching outside their own directory.
#![allow(missing_docs, clippy::missing_panics_doc, clippy::must_use_candidate)]

use kernels_core::{CounterRng, Element, MatRef};

/// The root README's programs ("Using it from your crate"), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct RootReadmeDoctests;

pub mod gemv;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod linalg;
pub mod merge;
pub mod mlp;
pub use kernels_cpu::{Cpu, Isa};

/// Thread counts every body runs with: results must be bit-identical across them.
pub const THREAD_COUNTS: [usize; 3] = [1, 2, 3];

/// Runs `body` on `isa` (skipping, loudly, an ISA this machine lacks) for every thread count,
/// on two threads of the spinning team, and on three that stream every output past the caches.
pub fn run_on(isa: Isa, body: fn(&Cpu)) {
    match Cpu::with_isa(isa) {
        Ok(cpu) => {
            for threads in THREAD_COUNTS {
                // Split even tiny problems, so the threaded paths run on test sizes.
                body(
                    &cpu.with_threads(threads)
                        .expect("threads")
                        .with_min_bytes_per_thread(1),
                );
            }
            // And on the spinning team, which splits the same way on other threads.
            body(
                &cpu.with_threads(2)
                    .expect("threads")
                    .with_spinning_team()
                    .with_min_bytes_per_thread(1),
            );
            // And writing every output past the caches, on parts that start anywhere.
            body(
                &cpu.with_threads(3)
                    .expect("threads")
                    .with_min_bytes_per_thread(1)
                    .with_streaming_stores_from(0),
            );
        }
        Err(_) => eprintln!("skipped: {isa} is not available on this machine"),
    }
}

/// One `#[test]` per instruction set for each listed body, so a failure names its ISA.
#[macro_export]
macro_rules! isa_tests {
    ($($name:ident),* $(,)?) => {
        mod avx512 { $( #[test] fn $name() { $crate::run_on($crate::Isa::Avx512, super::$name) } )* }
        mod avx2 { $( #[test] fn $name() { $crate::run_on($crate::Isa::Avx2, super::$name) } )* }
        mod neon { $( #[test] fn $name() { $crate::run_on($crate::Isa::Neon, super::$name) } )* }
        mod scalar { $( #[test] fn $name() { $crate::run_on($crate::Isa::Scalar, super::$name) } )* }
    };
}

/// Normal draws as `T`.
pub fn normal<T: Element>(n: usize, seed: u64) -> Vec<T> {
    let rng = CounterRng::new(seed);
    (0..n as u64)
        .map(|i| T::from_f32(rng.normal_at(i) as f32))
        .collect()
}

/// Shapes every GEMV is tried on: empty, one, around every vector width, primes, and real layers.
pub const EDGE_DIMS: [usize; 14] = [0, 1, 3, 4, 5, 15, 16, 17, 31, 33, 63, 65, 97, 131];

/// `sum_j |w[i, j] x_j|` per row: the scale of GEMV rounding errors.
pub fn abs_sums<T: Element>(w: MatRef<'_, T>, x: &[f32]) -> Vec<f64> {
    w.row_iter()
        .map(|row| {
            row.iter()
                .zip(x)
                .map(|(w, x)| (f64::from(w.to_f32()) * f64::from(*x)).abs())
                .sum()
        })
        .collect()
}

/// Asserts `got` within `tolerance(i)` of `expect` element-wise, NaN matching NaN (and an
/// infinity only itself).
pub fn assert_close(what: &str, got: &[f32], expect: &[f32], tolerance: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), expect.len(), "{what}: lengths");
    for (i, (g, e)) in got.iter().zip(expect).enumerate() {
        if e.is_nan() {
            assert!(g.is_nan(), "{what}[{i}]: {g} but the reference is NaN");
            continue;
        }
        if g == e {
            continue;
        }
        let err = (f64::from(*g) - f64::from(*e)).abs();
        assert!(
            err <= tolerance(i),
            "{what}[{i}]: {g} vs reference {e} (error {err:e} > {:e})",
            tolerance(i)
        );
    }
}

/// The bits of each value, for exact comparisons.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// Few distinct magnitudes of both signs, exact zeros of both signs: ties everywhere.
pub fn tied<T: Element>(n: usize, seed: u64) -> Vec<T> {
    let rng = CounterRng::new(seed);
    (0..n as u64)
        .map(|i| {
            let v = (rng.u32_at(i) % 9) as f32 * 0.25 - 1.0;
            T::from_f32(if rng.u32_at(i + n as u64).is_multiple_of(7) {
                -v
            } else {
                v
            })
        })
        .collect()
}

/// The k every selection is tried with: 0, 1, 1 %, 10 %, half, all but one, all.
pub fn ks(n: usize) -> Vec<u64> {
    let n = n as u64;
    let mut ks = vec![0, 1, n / 100, n / 10, n / 2, n.saturating_sub(1), n];
    ks.retain(|&k| k <= n);
    ks.dedup();
    ks
}

/// Trimmed-looking task vectors: zeros, ties of magnitude, both signs, and a few non-finite.
pub fn sparse_taus<T: Element>(n: usize, seed: u64, specials: bool) -> Vec<T> {
    let rng = CounterRng::new(seed);
    (0..n as u64)
        .map(|i| {
            let v = match rng.u32_at(i) % 7 {
                0 | 1 => 0.0,
                2 => 0.5,
                3 => -0.5,
                _ => rng.normal_at(i + 1000) as f32,
            };
            let v = match (specials, i % 97) {
                (true, 13) => f32::NAN,
                (true, 41) => f32::INFINITY,
                _ => v,
            };
            T::from_f32(v)
        })
        .collect()
}

/// Ternary codes with density `density`, half of them -1.
pub fn random_codes(n: usize, density: f64, seed: u64) -> Vec<i8> {
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

/// Task-vector-like values with exact zeros and repeated magnitudes; `offset` shifts the normal
/// draws (a mean far from zero stresses the moments).
pub fn task_vector<T: Element>(n: usize, seed: u64, offset: f32) -> Vec<T> {
    let rng = CounterRng::new(seed);
    (0..n as u64)
        .map(|i| match rng.u32_at(i) % 5 {
            0 => T::from_f32(0.0),
            1 => T::from_f32(if i % 2 == 0 { 0.5 } else { -0.5 }),
            _ => T::from_f32(rng.normal_at(i + 7) as f32 + offset),
        })
        .collect()
}
