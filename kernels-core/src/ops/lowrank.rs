//! Low-rank decomposition: thin SVD, randomized truncated SVD, LU with partial pivoting and its
//! LDU form, LoRA extraction and the OPCM projection step.
//!
//! # Contracts
//!
//! * Inputs are `m x n` views of any element type, widened to `f64`; non-finite input is
//!   [`Error::NonFinite`]. Results are `f64` (they are the oracle for `f32` kernels).
//! * **Thin SVD**: `A = U diag(s) V^T` with `k = min(m, n)`, `U` `m x k` and `V` `n x k` with
//!   orthonormal columns (also for rank-deficient `A`), `s` descending and `>= 0`. Signs are
//!   normalised: the entry of largest magnitude of each column of `U` is positive (the first such
//!   entry on ties), so the factors are unique where the singular values are distinct.
//!   One-sided Jacobi with at most [`MAX_JACOBI_SWEEPS`] sweeps; not converging is
//!   [`Error::NotConverged`], never a silent wrong answer.
//! * **Randomized SVD**: range finder with `rank + oversample` Gaussian probes drawn from the
//!   counter-based generator, `power_iterations` with re-orthonormalisation (QR) after every
//!   product, then the thin SVD of the small projected matrix.
//! * **LU**: `P A = L U`, `L` `m x k` unit lower triangular, `U` `k x n` upper triangular, `P` a row
//!   permutation (`perm[i]` is the row of `A` that lands in row `i`). A zero pivot column is skipped
//!   (as LAPACK's getrf does). **LDU**: `U = D U1` with `U1` unit upper; a pivot with
//!   `|d| <= pivot_guard * max|A|` is [`Error::Singular`].
//! * **Symmetric eigendecomposition**: `S = V diag(w) V^T`, `w` descending, cyclic Jacobi; see
//!   [`symmetric_eigen_ref`].
//! * **OPCM**: see [`opcm_project_ref`].

use alloc::vec;
use alloc::vec::Vec;

use crate::backend::{
    jacobi_rotation, negligible, pivot_row, validate_opcm, validate_randomized_svd,
};
use crate::error::check_param;
use crate::ops::project::{Qr, check_finite_mat, householder_qr_f64, householder_qr_pivoted};
use crate::{CounterRng, Error, Mat, MatRef, Real, Result};

/// The constant `c` of the accuracy bound `c * eps * sqrt(max(m, n))` (relative to `||A||_F`,
/// `eps = f32::EPSILON`) that every backend's `f32` factorisations meet: reconstruction,
/// orthogonality and singular values.
pub const F32_FACTORISATION_TOLERANCE: f64 = 16.0;

/// [`F32_FACTORISATION_TOLERANCE`]` * eps * sqrt(max(m, n))`.
///
/// ```
/// use kernels_core::ops::lowrank::factorisation_tolerance;
/// // 16 eps sqrt(64): about 1.5e-5 of ||A||_F for a 64 x 8 matrix.
/// assert_eq!(factorisation_tolerance(64, 8), 128.0 * f64::from(f32::EPSILON));
/// ```
#[must_use]
pub fn factorisation_tolerance(m: usize, n: usize) -> f64 {
    F32_FACTORISATION_TOLERANCE * f64::from(f32::EPSILON) * libm::sqrt(m.max(n).max(1) as f64)
}

/// Sweep bound of the one-sided Jacobi SVD. Random matrices converge in 6 to 12 sweeps.
pub const MAX_JACOBI_SWEEPS: usize = 60;

/// A thin SVD, in `f64` from the references and in `f32` from the fast kernels.
///
/// ```
/// use kernels_core::{Mat, ops::lowrank::thin_svd_ref};
/// let a = Mat::from_fn(4, 3, |i, j| (i * 3 + j) as f64 + if i == j { 1.0 } else { 0.0 })?;
/// let svd = thin_svd_ref(a.as_ref())?;
/// assert!(svd.reconstruct()?.distance(&a)? < 1e-12 * a.frobenius_norm());
/// // The best rank-1 approximation errs by the tail of the spectrum.
/// let tail: f64 = svd.s[1..].iter().map(|s| s * s).sum::<f64>().sqrt();
/// assert!((svd.truncate(1).reconstruct()?.distance(&a)? - tail).abs() < 1e-12 * a.frobenius_norm());
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Svd<T = f64> {
    /// `m x k`, orthonormal columns.
    pub u: Mat<T>,
    /// `k` singular values, descending.
    pub s: Vec<T>,
    /// `n x k`, orthonormal columns.
    pub v: Mat<T>,
}

impl Svd<f64> {
    /// `U diag(s) V^T`.
    pub fn reconstruct(&self) -> Result<Mat<f64>> {
        let us = Mat::from_fn(self.u.rows(), self.s.len(), |i, j| {
            self.u.at(i, j) * self.s[j]
        })?;
        us.matmul(&self.v.transpose())
    }

    /// The leading `r` triplets.
    #[must_use]
    pub fn truncate(&self, r: usize) -> Self {
        Self {
            u: self.u.leading_cols(r),
            s: self.s[..r.min(self.s.len())].to_vec(),
            v: self.v.leading_cols(r),
        }
    }
}

/// Thin SVD of `a` by one-sided Jacobi (reference).
///
/// ```
/// use kernels_core::{MatRef, ops::lowrank::thin_svd_ref};
/// let a = [0.0f64, 2.0, -3.0, 0.0]; // [[0, 2], [-3, 0]]
/// let svd = thin_svd_ref(MatRef::from_slice(&a, 2, 2)?)?;
/// assert!((svd.s[0] - 3.0).abs() < 1e-15 && (svd.s[1] - 2.0).abs() < 1e-15);
/// // Signs normalised: the largest entry of each column of U is positive.
/// assert!((svd.u.at(1, 0) - 1.0).abs() < 1e-15);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn thin_svd_ref<T: Real>(a: MatRef<'_, T>) -> Result<Svd> {
    check_finite_mat("a", a)?;
    svd_f64(&Mat::widen(a))
}

/// `a . b` with eight independent partial sums.
// PERF: a single running sum is bound by the latency of one add per element; eight partial sums
// let the compiler vectorise and pipeline the Jacobi sweeps, which are nearly all dot products.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut partial = [0.0f64; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        // Unreachable from input: `chunks_exact(8)` yields chunks of exactly 8.
        let (x, y): (&[f64; 8], &[f64; 8]) = (
            x.try_into().expect("chunk of 8"),
            y.try_into().expect("chunk of 8"),
        );
        for i in 0..8 {
            partial[i] += x[i] * y[i];
        }
    }
    partial.iter().sum::<f64>() + tail
}

pub(crate) fn svd_f64(a: &Mat<f64>) -> Result<Svd> {
    let (m, n) = (a.rows(), a.cols());
    if m < n {
        let t = svd_f64(&a.transpose())?;
        let mut svd = Svd {
            u: t.v,
            s: t.s,
            v: t.u,
        };
        normalise_signs(&mut svd);
        return Ok(svd);
    }
    // m >= n. Scaled by a power of two (exact) so the largest entry lies in [0.5, 1): the noise
    // columns of rank-deficient input then stay far above the underflow threshold (see
    // NEGLIGIBLE_COLUMN), whatever the input's magnitude.
    let largest = a.as_slice().iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let exponent = if largest > 0.0 {
        libm::frexp(largest).1
    } else {
        0
    };
    let scaled = Mat::from_fn(m, n, |i, j| libm::scalbn(a.at(i, j), -exponent))?;
    let a = &scaled;
    // Drmac and Veselic's preconditioning: A P = Q R with column pivoting, then Jacobi on
    // X = R^T (n x n), whose graded columns converge in far fewer sweeps than A's. Jacobi gives
    // X V_x = W with orthogonal columns, so R^T = U_x S V_x^T (U_x = W / S) and
    // A = (Q V_x) S (P U_x)^T.
    let (Qr { q, r }, perm) = householder_qr_pivoted(a, true)?;
    let k = n;
    let mut cols: Vec<Vec<f64>> = (0..k).map(|j| r.row(j).to_vec()).collect();
    let mut rotations: Vec<Vec<f64>> = (0..k)
        .map(|j| (0..k).map(|i| if i == j { 1.0 } else { 0.0 }).collect())
        .collect();
    jacobi_sweeps(&mut cols, &mut rotations)?;
    let mut order: Vec<(f64, usize)> = cols
        .iter()
        .enumerate()
        .map(|(j, c)| (scaled_norm(c), j))
        .collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let s: Vec<f64> = order.iter().map(|o| libm::scalbn(o.0, exponent)).collect();
    // U_x: normalised Jacobi columns, the zero ones completed to an orthonormal basis.
    let mut u_x: Vec<Vec<f64>> = order
        .iter()
        .map(|&(sigma, j)| {
            if sigma > 0.0 {
                cols[j].iter().map(|v| v / sigma).collect()
            } else {
                vec![0.0; k]
            }
        })
        .collect();
    complete_orthonormal(&mut u_x, &s);
    let v_x = Mat::from_fn(k, k, |i, j| rotations[order[j].1][i])?;
    let u = q.matmul(&v_x)?;
    let mut v = Mat::zeros(n, k)?;
    for (i, &row) in perm.iter().enumerate() {
        for j in 0..k {
            *v.at_mut(row, j) = u_x[j][i];
        }
    }
    let mut svd = Svd { u, s, v };
    normalise_signs(&mut svd);
    Ok(svd)
}

/// Columns whose norm falls below `sqrt(f64::MIN_POSITIVE / f64::EPSILON)` (of a matrix scaled to
/// a largest entry below 1) are set to zero: the dot product of two of them falls to where it
/// loses its precision in subnormals, and the rotations could cycle without end. Only rounding
/// noise is that small.
const NEGLIGIBLE_COLUMN: f64 = 1.0e-146;

/// `||x||_2` without overflow or underflow in the squares (scaled by the largest entry).
fn scaled_norm(x: &[f64]) -> f64 {
    let scale = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    if scale == 0.0 {
        return 0.0;
    }
    scale * libm::sqrt(x.iter().map(|v| (v / scale) * (v / scale)).sum())
}

/// Cyclic one-sided Jacobi: rotates pairs of `cols` (and of `rotations`) until every pair is
/// orthogonal to within `eps sqrt(k)` of the product of their norms.
///
/// The norms are recomputed after each rotation, scaled, rather than updated: rank-deficient input
/// leaves columns of rounding noise whose squared norms cancel in the update or underflow, and a
/// wrong or zero norm keeps such a pair from ever passing the test (the reason LAPACK's xGESVJ
/// also rescales and recomputes).
fn jacobi_sweeps(cols: &mut [Vec<f64>], rotations: &mut [Vec<f64>]) -> Result<()> {
    let k = cols.len();
    let tol = f64::EPSILON * libm::sqrt(k.max(1) as f64);
    let mut norm_of = |col: &mut Vec<f64>| {
        let norm = scaled_norm(col);
        if norm < NEGLIGIBLE_COLUMN {
            col.fill(0.0);
            return 0.0;
        }
        norm
    };
    let mut norms: Vec<f64> = cols.iter_mut().map(&mut norm_of).collect();
    for _sweep in 0..MAX_JACOBI_SWEEPS {
        let mut rotated = false;
        for p in 0..k.saturating_sub(1) {
            // de Rijk's ordering: the largest remaining column first cuts the sweep count.
            let largest = (p..k)
                .max_by(|&x, &y| norms[x].total_cmp(&norms[y]).then(y.cmp(&x)))
                .unwrap_or(p);
            if largest != p {
                cols.swap(p, largest);
                rotations.swap(p, largest);
                norms.swap(p, largest);
            }
            for q in p + 1..k {
                let (norm_p, norm_q) = (norms[p], norms[q]);
                let gamma = dot(&cols[p], &cols[q]);
                if gamma == 0.0 || gamma.abs() <= tol * norm_p * norm_q {
                    continue;
                }
                rotated = true;
                let zeta = (norm_q - norm_p) * (norm_q + norm_p) / (2.0 * gamma);
                // `hypot`: `zeta^2` overflows for a noise column against a large one.
                let t = zeta.signum() / (zeta.abs() + libm::hypot(1.0, zeta));
                let c = 1.0 / libm::sqrt(1.0 + t * t);
                let s = c * t;
                rotate(cols, p, q, c, s);
                rotate(rotations, p, q, c, s);
                norms[p] = norm_of(&mut cols[p]);
                norms[q] = norm_of(&mut cols[q]);
            }
        }
        if !rotated {
            return Ok(());
        }
    }
    Err(Error::NotConverged {
        what: "one-sided Jacobi SVD",
        iterations: MAX_JACOBI_SWEEPS,
    })
}

fn rotate(cols: &mut [Vec<f64>], p: usize, q: usize, c: f64, s: f64) {
    let (left, right) = cols.split_at_mut(q);
    for (x, y) in left[p].iter_mut().zip(right[0].iter_mut()) {
        let (a, b) = (*x, *y);
        *x = c * a - s * b;
        *y = s * a + c * b;
    }
}

/// Replaces the columns whose singular value is zero by unit vectors orthogonal to all others.
fn complete_orthonormal(cols: &mut [Vec<f64>], s: &[f64]) {
    let dim = cols.first().map_or(0, Vec::len);
    let mut candidate = 0;
    for j in 0..cols.len() {
        if s[j] > 0.0 {
            continue;
        }
        loop {
            let mut v: Vec<f64> = (0..dim)
                .map(|i| if i == candidate { 1.0 } else { 0.0 })
                .collect();
            candidate += 1;
            for _pass in 0..2 {
                for (i, other) in cols.iter().enumerate() {
                    if i != j && (s[i] > 0.0 || i < j) {
                        let d = dot(other, &v);
                        for (x, o) in v.iter_mut().zip(other) {
                            *x -= d * o;
                        }
                    }
                }
            }
            let norm = libm::sqrt(dot(&v, &v));
            // A unit vector always has a component of norm >= 1/sqrt(dim) outside a subspace of
            // dimension < dim along one of the axes; 0.5 / sqrt(dim) is a safe acceptance bound.
            if norm > 0.5 / libm::sqrt(dim as f64) {
                cols[j] = v.into_iter().map(|x| x / norm).collect();
                break;
            }
        }
    }
}

fn normalise_signs(svd: &mut Svd) {
    for (j, flipped) in svd.u.normalise_column_signs().into_iter().enumerate() {
        if flipped {
            for i in 0..svd.v.rows() {
                *svd.v.at_mut(i, j) = -svd.v.at(i, j);
            }
        }
    }
}

/// Parameters of the randomized SVD.
///
/// ```
/// use kernels_core::ops::lowrank::RsvdParams;
/// let params = RsvdParams::new(32).with_oversample(8).with_power_iterations(1).with_seed(3);
/// assert_eq!((params.rank, params.oversample, params.power_iterations), (32, 8, 1));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RsvdParams {
    /// Target rank `r`, `1 <= r <= min(m, n)`. Default 16.
    pub rank: usize,
    /// Probes beyond the rank. Default: the rank itself, so `2 r` probes, which is what the
    /// accuracy promise (within 1.1x of the optimal tail error) assumes. Its cost: the products
    /// scale with the probes, so `2 r` takes about 1.6x the time of `r` probes on the CPU (a
    /// 4096 x 11008 matrix at rank 64: 513 against 323 ms, for an error within 1.0001 of the
    /// optimum against 1.0187; BENCHMARKS.md).
    pub oversample: usize,
    /// Power iterations, each re-orthonormalised, at most [`MAX_POWER_ITERATIONS`]. Default 2.
    pub power_iterations: usize,
    /// Seed of the Gaussian probes. Default 0.
    pub seed: u64,
}

/// The most power iterations [`RsvdParams`] accepts: far beyond where they stop paying (each
/// squares the spectral gap's effect; 2 to 4 is usual), and a bound on the work a caller's
/// parameter can ask for.
pub const MAX_POWER_ITERATIONS: usize = 64;

impl Default for RsvdParams {
    fn default() -> Self {
        Self::new(16)
    }
}

impl RsvdParams {
    /// Rank `r` with the defaults: oversampling `r` (`2 r` probes), 2 power iterations, seed 0.
    #[must_use]
    pub const fn new(rank: usize) -> Self {
        Self {
            rank,
            oversample: rank,
            power_iterations: 2,
            seed: 0,
        }
    }

    /// The same parameters with `oversample` probes beyond the rank.
    #[must_use]
    pub const fn with_oversample(mut self, oversample: usize) -> Self {
        self.oversample = oversample;
        self
    }

    /// The same parameters with another number of power iterations.
    #[must_use]
    pub const fn with_power_iterations(mut self, power_iterations: usize) -> Self {
        self.power_iterations = power_iterations;
        self
    }

    /// The same parameters with another seed.
    #[must_use]
    pub const fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

fn orthonormal_basis(y: &Mat<f64>) -> Result<Mat<f64>> {
    Ok(householder_qr_f64(y)?.q)
}

/// Randomized truncated SVD (reference).
///
/// ```
/// use kernels_core::{Mat, ops::lowrank::{RsvdParams, randomized_svd_ref, thin_svd_ref}};
/// // Rank 2: the sketch captures it exactly.
/// let a = Mat::from_fn(30, 20, |i, j| ((i % 4) as f64) * ((j % 3) as f64) + ((i % 2) as f64) * (j as f64))?;
/// let svd = randomized_svd_ref(a.as_ref(), RsvdParams::new(2))?;
/// let exact = thin_svd_ref(a.as_ref())?;
/// assert!((svd.s[0] - exact.s[0]).abs() < 1e-10 * exact.s[0]);
/// assert!(svd.reconstruct()?.distance(&a)? < 1e-10 * a.frobenius_norm());
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn randomized_svd_ref<T: Real>(a: MatRef<'_, T>, params: RsvdParams) -> Result<Svd> {
    let probes = validate_randomized_svd(a.shape(), params)?;
    check_finite_mat("a", a)?;
    let n = a.cols();
    let a = Mat::widen(a);
    let rng = CounterRng::new(params.seed);
    let omega = Mat::from_fn(n, probes, |i, j| rng.normal_at((i * probes + j) as u64))?;
    let mut q = orthonormal_basis(&a.matmul(&omega)?)?;
    for _ in 0..params.power_iterations {
        let z = orthonormal_basis(&a.t_matmul(&q)?)?;
        q = orthonormal_basis(&a.matmul(&z)?)?;
    }
    let b = q.t_matmul(&a)?;
    let small = svd_f64(&b)?;
    let mut svd = Svd {
        u: q.matmul(&small.u)?,
        s: small.s,
        v: small.v,
    }
    .truncate(params.rank);
    normalise_signs(&mut svd);
    Ok(svd)
}

/// Parameters of LU / LDU.
///
/// ```
/// use kernels_core::{MatRef, ops::lowrank::{LuParams, ldu_ref}};
/// let nearly_singular = [1.0f64, 1.0, 1.0, 1.0 + 1e-9];
/// let a = MatRef::from_slice(&nearly_singular, 2, 2)?;
/// assert!(ldu_ref(a, LuParams::default()).is_ok()); // the pivot 1e-9 is above 1e-12 max|A|
/// assert!(ldu_ref(a, LuParams::default().with_pivot_guard(1e-6)).is_err());
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct LuParams {
    /// LDU's small-pivot guard, relative to `max|A|`, `>= 0`. Default `1e-12`.
    pub pivot_guard: f64,
}

impl Default for LuParams {
    fn default() -> Self {
        Self { pivot_guard: 1e-12 }
    }
}

impl LuParams {
    /// The same parameters with another small-pivot guard.
    #[must_use]
    pub const fn with_pivot_guard(mut self, pivot_guard: f64) -> Self {
        self.pivot_guard = pivot_guard;
        self
    }
}

/// `P A = L U`.
#[derive(Clone, Debug, PartialEq)]
pub struct Lu<T = f64> {
    /// `perm[i]`: the row of `A` in row `i` of `P A`.
    pub perm: Vec<usize>,
    /// `m x k`, unit lower triangular.
    pub l: Mat<T>,
    /// `k x n`, upper triangular.
    pub u: Mat<T>,
}

impl<F> Lu<F> {
    /// `P A`, the permuted input ([`Error::ShapeMismatch`] if `a` has other rows than `perm`).
    pub fn permute<T: Copy + Default>(&self, a: &Mat<T>) -> Result<Mat<T>> {
        if a.rows() != self.perm.len() {
            return Err(Error::ShapeMismatch {
                what: "a (its rows must match the permutation)",
                expected: [self.perm.len(), a.cols()],
                found: a.shape(),
            });
        }
        Mat::from_fn(a.rows(), a.cols(), |i, j| a.at(self.perm[i], j))
    }
}

/// LU with partial pivoting (reference).
///
/// ```
/// use kernels_core::{Mat, MatRef, ops::lowrank::lu_ref};
/// let a = [1.0f64, 2.0, 4.0, 3.0]; // [[1, 2], [4, 3]]: row 1 has the larger pivot
/// let lu = lu_ref(MatRef::from_slice(&a, 2, 2)?)?;
/// assert_eq!(lu.perm, [1, 0]);
/// let a = Mat::from_vec(a.to_vec(), 2, 2)?;
/// assert!(lu.l.matmul(&lu.u)?.distance(&lu.permute(&a)?)? < 1e-15);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn lu_ref<T: Real>(a: MatRef<'_, T>) -> Result<Lu> {
    check_finite_mat("a", a)?;
    let (m, n) = (a.rows(), a.cols());
    let k = m.min(n);
    let mut w = Mat::widen(a);
    let mut perm: Vec<usize> = (0..m).collect();
    for j in 0..k {
        let pivot = pivot_row(j..m, |i| w.at(i, j).abs());
        if pivot != j {
            for c in 0..n {
                let t = w.at(j, c);
                *w.at_mut(j, c) = w.at(pivot, c);
                *w.at_mut(pivot, c) = t;
            }
            perm.swap(j, pivot);
        }
        let d = w.at(j, j);
        if d == 0.0 {
            continue;
        }
        for i in j + 1..m {
            let f = w.at(i, j) / d;
            *w.at_mut(i, j) = f;
            for c in j + 1..n {
                *w.at_mut(i, c) -= f * w.at(j, c);
            }
        }
    }
    let l = Mat::from_fn(m, k, |i, j| match i.cmp(&j) {
        core::cmp::Ordering::Greater => w.at(i, j),
        core::cmp::Ordering::Equal => 1.0,
        core::cmp::Ordering::Less => 0.0,
    })?;
    let u = Mat::from_fn(k, n, |i, j| if i <= j { w.at(i, j) } else { 0.0 })?;
    Ok(Lu { perm, l, u })
}

/// `P A = L D U1`.
#[derive(Clone, Debug, PartialEq)]
pub struct Ldu<T = f64> {
    /// `perm[i]`: the row of `A` in row `i` of `P A`.
    pub perm: Vec<usize>,
    /// `m x k`, unit lower triangular.
    pub l: Mat<T>,
    /// The `k` pivots.
    pub d: Vec<T>,
    /// `k x n`, unit upper triangular.
    pub u: Mat<T>,
}

/// LDU with partial pivoting and the small-pivot guard (reference).
///
/// ```
/// use kernels_core::{MatRef, ops::lowrank::{LuParams, ldu_ref}};
/// let a = [2.0f64, 4.0, 1.0, 5.0]; // [[2, 4], [1, 5]]
/// let ldu = ldu_ref(MatRef::from_slice(&a, 2, 2)?, LuParams::default())?;
/// assert_eq!((ldu.d.as_slice(), ldu.u.at(0, 1), ldu.l.at(1, 0)), (&[2.0, 3.0][..], 2.0, 0.5));
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn ldu_ref<T: Real>(a: MatRef<'_, T>, params: LuParams) -> Result<Ldu> {
    check_param(
        "pivot_guard",
        params.pivot_guard,
        "finite and >= 0",
        params.pivot_guard.is_finite() && params.pivot_guard >= 0.0,
    )?;
    let Lu { perm, l, mut u } = lu_ref(a)?;
    let scale = a
        .row_iter()
        .flatten()
        .map(|v| v.to_f64().abs())
        .fold(0.0, f64::max);
    let mut d = Vec::with_capacity(u.rows());
    for i in 0..u.rows() {
        let pivot = u.at(i, i);
        if pivot.abs() <= params.pivot_guard * scale || pivot == 0.0 {
            return Err(Error::Singular {
                what: "LDU",
                index: i,
            });
        }
        for v in u.row_mut(i) {
            *v /= pivot;
        }
        d.push(pivot);
    }
    Ok(Ldu { perm, l, d, u })
}

/// `S = V diag(values) V^T` of a symmetric matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct SymmetricEigen<T = f64> {
    /// Eigenvalues, descending.
    pub values: Vec<T>,
    /// `n x n`; column `j` is the eigenvector of `values[j]`, its largest-magnitude entry
    /// positive (the first such entry on ties).
    pub vectors: Mat<T>,
}

/// Symmetric eigendecomposition by cyclic two-sided Jacobi (reference). Only the lower triangle
/// of `s` is read. Sweeps until one leaves every off-diagonal entry [`negligible`], at most
/// [`MAX_JACOBI_SWEEPS`], else [`Error::NotConverged`].
///
/// ```
/// use kernels_core::{MatRef, ops::lowrank::symmetric_eigen_ref};
/// let s = [2.0f64, f64::NAN, 1.0, 2.0]; // the upper triangle is not read
/// let eigen = symmetric_eigen_ref(MatRef::from_slice(&s, 2, 2)?)?;
/// assert!((eigen.values[0] - 3.0).abs() < 1e-15 && (eigen.values[1] - 1.0).abs() < 1e-15);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn symmetric_eigen_ref<T: Real>(s: MatRef<'_, T>) -> Result<SymmetricEigen> {
    let n = s.rows();
    s.expect_shape("s (square)", [n, n])?;
    for i in 0..n {
        if let Some(j) = s.row(i)[..=i].iter().position(|v| !v.to_f64().is_finite()) {
            return Err(Error::NonFinite {
                what: "s",
                index: i * n + j,
            });
        }
    }
    let mut a = Mat::from_fn(n, n, |i, j| {
        if i >= j {
            s.at(i, j).to_f64()
        } else {
            s.at(j, i).to_f64()
        }
    })?;
    let mut v = Mat::identity(n)?;
    let norm = libm::sqrt(a.as_slice().iter().map(|x| x * x).sum());
    let mut converged = false;
    for _sweep in 0..MAX_JACOBI_SWEEPS {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let apq = a.at(p, q);
                if negligible(apq, a.at(p, p), a.at(q, q), norm) {
                    continue;
                }
                rotated = true;
                let (c, sn, _) = jacobi_rotation(a.at(p, p), a.at(q, q), apq);
                for r in 0..n {
                    let (arp, arq) = (a.at(r, p), a.at(r, q));
                    *a.at_mut(r, p) = c * arp - sn * arq;
                    *a.at_mut(r, q) = sn * arp + c * arq;
                }
                for r in 0..n {
                    let (apr, aqr) = (a.at(p, r), a.at(q, r));
                    *a.at_mut(p, r) = c * apr - sn * aqr;
                    *a.at_mut(q, r) = sn * apr + c * aqr;
                }
                *a.at_mut(p, q) = 0.0;
                *a.at_mut(q, p) = 0.0;
                for r in 0..n {
                    let (vrp, vrq) = (v.at(r, p), v.at(r, q));
                    *v.at_mut(r, p) = c * vrp - sn * vrq;
                    *v.at_mut(r, q) = sn * vrp + c * vrq;
                }
            }
        }
        if !rotated {
            converged = true;
            break;
        }
    }
    if !converged {
        return Err(Error::NotConverged {
            what: "symmetric Jacobi eigensolver",
            iterations: MAX_JACOBI_SWEEPS,
        });
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| a.at(y, y).total_cmp(&a.at(x, x)).then(x.cmp(&y)));
    let values = order.iter().map(|&j| a.at(j, j)).collect();
    let mut vectors = Mat::from_fn(n, n, |i, j| v.at(i, order[j]))?;
    vectors.normalise_column_signs();
    Ok(SymmetricEigen { values, vectors })
}

/// How LoRA extraction picks its rank.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum LoraRank {
    /// Exactly `r` (at most `min(m, n)`).
    Fixed(usize),
    /// The smallest `r` keeping at least this fraction of `||delta||_F^2`, in `(0, 1]`.
    Energy(f64),
    /// The smallest `r` with `||delta - B A||_F <= epsilon ||delta||_F`, `epsilon` in `[0, 1)`.
    Epsilon(f64),
}

/// A LoRA pair `delta ~ B A`.
#[derive(Clone, Debug, PartialEq)]
pub struct Lora<T = f64> {
    /// `m x r`: `U_r sqrt(S_r)`.
    pub b: Mat<T>,
    /// `r x n`: `sqrt(S_r) V_r^T`.
    pub a: Mat<T>,
    /// The singular values the rank rule saw, descending (all of them for the exact SVD), to
    /// report the energy kept.
    pub singular_values: Vec<T>,
}

impl Svd<f32> {
    /// The LoRA pair of the leading `r` triplets: `B = U_r sqrt(S_r)`, `A = sqrt(S_r) V_r^T`,
    /// keeping every singular value for the report. What every backend's extraction returns.
    ///
    /// ```
    /// use kernels_core::{Mat, ops::lowrank::Svd};
    /// let svd = Svd { u: Mat::from_fn(2, 1, |i, _| i as f32)?, s: vec![4.0f32], v: Mat::from_fn(3, 1, |_, _| 1.0)? };
    /// let lora = svd.lora(1)?;
    /// assert_eq!(lora.b.as_slice(), [0.0, 2.0]);
    /// assert_eq!(lora.a.as_slice(), [2.0, 2.0, 2.0]);
    /// assert!(svd.lora(2).is_err());
    /// # Ok::<(), kernels_core::Error>(())
    /// ```
    pub fn lora(&self, r: usize) -> Result<Lora<f32>> {
        check_param(
            "rank",
            r as f64,
            "at most the number of singular values",
            r <= self.s.len(),
        )?;
        let root: Vec<f32> = self.s[..r].iter().map(|&v| libm::sqrtf(v)).collect();
        Ok(Lora {
            b: Mat::from_fn(self.u.rows(), r, |i, j| self.u.at(i, j) * root[j])?,
            a: Mat::from_fn(r, self.v.rows(), |i, j| root[i] * self.v.at(j, i))?,
            singular_values: self.s.clone(),
        })
    }
}

/// The rank a [`LoraRank`] rule picks for singular values `s` (descending).
///
/// ```
/// use kernels_core::ops::lowrank::{LoraRank, lora_rank};
/// let s = [4.0, 2.0, 1.0, 0.0]; // energies 16, 4, 1: total 21
/// assert_eq!(lora_rank(LoraRank::Fixed(2), &s)?, 2);
/// assert_eq!(lora_rank(LoraRank::Energy(0.9), &s)?, 2); // 20 / 21 >= 0.9
/// assert_eq!(lora_rank(LoraRank::Epsilon(0.0), &s)?, 3); // exact
/// assert!(lora_rank(LoraRank::Fixed(5), &s).is_err());
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn lora_rank(rule: LoraRank, s: &[f64]) -> Result<usize> {
    let total: f64 = s.iter().map(|v| v * v).sum();
    let smallest_with = |enough: &dyn Fn(f64) -> bool| -> usize {
        let mut kept = 0.0;
        for (r, v) in s.iter().enumerate() {
            if enough(kept) {
                return r;
            }
            kept += v * v;
        }
        s.len()
    };
    match rule {
        LoraRank::Fixed(r) => {
            check_param("rank", r as f64, "at most min(rows, cols)", r <= s.len())?;
            Ok(r)
        }
        LoraRank::Energy(f) => {
            check_param("energy", f, "in (0, 1]", f > 0.0 && f <= 1.0)?;
            Ok(smallest_with(&|kept| kept >= f * total))
        }
        LoraRank::Epsilon(e) => {
            check_param("epsilon", e, "in [0, 1)", (0.0..1.0).contains(&e))?;
            Ok(smallest_with(&|kept| {
                (total - kept).max(0.0) <= e * e * total
            }))
        }
    }
}

/// LoRA extraction: `delta ~ B A` with `B = U_r sqrt(S_r)`, `A = sqrt(S_r) V_r^T` (reference).
///
/// ```
/// use kernels_core::{Mat, ops::lowrank::{LoraRank, lora_extract_ref}};
/// let delta = Mat::from_fn(3, 2, |i, j| (i + 1) as f64 * if j == 0 { 1.0 } else { -1.0 })?;
/// let lora = lora_extract_ref(delta.as_ref(), LoraRank::Epsilon(1e-9))?;
/// assert_eq!((lora.b.shape(), lora.a.shape()), ([3, 1], [1, 2]));
/// assert!(lora.b.matmul(&lora.a)?.distance(&delta)? < 1e-12);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn lora_extract_ref<T: Real>(delta: MatRef<'_, T>, rank: LoraRank) -> Result<Lora> {
    let svd = thin_svd_ref(delta)?;
    let r = lora_rank(rank, &svd.s)?;
    let root: Vec<f64> = svd.s[..r].iter().map(|&v| libm::sqrt(v)).collect();
    let b = Mat::from_fn(svd.u.rows(), r, |i, j| svd.u.at(i, j) * root[j])?;
    let a = Mat::from_fn(r, svd.v.rows(), |i, j| root[i] * svd.v.at(j, i))?;
    Ok(Lora {
        b,
        a,
        singular_values: svd.s,
    })
}

/// The OPCM block size: the smallest `r` whose leading singular values hold more than `alpha` of
/// their sum (`0` when all are zero, `len` if none exceeds it). `alpha` in `[0, 1]`.
///
/// ```
/// use kernels_core::ops::lowrank::opcm_rank;
/// assert_eq!(opcm_rank(&[6.0, 3.0, 1.0], 0.5)?, 1); // 0.6 > 0.5
/// assert_eq!(opcm_rank(&[6.0, 3.0, 1.0], 0.6)?, 2); // 0.9 > 0.6
/// assert_eq!(opcm_rank(&[0.0, 0.0], 0.5)?, 0);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn opcm_rank(s: &[f32], alpha: f64) -> Result<usize> {
    check_param("alpha", alpha, "in [0, 1]", (0.0..=1.0).contains(&alpha))?;
    crate::error::check_finite("s", s)?;
    let total: f64 = s.iter().map(|&v| f64::from(v)).sum();
    if total <= 0.0 {
        return Ok(0);
    }
    let mut cumulative = 0.0;
    for (i, &v) in s.iter().enumerate() {
        cumulative += f64::from(v);
        if cumulative / total > alpha {
            return Ok(i + 1);
        }
    }
    Ok(s.len())
}

/// Parameters of the OPCM step.
///
/// ```
/// use kernels_core::ops::lowrank::OpcmParams;
/// assert_eq!(OpcmParams::default().with_alpha(0.7).alpha, 0.7);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct OpcmParams {
    /// Share of the singular values' sum the protected block covers, in `[0, 1]`
    /// ([`opcm_rank`]). Default 0.5.
    pub alpha: f64,
}

impl Default for OpcmParams {
    fn default() -> Self {
        Self { alpha: 0.5 }
    }
}

impl OpcmParams {
    /// The same parameters with another `alpha`.
    #[must_use]
    pub const fn with_alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }
}

/// A thin SVD's factors, borrowed: `U` `m x p`, `s` of length `min(p, q)` (descending), `V`
/// `n x q`. What the OPCM step projects against (the merged task vector so far).
#[derive(Clone, Copy, Debug)]
pub struct SvdRef<'a, T> {
    /// `m x p`, orthonormal columns.
    pub u: MatRef<'a, T>,
    /// The singular values, descending.
    pub s: &'a [f32],
    /// `n x q`, orthonormal columns.
    pub v: MatRef<'a, T>,
}

impl Svd<f32> {
    /// The factors, borrowed.
    ///
    /// ```
    /// use kernels_core::{Mat, ops::lowrank::Svd};
    /// let svd = Svd { u: Mat::<f32>::zeros(3, 1)?, s: vec![1.0f32], v: Mat::zeros(2, 1)? };
    /// let view = svd.as_ref();
    /// assert_eq!((view.u.shape(), view.s, view.v.shape()), ([3, 1], &[1.0f32][..], [2, 1]));
    /// # Ok::<(), kernels_core::Error>(())
    /// ```
    #[must_use]
    pub fn as_ref(&self) -> SvdRef<'_, f32> {
        SvdRef {
            u: self.u.as_ref(),
            s: &self.s,
            v: self.v.as_ref(),
        }
    }
}

/// The OPCM projection of a new task vector `tau` (`m x n`) against the merged task vector
/// `T = U diag(s) V^T` (`merged`): `P = U^T tau V`; zero `P`'s diagonal and its top-left `r x r`
/// block with `r = `[`opcm_rank`]`(s, alpha)`; return `U P V^T`. With square orthogonal `U`, `V`
/// this removes exactly those components of `tau`; with thin ones it also drops what lies
/// outside their span.
///
/// ```
/// use kernels_core::{MatRef, ops::lowrank::{OpcmParams, SvdRef, opcm_project_ref}};
/// // The merged task vector so far is diag(3, 1): U = V = I.
/// let identity = [1.0f32, 0.0, 0.0, 1.0];
/// let eye = MatRef::from_slice(&identity, 2, 2)?;
/// let merged = SvdRef { u: eye, s: &[3.0, 1.0], v: eye };
/// let tau = [5.0f32, 2.0, 7.0, 4.0];
/// let out = opcm_project_ref(merged, MatRef::from_slice(&tau, 2, 2)?, OpcmParams::default())?;
/// // r = 1 (3 / 4 > 0.5): the diagonal and the top-left entry go, the off-diagonal stays.
/// assert_eq!(out.as_slice(), [0.0, 2.0, 7.0, 0.0]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn opcm_project_ref<T: Real>(
    merged: SvdRef<'_, T>,
    tau: MatRef<'_, T>,
    params: OpcmParams,
) -> Result<Mat<f64>> {
    let SvdRef { u, s, v } = merged;
    validate_opcm(u.shape(), s.len(), v.shape(), tau.shape())?;
    check_finite_mat("tau", tau)?;
    let r = opcm_rank(s, params.alpha)?;
    let (u, v) = (Mat::widen(u), Mat::widen(v));
    let mut p = u.t_matmul(&Mat::widen(tau))?.matmul(&v)?;
    for i in 0..p.rows() {
        for j in 0..p.cols() {
            if i == j || (i < r && j < r) {
                *p.at_mut(i, j) = 0.0;
            }
        }
    }
    u.matmul(&p)?.matmul(&v.transpose())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::project::tests::random;
    use proptest::prelude::*;

    /// Backward error of the f64 references per unit of `eps * max(m, n)`.
    const F64_TOLERANCE_FACTOR: f64 = 16.0;

    fn bound(m: usize, n: usize) -> f64 {
        F64_TOLERANCE_FACTOR * f64::EPSILON * m.max(n).max(1) as f64
    }

    fn check_svd(a: &Mat<f64>, svd: &Svd) {
        let (m, n) = (a.rows(), a.cols());
        let b = bound(m, n);
        assert!(
            svd.reconstruct().unwrap().distance(a).unwrap() <= b * a.frobenius_norm().max(1e-300),
            "reconstruction"
        );
        assert!(
            svd.u.orthogonality_error().unwrap() <= b * 4.0,
            "U orthogonality {}",
            svd.u.orthogonality_error().unwrap()
        );
        assert!(
            svd.v.orthogonality_error().unwrap() <= b * 4.0,
            "V orthogonality"
        );
        assert!(svd.s.windows(2).all(|w| w[0] >= w[1]) && svd.s.iter().all(|&v| v >= 0.0));
    }

    /// `U diag(s) V^T` with chosen singular values.
    fn with_spectrum(m: usize, n: usize, s: &[f64], seed: u64) -> Mat<f64> {
        let u = householder_qr_f64(&random(m, s.len(), seed)).unwrap().q;
        let v = householder_qr_f64(&random(n, s.len(), seed + 1)).unwrap().q;
        Svd {
            u,
            s: s.to_vec(),
            v,
        }
        .reconstruct()
        .unwrap()
    }

    #[test]
    fn svd_of_shapes_and_hard_matrices() {
        for (m, n) in [(1, 1), (9, 4), (4, 9), (12, 12), (0, 3), (3, 0)] {
            let a = random(m, n, (m * 13 + n) as u64);
            check_svd(&a, &thin_svd_ref(a.as_ref()).unwrap());
        }
        let zero = Mat::<f64>::zeros(5, 3).unwrap();
        let svd = thin_svd_ref(zero.as_ref()).unwrap();
        check_svd(&zero, &svd);
        assert_eq!(svd.s, [0.0; 3]);
        // Rank 2 of 6, condition 1e6, known singular values.
        let s = [5.0, 1.0, 0.0, 0.0];
        let low = with_spectrum(10, 6, &s, 3);
        let svd = thin_svd_ref(low.as_ref()).unwrap();
        check_svd(&low, &svd);
        assert!(
            (svd.s[0] - 5.0).abs() < 1e-13 && (svd.s[1] - 1.0).abs() < 1e-13 && svd.s[2] < 1e-13
        );
        let ill = with_spectrum(8, 8, &[1.0, 1e-2, 1e-4, 1e-6], 5);
        let svd = thin_svd_ref(ill.as_ref()).unwrap();
        check_svd(&ill, &svd);
        assert!((svd.s[3] - 1e-6).abs() < 1e-14);
        let mut nan = random(3, 3, 1);
        *nan.at_mut(2, 2) = f64::INFINITY;
        assert!(matches!(
            thin_svd_ref(nan.as_ref()),
            Err(Error::NonFinite { index: 8, .. })
        ));
    }

    /// Exactly rank-deficient integer matrices leave columns of rounding noise whose squared
    /// norms cancel, underflow and whose rotation angles overflow `zeta^2`: each once kept the
    /// Jacobi sweeps from converging (80 x 40 did not, in 60 sweeps).
    #[test]
    fn svd_of_exactly_rank_deficient_and_extreme_scales() {
        for n in [5, 20, 40, 64] {
            let a =
                Mat::from_fn(2 * n, n, |i, j| ((i % 4) * (j % 3) + (i % 2) * j) as f64).unwrap();
            for a in [a.clone(), a.transpose()] {
                let svd = thin_svd_ref(a.as_ref()).unwrap();
                check_svd(&a, &svd);
                assert!(
                    svd.s[2] <= bound(2 * n, n) * svd.s[0],
                    "rank 2: {:?}",
                    &svd.s[..3]
                );
            }
            // Scaled by powers of two the singular values scale exactly.
            let unit = thin_svd_ref(a.as_ref()).unwrap().s;
            for exponent in [-1000, -300, 300, 1000] {
                let scaled =
                    Mat::from_fn(2 * n, n, |i, j| libm::scalbn(a.at(i, j), exponent)).unwrap();
                let s = thin_svd_ref(scaled.as_ref()).unwrap().s;
                assert_eq!(
                    s[..2],
                    unit[..2]
                        .iter()
                        .map(|&v| libm::scalbn(v, exponent))
                        .collect::<Vec<_>>()[..]
                );
            }
        }
    }

    #[test]
    fn svd_signs_are_normalised() {
        let a = random(7, 5, 8);
        let svd = thin_svd_ref(a.as_ref()).unwrap();
        let neg = Mat::from_fn(7, 5, |i, j| -a.at(i, j)).unwrap();
        let svd_neg = thin_svd_ref(neg.as_ref()).unwrap();
        // Same U (normalised), V flips.
        assert!(svd.u.distance(&svd_neg.u).unwrap() < 1e-12);
        let flipped = Mat::from_fn(5, 5, |i, j| -svd_neg.v.at(i, j)).unwrap();
        assert!(svd.v.distance(&flipped).unwrap() < 1e-12);
    }

    #[test]
    fn randomized_svd_is_near_optimal() {
        // A decaying spectrum plus a flat tail.
        let s: Vec<f64> = (0..40)
            .map(|i| {
                if i < 10 {
                    10.0 / (1.0 + i as f64)
                } else {
                    0.05
                }
            })
            .collect();
        let a = with_spectrum(80, 60, &s, 11);
        let r = 8;
        let approx = randomized_svd_ref(a.as_ref(), RsvdParams::new(r)).unwrap();
        assert_eq!(
            (approx.u.shape(), approx.s.len(), approx.v.shape()),
            ([80, r], r, [60, r])
        );
        let optimal = libm::sqrt(s[r..].iter().map(|v| v * v).sum::<f64>());
        let error = approx.reconstruct().unwrap().distance(&a).unwrap();
        assert!(error <= 1.1 * optimal, "{error} vs optimal {optimal}");
        assert!(approx.u.orthogonality_error().unwrap() < 1e-12);
        // A slowly decaying spectrum, where the range finder alone is not enough: the power
        // iterations are what bring the error within 1.1x.
        let slow: Vec<f64> = (0..60).map(|i| 1.0 / libm::sqrt(1.0 + i as f64)).collect();
        let b = with_spectrum(120, 60, &slow, 12);
        let optimal = libm::sqrt(slow[r..].iter().map(|v| v * v).sum::<f64>());
        let mut params = RsvdParams::new(r);
        params.oversample = 4;
        let with_power = randomized_svd_ref(b.as_ref(), params)
            .unwrap()
            .reconstruct()
            .unwrap()
            .distance(&b)
            .unwrap();
        params.power_iterations = 0;
        let without = randomized_svd_ref(b.as_ref(), params)
            .unwrap()
            .reconstruct()
            .unwrap()
            .distance(&b)
            .unwrap();
        assert!(
            with_power <= 1.1 * optimal,
            "{with_power} vs optimal {optimal}"
        );
        assert!(
            without > with_power,
            "power iterations must help: {without} vs {with_power}"
        );
        assert!(randomized_svd_ref(a.as_ref(), RsvdParams::new(0)).is_err());
        assert!(randomized_svd_ref(a.as_ref(), RsvdParams::new(61)).is_err());
    }

    #[test]
    fn lu_and_ldu_reconstruct() {
        for (m, n) in [(1, 1), (6, 6), (7, 4), (4, 7)] {
            let a = random(m, n, (m + 10 * n) as u64);
            let lu = lu_ref(a.as_ref()).unwrap();
            assert!(
                lu.l.matmul(&lu.u)
                    .unwrap()
                    .distance(&lu.permute(&a).unwrap())
                    .unwrap()
                    <= bound(m, n) * a.frobenius_norm()
            );
            assert!(
                lu.l.as_slice().iter().all(|v| v.abs() <= 1.0),
                "partial pivoting bounds L"
            );
            let ldu = ldu_ref(a.as_ref(), LuParams::default()).unwrap();
            let d = Mat::from_fn(ldu.d.len(), ldu.d.len(), |i, j| {
                if i == j { ldu.d[i] } else { 0.0 }
            })
            .unwrap();
            let back = ldu.l.matmul(&d).unwrap().matmul(&ldu.u).unwrap();
            assert!(
                back.distance(&lu.permute(&a).unwrap()).unwrap()
                    <= bound(m, n) * a.frobenius_norm()
            );
        }
        // Known pivoting: [[0, 1], [2, 3]] swaps rows.
        let a = Mat::from_vec(vec![0.0, 1.0, 2.0, 3.0], 2, 2).unwrap();
        let lu = lu_ref(a.as_ref()).unwrap();
        assert_eq!(lu.perm, [1, 0]);
        assert_eq!(lu.u.as_slice(), [2.0, 3.0, 0.0, 1.0]);
        // Singular: LU completes, LDU refuses.
        let sing = Mat::from_vec(vec![1.0, 2.0, 2.0, 4.0], 2, 2).unwrap();
        let lu = lu_ref(sing.as_ref()).unwrap();
        assert!(
            lu.l.matmul(&lu.u)
                .unwrap()
                .distance(&lu.permute(&sing).unwrap())
                .unwrap()
                < 1e-15
        );
        assert!(matches!(
            ldu_ref(sing.as_ref(), LuParams::default()),
            Err(Error::Singular { index: 1, .. })
        ));
    }

    #[test]
    fn lora_extraction_picks_ranks_and_reconstructs() {
        let s = [4.0, 2.0, 1.0, 0.5];
        let delta = with_spectrum(12, 9, &s, 21);
        let lora = lora_extract_ref(delta.as_ref(), LoraRank::Fixed(4)).unwrap();
        assert!(lora.b.matmul(&lora.a).unwrap().distance(&delta).unwrap() < 1e-12);
        let two = lora_extract_ref(delta.as_ref(), LoraRank::Fixed(2)).unwrap();
        let tail = libm::sqrt(1.0 + 0.25);
        assert!((two.b.matmul(&two.a).unwrap().distance(&delta).unwrap() - tail).abs() < 1e-12);
        let total = 16.0 + 4.0 + 1.0 + 0.25;
        assert_eq!(
            lora_rank(LoraRank::Energy(20.0 / total), &lora.singular_values).unwrap(),
            2
        );
        assert_eq!(
            lora_rank(LoraRank::Energy(20.1 / total), &lora.singular_values).unwrap(),
            3
        );
        assert_eq!(
            lora_rank(
                LoraRank::Epsilon(tail / libm::sqrt(total) + 1e-9),
                &lora.singular_values
            )
            .unwrap(),
            2
        );
        assert_eq!(
            lora_rank(LoraRank::Epsilon(0.0), &lora.singular_values).unwrap(),
            4
        );
        assert!(lora_rank(LoraRank::Fixed(10), &s).is_err());
        assert!(lora_rank(LoraRank::Energy(0.0), &s).is_err());
        assert!(lora_rank(LoraRank::Epsilon(1.0), &s).is_err());
    }

    #[test]
    fn symmetric_eigen_reconstructs_gram_and_indefinite_matrices() {
        let a = random(40, 12, 3);
        let s = thin_svd_ref(a.as_ref()).unwrap().s;
        let gram = a.t_matmul(&a).unwrap();
        let eig = symmetric_eigen_ref(gram.as_ref()).unwrap();
        for (w, sv) in eig.values.iter().zip(&s) {
            assert!((w - sv * sv).abs() <= bound(12, 12) * s[0] * s[0]);
        }
        let b = random(9, 9, 4);
        let sym = Mat::from_fn(9, 9, |i, j| b.at(i, j) + b.at(j, i)).unwrap();
        let eig = symmetric_eigen_ref(sym.as_ref()).unwrap();
        let vw = Mat::from_fn(9, 9, |i, j| eig.vectors.at(i, j) * eig.values[j]).unwrap();
        let err = vw
            .matmul(&eig.vectors.transpose())
            .unwrap()
            .distance(&sym)
            .unwrap();
        assert!(
            err <= bound(9, 9) * sym.frobenius_norm(),
            "{err:e} {:e}",
            sym.frobenius_norm()
        );
        assert!(eig.vectors.orthogonality_error().unwrap() <= bound(9, 9));
        assert!(eig.values.windows(2).all(|w| w[0] >= w[1]) && eig.values[8] < 0.0);
        // Only the lower triangle is read.
        let mut upper_garbage = sym.clone();
        *upper_garbage.at_mut(0, 5) = 1e30;
        assert_eq!(symmetric_eigen_ref(upper_garbage.as_ref()).unwrap(), eig);
        assert!(
            symmetric_eigen_ref(Mat::<f64>::zeros(0, 0).unwrap().as_ref())
                .unwrap()
                .values
                .is_empty()
        );
        assert!(matches!(
            symmetric_eigen_ref(Mat::<f64>::zeros(2, 3).unwrap().as_ref()),
            Err(Error::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn opcm_removes_diagonal_and_leading_block() {
        assert_eq!(opcm_rank(&[3.0, 1.0, 1.0], 0.5).unwrap(), 1);
        assert_eq!(opcm_rank(&[1.0, 1.0, 1.0, 1.0], 0.5).unwrap(), 3);
        assert_eq!(opcm_rank(&[0.0, 0.0], 0.5).unwrap(), 0);
        assert!(opcm_rank(&[1.0], 1.5).is_err());
        // Square orthogonal U, V: tau~ = tau minus the removed coordinates, checked in P-space.
        let (m, n) = (6, 5);
        let u = householder_qr_f64(&random(m, m, 1)).unwrap().q;
        let v = householder_qr_f64(&random(n, n, 2)).unwrap().q;
        let s = [4.0f32, 3.0, 1.0, 1.0, 1.0];
        let tau = random(m, n, 3);
        let merged = |s| SvdRef {
            u: u.as_ref(),
            s,
            v: v.as_ref(),
        };
        let params = OpcmParams::default();
        let out = opcm_project_ref(merged(&s), tau.as_ref(), params).unwrap();
        let p_in = u.t_matmul(&tau).unwrap().matmul(&v).unwrap();
        let p_out = u.t_matmul(&out).unwrap().matmul(&v).unwrap();
        let r = opcm_rank(&s, 0.5).unwrap();
        assert_eq!(r, 2);
        for i in 0..m {
            for j in 0..n {
                let expect = if i == j || (i < r && j < r) {
                    0.0
                } else {
                    p_in.at(i, j)
                };
                assert!((p_out.at(i, j) - expect).abs() < 1e-12);
            }
        }
        assert!(opcm_project_ref(merged(&s[..4]), tau.as_ref(), params).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn svd_of_any_shape(m in 0usize..20, n in 0usize..20, seed in any::<u64>()) {
            let a = random(m, n, seed);
            check_svd(&a, &thin_svd_ref(a.as_ref()).unwrap());
        }
    }

    #[test]
    fn svd_512_is_quick_enough_to_serve_as_oracle() {
        // Not a timing assertion: this runs the size the design promises, and its duration shows
        // in the test report.
        let a = random(512, 512, 77);
        let svd = thin_svd_ref(a.as_ref()).unwrap();
        check_svd(&a, &svd);
    }
}
