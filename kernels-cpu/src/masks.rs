//! Task-vector masks at memory speed: DARE (random drop and rescale), TIES trim and Model
//! Breadcrumbs (magnitude masks), the fast twins of `kernels_core::ops::merge`.
//!
//! # Contracts
//!
//! * **Masks are bit-identical** to the reference: DARE draws the same Philox words (the
//!   generator runs vectorised, four to sixteen counters per instruction) against the same integer
//!   threshold, for any chunking (`first_index`) and thread count; TIES trim and Breadcrumbs
//!   select exactly ([`crate::select`]).
//! * **Values**: TIES trim and Breadcrumbs copy the kept entries; DARE computes each survivor as
//!   the reference does (`f64` product, one rounding), bit-identical for
//!   [`DareRescale::InverseKeep`] and [`DareRescale::None`]. For [`DareRescale::PreserveL1`] the
//!   two `f64` L1 sums are added in another order, so survivors are within
//!   [`DARE_L1_RELATIVE_TOLERANCE`] of the reference.

pub use kernels_core::ops::merge::{BreadcrumbsParams, DareParams, DareRescale, DellaParams};
use kernels_core::ops::merge::{della_row, l1_scale};
use kernels_core::ops::select::KeepRule;
use kernels_core::{CounterRng, Element, Error, Result};

use crate::parallel::split_outputs;
use crate::select::{GROUP, KeepValues, Parts, apply_cuts_to, check_out, top_ks, topk_keep};
use crate::simd::{stream_head, widened};
use crate::{Cpu, Simd, WithSimd};

/// Relative bound on a [`DareRescale::PreserveL1`] survivor against the reference: the scale
/// `l1_all / l1_kept` comes from two sums of up to `n` terms in another order (each within
/// `n u_64` relative), then one `f32` rounding of the product (half an `f32` ulp) may land on the
/// other side.
pub const DARE_L1_RELATIVE_TOLERANCE: f64 = f32::EPSILON as f64;

/// How far ahead DARE prefetches its input.
const PREFETCH_BYTES: usize = 2048;

/// Elements per block of the L1 sums (blocks are summed in order, whatever the threads).
const L1_BLOCK: usize = 4096;

/// The keep-bits of the 64 elements `first .. first + 64` (`first` a multiple of 4).
#[inline(always)]
fn dare_bits<S: Simd>(s: S, key: [u32; 2], first: u64, threshold: u32) -> u64 {
    s.philox_u24_at_least(first / 4, key, threshold)
}

/// DARE over one part: `out_i = tau_i * scale` where element `first + i` survives, else 0.
struct Dare<'a, T> {
    tau: &'a [T],
    first: u64,
    rng: CounterRng,
    threshold: u32,
    scale: f64,
    /// Write past the caches, from the output's first 64-byte boundary.
    streaming: bool,
    out: &'a mut [f32],
}

impl<T: Element> WithSimd for Dare<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let Self {
            tau,
            first,
            rng,
            threshold,
            scale,
            streaming,
            out,
        } = self;
        let survivor = |v: f32, keep: bool| {
            if keep {
                (f64::from(v) * scale) as f32
            } else {
                0.0
            }
        };
        let head = stream_head(out, streaming);
        for i in 0..head {
            let keep = rng.u24_at(first + i as u64) >= threshold;
            out[i] = survivor(tau[i].to_f32(), keep);
        }
        if head == tau.len() {
            return;
        }
        // Groups start `shift` elements into a Philox block: each group's keep-bits are the top
        // of one 64-element window of draws and the bottom of the next, one window per group.
        let at = first + head as u64;
        let (block, shift) = (at / 4, at % 4);
        let window = |g: usize| s.philox_u24_at_least(block + 16 * g as u64, rng.key(), threshold);
        let mut low = window(0);
        for (g, (t, o)) in tau[head..]
            .chunks(GROUP)
            .zip(out[head..].chunks_mut(GROUP))
            .enumerate()
        {
            // PERF: the draws take long enough that the next groups' loads must be in flight.
            let ahead = head + g * GROUP + PREFETCH_BYTES / core::mem::size_of::<T>();
            for line in (0..GROUP).step_by(64 / core::mem::size_of::<T>()) {
                if let Some(v) = tau.get(ahead + line) {
                    s.prefetch(v);
                }
            }
            let high = window(g + 1);
            let bits = if shift == 0 {
                low
            } else {
                (low >> shift) | (high << (64 - shift))
            };
            low = high;
            // PERF: every product in f64 lanes (the reference's rounding), then the survivors
            // kept with one masked move per vector.
            let main = o.len() - o.len() % S::LANES;
            for (v, (o, t)) in o[..main]
                .chunks_exact_mut(S::LANES)
                .zip(t.chunks_exact(S::LANES))
                .enumerate()
            {
                let kept = s.keep_lanes(
                    (bits >> (v * S::LANES)) as u32,
                    s.mul_f64_rounded(s.load(t), scale),
                );
                if streaming {
                    s.store_streaming(kept, o);
                } else {
                    s.store(kept, o);
                }
            }
            for j in main..o.len() {
                o[j] = survivor(t[j].to_f32(), (bits >> j) & 1 == 1);
            }
        }
        if streaming {
            s.stream_fence();
        }
    }
}

/// `(sum |tau|, sum of |tau| over survivors)` per [`L1_BLOCK`] of one part.
struct L1Sums<'a, T> {
    tau: &'a [T],
    first: u64,
    rng: CounterRng,
    threshold: u32,
    sums: &'a mut [(f64, f64)],
}

impl<T: Element> WithSimd for L1Sums<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let mut buffer = [0.0f32; GROUP];
        let rng = self.rng;
        for (b, (block, sum)) in self
            .tau
            .chunks(L1_BLOCK)
            .zip(self.sums.iter_mut())
            .enumerate()
        {
            let start = self.first + (b * L1_BLOCK) as u64;
            let (mut all, mut kept) = ([0.0f64; GROUP], [0.0f64; GROUP]);
            for (g, t) in block.chunks(GROUP).enumerate() {
                let at = start + (g * GROUP) as u64;
                let bits = if at.is_multiple_of(4) && t.len() == GROUP {
                    dare_bits(s, rng.key(), at, self.threshold)
                } else {
                    (0..t.len()).fold(0, |bits, j| {
                        bits | (u64::from(rng.u24_at(at + j as u64) >= self.threshold) << j)
                    })
                };
                let values = widened(s, t, &mut buffer);
                for (j, &v) in values[..t.len()].iter().enumerate() {
                    let a = f64::from(v.abs());
                    all[j] += a;
                    kept[j] += if (bits >> j) & 1 == 1 { a } else { 0.0 };
                }
            }
            *sum = (all.iter().sum(), kept.iter().sum());
        }
    }
}

/// DARE (the twin of [`kernels_core::ops::merge::dare_ref`]): `out_i = tau_i * scale` where
/// element `first_index + i` survives its draw, else 0; threaded. `first_index` is the flat index
/// of `tau[0]` in the whole tensor, so any chunking draws the same mask.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let tau = [1.0f32; 1000];
/// let mut out = [0.0f32; 1000];
/// dare(&Cpu::detect(), &tau, DareParams::default().with_drop(0.5).with_seed(7), 0, &mut out)?;
/// // Survivors are rescaled by 1 / (1 - p); about half survive.
/// assert!(out.iter().all(|&v| v == 0.0 || v == 2.0));
/// let kept = out.iter().filter(|&&v| v != 0.0).count();
/// assert!((400..600).contains(&kept));
/// # Ok::<(), Error>(())
/// ```
pub fn dare<T: Element>(
    cpu: &Cpu,
    tau: &[T],
    params: DareParams,
    first_index: u64,
    out: &mut [f32],
) -> Result<()> {
    check_out(tau.len(), out.len())?;
    kernels_core::backend::validate_dare(params, first_index, tau.len())?;
    let rng = CounterRng::new(params.seed);
    let threshold = params.drop_threshold();
    let scale = match params.rescale {
        DareRescale::InverseKeep => 1.0 / (1.0 - params.drop),
        DareRescale::None => 1.0,
        DareRescale::PreserveL1 => {
            let mut sums = alloc::vec![(0.0, 0.0); tau.len().div_ceil(L1_BLOCK)];
            split_outputs(
                cpu,
                &mut sums,
                L1_BLOCK * core::mem::size_of::<T>(),
                1,
                |range, sums| {
                    let start = range.start * L1_BLOCK;
                    let end = (range.end * L1_BLOCK).min(tau.len());
                    cpu.dispatch(L1Sums {
                        tau: &tau[start..end],
                        first: first_index + start as u64,
                        rng,
                        threshold,
                        sums,
                    });
                },
            );
            let (all, kept) = sums
                .iter()
                .fold((0.0, 0.0), |(a, k), &(ba, bk)| (a + ba, k + bk));
            l1_scale(all, kept)
        }
        // `DareRescale` is non-exhaustive: a rule added later must be implemented here.
        _ => {
            return Err(Error::Unsupported {
                feature: "this DARE rescale rule",
                hint: "update kernels-cpu",
            });
        }
    };
    let streaming = cpu.streams(out);
    split_outputs(
        cpu,
        out,
        4 + core::mem::size_of::<T>(),
        GROUP,
        |range, out| {
            cpu.dispatch(Dare {
                tau: &tau[range.clone()],
                first: first_index + range.start as u64,
                rng,
                threshold,
                scale,
                streaming,
                out,
            });
        },
    );
    Ok(())
}

/// DELLA's `MagPrune` (the twin of [`kernels_core::ops::merge::della_ref`]): in rows of `cols`,
/// each entry survives with a probability that rises with its magnitude rank in the row
/// ([`DellaParams`]); rows run in parallel through the reference's own row kernel
/// ([`kernels_core::ops::merge::della_row`]: ranking is a sort, not a vector loop). The mask is bit-identical to the
/// reference's; survivors are too for [`DareRescale::InverseKeep`] and [`DareRescale::None`], and
/// within [`DARE_L1_RELATIVE_TOLERANCE`] for [`DareRescale::PreserveL1`] (its sums are added row
/// by row).
///
/// ```
/// use kernels_cpu::prelude::*;
/// let tau: Vec<f32> = (0..4000).map(|i| ((i * 7919) % 1000) as f32 - 500.0).collect();
/// let mut out = vec![0.0f32; 4000];
/// della(&Cpu::detect(), &tau, 1000, DellaParams::new(0.3, 0.2, 5), 0, &mut out)?;
/// let kept = out.iter().filter(|&&v| v != 0.0).count();
/// assert!((1000..1400).contains(&kept)); // density 0.3 on average
/// # Ok::<(), Error>(())
/// ```
pub fn della<T: Element>(
    cpu: &Cpu,
    tau: &[T],
    cols: usize,
    params: DellaParams,
    first_index: u64,
    out: &mut [f32],
) -> Result<()> {
    kernels_core::backend::validate_della(params, cols, first_index, tau.len(), out.len())?;
    if !matches!(
        params.rescale,
        DareRescale::PreserveL1 | DareRescale::InverseKeep | DareRescale::None
    ) {
        return Err(Error::Unsupported {
            feature: "this DELLA rescale rule",
            hint: "update kernels-cpu",
        });
    }
    if params.density >= 1.0 {
        for (o, t) in out.iter_mut().zip(tau) {
            *o = t.to_f32();
        }
        return Ok(());
    }
    let rows = tau.len() / cols.max(1);
    let mut sums = alloc::vec![(0.0f64, 0.0f64); rows];
    let rng = CounterRng::new(params.seed);
    // PERF: a row is the unit of work (its ranking needs all of it); a part gets whole rows.
    let row_bytes = cols * (core::mem::size_of::<T>() + 4);
    let parts =
        crate::parallel::parts_for(cpu.threads(), rows * row_bytes, cpu.min_bytes_per_thread());
    let step = rows.div_ceil(parts.max(1)).max(1);
    let jobs: alloc::vec::Vec<_> = out
        .chunks_mut(step * cols.max(1))
        .zip(sums.chunks_mut(step))
        .enumerate()
        .collect();
    crate::parallel::for_each(jobs, |(part, (out, sums))| {
        let (mut order, mut ranks) = (alloc::vec![0u32; cols], alloc::vec![0u32; cols]);
        let first_row = part * step;
        for (r, (out_row, sum)) in out.chunks_mut(cols).zip(sums.iter_mut()).enumerate() {
            let start = (first_row + r) * cols;
            *sum = della_row(
                &tau[start..start + cols],
                first_index + start as u64,
                params,
                &rng,
                &mut order,
                &mut ranks,
                out_row,
            );
        }
    });
    if params.rescale == DareRescale::PreserveL1 {
        let (all, kept) = sums
            .iter()
            .fold((0.0, 0.0), |(a, k), &(ra, rk)| (a + ra, k + rk));
        let scale = l1_scale(all, kept);
        split_outputs(cpu, out, 8, GROUP, |_, out| {
            for o in out {
                *o = (f64::from(*o) * scale) as f32;
            }
        });
    }
    Ok(())
}

/// The L1-preserving rescale (the twin of [`kernels_core::ops::merge::preserve_l1_ref`]):
/// multiplies `sparse` by `||original||_1 / ||sparse||_1` and returns the scale (`0`, leaving
/// `sparse` as it is, where `sparse` is all zeros), for mergekit's `rescale: true` on a trimmed
/// or Breadcrumbs-masked task vector. Survivors within [`DARE_L1_RELATIVE_TOLERANCE`] of the
/// reference's (the sums are added block by block).
///
/// ```
/// use kernels_cpu::prelude::*;
/// let original = [4.0f32, -1.0, 0.5, -2.5];
/// let mut trimmed = [0.0f32; 4];
/// ties_trim(&Cpu::detect(), &original, KeepRule::Count(2), &mut trimmed)?;
/// let scale = preserve_l1(&Cpu::detect(), &original, &mut trimmed)?;
/// assert_eq!((scale, trimmed.iter().map(|v| v.abs()).sum::<f32>()), (8.0 / 6.5, 8.0));
/// # Ok::<(), Error>(())
/// ```
pub fn preserve_l1<T: Element>(cpu: &Cpu, original: &[T], sparse: &mut [f32]) -> Result<f64> {
    check_out(original.len(), sparse.len())?;
    let mut sums = alloc::vec![(0.0f64, 0.0f64); original.len().div_ceil(L1_BLOCK)];
    let bytes = L1_BLOCK * (core::mem::size_of::<T>() + 4);
    let sparse_view: &[f32] = sparse;
    split_outputs(cpu, &mut sums, bytes, 1, |range, sums| {
        for (b, sum) in range.zip(sums) {
            let block = b * L1_BLOCK..((b + 1) * L1_BLOCK).min(original.len());
            let all = original[block.clone()]
                .iter()
                .map(|v| f64::from(v.to_f32()).abs())
                .sum();
            let kept = sparse_view[block].iter().map(|v| f64::from(v.abs())).sum();
            *sum = (all, kept);
        }
    });
    let (all, kept) = sums
        .iter()
        .fold((0.0, 0.0), |(a, k), &(ba, bk)| (a + ba, k + bk));
    let scale = l1_scale(all, kept);
    if kept > 0.0 {
        split_outputs(cpu, sparse, 8, GROUP, |_, out| {
            for o in out {
                *o = (f64::from(*o) * scale) as f32;
            }
        });
    }
    Ok(scale)
}

/// TIES trim (the twin of [`kernels_core::ops::merge::ties_trim_ref`]): `out` keeps what `keep`
/// keeps of `tau` by magnitude (ties by lower index), zero elsewhere, written as `O` (`T` itself
/// keeps the model's width; `f32` is exact too). [`crate::select::topk_keep`] under its TIES
/// name.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let tau = [bf16::from_f32(0.5), bf16::from_f32(-3.0), bf16::from_f32(1.0), bf16::from_f32(2.0)];
/// let mut trimmed = [bf16::ZERO; 4];
/// ties_trim(&Cpu::detect(), &tau, KeepRule::Density(0.5), &mut trimmed)?;
/// assert_eq!(trimmed.map(bf16::to_f32), [0.0, -3.0, 0.0, 2.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn ties_trim<T: Element, O: Element>(
    cpu: &Cpu,
    tau: &[T],
    keep: KeepRule,
    out: &mut [O],
) -> Result<()> {
    topk_keep(cpu, tau, keep, out)
}

/// Model Breadcrumbs (the twin of [`kernels_core::ops::merge::breadcrumbs_ref`]): keeps the
/// entries whose magnitude rank lies in `[top, top + keep)` of [`BreadcrumbsParams::counts`],
/// zero elsewhere.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let tau = [0.1f32, -5.0, 0.3, 0.2, -0.4, 0.05, 3.0, 0.01, -0.2, 0.6];
/// let mut out = [0.0f32; 10];
/// // Drop the top 10 % (the -5.0), keep the next 50 %.
/// let params = BreadcrumbsParams::default().with_density(0.5).with_gamma(0.1);
/// breadcrumbs(&Cpu::detect(), &tau, params, &mut out)?;
/// assert_eq!(out, [0.0, 0.0, 0.3, 0.2, -0.4, 0.0, 3.0, 0.0, 0.0, 0.6]);
/// # Ok::<(), Error>(())
/// ```
pub fn breadcrumbs<T: Element>(
    cpu: &Cpu,
    tau: &[T],
    params: BreadcrumbsParams,
    out: &mut [f32],
) -> Result<()> {
    check_out(tau.len(), out.len())?;
    let (top, keep) = params.counts(tau.len() as u64)?;
    let slices = [tau];
    let parts = Parts::new(cpu, &slices, GROUP);
    // One selection pass finds both cuts.
    let [outer, outliers] = top_ks(cpu, &parts, [top + keep, top])?;
    let sinks = parts
        .split(out, 1)
        .into_iter()
        .map(|out| KeepValues {
            out,
            select: |kept: [u32; 2]| kept[0] & !kept[1],
            equal: None,
        })
        .collect();
    apply_cuts_to(cpu, &parts, [&outer, &outliers], sinks)
}
