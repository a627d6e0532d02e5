//! The GPU's element-wise families (weighted mean, task arithmetic, TIES election, Fisher
//! merging, DARE, sums of squares) on lavapipe against the references: `f32`, `f16` and `bf16`
//! inputs of any bits, model counts 0 to 6 (so more than one pass), weights and scalars of every
//! kind. Error for error; values within the GPU's `reduction_tolerance`; DARE's survivors exactly;
//! TIES wherever the reference's election is clear of rounding (the GPU elects from an `f32` sum).
//! Needs a Vulkan adapter (Mesa's lavapipe in CI); run with `-detect_leaks=0`, since the driver
//! keeps allocations for the life of the process.
#![no_main]

use std::sync::LazyLock;

use arbitrary::Unstructured;
use kernels_core::backend::ties_sign;
use kernels_core::ops::merge::{
    dare_ref, fisher_merge_ref, sum_squares_ref, task_arithmetic_ref, ties_elect_ref,
    weighted_mean_ref,
};
use kernels_fuzz::{MergeCase, assert_close, assert_same_outcome, within_f32};
use kernels_wgpu::masks::DARE_RELATIVE_TOLERANCE;
use kernels_wgpu::merge::{SUM_SQUARES_RELATIVE_TOLERANCE, reduction_tolerance};
use kernels_wgpu::prelude::*;
use libfuzzer_sys::fuzz_target;

static CTX: LazyLock<Context> = LazyLock::new(|| {
    Context::new_blocking(ContextOptions::default())
        .expect("a GPU adapter (Mesa's lavapipe: mesa-vulkan-drivers)")
});

const U: f64 = f32::EPSILON as f64 / 2.0;

fn upload<T: GpuElement>(data: &[T]) -> GpuTensor<T> {
    GpuTensor::from_slice(&CTX, data).expect("a tensor of at most a few hundred elements")
}

fn download(t: &GpuTensor<f32>) -> Vec<f32> {
    t.to_vec_blocking(&CTX).expect("lavapipe stays usable")
}

/// Whether the GPU may refuse a call whose exact coefficients are `exact`: one of them is not
/// zero and outside `f32`'s normal range.
fn outside_f32(exact: impl IntoIterator<Item = f64>) -> bool {
    exact
        .into_iter()
        .any(|c| c != 0.0 && !(c as f32).is_normal())
}

/// The GPU's outcome against the reference's: the same, or a refusal where a coefficient is
/// outside `f32`'s normal range. Whether there is a result to compare.
fn compare_outcome<R: core::fmt::Debug>(
    op: &str,
    got: &kernels_core::Result<()>,
    expect: &kernels_core::Result<R>,
    coefficients: impl FnOnce() -> Vec<f64>,
) -> bool {
    if matches!(got, Err(Error::Unsupported { .. })) && expect.is_ok() {
        let coefficients = coefficients();
        assert!(
            outside_f32(coefficients.iter().copied()),
            "{op}: refused {coefficients:?}"
        );
        return false;
    }
    assert_same_outcome(op, got, expect);
    got.is_ok()
}

fn run<T: GpuElement>(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
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
    let convert = |v: Vec<f32>| -> Vec<T> { v.into_iter().map(T::from_f32).collect() };
    let (models, base): (Vec<Vec<T>>, Vec<T>) =
        (models.into_iter().map(convert).collect(), convert(base));
    let views: Vec<&[T]> = models.iter().map(Vec::as_slice).collect();
    let fisher_views: Vec<&[f32]> = fishers.iter().map(Vec::as_slice).collect();
    let gpu_models: Vec<GpuTensor<T>> = models.iter().map(|m| upload(m)).collect();
    let gpu_models: Vec<&GpuTensor<T>> = gpu_models.iter().collect();
    let gpu_fishers: Vec<GpuTensor<f32>> = fishers.iter().map(|f| upload(f)).collect();
    let gpu_fishers: Vec<&GpuTensor<f32>> = gpu_fishers.iter().collect();
    let gpu_base = upload(&base);
    let mut out = GpuTensor::<f32>::zeros(&CTX, n, 1).expect("a small tensor");
    let mut expect = vec![0.0f32; n];
    let at = |m: &[T], j: usize| f64::from(m[j].to_f32());
    // `sum_i |w_i m_i[j]|` over the models.
    let abs = |j: usize, w: &[f32]| -> f64 {
        views
            .iter()
            .zip(w)
            .map(|(m, &w)| (f64::from(w) * at(m, j)).abs())
            .sum()
    };
    let weight_sum: f64 = weights.iter().map(|&w| f64::from(w)).sum();

    let expect_r = weighted_mean_ref(&views, &weights, &mut expect);
    let got = weighted_mean(&CTX, &gpu_models, &weights, &mut out);
    let means = || weights.iter().map(|&w| f64::from(w) / weight_sum).collect();
    if compare_outcome("weighted_mean", &got, &expect_r, means) {
        assert_close("weighted_mean", &download(&out), &expect, |j| {
            let a = abs(j, &weights) / weight_sum;
            within_f32(abs(j, &weights), reduction_tolerance(count, a))
        });
    }

    let expect_r = task_arithmetic_ref(&base, &views, &weights, lambda, &mut expect);
    let got = task_arithmetic(&CTX, &gpu_base, &gpu_models, &weights, lambda, &mut out);
    let scaled = || {
        weights
            .iter()
            .map(|&w| f64::from(lambda) * f64::from(w))
            .collect()
    };
    if compare_outcome("task_arithmetic", &got, &expect_r, scaled) {
        assert_close("task_arithmetic", &download(&out), &expect, |j| {
            let a = at(&base, j).abs() + f64::from(lambda).abs() * abs(j, &weights);
            within_f32(abs(j, &weights).max(a), reduction_tolerance(count + 1, a))
        });
    }

    let expect_r = ties_elect_ref(&base, &views, &weights, lambda, &mut expect);
    let got = ties_elect(&CTX, &gpu_base, &gpu_models, &weights, lambda, &mut out);
    // The GPU scales the largest weight into [1/2, 1): no coefficient is below half its ratio
    // to it, and none of the GPU's terms is larger than the reference's over `largest`.
    let largest = weights.iter().fold(0.0f64, |a, &w| a.max(f64::from(w)));
    let relative = || {
        weights
            .iter()
            .map(|&w| f64::from(w) / largest / 2.0)
            .collect()
    };
    if compare_outcome("ties_elect", &got, &expect_r, relative) {
        assert_close("ties_elect", &download(&out), &expect, |j| {
            let sum: f64 = views
                .iter()
                .zip(&weights)
                .map(|(m, &w)| f64::from(w) * at(m, j))
                .sum();
            let spread = abs(j, &weights);
            // The GPU's terms carry the weights over a power of two in [largest, 2 largest):
            // one under `normal` (2^-126 there) may flush or round in absolute terms.
            let normal = 2.0 * largest * f64::from(f32::MIN_POSITIVE);
            // An election the f32 sum may decide otherwise is not asserted.
            if !sum.is_finite()
                || sum.abs() <= 2.0 * (count as f64 + 2.0) * U * spread + count as f64 * normal
            {
                return None;
            }
            let elected = ties_sign(sum);
            let (mut num, mut den, mut subnormal) = (0.0, 0.0, 0.0);
            for (m, &w) in views.iter().zip(&weights) {
                if ties_sign(at(m, j)) == elected {
                    let term = (f64::from(w) * at(m, j)).abs();
                    num += term;
                    den += f64::from(w);
                    if term < normal {
                        subnormal += 1.0;
                    }
                }
            }
            let a = at(&base, j).abs() + f64::from(lambda).abs() * num / den;
            // Each such term: |lambda| 2^-126 over the agreeing scaled weights' sum.
            let flushed = f64::from(lambda).abs() * subnormal * normal / den;
            within_f32(
                (spread / largest).max(a).max(den / largest),
                reduction_tolerance(count + 1, a) + flushed,
            )
        });
    }

    let params = FisherParams::default().with_floor(floor);
    let expect_r = fisher_merge_ref(&views, &fisher_views, &weights, params, &mut expect);
    let got = fisher_merge(&CTX, &gpu_models, &gpu_fishers, &weights, params, &mut out);
    if compare_outcome("fisher_merge", &got, &expect_r, means) {
        assert_close("fisher_merge", &download(&out), &expect, |j| {
            // The sums the GPU keeps in f32, with the weights it uses (over their sum).
            let (mut num, mut den, mut plain, mut lost) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
            for ((m, f), &w) in views.iter().zip(&fisher_views).zip(&weights) {
                let (w, f) = (f64::from(w) / weight_sum, f64::from(f[j].max(floor)));
                num += (w * f * at(m, j)).abs();
                den += w * f;
                plain += (w * at(m, j)).abs();
                // A weight-Fisher product below f32's normal range may flush, term and all.
                if w * f < f64::from(f32::MIN_POSITIVE) {
                    lost += (w * f * at(m, j)).abs() + w * f;
                }
            }
            // A denominator below f32's normal range may be zero on the GPU: either mean.
            if den > 0.0 && den < (count + 1) as f64 * f64::from(f32::MIN_POSITIVE) {
                return None;
            }
            let a = if den > 0.0 { num / den } else { plain };
            // Terms below f32's normal range may flush, and the quotient scales what they lose.
            let flushed = if den > 0.0 {
                ((count + 1) as f64 * f64::from(f32::MIN_POSITIVE) * (1.0 + a) + lost * (1.0 + a))
                    / den
            } else {
                0.0
            };
            within_f32(
                num.max(den).max(plain),
                reduction_tolerance(count, a) + flushed,
            )
        });
    }

    let params = DareParams::default()
        .with_drop(drop)
        .with_seed(first_index ^ 7);
    let expect_r = dare_ref(&base, params, first_index, &mut expect);
    let got = block_on(dare(&CTX, &gpu_base, params, first_index, &mut out));
    assert_same_outcome("dare", &got, &expect_r);
    if got.is_ok() {
        for (j, (g, e)) in download(&out).iter().zip(&expect).enumerate() {
            // A subnormal survivor rounds in absolute terms.
            assert_eq!(*g == 0.0, *e == 0.0, "dare: survivor {j}: {g:e} vs {e:e}");
            let tolerance =
                DARE_RELATIVE_TOLERANCE * f64::from(e.abs()) + f64::from(f32::from_bits(1));
            assert!(
                e.is_nan() && g.is_nan()
                    || g == e
                    || (f64::from(*g) - f64::from(*e)).abs() <= tolerance,
                "dare {j}: {g:e} vs {e:e}"
            );
        }
    }

    let expect = sum_squares_ref(&base);
    let got = block_on(sum_squares(&CTX, &gpu_base)).expect("any tensor has a sum of squares");
    assert!(
        (got.is_nan() && expect.is_nan())
            || got == expect
            || (got - expect).abs() <= SUM_SQUARES_RELATIVE_TOLERANCE * expect,
        "sum_squares: {got:e} vs {expect:e}"
    );
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = match u.int_in_range(0..=2u8) {
        Ok(0) => run::<f32>(&mut u),
        Ok(1) => run::<f16>(&mut u),
        _ => run::<bf16>(&mut u),
    };
});
