//! Streaming merge reductions: weighted mean (model soups), task arithmetic, TIES election,
//! Fisher merging and diagonal Fisher accumulation, the fast twins of `kernels_core::ops::merge`.
//!
//! # Contracts
//!
//! Those of [`kernels_core::ops::merge`]: element-wise over equally long slices (stream a model
//! tensor by tensor, or chunk by chunk, and get the same bits), inputs `f32`/`f16`/`bf16`, output
//! `f32` or any element type (the `f32` result rounded once more, to nearest even: merged weights
//! written straight in the model's type), NaN and infinity propagate.
//!
//! The weighted sums (mean, task arithmetic, Fisher accumulation) are computed in `f32` with
//! fused multiply-adds: each output is within [`reduction_tolerance`] of the `f64` reference.
//! Slice tails round exactly as vector lanes ([`crate::Simd::mul_add_lane`]), so results are
//! bit-identical for every chunking of the data and every thread count.
//!
//! TIES election and Fisher merging decide something discrete per element (the elected sign,
//! the fallback to the plain mean), so they compute the reference's own `f64` arithmetic, lane
//! by lane, and are bit-identical to it.

use core::ops::Range;

use kernels_core::ops::merge::{
    ties_sign, validate_fisher_accumulate, validate_fisher_merge, validate_task_arithmetic,
    validate_ties_elect, validate_weighted_mean,
};
use kernels_core::{DType, Element, Result};

use crate::parallel::split_outputs;
use crate::simd::widened;
use crate::{Cpu, Simd, WithSimd};

/// Bound on `|out_j - out_ref_j|` for an output that sums `terms` products whose absolute values
/// add up to `abs_sum` (for a mean, divided by `sum w`): `(terms + 3) u abs_sum`, `u = 2^-24`.
///
/// A chain of `terms` fused multiply-adds rounds `terms` times, the scale and the base add two
/// more, and the `f32` weight `1 / sum w` one more; each rounding is relative to at most `abs_sum`.
#[must_use]
pub fn reduction_tolerance(terms: usize, abs_sum: f64) -> f64 {
    (terms + 3) as f64 * f64::from(f32::EPSILON / 2.0) * abs_sum + 1e-37
}

/// Split element ranges on multiples of this (four of the widest vectors), so every element is
/// computed by the same vector or tail code whatever the split.
pub(crate) const ELEMENT_ALIGN: usize = 64;

/// `out = base + scale * sum_i w_i models_i` over `range` (no base for a mean).
struct WeightedSum<'a, T> {
    models: &'a [&'a [T]],
    weights: &'a [f32],
    base: Option<&'a [T]>,
    scale: f32,
    range: Range<usize>,
    out: &'a mut [f32],
}

impl<T: Element> WithSimd for WeightedSum<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let Self {
            models,
            weights,
            base,
            scale,
            range,
            out,
        } = self;
        let lanes = S::LANES;
        let n = out.len();
        let main = n - n % lanes;
        let (start, scale_v) = (range.start, s.splat(scale));
        let mut c = 0;
        while c < main {
            let mut acc = s.zero();
            for (m, &w) in models.iter().zip(weights) {
                acc = s.mul_add(s.splat(w), s.load(&m[start + c..start + c + lanes]), acc);
            }
            let b = base.map_or(s.zero(), |b| s.load(&b[start + c..start + c + lanes]));
            s.store(s.mul_add(acc, scale_v, b), &mut out[c..c + lanes]);
            c += lanes;
        }
        for j in main..n {
            let mut acc = 0.0f32;
            for (m, &w) in models.iter().zip(weights) {
                acc = s.mul_add_lane(w, m[start + j].to_f32(), acc);
            }
            out[j] = s.mul_add_lane(acc, scale, base.map_or(0.0, |b| b[start + j].to_f32()));
        }
    }
}

/// Runs `run(range, out_part)` over `out` split across threads on multiples of 64 elements;
/// for an output type other than `f32`, `run` fills `f32` scratch that is then rounded to `O`
/// ([`Element::from_f32`], to nearest even), so every output type gets the same `f32` results.
fn split_elements<O: Element>(
    cpu: &Cpu,
    out: &mut [O],
    bytes_per_element: usize,
    run: impl Fn(Range<usize>, &mut [f32]) + Sync,
) {
    if O::DTYPE == DType::F32 {
        let out: &mut [f32] = bytemuck::cast_slice_mut(out);
        split_outputs(cpu, out, bytes_per_element, ELEMENT_ALIGN, run);
        return;
    }
    split_outputs(cpu, out, bytes_per_element, ELEMENT_ALIGN, |range, out| {
        // Scratch blocks are whole multiples of 64 elements, so each element takes the same
        // vector or tail path as in an `f32` output.
        let mut scratch = [0.0f32; SCRATCH];
        for (b, chunk) in out.chunks_mut(SCRATCH).enumerate() {
            let start = range.start + b * SCRATCH;
            let scratch = &mut scratch[..chunk.len()];
            run(start..start + chunk.len(), scratch);
            cpu.dispatch(Narrow {
                src: scratch,
                dst: chunk,
            });
        }
    });
}

/// Rounds `src` into `dst` ([`Simd::store_as`]).
struct Narrow<'a, O> {
    src: &'a [f32],
    dst: &'a mut [O],
}

impl<O: Element> WithSimd for Narrow<'_, O> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let mut dst = self.dst.chunks_exact_mut(S::LANES);
        let mut src = self.src.chunks_exact(S::LANES);
        for (o, v) in (&mut dst).zip(&mut src) {
            s.store_as(s.load(v), o);
        }
        for (o, &v) in dst.into_remainder().iter_mut().zip(src.remainder()) {
            *o = O::from_f32(v);
        }
    }
}

/// `f32` scratch per block of a narrower output.
const SCRATCH: usize = 16 * ELEMENT_ALIGN;

/// Weighted mean `out = sum w_i theta_i / sum w_i` (the twin of `weighted_mean_ref`), written
/// as `f32` or rounded once more to another element type (the model's, say).
pub fn weighted_mean<T: Element, O: Element>(
    cpu: &Cpu,
    models: &[&[T]],
    weights: &[f32],
    out: &mut [O],
) -> Result<()> {
    let sum = validate_weighted_mean(models, weights, out.len())?;
    let scale = (1.0 / sum) as f32;
    split_elements(
        cpu,
        out,
        models.len() * core::mem::size_of::<T>(),
        |range, out| {
            cpu.dispatch(WeightedSum {
                models,
                weights,
                base: None,
                scale,
                range,
                out,
            });
        },
    );
    Ok(())
}

/// Task arithmetic `out = base + lambda * sum w_i tau_i` (the twin of `task_arithmetic_ref`),
/// written as `f32` or rounded once more to another element type.
pub fn task_arithmetic<T: Element, O: Element>(
    cpu: &Cpu,
    base: &[T],
    taus: &[&[T]],
    weights: &[f32],
    lambda: f32,
    out: &mut [O],
) -> Result<()> {
    validate_task_arithmetic(base, taus, weights, lambda, out.len())?;
    split_elements(
        cpu,
        out,
        (taus.len() + 1) * core::mem::size_of::<T>(),
        |range, out| {
            cpu.dispatch(WeightedSum {
                models: taus,
                weights,
                base: Some(base),
                scale: lambda,
                range,
                out,
            });
        },
    );
    Ok(())
}

/// `fisher += scale * grad^2` over `range` of `grad`.
struct FisherAccumulate<'a, T> {
    fisher: &'a mut [f32],
    grad: &'a [T],
    scale: f32,
}

impl<T: Element> WithSimd for FisherAccumulate<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let Self {
            fisher,
            grad,
            scale,
        } = self;
        let lanes = S::LANES;
        let scale_v = s.splat(scale);
        let mut f_chunks = fisher.chunks_exact_mut(lanes);
        let mut g_chunks = grad.chunks_exact(lanes);
        for (f, g) in (&mut f_chunks).zip(&mut g_chunks) {
            let g = s.load(g);
            s.store(s.mul_add(s.mul(scale_v, g), g, s.load(&*f)), f);
        }
        for (f, g) in f_chunks
            .into_remainder()
            .iter_mut()
            .zip(g_chunks.remainder())
        {
            let g = g.to_f32();
            *f = s.mul_add_lane(scale * g, g, *f);
        }
    }
}

/// Diagonal Fisher accumulation `fisher += scale * grad^2` (the twin of `fisher_accumulate_ref`).
pub fn fisher_accumulate<T: Element>(
    cpu: &Cpu,
    fisher: &mut [f32],
    grad: &[T],
    scale: f32,
) -> Result<()> {
    validate_fisher_accumulate(fisher.len(), grad, scale)?;
    split_elements(cpu, fisher, 4 + core::mem::size_of::<T>(), |range, part| {
        cpu.dispatch(FisherAccumulate {
            fisher: part,
            grad: &grad[range],
            scale,
        });
    });
    Ok(())
}

/// Elements per block of the `f64` lane kernels (TIES, Fisher merging): wide enough that a
/// compiler vectorises each statement over the block.
const WIDE: usize = 16;

/// TIES election and disjoint mean over one range: the reference's `f64` arithmetic, lane by
/// lane.
struct TiesElect<'a, T> {
    base: &'a [T],
    trimmed: &'a [&'a [T]],
    weights: &'a [f32],
    lambda: f32,
    range: Range<usize>,
    out: &'a mut [f32],
}

impl<T: Element> WithSimd for TiesElect<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let Self {
            base,
            trimmed,
            weights,
            lambda,
            range,
            out,
        } = self;
        let mut buffer = [0.0f32; WIDE];
        let mut base_buffer = [0.0f32; WIDE];
        for_each_block(
            out,
            range.start,
            #[inline(always)]
            |c, len| {
                let base_block = *widened(s, &base[c..c + len], &mut base_buffer);
                let mut sum = [-0.0f64; WIDE];
                prefetch_ahead(s, base, c);
                for (t, &w) in trimmed.iter().zip(weights) {
                    prefetch_ahead(s, t, c);
                    let block = widened(s, &t[c..c + len], &mut buffer);
                    for (acc, &v) in sum.iter_mut().zip(block) {
                        *acc += f64::from(w) * f64::from(v);
                    }
                }
                let elected = sum.map(ties_sign);
                let (mut num, mut den) = ([0.0f64; WIDE], [0.0f64; WIDE]);
                // PERF: the second read of each model's block comes from L1.
                for (t, &w) in trimmed.iter().zip(weights) {
                    let block = widened(s, &t[c..c + len], &mut buffer);
                    for j in 0..WIDE {
                        let v = f64::from(block[j]);
                        // PERF: adding +0 where the model disagrees keeps the sums in registers; it
                        // changes no bit (a sum of agreeing terms, from +0, is never -0).
                        let agrees = elected[j] != 0.0 && ties_sign(v) == elected[j];
                        num[j] += if agrees { f64::from(w) * v } else { 0.0 };
                        den[j] += if agrees { f64::from(w) } else { 0.0 };
                    }
                }
                core::array::from_fn(|j| {
                    let mean = if den[j] > 0.0 { num[j] / den[j] } else { 0.0 };
                    (f64::from(base_block[j]) + f64::from(lambda) * mean) as f32
                })
            },
        );
    }
}

/// Prefetches `data` [`PREFETCH_BYTES`] ahead of element `at`, once per cache line.
///
/// PERF: these kernels read one stream per model and spend long on each block (`f64` lanes, a
/// division), so the hardware prefetcher alone leaves the loads waiting on DRAM.
#[inline(always)]
fn prefetch_ahead<S: Simd, T: Element>(s: S, data: &[T], at: usize) {
    let ahead = at + PREFETCH_BYTES / core::mem::size_of::<T>();
    if (ahead * core::mem::size_of::<T>()) % 64 < WIDE * core::mem::size_of::<T>()
        && let Some(v) = data.get(ahead)
    {
        s.prefetch(v);
    }
}

/// How far ahead [`prefetch_ahead`] reaches.
const PREFETCH_BYTES: usize = 1024;

/// Runs `block(first_element, len)` for each block of [`WIDE`] outputs of `out` (whose first
/// element is `start`) and writes the first `len` of the results it returns.
///
/// PERF: every block computes a whole fixed-width array, so each statement vectorises; the tail
/// block's extra lanes are computed and dropped. A whole block is one fixed-size store, not a
/// call to `memcpy`.
#[inline(always)]
fn for_each_block(
    out: &mut [f32],
    start: usize,
    mut block: impl FnMut(usize, usize) -> [f32; WIDE],
) {
    for (b, out) in out.chunks_mut(WIDE).enumerate() {
        let result = block(start + b * WIDE, out.len());
        match <&mut [f32; WIDE]>::try_from(&mut *out) {
            Ok(whole) => *whole = result,
            Err(_) => out.copy_from_slice(&result[..out.len()]),
        }
    }
}

/// TIES election and disjoint weighted mean over trimmed task vectors (the twin of
/// [`kernels_core::ops::merge::ties_elect_ref`], bit-identical: the same `f64` operations in the
/// same order, vectorised across elements), written as `f32` or rounded once more to another
/// element type. Trim with [`crate::masks::ties_trim`].
pub fn ties_elect<T: Element, O: Element>(
    cpu: &Cpu,
    base: &[T],
    trimmed: &[&[T]],
    weights: &[f32],
    lambda: f32,
    out: &mut [O],
) -> Result<()> {
    validate_ties_elect(base, trimmed, weights, lambda, out.len())?;
    split_elements(
        cpu,
        out,
        (trimmed.len() + 1) * core::mem::size_of::<T>(),
        |range, out| {
            cpu.dispatch(TiesElect {
                base,
                trimmed,
                weights,
                lambda,
                range,
                out,
            });
        },
    );
    Ok(())
}

/// Fisher merging over one range: the reference's `f64` arithmetic, lane by lane.
struct FisherMerge<'a, T> {
    thetas: &'a [&'a [T]],
    fishers: &'a [&'a [f32]],
    weights: &'a [f32],
    floor: f32,
    weight_sum: f64,
    range: Range<usize>,
    out: &'a mut [f32],
}

impl<T: Element> WithSimd for FisherMerge<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let Self {
            thetas,
            fishers,
            weights,
            floor,
            weight_sum,
            range,
            out,
        } = self;
        let mut buffer = [0.0f32; WIDE];
        let mut fisher_buffer = [0.0f32; WIDE];
        for_each_block(
            out,
            range.start,
            #[inline(always)]
            |c, len| {
                let (mut num, mut den, mut plain) =
                    ([0.0f64; WIDE], [0.0f64; WIDE], [0.0f64; WIDE]);
                for ((t, f), &w) in thetas.iter().zip(fishers).zip(weights) {
                    prefetch_ahead(s, t, c);
                    prefetch_ahead(s, f, c);
                    let theta = widened(s, &t[c..c + len], &mut buffer);
                    let fisher = widened(s, &f[c..c + len], &mut fisher_buffer);
                    let w = f64::from(w);
                    for j in 0..WIDE {
                        let f = f64::from(fisher[j].max(floor));
                        let v = f64::from(theta[j]);
                        num[j] += w * f * v;
                        den[j] += w * f;
                        plain[j] += w * v;
                    }
                }
                core::array::from_fn(|j| {
                    let merged = if den[j] > 0.0 {
                        num[j] / den[j]
                    } else {
                        plain[j] / weight_sum
                    };
                    merged as f32
                })
            },
        );
    }
}

/// Fisher merging `out = sum w_i F'_i theta_i / sum w_i F'_i`, `F' = max(F, floor)`, falling
/// back to the plain weighted mean where every `w_i F'_i` is zero (the twin of
/// [`kernels_core::ops::merge::fisher_merge_ref`], bit-identical: the same `f64` operations in
/// the same order, vectorised across elements), written as `f32` or rounded once more to another
/// element type.
pub fn fisher_merge<T: Element, O: Element>(
    cpu: &Cpu,
    thetas: &[&[T]],
    fishers: &[&[f32]],
    weights: &[f32],
    floor: f32,
    out: &mut [O],
) -> Result<()> {
    let weight_sum = validate_fisher_merge(thetas, fishers, weights, floor, out.len())?;
    split_elements(
        cpu,
        out,
        thetas.len() * (4 + core::mem::size_of::<T>()) + 4,
        |range, out| {
            cpu.dispatch(FisherMerge {
                thetas,
                fishers,
                weights,
                floor,
                weight_sum,
                range,
                out,
            });
        },
    );
    Ok(())
}
