//! The implementer API: validation and helpers that every backend of the family shares, so a
//! contract is checked and decided in one place.
//!
//! This module is for the crates that implement the contracts (`kernels-cpu`, `kernels-wgpu`, a
//! backend of your own), not for their users: its items may change in any release. Users call
//! the backends' ops, which run these validators before touching any data.
//!
//! Validators take shapes and lengths, never data, so a backend whose operands live elsewhere (on
//! a GPU) checks them as the references do.

use crate::error::{check_len, check_param};
use crate::ops::attention::AttentionHeads;
#[cfg(feature = "alloc")]
use crate::ops::lowrank::{MAX_POWER_ITERATIONS, RsvdParams};
use crate::ops::merge::{FisherParams, TiesElection, weighted_sum_at};
use crate::ops::sparse::{CatsMlpWeights, MAX_MLP_BATCH, TealMlpWeights, TealThresholds};
use crate::{Element, Error, Real, Result};

#[cfg(feature = "alloc")]
pub use crate::format::raw::write_header;
pub use crate::format::raw::{GapStats, NNZ_OFFSET, check_shape, header_len};
#[cfg(feature = "alloc")]
pub use crate::ops::select::radix::{
    FIRST_NON_FINITE_BIN, HIGH_BINS, LOW_BINS, MagnitudeBracket, MagnitudeHistogram, high_bin,
    low_bin,
};
pub use crate::rng::{
    PHILOX_MUL, PHILOX_ROUNDS, PHILOX_WEYL, WORDS_PER_BLOCK, philox4x32_10_lanes,
};

/// An empty vector with room for `len` elements, allocated fallibly: what every allocation whose
/// size comes from input goes through, so a huge size is [`Error::OutOfMemory`] (naming `what`)
/// instead of an abort.
///
/// ```
/// use kernels_core::{Error, backend::try_vec};
/// assert!(try_vec::<f32>("x", 4)?.capacity() >= 4);
/// assert!(matches!(try_vec::<f32>("x", usize::MAX / 8), Err(Error::OutOfMemory { what: "x", .. })));
/// # Ok::<(), Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn try_vec<T>(what: &'static str, len: usize) -> Result<alloc::vec::Vec<T>> {
    let mut v = alloc::vec::Vec::new();
    match v.try_reserve_exact(len) {
        Ok(()) => Ok(v),
        Err(_) => Err(Error::OutOfMemory {
            what,
            bytes: (len as u64).saturating_mul(core::mem::size_of::<T>() as u64),
        }),
    }
}

/// Validates DARE's parameters and its elements' flat indices `first_index .. first_index + len`,
/// whose last must not pass `u64::MAX` (the counter would wrap onto the tensor's first elements).
pub fn validate_dare(
    params: crate::ops::merge::DareParams,
    first_index: u64,
    len: usize,
) -> Result<()> {
    params.validate()?;
    check_param(
        "first_index",
        first_index as f64,
        "such that first_index + len - 1 <= u64::MAX",
        (len as u64).saturating_sub(1) <= u64::MAX - first_index,
    )
}

/// Where a sum of squares stops trusting an `f32` partial sum (a block of at most 2^16 squares):
/// `2^-100`, far above the `2^16 * 2^-149` that squares lost to underflow can add up to. Below it
/// (or where the sum overflowed) the block is summed again in `f64`.
pub const SQUARES_IN_F64_BELOW: f32 = f32::from_bits(27 << 23);

/// Validates a threshold: any number, including infinities, but not NaN.
pub fn check_threshold(name: &'static str, t: f32) -> Result<()> {
    check_param(name, f64::from(t), "a number (not NaN)", !t.is_nan())
}

/// Checks every index in `rows` is below `bound`.
pub fn check_row_indices(what: &'static str, rows: &[u32], bound: usize) -> Result<()> {
    match rows.iter().position(|&r| r as usize >= bound) {
        None => Ok(()),
        Some(at) => Err(Error::InvalidParam {
            name: what,
            value: f64::from(rows[at]),
            expected: "a row index below the matrix's row count",
        }),
    }
}

/// Validates `y = W x` (`w` `[out, in]`).
pub fn validate_gemv(w: [usize; 2], x_len: usize, y_len: usize) -> Result<()> {
    check_len("x", w[1], x_len)?;
    check_len("y", w[0], y_len)
}

/// Validates decode attention: the head counts, at least one cached position, `keys` and
/// `values` both `[positions, kv_heads * head_dim]`, `q` and `out` `heads * head_dim` long, and
/// `scale` finite and positive.
pub fn validate_attention(
    heads: AttentionHeads,
    q_len: usize,
    keys: [usize; 2],
    values: [usize; 2],
    scale: f32,
    out_len: usize,
) -> Result<()> {
    heads.validate()?;
    check_param(
        "positions",
        keys[0] as f64,
        "at least 1 cached key",
        keys[0] >= 1,
    )?;
    check_len("key width", heads.kv_width(), keys[1])?;
    check_len("value positions", keys[0], values[0])?;
    check_len("value width", heads.kv_width(), values[1])?;
    check_len("q", heads.query_width(), q_len)?;
    check_len("out", heads.query_width(), out_len)?;
    check_param(
        "scale",
        f64::from(scale),
        "finite and positive",
        scale.is_finite() && scale > 0.0,
    )
}

/// Validates `y = sum over active i of x_i w_t[i, :]` (`w_t` `[in, out]`).
pub fn validate_sparse_input_gemv(
    w_t: [usize; 2],
    x_len: usize,
    threshold: f32,
    y_len: usize,
) -> Result<()> {
    check_threshold("threshold", threshold)?;
    check_len("x", w_t[0], x_len)?;
    check_len("y", w_t[1], y_len)
}

/// Validates `out[k] = w[rows[k], :] . x`.
pub fn validate_gathered_gemv(
    w: [usize; 2],
    x_len: usize,
    rows: &[u32],
    out_len: usize,
) -> Result<()> {
    check_len("x", w[1], x_len)?;
    check_len("out", rows.len(), out_len)?;
    check_row_indices("rows", rows, w[0])
}

fn expect_shape(what: &'static str, found: [usize; 2], expected: [usize; 2]) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            what,
            expected,
            found,
        })
    }
}

fn check_mlp_io(x: [usize; 2], y: [usize; 2], hidden: usize) -> Result<()> {
    let batch = x[0];
    check_param(
        "batch",
        batch as f64,
        "in 1..=4 (decode batches)",
        (1..=MAX_MLP_BATCH).contains(&batch),
    )?;
    expect_shape("x", x, [batch, hidden])?;
    expect_shape("y", y, [batch, hidden])
}

/// Validates a CATS MLP call; returns `[intermediate, hidden]`.
pub fn validate_cats_mlp(
    x: [usize; 2],
    weights: CatsMlpWeights<[usize; 2]>,
    threshold: f32,
    y: [usize; 2],
) -> Result<[usize; 2]> {
    check_threshold("threshold", threshold)?;
    let [inter, hidden] = weights.gate;
    expect_shape("w_up", weights.up, [inter, hidden])?;
    expect_shape("w_down_t", weights.down_t, [inter, hidden])?;
    check_mlp_io(x, y, hidden)?;
    Ok([inter, hidden])
}

/// Validates a TEAL MLP call; returns `[intermediate, hidden]`.
pub fn validate_teal_mlp(
    x: [usize; 2],
    weights: TealMlpWeights<[usize; 2]>,
    thresholds: TealThresholds,
    y: [usize; 2],
) -> Result<[usize; 2]> {
    check_threshold("thresholds.gate_up", thresholds.gate_up)?;
    check_threshold("thresholds.down", thresholds.down)?;
    let [hidden, inter] = weights.gate_t;
    expect_shape("w_up_t", weights.up_t, [hidden, inter])?;
    expect_shape("w_down_t", weights.down_t, [inter, hidden])?;
    check_mlp_io(x, y, hidden)?;
    Ok([inter, hidden])
}

/// The 1-based rank (in ascending magnitude) of the `k`-quantile of `n` samples; 0 means `t = 0`.
pub fn quantile_rank(n: u64, k: f64) -> Result<u64> {
    check_param("k", k, "in [0, 1]", (0.0..=1.0).contains(&k))?;
    check_param("samples.len()", n as f64, "at least 1", n > 0)?;
    Ok(libm::ceil(k * n as f64) as u64)
}

/// Validates the rank of a k-th largest selection: `1 <= k` (`k <= n` is checked with the data).
pub fn check_kth(k: u64) -> Result<()> {
    check_param("k", k as f64, "at least 1", k >= 1)
}

/// Checks `N >= 1` models of length `len`, one finite weight each; returns `N`.
fn check_models(
    what: &'static str,
    lens: impl IntoIterator<Item = usize>,
    weights: &[f32],
    len: usize,
) -> Result<usize> {
    let mut count = 0;
    for found in lens {
        check_len(what, len, found)?;
        count += 1;
    }
    check_param("models", count as f64, "at least one model", count > 0)?;
    check_len("weights", count, weights.len())?;
    for &w in weights {
        check_param("weights", f64::from(w), "finite", w.is_finite())?;
    }
    Ok(count)
}

/// Weights that divide: finite, non-negative, positive sum. Returns the sum.
fn check_averaging_weights(weights: impl IntoIterator<Item = f32>) -> Result<f64> {
    let mut sum = 0.0f64;
    for w in weights {
        check_param(
            "weights",
            f64::from(w),
            "finite and >= 0",
            w.is_finite() && w >= 0.0,
        )?;
        sum += f64::from(w);
    }
    check_param("sum of weights", sum, "> 0", sum > 0.0)?;
    Ok(sum)
}

/// Validates a weighted mean over models of lengths `lens`; returns `sum w_i`.
pub fn validate_weighted_mean(
    lens: impl IntoIterator<Item = usize>,
    weights: &[f32],
    out_len: usize,
) -> Result<f64> {
    check_models("models[i]", lens, weights, out_len)?;
    check_averaging_weights(weights.iter().copied())
}

/// Validates task arithmetic over task vectors of lengths `lens`.
pub fn validate_task_arithmetic(
    base_len: usize,
    lens: impl IntoIterator<Item = usize>,
    weights: &[f32],
    lambda: f32,
    out_len: usize,
) -> Result<()> {
    check_len("base", out_len, base_len)?;
    check_models("taus[i]", lens, weights, out_len)?;
    check_param("lambda", f64::from(lambda), "finite", lambda.is_finite())
}

/// Validates a linear combination of models of lengths `lens` (weights finite, any sign).
pub fn validate_linear_combination(
    lens: impl IntoIterator<Item = usize>,
    weights: &[f32],
    out_len: usize,
) -> Result<()> {
    check_models("models[i]", lens, weights, out_len).map(drop)
}

/// Validates a Gram matrix of `N >= 1` vectors of lengths `lens` (and a centre as long as they
/// are) into an `N x N` output; returns `N`.
pub fn validate_gram(
    lens: impl IntoIterator<Item = usize>,
    center_len: Option<usize>,
    out_len: usize,
) -> Result<usize> {
    let mut lens = lens.into_iter();
    let first = lens.next();
    let len = first.unwrap_or(0);
    let mut n = usize::from(first.is_some());
    for found in lens {
        check_len("models[i]", len, found)?;
        n += 1;
    }
    check_param("models", n as f64, "at least one model", n > 0)?;
    if let Some(found) = center_len {
        check_len("center", len, found)?;
    }
    check_len("out (N x N)", n * n, out_len)?;
    Ok(n)
}

/// Validates SLERP's interpolation factor (finite; not clamped).
pub fn validate_slerp(t: f32) -> Result<()> {
    check_param("t", f64::from(t), "finite", t.is_finite())
}

/// Validates Model Stock's count of fine-tuned models (at least two).
pub fn validate_model_stock(models: usize) -> Result<()> {
    check_param(
        "models",
        models as f64,
        "at least two fine-tuned models",
        models >= 2,
    )
}

/// Validates DELLA over `len` elements in rows of `cols`, its first element at flat index
/// `first_index`, into `out_len` outputs.
pub fn validate_della(
    params: crate::ops::merge::DellaParams,
    cols: usize,
    first_index: u64,
    len: usize,
    out_len: usize,
) -> Result<()> {
    check_len("out", len, out_len)?;
    params.validate()?;
    check_param(
        "cols",
        cols as f64,
        "> 0 and dividing the tensor's length",
        (cols > 0 && len.is_multiple_of(cols)) || len == 0,
    )?;
    check_param(
        "first_index",
        first_index as f64,
        "such that first_index + len - 1 <= u64::MAX",
        (len as u64).saturating_sub(1) <= u64::MAX - first_index,
    )
}

/// Validates a diagonal Fisher accumulation.
pub fn validate_fisher_accumulate(fisher_len: usize, grad_len: usize, scale: f32) -> Result<()> {
    check_len("grad", fisher_len, grad_len)?;
    check_param(
        "scale",
        f64::from(scale),
        "finite and >= 0",
        scale.is_finite() && scale >= 0.0,
    )
}

/// Validates TIES election and disjoint mean over trimmed task vectors of lengths `lens`.
pub fn validate_ties_elect(
    base_len: usize,
    lens: impl IntoIterator<Item = usize>,
    weights: &[f32],
    lambda: f32,
    out_len: usize,
) -> Result<()> {
    check_len("base", out_len, base_len)?;
    check_models("trimmed[i]", lens, weights, out_len)?;
    check_averaging_weights(weights.iter().copied())?;
    check_param("lambda", f64::from(lambda), "finite", lambda.is_finite())
}

/// The sign TIES elects and compares: `1`, `-1`, or `0` for zeros and NaN (every backend uses this
/// one definition).
#[inline(always)]
#[must_use]
pub fn ties_sign(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Element `j` of TIES election under `rule`, in the reference's `f64` arithmetic: the sign of
/// `sum w_i tau_i` elected, the entries of that sign combined, `base + lambda * combined` rounded
/// to `f32` once. [`crate::ops::merge::ties_elect_with_ref`] is this at every `j`; a fast kernel
/// that cannot prove its own result takes this one (the CPU's `f32` lanes do).
///
/// ```
/// use kernels_core::backend::ties_elect_at;
/// use kernels_core::ops::merge::TiesElection;
/// let trimmed: [&[f32]; 3] = [&[0.5, -1.0], &[1.5, 2.0], &[-4.0, 0.0]];
/// let weights = [1.0, 1.0, 1.0];
/// // Element 0: the weighted sum -2.0 elects `-`; only -4.0 agrees; 10 + 0.5 * -4.0.
/// let first = ties_elect_at(10.0f32, &trimmed, &weights, 0.5, TiesElection::default(), 0);
/// assert_eq!(first, 8.0);
/// // Element 1: the sum 1.0 elects `+`; only 2.0 agrees (zeros have no sign).
/// let second = ties_elect_at(10.0f32, &trimmed, &weights, 0.5, TiesElection::default(), 1);
/// assert_eq!(second, 11.0);
/// ```
#[inline]
#[must_use]
pub fn ties_elect_at<T: Element>(
    base: T,
    trimmed: &[&[T]],
    weights: &[f32],
    lambda: f32,
    rule: TiesElection,
    j: usize,
) -> f32 {
    let elected = rule.elect(weighted_sum_at(trimmed, weights, j));
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (t, &w) in trimmed.iter().zip(weights) {
        let v = t[j].to_f64();
        if elected != 0.0 && ties_sign(v) == elected {
            num += f64::from(w) * v;
            den += f64::from(w);
        }
    }
    (base.to_f64() + f64::from(lambda) * rule.combine(num, den)) as f32
}

/// Model `i`'s effective Fisher-merge weight: `w_i`, or `w_i / ||F_i||_2` when normalising (the
/// squared norms validated by [`validate_fisher_merge`]), rounded to `f32` once.
#[inline]
#[must_use]
pub fn fisher_weight(weights: &[f32], params: FisherParams<'_>, i: usize) -> f32 {
    match params.squared_norms {
        Some(norms) => (f64::from(weights[i]) / libm::sqrt(norms[i])) as f32,
        None => weights[i],
    }
}

/// A Fisher entry raised to the floor, `max(f, floor)`, except that NaN stays NaN (and makes the
/// merged element NaN, as a NaN parameter would) instead of becoming the floor.
#[inline(always)]
#[must_use]
pub fn floored_fisher(f: f32, floor: f32) -> f32 {
    if f < floor { floor } else { f }
}

/// Validates Fisher merging; returns `sum w'_i` of the effective weights ([`fisher_weight`]).
pub fn validate_fisher_merge(
    theta_lens: impl IntoIterator<Item = usize>,
    fisher_lens: impl IntoIterator<Item = usize>,
    weights: &[f32],
    params: FisherParams<'_>,
    out_len: usize,
) -> Result<f64> {
    let models = check_models("thetas[i]", theta_lens, weights, out_len)?;
    check_len(
        "fishers",
        models,
        check_models("fishers[i]", fisher_lens, weights, out_len)?,
    )?;
    check_param(
        "floor",
        f64::from(params.floor),
        "finite and >= 0",
        params.floor.is_finite() && params.floor >= 0.0,
    )?;
    if let Some(norms) = params.squared_norms {
        check_len("squared_norms", models, norms.len())?;
        for &sq in norms {
            check_param(
                "squared_norms",
                sq,
                "finite and > 0 (a zero Fisher carries no information)",
                sq.is_finite() && sq > 0.0,
            )?;
        }
    }
    check_averaging_weights((0..models).map(|i| fisher_weight(weights, params, i)))
}

/// `sign(v)` as a ternary code, with `sign(+-0) = 0` as `torch.sign`: a kept zero stays zero.
#[inline]
#[must_use]
pub fn sign_code(v: f32) -> i8 {
    if v > 0.0 {
        1
    } else if v < 0.0 {
        -1
    } else {
        0
    }
}

/// Checks every ternary code is -1, 0 or 1.
pub fn check_codes(codes: &[i8]) -> Result<()> {
    match codes.iter().position(|c| !(-1..=1).contains(c)) {
        None => Ok(()),
        Some(i) => Err(Error::InvalidParam {
            name: "codes",
            value: f64::from(codes[i]),
            expected: "-1, 0 or 1",
        }),
    }
}

#[cfg(feature = "alloc")]
/// Validates a randomized SVD of an `m x n` matrix; returns the number of probes,
/// `min(rank + oversample, min(m, n))`.
pub fn validate_randomized_svd(shape: [usize; 2], params: RsvdParams) -> Result<usize> {
    let k = shape[0].min(shape[1]);
    check_param(
        "rank",
        params.rank as f64,
        "in 1..=min(rows, cols)",
        params.rank >= 1 && params.rank <= k,
    )?;
    check_param(
        "power_iterations",
        params.power_iterations as f64,
        "at most MAX_POWER_ITERATIONS (64)",
        params.power_iterations <= MAX_POWER_ITERATIONS,
    )?;
    Ok(params.rank.saturating_add(params.oversample).min(k))
}

/// Validates `C = alpha op(A) op(B) + beta C` for operands of shapes `a`, `b` (as stored) and
/// `c`; returns `[m, k, n]`. Every backend's GEMM calls it.
pub fn validate_gemm(
    alpha: f32,
    a: [usize; 2],
    a_op: crate::view::Transpose,
    b: [usize; 2],
    b_op: crate::view::Transpose,
    beta: f32,
    c: [usize; 2],
) -> Result<[usize; 3]> {
    use crate::view::Transpose;
    for (name, value) in [("alpha", alpha), ("beta", beta)] {
        check_param(name, f64::from(value), "finite", value.is_finite())?;
    }
    let op = |shape: [usize; 2], op| match op {
        Transpose::No => shape,
        Transpose::Yes => [shape[1], shape[0]],
    };
    let ([m, k], b) = (op(a, a_op), op(b, b_op));
    if b[0] != k {
        return Err(Error::ShapeMismatch {
            what: "op(b) (its rows must equal op(a)'s columns)",
            expected: [k, b[1]],
            found: b,
        });
    }
    if c != [m, b[1]] {
        return Err(Error::ShapeMismatch {
            what: "c",
            expected: [m, b[1]],
            found: c,
        });
    }
    Ok([m, k, b[1]])
}

/// Validates the operands of a projection: `q` is `m x r` for an `x` and an `out` of `m x n`.
///
pub fn validate_projection(q: [usize; 2], x: [usize; 2], out: [usize; 2]) -> Result<()> {
    if q[0] != x[0] {
        return Err(Error::ShapeMismatch {
            what: "q",
            expected: [x[0], q[1]],
            found: q,
        });
    }
    if out != x {
        return Err(Error::ShapeMismatch {
            what: "out",
            expected: x,
            found: out,
        });
    }
    Ok(())
}

/// Validates CGS2's input shape: tall-skinny, `rows >= cols`.
pub fn validate_cgs2(shape: [usize; 2]) -> Result<()> {
    let [m, n] = shape;
    if m < n {
        return Err(Error::ShapeMismatch {
            what: "a (CGS2 needs rows >= cols)",
            expected: [n, n],
            found: [m, n],
        });
    }
    Ok(())
}

/// Validates the operands of the OPCM step: `u` is `m x p`, `v` is `n x q` for a `tau` of
/// `m x n`, and `s` holds `min(p, q)` values. Every backend calls it.
pub fn validate_opcm(u: [usize; 2], s: usize, v: [usize; 2], tau: [usize; 2]) -> Result<()> {
    let [m, n] = tau;
    if u[0] != m {
        return Err(Error::ShapeMismatch {
            what: "u",
            expected: [m, u[1]],
            found: u,
        });
    }
    if v[0] != n {
        return Err(Error::ShapeMismatch {
            what: "v",
            expected: [n, v[1]],
            found: v,
        });
    }
    check_len("s", u[1].min(v[1]), s)
}

/// Partial pivoting's choice among `rows`: the row of largest `magnitude`, the lowest on ties
/// (`rows.start` when empty). Every backend picks its pivots with it.
pub fn pivot_row(rows: core::ops::Range<usize>, magnitude: impl Fn(usize) -> f64) -> usize {
    let start = rows.start;
    rows.max_by(|&x, &y| magnitude(x).total_cmp(&magnitude(y)).then(y.cmp(&x)))
        .unwrap_or(start)
}

/// Whether Jacobi may leave `apq` alone: below `eps` of the geometric mean of its diagonal
/// entries (which keeps small eigenvalues to high relative accuracy), or below `eps^2 ||A||_F`.
#[must_use]
pub fn negligible(apq: f64, app: f64, aqq: f64, norm: f64) -> bool {
    let abs = apq.abs();
    abs <= f64::EPSILON * libm::sqrt((app * aqq).abs()) || abs <= f64::EPSILON * f64::EPSILON * norm
}

/// The Jacobi rotation `(c, s, t = s / c)` that zeroes `apq` of the 2 x 2 block
/// `[[app, apq], [apq, aqq]]` (Rutishauser's formulas: the smaller angle, `|t| <= 1`).
#[must_use]
pub fn jacobi_rotation(app: f64, aqq: f64, apq: f64) -> (f64, f64, f64) {
    let theta = (aqq - app) / (2.0 * apq);
    let t = if theta == 0.0 {
        1.0
    } else {
        theta.signum() / (theta.abs() + libm::sqrt(1.0 + theta * theta))
    };
    let c = 1.0 / libm::sqrt(1.0 + t * t);
    (c, t * c, t)
}
