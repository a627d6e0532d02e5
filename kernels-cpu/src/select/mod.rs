//! Exact magnitude selection in O(n): the k-th largest magnitude, the top-k cut, mask and
//! indices, over one slice or many slices taken as one flat vector (a whole model).
//!
//! # Contracts
//!
//! Those of [`kernels_core::ops::select`], bit for bit: order by `|x|` through the integer image
//! [`magnitude_key`](kernels_core::ops::select::magnitude_key), exactly `k` kept, ties by lower
//! flat index, `0 <= k <= n`, any non-finite entry an [`Error::NonFinite`](kernels_core::Error::NonFinite)
//! naming its flat index.
//!
//! # Algorithm
//!
//! A select on the key, no sort and no copy of the data. To find the key of rank `r`:
//!
//! 1. **Bracket** (vectors of more than `SAMPLED_MIN` (65 536) entries): the keys of an evenly spread
//!    sample of up to 4096 runs of 64 entries give a key interval `[lo, hi]`
//!    that holds rank `r` with high probability (3.5 standard deviations of the
//!    sample rank on each side).
//! 2. **One pass**, vectorised and threaded: count the keys below `lo` and copy out the few keys
//!    inside `[lo, hi]`. If the rank falls inside, a select over the copied keys gives the exact
//!    key, and how many entries equal to it each thread's part holds.
//! 3. **Fallback** (small vectors, or a bracket that missed): an exact two-pass radix select,
//!    counts per `high_bin` (the top 15 bits of the key), then per `low_bin` within the bin
//!    holding the rank, through `MagnitudeHistogram` and `MagnitudeBracket` of `kernels_core::backend`.
//!
//! Masks, indices and masked copies then apply the cut in one more pass: keep `key > cut`, and
//! entries equal to it while the part's share of the ties lasts. Each part knows how many equal
//! entries the parts before it hold, so threading never changes which ties are kept, and the
//! sample only decides the speed, never the result.

use alloc::vec::Vec;

use kernels_core::ops::select::Selection;
pub use kernels_core::ops::select::{KeepRule, TopKCut};
use kernels_core::{Element, Result};

mod apply;
mod parts;
mod rank;
mod streaming;

pub(crate) use apply::{Keep, KeepValues, apply_cuts, apply_cuts_to};
pub(crate) use parts::{Parts, map_parts};
pub(crate) use rank::{Cut, observe_chunk, rank_keys, refine_chunk, top_k, top_ks, validate};
pub use streaming::{StreamingTopK, TopKApplier};

use crate::Cpu;

/// How far ahead the passes prefetch. PERF: one sequential stream per thread leaves the
/// hardware prefetcher short of DRAM bandwidth.
pub(crate) const PREFETCH_BYTES: usize = 2048;

/// The key of infinity: the largest a cut may take (`key > it` never holds for finite data).
pub(crate) const INFINITY_KEY: u32 = 0x7F80_0000;

/// Keep-bits are made for this many elements at a time (one `u64` word).
pub(crate) const GROUP: usize = 64;

/// The cut of what `keep` keeps of `parts`, validating every entry.
fn cut_for<T: Element>(cpu: &Cpu, parts: &Parts<'_, T>, keep: KeepRule) -> Result<Cut> {
    match keep.selection(parts.total)? {
        Selection::Top(k) => top_k(cpu, parts, k),
        Selection::Cut(cut) => {
            validate(cpu, parts)?;
            Ok(Cut::uniform(cut, parts))
        }
    }
}

/// The cut of what `keep` keeps of `slices` taken as one vector (the twin of
/// [`kernels_core::ops::select::topk_cut_ref`]): one pass over the data, no copy. Apply it
/// tensor by tensor with a [`TopKApplier`].
///
/// ```
/// use kernels_cpu::prelude::*;
/// let model: [&[f32]; 2] = [&[0.5, -3.0, 1.0], &[2.0, -2.0]];
/// let cut = topk_cut(&Cpu::detect(), &model, KeepRule::Count(2))?;
/// // Keep |x| > 2 and the first entry equal to 2 in flat order.
/// assert_eq!(cut, TopKCut { magnitude: 2.0, ties: 1 });
/// # Ok::<(), Error>(())
/// ```
pub fn topk_cut<T: Element>(cpu: &Cpu, slices: &[&[T]], keep: KeepRule) -> Result<TopKCut> {
    Ok(cut_for(cpu, &Parts::new(cpu, slices, 1), keep)?.cut)
}

/// The k-th largest magnitude of `slices` taken as one vector, `1 <= k <= n` (the twin of
/// [`kernels_core::ops::select::kth_largest_magnitude_ref`]).
///
/// ```
/// use kernels_cpu::prelude::*;
/// let model: [&[f32]; 2] = [&[0.5, -3.0, 1.0], &[2.0, -2.0]];
/// assert_eq!(kth_largest_magnitude(&Cpu::detect(), &model, 4)?, 1.0);
/// # Ok::<(), Error>(())
/// ```
pub fn kth_largest_magnitude<T: Element>(cpu: &Cpu, slices: &[&[T]], k: u64) -> Result<f32> {
    kernels_core::backend::check_kth(k)?;
    topk_cut(cpu, slices, KeepRule::Count(k)).map(|cut| cut.magnitude)
}

/// What `keep` keeps of `x`, as a bitmask: bit `i % 64` of `mask[i / 64]` is set iff entry `i`
/// is kept (`mask.len() == ceil(n / 64)`; unused bits of the last word are cleared). The twin of
/// [`kernels_core::ops::select::topk_mask_ref`]; across tensors, use [`TopKApplier::mask`].
///
/// ```
/// use kernels_cpu::prelude::*;
/// let mut mask = [0u64; 1];
/// topk_mask(&Cpu::detect(), &[0.5f32, -3.0, 1.0, 2.0], KeepRule::Density(0.5), &mut mask)?;
/// assert_eq!(mask, [0b1010]);
/// # Ok::<(), Error>(())
/// ```
pub fn topk_mask<T: Element>(cpu: &Cpu, x: &[T], keep: KeepRule, mask: &mut [u64]) -> Result<()> {
    check_mask_len(x.len(), mask.len())?;
    let slices = [x];
    let parts = Parts::new(cpu, &slices, GROUP);
    let cut = cut_for(cpu, &parts, keep)?;
    // Parts start on multiples of 64: each owns whole words.
    let words = parts.split(mask, GROUP);
    apply_cuts(
        cpu,
        &parts,
        [&cut],
        words,
        #[inline(always)]
        |words, at, _, keep| {
            words[at / GROUP] = keep.bits[0];
        },
    )
}

/// What `keep` keeps of `x`, as values: `out = kept ? x : 0`, written as `O` (`T` itself, or
/// `f32`: exact; a narrower type rounds). TIES trimming ([`crate::masks::ties_trim`]) is this op.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let mut out = [0.0f32; 4];
/// topk_keep(&Cpu::detect(), &[0.5f32, -3.0, 1.0, 2.0], KeepRule::Threshold(0.75), &mut out)?;
/// assert_eq!(out, [0.0, -3.0, 1.0, 2.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn topk_keep<T: Element, O: Element>(
    cpu: &Cpu,
    x: &[T],
    keep: KeepRule,
    out: &mut [O],
) -> Result<()> {
    check_out(x.len(), out.len())?;
    let slices = [x];
    let parts = Parts::new(cpu, &slices, GROUP);
    let cut = cut_for(cpu, &parts, keep)?;
    let sinks = parts
        .split(out, 1)
        .into_iter()
        .map(|out| KeepValues {
            out,
            select: |kept: [u32; 1]| kept[0],
            equal: None,
        })
        .collect();
    apply_cuts_to(cpu, &parts, [&cut], sinks)
}

/// Flat indices of what `keep` keeps of `slices` taken as one vector, ascending, into `out`
/// (cleared first; its allocation is reused). The twin of
/// [`kernels_core::ops::select::topk_indices_ref`].
///
/// ```
/// use kernels_cpu::prelude::*;
/// let model: [&[f32]; 2] = [&[0.5, -3.0, 1.0], &[2.0, -2.0]];
/// let mut kept = Vec::new();
/// topk_indices(&Cpu::detect(), &model, KeepRule::Count(3), &mut kept)?;
/// assert_eq!(kept, [1, 3, 4]);
/// # Ok::<(), Error>(())
/// ```
pub fn topk_indices<T: Element>(
    cpu: &Cpu,
    slices: &[&[T]],
    keep: KeepRule,
    out: &mut Vec<u64>,
) -> Result<()> {
    let parts = Parts::new(cpu, slices, GROUP);
    let cut = cut_for(cpu, &parts, keep)?;
    // Pass 1 counts what each part keeps, so in pass 2 each part writes its own share of `out`.
    let mut counts = alloc::vec![0usize; parts.pieces.len()];
    apply_cuts(
        cpu,
        &parts,
        [&cut],
        counts.iter_mut().collect(),
        #[inline(always)]
        |count, _, _, keep| **count += keep.bits[0].count_ones() as usize,
    )?;
    out.clear();
    out.resize(counts.iter().sum(), 0);
    let mut shares = Vec::with_capacity(counts.len());
    let mut rest = &mut out[..];
    for (&count, range) in counts.iter().zip(&parts.bounds) {
        let (share, tail) = rest.split_at_mut(count);
        shares.push((share, 0usize, range.start as u64));
        rest = tail;
    }
    apply_cuts(
        cpu,
        &parts,
        [&cut],
        shares,
        #[inline(always)]
        |(share, filled, start), at, _, keep| {
            let mut bits = keep.bits[0];
            while bits != 0 {
                share[*filled] = *start + at as u64 + u64::from(bits.trailing_zeros());
                *filled += 1;
                bits &= bits - 1;
            }
        },
    )
}

/// Checks that an output is as long as its input.
pub(crate) fn check_out(n: usize, out: usize) -> Result<()> {
    if out == n {
        Ok(())
    } else {
        Err(kernels_core::Error::LengthMismatch {
            what: "out",
            expected: n,
            found: out,
        })
    }
}

pub(crate) fn check_mask_len(n: usize, words: usize) -> Result<()> {
    if words == n.div_ceil(GROUP) {
        Ok(())
    } else {
        Err(kernels_core::Error::LengthMismatch {
            what: "mask (words)",
            expected: n.div_ceil(GROUP),
            found: words,
        })
    }
}
