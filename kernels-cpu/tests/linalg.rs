//! The linear-algebra kernels against the `kernels-core` references and against the properties
//! each factorisation promises, on every GEMM backend.

use half::f16;
use kernels_core::ops::lowrank::{
    LoraRank, LuParams, OpcmParams, RsvdParams, SvdRef, lora_extract_ref, lu_ref, opcm_project_ref,
    symmetric_eigen_ref, thin_svd_ref,
};
use kernels_core::ops::project::{cgs2_ref, householder_qr_ref, project_onto_ref, project_out_ref};
use kernels_core::{Error, Mat, MatMut, MatRef, MultiPass};
use kernels_cpu::Cpu;
use kernels_cpu::linalg::{
    self, Centering, GemmBackend, StreamingSvd, Transpose, factorisation_tolerance, gemm,
};
use kernels_testkit::isa_tests;
use kernels_testkit::linalg::{
    assert_within, check_qr, check_truncated_svd, graded, hard_matrices, orthogonality, random,
    widen, with_spectrum,
};
use proptest::prelude::*;

/// `k eps sum_p |a_ip| |b_pj|` per unit: the classical bound of a dot product of length `k`.
const GEMM_TOLERANCE_FACTOR: f64 = 2.0;

/// Every GEMM backend (faer's threaded, faer's on one thread, the portable kernel).
fn backends() -> Vec<Cpu> {
    let cpu = Cpu::detect();
    vec![
        cpu,
        cpu.with_threads(1).expect("one thread"),
        cpu.with_gemm_backend(GemmBackend::Portable),
    ]
}

const SHAPES: [(usize, usize); 12] = [
    (0, 0),
    (0, 4),
    (4, 0),
    (1, 1),
    (1, 7),
    (7, 1),
    (7, 3),
    (3, 7),
    (33, 33),
    (97, 31),
    (40, 131),
    (300, 65),
];

// ---------------------------------------------------------------- GEMM

fn check_gemm(cpu: &Cpu, m: usize, k: usize, n: usize, seed: u64) {
    for (a_op, b_op) in [
        (Transpose::No, Transpose::No),
        (Transpose::Yes, Transpose::No),
        (Transpose::No, Transpose::Yes),
        (Transpose::Yes, Transpose::Yes),
    ] {
        let a = random(m, k, seed).to_f32();
        let b = random(k, n, seed + 1).to_f32();
        let (a_stored, b_stored) = (
            if a_op == Transpose::Yes {
                a.transpose()
            } else {
                a.clone()
            },
            if b_op == Transpose::Yes {
                b.transpose()
            } else {
                b.clone()
            },
        );
        let c0 = random(m, n, seed + 2).to_f32();
        for (alpha, beta) in [(1.0f32, 0.0f32), (-0.5, 1.0), (2.0, -0.25)] {
            let mut c = c0.clone();
            if beta == 0.0 && m * n > 0 {
                // beta = 0 must not read c: a NaN there may not propagate.
                *c.at_mut(0, 0) = f32::NAN;
            }
            gemm(
                cpu,
                alpha,
                a_stored.as_ref(),
                a_op,
                b_stored.as_ref(),
                b_op,
                beta,
                c.as_mut(),
            )
            .unwrap();
            assert_gemm_close(&a, &b, &c0, alpha, beta, &c, &format!("{a_op:?} {b_op:?}"));
        }
    }
}

/// `c` against `alpha a b + beta c0` in f64, within gemm's contract: the classical bound plus
/// gradual underflow's `(|alpha| k + 2) 2^-149`.
fn assert_gemm_close(
    a: &Mat<f32>,
    b: &Mat<f32>,
    c0: &Mat<f32>,
    alpha: f32,
    beta: f32,
    c: &Mat<f32>,
    what: &str,
) {
    let [m, k] = a.shape();
    let n = b.cols();
    let (a64, b64) = (widen(a), widen(b));
    let underflow = (f64::from(alpha.abs()) * k as f64 + 2.0) * f64::from(f32::from_bits(1));
    for i in 0..m {
        for j in 0..n {
            let exact: f64 = (0..k).map(|p| a64.at(i, p) * b64.at(p, j)).sum::<f64>()
                * f64::from(alpha)
                + f64::from(beta) * f64::from(c0.at(i, j));
            let scale: f64 = (0..k)
                .map(|p| (a64.at(i, p) * b64.at(p, j)).abs())
                .sum::<f64>()
                * f64::from(alpha.abs())
                + f64::from(beta).abs() * f64::from(c0.at(i, j)).abs();
            let bound = GEMM_TOLERANCE_FACTOR * f64::from(f32::EPSILON) * (k + 2) as f64 * scale
                + underflow;
            let got = f64::from(c.at(i, j));
            assert!(
                (got - exact).abs() <= bound,
                "gemm {m}x{k}x{n} {what} alpha {alpha} beta {beta} at ({i}, {j}): {got} vs {exact}"
            );
        }
    }
}

fn gemm_matches_f64_products(cpu: &Cpu) {
    let cpu = cpu.with_gemm_backend(GemmBackend::Portable);
    for (i, &(m, k, n)) in [
        (0, 3, 4),
        (3, 0, 4),
        (3, 4, 0),
        (1, 1, 1),
        (5, 17, 33),
        (17, 257, 15),
        (4, 300, 3),
        (64, 64, 600),
    ]
    .iter()
    .enumerate()
    {
        check_gemm(&cpu, m, k, n, i as u64);
    }
}
isa_tests!(gemm_matches_f64_products, projection_forms);

#[test]
fn faer_gemm_matches_f64_products() {
    for cpu in backends() {
        for (i, &(m, k, n)) in [(0, 3, 4), (3, 0, 4), (1, 1, 1), (5, 17, 33), (130, 257, 70)]
            .iter()
            .enumerate()
        {
            check_gemm(&cpu, m, k, n, 10 + i as u64);
        }
    }
}

#[test]
fn gemm_rejects_bad_input() {
    let cpu = Cpu::detect();
    let a = Mat::<f32>::zeros(3, 4).unwrap();
    let mut c = Mat::<f32>::zeros(3, 3).unwrap();
    let err = gemm(
        &cpu,
        1.0,
        a.as_ref(),
        Transpose::No,
        a.as_ref(),
        Transpose::No,
        0.0,
        c.as_mut(),
    );
    assert!(matches!(err, Err(Error::ShapeMismatch { .. })), "{err:?}");
    let err = gemm(
        &cpu,
        1.0,
        a.as_ref(),
        Transpose::No,
        a.as_ref(),
        Transpose::Yes,
        0.0,
        c.as_mut(),
    );
    assert!(err.is_ok());
    let mut wrong = Mat::<f32>::zeros(3, 4).unwrap();
    let err = gemm(
        &cpu,
        1.0,
        a.as_ref(),
        Transpose::No,
        a.as_ref(),
        Transpose::Yes,
        0.0,
        wrong.as_mut(),
    );
    assert!(
        matches!(err, Err(Error::ShapeMismatch { what: "c", .. })),
        "{err:?}"
    );
    let err = gemm(
        &cpu,
        f32::NAN,
        a.as_ref(),
        Transpose::No,
        a.as_ref(),
        Transpose::Yes,
        0.0,
        c.as_mut(),
    );
    assert!(
        matches!(err, Err(Error::InvalidParam { name: "alpha", .. })),
        "{err:?}"
    );
}

/// An `alpha` far from 1 scales the product, never an operand: with one operand near `f32`'s
/// largest (or smallest) magnitudes, `alpha` times it would overflow (or underflow) although the
/// result is in range (a `linalg` fuzz finding on faer's backend, which folded `alpha` in).
#[test]
fn gemm_alpha_scales_the_product_not_an_operand() {
    let at = |scale: f32, rows, cols, seed| {
        let mut x = random(rows, cols, seed).to_f32();
        x.as_mut_slice().iter_mut().for_each(|v| *v *= scale);
        x
    };
    // faer's GEMV, rank-one and general paths, which fold `alpha` differently.
    for (cpu, (m, k, n)) in backends()
        .into_iter()
        .flat_map(|cpu| [(37, 45, 29), (37, 45, 1), (1, 45, 29), (37, 1, 29)].map(|s| (cpu, s)))
    {
        for (alpha, a_scale, b_scale) in [
            (1e10f32, 1e30f32, 1e-30f32),
            (1e10, 1e-30, 1e30),
            (1e-30, 1e-20, 1e20),
            (1e-30, 1e20, 1e-20),
            (-3e-12, 1e37, 1e-36),
        ] {
            let (a, b) = (at(a_scale, m, k, 1), at(b_scale, k, n, 2));
            let c0 = at(alpha, m, n, 3);
            for beta in [0.0f32, 0.5] {
                let mut c = c0.clone();
                let got = gemm(
                    &cpu,
                    alpha,
                    a.as_ref(),
                    Transpose::No,
                    b.as_ref(),
                    Transpose::No,
                    beta,
                    c.as_mut(),
                );
                got.unwrap();
                assert_gemm_close(
                    &a,
                    &b,
                    &c0,
                    alpha,
                    beta,
                    &c,
                    &format!("{a_scale:e} x {b_scale:e}"),
                );
            }
        }
        // `alpha == 0` still multiplies: an infinite product becomes NaN, as IEEE has it.
        let (mut a, b) = (at(1.0, 2, 3, 4), at(1.0, 3, 2, 5));
        *a.at_mut(0, 0) = f32::INFINITY;
        let mut c = Mat::zeros(2, 2).unwrap();
        gemm(
            &cpu,
            0.0,
            a.as_ref(),
            Transpose::No,
            b.as_ref(),
            Transpose::No,
            0.0,
            c.as_mut(),
        )
        .unwrap();
        assert!(
            c.at(0, 0).is_nan() && c.at(0, 1).is_nan(),
            "{:?}",
            c.as_slice()
        );
        assert_eq!(&c.as_slice()[2..], &[0.0, 0.0]);
    }
}

// ---------------------------------------------------------------- QR, CGS2, projections

#[test]
fn householder_qr_is_backward_stable_on_hard_matrices() {
    for cpu in backends() {
        for (i, &(m, n)) in SHAPES.iter().enumerate() {
            for (kind, a) in hard_matrices(m, n, i as u64) {
                let qr = linalg::householder_qr(&cpu, a.as_ref()).unwrap();
                check_qr(&format!("QR of {kind}"), &a, &qr);
                if kind == "random" {
                    // Unique factors for full-rank input: R matches the reference.
                    let reference = householder_qr_ref(a.as_ref()).unwrap();
                    let bound = 100.0 * factorisation_tolerance(m, n) * widen(&a).frobenius_norm();
                    assert_within(
                        "R vs reference",
                        widen(&qr.r).distance(&reference.r).unwrap(),
                        bound.max(1e-30),
                    );
                }
            }
        }
    }
}

#[test]
fn cgs2_matches_householder_and_rejects_dependence() {
    for cpu in backends() {
        for (i, &(m, n)) in [(1, 1), (7, 3), (33, 33), (97, 31), (300, 65), (500, 100)]
            .iter()
            .enumerate()
        {
            let a = random(m, n, 40 + i as u64).to_f32();
            let qr = linalg::cgs2(&cpu, a.as_ref()).unwrap();
            check_qr("CGS2", &a, &qr);
            let householder = linalg::householder_qr(&cpu, a.as_ref()).unwrap();
            let bound = 100.0 * factorisation_tolerance(m, n) * (n as f64).sqrt();
            assert_within(
                "CGS2 Q vs Householder Q",
                widen(&qr.q).distance(&widen(&householder.q)).unwrap(),
                bound,
            );
            let reference = cgs2_ref(a.as_ref()).unwrap();
            assert_within(
                "CGS2 Q vs reference",
                widen(&qr.q).distance(&reference.q).unwrap(),
                bound,
            );
        }
        let ill = with_spectrum(200, 20, &graded(20, 1e6), 7).to_f32();
        check_qr(
            "CGS2 condition 1e6",
            &ill,
            &linalg::cgs2(&cpu, ill.as_ref()).unwrap(),
        );
        let mut dependent = random(50, 5, 3).to_f32();
        for i in 0..50 {
            *dependent.at_mut(i, 3) = 2.0 * dependent.at(i, 1);
        }
        assert!(matches!(
            linalg::cgs2(&cpu, dependent.as_ref()),
            Err(Error::Singular {
                what: "CGS2",
                index: 3
            })
        ));
        let wide = Mat::<f32>::zeros(3, 5).unwrap();
        assert!(matches!(
            linalg::cgs2(&cpu, wide.as_ref()),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}

/// `||got - expect||_F` within the factorisation tolerance of an `m x n` `X` of norm `x_norm`.
fn assert_projection_close(
    what: &str,
    got: &[f32],
    expect: &[f32],
    m: usize,
    n: usize,
    x_norm: f64,
) {
    let error = got
        .iter()
        .zip(expect)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    assert_within(
        what,
        error,
        factorisation_tolerance(m, n) * x_norm.max(f64::MIN_POSITIVE),
    );
}

fn check_projection<X: kernels_core::Element>(cpu: &Cpu, m: usize, n: usize, r: usize, seed: u64) {
    let q = householder_qr_ref(random(m, r, seed).as_ref())
        .unwrap()
        .q
        .to_f32();
    let x: Vec<X> = random(m, n, seed + 1)
        .as_slice()
        .iter()
        .map(|&v| X::from_f32(v as f32))
        .collect();
    let x = MatRef::from_slice(&x, m, n).unwrap();
    let x_norm = x
        .row_iter()
        .flatten()
        .map(|v| f64::from(v.to_f32()).powi(2))
        .sum::<f64>()
        .sqrt();
    for out_of in [true, false] {
        let (mut got, mut expect) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
        let (g, e) = (
            MatMut::from_slice(&mut got, m, n).unwrap(),
            MatMut::from_slice(&mut expect, m, n).unwrap(),
        );
        if out_of {
            linalg::project_out(cpu, q.as_ref(), x, g).unwrap();
            project_out_ref(q.as_ref(), x, e).unwrap();
        } else {
            linalg::project_onto(cpu, q.as_ref(), x, g).unwrap();
            project_onto_ref(q.as_ref(), x, e).unwrap();
        }
        let what = format!("projection (out: {out_of}) {m}x{n} r {r}");
        assert_projection_close(&what, &got, &expect, m, n, x_norm);
    }
}

#[test]
fn projections_match_the_reference() {
    for cpu in backends() {
        let cpu = cpu.with_min_bytes_per_thread(1);
        for (i, &(m, n, r)) in [
            (1, 1, 1),
            (5, 0, 2),
            (17, 33, 0),
            (17, 33, 4),
            (64, 700, 16),
            (300, 97, 64),
            (1000, 130, 5),
        ]
        .iter()
        .enumerate()
        {
            check_projection::<f32>(&cpu, m, n, r, 60 + i as u64);
            check_projection::<f16>(&cpu, m, n, r, 70 + i as u64);
        }
    }
}

/// Shapes for the streaming projection kernel `(m, n, r)`: ranks around its tiles of 4 and 8
/// columns of `Q` and its limit of 64 (65 takes the GEMM path), rows around its row tiles and
/// row blocks of 64, columns around the vector widths (8, 16) and tiles (24, 48).
const PROJECTION_SHAPES: [(usize, usize, usize); 16] = [
    (1, 1, 1),
    (3, 7, 2),
    (9, 9, 3),
    (5, 23, 5),
    (8, 24, 8),
    (7, 25, 9),
    (17, 47, 4),
    (31, 48, 16),
    (33, 49, 17),
    (65, 97, 7),
    (64, 130, 64),
    (129, 95, 63),
    (130, 201, 12),
    (70, 40, 65),
    (200, 33, 0),
    (0, 12, 3),
];

/// Every projection form on one shape: out of place against the reference, in place (on a
/// strided `X`, whose padding must survive) bit-identical to out of place, and one thread
/// bit-identical to `cpu`'s threads.
fn check_projection_forms(cpu: &Cpu, m: usize, n: usize, r: usize, seed: u64) {
    let single = cpu.with_threads(1).expect("one thread");
    let q = householder_qr_ref(random(m, r, seed).as_ref())
        .unwrap()
        .q
        .to_f32();
    let stride = n + 5;
    let mut padded = random(m, stride, seed + 1).to_f32().as_slice().to_vec();
    for row in padded.chunks_exact_mut(stride) {
        row[n..].fill(-7.0);
    }
    let x = MatRef::new(&padded, m, n, stride).unwrap();
    for complement in [true, false] {
        let run = |cpu: &Cpu, out: &mut Vec<f32>| {
            let out = MatMut::from_slice(out, m, n).unwrap();
            if complement {
                linalg::project_out(cpu, q.as_ref(), x, out)
            } else {
                linalg::project_onto(cpu, q.as_ref(), x, out)
            }
            .unwrap();
        };
        let (mut got, mut alone, mut expect) = (
            vec![0.0f32; m * n],
            vec![0.0f32; m * n],
            vec![0.0f32; m * n],
        );
        run(cpu, &mut got);
        run(&single, &mut alone);
        let e = MatMut::from_slice(&mut expect, m, n).unwrap();
        if complement {
            project_out_ref(q.as_ref(), x, e).unwrap();
        } else {
            project_onto_ref(q.as_ref(), x, e).unwrap();
        }
        let what = format!("projection (complement: {complement}) {m}x{n} r {r} on {cpu:?}");
        let x_norm = x
            .row_iter()
            .flatten()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt();
        assert_projection_close(&what, &got, &expect, m, n, x_norm);
        if r <= 64 {
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{what}: threads change the bits"
            );
        }
        let mut in_place = padded.clone();
        let target = MatMut::new(&mut in_place, m, n, stride).unwrap();
        if complement {
            linalg::project_out_in_place(cpu, q.as_ref(), target)
        } else {
            linalg::project_onto_in_place(cpu, q.as_ref(), target)
        }
        .unwrap();
        for i in 0..m {
            let row = &in_place[i * stride..][..stride];
            assert_eq!(
                row[..n].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                got[i * n..][..n]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "{what}: in place, row {i}"
            );
            assert!(row[n..].iter().all(|&v| v == -7.0), "{what}: padding");
        }
    }
}

fn projection_forms(cpu: &Cpu) {
    for (i, &(m, n, r)) in PROJECTION_SHAPES.iter().enumerate() {
        check_projection_forms(cpu, m, n, r, 80 + i as u64);
    }
}

#[test]
fn in_place_projections_reject_bad_input() {
    let cpu = Cpu::detect();
    let q = householder_qr_ref(random(5, 2, 3).as_ref())
        .unwrap()
        .q
        .to_f32();
    let mut x = random(5, 40, 1).to_f32();
    let wrong_q = Mat::<f32>::zeros(4, 2).unwrap();
    assert!(matches!(
        linalg::project_out_in_place(&cpu, wrong_q.as_ref(), x.as_mut()),
        Err(Error::ShapeMismatch { what: "q", .. })
    ));
    let mut bad_q = q.clone();
    *bad_q.at_mut(1, 1) = f32::NAN;
    assert!(matches!(
        linalg::project_onto_in_place(&cpu, bad_q.as_ref(), x.as_mut()),
        Err(Error::NonFinite { what: "q", .. })
    ));
    *x.at_mut(3, 37) = f32::INFINITY;
    *x.at_mut(4, 2) = f32::NAN;
    for cpu in [
        cpu,
        cpu.with_threads(3).unwrap().with_min_bytes_per_thread(1),
    ] {
        for r in [2, 0] {
            let q = q.as_ref().submatrix(0, 0, 5, r).unwrap();
            assert_eq!(
                linalg::project_out_in_place(&cpu, q, x.as_mut()),
                Err(Error::NonFinite {
                    what: "x",
                    index: 3 * 40 + 37
                }),
                "rank {r}"
            );
        }
    }
    // Finite columns whose coefficients overflow: an error, never an infinity in `X`.
    let mut huge = Mat::<f32>::from_fn(4, 3, |_, _| 3e38).unwrap();
    let ones = Mat::<f32>::from_fn(4, 1, |_, _| 0.5).unwrap();
    assert_eq!(
        linalg::project_out_in_place(&cpu, ones.as_ref(), huge.as_mut()),
        Err(Error::Overflow {
            what: "the projection's coefficients Q^T X"
        })
    );
}

#[test]
fn projections_reject_bad_input() {
    let cpu = Cpu::detect();
    let q = Mat::<f32>::zeros(5, 2).unwrap();
    let mut x = random(5, 40, 1).to_f32();
    let mut out = Mat::<f32>::zeros(5, 40).unwrap();
    let wrong_q = Mat::<f32>::zeros(4, 2).unwrap();
    assert!(matches!(
        linalg::project_out(&cpu, wrong_q.as_ref(), x.as_ref(), out.as_mut()),
        Err(Error::ShapeMismatch { what: "q", .. })
    ));
    let mut wrong_out = Mat::<f32>::zeros(5, 39).unwrap();
    assert!(matches!(
        linalg::project_out(&cpu, q.as_ref(), x.as_ref(), wrong_out.as_mut()),
        Err(Error::ShapeMismatch { what: "out", .. })
    ));
    *x.at_mut(3, 37) = f32::INFINITY;
    *x.at_mut(4, 2) = f32::NAN;
    for cpu in [
        cpu,
        cpu.with_threads(3).unwrap().with_min_bytes_per_thread(1),
    ] {
        assert_eq!(
            linalg::project_onto(&cpu, q.as_ref(), x.as_ref(), out.as_mut()),
            Err(Error::NonFinite {
                what: "x",
                index: 3 * 40 + 37
            })
        );
    }
}

// ---------------------------------------------------------------- LU / LDU

#[test]
fn lu_reconstructs_and_pivots_as_the_reference() {
    for cpu in backends() {
        for (i, &(m, n)) in SHAPES.iter().chain(&[(200, 200), (130, 61)]).enumerate() {
            for (kind, a) in hard_matrices(m, n, 80 + i as u64) {
                let f = linalg::lu(&cpu, a.as_ref()).unwrap();
                let a64 = widen(&a);
                let pa = Mat::from_fn(m, n, |r, c| a64.at(f.perm[r], c)).unwrap();
                let error = widen(&f.l)
                    .matmul(&widen(&f.u))
                    .unwrap()
                    .distance(&pa)
                    .unwrap();
                // Partial pivoting's growth is small on these matrices; the bound allows n of it.
                assert_within(
                    &format!("LU of {kind} {m}x{n}"),
                    error,
                    factorisation_tolerance(m, n)
                        * (m.min(n).max(1) as f64).sqrt()
                        * a64.frobenius_norm(),
                );
                if kind == "random" {
                    assert_eq!(f.perm, lu_ref(a.as_ref()).unwrap().perm, "pivots {m}x{n}");
                }
            }
        }
    }
}

#[test]
fn ldu_reconstructs_and_guards_small_pivots() {
    let cpu = Cpu::detect();
    let a = random(70, 70, 5).to_f32();
    let f = linalg::ldu(&cpu, a.as_ref(), LuParams::default()).unwrap();
    let a64 = widen(&a);
    let ld = Mat::from_fn(70, 70, |i, j| f.l.at(i, j) as f64 * f64::from(f.d[j])).unwrap();
    let pa = Mat::from_fn(70, 70, |r, c| a64.at(f.perm[r], c)).unwrap();
    assert_within(
        "LDU",
        ld.matmul(&widen(&f.u)).unwrap().distance(&pa).unwrap(),
        factorisation_tolerance(70, 70) * 70f64.sqrt() * a64.frobenius_norm(),
    );
    for i in 0..70 {
        assert_eq!(f.u.at(i, i), 1.0);
    }
    let mut singular = a.clone();
    for j in 0..70 {
        *singular.at_mut(9, j) = singular.at(2, j);
    }
    assert!(matches!(
        linalg::ldu(&cpu, singular.as_ref(), LuParams::default()),
        Err(Error::Singular { what: "LDU", .. })
    ));
    let mut nan = a.clone();
    *nan.at_mut(1, 2) = f32::NAN;
    assert_eq!(
        linalg::lu(&cpu, nan.as_ref()),
        Err(Error::NonFinite {
            what: "a",
            index: 72
        })
    );
}

/// The `f32` input check runs over row ranges on several threads: the first non-finite entry
/// in row-major order is the one reported, wherever the ranges split, and the largest magnitude
/// (which decides rescaling) is found in whichever range holds it.
#[test]
fn input_checks_split_over_threads_report_the_first_bad_entry() {
    let split = Cpu::detect()
        .with_threads(3)
        .unwrap()
        .with_min_bytes_per_thread(1);
    let (m, n) = (97, 40);
    for cpu in [split, Cpu::detect().with_threads(1).unwrap()] {
        for (first, later) in [((5, 7), (90, 1)), ((60, 0), (96, 39)), ((96, 39), (96, 39))] {
            for (bad, other) in [(f32::NAN, f32::INFINITY), (f32::NEG_INFINITY, f32::NAN)] {
                let mut a = random(m, n, 11).to_f32();
                *a.at_mut(later.0, later.1) = other;
                *a.at_mut(first.0, first.1) = bad;
                let expected = Error::NonFinite {
                    what: "a",
                    index: first.0 * n + first.1,
                };
                let params = RsvdParams::new(4);
                assert_eq!(
                    linalg::thin_svd(&cpu, a.as_ref()).err(),
                    Some(expected.clone())
                );
                assert_eq!(
                    linalg::randomized_svd(&cpu, a.as_ref(), params).err(),
                    Some(expected.clone())
                );
                assert_eq!(
                    linalg::householder_qr(&cpu, a.as_ref()).err(),
                    Some(expected.clone())
                );
                assert_eq!(linalg::cgs2(&cpu, a.as_ref()).err(), Some(expected));
            }
        }
        // The largest magnitudes (beyond the safe range) in the last rows only, so in the last
        // thread's range: the rescaled factorisation finds 1e30 times the singular values of
        // the matrix in range.
        let base = random(m, n, 12).to_f32();
        let (mut a, mut reference) = (base.clone(), base);
        for i in 0..m {
            let (scale, reference_scale) = if i < 80 { (1e30, 1.0) } else { (1e36, 1e6) };
            a.row_mut(i).iter_mut().for_each(|v| *v *= scale);
            reference
                .row_mut(i)
                .iter_mut()
                .for_each(|v| *v *= reference_scale);
        }
        let got = linalg::thin_svd(&cpu, a.as_ref()).unwrap();
        let want = linalg::thin_svd(&cpu, reference.as_ref()).unwrap();
        for (g, w) in got.s.iter().zip(&want.s) {
            let scaled = f64::from(*w) * 1e30;
            assert!(
                (f64::from(*g) - scaled).abs() <= 1e-4 * f64::from(want.s[0]) * 1e30,
                "{g} against {scaled}"
            );
        }
    }
}

// ---------------------------------------------------------------- SVD

fn check_svd(what: &str, a: &Mat<f32>, svd: &linalg::Svd<f32>) {
    let (m, n) = (a.rows(), a.cols());
    let k = m.min(n);
    let tol = factorisation_tolerance(m, n);
    let a64 = widen(a);
    assert_eq!(svd.s.len(), k);
    let (u, v) = (widen(&svd.u), widen(&svd.v));
    let us = Mat::from_fn(m, k, |i, j| u.at(i, j) * f64::from(svd.s[j])).unwrap();
    assert_within(
        &format!("{what} {m}x{n}: reconstruction"),
        us.matmul(&v.transpose()).unwrap().distance(&a64).unwrap(),
        tol * a64.frobenius_norm(),
    );
    assert_within(
        &format!("{what} {m}x{n}: U orthogonality"),
        orthogonality(&u),
        tol,
    );
    assert_within(
        &format!("{what} {m}x{n}: V orthogonality"),
        orthogonality(&v),
        tol,
    );
    assert!(svd.s.windows(2).all(|w| w[0] >= w[1]), "{what}: descending");
    let reference = thin_svd_ref(a.as_ref()).unwrap();
    let s_max = reference.s.first().copied().unwrap_or(0.0);
    for (g, e) in svd.s.iter().zip(&reference.s) {
        assert_within(
            &format!("{what} {m}x{n}: singular value"),
            (f64::from(*g) - e).abs(),
            tol * s_max,
        );
    }
}

#[test]
fn thin_svd_is_accurate_on_hard_matrices() {
    for cpu in backends() {
        for (i, &(m, n)) in SHAPES.iter().enumerate() {
            for (kind, a) in hard_matrices(m, n, 90 + i as u64) {
                let svd = linalg::thin_svd(&cpu, a.as_ref()).unwrap();
                check_svd(&format!("SVD of {kind}"), &a, &svd);
            }
        }
    }
}

#[test]
fn parallel_jacobi_is_accurate_on_every_thread_count() {
    // 140 columns: past the row count where the Jacobi sweeps split into blocks over threads.
    for threads in [1, 2, 3] {
        let cpu = Cpu::detect().with_threads(threads).unwrap();
        for (kind, a) in hard_matrices(260, 140, 7) {
            check_svd(
                &format!("SVD of {kind} on {threads} threads"),
                &a,
                &linalg::thin_svd(&cpu, a.as_ref()).unwrap(),
            );
        }
    }
}

#[test]
fn same_inputs_give_the_same_bits_on_a_given_backend() {
    for cpu in backends() {
        let a = with_spectrum(300, 150, &graded(150, 1e3), 3).to_f32();
        let q = linalg::householder_qr(&cpu, random(300, 20, 4).to_f32().as_ref())
            .unwrap()
            .q;
        let project = || {
            let mut out = Mat::<f32>::zeros(300, 150).unwrap();
            linalg::project_out(&cpu, q.as_ref(), a.as_ref(), out.as_mut()).unwrap();
            out
        };
        assert_eq!(
            linalg::thin_svd(&cpu, a.as_ref()).unwrap(),
            linalg::thin_svd(&cpu, a.as_ref()).unwrap()
        );
        let params = RsvdParams::new(10);
        assert_eq!(
            linalg::randomized_svd(&cpu, a.as_ref(), params).unwrap(),
            linalg::randomized_svd(&cpu, a.as_ref(), params).unwrap()
        );
        assert_eq!(project(), project());
    }
}

#[test]
fn thin_svd_signs_and_vectors_match_the_reference() {
    let cpu = Cpu::detect();
    let a = with_spectrum(
        60,
        25,
        &(0..25).map(|i| 10.0 - 0.3 * i as f64).collect::<Vec<_>>(),
        3,
    )
    .to_f32();
    let svd = linalg::thin_svd(&cpu, a.as_ref()).unwrap();
    let reference = thin_svd_ref(a.as_ref()).unwrap();
    // Gaps of 0.3 on a spectrum of 10: vectors are determined to about eps * 10 / 0.3.
    let bound = 40.0 * factorisation_tolerance(60, 25) * 10.0 / 0.3;
    assert_within(
        "U vs reference",
        widen(&svd.u).distance(&reference.u).unwrap(),
        bound,
    );
    assert_within(
        "V vs reference",
        widen(&svd.v).distance(&reference.v).unwrap(),
        bound,
    );
}

#[test]
fn non_finite_input_is_an_error_everywhere() {
    let cpu = Cpu::detect();
    let mut a = random(8, 6, 1).to_f32();
    *a.at_mut(4, 5) = f32::NAN;
    let nan = Err(Error::NonFinite {
        what: "a",
        index: 29,
    });
    assert_eq!(linalg::householder_qr(&cpu, a.as_ref()), nan);
    assert_eq!(linalg::cgs2(&cpu, a.as_ref()), nan);
    assert!(matches!(
        linalg::ldu(&cpu, a.as_ref(), LuParams::default()),
        Err(Error::NonFinite { index: 29, .. })
    ));
    assert!(matches!(
        linalg::lora_extract(&cpu, a.as_ref(), LoraRank::Fixed(2)),
        Err(Error::NonFinite { index: 29, .. })
    ));
    let u = householder_qr_ref(random(8, 3, 2).as_ref())
        .unwrap()
        .q
        .to_f32();
    let v = householder_qr_ref(random(6, 3, 3).as_ref())
        .unwrap()
        .q
        .to_f32();
    let mut out = Mat::<f32>::zeros(8, 6).unwrap();
    let merged = SvdRef {
        u: u.as_ref(),
        s: &[3.0, 2.0, 1.0],
        v: v.as_ref(),
    };
    assert!(matches!(
        linalg::opcm_project(
            &cpu,
            merged,
            a.as_ref(),
            OpcmParams::default(),
            out.as_mut()
        ),
        Err(Error::NonFinite {
            what: "tau",
            index: 29
        })
    ));
}

#[test]
fn svd_errors() {
    let cpu = Cpu::detect();
    let mut a = random(6, 4, 1).to_f32();
    *a.at_mut(5, 3) = f32::NEG_INFINITY;
    assert_eq!(
        linalg::thin_svd(&cpu, a.as_ref()),
        Err(Error::NonFinite {
            what: "a",
            index: 23
        })
    );
    assert!(matches!(
        linalg::randomized_svd(&cpu, a.as_ref(), RsvdParams::new(2)),
        Err(Error::NonFinite { .. })
    ));
    let b = random(6, 4, 1).to_f32();
    for rank in [0, 5] {
        assert!(matches!(
            linalg::randomized_svd(&cpu, b.as_ref(), RsvdParams::new(rank)),
            Err(Error::InvalidParam { name: "rank", .. })
        ));
    }
    let unbounded = RsvdParams::new(2).with_power_iterations(usize::MAX);
    assert!(matches!(
        linalg::randomized_svd(&cpu, b.as_ref(), unbounded),
        Err(Error::InvalidParam {
            name: "power_iterations",
            ..
        })
    ));
}

#[test]
fn randomized_svd_is_near_optimal() {
    for cpu in backends() {
        for (m, n, r) in [(300, 200, 10), (150, 400, 16), (64, 64, 64)] {
            let k = m.min(n);
            let spectrum: Vec<f64> = (0..k).map(|i| 1.0 / (1.0 + i as f64).powf(1.5)).collect();
            let a = with_spectrum(m, n, &spectrum, 5).to_f32();
            let svd = linalg::randomized_svd(&cpu, a.as_ref(), RsvdParams::new(r)).unwrap();
            check_truncated_svd("rSVD", &a, &svd, r);
        }
    }
}

// ---------------------------------------------------------------- eigen, LoRA, OPCM

#[test]
fn symmetric_eigen_of_gram_and_indefinite_matrices() {
    let a = random(80, 30, 9);
    let gram = a.t_matmul(&a).unwrap().to_f32();
    let eig = linalg::symmetric_eigen(gram.as_ref()).unwrap();
    let s = thin_svd_ref(a.as_ref()).unwrap().s;
    let tol = factorisation_tolerance(30, 30);
    for (w, sv) in eig.values.iter().zip(&s) {
        assert_within(
            "eigenvalue of the Gram matrix",
            (f64::from(*w) - sv * sv).abs(),
            tol * s[0].powi(2),
        );
    }
    let symmetric = {
        let b = random(25, 25, 4);
        Mat::from_fn(25, 25, |i, j| b.at(i, j) + b.at(j, i))
            .unwrap()
            .to_f32()
    };
    let eig = linalg::symmetric_eigen(symmetric.as_ref()).unwrap();
    let v = widen(&eig.vectors);
    let vw = Mat::from_fn(25, 25, |i, j| v.at(i, j) * f64::from(eig.values[j])).unwrap();
    let s64 = widen(&symmetric);
    assert_within(
        "V W V^T",
        vw.matmul(&v.transpose()).unwrap().distance(&s64).unwrap(),
        factorisation_tolerance(25, 25) * s64.frobenius_norm(),
    );
    assert_within(
        "V orthogonality",
        orthogonality(&v),
        factorisation_tolerance(25, 25),
    );
    assert!(eig.values.iter().any(|&w| w < 0.0) && eig.values.windows(2).all(|w| w[0] >= w[1]));
    let reference = symmetric_eigen_ref(symmetric.as_ref()).unwrap();
    for (g, e) in eig.values.iter().zip(&reference.values) {
        assert_within(
            "eigenvalue vs reference",
            (f64::from(*g) - e).abs(),
            factorisation_tolerance(25, 25) * s64.frobenius_norm(),
        );
    }
    // Distinct eigenvalues: the normalised vectors match the reference's.
    assert_within(
        "eigenvectors vs reference",
        v.distance(&reference.vectors).unwrap(),
        1e3 * factorisation_tolerance(25, 25),
    );
    // Only the lower triangle is read, NaN there included.
    let mut upper = symmetric.clone();
    *upper.at_mut(2, 20) = f32::NAN;
    assert_eq!(linalg::symmetric_eigen(upper.as_ref()).unwrap(), eig);
    *upper.at_mut(20, 2) = f32::NAN;
    assert_eq!(
        linalg::symmetric_eigen(upper.as_ref()),
        Err(Error::NonFinite {
            what: "s",
            index: 20 * 25 + 2
        })
    );
    let not_square = Mat::<f32>::zeros(3, 4).unwrap();
    assert!(matches!(
        linalg::symmetric_eigen(not_square.as_ref()),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn lora_extraction_matches_the_reference() {
    let cpu = Cpu::detect();
    let spectrum: Vec<f64> = (0..40).map(|i| 0.8f64.powi(i)).collect();
    let delta = with_spectrum(90, 40, &spectrum, 12).to_f32();
    for rule in [
        LoraRank::Fixed(7),
        LoraRank::Energy(0.9),
        LoraRank::Epsilon(0.05),
        LoraRank::Fixed(0),
    ] {
        let got = linalg::lora_extract(&cpu, delta.as_ref(), rule).unwrap();
        let expect = lora_extract_ref(delta.as_ref(), rule).unwrap();
        assert_eq!(got.a.rows(), expect.a.rows(), "{rule:?}: rank");
        let ba = widen(&got.b).matmul(&widen(&got.a)).unwrap();
        assert_within(
            &format!("{rule:?}: B A"),
            ba.distance(&expect.b.matmul(&expect.a).unwrap()).unwrap(),
            10.0 * factorisation_tolerance(90, 40),
        );
    }
    let randomized =
        linalg::lora_extract_randomized(&cpu, delta.as_ref(), RsvdParams::new(7)).unwrap();
    let expect = lora_extract_ref(delta.as_ref(), LoraRank::Fixed(7)).unwrap();
    let ba = widen(&randomized.b).matmul(&widen(&randomized.a)).unwrap();
    // The randomized range finder captures this fast-decaying spectrum to well within 1 %.
    assert_within(
        "randomized B A",
        ba.distance(&expect.b.matmul(&expect.a).unwrap()).unwrap(),
        0.01 * widen(&delta).frobenius_norm(),
    );
    assert!(matches!(
        linalg::lora_extract(&cpu, delta.as_ref(), LoraRank::Fixed(41)),
        Err(Error::InvalidParam { .. })
    ));
}

#[test]
fn opcm_matches_the_reference() {
    let cpu = Cpu::detect();
    let (m, n, p) = (50, 40, 30);
    let u = householder_qr_ref(random(m, p, 1).as_ref())
        .unwrap()
        .q
        .to_f32();
    let v = householder_qr_ref(random(n, p, 2).as_ref())
        .unwrap()
        .q
        .to_f32();
    let s: Vec<f32> = (0..p).map(|i| 1.0 / (1.0 + i as f32)).collect();
    let tau = random(m, n, 3).to_f32();
    let merged = |s| SvdRef {
        u: u.as_ref(),
        s,
        v: v.as_ref(),
    };
    for alpha in [0.0, 0.5, 1.0] {
        let params = OpcmParams::default().with_alpha(alpha);
        let mut got = Mat::<f32>::zeros(m, n).unwrap();
        linalg::opcm_project(&cpu, merged(&s), tau.as_ref(), params, got.as_mut()).unwrap();
        let expect = opcm_project_ref(merged(&s), tau.as_ref(), params).unwrap();
        assert_within(
            &format!("OPCM alpha {alpha}"),
            widen(&got).distance(&expect).unwrap(),
            factorisation_tolerance(m, n) * widen(&tau).frobenius_norm(),
        );
    }
    let mut out = Mat::<f32>::zeros(m, n).unwrap();
    let params = OpcmParams::default();
    assert!(matches!(
        linalg::opcm_project(&cpu, merged(&s[1..]), tau.as_ref(), params, out.as_mut()),
        Err(Error::LengthMismatch { what: "s", .. })
    ));
    assert!(matches!(
        linalg::opcm_project(
            &cpu,
            merged(&s),
            tau.as_ref(),
            params.with_alpha(1.5),
            out.as_mut()
        ),
        Err(Error::InvalidParam { name: "alpha", .. })
    ));
}

// ---------------------------------------------------------------- streaming SVD / PCA

/// Subspace distance `||V1^T V1 - V2^T V2||_F` of two row bases.
fn subspace_distance(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
    a.t_matmul(a)
        .unwrap()
        .distance(&b.t_matmul(b).unwrap())
        .unwrap()
}

#[test]
fn streaming_svd_is_exact_on_low_rank_rows() {
    let cpu = Cpu::detect();
    let (rows, dim, rank) = (300, 40, 6);
    let data = with_spectrum(rows, dim, &[9.0, 7.0, 5.0, 3.0, 2.0, 1.0], 21).to_f32();
    let mut stream = StreamingSvd::new(dim, rank, Centering::None).unwrap();
    let mut changes = vec![];
    for chunk in 0..(rows / 25) {
        let batch = data.as_ref().submatrix(chunk * 25, 0, 25, dim).unwrap();
        changes.push(stream.feed(&cpu, batch).unwrap());
    }
    assert!(!stream.next_pass().unwrap(), "one pass");
    assert_eq!(&stream.finish().unwrap(), stream.components());
    let reference = thin_svd_ref(data.as_ref()).unwrap();
    for (g, e) in stream.singular_values().iter().zip(&reference.s) {
        assert_within(
            "streamed singular value",
            (f64::from(*g) - e).abs(),
            10.0 * factorisation_tolerance(rows, dim) * reference.s[0],
        );
    }
    let expect = reference.v.leading_cols(rank).transpose();
    assert_within(
        "streamed subspace",
        subspace_distance(&widen(stream.components()), &expect),
        10.0 * factorisation_tolerance(rows, dim),
    );
    // The subspace settles once every direction has been seen: later changes are rounding.
    assert!(changes.last().copied().unwrap() < 1e-6, "{changes:?}");
    assert_eq!(stream.rows_seen(), rows as u64);
}

#[test]
fn streaming_pca_centres_and_approximates_the_leading_subspace() {
    let cpu = Cpu::detect();
    let (rows, dim, rank) = (400, 30, 4);
    let signal = with_spectrum(rows, dim, &[40.0, 30.0, 20.0, 10.0], 31);
    let noise = random(rows, dim, 32);
    let data = Mat::from_fn(rows, dim, |i, j| {
        3.0 + signal.at(i, j) + 0.01 * noise.at(i, j)
    })
    .unwrap()
    .to_f32();
    let mut stream = StreamingSvd::new(dim, rank, Centering::Mean).unwrap();
    for chunk in 0..(rows / 50) {
        stream
            .feed(
                &cpu,
                data.as_ref().submatrix(chunk * 50, 0, 50, dim).unwrap(),
            )
            .unwrap();
    }
    let d64 = widen(&data);
    let mean: Vec<f64> = (0..dim)
        .map(|j| (0..rows).map(|i| d64.at(i, j)).sum::<f64>() / rows as f64)
        .collect();
    for (g, e) in stream.mean().iter().zip(&mean) {
        assert!((g - e).abs() <= 1e-9 * 3.0, "mean {g} vs {e}");
    }
    let centred = Mat::from_fn(rows, dim, |i, j| d64.at(i, j) - mean[j]).unwrap();
    let reference = thin_svd_ref(centred.as_ref()).unwrap();
    let expect = reference.v.leading_cols(rank).transpose();
    // Noise of 1e-2 against a signal gap of 10: the subspace is off by about 1e-3.
    assert_within(
        "PCA subspace",
        subspace_distance(&widen(stream.components()), &expect),
        1e-2,
    );
}

#[test]
fn streaming_svd_rejects_bad_input_and_keeps_its_state() {
    let cpu = Cpu::detect();
    assert!(StreamingSvd::new(5, 0, Centering::None).is_err());
    assert!(StreamingSvd::new(5, 6, Centering::None).is_err());
    let mut stream = StreamingSvd::new(5, 2, Centering::None).unwrap();
    stream
        .feed(&cpu, random(4, 5, 1).to_f32().as_ref())
        .unwrap();
    let before = stream.components().clone();
    assert!(matches!(
        stream.feed(&cpu, random(4, 6, 1).to_f32().as_ref()),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut nan = random(3, 5, 2).to_f32();
    *nan.at_mut(2, 4) = f32::NAN;
    assert_eq!(
        stream.feed(&cpu, nan.as_ref()),
        Err(Error::NonFinite {
            what: "batch",
            index: 14
        })
    );
    assert_eq!(stream.components(), &before);
    assert_eq!(stream.rows_seen(), 4);
}

// ---------------------------------------------------------------- shapes at random

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn factorisations_hold_on_any_shape(m in 0usize..40, n in 0usize..40, seed in any::<u64>()) {
        let cpu = Cpu::detect();
        let a = random(m, n, seed).to_f32();
        check_qr("QR", &a, &linalg::householder_qr(&cpu, a.as_ref()).unwrap());
        check_svd("SVD", &a, &linalg::thin_svd(&cpu, a.as_ref()).unwrap());
        let f = linalg::lu(&cpu, a.as_ref()).unwrap();
        let a64 = widen(&a);
        let pa = Mat::from_fn(m, n, |r, c| a64.at(f.perm[r], c)).unwrap();
        let bound = factorisation_tolerance(m, n) * (m.min(n).max(1) as f64).sqrt() * a64.frobenius_norm();
        prop_assert!(widen(&f.l).matmul(&widen(&f.u)).unwrap().distance(&pa).unwrap() <= bound);
    }
}
