//! Interpolating between models: any linear combination, the Gram matrix of (task) vectors, and
//! the two merges built from them, SLERP and Model Stock.
//!
//! # Contracts
//!
//! * [`linear_combination_ref`] is element-wise over `N >= 1` equally long slices (stream it
//!   chunk by chunk); its weights are any finite numbers (no normalisation: a caller that wants a
//!   mean divides by the sum itself, as mergekit's `linear` does).
//! * [`gram_ref`] sums over its slices: the Gram matrix of a whole tensor is the sum of its
//!   chunks' Gram matrices.
//! * SLERP and Model Stock need a whole tensor's Gram matrix before they combine, so they are
//!   two passes: a Gram matrix ([`gram_ref`]), coefficients from it ([`slerp_coefficients`],
//!   [`model_stock_ratio`]), then a linear combination. They follow mergekit's definitions
//!   (SLERP over the flattened tensor with a linear fallback for nearly parallel vectors; Model
//!   Stock's ratio from the mean pairwise cosine, not clamped).

use crate::backend::{validate_gram, validate_linear_combination, validate_slerp};
use crate::{Element, Error, Real, Result};

/// Linear combination `out = sum w_i m_i`, weights any finite numbers.
///
/// ```
/// use kernels_core::ops::interpolate::linear_combination_ref;
/// let mut out = [0.0f32; 2];
/// linear_combination_ref(&[&[1.0f32, 2.0][..], &[4.0, -1.0]], &[1.5, -0.5], &mut out)?;
/// assert_eq!(out, [-0.5, 3.5]);
/// assert!(linear_combination_ref(&[&[1.0f32][..]], &[f32::NAN], &mut [0.0]).is_err());
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn linear_combination_ref<T: Element>(
    models: &[&[T]],
    weights: &[f32],
    out: &mut [f32],
) -> Result<()> {
    validate_linear_combination(models.iter().map(|m| m.len()), weights, out.len())?;
    for (j, o) in out.iter_mut().enumerate() {
        *o = crate::ops::merge::weighted_sum_at(models, weights, j) as f32;
    }
    Ok(())
}

/// Gram matrix of `N` vectors, centred on `center` when one is given:
/// `out[i * N + j] = sum_k (m_i[k] - c[k]) (m_j[k] - c[k])` (`c = 0` without a centre), both
/// triangles written. With the base model as the centre, these are the dot products of the
/// task vectors; `out[i * N + i]` is `||tau_i||^2`.
///
/// ```
/// use kernels_core::ops::interpolate::gram_ref;
/// let (base, a, b) = ([1.0f32, 1.0], [2.0f32, 1.0], [1.0f32, 3.0]);
/// let mut g = [0.0f64; 4];
/// gram_ref(&[&a, &b], Some(&base), &mut g)?;
/// assert_eq!(g, [1.0, 0.0, 0.0, 4.0]); // tau_a = (1, 0), tau_b = (0, 2)
/// gram_ref(&[&a, &b], None, &mut g)?;
/// assert_eq!(g, [5.0, 5.0, 5.0, 10.0]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn gram_ref<T: Element>(models: &[&[T]], center: Option<&[T]>, out: &mut [f64]) -> Result<()> {
    let n = validate_gram(
        models.iter().map(|m| m.len()),
        center.map(<[T]>::len),
        out.len(),
    )?;
    out.fill(0.0);
    let len = models.first().map_or(0, |m| m.len());
    for k in 0..len {
        let c = center.map_or(0.0, |c| c[k].to_f64());
        for i in 0..n {
            let di = models[i][k].to_f64() - c;
            for j in i..n {
                out[i * n + j] += di * (models[j][k].to_f64() - c);
            }
        }
    }
    for i in 0..n {
        for j in 0..i {
            out[i * n + j] = out[j * n + i];
        }
    }
    Ok(())
}

/// SLERP falls back to linear interpolation where the normalised dot product of its two vectors
/// exceeds this in magnitude (mergekit's `DOT_THRESHOLD`): the angle is too small for the
/// spherical formula's division by `sin(theta)`.
pub const SLERP_DOT_THRESHOLD: f64 = 0.9995;

/// A SLERP input with a norm at most this is used unnormalised in the dot product (mergekit's
/// `eps`), so a zero tensor does not divide by zero.
pub const SLERP_NORM_EPSILON: f64 = 1e-8;

/// The coefficients `[s0, s1]` of SLERP from `v0` (at `t = 0`) to `v1` (at `t = 1`), given their
/// Gram matrix `[g00, g01, g10, g11]` ([`gram_ref`] without a centre): with
/// `d = g01 / (|v0| |v1|)` (a norm at most [`SLERP_NORM_EPSILON`] counts as 1) and
/// `theta = acos(d)`, `s0 = sin((1 - t) theta) / sin(theta)` and `s1 = sin(t theta) / sin(theta)`,
/// or `[1 - t, t]` where `|d| > `[`SLERP_DOT_THRESHOLD`] (or `d` is NaN). `t` is not clamped.
///
/// ```
/// use kernels_core::ops::interpolate::slerp_coefficients;
/// // Orthogonal unit vectors: halfway is (cos 45, sin 45).
/// let [s0, s1] = slerp_coefficients(0.5, [1.0, 0.0, 0.0, 1.0]);
/// assert!((s0 - 0.5f64.sqrt()).abs() < 1e-15 && (s1 - 0.5f64.sqrt()).abs() < 1e-15);
/// // Parallel vectors: plain linear interpolation.
/// assert_eq!(slerp_coefficients(0.25, [1.0, 2.0, 2.0, 4.0]), [0.75, 0.25]);
/// ```
#[must_use]
pub fn slerp_coefficients(t: f64, gram: [f64; 4]) -> [f64; 2] {
    let norm = |g: f64| {
        let n = libm::sqrt(g);
        if n > SLERP_NORM_EPSILON { n } else { 1.0 }
    };
    let dot = gram[1] / norm(gram[0]) / norm(gram[3]);
    if dot.is_nan() || libm::fabs(dot) > SLERP_DOT_THRESHOLD {
        return [1.0 - t, t];
    }
    let theta = libm::acos(dot);
    let sin_theta = libm::sin(theta);
    [
        libm::sin(theta - theta * t) / sin_theta,
        libm::sin(theta * t) / sin_theta,
    ]
}

/// SLERP of two whole tensors: `out = s0 v0 + s1 v1` with [`slerp_coefficients`] of their Gram
/// matrix (mergekit's `slerp`, the tensor flattened). `t` finite.
///
/// ```
/// use kernels_core::ops::interpolate::slerp_ref;
/// let mut out = [0.0f32; 2];
/// slerp_ref(&[1.0f32, 0.0], &[0.0f32, 1.0], 0.5, &mut out)?;
/// assert!((out[0] - 0.5f32.sqrt()).abs() < 1e-7 && (out[1] - 0.5f32.sqrt()).abs() < 1e-7);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn slerp_ref<T: Element>(v0: &[T], v1: &[T], t: f32, out: &mut [f32]) -> Result<()> {
    validate_slerp(t)?;
    let mut gram = [0.0f64; 4];
    gram_ref(&[v0, v1], None, &mut gram)?;
    let [s0, s1] = slerp_coefficients(f64::from(t), gram);
    crate::error::check_len("out", v0.len(), out.len())?;
    for (o, (a, b)) in out.iter_mut().zip(v0.iter().zip(v1)) {
        *o = (s0 * a.to_f64() + s1 * b.to_f64()) as f32;
    }
    Ok(())
}

/// Model Stock's pairwise cosines are divided by `max(|tau_i| |tau_j|, this)` (mergekit's clamp),
/// so a zero task vector has cosine 0 with every other.
pub const MODEL_STOCK_NORM_FLOOR: f64 = 1e-6;

/// Model Stock's interpolation ratio `t = N c / (1 + (N - 1) c)` from the `N x N` Gram matrix of
/// `N >= 2` task vectors ([`gram_ref`] centred on the base), where `c` is the mean over pairs of
/// `g_ij / max(sqrt(g_ii g_jj), `[`MODEL_STOCK_NORM_FLOOR`]`)` clamped to `[-1, 1]`. Not
/// clamped (mergekit does not clamp it either).
///
/// ```
/// use kernels_core::ops::interpolate::model_stock_ratio;
/// // Two task vectors at 60 degrees: c = 1/2, t = 2 (1/2) / (1 + 1/2) = 2/3.
/// let t = model_stock_ratio(&[1.0, 0.5, 0.5, 1.0])?;
/// assert!((t - 2.0 / 3.0).abs() < 1e-15);
/// assert!(model_stock_ratio(&[1.0]).is_err()); // one fine-tune is not enough
/// # Ok::<(), kernels_core::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::InvalidParam`] for fewer than two task vectors, a `gram` that is not `N x N`, or a
/// mean cosine of exactly `-1 / (N - 1)`, where the ratio is undefined.
pub fn model_stock_ratio(gram: &[f64]) -> Result<f64> {
    let n = libm::sqrt(gram.len() as f64) as usize;
    crate::error::check_param(
        "gram",
        gram.len() as f64,
        "an N x N matrix with N >= 2",
        n >= 2 && n * n == gram.len(),
    )?;
    let (mut sum, mut pairs) = (0.0f64, 0.0f64);
    for i in 0..n {
        for j in i + 1..n {
            let norms = libm::sqrt(gram[i * n + i]) * libm::sqrt(gram[j * n + j]);
            let cos = gram[i * n + j] / norms.max(MODEL_STOCK_NORM_FLOOR);
            sum += cos.clamp(-1.0, 1.0);
            pairs += 1.0;
        }
    }
    let c = sum / pairs;
    let den = 1.0 + (n as f64 - 1.0) * c;
    if den == 0.0 || !c.is_finite() {
        return Err(Error::InvalidParam {
            name: "mean cosine of the task vectors",
            value: c,
            expected: "finite and not -1 / (N - 1)",
        });
    }
    Ok(n as f64 * c / den)
}

/// Model Stock of whole tensors: `out = t mean(models) + (1 - t) base` with `t` from
/// [`model_stock_ratio`] of the task vectors' Gram matrix. `N >= 2` fine-tuned models.
///
/// ```
/// use kernels_core::ops::interpolate::model_stock_ref;
/// let base = [0.0f32, 0.0];
/// let (a, b) = ([1.0f32, 0.0], [0.5f32, 0.75f32.sqrt()]); // unit task vectors 60 degrees apart
/// let mut out = [0.0f32; 2];
/// model_stock_ref(&base, &[&a, &b], &mut out)?;
/// // t = 2/3 of the way from the base to the average of the two.
/// assert!((out[0] - 0.5).abs() < 1e-7 && (out[1] - 0.75f32.sqrt() / 3.0).abs() < 1e-7);
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn model_stock_ref<T: Element>(base: &[T], models: &[&[T]], out: &mut [f32]) -> Result<()> {
    let n = models.len();
    crate::backend::validate_model_stock(n)?;
    let mut gram = alloc::vec![0.0f64; n * n];
    gram_ref(models, Some(base), &mut gram)?;
    let t = model_stock_ratio(&gram)?;
    crate::error::check_len("out", base.len(), out.len())?;
    for (j, o) in out.iter_mut().enumerate() {
        let mean = models.iter().map(|m| m[j].to_f64()).sum::<f64>() / n as f64;
        *o = (t * mean + (1.0 - t) * base[j].to_f64()) as f32;
    }
    Ok(())
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;
    use crate::CounterRng;
    use half::bf16;

    #[test]
    fn slerp_walks_the_arc_at_constant_speed() {
        // Unit vectors 90 degrees apart: the point at t has angle t * 90 degrees from v0.
        let (v0, v1) = ([1.0f32, 0.0], [0.0f32, 1.0]);
        for t in [0.0f32, 0.1, 0.3, 0.5, 0.9, 1.0] {
            let mut out = [0.0f32; 2];
            slerp_ref(&v0, &v1, t, &mut out).unwrap();
            let angle = f64::from(t) * core::f64::consts::FRAC_PI_2;
            assert!((f64::from(out[0]) - libm::cos(angle)).abs() < 1e-7, "{t}");
            assert!((f64::from(out[1]) - libm::sin(angle)).abs() < 1e-7, "{t}");
        }
        // Scaled inputs keep their scale: slerp interpolates directions, not unit vectors.
        let mut out = [0.0f32; 2];
        slerp_ref(&[2.0f32, 0.0], &[0.0f32, 2.0], 0.5, &mut out).unwrap();
        assert!((out[0] - 2.0 * 0.5f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn slerp_of_nearly_parallel_or_zero_vectors_is_linear() {
        let v0 = [1.0f32, 0.0, 0.0];
        let v1 = [1.0f32, 0.01, 0.0]; // cos = 0.99995 > 0.9995
        let mut out = [0.0f32; 3];
        slerp_ref(&v0, &v1, 0.5, &mut out).unwrap();
        assert_eq!(out, [1.0, 0.005, 0.0]);
        // A zero tensor: the dot product is 0, so the spherical formula runs, on a right angle.
        slerp_ref(&[0.0f32; 3], &v1, 0.5, &mut out).unwrap();
        let s1 = libm::sin(core::f64::consts::FRAC_PI_4) as f32;
        assert!((out[0] - s1).abs() < 1e-7);
        assert!(slerp_ref(&v0, &v1, f32::NAN, &mut out).is_err());
        assert!(slerp_ref(&v0, &v1[..2], 0.5, &mut out).is_err());
    }

    #[test]
    fn model_stock_matches_its_closed_form() {
        let rng = CounterRng::new(9);
        let n = 257;
        let base: alloc::vec::Vec<bf16> =
            (0..n).map(|i| bf16::from_f64(rng.normal_at(i))).collect();
        let models: alloc::vec::Vec<alloc::vec::Vec<bf16>> = (1..4)
            .map(|m| {
                (0..n)
                    .map(|i| {
                        bf16::from_f64(base[i as usize].to_f64() + rng.normal_at(m * 1000 + i))
                    })
                    .collect()
            })
            .collect();
        let views: alloc::vec::Vec<&[bf16]> = models.iter().map(|m| &m[..]).collect();
        let mut out = alloc::vec![0.0f32; n as usize];
        model_stock_ref(&base, &views, &mut out).unwrap();
        // The cosines by hand, straight from the definition.
        let tau = |m: usize, k: usize| views[m][k].to_f64() - base[k].to_f64();
        let dot = |a: usize, b: usize| (0..n as usize).map(|k| tau(a, k) * tau(b, k)).sum::<f64>();
        let cos = |a, b| dot(a, b) / libm::sqrt(dot(a, a) * dot(b, b));
        let c = (cos(0, 1) + cos(0, 2) + cos(1, 2)) / 3.0;
        let t = 3.0 * c / (1.0 + 2.0 * c);
        for k in 0..n as usize {
            let mean = (0..3).map(|m| views[m][k].to_f64()).sum::<f64>() / 3.0;
            let expect = t * mean + (1.0 - t) * base[k].to_f64();
            assert!((f64::from(out[k]) - expect).abs() <= 1e-6 * (1.0 + expect.abs()));
        }
        // Independent task vectors are nearly orthogonal: t is small, the merge stays near the base.
        assert!(t.abs() < 0.3, "{t}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let a = [1.0f32; 3];
        let mut g = [0.0f64; 4];
        assert!(gram_ref(&[&a[..], &a[..2]], None, &mut g).is_err());
        assert!(gram_ref(&[&a, &a], Some(&a[..1]), &mut g).is_err());
        assert!(gram_ref(&[&a, &a], None, &mut g[..3]).is_err());
        assert!(gram_ref::<f32>(&[], None, &mut []).is_err());
        let mut out = [0.0f32; 3];
        assert!(model_stock_ref(&a, &[&a], &mut out).is_err());
        assert!(model_stock_ratio(&[1.0, 0.0, 0.0]).is_err());
        // Two opposite task vectors: c = -1, 1 + (N - 1) c = 0.
        assert!(model_stock_ratio(&[1.0, -1.0, -1.0, 1.0]).is_err());
        assert!(linear_combination_ref::<f32>(&[], &[], &mut []).is_err());
        assert!(linear_combination_ref(&[&a], &[1.0, 2.0], &mut out).is_err());
    }
}
