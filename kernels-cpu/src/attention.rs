//! Decode attention: the fast twin of [`kernels_core::ops::attention::attention_ref`].
//!
//! # Contract
//!
//! One query token's grouped-query attention over `positions` cached keys and values (the
//! layouts of [`kernels_core::ops::attention`]), computed in `f32` (the weights with a vector `exp`
//! within [`crate::EXP_ULPS`]); each output within
//! [`attention_tolerance`] of the reference, and bit-identical for any thread count (a head is
//! always computed whole by one thread).
//!
//! # How
//!
//! Threads split the heads. Each head streams its keys and values once, in blocks of
//! [`POSITION_BLOCK`] positions: the block's scores are four dots at a time against one load of
//! `q` (the GEMV's `dot_block`), then the softmax is kept online (a running maximum and sum; the
//! output rescaled when the maximum grows) and the block's values are added four rows at a time
//! (the GEMV's `axpy_block`). No scratch: scores live on the stack, so a decode loop allocates
//! nothing here.

use kernels_core::backend::validate_attention;
pub use kernels_core::ops::attention::AttentionHeads;
use kernels_core::{Element, MatRef, Result};

use crate::gemv::{ROW_BLOCK, axpy_block, dot_block, gemv_tolerance};
use crate::parallel::split_outputs;
use crate::simd::{exp, load_padded, store_padded};
use crate::{Cpu, Simd, WithSimd};

/// Positions whose scores are held at once (on the stack) between rescales of the output.
///
/// PERF: each block costs one `expf` and one rescale of `head_dim` outputs when its maximum
/// exceeds the running one; 64 keeps that under 2 % of a block's work at SmolLM2's 64-wide heads.
pub const POSITION_BLOCK: usize = 64;

/// Bound on `|out_j - out_ref_j|` for a head over `positions` cached positions, where
/// `score_abs_sum = scale * max_t sum_i |q_i k_t,i|` bounds the scores' magnitudes and
/// `weighted_abs_value = sum_t p_t |v_t,j|` (the reference's softmax weights `p`) is the size of
/// the output's sum.
///
/// * Each score errs by at most `delta = (head_dim + 4 + 2 blocks) u score_abs_sum`: its dot
///   ([`gemv_tolerance`]) and scaling, the subtraction of the running maximum, and the subtraction
///   in each of the `blocks = ceil(positions / POSITION_BLOCK)` rescales; a weight
///   `exp(s_t - max) / sum` then errs by a factor within `exp(+-2 delta)`.
/// * Each weight takes at most `3 blocks + 3` further roundings (its `exp` within 2 ulps, the
///   rescale's `expf` and product per block), in the numerator and the sum alike; the sums
///   over positions add `positions u` each, the final division `u`.
///
/// ```
/// use kernels_cpu::attention::attention_tolerance;
/// let bound = attention_tolerance(64, 165, 20.0, 1.0); // SmolLM2's heads, 165 positions
/// assert!(bound > 1e-5 && bound < 1e-3);
/// ```
#[must_use]
pub fn attention_tolerance(
    head_dim: usize,
    positions: usize,
    score_abs_sum: f64,
    weighted_abs_value: f64,
) -> f64 {
    let u = f64::from(f32::EPSILON / 2.0);
    let blocks = positions.div_ceil(POSITION_BLOCK) as f64;
    let delta = gemv_tolerance(head_dim + 3, score_abs_sum) + 2.0 * blocks * u * score_abs_sum;
    let scores = libm::expm1(2.0 * delta);
    let roundings = (2.0 * positions as f64 + 2.0 * (3.0 * blocks + 3.0) + 1.0) * u;
    (scores + roundings) * weighted_abs_value + 1e-30
}

/// Decode attention: for each head `h`, `out_h = sum_t softmax_t(scale q_h . k_t) v_t` over the
/// `keys` and `values` of its key/value head (the twin of `attention_ref`).
///
/// ```
/// use kernels_cpu::attention::{AttentionHeads, attention};
/// use kernels_cpu::prelude::*;
/// let heads = AttentionHeads { heads: 2, kv_heads: 1, head_dim: 2 };
/// let keys = [1.0f32, 0.0, 0.0, 1.0]; // two cached positions
/// let values = [1.0f32, 2.0, 3.0, 4.0];
/// let (k, v) = (MatRef::from_slice(&keys, 2, 2)?, MatRef::from_slice(&values, 2, 2)?);
/// let mut out = [0.0f32; 4];
/// attention(&Cpu::detect(), heads, &[0.0, 0.0, 0.0, 50.0], k, v, 1.0, &mut out)?;
/// assert_eq!(out[..2], [2.0, 3.0]); // equal scores: the mean of the values
/// assert!((out[2] - 3.0).abs() < 1e-6 && (out[3] - 4.0).abs() < 1e-6);
/// # Ok::<(), Error>(())
/// ```
///
/// # Errors
///
/// As [`kernels_core::backend::validate_attention`]: bad head counts, no cached position, keys
/// and values of different shapes or not `kv_heads * head_dim` wide, `q` or `out` not
/// `heads * head_dim` long, a `scale` that is not finite and positive.
pub fn attention<T: Element>(
    cpu: &Cpu,
    heads: AttentionHeads,
    q: &[f32],
    keys: MatRef<'_, T>,
    values: MatRef<'_, T>,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    validate_attention(
        heads,
        q.len(),
        keys.shape(),
        values.shape(),
        scale,
        out.len(),
    )?;
    let d = heads.head_dim;
    // A head's output entry costs one key and one value entry per position.
    let bytes_per_output = 2 * keys.rows() * core::mem::size_of::<T>();
    split_outputs(cpu, out, bytes_per_output, d, |range, out| {
        let first = range.start / d;
        for (h, out) in (first..).zip(out.chunks_exact_mut(d)) {
            let kv = heads.kv_head_of(h) * d;
            cpu.dispatch(Head {
                q: &q[h * d..(h + 1) * d],
                keys: |t| &keys.row(t)[kv..kv + d],
                values: |t| &values.row(t)[kv..kv + d],
                positions: keys.rows(),
                scale,
                out,
            });
        }
    });
    Ok(())
}

/// One head's attention over `positions` rows of `keys` and `values`.
struct Head<'a, K, V> {
    q: &'a [f32],
    keys: K,
    values: V,
    positions: usize,
    scale: f32,
    out: &'a mut [f32],
}

impl<'w, T: Element, K: Fn(usize) -> &'w [T], V: Fn(usize) -> &'w [T]> WithSimd for Head<'_, K, V> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let Self {
            q,
            keys,
            values,
            positions,
            scale,
            out,
        } = self;
        let none: [&[T]; ROW_BLOCK] = [&[]; ROW_BLOCK];
        let rows = |f: &dyn Fn(usize) -> &'w [T], t: usize, n: usize| -> [&'w [T]; ROW_BLOCK] {
            core::array::from_fn(|r| if t + r < n { f(t + r) } else { &[] })
        };
        out.fill(0.0);
        let (mut max, mut sum) = (f32::NEG_INFINITY, 0.0f32);
        let mut scores = [0.0f32; POSITION_BLOCK];
        for start in (0..positions).step_by(POSITION_BLOCK) {
            let n = POSITION_BLOCK.min(positions - start);
            let scores = &mut scores[..n];
            for (b, chunk) in scores.chunks_mut(ROW_BLOCK).enumerate() {
                let t = start + b * ROW_BLOCK;
                if chunk.len() == ROW_BLOCK {
                    let ahead = rows(&keys, t + ROW_BLOCK, positions);
                    let dots = dot_block(s, rows(&keys, t, positions), ahead, q);
                    for (score, dot) in chunk.iter_mut().zip(dots) {
                        *score = dot * scale;
                    }
                } else {
                    for (r, score) in chunk.iter_mut().enumerate() {
                        *score = dot_block(s, [keys(t + r)], [&[]], q)[0] * scale;
                    }
                }
            }
            let block_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if block_max > max {
                let rescale = libm::expf(max - block_max);
                sum *= rescale;
                scale_in_place(s, out, rescale);
                max = block_max;
            }
            exp_shifted(s, scores, max);
            for score in scores.iter() {
                sum += *score;
            }
            for (b, weights) in scores.chunks(ROW_BLOCK).enumerate() {
                let t = start + b * ROW_BLOCK;
                let coeffs = core::array::from_fn(|r| weights.get(r).copied().unwrap_or(0.0));
                let next = rows(&values, t + ROW_BLOCK, positions);
                let block = rows(&values, t, positions);
                if weights.len() == ROW_BLOCK {
                    axpy_block(s, out, coeffs, block, &next);
                } else {
                    for (w, row) in weights.iter().zip(block) {
                        axpy_block(s, out, [*w], [row], &none);
                    }
                }
            }
        }
        for o in out.iter_mut() {
            *o /= sum;
        }
    }
}

/// `x = e^(x - shift)` in place with the vector [`exp`], the tail padded to a whole vector (so
/// every position is computed by the same code).
#[inline(always)]
fn exp_shifted<S: Simd>(s: S, x: &mut [f32], shift: f32) {
    let minus = s.splat(-shift);
    for chunk in x.chunks_mut(S::LANES) {
        let v = exp(s, s.add(load_padded(s, chunk), minus));
        store_padded(s, v, chunk);
    }
}

/// `x *= c`, lane by lane.
#[inline(always)]
fn scale_in_place<S: Simd>(s: S, x: &mut [f32], c: f32) {
    let lanes = S::LANES;
    let splat = s.splat(c);
    let mut chunks = x.chunks_exact_mut(lanes);
    for chunk in &mut chunks {
        let v = s.mul(s.load(&*chunk), splat);
        s.store(v, chunk);
    }
    for v in chunks.into_remainder() {
        *v *= c;
    }
}
