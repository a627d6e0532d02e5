//! Whole-slice reductions.

use crate::{Cpu, Simd, WithSimd};
use kernels_core::Element;

/// Elements summed in `f32` lanes before the partial sum is added to the `f64` total.
///
/// PERF: `f32` lanes keep the loop at full vector width; flushing every block into `f64` bounds
/// the error by the block, not by the slice length (see [`SUM_SQUARES_RELATIVE_TOLERANCE`]).
pub const SUM_SQUARES_BLOCK: usize = 4096;

/// Independent accumulators per vector lane: enough to hide the FMA latency.
const ACCUMULATORS: usize = 4;

/// Relative error bound of [`sum_squares`] against exact arithmetic on the widened inputs.
///
/// Terms are non-negative, so each `f32` accumulator of at most `SUM_SQUARES_BLOCK / 4 + 1`
/// terms has relative error below `(terms + 1) u` with `u = 2^-24`, the lane and accumulator
/// reduction adds `log2(64) + 1` roundings, and the `f64` totals add a negligible amount.
pub const SUM_SQUARES_RELATIVE_TOLERANCE: f64 =
    (SUM_SQUARES_BLOCK / ACCUMULATORS + 2 + 7) as f64 * (f32::EPSILON as f64 / 2.0);

struct SumSquares<'a, T>(&'a [T]);

impl<T: Element> WithSimd for SumSquares<'_, T> {
    type Output = f64;

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> f64 {
        let mut total = 0.0f64;
        for block in self.0.chunks(SUM_SQUARES_BLOCK) {
            let mut acc = [s.zero(); ACCUMULATORS];
            let mut groups = block.chunks_exact(ACCUMULATORS * S::LANES);
            for group in &mut groups {
                for (a, lane) in acc.iter_mut().zip(group.chunks_exact(S::LANES)) {
                    let v = s.load(lane);
                    *a = s.mul_add(v, v, *a);
                }
            }
            let mut tail = 0.0f32;
            for x in groups.remainder() {
                let v = x.to_f32();
                tail += v * v;
            }
            let lanes = s.add(s.add(acc[0], acc[1]), s.add(acc[2], acc[3]));
            total += f64::from(s.reduce_sum(lanes)) + f64::from(tail);
        }
        total
    }
}

/// `sum x^2`, the fast twin of [`kernels_core::ops::merge::sum_squares_ref`]: within
/// [`SUM_SQUARES_RELATIVE_TOLERANCE`] of it (NaN and infinity propagate).
#[must_use]
pub fn sum_squares<T: Element>(cpu: &Cpu, x: &[T]) -> f64 {
    cpu.dispatch(SumSquares(x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use half::{bf16, f16};
    use kernels_core::CounterRng;
    use kernels_core::ops::merge::sum_squares_ref;
    use proptest::prelude::*;

    fn check<T: Element>(x: &[T]) {
        let expect = sum_squares_ref(x);
        for cpu in Cpu::all_available() {
            let got = sum_squares(&cpu, x);
            assert!(
                (got - expect).abs() <= SUM_SQUARES_RELATIVE_TOLERANCE * expect,
                "{} {:?} n={}: {got} vs {expect}",
                cpu.isa(),
                T::DTYPE,
                x.len()
            );
        }
    }

    fn data<T: Element>(n: usize, seed: u64) -> Vec<T> {
        let rng = CounterRng::new(seed);
        (0..n as u64)
            .map(|i| T::from_f32(rng.normal_at(i) as f32))
            .collect()
    }

    #[test]
    fn edge_lengths_on_every_isa() {
        for n in [
            0,
            1,
            3,
            4,
            5,
            15,
            16,
            17,
            63,
            64,
            65,
            127,
            4095,
            4096,
            4097,
            10_007,
            576 * 1536,
        ] {
            check(&data::<f32>(n, n as u64));
            check(&data::<f16>(n, n as u64));
            check(&data::<bf16>(n, n as u64));
        }
    }

    #[test]
    fn non_finite_values_propagate() {
        for cpu in Cpu::all_available() {
            assert!(sum_squares(&cpu, &[1.0f32, f32::NAN, 2.0]).is_nan());
            assert_eq!(
                sum_squares(
                    &cpu,
                    &[1.0f32; 40].map(|v| if v > 0.0 { f32::INFINITY } else { v })
                ),
                f64::INFINITY
            );
        }
    }

    #[test]
    fn the_tolerance_is_tight_enough_to_catch_a_dropped_element() {
        // Dropping the largest of 10_007 normal samples changes the sum by ~1e-3 relative.
        let mut x = data::<f32>(10_007, 1);
        let expect = sum_squares_ref(&x);
        let largest = (0..x.len())
            .max_by(|&a, &b| x[a].abs().total_cmp(&x[b].abs()))
            .unwrap();
        x[largest] = 0.0;
        let dropped = sum_squares_ref(&x);
        assert!((expect - dropped).abs() > 10.0 * SUM_SQUARES_RELATIVE_TOLERANCE * expect);
    }

    proptest! {
        #[test]
        fn random_lengths_and_offsets(n in 0usize..300, offset in 0usize..17, seed in any::<u64>()) {
            let x = data::<bf16>(n + offset, seed);
            check(&x[offset..]);
        }
    }
}
