//! Merge reductions on every ISA, element type and thread count, against the reference; chunking
//! and threading never change a bit.

use half::{bf16, f16};
use kernels_core::ops::merge::{fisher_merge_ref, ties_elect_ref, ties_ref};
use kernels_cpu::merge::reduction_tolerance;
use kernels_cpu::prelude::*;
use kernels_testkit::merge::{
    LENGTHS, MODEL_COUNTS, ReduceBackend, every_length_model_count_and_type,
    non_finite_data_propagates,
};
use kernels_testkit::{bits, isa_tests, normal, sparse_taus};

/// The CPU backend, for the shared bodies.
struct OnCpu(Cpu);

impl<T: Element> ReduceBackend<T> for OnCpu {
    fn name(&self) -> String {
        format!("{:?}", self.0)
    }

    fn weighted_mean(&self, models: &[&[T]], weights: &[f32], out: &mut [f32]) -> Result<()> {
        weighted_mean(&self.0, models, weights, out)
    }

    fn task_arithmetic(
        &self,
        base: &[T],
        taus: &[&[T]],
        weights: &[f32],
        lambda: f32,
        out: &mut [f32],
    ) -> Result<()> {
        task_arithmetic(&self.0, base, taus, weights, lambda, out)
    }

    fn fisher_accumulate(&self, fisher: &mut [f32], grad: &[T], scale: f32) -> Result<()> {
        fisher_accumulate(&self.0, fisher, grad, scale)
    }

    fn tolerance(&self, terms: usize, abs_sum: f64) -> f64 {
        reduction_tolerance(terms, abs_sum)
    }

    /// The thread split never changes a bit.
    fn alternate(&self) -> Option<Self> {
        Some(Self(self.0.with_threads(1).unwrap()))
    }
}

fn shared_reductions(cpu: &Cpu) {
    every_length_model_count_and_type(&OnCpu(*cpu));
}

fn shared_non_finite(cpu: &Cpu) {
    non_finite_data_propagates(&OnCpu(*cpu));
}

fn ties_and_fisher<T: Element>(cpu: &Cpu) {
    for &n in &LENGTHS {
        for models in MODEL_COUNTS {
            let taus: Vec<Vec<T>> = (0..models)
                .map(|i| sparse_taus(n, (n * 10 + i) as u64, i == 1))
                .collect();
            let views: Vec<&[T]> = taus.iter().map(Vec::as_slice).collect();
            let weights: Vec<f32> = (0..models).map(|i| 0.25 + i as f32).collect();
            let base: Vec<T> = normal(n, 77);
            let what = format!("{:?} n={n} N={models} {cpu:?}", T::DTYPE);
            let (mut got, mut expect) = (vec![f32::NAN; n], vec![0.0; n]);
            ties_elect(cpu, &base, &views, &weights, 0.7, &mut got).unwrap();
            ties_elect_ref(&base, &views, &weights, 0.7, &mut expect).unwrap();
            assert_eq!(bits(&got), bits(&expect), "TIES {what}");

            // Fisher diagonals with zeros (the plain-mean fallback), negatives and a NaN.
            let fishers: Vec<Vec<f32>> = (0..models)
                .map(|i| {
                    sparse_taus::<f32>(n, (n * 20 + i) as u64, i == 0)
                        .iter()
                        .map(|v| if i == 2 { -v } else { v.abs() })
                        .collect()
                })
                .collect();
            let fisher_views: Vec<&[f32]> = fishers.iter().map(Vec::as_slice).collect();
            let norms: Vec<f64> = fisher_views
                .iter()
                .map(|f| sum_squares(cpu, f).unwrap().max(1.0))
                .collect();
            let plain = FisherParams::default();
            for params in [
                plain,
                plain.with_floor(1e-3),
                plain.with_normalization(&norms),
            ] {
                fisher_merge(cpu, &views, &fisher_views, &weights, params, &mut got).unwrap();
                fisher_merge_ref(&views, &fisher_views, &weights, params, &mut expect).unwrap();
                assert_eq!(bits(&got), bits(&expect), "Fisher {params:?} {what}");
            }
            // TIES in one call: the trimmed copies stay in `T`, which is exact.
            let params = TiesParams::default()
                .with_keep(KeepRule::Density(0.3))
                .with_lambda(0.7);
            let finite: Vec<Vec<T>> = (0..models)
                .map(|i| sparse_taus(n, (n * 30 + i) as u64, false))
                .collect();
            let finite: Vec<&[T]> = finite.iter().map(Vec::as_slice).collect();
            ties(cpu, &base, &finite, &weights, params, &mut got).unwrap();
            ties_ref(&base, &finite, &weights, params, &mut expect).unwrap();
            assert_eq!(bits(&got), bits(&expect), "TIES in one call {what}");
        }
    }
}

/// Any output type holds the `f32` result rounded once (`O::from_f32`), element for element.
fn typed_outputs<O: Element>(cpu: &Cpu) {
    let n = 3000;
    let models: Vec<Vec<bf16>> = (0..3).map(|i| normal(n, 500 + i)).collect();
    let views: Vec<&[bf16]> = models.iter().map(Vec::as_slice).collect();
    let fishers: Vec<Vec<f32>> = (0..3).map(|i| normal::<f32>(n, 600 + i)).collect();
    let fisher_views: Vec<&[f32]> = fishers.iter().map(Vec::as_slice).collect();
    let weights = [0.5f32, 1.0, 2.0];
    let base: Vec<bf16> = normal(n, 700);
    let rounded = |v: &[f32]| {
        v.iter()
            .map(|&x| O::from_f32(x).to_f32().to_bits())
            .collect::<Vec<_>>()
    };
    let typed = |v: &[O]| v.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
    let (mut wide, mut narrow) = (vec![0.0f32; n], vec![O::from_f32(0.0); n]);
    weighted_mean(cpu, &views, &weights, &mut wide).unwrap();
    weighted_mean(cpu, &views, &weights, &mut narrow).unwrap();
    assert_eq!(typed(&narrow), rounded(&wide), "mean {:?}", O::DTYPE);
    task_arithmetic(cpu, &base, &views, &weights, 0.5, &mut wide).unwrap();
    task_arithmetic(cpu, &base, &views, &weights, 0.5, &mut narrow).unwrap();
    assert_eq!(
        typed(&narrow),
        rounded(&wide),
        "task arithmetic {:?}",
        O::DTYPE
    );
    ties_elect(cpu, &base, &views, &weights, 0.5, &mut wide).unwrap();
    ties_elect(cpu, &base, &views, &weights, 0.5, &mut narrow).unwrap();
    assert_eq!(typed(&narrow), rounded(&wide), "TIES {:?}", O::DTYPE);
    let plain = FisherParams::default();
    fisher_merge(cpu, &views, &fisher_views, &weights, plain, &mut wide).unwrap();
    fisher_merge(cpu, &views, &fisher_views, &weights, plain, &mut narrow).unwrap();
    assert_eq!(typed(&narrow), rounded(&wide), "Fisher {:?}", O::DTYPE);
}

fn typed_bf16_and_f16(cpu: &Cpu) {
    typed_outputs::<bf16>(cpu);
    typed_outputs::<f16>(cpu);
}

fn ties_fisher_f32(cpu: &Cpu) {
    ties_and_fisher::<f32>(cpu);
}
fn ties_fisher_f16(cpu: &Cpu) {
    ties_and_fisher::<f16>(cpu);
}
fn ties_fisher_bf16(cpu: &Cpu) {
    ties_and_fisher::<bf16>(cpu);
}

fn bad_inputs(cpu: &Cpu) {
    let a = [1.0f32; 5];
    let short = [1.0f32; 4];
    let mut out = [0.0; 5];
    assert!(matches!(
        weighted_mean(cpu, &[&a[..], &short[..]], &[1.0, 1.0], &mut out),
        Err(Error::LengthMismatch {
            what: "models[i]",
            expected: 5,
            found: 4
        })
    ));
    assert!(weighted_mean::<f32, f32>(cpu, &[], &[], &mut out).is_err());
    assert!(weighted_mean(cpu, &[&a[..]], &[-1.0], &mut out).is_err());
    assert!(weighted_mean(cpu, &[&a[..]], &[0.0], &mut out).is_err());
    assert!(task_arithmetic(cpu, &a, &[&a[..]], &[1.0], f32::NAN, &mut out).is_err());
    assert!(task_arithmetic(cpu, &short, &[&a[..]], &[1.0], 1.0, &mut out).is_err());
    assert!(fisher_accumulate(cpu, &mut out, &a, -1.0).is_err());
    assert!(fisher_accumulate(cpu, &mut out, &short, 1.0).is_err());
    assert!(ties_elect(cpu, &a, &[&a[..]], &[1.0], f32::INFINITY, &mut out).is_err());
    assert!(ties_elect(cpu, &a, &[&a[..], &short[..]], &[1.0, 1.0], 1.0, &mut out).is_err());
    assert!(ties_elect(cpu, &short, &[&a[..]], &[1.0], 1.0, &mut out).is_err());
    assert!(ties_elect(cpu, &a, &[&a[..]], &[-1.0], 1.0, &mut out).is_err());
    let plain = FisherParams::default();
    let fisher = |fishers: &[&[f32]], weights: &[f32], params, out: &mut [f32]| {
        fisher_merge(cpu, &[&a[..]], fishers, weights, params, out)
    };
    assert!(fisher(&[&a], &[1.0], plain.with_floor(-1.0), &mut out).is_err());
    assert!(fisher(&[&short], &[1.0], plain, &mut out).is_err());
    assert!(fisher(&[&a, &a], &[1.0], plain, &mut out).is_err());
    assert!(fisher(&[&a], &[0.0], plain, &mut out).is_err());
    assert!(fisher(&[&a], &[1.0], plain.with_normalization(&[0.0]), &mut out).is_err());
    assert!(
        fisher(
            &[&a],
            &[1.0],
            plain.with_normalization(&[1.0, 2.0]),
            &mut out
        )
        .is_err()
    );
    let trim_none = TiesParams::default().with_keep(KeepRule::Count(6));
    assert!(ties(cpu, &a, &[&a[..]], &[1.0], trim_none, &mut out).is_err());
}

/// More models than one kernel dispatch sums (32): the later groups continue from the output.
fn many_models(cpu: &Cpu) {
    use kernels_core::ops::merge::{task_arithmetic_ref, weighted_mean_ref};
    let n = 131;
    for count in [31, 32, 33, 70] {
        let models: Vec<Vec<f32>> = (0..count).map(|i| normal(n, 900 + i as u64)).collect();
        let views: Vec<&[f32]> = models.iter().map(Vec::as_slice).collect();
        let weights: Vec<f32> = (0..count).map(|i| 0.5 + (i % 5) as f32).collect();
        let sum: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        let abs = |j: usize| -> f64 {
            views
                .iter()
                .zip(&weights)
                .map(|(m, &w)| (f64::from(w) * f64::from(m[j])).abs())
                .sum()
        };
        let (mut got, mut expect) = (vec![f32::NAN; n], vec![0.0; n]);
        weighted_mean(cpu, &views, &weights, &mut got).unwrap();
        weighted_mean_ref(&views, &weights, &mut expect).unwrap();
        for j in 0..n {
            let tolerance = reduction_tolerance(count, abs(j) / sum);
            assert!(
                (f64::from(got[j]) - f64::from(expect[j])).abs() <= tolerance,
                "mean N={count} {j}"
            );
        }
        let base = normal::<f32>(n, 7);
        task_arithmetic(cpu, &base, &views, &weights, 0.3, &mut got).unwrap();
        task_arithmetic_ref(&base, &views, &weights, 0.3, &mut expect).unwrap();
        for j in 0..n {
            let tolerance = reduction_tolerance(count, f64::from(base[j]).abs() + 0.3 * abs(j));
            assert!(
                (f64::from(got[j]) - f64::from(expect[j])).abs() <= tolerance,
                "TA N={count} {j}"
            );
        }
    }
}

isa_tests!(
    many_models,
    shared_reductions,
    ties_fisher_f32,
    typed_bf16_and_f16,
    ties_fisher_f16,
    ties_fisher_bf16,
    shared_non_finite,
    bad_inputs
);
