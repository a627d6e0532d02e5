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
//! TIES election elects exactly the reference's sign for every element (so the same entries
//! agree), and its values are within [`ties_tolerance`]: `f32` lanes wherever their error bound
//! proves the sign of the vote, the reference's own `f64` arithmetic for the rest. Fisher merging
//! decides its fallback to the plain mean per element, so it computes the reference's `f64`
//! arithmetic lane by lane and is bit-identical to it.

use core::ops::Range;

use kernels_core::backend::{
    SQUARES_IN_F64_BELOW, fisher_weight, floored_fisher, ties_elect_at, validate_fisher_accumulate,
    validate_fisher_merge, validate_task_arithmetic, validate_ties_elect, validate_weighted_mean,
};
pub use kernels_core::ops::merge::{FisherParams, TiesElection, TiesParams};
use kernels_core::{DType, Element, Result};

use crate::parallel::split_outputs;
use crate::simd::{stream_head, widened, widened_lanes};
use crate::{Cpu, Simd, WithSimd};

/// Bound on `|out_j - out_ref_j|` for an output that sums `terms` products whose absolute values
/// add up to `abs_sum` (for a mean, divided by `sum w`): `(terms + 3) u abs_sum`, `u = 2^-24`.
///
/// A chain of `terms` fused multiply-adds rounds `terms` times and the base adds one more, each
/// relative to at most `abs_sum`; rounding the coefficients (`w_i / sum w`, `lambda w_i`) to
/// `f32` errs by `u` of each term, at most `u abs_sum` in all.
///
/// ```
/// use kernels_cpu::merge::reduction_tolerance;
/// use kernels_cpu::prelude::*;
/// let (a, b) = ([0.1f32, 0.7], [0.3f32, -0.2]);
/// let mut out = [0.0f32; 2];
/// weighted_mean(&Cpu::detect(), &[&a, &b], &[1.0, 2.0], &mut out)?;
/// for j in 0..2 {
///     let exact = (f64::from(a[j]) + 2.0 * f64::from(b[j])) / 3.0;
///     let abs_sum = (f64::from(a[j].abs()) + 2.0 * f64::from(b[j].abs())) / 3.0;
///     assert!((f64::from(out[j]) - exact).abs() <= reduction_tolerance(2, abs_sum));
/// }
/// # Ok::<(), Error>(())
/// ```
#[must_use]
pub fn reduction_tolerance(terms: usize, abs_sum: f64) -> f64 {
    (terms + 3) as f64 * f64::from(f32::EPSILON / 2.0) * abs_sum + 1e-37
}

/// Split element ranges on multiples of this (four of the widest vectors), so every element is
/// computed by the same vector or tail code whatever the split (a streaming part's elements before
/// its first 64-byte boundary take the tail code, whose lanes round as the vectors do).
pub(crate) const ELEMENT_ALIGN: usize = 64;

/// Models one [`WeightedSum`] dispatch reads: their coefficients live in a stack buffer (no
/// allocator in `no_std`), and more models are summed in further dispatches over the output.
const MODELS_PER_SUM: usize = 32;

/// `out = base + sum_i c_i models_i` over `range` (no base for a mean, and `out +=` for a later
/// group of models), with coefficients `c_i` formed by [`weighted_sum`].
/// Which group of models a [`WeightedSum`] sums.
#[derive(Clone, Copy)]
enum Group<'a, T> {
    /// The first: from zero, then the base if there is one.
    First(Option<&'a [T]>),
    /// A later one: from the output so far.
    Later,
}

struct WeightedSum<'a, T> {
    models: &'a [&'a [T]],
    coefficients: &'a [f32],
    group: Group<'a, T>,
    range: Range<usize>,
    /// Write past the caches: only where nothing reads the output back (one group).
    streaming: bool,
    out: &'a mut [f32],
}

impl<T: Element> WithSimd for WeightedSum<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let Self {
            models,
            coefficients,
            group,
            range,
            streaming,
            out,
        } = self;
        let lanes = S::LANES;
        let n = out.len();
        let start = range.start;
        let lane = |j: usize, o: &mut f32| {
            let mut acc = match group {
                Group::First(_) => 0.0,
                Group::Later => *o,
            };
            for (m, &w) in models.iter().zip(coefficients) {
                acc = s.mul_add_lane(w, m[start + j].to_f32(), acc);
            }
            if let Group::First(Some(b)) = group {
                acc += b[start + j].to_f32();
            }
            *o = acc;
        };
        let head = stream_head(out, streaming);
        let main = head + (n - head) / lanes * lanes;
        for j in 0..head {
            lane(j, &mut out[j]);
        }
        let mut c = head;
        while c < main {
            let mut acc = match group {
                Group::First(_) => s.zero(),
                Group::Later => s.load(&out[c..c + lanes]),
            };
            for (m, &w) in models.iter().zip(coefficients) {
                acc = s.mul_add(s.splat(w), s.load(&m[start + c..start + c + lanes]), acc);
            }
            if let Group::First(Some(b)) = group {
                acc = s.add(acc, s.load(&b[start + c..start + c + lanes]));
            }
            if streaming {
                s.store_streaming(acc, &mut out[c..c + lanes]);
            } else {
                s.store(acc, &mut out[c..c + lanes]);
            }
            c += lanes;
        }
        for j in main..n {
            lane(j, &mut out[j]);
        }
        if streaming {
            s.stream_fence();
        }
    }
}

/// Runs `run(range, out_part, streaming)` over `out` split across threads on multiples of 64
/// elements; for an output type other than `f32`, `run` fills `f32` scratch that is then rounded
/// to `O` ([`Element::from_f32`], to nearest even), so every output type gets the same `f32`
/// results. `streaming` says whether `run` should write past the caches: an `f32` output of at
/// least [`Cpu::streaming_stores_from`] (never the scratch, which is read back at once).
fn split_elements<O: Element>(
    cpu: &Cpu,
    out: &mut [O],
    bytes_per_element: usize,
    run: impl Fn(Range<usize>, &mut [f32], bool) + Sync,
) {
    if O::DTYPE == DType::F32 {
        let streaming = cpu.streams(out);
        let out: &mut [f32] = bytemuck::cast_slice_mut(out);
        split_outputs(cpu, out, bytes_per_element, ELEMENT_ALIGN, |range, out| {
            run(range, out, streaming);
        });
        return;
    }
    split_outputs(cpu, out, bytes_per_element, ELEMENT_ALIGN, |range, out| {
        // Scratch blocks are whole multiples of 64 elements, so each element takes the same
        // vector or tail path as in an `f32` output.
        let mut scratch = [0.0f32; SCRATCH];
        for (b, chunk) in out.chunks_mut(SCRATCH).enumerate() {
            let start = range.start + b * SCRATCH;
            let scratch = &mut scratch[..chunk.len()];
            run(start..start + chunk.len(), scratch, false);
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
///
/// ```
/// use kernels_cpu::prelude::*;
/// let (a, b) = ([1.0f32, 2.0], [4.0f32, -1.0]);
/// let mut soup = [bf16::ZERO; 2]; // written in the models' own type
/// weighted_mean(&Cpu::detect(), &[&a, &b], &[1.0, 2.0], &mut soup)?;
/// assert_eq!(soup, [bf16::from_f32(3.0), bf16::from_f32(0.0)]);
/// # Ok::<(), Error>(())
/// ```
pub fn weighted_mean<T: Element, O: Element>(
    cpu: &Cpu,
    models: &[&[T]],
    weights: &[f32],
    out: &mut [O],
) -> Result<()> {
    let sum = validate_weighted_mean(models.iter().map(|m| m.len()), weights, out.len())?;
    weighted_sum(cpu, None, models, weights, 1.0 / sum, out);
    Ok(())
}

/// Task arithmetic `out = base + lambda * sum w_i tau_i` (the twin of `task_arithmetic_ref`),
/// written as `f32` or rounded once more to another element type.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let base = [1.0f32, 1.0];
/// let (tau_a, tau_b) = ([0.5f32, 0.0], [0.0f32, -0.25]);
/// let mut merged = [0.0f32; 2];
/// task_arithmetic(&Cpu::detect(), &base, &[&tau_a, &tau_b], &[1.0, 1.0], 2.0, &mut merged)?;
/// assert_eq!(merged, [2.0, 0.5]);
/// # Ok::<(), Error>(())
/// ```
pub fn task_arithmetic<T: Element, O: Element>(
    cpu: &Cpu,
    base: &[T],
    taus: &[&[T]],
    weights: &[f32],
    lambda: f32,
    out: &mut [O],
) -> Result<()> {
    validate_task_arithmetic(
        base.len(),
        taus.iter().map(|t| t.len()),
        weights,
        lambda,
        out.len(),
    )?;
    weighted_sum(cpu, Some(base), taus, weights, f64::from(lambda), out);
    Ok(())
}

/// `c = w * factor`, formed in `f64` and rounded to `f32` once: a mean's `w_i / sum w` stays in
/// range for weights of any magnitude (`1e-45` or `3e38` each), and task arithmetic's
/// `lambda w_i` keeps a product `w_i tau_i` that would underflow `f32` (the GPU's coefficients).
#[inline]
fn coefficient(w: f32, factor: f64) -> f32 {
    (f64::from(w) * factor) as f32
}

/// `out = base + sum_i (w_i factor) models_i`, threaded, written as `f32` or rounded once more.
///
/// The vector kernel multiplies by `f32` coefficients. Where one is not a normal `f32` (an exact
/// zero aside) it would carry too few bits (a subnormal `lambda w_i`) or none (one that overflows
/// or underflows to zero), so
/// the call sums in `f64` instead and rounds once, as the reference does: a slow path only such
/// weights and `lambda` reach (found by the `merge` fuzz target).
pub(crate) fn weighted_sum<T: Element, O: Element>(
    cpu: &Cpu,
    base: Option<&[T]>,
    models: &[&[T]],
    weights: &[f32],
    factor: f64,
    out: &mut [O],
) {
    let representable = weights
        .iter()
        .all(|&w| f64::from(w) * factor == 0.0 || coefficient(w, factor).is_normal());
    let bytes_per_element =
        (models.len() + usize::from(base.is_some())) * core::mem::size_of::<T>();
    split_elements(cpu, out, bytes_per_element, |range, out, streaming| {
        if !representable {
            for (j, o) in range.zip(out.iter_mut()) {
                let sum: f64 = models
                    .iter()
                    .zip(weights)
                    .map(|(m, &w)| f64::from(w) * f64::from(m[j].to_f32()))
                    .sum();
                let b = base.map_or(0.0, |b| f64::from(b[j].to_f32()));
                *o = (b + factor * sum) as f32;
            }
            return;
        }
        // PERF: the coefficients are formed once per group, not per vector (a multiply and two
        // conversions per model cost a tenth of the bandwidth at N = 8).
        let groups = models
            .chunks(MODELS_PER_SUM)
            .zip(weights.chunks(MODELS_PER_SUM));
        for (g, (group, group_weights)) in groups.enumerate() {
            let mut coefficients = [0.0f32; MODELS_PER_SUM];
            for (c, &w) in coefficients.iter_mut().zip(group_weights) {
                *c = coefficient(w, factor);
            }
            cpu.dispatch(WeightedSum {
                models: group,
                coefficients: &coefficients[..group.len()],
                group: if g == 0 {
                    Group::First(base)
                } else {
                    Group::Later
                },
                range: range.clone(),
                streaming: streaming && models.len() <= MODELS_PER_SUM,
                out: &mut *out,
            });
        }
    });
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
///
/// ```
/// use kernels_cpu::prelude::*;
/// let cpu = Cpu::detect();
/// let mut fisher = [0.0f32; 2];
/// // The mean of grad^2 over two batches.
/// for grad in [[1.0f32, -2.0], [3.0, 0.0]] {
///     fisher_accumulate(&cpu, &mut fisher, &grad, 0.5)?;
/// }
/// assert_eq!(fisher, [5.0, 2.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn fisher_accumulate<T: Element>(
    cpu: &Cpu,
    fisher: &mut [f32],
    grad: &[T],
    scale: f32,
) -> Result<()> {
    validate_fisher_accumulate(fisher.len(), grad.len(), scale)?;
    // Read and written in place: the lines are in the cache when written, nothing to stream.
    split_elements(
        cpu,
        fisher,
        4 + core::mem::size_of::<T>(),
        |range, part, _| {
            cpu.dispatch(FisherAccumulate {
                fisher: part,
                grad: &grad[range],
                scale,
            });
        },
    );
    Ok(())
}

/// Elements per block of Fisher merging: wide enough that a compiler
/// vectorises each statement over the block.
const WIDE: usize = 16;

/// Bound on `|out_j - out_ref_j|` for TIES election over `models` task vectors, where `scale` is
/// `|base_j| + |lambda| |mean_j|` and `mean_j` is the reference's combined value (the agreeing
/// weighted sum, divided by the agreeing weights when normalising): `(3 models + 4) u scale +
/// 2^-149`, `u = 2^-24`.
///
/// The elected sign, and so the set of agreeing entries, is exactly the reference's. The
/// agreeing sum rounds `2 models - 1` times (products, then sums), their weights `models - 1`
/// times, and the division, the scaling by `lambda`, the base's addition and the reference's own
/// rounding once each; `2^-149` is the spacing of subnormal results.
///
/// ```
/// use kernels_cpu::merge::ties_tolerance;
/// use kernels_cpu::prelude::*;
/// let (a, b) = ([0.1f32, -0.7], [0.3f32, -0.2]);
/// let mut out = [0.0f32; 2];
/// ties_elect(&Cpu::detect(), &[1.0f32, 1.0], &[&a, &b], &[1.0, 2.0], 0.5, &mut out)?;
/// for j in 0..2 {
///     let mean = (f64::from(a[j]) + 2.0 * f64::from(b[j])) / 3.0; // both agree
///     let exact = 1.0 + 0.5 * mean;
///     assert!((f64::from(out[j]) - exact).abs() <= ties_tolerance(2, 1.0 + 0.5 * mean.abs()));
/// }
/// # Ok::<(), Error>(())
/// ```
#[must_use]
pub fn ties_tolerance(models: usize, scale: f64) -> f64 {
    (3 * models + 4) as f64 * f64::from(f32::EPSILON / 2.0) * scale + f64::from(f32::from_bits(1))
}

/// Most models the `f32` vote takes: its error bound grows with the count, and past this many
/// every element takes the `f64` lanes.
const TIES_F32_MAX_MODELS: usize = 1 << 16;

/// Smallest `|vote|` the `f32` lanes decide: the elected side's sum is at least the vote, and
/// above this a product that underflowed lost less than the tolerance counts; smaller votes go to
/// the `f64` lanes.
const TIES_F32_SMALLEST_VOTE: f32 = 1.0 / (1u128 << 100) as f32;

/// TIES election and combination over one range: `f32` lanes where they provably elect the
/// reference's sign, the reference's `f64` arithmetic for the other elements.
///
/// One pass over a block sums each sign's weighted entries apart, `pos = sum max(w_i tau_i, 0)`
/// and `neg = sum min(w_i tau_i, 0)` (a NaN product reaches both), and, when normalising, each
/// sign's weights (by the entry's sign, as the reference compares), and notes whether any entry
/// is non-zero. The vote `pos + neg` is within `vote_slack (pos - neg)` of the exact
/// sum (the products' and sums' rounding and the reference's own, with a factor of two to spare),
/// so a vote beyond that bound and beyond [`TIES_F32_SMALLEST_VOTE`] has the reference's sign and
/// the elected side's sum is the agreeing sum. An element whose entries are all zero votes exactly
/// zero and nothing agrees, whatever sign the rule elects. Every other element (a vote within the bound, a
/// NaN, an infinity, an overflow) is recomputed in the reference's `f64` arithmetic, so each
/// element's result depends on its own entries only: the same bits for any chunking and thread
/// count.
struct TiesElect<'a, T> {
    base: &'a [T],
    trimmed: &'a [&'a [T]],
    weights: &'a [f32],
    lambda: f32,
    rule: TiesElection,
    range: Range<usize>,
    /// Write past the caches ([`for_each_block`]).
    streaming: bool,
    out: &'a mut [f32],
}

impl<T: Element> WithSimd for TiesElect<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        // PERF: two vectors per block where they are wide (each model's sums run as two
        // independent chains: 1.1x to 1.2x faster on AVX-512, Zen 4, one thread, in L1); with
        // 8-lane vectors, 32 lanes spill the sums and ran up to 2x slower. The rule's
        // normalising as a constant keeps the branch out of the models' loop.
        match (S::LANES >= 16, self.rule.normalize) {
            (true, true) => self.elect_blocks::<S, 32, true>(s),
            (true, false) => self.elect_blocks::<S, 32, false>(s),
            (false, true) => self.elect_blocks::<S, 16, true>(s),
            (false, false) => self.elect_blocks::<S, 16, false>(s),
        }
    }
}

impl<T: Element> TiesElect<'_, T> {
    /// The election over blocks of `N` elements.
    #[inline(always)]
    fn elect_blocks<S: Simd, const N: usize, const NORMALIZE: bool>(self, s: S) {
        let Self {
            base,
            trimmed,
            weights,
            lambda,
            rule,
            range,
            streaming,
            out,
        } = self;
        let models = trimmed.len();
        let vote_slack = if models <= TIES_F32_MAX_MODELS {
            (4 * (models + 2)) as f32 * (f32::EPSILON / 2.0)
        } else {
            f32::INFINITY
        };
        // PERF: lane masks as `u32` words, not `bool`s: the compiler keeps them in vector
        // registers instead of packing them into bytes and back.
        let mask = |yes: bool| 0u32.wrapping_sub(u32::from(yes));
        let pick = |m: u32, v: f32| f32::from_bits(v.to_bits() & m);
        let mut buffer = [0.0f32; N];
        let mut base_buffer = [0.0f32; N];
        for_each_block(
            s,
            out,
            range.start,
            streaming,
            #[inline(always)]
            |c, len| {
                let (mut pos, mut neg) = ([0.0f32; N], [0.0f32; N]);
                let (mut pos_weight, mut neg_weight) = ([0.0f32; N], [0.0f32; N]);
                let mut entries = [0u32; N];
                prefetch_ahead::<S, T, N>(s, base, c, TIES_PREFETCH_BYTES);
                for (t, &w) in trimmed.iter().zip(weights) {
                    prefetch_ahead::<S, T, N>(s, t, c, TIES_PREFETCH_BYTES);
                    let block = widened_lanes(s, &t[c..c + len], &mut buffer);
                    for j in 0..N {
                        // The weights are non-negative, so a product has its entry's sign (or
                        // is zero) and each side's sum is its entries' (a NaN product reaches
                        // both, so the vote is NaN and the element goes to the `f64` lanes).
                        let tau = block[j];
                        let product = w * tau;
                        pos[j] += if product < 0.0 { 0.0 } else { product };
                        neg[j] += if product > 0.0 { 0.0 } else { product };
                        if NORMALIZE {
                            // PERF: the weight added where the entry has the sign, rather than a
                            // zero added elsewhere: one masked addition on AVX-512. The same bits
                            // (the sums start at +0 and the weights are not negative).
                            let (p, n) = (pos_weight[j], neg_weight[j]);
                            pos_weight[j] = if tau > 0.0 { p + w } else { p };
                            neg_weight[j] = if tau < 0.0 { n + w } else { n };
                        }
                        entries[j] |= tau.to_bits();
                    }
                }
                // Widened here, where it is used, so that its lanes hold no registers through the
                // models' loop.
                let base_block = widened_lanes(s, &base[c..c + len], &mut base_buffer);
                let mut fast = LineAligned([0.0f32; N]);
                let mut unproven = [0u32; N];
                for j in 0..N {
                    let vote = pos[j] + neg[j];
                    let bound = vote_slack * (pos[j] - neg[j]) + TIES_F32_SMALLEST_VOTE;
                    let (up, down) = (mask(vote > bound), mask(vote < -bound));
                    let either = |p: f32, n: f32| {
                        f32::from_bits(pick(up, p).to_bits() | pick(down, n).to_bits())
                    };
                    let sum = either(pos[j], neg[j]);
                    let combined = if NORMALIZE {
                        let weight = either(pos_weight[j], neg_weight[j]);
                        pick(mask(weight > 0.0), sum / weight)
                    } else {
                        sum
                    };
                    fast.0[j] = base_block[j] + lambda * combined;
                    // Every entry zero (either sign): the vote is exactly zero and none agrees.
                    let decided = up | down | mask(entries[j] << 1 == 0);
                    unproven[j] = !(decided & mask(fast.0[j].abs() <= f32::MAX));
                }
                if unproven.iter().fold(0, |any, &u| any | u) != 0 {
                    settle_in_f64(
                        base,
                        trimmed,
                        weights,
                        lambda,
                        rule,
                        c,
                        &unproven,
                        &mut fast.0,
                    );
                }
                fast
            },
        );
    }
}

/// Recomputes the elements of a block the `f32` lanes could not prove, one by one in the
/// reference's `f64` arithmetic ([`ties_elect_at`]).
///
/// PERF: out of line and cold: real task vectors send few elements here (votes that cancel to
/// within rounding), and the hot loop keeps its registers.
#[cold]
#[inline(never)]
fn settle_in_f64<T: Element, const N: usize>(
    base: &[T],
    trimmed: &[&[T]],
    weights: &[f32],
    lambda: f32,
    rule: TiesElection,
    first: usize,
    unproven: &[u32; N],
    out: &mut [f32; N],
) {
    let len = N.min(base.len() - first);
    for (j, o) in out[..len].iter_mut().enumerate() {
        if unproven[j] != 0 {
            *o = ties_elect_at(base[first + j], trimmed, weights, lambda, rule, first + j);
        }
    }
}

/// Prefetches `data` `bytes` ahead of element `at`, once per cache line.
///
/// PERF: these kernels read one stream per model and spend long on each block (a division), so
/// the hardware prefetcher alone leaves the loads waiting on DRAM. Into L2, not L1: with 8 models
/// TIES election and Fisher merging ran 1.3x to 1.7x faster so (Zen 4; equal within noise at 2
/// models), their 10 and 16 streams' lines no longer evicting each other from L1's sets.
#[inline(always)]
fn prefetch_ahead<S: Simd, T: Element, const N: usize>(s: S, data: &[T], at: usize, bytes: usize) {
    let size = core::mem::size_of::<T>();
    let ahead = at + bytes / size;
    if N * size >= 64 {
        // Consecutive blocks of at least a line: one prefetch per line's worth reaches every line.
        for offset in (0..N * size).step_by(64) {
            if let Some(v) = data.get(ahead + offset / size) {
                s.prefetch_l2(v);
            }
        }
    } else if (ahead * size) % 64 < N * size
        && let Some(v) = data.get(ahead)
    {
        s.prefetch_l2(v);
    }
}

/// How far ahead TIES election prefetches.
const TIES_PREFETCH_BYTES: usize = 1024;

/// How far ahead Fisher merging prefetches: a page, not TIES election's 1 KiB.
///
/// PERF: with 8 `f32` models a thread reads 16 streams that cross a page every 1024 elements, and
/// the hardware prefetchers stop at pages. 1e8 elements, 2 threads, Zen 4, builds run
/// alternately: 8 `f32` models 254-310 ms against 443-457 ms at 1 KiB; `bf16` and 2 or 4 models
/// equal within noise; 8 KiB made 2 `bf16` models 1.4x slower. TIES election (at most 9 streams)
/// measured no faster at a page, so it stays at 1 KiB.
const FISHER_PREFETCH_BYTES: usize = 4096;

/// A block's results, on cache lines of their own where they are kept on the stack.
///
/// PERF: the streaming stores read the block back from the stack (TIES election keeps it there
/// for the cold `f64` path). Placed across two lines by the compiler, TIES election on `bf16`
/// ran 4.5x slower (2 ns per element whatever the model count, Zen 4; the same code on one line
/// did not): most likely, the reads could not take the split stores' values and waited for them
/// to reach the cache, behind the older streaming stores on their way to DRAM.
#[repr(C, align(64))]
struct LineAligned<const N: usize>([f32; N]);

/// Runs `block(first_element, len)` for each block of `N` outputs of `out` (whose first
/// element is `start`) and writes the first `len` of the results it returns; with `streaming`,
/// past the caches ([`stream_head`] elements first, so whole blocks start on a boundary).
///
/// PERF: every block computes a whole fixed-width array, so each statement vectorises; a short
/// block's extra lanes are computed and dropped. A whole block is fixed-size stores, not a call
/// to `memcpy` (the short blocks are separate calls of `block`, so the compiler cannot merge the
/// stores into one of variable length).
#[inline(always)]
fn for_each_block<S: Simd, const N: usize>(
    s: S,
    out: &mut [f32],
    start: usize,
    streaming: bool,
    mut block: impl FnMut(usize, usize) -> LineAligned<N>,
) {
    let (head, rest) = out.split_at_mut(stream_head(out, streaming));
    if !head.is_empty() {
        let result = block(start, head.len()).0;
        head.copy_from_slice(&result[..head.len()]);
    }
    let mut wholes = rest.chunks_exact_mut(N);
    let mut first = start + head.len();
    for whole in &mut wholes {
        let result = block(first, N).0;
        if streaming {
            for (o, v) in whole
                .chunks_exact_mut(S::LANES)
                .zip(result.chunks_exact(S::LANES))
            {
                s.store_streaming(s.load(v), o);
            }
        } else {
            let whole: &mut [f32; N] = whole.try_into().expect("chunks_exact");
            *whole = result;
        }
        first += N;
    }
    let tail = wholes.into_remainder();
    if !tail.is_empty() {
        let result = block(first, tail.len()).0;
        tail.copy_from_slice(&result[..tail.len()]);
    }
    if streaming {
        s.stream_fence();
    }
}

/// TIES election and disjoint weighted mean over trimmed task vectors (the twin of
/// [`kernels_core::ops::merge::ties_elect_ref`]: the reference's elected sign exactly, the values
/// within [`ties_tolerance`]), written as `f32` or rounded once more to another element type. Trim with [`crate::masks::ties_trim`], or call [`ties`] for both steps.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let base = [0.0f32; 3];
/// let (a, b) = ([1.0f32, -1.0, 0.0], [-3.0f32, -1.0, 2.0]);
/// let mut merged = [0.0f32; 3];
/// ties_elect(&Cpu::detect(), &base, &[&a, &b], &[1.0, 1.0], 1.0, &mut merged)?;
/// // Element 0: the sign of 1 - 3 is negative, so only b's -3 counts.
/// assert_eq!(merged, [-3.0, -1.0, 2.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn ties_elect<T: Element, O: Element>(
    cpu: &Cpu,
    base: &[T],
    trimmed: &[&[T]],
    weights: &[f32],
    lambda: f32,
    out: &mut [O],
) -> Result<()> {
    ties_elect_with(
        cpu,
        base,
        trimmed,
        weights,
        lambda,
        TiesElection::default(),
        out,
    )
}

/// [`ties_elect`] under another [`TiesElection`] rule (mergekit's, say): the twin of
/// [`kernels_core::ops::merge::ties_elect_with_ref`], with its elected sign, within
/// [`ties_tolerance`].
///
/// ```
/// use kernels_cpu::prelude::*;
/// let (a, b) = ([1.0f32, 2.0], [-1.0f32, 2.0]);
/// let mergekit = TiesElection::default().with_zero_sum_elects_positive(true).with_normalize(false);
/// let mut out = [0.0f32; 2];
/// ties_elect_with(&Cpu::detect(), &[0.0f32; 2], &[&a, &b], &[1.0, 1.0], 1.0, mergekit, &mut out)?;
/// assert_eq!(out, [1.0, 4.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn ties_elect_with<T: Element, O: Element>(
    cpu: &Cpu,
    base: &[T],
    trimmed: &[&[T]],
    weights: &[f32],
    lambda: f32,
    rule: TiesElection,
    out: &mut [O],
) -> Result<()> {
    validate_ties_elect(
        base.len(),
        trimmed.iter().map(|t| t.len()),
        weights,
        lambda,
        out.len(),
    )?;
    split_elements(
        cpu,
        out,
        (trimmed.len() + 1) * core::mem::size_of::<T>(),
        |range, out, streaming| {
            cpu.dispatch(TiesElect {
                base,
                trimmed,
                weights,
                lambda,
                rule,
                range,
                streaming,
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
    params: FisherParams<'a>,
    weight_sum: f64,
    range: Range<usize>,
    /// Write past the caches ([`for_each_block`]).
    streaming: bool,
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
            params,
            weight_sum,
            range,
            streaming,
            out,
        } = self;
        let floor = params.floor;
        let mut buffer = [0.0f32; WIDE];
        let mut fisher_buffer = [0.0f32; WIDE];
        for_each_block(
            s,
            out,
            range.start,
            streaming,
            #[inline(always)]
            |c, len| {
                let (mut num, mut den, mut plain) =
                    ([0.0f64; WIDE], [0.0f64; WIDE], [0.0f64; WIDE]);
                for (i, (t, f)) in thetas.iter().zip(fishers).enumerate() {
                    prefetch_ahead::<S, T, WIDE>(s, t, c, FISHER_PREFETCH_BYTES);
                    prefetch_ahead::<S, f32, WIDE>(s, f, c, FISHER_PREFETCH_BYTES);
                    let theta = widened(s, &t[c..c + len], &mut buffer);
                    let fisher = widened(s, &f[c..c + len], &mut fisher_buffer);
                    let w = f64::from(fisher_weight(weights, params, i));
                    for j in 0..WIDE {
                        let f = f64::from(floored_fisher(fisher[j], floor));
                        let v = f64::from(theta[j]);
                        num[j] += w * f * v;
                        den[j] += w * f;
                        plain[j] += w * v;
                    }
                }
                LineAligned(s.fisher_quotients(&num, &den, &plain, weight_sum))
            },
        );
    }
}

/// Fisher merging `out = sum w'_i F'_i theta_i / sum w'_i F'_i`, `F' = max(F, params.floor)`,
/// `w'_i = w_i` or, with [`FisherParams::with_normalization`], `w_i / ||F_i||_2` (the squared
/// norms summed over each model's whole Fisher with [`sum_squares`]); the plain weighted mean
/// where every `w'_i F'_i` is zero. The twin of [`kernels_core::ops::merge::fisher_merge_ref`],
/// bit-identical: the same `f64` operations in the same order, vectorised across elements;
/// written as `f32` or rounded once more to another element type.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let cpu = Cpu::detect();
/// let (a, b) = ([1.0f32, -2.0, 4.0], [3.0f32, 6.0, -4.0]);
/// let (fa, fb) = ([1.0f32, 1.0, 1.0], [3.0f32, 0.0, 1.0]);
/// let mut out = [0.0f32; 3];
/// fisher_merge(&cpu, &[&a, &b], &[&fa, &fb], &[1.0, 1.0], FisherParams::default(), &mut out)?;
/// assert_eq!(out, [2.5, -2.0, 0.0]); // sum F theta / sum F
/// // Normalised per model by ||F_i||_2, summed tensor by tensor over the whole model.
/// let norms = [sum_squares(&cpu, &fa)?, sum_squares(&cpu, &fb)?];
/// let params = FisherParams::default().with_normalization(&norms);
/// fisher_merge(&cpu, &[&a, &b], &[&fa, &fb], &[1.0, 1.0], params, &mut out)?;
/// # Ok::<(), Error>(())
/// ```
pub fn fisher_merge<T: Element, O: Element>(
    cpu: &Cpu,
    thetas: &[&[T]],
    fishers: &[&[f32]],
    weights: &[f32],
    params: FisherParams<'_>,
    out: &mut [O],
) -> Result<()> {
    let weight_sum = validate_fisher_merge(
        thetas.iter().map(|t| t.len()),
        fishers.iter().map(|f| f.len()),
        weights,
        params,
        out.len(),
    )?;
    split_elements(
        cpu,
        out,
        thetas.len() * (4 + core::mem::size_of::<T>()) + 4,
        |range, out, streaming| {
            cpu.dispatch(FisherMerge {
                thetas,
                fishers,
                weights,
                params,
                weight_sum,
                range,
                streaming,
                out,
            });
        },
    );
    Ok(())
}

/// TIES merging of whole tensors in one call: trim each task vector to what `params.keep` keeps
/// ([`crate::masks::ties_trim`], into `N` scratch copies of the tensor in `T`), then elect and take
/// the disjoint mean ([`ties_elect`]). The twin of [`kernels_core::ops::merge::ties_ref`];
/// written as `f32` or rounded once more to another element type.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let base = [10.0f32; 4];
/// let (t1, t2) = ([1.0f32, -2.0, 3.0, 0.1], [3.0f32, 1.0, -1.0, 0.2]);
/// let params = TiesParams::default().with_keep(KeepRule::Density(0.75)).with_lambda(1.0);
/// let mut out = [0.0f32; 4];
/// ties(&Cpu::detect(), &base, &[&t1, &t2], &[1.0, 1.0], params, &mut out)?;
/// assert_eq!(out, [12.0, 8.0, 13.0, 10.0]);
/// # Ok::<(), Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn ties<T: Element, O: Element>(
    cpu: &Cpu,
    base: &[T],
    taus: &[&[T]],
    weights: &[f32],
    params: TiesParams,
    out: &mut [O],
) -> Result<()> {
    validate_ties_elect(
        base.len(),
        taus.iter().map(|t| t.len()),
        weights,
        params.lambda,
        out.len(),
    )?;
    let mut trimmed = alloc::vec::Vec::with_capacity(taus.len());
    for tau in taus {
        let mut t = alloc::vec![T::from_f32(0.0); tau.len()];
        crate::masks::ties_trim(cpu, tau, params.keep, &mut t)?;
        trimmed.push(t);
    }
    let views: alloc::vec::Vec<&[T]> = trimmed.iter().map(alloc::vec::Vec::as_slice).collect();
    ties_elect(cpu, base, &views, weights, params.lambda, out)
}

/// Elements summed in `f32` lanes before the partial sum is added to the `f64` total.
///
/// PERF: `f32` lanes keep the loop at full vector width; flushing every block into `f64` bounds
/// the error by the block, not by the slice length (see [`SUM_SQUARES_RELATIVE_TOLERANCE`]).
const SUM_SQUARES_BLOCK: usize = 4096;

/// Independent accumulators per vector lane: enough to hide the FMA latency.
const SUM_ACCUMULATORS: usize = 4;

/// Relative error bound of [`sum_squares`] against exact arithmetic on the widened inputs.
///
/// Terms are non-negative, so each `f32` accumulator of at most `SUM_SQUARES_BLOCK / 4 + 1`
/// terms has relative error below `(terms + 1) u` with `u = 2^-24`, the lane and accumulator
/// reduction adds `log2(64) + 1` roundings, and the `f64` totals add a negligible amount.
pub const SUM_SQUARES_RELATIVE_TOLERANCE: f64 =
    (SUM_SQUARES_BLOCK / SUM_ACCUMULATORS + 2 + 7) as f64 * (f32::EPSILON as f64 / 2.0);

struct SumSquares<'a, T>(&'a [T]);

impl<T: Element> WithSimd for SumSquares<'_, T> {
    type Output = f64;

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> f64 {
        let mut total = 0.0f64;
        for block in self.0.chunks(SUM_SQUARES_BLOCK) {
            let mut acc = [s.zero(); SUM_ACCUMULATORS];
            let mut groups = block.chunks_exact(SUM_ACCUMULATORS * S::LANES);
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
            let sum = s.reduce_sum(lanes) + tail;
            // An `f32` square overflows above |x| ~ 1.8e19 and is lost below ~ 1e-22; a block
            // whose sum is infinite or below `SQUARES_IN_F64_BELOW` is summed again in `f64`
            // (NaN too, which stays NaN), unless it is all zeros (sparse Fisher diagonals have
            // many such blocks; the check is a vectorised fold over a block still in L1).
            let in_range = sum.is_finite()
                && (sum >= SQUARES_IN_F64_BELOW
                    || block
                        .iter()
                        .fold(true, |zero, v| zero & (v.to_f32() == 0.0)));
            total += if in_range {
                f64::from(sum)
            } else {
                block
                    .iter()
                    .map(|v| f64::from(v.to_f32()) * f64::from(v.to_f32()))
                    .sum()
            };
        }
        total
    }
}

/// `sum x^2`, the fast twin of [`kernels_core::ops::merge::sum_squares_ref`]: within
/// [`SUM_SQUARES_RELATIVE_TOLERANCE`] of it (NaN and infinity propagate). Summed tensor by tensor
/// over a model's Fisher, it gives the squared norm [`FisherParams::with_normalization`] takes.
///
/// ```
/// use kernels_cpu::prelude::*;
/// assert_eq!(sum_squares(&Cpu::detect(), &[3.0f32, 4.0])?, 25.0);
/// # Ok::<(), Error>(())
/// ```
///
/// # Errors
///
/// None on the CPU (any slice has a sum of squares); the `Result` is the GPU op's, which reads
/// the device back.
pub fn sum_squares<T: Element>(cpu: &Cpu, x: &[T]) -> Result<f64> {
    // Chunks' totals are added in chunk order, so the result is the same bits for any thread
    // count; a round of chunks at a time keeps the totals on the stack (no `alloc` needed).
    let mut total = 0.0f64;
    for round in x.chunks(SUM_SQUARES_CHUNK * SUM_SQUARES_ROUND) {
        let mut totals = [0.0f64; SUM_SQUARES_ROUND];
        let chunks = round.len().div_ceil(SUM_SQUARES_CHUNK);
        split_outputs(
            cpu,
            &mut totals[..chunks],
            SUM_SQUARES_CHUNK * size_of::<T>(),
            1,
            |range, totals| {
                for (c, total) in range.zip(totals) {
                    let chunk = &round[c * SUM_SQUARES_CHUNK..];
                    *total = cpu.dispatch(SumSquares(&chunk[..SUM_SQUARES_CHUNK.min(chunk.len())]));
                }
            },
        );
        total += totals[..chunks].iter().sum::<f64>();
    }
    Ok(total)
}

/// Elements per chunk of [`sum_squares`]: a unit of work handed to a thread.
const SUM_SQUARES_CHUNK: usize = 1 << 18;
/// Chunks of [`sum_squares`] split over threads at once.
const SUM_SQUARES_ROUND: usize = 64;

#[cfg(test)]
mod sum_squares_tests {
    use super::*;
    use alloc::vec::Vec;
    use half::{bf16, f16};
    use kernels_core::CounterRng;
    use kernels_core::ops::merge::sum_squares_ref;
    use proptest::prelude::*;

    fn check<T: Element>(x: &[T]) {
        let expect = sum_squares_ref(x);
        for cpu in Cpu::all_available() {
            let got = sum_squares(&cpu, x).unwrap();
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
    fn threads_split_chunks_and_rounds_without_changing_a_bit() {
        // Two rounds and a partial chunk: every part boundary the split can make.
        let n = SUM_SQUARES_CHUNK * (SUM_SQUARES_ROUND + 3) + 17;
        let x = data::<bf16>(n, 5);
        let expect = sum_squares_ref(&x);
        for cpu in Cpu::all_available() {
            let alone = sum_squares(&cpu.with_threads(1).unwrap(), &x).unwrap();
            assert!((alone - expect).abs() <= SUM_SQUARES_RELATIVE_TOLERANCE * expect);
            for threads in [2, 3] {
                let cpu = cpu
                    .with_threads(threads)
                    .unwrap()
                    .with_min_bytes_per_thread(1);
                assert_eq!(sum_squares(&cpu, &x).unwrap().to_bits(), alone.to_bits());
                let spinning = cpu.with_spinning_team();
                assert_eq!(
                    sum_squares(&spinning, &x).unwrap().to_bits(),
                    alone.to_bits()
                );
            }
        }
    }

    #[test]
    fn non_finite_values_propagate() {
        for cpu in Cpu::all_available() {
            assert!(
                sum_squares(&cpu, &[1.0f32, f32::NAN, 2.0])
                    .unwrap()
                    .is_nan()
            );
            assert_eq!(
                sum_squares(
                    &cpu,
                    &[1.0f32; 40].map(|v| if v > 0.0 { f32::INFINITY } else { v })
                )
                .unwrap(),
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
