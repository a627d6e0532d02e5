//! What fast encoders share with [`super::encode`]: the header writer and the gap statistics
//! that pick the Rice parameter. Re-exported through [`crate::backend`].

use super::MAX_DIMS;
#[cfg(feature = "alloc")]
use super::{MAGIC, TernaryLayout, VERSION};
use crate::error::{check_len, check_param};
use crate::{Error, Result};

/// Bytes of the header before the dims.
pub(crate) const FIXED_HEADER: usize = 20;
/// Where the header keeps the non-zero count.
pub const NNZ_OFFSET: usize = 12;

/// The element count of an encodable shape: at most [`MAX_DIMS`] dimensions whose product fits
/// `u64` ([`Error::TooLarge`] otherwise).
fn element_count(shape: &[u64]) -> Result<u64> {
    check_param(
        "shape.len()",
        shape.len() as f64,
        "at most 8",
        shape.len() <= MAX_DIMS,
    )?;
    shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or(Error::TooLarge {
            what: "shape (its element count)",
            limit: u64::MAX,
            unit: "elements",
        })
}

/// Checks a shape for [`super::encode`]: encodable, and `codes_len` elements.
pub fn check_shape(shape: &[u64], codes_len: usize) -> Result<()> {
    let numel = usize::try_from(element_count(shape)?).map_err(|_| Error::TooLarge {
        what: "shape (its element count)",
        limit: usize::MAX as u64,
        unit: "elements",
    })?;
    check_len("codes", numel, codes_len)
}

/// Writes the header of an encoding (every field but the payload) to `out`: what
/// [`super::encode`] and fast encoders share. Every field is checked as
/// [`super::TernaryHeader::parse`] checks it (the shape, a finite scale, no more non-zeros than
/// elements, a Rice parameter below 32 and 0 for the dense layout, a version from 1 to
/// [`VERSION`]), so no bytes it writes are rejected for their header; on error `out` is unchanged.
#[allow(clippy::too_many_arguments)] // one per header field
#[cfg(feature = "alloc")]
pub fn write_header(
    out: &mut alloc::vec::Vec<u8>,
    version: u8,
    layout: TernaryLayout,
    rice_k: u8,
    scale: f32,
    nnz: u64,
    shape: &[u64],
    payload_len: usize,
) -> Result<()> {
    let numel = element_count(shape)?;
    check_param("scale", f64::from(scale), "finite", scale.is_finite())?;
    check_param("nnz", nnz as f64, "at most the element count", nnz <= numel)?;
    check_param(
        "rice_k",
        f64::from(rice_k),
        "below 32, and 0 for the dense layout",
        rice_k < 32 && (layout == TernaryLayout::SparseRice || rice_k == 0),
    )?;
    check_param(
        "version",
        f64::from(version),
        "1 or 2",
        (1..=VERSION).contains(&version),
    )?;
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[
        version,
        u8::from(layout == TernaryLayout::SparseRice),
        rice_k,
        shape.len() as u8,
    ]);
    out.extend_from_slice(&scale.to_le_bytes());
    out.extend_from_slice(&nnz.to_le_bytes());
    for d in shape {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(&(payload_len as u64).to_le_bytes());
    Ok(())
}

/// Bytes of the header for a shape of `ndim` dimensions.
#[must_use]
pub const fn header_len(ndim: usize) -> usize {
    FIXED_HEADER + 8 * ndim + 8
}

/// Statistics of the gaps of a sparse encoding from which [`GapStats::best_rice_k`] picks the
/// Rice parameter exactly: how many gaps have each bit set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GapStats {
    /// Gaps seen.
    pub gaps: u64,
    /// `bit_counts[b]`: gaps with bit `b` set.
    pub bit_counts: [u64; 64],
}

impl Default for GapStats {
    fn default() -> Self {
        Self {
            gaps: 0,
            bit_counts: [0; 64],
        }
    }
}

impl GapStats {
    /// Adds a gap.
    #[inline]
    pub fn add(&mut self, gap: u64) {
        self.add_many(gap, 1);
    }

    /// Adds `count` gaps of the same length.
    #[inline]
    pub fn add_many(&mut self, gap: u64, count: u64) {
        self.gaps += count;
        let mut rest = gap;
        while rest != 0 {
            self.bit_counts[rest.trailing_zeros() as usize] += count;
            rest &= rest - 1;
        }
    }

    /// Adds another set of statistics.
    pub fn merge(&mut self, other: &Self) {
        self.gaps += other.gaps;
        for (a, b) in self.bit_counts.iter_mut().zip(&other.bit_counts) {
            *a += b;
        }
    }

    /// The payload bits of all gaps and signs coded with parameter `k`:
    /// `sum_g ((g >> k) + 1 + k) + gaps`, where `sum_g (g >> k) = sum_{b >= k} count_b 2^(b - k)`.
    #[must_use]
    pub fn payload_bits(&self, k: u8) -> u128 {
        let quotients: u128 = self.bit_counts[usize::from(k)..]
            .iter()
            .enumerate()
            .map(|(shift, &c)| u128::from(c) << shift)
            .sum();
        quotients + u128::from(self.gaps) * (u128::from(k) + 2)
    }

    /// The Rice parameter in `0..=31` that minimises the payload (the smallest such).
    #[must_use]
    pub fn best_rice_k(&self) -> u8 {
        (0u8..=31)
            .min_by_key(|&k| self.payload_bits(k))
            .unwrap_or(0)
    }
}
