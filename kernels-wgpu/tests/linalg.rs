//! The GPU's linear algebra on every kernel variant against the `kernels-core` references and
//! the CPU's accuracy bounds: GEMM in every transpose and element type across tile, page and
//! split edges, the projections, Householder QR on the hard matrices, the randomized SVD, LoRA
//! extraction and the OPCM step, and their errors.

use kernels_core::ops::lowrank::{
    LoraRank, OpcmParams, RsvdParams, SvdRef, lora_extract_ref, opcm_project_ref,
};
use kernels_core::ops::project::{householder_qr_ref, project_onto_ref, project_out_ref};
use kernels_core::{Element, Error, Mat, MatMut, MatRef};
use kernels_testkit::gpu_tests;
use kernels_testkit::linalg::{
    assert_within, check_qr, check_truncated_svd, hard_matrices, random, widen, with_spectrum,
};
use kernels_wgpu::linalg::{
    GpuSvdRef, Transpose, factorisation_tolerance, gemm, gemm_tolerance, householder_qr,
    lora_extract_randomized, opcm_project, project_onto, project_out, randomized_svd,
};
use kernels_wgpu::{Context, GpuElement, GpuTensor, bf16, block_on, f16};

fn upload<T: GpuElement>(ctx: &Context, m: &Mat<f32>) -> GpuTensor<T> {
    let values: Vec<T> = m.as_slice().iter().map(|&v| T::from_f32(v)).collect();
    GpuTensor::from_matrix(
        ctx,
        MatRef::from_slice(&values, m.rows(), m.cols()).unwrap(),
    )
    .unwrap()
}

/// `m` as the device sees it: rounded to `T`.
fn rounded<T: Element>(m: &Mat<f32>) -> Mat<f64> {
    Mat::from_fn(m.rows(), m.cols(), |i, j| {
        f64::from(T::from_f32(m.at(i, j)).to_f32())
    })
    .unwrap()
}

fn op(m: &Mat<f64>, t: Transpose) -> Mat<f64> {
    match t {
        Transpose::No => m.clone(),
        Transpose::Yes => m.transpose(),
    }
}

fn stored(rows: usize, cols: usize, t: Transpose) -> (usize, usize) {
    match t {
        Transpose::No => (rows, cols),
        Transpose::Yes => (cols, rows),
    }
}

fn check_gemm<A: GpuElement, B: GpuElement>(
    ctx: &Context,
    m: usize,
    k: usize,
    n: usize,
    seed: u64,
) {
    for (a_op, b_op) in [
        (Transpose::No, Transpose::No),
        (Transpose::Yes, Transpose::No),
        (Transpose::No, Transpose::Yes),
        (Transpose::Yes, Transpose::Yes),
    ] {
        let (ar, ac) = stored(m, k, a_op);
        let (br, bc) = stored(k, n, b_op);
        let a = random(ar, ac, seed).to_f32();
        let b = random(br, bc, seed + 1).to_f32();
        let c0 = random(m, n, seed + 2).to_f32();
        let (a64, b64) = (op(&rounded::<A>(&a), a_op), op(&rounded::<B>(&b), b_op));
        for (alpha, beta) in [(1.0f32, 0.0f32), (-0.5, 1.0), (2.0, -0.25)] {
            let mut c = upload::<f32>(ctx, &c0);
            gemm(
                ctx,
                alpha,
                &upload::<A>(ctx, &a),
                a_op,
                &upload::<B>(ctx, &b),
                b_op,
                beta,
                &mut c,
            )
            .unwrap();
            let got = c.to_vec_blocking(ctx).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut abs) = (0.0, 0.0);
                    for p in 0..k {
                        exact += a64.at(i, p) * b64.at(p, j);
                        abs += (a64.at(i, p) * b64.at(p, j)).abs();
                    }
                    let old = f64::from(c0.at(i, j));
                    let expect = f64::from(alpha) * exact + f64::from(beta) * old;
                    let bound = gemm_tolerance(
                        k,
                        f64::from(alpha.abs()) * abs + f64::from(beta.abs()) * old.abs(),
                    );
                    let g = f64::from(got[i * n + j]);
                    assert!(
                        (g - expect).abs() <= bound,
                        "{:?}x{:?} {m}x{k}x{n} {a_op:?}{b_op:?} alpha {alpha} beta {beta} ({i}, {j}): {g} vs {expect} (bound {bound:e})",
                        A::DTYPE,
                        B::DTYPE
                    );
                }
            }
        }
    }
}

/// Tile edges (64, the tile of 16 x 16 invocations of 4 x 4), primes, `K` long enough to split
/// (few output tiles, many steps), and matrices of several pages in the paged variant.
fn gemm_matches_f64_products(ctx: &Context) {
    for (i, &(m, k, n)) in [
        (0, 3, 4),
        (3, 0, 4),
        (3, 4, 0),
        (1, 1, 1),
        (7, 13, 5),
        (63, 65, 64),
        (65, 17, 129),
        (5, 2000, 7),
        (70, 700, 3),
        (200, 150, 90),
    ]
    .iter()
    .enumerate()
    {
        check_gemm::<f32, f32>(ctx, m, k, n, 10 * i as u64);
    }
    for (m, k, n) in [(7, 13, 5), (65, 130, 33), (5, 1500, 3)] {
        check_gemm::<f16, f32>(ctx, m, k, n, 7);
        check_gemm::<bf16, f32>(ctx, m, k, n, 8);
        check_gemm::<f32, bf16>(ctx, m, k, n, 9);
        check_gemm::<f16, f16>(ctx, m, k, n, 11);
    }
}

fn gemm_rejects_bad_input_and_ignores_c_when_beta_is_zero(ctx: &Context) {
    let a = upload::<f32>(ctx, &random(3, 4, 1).to_f32());
    let b = upload::<f32>(ctx, &random(4, 2, 2).to_f32());
    let mut c = upload::<f32>(ctx, &Mat::from_fn(3, 2, |_, _| f32::NAN).unwrap());
    assert!(matches!(
        gemm(ctx, 1.0, &a, Transpose::Yes, &b, Transpose::No, 0.0, &mut c),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut wrong_c = GpuTensor::<f32>::zeros(ctx, 2, 3).unwrap();
    assert!(matches!(
        gemm(
            ctx,
            1.0,
            &a,
            Transpose::No,
            &b,
            Transpose::No,
            0.0,
            &mut wrong_c
        ),
        Err(Error::ShapeMismatch { what: "c", .. })
    ));
    for (alpha, beta) in [(f32::NAN, 0.0), (1.0, f32::INFINITY)] {
        assert!(matches!(
            gemm(
                ctx,
                alpha,
                &a,
                Transpose::No,
                &b,
                Transpose::No,
                beta,
                &mut c
            ),
            Err(Error::InvalidParam { .. })
        ));
    }
    gemm(ctx, 1.0, &a, Transpose::No, &b, Transpose::No, 0.0, &mut c).unwrap();
    assert!(
        c.to_vec_blocking(ctx)
            .unwrap()
            .iter()
            .all(|v| v.is_finite())
    );
    ctx.check().unwrap();
}

fn check_projection<X: GpuElement>(ctx: &Context, m: usize, n: usize, r: usize, seed: u64) {
    let q = householder_qr_ref(random(m, r, seed).as_ref())
        .unwrap()
        .q
        .to_f32();
    let x = random(m, n, seed + 1).to_f32();
    let x_rounded: Vec<X> = x.as_slice().iter().map(|&v| X::from_f32(v)).collect();
    let x_view = MatRef::from_slice(&x_rounded, m, n).unwrap();
    let x_norm = rounded::<X>(&x).frobenius_norm();
    let (q_gpu, x_gpu) = (upload::<f32>(ctx, &q), upload::<X>(ctx, &x));
    for out_of in [true, false] {
        let mut out = upload::<f32>(ctx, &Mat::from_fn(m, n, |_, _| f32::NAN).unwrap());
        let mut expect = vec![0.0f32; m * n];
        let e = MatMut::from_slice(&mut expect, m, n).unwrap();
        if out_of {
            project_out(ctx, &q_gpu, &x_gpu, &mut out).unwrap();
            project_out_ref(q.as_ref(), x_view, e).unwrap();
        } else {
            project_onto(ctx, &q_gpu, &x_gpu, &mut out).unwrap();
            project_onto_ref(q.as_ref(), x_view, e).unwrap();
        }
        let got = out.to_vec_blocking(ctx).unwrap();
        let error = got
            .iter()
            .zip(&expect)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        assert_within(
            &format!("{:?} projection (out: {out_of}) {m}x{n} r {r}", X::DTYPE),
            error,
            factorisation_tolerance(m, n) * x_norm.max(f64::MIN_POSITIVE),
        );
    }
}

fn projections_match_the_reference(ctx: &Context) {
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
        check_projection::<f32>(ctx, m, n, r, 60 + i as u64);
        check_projection::<bf16>(ctx, m, n, r, 70 + i as u64);
    }
    let q = GpuTensor::<f32>::zeros(ctx, 4, 2).unwrap();
    let x = GpuTensor::<f32>::zeros(ctx, 5, 3).unwrap();
    let mut out = GpuTensor::<f32>::zeros(ctx, 5, 3).unwrap();
    assert!(matches!(
        project_out(ctx, &q, &x, &mut out),
        Err(Error::ShapeMismatch { what: "q", .. })
    ));
}

const QR_SHAPES: [(usize, usize); 12] = [
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

fn householder_qr_is_backward_stable_on_hard_matrices(ctx: &Context) {
    for (i, &(m, n)) in QR_SHAPES.iter().enumerate() {
        for (kind, a) in hard_matrices(m, n, i as u64) {
            let qr = block_on(householder_qr(ctx, &upload::<f32>(ctx, &a))).unwrap();
            check_qr(&format!("GPU QR of {kind}"), &a, &qr);
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
    // Inputs of any element type, widened exactly.
    let a = random(50, 6, 3).to_f32();
    let qr = block_on(householder_qr(ctx, &upload::<bf16>(ctx, &a))).unwrap();
    check_qr("GPU QR of bf16", &rounded::<bf16>(&a).to_f32(), &qr);
    // Huge columns do not overflow the norm (it is scaled).
    let huge = Mat::from_fn(20, 3, |i, j| 1e30 * a.at(i, j)).unwrap();
    check_qr(
        "GPU QR of 1e30",
        &huge,
        &block_on(householder_qr(ctx, &upload::<f32>(ctx, &huge))).unwrap(),
    );
    let mut nan = a.clone();
    *nan.at_mut(7, 2) = f32::NAN;
    assert_eq!(
        block_on(householder_qr(ctx, &upload::<f32>(ctx, &nan))),
        Err(Error::NonFinite {
            what: "a",
            index: 7 * 6 + 2
        })
    );
}

fn randomized_svd_is_near_optimal(ctx: &Context) {
    for (m, n, r) in [(300, 200, 10), (150, 400, 16), (64, 64, 64)] {
        let k = m.min(n);
        let spectrum: Vec<f64> = (0..k).map(|i| 1.0 / (1.0 + i as f64).powf(1.5)).collect();
        let a = with_spectrum(m, n, &spectrum, 5).to_f32();
        let svd = block_on(randomized_svd(
            ctx,
            &upload::<f32>(ctx, &a),
            RsvdParams::new(r),
        ))
        .unwrap();
        check_truncated_svd("GPU rSVD", &a, &svd, r);
    }
    // Rank-deficient: more probes than the rank, so the bases have dependent columns.
    let low = with_spectrum(80, 60, &[3.0, 1.0], 9).to_f32();
    let params = RsvdParams::new(6).with_power_iterations(3);
    let svd = block_on(randomized_svd(ctx, &upload::<f32>(ctx, &low), params)).unwrap();
    check_truncated_svd("GPU rSVD of rank 2", &low, &svd, 6);
    let a = GpuTensor::<f32>::zeros(ctx, 10, 8).unwrap();
    for bad in [
        RsvdParams::new(0),
        RsvdParams::new(9),
        RsvdParams::new(2).with_power_iterations(65),
    ] {
        assert!(matches!(
            block_on(randomized_svd(ctx, &a, bad)),
            Err(Error::InvalidParam { .. })
        ));
    }
    let mut nan = random(10, 8, 1).to_f32();
    *nan.at_mut(3, 3) = f32::INFINITY;
    assert_eq!(
        block_on(randomized_svd(
            ctx,
            &upload::<f32>(ctx, &nan),
            RsvdParams::new(2)
        )),
        Err(Error::NonFinite {
            what: "a",
            index: 27
        })
    );
}

fn lora_extraction_matches_the_reference(ctx: &Context) {
    let spectrum: Vec<f64> = (0..40).map(|i| 0.8f64.powi(i)).collect();
    let delta = with_spectrum(90, 40, &spectrum, 12).to_f32();
    let lora = block_on(lora_extract_randomized(
        ctx,
        &upload::<f32>(ctx, &delta),
        RsvdParams::new(7),
    ))
    .unwrap();
    let expect = lora_extract_ref(delta.as_ref(), LoraRank::Fixed(7)).unwrap();
    let ba = widen(&lora.b).matmul(&widen(&lora.a)).unwrap();
    // The randomized range finder captures this fast-decaying spectrum to well within 1 %.
    assert_within(
        "GPU randomized B A",
        ba.distance(&expect.b.matmul(&expect.a).unwrap()).unwrap(),
        0.01 * widen(&delta).frobenius_norm(),
    );
    assert_eq!(lora.singular_values.len(), 7);
}

fn opcm_matches_the_reference(ctx: &Context) {
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
    let (u_gpu, v_gpu, tau_gpu) = (
        upload::<f32>(ctx, &u),
        upload::<f32>(ctx, &v),
        upload::<f32>(ctx, &tau),
    );
    for alpha in [0.0, 0.5, 1.0] {
        let params = OpcmParams::default().with_alpha(alpha);
        let mut out = GpuTensor::<f32>::zeros(ctx, m, n).unwrap();
        let merged = GpuSvdRef {
            u: &u_gpu,
            s: &s,
            v: &v_gpu,
        };
        opcm_project(ctx, merged, &tau_gpu, params, &mut out).unwrap();
        let got = Mat::from_fn(m, n, {
            let got = out.to_vec_blocking(ctx).unwrap();
            move |i, j| f64::from(got[i * n + j])
        })
        .unwrap();
        let reference = SvdRef {
            u: u.as_ref(),
            s: &s,
            v: v.as_ref(),
        };
        let expect = opcm_project_ref(reference, tau.as_ref(), params).unwrap();
        assert_within(
            &format!("GPU OPCM alpha {alpha}"),
            got.distance(&expect).unwrap(),
            factorisation_tolerance(m, n) * widen(&tau).frobenius_norm(),
        );
    }
    let mut out = GpuTensor::<f32>::zeros(ctx, m, n).unwrap();
    let short = GpuSvdRef {
        u: &u_gpu,
        s: &s[1..],
        v: &v_gpu,
    };
    assert!(matches!(
        opcm_project(ctx, short, &tau_gpu, OpcmParams::default(), &mut out),
        Err(Error::LengthMismatch { what: "s", .. })
    ));
    let merged = GpuSvdRef {
        u: &u_gpu,
        s: &s,
        v: &v_gpu,
    };
    assert!(matches!(
        opcm_project(
            ctx,
            merged,
            &tau_gpu,
            OpcmParams::default().with_alpha(1.5),
            &mut out
        ),
        Err(Error::InvalidParam { name: "alpha", .. })
    ));
    let mut wrong = GpuTensor::<f32>::zeros(ctx, n, m).unwrap();
    assert!(matches!(
        opcm_project(ctx, merged, &tau_gpu, OpcmParams::default(), &mut wrong),
        Err(Error::ShapeMismatch { what: "out", .. })
    ));
}

gpu_tests!(
    gemm_matches_f64_products,
    gemm_rejects_bad_input_and_ignores_c_when_beta_is_zero,
    projections_match_the_reference,
    householder_qr_is_backward_stable_on_hard_matrices,
    randomized_svd_is_near_optimal,
    lora_extraction_matches_the_reference,
    opcm_matches_the_reference,
);
