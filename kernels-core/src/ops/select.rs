//! Magnitude selection: top-k, the k-th magnitude and quantiles, over one slice or over many
//! slices taken as one flat vector (a whole model), in memory or streamed chunk by chunk.
//!
//! # Contracts
//!
//! * Order is by magnitude `|x|`; `-0.0` and `0.0` tie, infinities are the largest. NaN has no
//!   magnitude: every selection returns [`Error::NonFinite`] for it.
//! * **Top-k** keeps exactly `k` entries (`0 <= k <= n`): those of largest magnitude, ties broken by
//!   lower flat index. It is described by a [`TopKCut`]: keep every entry with `|x| > magnitude`,
//!   plus the first `ties` entries (in flat order) with `|x| == magnitude`.
//! * A **density** `d` in `(0, 1]` keeps `floor(d n)` entries (mergekit's rule; see [`keep_count`]).
//! * Comparisons use the order-preserving integer image of `|x|` ([`magnitude_key`]), so every
//!   backend selects bit-identically.

use crate::Result;
use crate::error::check_param;
#[cfg(feature = "alloc")]
use crate::{Element, Error, error::check_finite};

/// The order-preserving `u32` image of `|x|`: for non-NaN `a`, `b`,
/// `|a| < |b|` iff `magnitude_key(a) < magnitude_key(b)`.
#[inline(always)]
#[must_use]
pub fn magnitude_key(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

/// The number of entries a density keeps: `floor(density * n)`, with `density` in `(0, 1]`.
pub fn keep_count(density: f64, n: u64) -> Result<u64> {
    check_param(
        "density",
        density,
        "in (0, 1]",
        density > 0.0 && density <= 1.0,
    )?;
    Ok(libm::floor(density * n as f64) as u64)
}

/// Where a top-k selection cuts (see the module contract).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TopKCut {
    /// The k-th largest magnitude (`+inf` when `k = 0`, with `ties = 0`).
    pub magnitude: f32,
    /// How many entries of exactly that magnitude are kept, first ones first.
    pub ties: u64,
}

impl TopKCut {
    /// The cut that keeps nothing.
    pub const NONE: Self = Self {
        magnitude: f32::INFINITY,
        ties: 0,
    };

    /// A selector that walks the entries in flat order, across any chunking.
    #[must_use]
    pub fn selector(&self) -> TopKSelector {
        TopKSelector {
            key: magnitude_key(self.magnitude),
            ties_left: self.ties,
        }
    }
}

/// Applies a [`TopKCut`] entry by entry, in flat order.
#[derive(Clone, Debug)]
pub struct TopKSelector {
    key: u32,
    ties_left: u64,
}

impl TopKSelector {
    /// Whether the next entry (in flat order) is kept.
    #[inline]
    pub fn keep(&mut self, x: f32) -> bool {
        let key = magnitude_key(x);
        if key > self.key {
            true
        } else if key == self.key && self.ties_left > 0 {
            self.ties_left -= 1;
            true
        } else {
            false
        }
    }
}

#[cfg(feature = "alloc")]
fn check_all_finite<T: Element>(slices: &[&[T]]) -> Result<u64> {
    let mut n = 0u64;
    for s in slices {
        check_finite("x", s).map_err(|e| match e {
            Error::NonFinite { what, index } => Error::NonFinite {
                what,
                index: index + n as usize,
            },
            other => other,
        })?;
        n += s.len() as u64;
    }
    Ok(n)
}

/// Flat indices of the top-k of `slices` taken as one vector, ascending (reference: a sort).
#[cfg(feature = "alloc")]
pub fn topk_global_ref<T: Element>(slices: &[&[T]], k: u64) -> Result<alloc::vec::Vec<u64>> {
    let n = check_all_finite(slices)?;
    check_param("k", k as f64, "at most the number of entries", k <= n)?;
    let mut order: alloc::vec::Vec<(u32, u64)> = slices
        .iter()
        .flat_map(|s| s.iter())
        .enumerate()
        .map(|(i, x)| (magnitude_key(x.to_f32()), i as u64))
        .collect();
    // Larger magnitude first; among equals, lower index first.
    order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut kept: alloc::vec::Vec<u64> = order[..k as usize].iter().map(|p| p.1).collect();
    kept.sort_unstable();
    Ok(kept)
}

/// Indices of the top-k of one slice, ascending.
#[cfg(feature = "alloc")]
pub fn topk_ref<T: Element>(x: &[T], k: usize) -> Result<alloc::vec::Vec<usize>> {
    Ok(topk_global_ref(&[x], k as u64)?
        .into_iter()
        .map(|i| i as usize)
        .collect())
}

/// The top-k of one slice as a mask (`true` = kept).
#[cfg(feature = "alloc")]
pub fn topk_mask_ref<T: Element>(x: &[T], k: usize) -> Result<alloc::vec::Vec<bool>> {
    let mut mask = alloc::vec![false; x.len()];
    for i in topk_ref(x, k)? {
        mask[i] = true;
    }
    Ok(mask)
}

/// The [`TopKCut`] of the top-k of `slices` taken as one vector (reference: a sort).
#[cfg(feature = "alloc")]
pub fn topk_cut_ref<T: Element>(slices: &[&[T]], k: u64) -> Result<TopKCut> {
    let kept = topk_global_ref(slices, k)?;
    let flat: alloc::vec::Vec<f32> = slices
        .iter()
        .flat_map(|s| s.iter().map(|x| x.to_f32()))
        .collect();
    let Some(smallest) = kept.iter().map(|&i| magnitude_key(flat[i as usize])).min() else {
        return Ok(TopKCut::NONE);
    };
    let ties = kept
        .iter()
        .filter(|&&i| magnitude_key(flat[i as usize]) == smallest)
        .count();
    Ok(TopKCut {
        magnitude: f32::from_bits(smallest),
        ties: ties as u64,
    })
}

/// The k-th largest magnitude, `1 <= k <= n` (reference: a sort).
#[cfg(feature = "alloc")]
pub fn kth_largest_magnitude_ref<T: Element>(slices: &[&[T]], k: u64) -> Result<f32> {
    check_param("k", k as f64, "at least 1", k >= 1)?;
    Ok(topk_cut_ref(slices, k)?.magnitude)
}

/// Bins of pass 1 of the streaming selection: the top 15 bits of the 31-bit [`magnitude_key`].
pub const HIGH_BINS: usize = 1 << 15;
/// Bins of pass 2: the low 16 bits of the key, inside one pass-1 bin.
pub const LOW_BINS: usize = 1 << 16;
/// The first pass-1 bin of non-finite magnitudes (infinity and NaN keys are `>= 0x7F80_0000`).
pub const FIRST_NON_FINITE_BIN: usize = 0x7F80;

/// The pass-1 bin of a key.
#[inline(always)]
#[must_use]
pub fn high_bin(key: u32) -> usize {
    (key >> 16) as usize & (HIGH_BINS - 1)
}

/// The pass-2 bin of a key.
#[inline(always)]
#[must_use]
pub fn low_bin(key: u32) -> usize {
    (key & 0xFFFF) as usize
}

/// Streaming exact selection, pass 1: a histogram of the top 15 bits of [`magnitude_key`]
/// (sign cleared, so 2^15 bins), fed chunk by chunk. Memory: 256 KiB, whatever `n`.
///
/// ```
/// # use kernels_core::ops::select::MagnitudeHistogram;
/// let chunks: [&[f32]; 2] = [&[0.5, -3.0, 1.0], &[2.0, -0.25]];
/// let mut pass1 = MagnitudeHistogram::new();
/// for c in chunks { pass1.observe(c)?; }
/// let mut pass2 = pass1.top_k(2)?;   // the two largest magnitudes: 3 and 2
/// for c in chunks { pass2.observe(c)?; }
/// let cut = pass2.cut()?;
/// assert_eq!((cut.magnitude, cut.ties), (2.0, 1));
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
#[derive(Clone, Debug)]
pub struct MagnitudeHistogram {
    counts: alloc::vec::Vec<u64>,
    total: u64,
}

#[cfg(feature = "alloc")]
impl Default for MagnitudeHistogram {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "alloc")]
impl MagnitudeHistogram {
    /// An empty histogram.
    #[must_use]
    pub fn new() -> Self {
        Self {
            counts: alloc::vec![0; HIGH_BINS],
            total: 0,
        }
    }

    /// Adds a chunk. NaN is an error (its index is relative to the chunk).
    pub fn observe<T: Element>(&mut self, chunk: &[T]) -> Result<()> {
        check_finite("chunk", chunk)?;
        for x in chunk {
            self.counts[high_bin(magnitude_key(x.to_f32()))] += 1;
        }
        self.total += chunk.len() as u64;
        Ok(())
    }

    /// Adds counts per bin ([`high_bin`]) that a fast backend gathered. Counts in the non-finite
    /// bins are an error: validate the data first, as [`Self::observe`] does.
    pub fn add_counts(&mut self, counts: &[u32]) -> Result<()> {
        crate::error::check_len("counts", HIGH_BINS, counts.len())?;
        add_counts(&mut self.counts, counts, &mut self.total);
        if self.counts[FIRST_NON_FINITE_BIN..].iter().any(|&c| c > 0) {
            return Err(Error::InvalidParam {
                name: "counts",
                value: FIRST_NON_FINITE_BIN as f64,
                expected: "no counts of non-finite magnitudes",
            });
        }
        Ok(())
    }

    /// Entries seen.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Pass 2 of finding the `rank`-th smallest magnitude (1-based, `1 <= rank <= total`).
    pub fn kth_smallest(&self, rank: u64) -> Result<MagnitudeBracket> {
        check_param(
            "rank",
            rank as f64,
            "in 1..=total",
            rank >= 1 && rank <= self.total,
        )?;
        let mut below = 0u64;
        for (bin, &count) in self.counts.iter().enumerate() {
            if below + count >= rank {
                return Ok(MagnitudeBracket {
                    high: bin as u32,
                    rank_in_bin: rank - below,
                    bin_count: count,
                    low_counts: alloc::vec![0; LOW_BINS],
                    seen: 0,
                });
            }
            below += count;
        }
        unreachable!("rank <= total, so some bin reaches it")
    }

    /// Pass 2 of a top-k selection (`0 <= k <= total`).
    pub fn top_k(&self, k: u64) -> Result<MagnitudeBracket> {
        check_param(
            "k",
            k as f64,
            "at most the number of entries",
            k <= self.total,
        )?;
        if k == 0 {
            return Ok(MagnitudeBracket::nothing());
        }
        self.kth_smallest(self.total - k + 1)
    }
}

#[cfg(feature = "alloc")]
fn add_counts(into: &mut [u64], counts: &[u32], total: &mut u64) {
    for (t, &c) in into.iter_mut().zip(counts) {
        *t += u64::from(c);
        *total += u64::from(c);
    }
}

/// Streaming exact selection, pass 2: the same chunks again, refined inside the bin that holds the
/// wanted rank. Gives the exact value ([`Self::value`]) and the top-k cut ([`Self::cut`]).
#[cfg(feature = "alloc")]
#[derive(Clone, Debug)]
pub struct MagnitudeBracket {
    high: u32,
    rank_in_bin: u64,
    bin_count: u64,
    low_counts: alloc::vec::Vec<u64>,
    seen: u64,
}

#[cfg(feature = "alloc")]
impl MagnitudeBracket {
    fn nothing() -> Self {
        Self {
            high: u32::MAX,
            rank_in_bin: 0,
            bin_count: 0,
            low_counts: alloc::vec::Vec::new(),
            seen: 0,
        }
    }

    /// Adds a chunk (the same data as pass 1, any chunking).
    pub fn observe<T: Element>(&mut self, chunk: &[T]) -> Result<()> {
        check_finite("chunk", chunk)?;
        if self.low_counts.is_empty() {
            return Ok(());
        }
        for x in chunk {
            let key = magnitude_key(x.to_f32());
            if high_bin(key) == self.high as usize {
                self.low_counts[low_bin(key)] += 1;
                self.seen += 1;
            }
        }
        Ok(())
    }

    /// The pass-1 bin whose entries pass 2 counts ([`high_bin`]), or `None` when the selection
    /// needs no second pass (top-0).
    #[must_use]
    pub fn bin(&self) -> Option<usize> {
        (!self.low_counts.is_empty()).then_some(self.high as usize)
    }

    /// Adds counts per [`low_bin`] of the entries of [`Self::bin`] that a fast backend gathered.
    pub fn add_counts(&mut self, counts: &[u32]) -> Result<()> {
        if self.low_counts.is_empty() {
            return Ok(());
        }
        crate::error::check_len("counts", LOW_BINS, counts.len())?;
        add_counts(&mut self.low_counts, counts, &mut self.seen);
        Ok(())
    }

    /// The key holding the wanted rank and the number of entries of the bin below that key.
    fn locate(&self) -> Result<(u32, u64)> {
        if self.seen != self.bin_count {
            return Err(Error::InvalidParam {
                name: "pass 2 data",
                value: self.seen as f64,
                expected: "the same entries as pass 1 (the bracketing bin count differs)",
            });
        }
        let mut below = 0u64;
        for (low, &count) in self.low_counts.iter().enumerate() {
            if below + count >= self.rank_in_bin {
                return Ok(((self.high << 16) | low as u32, below));
            }
            below += count;
        }
        unreachable!("rank_in_bin <= bin_count")
    }

    /// The selected magnitude (`+inf` for a top-0 selection).
    pub fn value(&self) -> Result<f32> {
        Ok(self.cut()?.magnitude)
    }

    /// The top-k cut (meaningful when this bracket came from [`MagnitudeHistogram::top_k`]).
    pub fn cut(&self) -> Result<TopKCut> {
        if self.low_counts.is_empty() {
            return Ok(TopKCut::NONE);
        }
        let (key, below_key) = self.locate()?;
        // The entries of this key hold ascending ranks below_key + 1 ..= below_key + equal; a top-k
        // keeps those from the wanted rank up.
        let equal = self.low_counts[low_bin(key)];
        let ties = below_key + equal + 1 - self.rank_in_bin;
        Ok(TopKCut {
            magnitude: f32::from_bits(key),
            ties,
        })
    }
}

/// The threshold of [`crate::ops::sparse::calibrate_threshold_ref`] over data too big for memory:
/// two passes of `chunks()`, each returning the same chunks in the same order.
#[cfg(feature = "alloc")]
pub fn calibrate_threshold_streaming<'a, T: Element, I>(
    mut chunks: impl FnMut() -> I,
    k: f64,
) -> Result<f32>
where
    I: Iterator<Item = &'a [T]>,
{
    let mut pass1 = MagnitudeHistogram::new();
    for c in chunks() {
        pass1.observe(c)?;
    }
    let rank = crate::ops::sparse::quantile_rank(pass1.total(), k)?;
    if rank == 0 {
        return Ok(0.0);
    }
    let mut pass2 = pass1.kth_smallest(rank)?;
    for c in chunks() {
        pass2.observe(c)?;
    }
    pass2.value()
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    #[test]
    fn topk_breaks_ties_by_lower_index() {
        let x = [1.0f32, -3.0, 2.0, 3.0, -2.0, 2.0];
        assert_eq!(topk_ref(&x, 0).unwrap(), Vec::<usize>::new());
        assert_eq!(topk_ref(&x, 1).unwrap(), [1]);
        assert_eq!(topk_ref(&x, 2).unwrap(), [1, 3]);
        assert_eq!(topk_ref(&x, 3).unwrap(), [1, 2, 3]);
        assert_eq!(topk_ref(&x, 4).unwrap(), [1, 2, 3, 4]);
        assert_eq!(topk_ref(&x, 6).unwrap(), [0, 1, 2, 3, 4, 5]);
        assert_eq!(
            topk_cut_ref(&[&x[..]], 4).unwrap(),
            TopKCut {
                magnitude: 2.0,
                ties: 2
            }
        );
        assert_eq!(kth_largest_magnitude_ref(&[&x[..]], 6).unwrap(), 1.0);
        // -0.0 and 0.0 tie.
        assert_eq!(topk_ref(&[0.0f32, -0.0, 0.0], 2).unwrap(), [0, 1]);
    }

    #[test]
    fn bad_selections_are_errors() {
        let x = [1.0f32, 2.0];
        assert!(matches!(
            topk_ref(&x, 3),
            Err(Error::InvalidParam { name: "k", .. })
        ));
        assert!(matches!(
            topk_global_ref(&[&x[..], &[0.0, f32::NAN]], 1),
            Err(Error::NonFinite { index: 3, .. })
        ));
        assert!(kth_largest_magnitude_ref(&[&x[..]], 0).is_err());
        assert!(keep_count(0.0, 10).is_err());
        assert!(keep_count(1.5, 10).is_err());
        assert!(keep_count(f64::NAN, 10).is_err());
        assert_eq!(keep_count(0.25, 10).unwrap(), 2);
        assert!(MagnitudeHistogram::new().kth_smallest(1).is_err());
        let mut h = MagnitudeHistogram::new();
        h.observe(&x).unwrap();
        let mut b = h.top_k(1).unwrap();
        b.observe(&[5.0f32]).unwrap();
        assert!(b.cut().is_err(), "pass 2 over different data is detected");
    }

    fn values() -> impl Strategy<Value = Vec<f32>> {
        // Few distinct magnitudes so ties are common; both signs; some exact zeros.
        prop::collection::vec((-8i32..=8).prop_map(|v| v as f32 * 0.25), 0..200)
    }

    proptest! {
        #[test]
        fn streaming_cut_equals_sorted_cut(x in values(), k_frac in 0.0f64..=1.0, split in 0usize..200) {
            let k = (k_frac * x.len() as f64) as u64;
            let split = split.min(x.len());
            let chunks = [&x[..split], &x[split..]];
            let mut pass1 = MagnitudeHistogram::new();
            for c in chunks { pass1.observe(c).unwrap(); }
            let mut pass2 = pass1.top_k(k).unwrap();
            for c in chunks { pass2.observe(c).unwrap(); }
            let cut = pass2.cut().unwrap();
            prop_assert_eq!(cut, topk_cut_ref(&chunks, k).unwrap());
            // The selector applied in flat order picks exactly the reference indices.
            let mut sel = cut.selector();
            let picked: Vec<u64> = (0..x.len() as u64).filter(|&i| sel.keep(x[i as usize])).collect();
            prop_assert_eq!(picked.len() as u64, k);
            prop_assert_eq!(picked, topk_global_ref(&chunks, k).unwrap());
        }

        #[test]
        fn streaming_quantile_equals_sorted_quantile(x in values(), k in 0.0f64..=1.0) {
            prop_assume!(!x.is_empty());
            let streamed = calibrate_threshold_streaming(|| x.chunks(7), k).unwrap();
            prop_assert_eq!(streamed, crate::ops::sparse::calibrate_threshold_ref(&x, k).unwrap());
        }

        #[test]
        fn magnitude_key_preserves_order(a in any::<f32>(), b in any::<f32>()) {
            prop_assume!(!a.is_nan() && !b.is_nan());
            prop_assert_eq!(a.abs() < b.abs(), magnitude_key(a) < magnitude_key(b));
        }
    }
}
