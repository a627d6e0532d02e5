//! Shared pieces of the CPU test suites: data, tolerances and the per-ISA test macro.
#![allow(dead_code, unreachable_pub)]

use kernels_core::{CounterRng, Element, MatRef};

pub mod mlp;
use kernels_cpu::{Cpu, Isa};

/// Thread counts every body runs with: results must be bit-identical across them.
pub const THREAD_COUNTS: [usize; 3] = [1, 2, 3];

/// Runs `body` on `isa` (skipping, loudly, an ISA this machine lacks) for every thread count.
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
        }
        Err(_) => eprintln!("skipped: {isa} is not available on this machine"),
    }
}

/// One `#[test]` per instruction set for each listed body, so a failure names its ISA.
#[macro_export]
macro_rules! isa_tests {
    ($($name:ident),* $(,)?) => {
        mod avx512 { $( #[test] fn $name() { $crate::common::run_on(kernels_cpu::Isa::Avx512, super::$name) } )* }
        mod avx2 { $( #[test] fn $name() { $crate::common::run_on(kernels_cpu::Isa::Avx2, super::$name) } )* }
        mod neon { $( #[test] fn $name() { $crate::common::run_on(kernels_cpu::Isa::Neon, super::$name) } )* }
        mod scalar { $( #[test] fn $name() { $crate::common::run_on(kernels_cpu::Isa::Scalar, super::$name) } )* }
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

/// Asserts `got` within `tolerance(i)` of `expect` element-wise, NaN matching NaN.
pub fn assert_close(what: &str, got: &[f32], expect: &[f32], tolerance: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), expect.len(), "{what}: lengths");
    for (i, (g, e)) in got.iter().zip(expect).enumerate() {
        if e.is_nan() {
            assert!(g.is_nan(), "{what}[{i}]: {g} but the reference is NaN");
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
