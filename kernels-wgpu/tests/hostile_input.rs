//! Regression tests for hostile GPU arguments (issue 13): sizes that overflow or would hang,
//! dispatches beyond the device's grid, empty strided views, and a NaN or a vanishing weight in
//! Fisher merging. Each must be a clear error or the reference's answer, and leave the context
//! usable.

use kernels_core::ops::merge::{fisher_merge_ref, sum_squares_ref, ties_elect_ref};
use kernels_testkit::gpu::{Variant, run_on};
use kernels_testkit::gpu_tests;
use kernels_wgpu::merge::{SUM_SQUARES_RELATIVE_TOLERANCE, reduction_tolerance};
use kernels_wgpu::prelude::*;

/// Still answers after whatever was refused.
fn still_usable(ctx: &Context) {
    let x = GpuTensor::from_slice(ctx, &[1.0f32, 2.0]).unwrap();
    assert_eq!(x.to_vec_blocking(ctx).unwrap(), [1.0, 2.0]);
}

fn sizes_that_overflow_or_would_hang(ctx: &Context) {
    for (rows, cols) in [
        (0, usize::MAX),
        (usize::MAX, 0),
        (usize::MAX, 2),
        (1 << 33, 0),
    ] {
        let got = GpuTensor::<f32>::zeros(ctx, rows, cols);
        assert!(
            matches!(got, Err(Error::TooLarge { .. })),
            "{rows} x {cols}: {:?}",
            got.map(|t| t.shape())
        );
    }
    let empty = GpuTensor::<f32>::zeros(ctx, 5, 0).unwrap();
    assert_eq!((empty.shape(), empty.len()), ([5, 0], 0));
    still_usable(ctx);
}

fn empty_strided_views_upload(ctx: &Context) {
    let buffer = [1.0f32; 8];
    for view in [
        MatRef::new(&buffer, 3, 0, 5).unwrap(),
        MatRef::new(&[], 0, 3, 1000).unwrap(),
        MatRef::from_slice(&buffer, 2, 4)
            .unwrap()
            .submatrix(2, 1, 0, 3)
            .unwrap(),
    ] {
        let t = GpuTensor::from_matrix(ctx, view).unwrap();
        assert_eq!(t.shape(), view.shape());
        assert!(t.to_vec_blocking(ctx).unwrap().is_empty());
    }
    // A GEMV over an empty intermediate dimension writes zeros.
    let w = GpuTensor::<f32>::zeros(ctx, 3, 0).unwrap();
    let x = GpuTensor::<f32>::zeros(ctx, 0, 1).unwrap();
    let mut y = GpuTensor::from_slice(ctx, &[7.0f32; 3]).unwrap();
    gemv(ctx, &w, &x, &mut y).unwrap();
    assert_eq!(y.to_vec_blocking(ctx).unwrap(), [0.0; 3]);
}

/// 65,537 workgroups along one grid dimension: more than the 65,535 every device allows.
const TOO_LONG: usize = 65_537 * 256;

#[test]
fn dispatches_beyond_the_grid_are_refused_up_front() {
    run_on(Variant::Portable, |ctx| {
        let max = ctx.limits().max_compute_workgroups_per_dimension;
        assert!(
            TOO_LONG / 256 > max as usize,
            "this device's grid is larger"
        );
        let tall = GpuTensor::<f32>::zeros(ctx, TOO_LONG, 1).unwrap();
        let x = GpuTensor::<f32>::zeros(ctx, TOO_LONG, 1).unwrap();
        let mut y = GpuTensor::<f32>::zeros(ctx, 1, 1).unwrap();
        let got = gemv_t(ctx, &tall, &x, &mut y);
        assert!(matches!(got, Err(Error::TooLarge { .. })), "{got:?}");
        still_usable(ctx);
        let wide = GpuTensor::<f32>::zeros(ctx, 1, TOO_LONG).unwrap();
        let x = GpuTensor::from_slice(ctx, &[1.0f32]).unwrap();
        let mut y = GpuTensor::<f32>::zeros(ctx, TOO_LONG, 1).unwrap();
        let got = sparse_input_gemv(ctx, &wide, &x, 0.0, &mut y);
        assert!(matches!(got, Err(Error::TooLarge { .. })), "{got:?}");
        still_usable(ctx);
    });
}

fn fisher_nan_and_vanishing_weights(ctx: &Context) {
    let (a, b) = ([1.0f32, 2.0, 5.0], [3.0f32, 4.0, 7.0]);
    let cases: [([f32; 3], [f32; 3], [f32; 2]); 2] = [
        // A NaN Fisher entry propagates; it does not become the floor.
        ([f32::NAN, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0]),
        // Weights whose sum is below 1 / f32::MAX: the plain mean must not divide by zero.
        ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1e-45, 1e-45]),
    ];
    for (fa, fb, weights) in cases {
        let mut expect = [0.0f32; 3];
        fisher_merge_ref(
            &[&a, &b],
            &[&fa, &fb],
            &weights,
            FisherParams::default(),
            &mut expect,
        )
        .unwrap();
        let up = |v: &[f32]| GpuTensor::from_slice(ctx, v).unwrap();
        let (ga, gb, gfa, gfb) = (up(&a), up(&b), up(&fa), up(&fb));
        let mut out = GpuTensor::<f32>::zeros(ctx, 3, 1).unwrap();
        fisher_merge(
            ctx,
            &[&ga, &gb],
            &[&gfa, &gfb],
            &weights,
            FisherParams::default(),
            &mut out,
        )
        .unwrap();
        let got = out.to_vec_blocking(ctx).unwrap();
        for (g, e) in got.iter().zip(&expect) {
            assert!(
                (g.is_nan() && e.is_nan()) || (g - e).abs() <= 1e-6 * e.abs(),
                "{weights:?}: {got:?} vs {expect:?}"
            );
        }
    }
}

fn sum_squares_keeps_the_range_of_f64(ctx: &Context) {
    for value in [1e20f32, 3e38, 1e-23, 1e-40, f32::from_bits(1), 0.0] {
        for n in [1, 4097, 9000] {
            let mut x = vec![value; n];
            x[n / 2] = 0.0;
            let expect = sum_squares_ref(&x);
            let tensor = GpuTensor::from_slice(ctx, &x).unwrap();
            let got = block_on(sum_squares(ctx, &tensor)).unwrap();
            assert!(
                (got - expect).abs() <= SUM_SQUARES_RELATIVE_TOLERANCE * expect,
                "{value} x {n}: {got:e} vs {expect:e}"
            );
            let bf = GpuTensor::from_slice(
                ctx,
                &x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(),
            )
            .unwrap();
            let bf_expect =
                sum_squares_ref(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>());
            let got = block_on(sum_squares(ctx, &bf)).unwrap();
            assert!(
                (got - bf_expect).abs() <= SUM_SQUARES_RELATIVE_TOLERANCE * bf_expect,
                "bf16 {value} x {n}: {got:e} vs {bf_expect:e}"
            );
        }
    }
    let nan = GpuTensor::from_slice(ctx, &[1.0f32, f32::NAN]).unwrap();
    assert!(block_on(sum_squares(ctx, &nan)).unwrap().is_nan());
}

/// Coefficients outside `f32`'s normal range (`gpu_merge` fuzz findings: a TIES weight of 1e-40
/// lost precision in the GPU's subnormal arithmetic): TIES scales its weights, which changes
/// neither the election nor the mean; the rest refuse what `f32` cannot carry.
fn merge_coefficients_outside_f32(ctx: &Context) {
    let up = |v: &[f32]| GpuTensor::from_slice(ctx, v).unwrap();
    let (base, tau, other) = ([6e-6f32, 1.0], [4.6875f32, -2.0], [1.0f32, 3.0]);
    let (g_base, g_tau, g_other) = (up(&base), up(&tau), up(&other));
    let mut out = GpuTensor::<f32>::zeros(ctx, 2, 1).unwrap();
    for weights in [[1e-40f32, 0.0], [3e38, 1e30], [1e-45, 1e-45]] {
        let mut expect = [0.0f32; 2];
        ties_elect_ref(&base, &[&tau, &other], &weights, 0.5, &mut expect).unwrap();
        ties_elect(ctx, &g_base, &[&g_tau, &g_other], &weights, 0.5, &mut out).unwrap();
        let got = out.to_vec_blocking(ctx).unwrap();
        for (g, e) in got.iter().zip(&expect) {
            assert!(
                f64::from((g - e).abs()) <= reduction_tolerance(2, 2.0 * f64::from(e.abs())),
                "TIES {weights:?}: {got:?} vs {expect:?}"
            );
        }
    }
    // A value near f32::MAX with a tiny weight: the scaled weight stays below 1, so its term
    // stays finite (scaling the largest weight to [1, 2) overflowed it, another finding).
    let big = [3e38f32, 1.0];
    let mut expect = [0.0f32; 2];
    ties_elect_ref(&base, &[&big], &[6e-13], 0.5, &mut expect).unwrap();
    ties_elect(ctx, &g_base, &[&up(&big)], &[6e-13], 0.5, &mut out).unwrap();
    let got = out.to_vec_blocking(ctx).unwrap();
    assert!(
        f64::from((got[0] - expect[0]).abs()) <= reduction_tolerance(1, 1.5e38),
        "{got:?} vs {expect:?}"
    );
    let refused = |got: Result<()>| {
        assert!(matches!(got, Err(Error::Unsupported { .. })), "{got:?}");
    };
    // w / sum w = 1e-39 is subnormal; lambda w = 1e40 overflows.
    refused(weighted_mean(
        ctx,
        &[&g_tau, &g_other],
        &[1.0, 1e-39],
        &mut out,
    ));
    refused(task_arithmetic(
        ctx,
        &g_base,
        &[&g_tau],
        &[1e10],
        1e30,
        &mut out,
    ));
    refused(fisher_merge(
        ctx,
        &[&g_tau, &g_other],
        &[&g_other, &g_other],
        &[1.0, 1e-39],
        FisherParams::default(),
        &mut out,
    ));
    // Zero weights are exact, whatever the others are.
    weighted_mean(ctx, &[&g_tau, &g_other], &[1e-30, 0.0], &mut out).unwrap();
    assert_eq!(out.to_vec_blocking(ctx).unwrap(), tau);
    still_usable(ctx);
}

/// A subnormal agreeing term that a huge `lambda` makes visible (the `gpu_merge` finding
/// `crash-a75d6fbc`: lavapipe kept the term in absolute precision, 8e-5 off relatively): the
/// error stays within the module's `|lambda| 2^-126 / sum c_agreeing` per such term, whether
/// the GPU flushes it or rounds it.
fn ties_subnormal_terms_within_their_absolute_bound(ctx: &Context) {
    let up = |v: &[f32]| GpuTensor::from_slice(ctx, v).unwrap();
    let (base, tau, lambda, weight) = (
        [-1.095_256_7e-18f32],
        [f32::from_bits(23_713)],
        6.947_208e22f32,
        2.0,
    );
    let mut out = GpuTensor::<f32>::zeros(ctx, 1, 1).unwrap();
    let mut expect = [0.0f32];
    ties_elect_ref(&base, &[&tau], &[weight], lambda, &mut expect).unwrap();
    ties_elect(ctx, &up(&base), &[&up(&tau)], &[weight], lambda, &mut out).unwrap();
    let got = out.to_vec_blocking(ctx).unwrap()[0];
    // The weight scales to 1/2: one term, over c = 1/2.
    let bound = f64::from(lambda) * f64::from(f32::MIN_POSITIVE) / 0.5
        + reduction_tolerance(2, f64::from(expect[0].abs()));
    assert!(
        f64::from((got - expect[0]).abs()) <= bound,
        "{got:e} vs {:e} (bound {bound:e})",
        expect[0]
    );
    // A normal term with the same lambda keeps the relative bound.
    let tau = [3.322_899e-31f32];
    ties_elect_ref(&base, &[&tau], &[weight], lambda, &mut expect).unwrap();
    ties_elect(ctx, &up(&base), &[&up(&tau)], &[weight], lambda, &mut out).unwrap();
    let got = out.to_vec_blocking(ctx).unwrap()[0];
    let abs_sum = f64::from(base[0].abs()) + f64::from(lambda) * f64::from(tau[0]);
    assert!(
        f64::from((got - expect[0]).abs()) <= reduction_tolerance(2, abs_sum),
        "{got:e} vs {:e}",
        expect[0]
    );
}

gpu_tests!(
    ties_subnormal_terms_within_their_absolute_bound,
    merge_coefficients_outside_f32,
    sum_squares_keeps_the_range_of_f64,
    sizes_that_overflow_or_would_hang,
    empty_strided_views_upload,
    fisher_nan_and_vanishing_weights,
);
