//! The linear algebra on strided, empty, rank-deficient and extreme-scale input against the
//! references: GEMM against an `f64` product, QR and the thin SVD by the contract (orthonormal
//! factors, reconstruction, the reference's singular values), the projection element by element.
#![no_main]

use arbitrary::Unstructured;
use kernels_core::ops::lowrank::thin_svd_ref;
use kernels_core::ops::project::project_out_ref;
use kernels_cpu::linalg::factorisation_tolerance;
use kernels_cpu::prelude::*;
use kernels_fuzz::{Matrix, assert_close, assert_same_outcome, backends, size, value};
use libfuzzer_sys::fuzz_target;

const U: f64 = f32::EPSILON as f64 / 2.0;
/// `f32`'s smallest subnormal: twice the most a product loses to gradual underflow.
const TINY: f64 = 1.401_298_464_324_817e-45;

/// A matrix of rank at most `rank`, scaled by `scale` (exact low rank when the factors are
/// small integers), or of free values.
fn structured(u: &mut Unstructured<'_>, rows: usize, cols: usize) -> arbitrary::Result<Matrix> {
    let mut m = Matrix::new(u, rows, cols, false)?;
    if u.arbitrary()? && rows > 0 && cols > 0 {
        let rank = u.int_in_range(0..=3)?;
        let scale = *u.choose(&[1.0f32, 1e-30, 1e-42, 1e30, 2f32.powi(-100)])?;
        let left: Vec<f32> = (0..rows * rank)
            .map(|_| Ok(f32::from(u.int_in_range(-3i8..=3)?)))
            .collect::<arbitrary::Result<_>>()?;
        let right: Vec<f32> = (0..rank * cols)
            .map(|_| Ok(f32::from(u.int_in_range(-3i8..=3)?)))
            .collect::<arbitrary::Result<_>>()?;
        for i in 0..rows {
            for j in 0..cols {
                let v: f32 = (0..rank)
                    .map(|k| left[i * rank + k] * right[k * cols + j])
                    .sum();
                m.data[i * m.stride + j] = v * scale;
            }
        }
    }
    Ok(m)
}

fn run(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let cpu = *u.choose(&backends())?;
    let cpu = cpu.with_gemm_backend(if u.arbitrary()? {
        GemmBackend::Auto
    } else {
        GemmBackend::Portable
    });
    let (m, k, n) = (size(u, 40)?, size(u, 40)?, size(u, 40)?);
    let specials = u.ratio(1, 8)?;

    // GEMM: c = alpha a b + beta c, against f64.
    let a = Matrix::new(u, m, k, specials)?;
    let b = Matrix::new(u, k, n, specials)?;
    let mut c = Matrix::new(u, m, n, false)?;
    let (alpha, beta) = (
        value(u, specials)?,
        if u.arbitrary()? {
            0.0
        } else {
            value(u, specials)?
        },
    );
    let before: Vec<f32> = (0..m * n)
        .map(|i| c.view().at(i / n.max(1), i % n.max(1)))
        .collect();
    let got = gemm(
        &cpu,
        alpha,
        a.view(),
        Transpose::No,
        b.view(),
        Transpose::No,
        beta,
        MatMut::new(&mut c.data, m, n, c.stride).unwrap(),
    );
    if alpha.is_finite() && beta.is_finite() {
        got.expect("finite scalars");
        let (av, bv, cv) = (a.view(), b.view(), c.view());
        let mut expect = vec![0.0f32; m * n];
        let mut bound = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut abs) = (0.0f64, 0.0f64);
                for p in 0..k {
                    let t = f64::from(av.at(i, p)) * f64::from(bv.at(p, j));
                    s += t;
                    abs += t.abs();
                }
                let old = if beta == 0.0 {
                    0.0
                } else {
                    f64::from(beta) * f64::from(before[i * n + j])
                };
                expect[i * n + j] = (f64::from(alpha) * s + old) as f32;
                // gemm's contract: `A B` is formed in f32 before `alpha` scales it, so an
                // unscaled product past f32's range is outside it, whatever `alpha` is.
                bound[i * n + j] = if abs < f64::from(f32::MAX) / 4.0 {
                    f64::from(alpha).abs() * abs + old.abs()
                } else {
                    f64::INFINITY
                };
            }
        }
        let got: Vec<f32> = (0..m * n).map(|i| cv.at(i / n, i % n)).collect();
        assert_close("gemm", &got, &expect, |i| {
            let underflow = (f64::from(alpha).abs() * k as f64 + 2.0) * TINY;
            (bound[i] < f64::from(f32::MAX) / 4.0)
                .then_some(4.0 * (k as f64 + 3.0) * U * bound[i] + underflow)
        });
    } else {
        assert!(got.is_err());
    }

    // Thin SVD and QR of a structured matrix.
    let a = structured(u, m, n)?;
    let a = a.view();
    let expect = thin_svd_ref(a);
    let got = thin_svd(&cpu, a);
    if let (Ok(got), Ok(expect)) = (&got, &expect) {
        let bound = factorisation_tolerance(m, n);
        let top = expect.s.first().copied().unwrap_or(0.0);
        for (g, e) in got.s.iter().zip(&expect.s) {
            assert!(
                (f64::from(*g) - e).abs() <= bound * top + f64::from(f32::from_bits(1)),
                "svd s: {:?} vs {:?}",
                got.s,
                expect.s
            );
        }
        assert!(
            Mat::widen(got.u.as_ref()).orthogonality_error().unwrap() <= bound,
            "svd U"
        );
        assert!(
            Mat::widen(got.v.as_ref()).orthogonality_error().unwrap() <= bound,
            "svd V"
        );
    } else if let Err(e) = &got {
        // Only an f32 overflow of a finite matrix's singular values may fail where f64 does not.
        assert!(
            expect.is_err() || matches!(e, Error::Overflow { .. }),
            "thin_svd: {e}"
        );
    }
    if let Ok(qr) = householder_qr(&cpu, a) {
        let q = Mat::widen(qr.q.as_ref());
        assert!(
            q.orthogonality_error().unwrap() <= factorisation_tolerance(m, n),
            "QR's Q"
        );
    }

    // Projection against the reference, element by element.
    let r = size(u, 8)?;
    let q = Matrix::new(u, m, r, false)?;
    let x = Matrix::new(u, m, n, specials)?;
    let (qv, xv) = (q.view(), x.view());
    let mut expect = vec![0.0f32; m * n];
    let expect_r = project_out_ref(qv, xv, MatMut::from_slice(&mut expect, m, n).unwrap());
    let mut out = vec![f32::NAN; m * n];
    let got = project_out(&cpu, qv, xv, MatMut::from_slice(&mut out, m, n).unwrap());
    // |Q^T x| per column, then the bound of x - Q (Q^T x) per element.
    let mut coefficients = vec![0.0f64; r * n];
    for kk in 0..r {
        for j in 0..n {
            coefficients[kk * n + j] = (0..m)
                .map(|i| (f64::from(qv.at(i, kk)) * f64::from(xv.at(i, j))).abs())
                .sum();
        }
    }
    // Coefficients past f32's range are an overflow error, where the f64 reference succeeds.
    let largest = coefficients.iter().fold(0.0f64, |a, &b| a.max(b));
    if matches!(got, Err(Error::Overflow { .. })) && expect_r.is_ok() {
        assert!(
            largest >= f64::from(f32::MAX) / 2.0,
            "project_out: overflow of {largest:e}"
        );
    } else {
        assert_same_outcome("project_out", &got, &expect_r);
    }
    if got.is_ok() {
        assert_close("project_out", &out, &expect, |flat| {
            let (i, j) = (flat / n, flat % n);
            let through: f64 = (0..r)
                .map(|kk| f64::from(qv.at(i, kk)).abs() * coefficients[kk * n + j])
                .sum();
            let scale = f64::from(xv.at(i, j)).abs() + through;
            // Gradual underflow: each coefficient's `m` products, weighted by `|q_ik|`, then
            // the `r` products and the subtraction.
            let q_row: f64 = (0..r).map(|kk| f64::from(qv.at(i, kk)).abs()).sum();
            let underflow = (m as f64 * q_row + r as f64 + 2.0) * TINY;
            (scale < f64::from(f32::MAX) / 4.0)
                .then_some(4.0 * (m + r + 2) as f64 * U * scale + underflow)
        });
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
