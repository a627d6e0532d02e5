//! Interpolating between models, the fast twins of `kernels_core::ops::interpolate`: any linear
//! combination, Gram matrices of (task) vectors, SLERP and Model Stock.
//!
//! # Contracts
//!
//! * [`linear_combination`] runs the weighted-sum kernel of [`crate::merge`] (coefficients
//!   rounded to `f32` once, fused multiply-adds in `f32`): within
//!   [`crate::merge::reduction_tolerance`] of the reference.
//! * [`gram`] computes each product in `f64` as the reference does and sums blocks of
//!   [`GRAM_BLOCK`] elements in a fixed order per thread count: every entry within
//!   [`gram_tolerance`] of the reference.
//! * [`slerp`] and [`model_stock`] are a [`gram`] pass, the reference's scalar coefficients
//!   ([`slerp_coefficients`], [`model_stock_ratio`]), and a [`linear_combination`] pass.

use kernels_core::backend::{
    validate_gram, validate_linear_combination, validate_model_stock, validate_slerp,
};
pub use kernels_core::ops::interpolate::{
    MODEL_STOCK_NORM_FLOOR, SLERP_DOT_THRESHOLD, SLERP_NORM_EPSILON, model_stock_ratio,
    slerp_coefficients,
};
use kernels_core::{Element, Result};

use crate::Cpu;
use crate::merge::weighted_sum;
use crate::parallel::{for_each, parts_for, ranges};

/// Elements each partial sum of [`gram`] covers before it is added to the part's total.
pub const GRAM_BLOCK: usize = 1024;

/// Bound on `|g_ij - g_ij_ref|` for vectors of `len` elements whose Gram diagonal holds
/// `g_ii` and `g_jj`: both sums add `len` products of relative error `2 u` (`u = 2^-53`: the two
/// differences from the centre and the product each round once) in different orders, each
/// partial sum at most `sum |d_i d_j| <= sqrt(g_ii g_jj)` (Cauchy-Schwarz).
#[must_use]
pub fn gram_tolerance(len: usize, g_ii: f64, g_jj: f64) -> f64 {
    2.0 * (len as f64 + 3.0) * f64::EPSILON * libm::sqrt(g_ii * g_jj)
}

/// Linear combination `out = sum w_i m_i`, weights any finite numbers (the twin of
/// [`kernels_core::ops::interpolate::linear_combination_ref`]), written as `f32` or rounded once
/// more to another element type.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let (a, b) = ([1.0f32, 2.0], [4.0f32, -1.0]);
/// let mut out = [0.0f32; 2];
/// linear_combination(&Cpu::detect(), &[&a, &b], &[1.5, -0.5], &mut out)?;
/// assert_eq!(out, [-0.5, 3.5]);
/// # Ok::<(), Error>(())
/// ```
pub fn linear_combination<T: Element, O: Element>(
    cpu: &Cpu,
    models: &[&[T]],
    weights: &[f32],
    out: &mut [O],
) -> Result<()> {
    validate_linear_combination(models.iter().map(|m| m.len()), weights, out.len())?;
    weighted_sum(cpu, None, models, weights, 1.0, out);
    Ok(())
}

/// Gram matrix of `N` vectors, centred on `center` when one is given:
/// `out[i * N + j] = sum_k (m_i[k] - c[k]) (m_j[k] - c[k])`, both triangles (the twin of
/// [`kernels_core::ops::interpolate::gram_ref`]); threaded. Sum it over the chunks of a
/// streamed tensor.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let (base, a, b) = ([1.0f32, 1.0], [2.0f32, 1.0], [1.0f32, 3.0]);
/// let mut g = [0.0f64; 4];
/// gram(&Cpu::detect(), &[&a, &b], Some(&base), &mut g)?;
/// assert_eq!(g, [1.0, 0.0, 0.0, 4.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn gram<T: Element>(
    cpu: &Cpu,
    models: &[&[T]],
    center: Option<&[T]>,
    out: &mut [f64],
) -> Result<()> {
    let n = validate_gram(
        models.iter().map(|m| m.len()),
        center.map(<[T]>::len),
        out.len(),
    )?;
    let len = models[0].len();
    let bytes_per_element = (n + usize::from(center.is_some())) * core::mem::size_of::<T>();
    let parts = parts_for(
        cpu.threads(),
        len * bytes_per_element,
        cpu.min_bytes_per_thread(),
    );
    let ranges: alloc::vec::Vec<_> = ranges(len, parts, GRAM_BLOCK).collect();
    let mut partials = alloc::vec![0.0f64; ranges.len() * n * n];
    let jobs: alloc::vec::Vec<_> = ranges.into_iter().zip(partials.chunks_mut(n * n)).collect();
    for_each(jobs, |(range, partial)| {
        // PERF: each element is widened and centred once per model, not once per pair.
        let mut diffs = alloc::vec![0.0f64; n * GRAM_BLOCK];
        for start in range.clone().step_by(GRAM_BLOCK) {
            let block = start..(start + GRAM_BLOCK).min(range.end);
            let len = block.len();
            for (i, d) in diffs.chunks_exact_mut(GRAM_BLOCK).enumerate() {
                centred(models[i], center, block.clone(), &mut d[..len]);
            }
            for i in 0..n {
                for j in i..n {
                    let (a, b) = (&diffs[i * GRAM_BLOCK..], &diffs[j * GRAM_BLOCK..]);
                    partial[i * n + j] += block_dot(&a[..len], &b[..len]);
                }
            }
        }
    });
    out.fill(0.0);
    for partial in partials.chunks(n * n) {
        for (o, p) in out.iter_mut().zip(partial) {
            *o += p;
        }
    }
    for i in 0..n {
        for j in 0..i {
            out[i * n + j] = out[j * n + i];
        }
    }
    Ok(())
}

/// `out[k] = m[k] - c[k]` over `range` (`c = 0` without a centre), widened to `f64` (exact:
/// the difference of two `f32` rounds once, in `f64`, as the reference's does).
#[inline(always)]
fn centred<T: Element>(
    m: &[T],
    center: Option<&[T]>,
    range: core::ops::Range<usize>,
    out: &mut [f64],
) {
    let m = &m[range.clone()];
    match center {
        None => {
            for (o, &x) in out.iter_mut().zip(m) {
                *o = f64::from(x.to_f32());
            }
        }
        Some(c) => {
            for ((o, &x), &z) in out.iter_mut().zip(m).zip(&c[range]) {
                *o = f64::from(x.to_f32()) - f64::from(z.to_f32());
            }
        }
    }
}

/// `sum_k a[k] b[k]` in `f64`, summed in eight lanes by position (the same order for any thread
/// count, as every block starts on a multiple of [`GRAM_BLOCK`]).
///
/// PERF: eight independent lanes let the compiler vectorise the `f64` sums (one chain would
/// serialise on the add latency).
#[inline(always)]
fn block_dot(a: &[f64], b: &[f64]) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0.0f64; LANES];
    for (ca, cb) in a.chunks(LANES).zip(b.chunks(LANES)) {
        for (l, (&x, &y)) in ca.iter().zip(cb).enumerate() {
            acc[l] += x * y;
        }
    }
    acc.iter().sum()
}

/// SLERP of two whole tensors (the twin of [`kernels_core::ops::interpolate::slerp_ref`]):
/// `out = s0 v0 + s1 v1` with [`slerp_coefficients`] of their [`gram`] matrix; `t` finite, not
/// clamped.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let mut out = [0.0f32; 2];
/// slerp(&Cpu::detect(), &[1.0f32, 0.0], &[0.0f32, 1.0], 0.5, &mut out)?;
/// assert!((out[0] - 0.5f32.sqrt()).abs() < 1e-7 && (out[1] - 0.5f32.sqrt()).abs() < 1e-7);
/// # Ok::<(), Error>(())
/// ```
pub fn slerp<T: Element, O: Element>(
    cpu: &Cpu,
    v0: &[T],
    v1: &[T],
    t: f32,
    out: &mut [O],
) -> Result<()> {
    validate_slerp(t)?;
    let mut g = [0.0f64; 4];
    gram(cpu, &[v0, v1], None, &mut g)?;
    let [s0, s1] = slerp_coefficients(f64::from(t), g);
    linear_combination(cpu, &[v0, v1], &[s0 as f32, s1 as f32], out)
}

/// Model Stock of whole tensors (the twin of
/// [`kernels_core::ops::interpolate::model_stock_ref`]): `out = t mean(models) + (1 - t) base`
/// with `t` = [`model_stock_ratio`] of the task vectors' [`gram`] matrix; `N >= 2` fine-tunes.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let base = [0.0f32, 0.0];
/// let (a, b) = ([1.0f32, 0.0], [0.5f32, 0.75f32.sqrt()]);
/// let mut out = [0.0f32; 2];
/// model_stock(&Cpu::detect(), &base, &[&a, &b], &mut out)?;
/// assert!((out[0] - 0.5).abs() < 1e-7);
/// # Ok::<(), Error>(())
/// ```
pub fn model_stock<T: Element, O: Element>(
    cpu: &Cpu,
    base: &[T],
    models: &[&[T]],
    out: &mut [O],
) -> Result<()> {
    let n = models.len();
    validate_model_stock(n)?;
    let mut g = alloc::vec![0.0f64; n * n];
    gram(cpu, models, Some(base), &mut g)?;
    let t = model_stock_ratio(&g)?;
    let mut all: alloc::vec::Vec<&[T]> = models.to_vec();
    all.push(base);
    let mut weights = alloc::vec![(t / n as f64) as f32; n];
    weights.push((1.0 - t) as f32);
    linear_combination(cpu, &all, &weights, out)
}
