//! The reduction test bodies every backend runs: weighted mean, task arithmetic and Fisher
//! accumulation over lengths, model counts and element types, against the reference within the
//! backend's tolerance; chunking never changes a bit, nor does the backend's alternate
//! configuration.

use half::{bf16, f16};
use kernels_core::backend::ties_sign;
use kernels_core::ops::merge::{
    TiesElection, fisher_accumulate_ref, task_arithmetic_ref, weighted_mean_ref,
};
use kernels_core::{Element, Result};

use crate::{assert_close, bits, normal};

/// A backend's reductions on host slices, and its tolerance.
pub trait ReduceBackend<T>: Sized {
    /// For failure messages.
    fn name(&self) -> String;
    /// `out = sum w_i theta_i / sum w_i`.
    fn weighted_mean(&self, models: &[&[T]], weights: &[f32], out: &mut [f32]) -> Result<()>;
    /// `out = base + lambda * sum w_i tau_i`.
    fn task_arithmetic(
        &self,
        base: &[T],
        taus: &[&[T]],
        weights: &[f32],
        lambda: f32,
        out: &mut [f32],
    ) -> Result<()>;
    /// `fisher += scale * grad^2`.
    fn fisher_accumulate(&self, fisher: &mut [f32], grad: &[T], scale: f32) -> Result<()>;
    /// The bound on an output of `terms` terms of absolute sum `abs_sum`.
    fn tolerance(&self, terms: usize, abs_sum: f64) -> f64;
    /// Another configuration that must give the same bits (the CPU on one thread), if any.
    fn alternate(&self) -> Option<Self>;
}

/// The scale of TIES election's rounding at element `j`: `|base_j| + |lambda| |combined_j|`, where
/// `combined_j` combines (under `rule`) the magnitudes of the entries that agree with the
/// reference's elected sign. Every backend's TIES bound is a multiple of it.
pub fn ties_scale<T: Element>(
    base: &[T],
    taus: &[&[T]],
    weights: &[f32],
    lambda: f32,
    rule: TiesElection,
    j: usize,
) -> f64 {
    let value = |t: &&[T]| f64::from(t[j].to_f32());
    let elected = rule.elect(
        taus.iter()
            .zip(weights)
            .map(|(t, &w)| f64::from(w) * value(t))
            .sum(),
    );
    let (mut num, mut den) = (0.0, 0.0);
    for (t, &w) in taus.iter().zip(weights) {
        if elected != 0.0 && ties_sign(value(t)) == elected {
            num += f64::from(w) * value(t).abs();
            den += f64::from(w);
        }
    }
    f64::from(base[j].to_f32()).abs() + f64::from(lambda).abs() * rule.combine(num, den).abs()
}

/// Lengths every reduction is tried on: empty, one, around every vector width, past a GPU
/// tile, and 5000 (a thousand 5-wide rows: several pages on a paged GPU context).
pub const LENGTHS: [usize; 11] = [0, 1, 3, 15, 16, 17, 63, 65, 1000, 4097, 5000];

/// Model counts: one, a few, and past one GPU pass of four (with a last pass of one).
pub const MODEL_COUNTS: [usize; 6] = [1, 2, 3, 5, 8, 9];

/// The three reductions of `models` random tensors of length `n`.
pub fn check_reductions<T: Element, B: ReduceBackend<T>>(
    backend: &B,
    n: usize,
    models: usize,
    seed: u64,
) {
    let data: Vec<Vec<T>> = (0..models)
        .map(|i| normal::<T>(n, seed + i as u64))
        .collect();
    let views: Vec<&[T]> = data.iter().map(Vec::as_slice).collect();
    let weights: Vec<f32> = (0..models).map(|i| 0.5 + i as f32).collect();
    let sum: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    let abs = |j: usize| {
        views
            .iter()
            .zip(&weights)
            .map(|(m, &w)| (f64::from(w) * f64::from(m[j].to_f32())).abs())
            .sum::<f64>()
    };

    let (mut got, mut expect) = (vec![f32::NAN; n], vec![0.0; n]);
    backend.weighted_mean(&views, &weights, &mut got).unwrap();
    weighted_mean_ref(&views, &weights, &mut expect).unwrap();
    let what = format!(
        "weighted mean {:?} n={n} N={models} {}",
        T::DTYPE,
        backend.name()
    );
    assert_close(&what, &got, &expect, |j| {
        backend.tolerance(models, abs(j) / sum)
    });
    // Two chunks give the same bits as the whole.
    let split = n / 3;
    let mut chunked = vec![0.0; n];
    let (a, b) = chunked.split_at_mut(split);
    let heads: Vec<&[T]> = views.iter().map(|m| &m[..split]).collect();
    let tails: Vec<&[T]> = views.iter().map(|m| &m[split..]).collect();
    backend.weighted_mean(&heads, &weights, a).unwrap();
    backend.weighted_mean(&tails, &weights, b).unwrap();
    assert_eq!(bits(&chunked), bits(&got), "{what}: chunking changed a bit");

    let base = normal::<T>(n, seed + 100);
    let signed: Vec<f32> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| if i % 2 == 1 { -w } else { *w })
        .collect();
    backend
        .task_arithmetic(&base, &views, &signed, 0.3, &mut got)
        .unwrap();
    task_arithmetic_ref(&base, &views, &signed, 0.3, &mut expect).unwrap();
    assert_close(&format!("task arithmetic {what}"), &got, &expect, |j| {
        backend.tolerance(models, f64::from(base[j].to_f32()).abs() + 0.3 * abs(j))
    });
    if let Some(alternate) = backend.alternate() {
        let mut again = vec![0.0; n];
        alternate
            .task_arithmetic(&base, &views, &signed, 0.3, &mut again)
            .unwrap();
        assert_eq!(
            bits(&again),
            bits(&got),
            "{what}: the configuration changed a bit"
        );
    }

    let mut fisher: Vec<f32> = normal::<f32>(n, seed + 200)
        .iter()
        .map(|v| v.abs())
        .collect();
    let mut fisher_ref = fisher.clone();
    let scale_abs: Vec<f64> = fisher
        .iter()
        .zip(views[0])
        .map(|(f, g)| f64::from(*f) + 0.7 * f64::from(g.to_f32()).powi(2))
        .collect();
    backend
        .fisher_accumulate(&mut fisher, views[0], 0.7)
        .unwrap();
    fisher_accumulate_ref(&mut fisher_ref, views[0], 0.7).unwrap();
    assert_close(
        &format!("fisher accumulate {what}"),
        &fisher,
        &fisher_ref,
        |j| backend.tolerance(2, scale_abs[j]),
    );
}

/// Every length, model count and element type.
pub fn every_length_model_count_and_type<B>(backend: &B)
where
    B: ReduceBackend<f32> + ReduceBackend<f16> + ReduceBackend<bf16>,
{
    for (k, &n) in LENGTHS.iter().enumerate() {
        for models in MODEL_COUNTS {
            let seed = (k * 10 + models) as u64;
            check_reductions::<f32, B>(backend, n, models, seed);
            check_reductions::<f16, B>(backend, n, models, seed);
            check_reductions::<bf16, B>(backend, n, models, seed);
        }
    }
}

/// NaN and infinite data propagate through a mean.
pub fn non_finite_data_propagates<B: ReduceBackend<f32>>(backend: &B) {
    let a = [1.0f32, f32::NAN, 3.0, f32::INFINITY].repeat(5);
    let b = [1.0f32; 20];
    let mut out = [0.0; 20];
    backend
        .weighted_mean(&[&a, &b], &[1.0, 1.0], &mut out)
        .unwrap();
    for (o, v) in out.iter().zip(&a) {
        assert_eq!(o.is_nan(), v.is_nan());
        assert_eq!(o.is_infinite(), v.is_infinite());
    }
}
