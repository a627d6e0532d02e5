//! Magnitude selection: top-k, the k-th magnitude and quantiles, over one slice or over many
//! slices taken as one flat vector (a whole model), in memory or streamed chunk by chunk.
//!
//! # Contracts
//!
//! * Order is by magnitude `|x|`; `-0.0` and `0.0` tie, infinities are the largest. NaN and
//!   infinity are rejected: every selection returns [`Error::NonFinite`] for them.
//! * How many entries are kept is a [`KeepRule`]: a count, a density (mergekit's
//!   `floor(d n)`) or a magnitude threshold (`|x| > t`, the activity rule of
//!   [`crate::ops::sparse`]).
//! * **Top-k** keeps exactly `k` entries (`0 <= k <= n`): those of largest magnitude, ties broken by
//!   lower flat index. It is described by a [`TopKCut`]: keep every entry with `|x| > magnitude`,
//!   plus the first `ties` entries (in flat order) with `|x| == magnitude`. A threshold rule is the
//!   cut `(t, 0)` directly.
//! * Comparisons use the order-preserving integer image of `|x|` ([`magnitude_key`]), so every
//!   backend selects bit-identically.

use crate::Result;
use crate::error::check_param;
#[cfg(feature = "alloc")]
use crate::{Element, Error, MultiPass, error::check_finite};

#[cfg(feature = "alloc")]
pub(crate) mod radix;

#[cfg(feature = "alloc")]
use radix::{MagnitudeBracket, MagnitudeHistogram};

/// The order-preserving `u32` image of `|x|`: for non-NaN `a`, `b`,
/// `|a| < |b|` iff `magnitude_key(a) < magnitude_key(b)`.
///
/// ```
/// use kernels_core::ops::select::magnitude_key;
/// assert!(magnitude_key(-3.0) > magnitude_key(2.0));
/// assert_eq!(magnitude_key(-0.0), magnitude_key(0.0));
/// assert!(magnitude_key(f32::INFINITY) > magnitude_key(f32::MAX));
/// ```
#[inline(always)]
#[must_use]
pub fn magnitude_key(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

/// How many entries a selection keeps: the one way every selection, mask and compression of the
/// family says "how many".
///
/// ```
/// use kernels_core::ops::select::{KeepRule, Selection, TopKCut};
/// assert_eq!(KeepRule::Density(0.25).selection(10)?, Selection::Top(2));
/// assert_eq!(KeepRule::Count(3).selection(10)?, Selection::Top(3));
/// let above = KeepRule::Threshold(0.5).selection(10)?;
/// assert_eq!(above, Selection::Cut(TopKCut { magnitude: 0.5, ties: 0 }));
/// assert!(KeepRule::Count(11).selection(10).is_err());
/// assert_eq!(KeepRule::Density(0.25).count(10)?, Some(2));
/// assert_eq!(KeepRule::Threshold(0.5).count(10)?, None); // depends on the data
/// assert!(KeepRule::Density(1.5).validate().is_err());
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KeepRule {
    /// Exactly this many entries (at most `n`): the largest magnitudes, ties by lower flat index.
    Count(u64),
    /// `floor(density * n)` entries, `density` in `(0, 1]` (mergekit's rule).
    Density(f64),
    /// Every entry with `|x| > t`, `t >= 0` (`+inf` keeps none): the activity rule.
    Threshold(f32),
}

/// What a [`KeepRule`] means for `n` entries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Selection {
    /// The top `k` by magnitude (found by a selection pass over the data).
    Top(u64),
    /// A cut known without looking at the data (a threshold rule).
    Cut(TopKCut),
}

impl KeepRule {
    /// Checks the rule's own parameter (a density in `(0, 1]`, a threshold `>= 0`).
    pub fn validate(self) -> Result<()> {
        match self {
            Self::Count(_) => Ok(()),
            Self::Density(d) => check_param("density", d, "in (0, 1]", d > 0.0 && d <= 1.0),
            Self::Threshold(t) => check_param(
                "threshold",
                f64::from(t),
                ">= 0 (a magnitude; +inf keeps nothing)",
                t >= 0.0,
            ),
        }
    }

    /// The selection this rule makes among `n` entries.
    pub fn selection(self, n: u64) -> Result<Selection> {
        self.validate()?;
        Ok(match self {
            Self::Count(k) => {
                check_param("k", k as f64, "at most the number of entries", k <= n)?;
                Selection::Top(k)
            }
            Self::Density(d) => Selection::Top(libm::floor(d * n as f64) as u64),
            // `+0.0`: a threshold of `-0.0` keeps what `0.0` keeps (every nonzero magnitude).
            Self::Threshold(t) => Selection::Cut(TopKCut {
                magnitude: t + 0.0,
                ties: 0,
            }),
        })
    }

    /// The count of a [`KeepRule::Count`] or [`KeepRule::Density`] rule among `n` entries, `None`
    /// for a threshold (its count depends on the data).
    pub fn count(self, n: u64) -> Result<Option<u64>> {
        Ok(match self.selection(n)? {
            Selection::Top(k) => Some(k),
            Selection::Cut(_) => None,
        })
    }
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
}

/// Applies a [`TopKCut`] in flat order, across any chunking: the reference of the backends'
/// appliers.
///
/// ```
/// use kernels_core::ops::select::{TopKApplier, TopKCut};
/// // Keep |x| > 1, and the first entry equal to 1.
/// let mut applier = TopKApplier::new(&TopKCut { magnitude: 1.0, ties: 1 });
/// let kept: Vec<bool> = [1.0f32, 2.0, -1.0, 0.5].iter().map(|&x| applier.keeps(x)).collect();
/// assert_eq!(kept, [true, true, false, false]);
/// // Chunk by chunk, the same flat order.
/// let mut applier = TopKApplier::new(&TopKCut { magnitude: 1.0, ties: 1 });
/// let (mut first, mut second) = ([0.0f32; 1], [0.0f32; 3]);
/// applier.keep(&[1.0f32], &mut first)?;
/// applier.keep(&[2.0f32, -1.0, 0.5], &mut second)?;
/// assert_eq!((first, second), ([1.0], [2.0, 0.0, 0.0]));
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct TopKApplier {
    key: u32,
    ties_left: u64,
}

impl TopKApplier {
    /// An applier starting at flat index 0.
    #[must_use]
    pub fn new(cut: &TopKCut) -> Self {
        Self {
            key: magnitude_key(cut.magnitude),
            ties_left: cut.ties,
        }
    }

    /// Whether the next entry (in flat order) is kept.
    #[inline]
    pub fn keeps(&mut self, x: f32) -> bool {
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

    /// The next chunk with the entries the cut drops zeroed: `out = kept ? x : 0` (reference).
    #[cfg(feature = "alloc")]
    pub fn keep<T: Element>(&mut self, chunk: &[T], out: &mut [f32]) -> Result<()> {
        crate::error::check_len("out", chunk.len(), out.len())?;
        check_finite("chunk", chunk)?;
        for (o, x) in out.iter_mut().zip(chunk) {
            let v = x.to_f32();
            *o = if self.keeps(v) { v } else { 0.0 };
        }
        Ok(())
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

/// Flat indices of what `keep` keeps of `slices` taken as one vector, ascending (reference: a
/// sort by magnitude, descending, then by index).
///
/// ```
/// use kernels_core::ops::select::{KeepRule, topk_indices_ref};
/// let tensors: [&[f32]; 2] = [&[0.5, -3.0, 1.0], &[2.0, -2.0]];
/// assert_eq!(topk_indices_ref(&tensors, KeepRule::Count(2))?, [1, 3]);
/// assert_eq!(topk_indices_ref(&tensors, KeepRule::Threshold(0.9))?, [1, 2, 3, 4]);
/// assert!(topk_indices_ref(&[&[f32::NAN][..]], KeepRule::Count(1)).is_err());
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn topk_indices_ref<T: Element>(
    slices: &[&[T]],
    keep: KeepRule,
) -> Result<alloc::vec::Vec<u64>> {
    // Parameters (and the count against the length) before data, as every backend checks them.
    let selection = keep.selection(slices.iter().map(|s| s.len() as u64).sum())?;
    check_all_finite(slices)?;
    let entries = slices.iter().flat_map(|s| s.iter()).enumerate();
    let k = match selection {
        Selection::Cut(cut) => {
            let mut applier = TopKApplier::new(&cut);
            return Ok(entries
                .filter(|(_, x)| applier.keeps(x.to_f32()))
                .map(|(i, _)| i as u64)
                .collect());
        }
        Selection::Top(k) => k,
    };
    let mut order: alloc::vec::Vec<(u32, u64)> = entries
        .map(|(i, x)| (magnitude_key(x.to_f32()), i as u64))
        .collect();
    // Larger magnitude first; among equals, lower index first.
    order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut kept: alloc::vec::Vec<u64> = order[..k as usize].iter().map(|p| p.1).collect();
    kept.sort_unstable();
    Ok(kept)
}

/// What `keep` keeps of one slice, as a mask (`true` = kept).
///
/// ```
/// use kernels_core::ops::select::{KeepRule, topk_mask_ref};
/// let mask = topk_mask_ref(&[0.5f32, -3.0, 1.0, 2.0], KeepRule::Density(0.5))?;
/// assert_eq!(mask, [false, true, false, true]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn topk_mask_ref<T: Element>(x: &[T], keep: KeepRule) -> Result<alloc::vec::Vec<bool>> {
    let mut mask = alloc::vec![false; x.len()];
    for i in topk_indices_ref(&[x], keep)? {
        mask[i as usize] = true;
    }
    Ok(mask)
}

/// The [`TopKCut`] of what `keep` keeps of `slices` taken as one vector (reference: from
/// [`topk_indices_ref`]).
///
/// ```
/// use kernels_core::ops::select::{KeepRule, TopKCut, topk_cut_ref};
/// let tensors: [&[f32]; 2] = [&[0.5, -3.0, 2.0], &[2.0, -2.0]];
/// // Keep 3: -3 and the first two of the three entries of magnitude 2.
/// assert_eq!(topk_cut_ref(&tensors, KeepRule::Count(3))?, TopKCut { magnitude: 2.0, ties: 2 });
/// assert_eq!(topk_cut_ref(&tensors, KeepRule::Count(0))?, TopKCut::NONE);
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn topk_cut_ref<T: Element>(slices: &[&[T]], keep: KeepRule) -> Result<TopKCut> {
    let kept = topk_indices_ref(slices, keep)?;
    // A threshold rule is its own cut, whatever the data.
    if let KeepRule::Threshold(_) = keep
        && let Selection::Cut(cut) = keep.selection(0)?
    {
        return Ok(cut);
    }
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
///
/// ```
/// use kernels_core::ops::select::kth_largest_magnitude_ref;
/// let tensors: [&[f32]; 2] = [&[0.5, -3.0], &[2.0]];
/// assert_eq!(kth_largest_magnitude_ref(&tensors, 2)?, 2.0);
/// assert!(kth_largest_magnitude_ref(&tensors, 0).is_err());
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn kth_largest_magnitude_ref<T: Element>(slices: &[&[T]], k: u64) -> Result<f32> {
    check_param("k", k as f64, "at least 1", k >= 1)?;
    Ok(topk_cut_ref(slices, KeepRule::Count(k))?.magnitude)
}

/// The top-k of a vector too large for memory, streamed chunk by chunk (reference): pass 1 a
/// histogram of the keys' top 15 bits, pass 2 the low 16 bits inside the bin holding the cut.
/// Follows the [`MultiPass`] protocol; 512 KiB of state whatever `n`.
///
/// ```
/// use kernels_core::{MultiPass, ops::select::{KeepRule, StreamingTopK}};
/// let tensors: [&[f32]; 2] = [&[0.5, -3.0, 1.0], &[2.0, -0.25]];
/// let mut topk = StreamingTopK::new(KeepRule::Count(2))?;
/// loop {
///     for t in tensors { topk.feed(t)?; }
///     if !topk.next_pass()? { break; }
/// }
/// assert_eq!(topk.total(), 5);
/// let cut = topk.finish()?;
/// assert_eq!((cut.magnitude, cut.ties), (2.0, 1));
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
#[derive(Clone, Debug)]
pub struct StreamingTopK {
    keep: KeepRule,
    stage: Stage,
    total: u64,
    fed: u64,
}

#[cfg(feature = "alloc")]
#[derive(Clone, Debug)]
enum Stage {
    Counting(MagnitudeHistogram),
    Refining(MagnitudeBracket),
    Done(TopKCut),
}

#[cfg(feature = "alloc")]
impl StreamingTopK {
    /// A selection keeping `keep` (a count is checked against the total after pass 1).
    pub fn new(keep: KeepRule) -> Result<Self> {
        keep.validate()?;
        Ok(Self {
            keep,
            stage: Stage::Counting(MagnitudeHistogram::new()),
            total: 0,
            fed: 0,
        })
    }

    /// The next chunk of the current pass. NaN or infinity is an error naming its flat index.
    pub fn feed<T: Element>(&mut self, chunk: &[T]) -> Result<()> {
        let at = self.fed as usize;
        let shift = |e: Error| match e {
            Error::NonFinite { what, index } => Error::NonFinite {
                what,
                index: index + at,
            },
            other => other,
        };
        match &mut self.stage {
            Stage::Counting(histogram) => histogram.observe(chunk).map_err(shift)?,
            Stage::Refining(bracket) => bracket.observe(chunk).map_err(shift)?,
            Stage::Done(_) => {
                return Err(Error::PassOrder {
                    what: "StreamingTopK::feed",
                    expected: "no more chunks once next_pass() has returned false",
                });
            }
        }
        self.fed += chunk.len() as u64;
        Ok(())
    }

    /// Entries seen in pass 1.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(feature = "alloc")]
impl MultiPass for StreamingTopK {
    type Output = TopKCut;

    fn next_pass(&mut self) -> Result<bool> {
        let stage = match &self.stage {
            Stage::Counting(histogram) => {
                self.total = self.fed;
                match self.keep.selection(self.total)? {
                    Selection::Cut(cut) => Stage::Done(cut),
                    Selection::Top(k) => match histogram.top_k(k)? {
                        bracket if bracket.bin().is_none() => Stage::Done(TopKCut::NONE),
                        bracket => Stage::Refining(bracket),
                    },
                }
            }
            Stage::Refining(bracket) => {
                if self.fed != self.total {
                    return Err(Error::PassOrder {
                        what: "StreamingTopK::next_pass",
                        expected: "every chunk of the first pass fed again before the pass ends",
                    });
                }
                Stage::Done(bracket.cut()?)
            }
            Stage::Done(_) => return Ok(false),
        };
        self.stage = stage;
        self.fed = 0;
        Ok(!matches!(self.stage, Stage::Done(_)))
    }

    fn finish(&self) -> Result<TopKCut> {
        match self.stage {
            Stage::Done(cut) => Ok(cut),
            _ => Err(Error::PassOrder {
                what: "StreamingTopK::finish",
                expected: "every pass fed, until next_pass() returns false",
            }),
        }
    }
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    fn top(x: &[f32], k: u64) -> Vec<u64> {
        topk_indices_ref(&[x], KeepRule::Count(k)).unwrap()
    }

    #[test]
    fn topk_breaks_ties_by_lower_index() {
        let x = [1.0f32, -3.0, 2.0, 3.0, -2.0, 2.0];
        assert_eq!(top(&x, 0), Vec::<u64>::new());
        assert_eq!(top(&x, 1), [1]);
        assert_eq!(top(&x, 2), [1, 3]);
        assert_eq!(top(&x, 3), [1, 2, 3]);
        assert_eq!(top(&x, 4), [1, 2, 3, 4]);
        assert_eq!(top(&x, 6), [0, 1, 2, 3, 4, 5]);
        assert_eq!(
            topk_cut_ref(&[&x[..]], KeepRule::Count(4)).unwrap(),
            TopKCut {
                magnitude: 2.0,
                ties: 2
            }
        );
        assert_eq!(kth_largest_magnitude_ref(&[&x[..]], 6).unwrap(), 1.0);
        // -0.0 and 0.0 tie.
        assert_eq!(top(&[0.0f32, -0.0, 0.0], 2), [0, 1]);
    }

    #[test]
    fn every_rule_says_how_many() {
        let x = [1.0f32, -3.0, 2.0, 3.0, -2.0, 2.0, 0.0, -0.5];
        assert_eq!(
            topk_indices_ref(&[&x[..]], KeepRule::Density(0.5)).unwrap(),
            top(&x, 4)
        );
        assert_eq!(
            topk_indices_ref(&[&x[..]], KeepRule::Threshold(2.0)).unwrap(),
            [1, 3]
        );
        // A threshold of zero keeps every nonzero entry; +inf keeps none.
        assert_eq!(
            topk_mask_ref(&x, KeepRule::Threshold(-0.0)).unwrap(),
            [true, true, true, true, true, true, false, true]
        );
        assert_eq!(
            topk_cut_ref(&[&x[..]], KeepRule::Threshold(f32::INFINITY)).unwrap(),
            TopKCut::NONE
        );
        assert_eq!(KeepRule::Density(0.25).count(10).unwrap(), Some(2));
        assert_eq!(KeepRule::Threshold(1.0).count(10).unwrap(), None);
    }

    #[test]
    fn bad_selections_are_errors() {
        let x = [1.0f32, 2.0];
        assert!(matches!(
            topk_indices_ref(&[&x[..]], KeepRule::Count(3)),
            Err(Error::InvalidParam { name: "k", .. })
        ));
        assert!(matches!(
            topk_indices_ref(&[&x[..], &[0.0, f32::NAN]], KeepRule::Count(1)),
            Err(Error::NonFinite { index: 3, .. })
        ));
        assert!(kth_largest_magnitude_ref(&[&x[..]], 0).is_err());
        for bad in [
            KeepRule::Density(0.0),
            KeepRule::Density(1.5),
            KeepRule::Density(f64::NAN),
            KeepRule::Threshold(-1.0),
            KeepRule::Threshold(f32::NAN),
        ] {
            assert!(
                matches!(bad.selection(10), Err(Error::InvalidParam { .. })),
                "{bad:?}"
            );
            assert!(StreamingTopK::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn streaming_out_of_order_is_a_pass_error() {
        let x = [1.0f32, 2.0, 3.0];
        let mut topk = StreamingTopK::new(KeepRule::Count(1)).unwrap();
        assert!(matches!(topk.finish(), Err(Error::PassOrder { .. })));
        topk.feed(&x).unwrap();
        assert!(topk.next_pass().unwrap());
        // Pass 2 sees other data: detected, never a wrong cut.
        topk.feed(&[5.0f32, 6.0, 7.0]).unwrap();
        assert!(matches!(topk.next_pass(), Err(Error::PassOrder { .. })));
        let mut topk = StreamingTopK::new(KeepRule::Count(1)).unwrap();
        topk.feed(&x).unwrap();
        assert!(topk.next_pass().unwrap());
        topk.feed(&x[..2]).unwrap();
        assert!(matches!(topk.next_pass(), Err(Error::PassOrder { .. })));
        let mut done = StreamingTopK::new(KeepRule::Threshold(1.0)).unwrap();
        done.feed(&x).unwrap();
        assert!(!done.next_pass().unwrap());
        assert!(matches!(done.feed(&x), Err(Error::PassOrder { .. })));
        assert_eq!(
            done.finish().unwrap(),
            TopKCut {
                magnitude: 1.0,
                ties: 0
            }
        );
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
            let cut = StreamingTopK::new(KeepRule::Count(k))
                .unwrap()
                .run(|| chunks, StreamingTopK::feed)
                .unwrap();
            prop_assert_eq!(cut, topk_cut_ref(&chunks, KeepRule::Count(k)).unwrap());
            // The applier applied in flat order picks exactly the sorted indices.
            let mut applier = TopKApplier::new(&cut);
            let picked: Vec<u64> = (0..x.len() as u64).filter(|&i| applier.keeps(x[i as usize])).collect();
            prop_assert_eq!(picked.len() as u64, k);
            prop_assert_eq!(picked, topk_indices_ref(&chunks, KeepRule::Count(k)).unwrap());
        }

        #[test]
        fn two_pass_quantile_equals_sorted_quantile(x in values(), k in 0.0f64..=1.0) {
            prop_assume!(!x.is_empty());
            // The calibration's route: pass 1 a histogram, pass 2 the bracket of rank ceil(k n).
            let rank = crate::backend::quantile_rank(x.len() as u64, k).unwrap();
            let streamed = if rank == 0 {
                0.0
            } else {
                let mut histogram = MagnitudeHistogram::new();
                for chunk in x.chunks(7) {
                    histogram.observe(chunk).unwrap();
                }
                let mut bracket = histogram.kth_smallest(rank).unwrap();
                for chunk in x.chunks(7) {
                    bracket.observe(chunk).unwrap();
                }
                bracket.value().unwrap()
            };
            let expect = crate::ops::sparse::calibrate_threshold_ref(&[&x], k).unwrap();
            prop_assert_eq!(streamed.to_bits(), expect.to_bits());
        }

        #[test]
        fn magnitude_key_preserves_order(a in any::<f32>(), b in any::<f32>()) {
            prop_assume!(!a.is_nan() && !b.is_nan());
            prop_assert_eq!(a.abs() < b.abs(), magnitude_key(a) < magnitude_key(b));
        }
    }
}
