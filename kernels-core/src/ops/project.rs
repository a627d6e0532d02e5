//! Orthonormalisation and orthogonal projection: Householder thin QR, CGS2, `X - Q (Q^T X)` and
//! `Q (Q^T X)`.
//!
//! # Contracts
//!
//! * `A` is `m x n`; the thin QR returns `Q` `m x k` with orthonormal columns and `R` `k x n`
//!   upper triangular (`k = min(m, n)`), `A = Q R`, with `diag(R) >= 0` so the factors are unique
//!   for full-rank `A`. Rank-deficient input is fine: `Q` stays orthonormal.
//! * CGS2 (classical Gram-Schmidt, applied twice) is for tall-skinny full-rank `A` (`m >= n`);
//!   a column that is numerically in the span of the previous ones is [`Error::Singular`].
//! * Projections take `Q` `m x r` with orthonormal columns (not checked: that costs as much as the
//!   projection) and `X` `m x n`.
//! * Non-finite input is [`Error::NonFinite`].

use alloc::vec::Vec;

use crate::backend::{validate_cgs2, validate_projection};
use crate::{Error, Mat, MatMut, MatRef, Real, Result};

pub(crate) fn check_finite_mat<T: Real>(what: &'static str, a: MatRef<'_, T>) -> Result<()> {
    for (i, row) in a.row_iter().enumerate() {
        if let Some(j) = row.iter().position(|v| !v.to_f64().is_finite()) {
            return Err(Error::NonFinite {
                what,
                index: i * a.cols() + j,
            });
        }
    }
    Ok(())
}

pub use crate::view::Transpose;

/// A thin QR factorisation, in `f64` from the references and in `f32` from the fast kernels.
#[derive(Clone, Debug, PartialEq)]
pub struct Qr<T = f64> {
    /// `m x k`, orthonormal columns.
    pub q: Mat<T>,
    /// `k x n`, upper triangular, non-negative diagonal.
    pub r: Mat<T>,
}

/// Householder thin QR of `a` (reference, `f64`).
///
/// ```
/// use kernels_core::{Mat, ops::project::householder_qr_ref};
/// let a = Mat::from_fn(5, 3, |i, j| ((i + 1) * (j + 2)) as f64 + if i == j { 1.0 } else { 0.0 })?;
/// let qr = householder_qr_ref(a.as_ref())?;
/// assert!(qr.q.matmul(&qr.r)?.distance(&a)? < 1e-12 * a.frobenius_norm());
/// assert!(qr.q.orthogonality_error()? < 1e-12);
/// assert!(qr.r.at(0, 0) > 0.0 && qr.r.at(1, 0) == 0.0); // upper triangular, positive diagonal
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn householder_qr_ref<T: Real>(a: MatRef<'_, T>) -> Result<Qr> {
    check_finite_mat("a", a)?;
    householder_qr_f64(&Mat::widen(a))
}

pub(crate) fn householder_qr_f64(a: &Mat<f64>) -> Result<Qr> {
    Ok(householder_qr_pivoted(a, false)?.0)
}

/// Householder QR, optionally with column pivoting (`A P = Q R`, largest remaining column first).
/// Returns the factors and `perm`, where column `j` of `A P` is column `perm[j]` of `A`.
pub(crate) fn householder_qr_pivoted(a: &Mat<f64>, pivot: bool) -> Result<(Qr, Vec<usize>)> {
    let (m, n) = (a.rows(), a.cols());
    let k = m.min(n);
    // Work on columns: column j of `a` is `cols[j]`.
    let mut cols: Vec<Vec<f64>> = (0..n)
        .map(|j| (0..m).map(|i| a.at(i, j)).collect())
        .collect();
    let mut perm: Vec<usize> = (0..n).collect();
    let mut reflectors: Vec<Vec<f64>> = Vec::with_capacity(k);
    // Squared norms of the columns below row j, downdated after each step; recomputed where the
    // downdate cancelled (LAPACK's xLAQP2 does the same).
    let mut remaining: Vec<f64> = cols.iter().map(|c| c.iter().map(|v| v * v).sum()).collect();
    let mut reference = remaining.clone();
    for j in 0..k {
        if pivot {
            let best = (j..n)
                .max_by(|&x, &y| remaining[x].total_cmp(&remaining[y]).then(y.cmp(&x)))
                .unwrap_or(j);
            cols.swap(j, best);
            perm.swap(j, best);
            remaining.swap(j, best);
            reference.swap(j, best);
        }
        let x = &cols[j][j..];
        let norm = libm::sqrt(x.iter().map(|v| v * v).sum());
        let mut v = x.to_vec();
        if norm > 0.0 {
            // v = x + sign(x0) ||x|| e0 avoids cancellation.
            let alpha = if x[0] >= 0.0 { norm } else { -norm };
            v[0] += alpha;
            let vnorm = libm::sqrt(v.iter().map(|t| t * t).sum());
            for t in &mut v {
                *t /= vnorm;
            }
            for col in cols.iter_mut().skip(j) {
                let dot: f64 = v.iter().zip(&col[j..]).map(|(a, b)| a * b).sum();
                for (c, vi) in col[j..].iter_mut().zip(&v) {
                    *c -= 2.0 * dot * vi;
                }
            }
        } else {
            v.fill(0.0);
        }
        reflectors.push(v);
        if pivot {
            for c in j + 1..n {
                remaining[c] -= cols[c][j] * cols[c][j];
                if remaining[c] <= 1e-8 * reference[c] {
                    remaining[c] = cols[c][j + 1..].iter().map(|v| v * v).sum();
                    reference[c] = remaining[c];
                }
            }
        }
    }
    // R: the upper triangle of the transformed columns.
    let mut r = Mat::from_fn(k, n, |i, j| if i <= j { cols[j][i] } else { 0.0 })?;
    // Q = H_0 ... H_{k-1} applied to the first k columns of I.
    let mut q_cols: Vec<Vec<f64>> = (0..k)
        .map(|j| (0..m).map(|i| if i == j { 1.0 } else { 0.0 }).collect())
        .collect();
    for (j, v) in reflectors.iter().enumerate().rev() {
        for col in &mut q_cols {
            let dot: f64 = v.iter().zip(&col[j..]).map(|(a, b)| a * b).sum();
            for (c, vi) in col[j..].iter_mut().zip(v) {
                *c -= 2.0 * dot * vi;
            }
        }
    }
    // Make diag(R) non-negative.
    for i in 0..k {
        if r.at(i, i) < 0.0 {
            for v in r.row_mut(i) {
                *v = -*v;
            }
            for v in &mut q_cols[i] {
                *v = -*v;
            }
        }
    }
    let q = Mat::from_fn(m, k, |i, j| q_cols[j][i])?;
    Ok((Qr { q, r }, perm))
}

/// Below this relative norm, CGS2 takes a column to be dependent on the previous ones.
pub const CGS2_DEPENDENCE_TOLERANCE: f64 = 1e-10;

/// CGS2 thin QR of a tall-skinny full-rank `a` (`m >= n`; reference, `f64`).
///
/// ```
/// use kernels_core::{Mat, MatRef, ops::project::cgs2_ref};
/// let a = [3.0f64, 1.0, 4.0, 2.0, 0.0, 2.0]; // 3 x 2
/// let qr = cgs2_ref(MatRef::from_slice(&a, 3, 2)?)?;
/// assert!((qr.r.at(0, 0) - 5.0).abs() < 1e-15);
/// // Dependent columns are an error, not a basis of noise.
/// let dependent = [1.0f64, 2.0, 2.0, 4.0, 3.0, 6.0];
/// assert!(cgs2_ref(MatRef::from_slice(&dependent, 3, 2)?).is_err());
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn cgs2_ref<T: Real>(a: MatRef<'_, T>) -> Result<Qr> {
    validate_cgs2(a.shape())?;
    check_finite_mat("a", a)?;
    let (m, n) = (a.rows(), a.cols());
    let mut q_cols: Vec<Vec<f64>> = Vec::with_capacity(n);
    let mut r = Mat::zeros(n, n)?;
    for j in 0..n {
        let mut v: Vec<f64> = (0..m).map(|i| a.at(i, j).to_f64()).collect();
        let original = libm::sqrt(v.iter().map(|t| t * t).sum());
        for _pass in 0..2 {
            let coeffs: Vec<f64> = q_cols
                .iter()
                .map(|q| q.iter().zip(&v).map(|(a, b)| a * b).sum())
                .collect();
            for (i, (q, c)) in q_cols.iter().zip(&coeffs).enumerate() {
                *r.at_mut(i, j) += c;
                for (vi, qi) in v.iter_mut().zip(q) {
                    *vi -= c * qi;
                }
            }
        }
        let norm = libm::sqrt(v.iter().map(|t| t * t).sum());
        if norm <= CGS2_DEPENDENCE_TOLERANCE * original || norm == 0.0 {
            return Err(Error::Singular {
                what: "CGS2",
                index: j,
            });
        }
        *r.at_mut(j, j) = norm;
        for t in &mut v {
            *t /= norm;
        }
        q_cols.push(v);
    }
    Ok(Qr {
        q: Mat::from_fn(m, n, |i, j| q_cols[j][i])?,
        r,
    })
}

fn project<Q: Real, X: Real>(
    q: MatRef<'_, Q>,
    x: MatRef<'_, X>,
    mut out: MatMut<'_, f32>,
    keep_complement: bool,
) -> Result<()> {
    validate_projection(q.shape(), x.shape(), out.shape())?;
    let m = x.rows();
    check_finite_mat("q", q)?;
    check_finite_mat("x", x)?;
    let qf = Mat::widen(q);
    let xf = Mat::widen(x);
    let projected = qf.matmul(&qf.t_matmul(&xf)?)?;
    for i in 0..m {
        for (j, o) in out.row_mut(i).iter_mut().enumerate() {
            let p = projected.at(i, j);
            *o = if keep_complement { xf.at(i, j) - p } else { p } as f32;
        }
    }
    Ok(())
}

/// `out = X - Q (Q^T X)`: the part of `X` orthogonal to the columns of `Q`.
///
/// ```
/// use kernels_core::{MatMut, MatRef, ops::project::project_out_ref};
/// let q = [0.6f64, 0.8]; // one unit column
/// let x = [1.0f64, 0.0];
/// let mut out = [0.0f32; 2];
/// project_out_ref(MatRef::from_slice(&q, 2, 1)?, MatRef::from_slice(&x, 2, 1)?, MatMut::from_slice(&mut out, 2, 1)?)?;
/// assert_eq!(out, [0.64, -0.48]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn project_out_ref<Q: Real, X: Real>(
    q: MatRef<'_, Q>,
    x: MatRef<'_, X>,
    out: MatMut<'_, f32>,
) -> Result<()> {
    project(q, x, out, true)
}

/// `out = Q (Q^T X)`: the part of `X` in the span of the columns of `Q`.
///
/// ```
/// use kernels_core::{MatMut, MatRef, ops::project::project_onto_ref};
/// let q = [0.6f64, 0.8]; // one unit column
/// let x = [1.0f64, 0.0];
/// let mut out = [0.0f32; 2];
/// project_onto_ref(MatRef::from_slice(&q, 2, 1)?, MatRef::from_slice(&x, 2, 1)?, MatMut::from_slice(&mut out, 2, 1)?)?;
/// assert_eq!(out, [0.36, 0.48]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn project_onto_ref<Q: Real, X: Real>(
    q: MatRef<'_, Q>,
    x: MatRef<'_, X>,
    out: MatMut<'_, f32>,
) -> Result<()> {
    project(q, x, out, false)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::vec;
    use proptest::prelude::*;

    /// Backward-error bound of Householder QR in f64, per unit of `max(m, n) * eps`.
    const QR_TOLERANCE_FACTOR: f64 = 8.0;

    pub(crate) fn random(m: usize, n: usize, seed: u64) -> Mat<f64> {
        let rng = crate::CounterRng::new(seed);
        Mat::from_fn(m, n, |i, j| rng.normal_at((i * n + j) as u64)).unwrap()
    }

    fn check_qr(a: &Mat<f64>, qr: &Qr) {
        let (m, n) = a.shape().into();
        let bound = QR_TOLERANCE_FACTOR * f64::EPSILON * m.max(n).max(1) as f64;
        assert!(
            qr.q.matmul(&qr.r).unwrap().distance(a).unwrap() <= bound * a.frobenius_norm().max(1.0)
        );
        assert!(qr.q.orthogonality_error().unwrap() <= bound * (m.min(n).max(1) as f64).sqrt());
        for i in 0..qr.r.rows() {
            assert!(qr.r.at(i, i) >= 0.0);
            for j in 0..i.min(qr.r.cols()) {
                assert_eq!(qr.r.at(i, j), 0.0);
            }
        }
    }

    #[test]
    fn qr_of_tall_wide_square_and_degenerate_matrices() {
        for (m, n) in [(1, 1), (7, 3), (3, 7), (16, 16), (0, 4), (4, 0)] {
            let a = random(m, n, (m * 31 + n) as u64);
            check_qr(&a, &householder_qr_ref(a.as_ref()).unwrap());
        }
        // Rank-deficient: a repeated column and a zero column.
        let mut a = random(6, 4, 9);
        for i in 0..6 {
            *a.at_mut(i, 2) = a.at(i, 0);
            *a.at_mut(i, 3) = 0.0;
        }
        check_qr(&a, &householder_qr_ref(a.as_ref()).unwrap());
        assert!(matches!(
            cgs2_ref(a.as_ref()),
            Err(Error::Singular { index: 2, .. })
        ));
        let z = Mat::<f64>::zeros(3, 3).unwrap();
        check_qr(&z, &householder_qr_ref(z.as_ref()).unwrap());
    }

    #[test]
    fn cgs2_agrees_with_householder() {
        let a = random(50, 8, 2);
        let h = householder_qr_ref(a.as_ref()).unwrap();
        let c = cgs2_ref(a.as_ref()).unwrap();
        assert!(h.q.distance(&c.q).unwrap() < 1e-12);
        assert!(h.r.distance(&c.r).unwrap() < 1e-12);
        assert!(cgs2_ref(random(3, 5, 1).as_ref()).is_err());
        let mut nan = random(4, 2, 1);
        *nan.at_mut(1, 1) = f64::NAN;
        assert!(matches!(
            householder_qr_ref(nan.as_ref()),
            Err(Error::NonFinite { index: 3, .. })
        ));
    }

    #[test]
    fn projection_is_idempotent_and_splits_x() {
        let q = householder_qr_ref(random(20, 3, 4).as_ref()).unwrap().q;
        let x = random(20, 5, 5);
        let (mut out, mut onto) = (vec![0.0f32; 100], vec![0.0f32; 100]);
        project_out_ref(
            q.as_ref(),
            x.as_ref(),
            MatMut::from_slice(&mut out, 20, 5).unwrap(),
        )
        .unwrap();
        project_onto_ref(
            q.as_ref(),
            x.as_ref(),
            MatMut::from_slice(&mut onto, 20, 5).unwrap(),
        )
        .unwrap();
        // out + onto = x.
        for k in 0..100 {
            assert!((f64::from(out[k] + onto[k]) - x.as_slice()[k]).abs() < 1e-5);
        }
        // Q^T out = 0 and projecting again changes nothing.
        let out_m = Mat::from_vec(out.iter().map(|&v| f64::from(v)).collect(), 20, 5).unwrap();
        assert!(q.t_matmul(&out_m).unwrap().frobenius_norm() < 1e-5);
        let mut again = vec![0.0f32; 100];
        project_out_ref(
            q.as_ref(),
            out_m.as_ref(),
            MatMut::from_slice(&mut again, 20, 5).unwrap(),
        )
        .unwrap();
        for k in 0..100 {
            assert!((again[k] - out[k]).abs() < 1e-5);
        }
        let mut wrong = vec![0.0f32; 100];
        assert!(
            project_out_ref(
                q.as_ref(),
                random(19, 5, 1).as_ref(),
                MatMut::from_slice(&mut wrong[..95], 19, 5).unwrap()
            )
            .is_err()
        );
    }

    proptest! {
        #[test]
        fn qr_reconstructs_any_shape(m in 0usize..24, n in 0usize..24, seed in any::<u64>()) {
            let a = random(m, n, seed);
            check_qr(&a, &householder_qr_ref(a.as_ref()).unwrap());
        }
    }
}
