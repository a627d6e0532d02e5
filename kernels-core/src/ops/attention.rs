//! Decode attention: one query token's grouped-query attention over a cache of keys and values.
//!
//! For head `h` of `heads`, reading key/value head `g = h / (heads / kv_heads)`:
//!
//! ```text
//! s_t = scale * (q_h . k_t[g])           for every cached position t
//! out_h = sum_t softmax(s)_t * v_t[g]
//! ```
//!
//! `q` and `out` are `[heads * head_dim]`, heads one after another; `keys` and `values` are
//! `[positions, kv_heads * head_dim]`, one row per cached position (a KV cache's layout).

use crate::error::check_param;
use crate::{Element, MatRef, Real, Result};

/// The heads of a grouped-query attention layer: `heads` query heads share `kv_heads` key/value
/// heads in groups of `heads / kv_heads`, each `head_dim` wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionHeads {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; divides `heads`.
    pub kv_heads: usize,
    /// Entries per head.
    pub head_dim: usize,
}

impl AttentionHeads {
    /// Checks every count is at least 1, `kv_heads` divides `heads`, and the widths fit `usize`.
    ///
    /// ```
    /// use kernels_core::ops::attention::AttentionHeads;
    /// assert!(AttentionHeads { heads: 9, kv_heads: 3, head_dim: 64 }.validate().is_ok());
    /// assert!(AttentionHeads { heads: 9, kv_heads: 2, head_dim: 64 }.validate().is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidParam`] naming the count that is wrong.
    pub fn validate(&self) -> Result<()> {
        check_param("heads", self.heads as f64, "at least 1", self.heads >= 1)?;
        check_param(
            "kv_heads",
            self.kv_heads as f64,
            "at least 1 and a divisor of heads",
            self.kv_heads >= 1 && self.heads.is_multiple_of(self.kv_heads.max(1)),
        )?;
        check_param(
            "head_dim",
            self.head_dim as f64,
            "at least 1, with heads * head_dim within usize",
            self.head_dim >= 1 && self.heads.checked_mul(self.head_dim).is_some(),
        )
    }

    /// `heads * head_dim`: the length of a query and of the output.
    #[must_use]
    pub fn query_width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// `kv_heads * head_dim`: the width of a cached key or value row.
    #[must_use]
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The key/value head query head `h` reads.
    #[must_use]
    pub fn kv_head_of(&self, h: usize) -> usize {
        h / (self.heads / self.kv_heads)
    }
}

/// Output columns the reference accumulates at once in `f64` (on the stack: no allocator).
const REFERENCE_COLUMNS: usize = 16;

/// Decode attention (see the module): `out_h = sum_t softmax_t(scale q_h . k_t) v_t` per head,
/// in `f64` throughout (scores, the softmax with its maximum subtracted, the weighted sum), one
/// rounding to `f32` at the end.
///
/// ```
/// use kernels_core::{MatRef, ops::attention::{AttentionHeads, attention_ref}};
/// let heads = AttentionHeads { heads: 2, kv_heads: 1, head_dim: 2 };
/// let keys = [1.0f32, 0.0, 0.0, 1.0]; // two positions
/// let values = [1.0f32, 2.0, 3.0, 4.0];
/// let mut out = [0.0f32; 4];
/// let (k, v) = (MatRef::from_slice(&keys, 2, 2)?, MatRef::from_slice(&values, 2, 2)?);
/// // Head 0 scores both positions 0: the mean of the values. Head 1 favours position 1.
/// attention_ref(heads, &[0.0, 0.0, 0.0, 50.0], k, v, 1.0, &mut out)?;
/// assert_eq!(out[..2], [2.0, 3.0]);
/// assert!((out[2] - 3.0).abs() < 1e-6 && (out[3] - 4.0).abs() < 1e-6);
/// # Ok::<(), kernels_core::Error>(())
/// ```
///
/// # Errors
///
/// As [`crate::backend::validate_attention`]: bad head counts, no cached position, keys and
/// values of different shapes or not `kv_heads * head_dim` wide, `q` or `out` not
/// `heads * head_dim` long, a `scale` that is not finite and positive.
pub fn attention_ref<T: Element>(
    heads: AttentionHeads,
    q: &[f32],
    keys: MatRef<'_, T>,
    values: MatRef<'_, T>,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    crate::backend::validate_attention(
        heads,
        q.len(),
        keys.shape(),
        values.shape(),
        scale,
        out.len(),
    )?;
    let d = heads.head_dim;
    let positions = keys.rows();
    for (h, (q, out)) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
        let kv = heads.kv_head_of(h) * d;
        let score = |t: usize| -> f64 {
            let k = &keys.row(t)[kv..kv + d];
            let dot: f64 = q
                .iter()
                .zip(k)
                .map(|(a, b)| f64::from(*a) * b.to_f64())
                .sum();
            f64::from(scale) * dot
        };
        let max = (0..positions).map(score).fold(f64::NEG_INFINITY, f64::max);
        let weight = |t: usize| libm::exp(score(t) - max);
        let total: f64 = (0..positions).map(weight).sum();
        for (c, out) in out.chunks_mut(REFERENCE_COLUMNS).enumerate() {
            let first = kv + c * REFERENCE_COLUMNS;
            let mut acc = [0.0f64; REFERENCE_COLUMNS];
            for t in 0..positions {
                let p = weight(t);
                let v = &values.row(t)[first..first + out.len()];
                for (a, v) in acc.iter_mut().zip(v) {
                    *a += p * v.to_f64();
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o = (a / total) as f32;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADS: AttentionHeads = AttentionHeads {
        heads: 4,
        kv_heads: 2,
        head_dim: 3,
    };

    fn run(q: &[f32], keys: &[f32], values: &[f32], scale: f32) -> [f32; 12] {
        let positions = keys.len() / HEADS.kv_width();
        let keys = MatRef::from_slice(keys, positions, HEADS.kv_width()).unwrap();
        let values = MatRef::from_slice(values, positions, HEADS.kv_width()).unwrap();
        let mut out = [f32::NAN; 12];
        attention_ref(HEADS, q, keys, values, scale, &mut out).unwrap();
        out
    }

    #[test]
    fn one_position_returns_its_value_for_every_query() {
        let values: [f32; 6] = core::array::from_fn(|i| i as f32 - 2.5);
        let q: [f32; 12] = core::array::from_fn(|i| (i as f32).sin() * 30.0);
        let out = run(&q, &[0.3; 6], &values, 0.5);
        // Heads 0 and 1 read key/value head 0, heads 2 and 3 head 1.
        let expected = [&values[..3], &values[..3], &values[3..], &values[3..]].concat();
        assert_eq!(out[..], expected[..]);
    }

    #[test]
    fn weights_are_the_softmax_of_the_scaled_scores() {
        // Two positions; head 0's scores are scale * (1, 3) on key/value head 0.
        let keys = [1.0, 0.0, 0.0, 5.0, 5.0, 5.0, 3.0, 0.0, 0.0, 5.0, 5.0, 5.0];
        let values = [1.0, 0.0, 0.0, 9.0, 9.0, 9.0, 0.0, 1.0, 0.0, 9.0, 9.0, 9.0];
        let mut q = [0.0f32; 12];
        q[0] = 1.0;
        let out = run(&q, &keys, &values, 0.5);
        let (w0, w1) = (libm::exp(0.5), libm::exp(1.5));
        let total = w0 + w1;
        assert!((f64::from(out[0]) - w0 / total).abs() < 1e-7, "{out:?}");
        assert!((f64::from(out[1]) - w1 / total).abs() < 1e-7, "{out:?}");
        assert_eq!(out[2], 0.0);
        // Head 1 scores 0 everywhere: the mean of head 0's values.
        assert_eq!(out[3..6], [0.5, 0.5, 0.0]);
        // Heads 2 and 3 read equal keys: the mean of head 1's (equal) values.
        assert_eq!(out[6..], [9.0; 6]);
    }

    #[test]
    fn extreme_scores_do_not_overflow() {
        let keys = [1e30f32; 12];
        let mut values = [1.0f32; 12];
        values[6] = 2.0;
        let q = [1e8f32; 12];
        let out = run(&q, &keys, &values, 1e6);
        assert!(out.iter().all(|v| v.is_finite()), "{out:?}");
        assert_eq!(out[0], 1.5);
    }
}
