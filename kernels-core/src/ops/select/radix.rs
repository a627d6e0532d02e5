//! The exact two-pass radix selection every streaming selection falls back on: a histogram of the
//! top 15 bits of [`magnitude_key`], then the low 16 bits inside the bin holding the wanted rank.
//! Backends feed it counts they gathered at memory speed ([`MagnitudeHistogram::add_counts`]).

use alloc::vec::Vec;

use super::{TopKCut, magnitude_key};
use crate::error::{check_finite, check_len, check_param};
use crate::{Element, Error, Result};

/// Bins of pass 1: the top 15 bits of the 31-bit [`magnitude_key`].
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

/// Pass 1: a histogram of the top 15 bits of [`magnitude_key`] (sign cleared, so 2^15 bins), fed
/// chunk by chunk. Memory: 256 KiB, whatever `n`.
///
/// ```
/// use kernels_core::backend::MagnitudeHistogram;
/// let chunks: [&[f32]; 2] = [&[0.5, -3.0, 1.0], &[2.0, -0.25]];
/// let mut pass1 = MagnitudeHistogram::new();
/// for c in chunks { pass1.observe(c)?; }
/// assert_eq!(pass1.total(), 5);
/// let mut pass2 = pass1.top_k(2)?; // the two largest magnitudes: 3 and 2
/// for c in chunks { pass2.observe(c)?; }
/// let cut = pass2.cut()?;
/// assert_eq!((cut.magnitude, cut.ties, pass2.value()?), (2.0, 1, 2.0));
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct MagnitudeHistogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for MagnitudeHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl MagnitudeHistogram {
    /// An empty histogram.
    #[must_use]
    pub fn new() -> Self {
        Self {
            counts: alloc::vec![0; HIGH_BINS],
            total: 0,
        }
    }

    /// Adds a chunk. NaN or infinity is an error (its index is relative to the chunk).
    pub fn observe<T: Element>(&mut self, chunk: &[T]) -> Result<()> {
        check_finite("chunk", chunk)?;
        for x in chunk {
            self.counts[high_bin(magnitude_key(x.to_f32()))] += 1;
        }
        self.total += chunk.len() as u64;
        Ok(())
    }

    /// Adds counts per bin ([`high_bin`]) that a fast backend gathered. Counts in the non-finite
    /// bins are an error (and change nothing): validate the data first, as [`Self::observe`]
    /// does.
    pub fn add_counts(&mut self, counts: &[u32]) -> Result<()> {
        check_len("counts", HIGH_BINS, counts.len())?;
        if counts[FIRST_NON_FINITE_BIN..].iter().any(|&c| c > 0) {
            return Err(Error::InvalidParam {
                name: "counts",
                value: FIRST_NON_FINITE_BIN as f64,
                expected: "no counts of non-finite magnitudes",
            });
        }
        add_counts(&mut self.counts, counts, &mut self.total);
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
        let mut bins = self.counts.iter().enumerate();
        loop {
            // rank <= total, so some bin reaches it.
            let Some((bin, &count)) = bins.next() else {
                return Err(Error::InvalidParam {
                    name: "rank",
                    value: rank as f64,
                    expected: "in 1..=total",
                });
            };
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

// The u64 counters cannot overflow: that would take 2^32 calls, each adding at most 2^32 per bin.
fn add_counts(into: &mut [u64], counts: &[u32], total: &mut u64) {
    for (t, &c) in into.iter_mut().zip(counts) {
        *t += u64::from(c);
        *total += u64::from(c);
    }
}

/// Pass 2: the same chunks again, refined inside the bin that holds the wanted rank. Gives the
/// exact value ([`Self::value`]) and the top-k cut ([`Self::cut`]).
#[derive(Clone, Debug)]
pub struct MagnitudeBracket {
    high: u32,
    rank_in_bin: u64,
    bin_count: u64,
    low_counts: Vec<u64>,
    seen: u64,
}

impl MagnitudeBracket {
    fn nothing() -> Self {
        Self {
            high: u32::MAX,
            rank_in_bin: 0,
            bin_count: 0,
            low_counts: Vec::new(),
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
        check_len("counts", LOW_BINS, counts.len())?;
        add_counts(&mut self.low_counts, counts, &mut self.seen);
        Ok(())
    }

    /// The key holding the wanted rank and the number of entries of the bin below that key.
    fn locate(&self) -> Result<(u32, u64)> {
        let mismatch = Error::PassOrder {
            what: "a second pass of a streaming selection",
            expected: "the same entries as the first pass (the bracketing bin's count differs)",
        };
        if self.seen != self.bin_count {
            return Err(mismatch);
        }
        let mut below = 0u64;
        for (low, &count) in self.low_counts.iter().enumerate() {
            if below + count >= self.rank_in_bin {
                return Ok(((self.high << 16) | low as u32, below));
            }
            below += count;
        }
        Err(mismatch)
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
