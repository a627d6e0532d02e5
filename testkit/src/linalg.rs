//! Matrices and checks the linear-algebra suites of every backend share: random and graded
//! spectra, the hard matrices of the acceptance list, and the bounds a QR or SVD must meet.

use kernels_core::ops::lowrank::{Svd, factorisation_tolerance, thin_svd_ref};
use kernels_core::ops::project::{Qr, householder_qr_ref};
use kernels_core::{CounterRng, Mat};

/// An `m x n` matrix of standard normal draws.
pub fn random(m: usize, n: usize, seed: u64) -> Mat<f64> {
    let rng = CounterRng::new(seed);
    Mat::from_fn(m, n, |i, j| rng.normal_at((i * n + j) as u64)).unwrap()
}

/// `U diag(s) V^T` with random orthonormal `U` (`m x k`) and `V` (`n x k`).
pub fn with_spectrum(m: usize, n: usize, s: &[f64], seed: u64) -> Mat<f64> {
    let k = s.len();
    let u = householder_qr_ref(random(m, k, seed).as_ref()).unwrap().q;
    let v = householder_qr_ref(random(n, k, seed + 1).as_ref())
        .unwrap()
        .q;
    let us = Mat::from_fn(m, k, |i, j| u.at(i, j) * s[j]).unwrap();
    us.matmul(&v.transpose()).unwrap()
}

/// Singular values geometrically from 1 down to `1 / condition`.
pub fn graded(k: usize, condition: f64) -> Vec<f64> {
    (0..k)
        .map(|i| condition.powf(-(i as f64) / (k.max(2) - 1) as f64))
        .collect()
}

pub fn widen(m: &Mat<f32>) -> Mat<f64> {
    Mat::widen(m.as_ref())
}

/// `||Q^T Q - I||_F`: it bounds the contract's `||Q^T Q - I||_2` from above, so holding it to the
/// contract's bound is the stricter test.
pub fn orthogonality(q: &Mat<f64>) -> f64 {
    q.orthogonality_error().unwrap()
}

pub fn assert_within(what: &str, error: f64, bound: f64) {
    assert!(error <= bound, "{what}: error {error:e} > bound {bound:e}");
}

/// The hard matrices of the acceptance list, `m x n`: random, rank-deficient, condition 1e6,
/// zero.
pub fn hard_matrices(m: usize, n: usize, seed: u64) -> Vec<(&'static str, Mat<f32>)> {
    let k = m.min(n);
    let mut out = vec![
        ("random", random(m, n, seed).to_f32()),
        ("zero", Mat::zeros(m, n).unwrap()),
    ];
    if k >= 2 {
        let mut deficient = graded(k, 10.0);
        deficient[k / 2..].fill(0.0);
        out.push((
            "rank-deficient",
            with_spectrum(m, n, &deficient, seed).to_f32(),
        ));
        out.push((
            "condition 1e6",
            with_spectrum(m, n, &graded(k, 1e6), seed).to_f32(),
        ));
    }
    out
}

/// A thin QR of `a` meets the contract: shapes, reconstruction and orthogonality within
/// [`factorisation_tolerance`], `R` upper triangular with a non-negative diagonal.
pub fn check_qr(what: &str, a: &Mat<f32>, qr: &Qr<f32>) {
    let (m, n) = (a.rows(), a.cols());
    let tol = factorisation_tolerance(m, n);
    let a64 = widen(a);
    let (q, r) = (widen(&qr.q), widen(&qr.r));
    assert_eq!(q.shape(), [m, m.min(n)], "{what}: Q shape");
    assert_eq!(r.shape(), [m.min(n), n], "{what}: R shape");
    assert_within(
        &format!("{what} {m}x{n}: ||A - QR|| / ||A||"),
        q.matmul(&r).unwrap().distance(&a64).unwrap(),
        tol * a64.frobenius_norm(),
    );
    assert_within(
        &format!("{what} {m}x{n}: ||Q^T Q - I||"),
        orthogonality(&q),
        tol,
    );
    for i in 0..r.rows() {
        assert!(r.at(i, i) >= 0.0, "{what}: negative diagonal");
        for j in 0..i {
            assert_eq!(r.at(i, j), 0.0, "{what}: R not upper triangular");
        }
    }
}

/// A rank-`r` truncated SVD of `a` (`m x n`, spectrum known) is near optimal: its error is within
/// 1.1 times the best rank-`r` error plus the factorisation bound, and its factors orthonormal.
pub fn check_truncated_svd(what: &str, a: &Mat<f32>, svd: &Svd<f32>, r: usize) {
    let (m, n) = (a.rows(), a.cols());
    let a64 = widen(a);
    let us = Mat::from_fn(m, r, |i, j| f64::from(svd.u.at(i, j)) * f64::from(svd.s[j])).unwrap();
    let error = us
        .matmul(&widen(&svd.v).transpose())
        .unwrap()
        .distance(&a64)
        .unwrap();
    let reference = thin_svd_ref(a.as_ref()).unwrap();
    let optimal = reference.s[r..].iter().map(|v| v * v).sum::<f64>().sqrt();
    assert_within(
        &format!("{what} {m}x{n} rank {r}"),
        error,
        1.1 * optimal + factorisation_tolerance(m, n) * a64.frobenius_norm(),
    );
    assert_within(
        &format!("{what}: U orthogonality"),
        orthogonality(&widen(&svd.u)),
        factorisation_tolerance(m, n),
    );
    assert_within(
        &format!("{what}: V orthogonality"),
        orthogonality(&widen(&svd.v)),
        factorisation_tolerance(m, n),
    );
}
