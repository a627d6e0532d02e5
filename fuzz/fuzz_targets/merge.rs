//! The merge reductions and DARE on every instruction set against the references: model counts
//! 0 to 6, weights and scalars of every kind, values with specials. Fisher merging is bit for
//! bit; TIES election within `ties_tolerance` (its sign exact); the sums within
//! `reduction_tolerance`; DARE's survivors exactly.
#![no_main]

use arbitrary::Unstructured;
use kernels_core::ops::merge::{
    dare_ref, fisher_merge_ref, sum_squares_ref, task_arithmetic_ref, ties_elect_ref,
    weighted_mean_ref,
};
use kernels_cpu::merge::{SUM_SQUARES_RELATIVE_TOLERANCE, reduction_tolerance, ties_tolerance};
use kernels_cpu::prelude::*;
use kernels_fuzz::{MergeCase, assert_close, assert_same_outcome, backends, within_f32};
use libfuzzer_sys::fuzz_target;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter()
        .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
        .collect()
}

fn run(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let MergeCase {
        n,
        models,
        fishers,
        weights,
        base,
        lambda,
        floor,
        drop,
        first_index,
    } = MergeCase::new(u)?;
    let count = models.len();
    let views: Vec<&[f32]> = models.iter().map(Vec::as_slice).collect();
    let fisher_views: Vec<&[f32]> = fishers.iter().map(Vec::as_slice).collect();
    let abs = |j: usize, w: &[f32]| -> f64 {
        views
            .iter()
            .zip(w)
            .map(|(m, &w)| (f64::from(w) * f64::from(m[j])).abs())
            .sum()
    };
    let weight_sum: f64 = weights.iter().map(|&w| f64::from(w)).sum();

    let mut expect_mean = vec![0.0f32; n];
    let expect_mean_r = weighted_mean_ref(&views, &weights, &mut expect_mean);
    let mut expect_ta = vec![0.0f32; n];
    let expect_ta_r = task_arithmetic_ref(&base, &views, &weights, lambda, &mut expect_ta);
    let mut expect_ties = vec![0.0f32; n];
    let expect_ties_r = ties_elect_ref(&base, &views, &weights, lambda, &mut expect_ties);
    let fisher_params = FisherParams::default().with_floor(floor);
    let mut expect_fisher = vec![0.0f32; n];
    let expect_fisher_r = fisher_merge_ref(
        &views,
        &fisher_views,
        &weights,
        fisher_params,
        &mut expect_fisher,
    );
    let dare_params = DareParams::default()
        .with_drop(drop)
        .with_seed(first_index ^ 7);
    let mut expect_dare = vec![0.0f32; n];
    let expect_dare_r = dare_ref(&base, dare_params, first_index, &mut expect_dare);
    let expect_squares = sum_squares_ref(&base);

    for cpu in backends() {
        let mut out = vec![f32::NAN; n];
        let got = weighted_mean(&cpu, &views, &weights, &mut out);
        assert_same_outcome("weighted_mean", &got, &expect_mean_r);
        if got.is_ok() {
            assert_close("weighted_mean", &out, &expect_mean, |j| {
                let a = abs(j, &weights) / weight_sum;
                within_f32(abs(j, &weights), reduction_tolerance(count, a))
            });
        }
        let got = task_arithmetic(&cpu, &base, &views, &weights, lambda, &mut out);
        assert_same_outcome("task_arithmetic", &got, &expect_ta_r);
        if got.is_ok() {
            assert_close("task_arithmetic", &out, &expect_ta, |j| {
                let a = f64::from(base[j]).abs() + f64::from(lambda).abs() * abs(j, &weights);
                within_f32(abs(j, &weights).max(a), reduction_tolerance(count, a))
            });
        }
        let got = ties_elect(&cpu, &base, &views, &weights, lambda, &mut out);
        assert_same_outcome("ties_elect", &got, &expect_ties_r);
        if got.is_ok() {
            // The reference's elected sign, values within `ties_tolerance` (the agreeing mean is
            // at most the largest entry); an element with a non-finite scale takes the reference's
            // own arithmetic: exact.
            assert_close("ties_elect", &out, &expect_ties, |j| {
                let largest = views
                    .iter()
                    .map(|m| f64::from(m[j]).abs())
                    .fold(0.0, f64::max);
                let scale = f64::from(base[j]).abs() + f64::from(lambda).abs() * largest;
                let tolerance = ties_tolerance(count, scale);
                Some(if tolerance.is_finite() {
                    tolerance
                } else {
                    0.0
                })
            });
        }
        let got = fisher_merge(
            &cpu,
            &views,
            &fisher_views,
            &weights,
            fisher_params,
            &mut out,
        );
        assert_same_outcome("fisher_merge", &got, &expect_fisher_r);
        if got.is_ok() {
            assert_eq!(
                bits(&out),
                bits(&expect_fisher),
                "fisher_merge {}",
                cpu.isa()
            );
        }
        let got = dare(&cpu, &base, dare_params, first_index, &mut out);
        assert_same_outcome("dare", &got, &expect_dare_r);
        if got.is_ok() {
            for (g, e) in out.iter().zip(&expect_dare) {
                assert_eq!(*g == 0.0, *e == 0.0, "dare: survivors");
            }
        }
        let got = sum_squares(&cpu, &base).unwrap();
        assert!(
            (got.is_nan() && expect_squares.is_nan())
                || got == expect_squares
                || (got - expect_squares).abs() <= SUM_SQUARES_RELATIVE_TOLERANCE * expect_squares,
            "sum_squares {}: {got:e} vs {expect_squares:e}",
            cpu.isa()
        );
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
