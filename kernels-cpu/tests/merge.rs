//! Merge reductions on every ISA, element type and thread count, against the reference; chunking
//! and threading never change a bit.

use half::{bf16, f16};
use kernels_core::ops::merge::{
    TiesElection, fisher_merge_ref, ties_elect_ref, ties_elect_with_ref, ties_ref,
};
use kernels_cpu::merge::{reduction_tolerance, ties_tolerance};
use kernels_cpu::prelude::*;
use kernels_testkit::merge::{
    LENGTHS, MODEL_COUNTS, ReduceBackend, every_length_model_count_and_type,
    non_finite_data_propagates, ties_scale,
};
use kernels_testkit::{assert_close, bits, isa_tests, normal, sparse_taus};

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

/// Lengths around TIES election's blocks (16 and 32 elements) besides the shared [`LENGTHS`].
const BLOCK_EDGES: [usize; 4] = [31, 32, 33, 95];

fn ties_and_fisher<T: Element>(cpu: &Cpu) {
    for &n in LENGTHS.iter().chain(&BLOCK_EDGES) {
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
            assert_close(&format!("TIES {what}"), &got, &expect, |j| {
                let rule = TiesElection::default();
                ties_tolerance(models, ties_scale(&base, &views, &weights, 0.7, rule, j))
            });
            // Each element's result is its own: chunks and threads change no bit.
            let mut chunked = vec![f32::NAN; n];
            let split = n / 3;
            let (head, tail) = chunked.split_at_mut(split);
            let heads: Vec<&[T]> = views.iter().map(|t| &t[..split]).collect();
            let tails: Vec<&[T]> = views.iter().map(|t| &t[split..]).collect();
            let one = cpu.with_threads(1).unwrap();
            ties_elect(&one, &base[..split], &heads, &weights, 0.7, head).unwrap();
            ties_elect(cpu, &base[split..], &tails, &weights, 0.7, tail).unwrap();
            assert_eq!(bits(&chunked), bits(&got), "TIES chunked {what}");
            // Written past the caches from any alignment of the output: the same bits.
            let streaming = cpu.with_streaming_stores_from(0);
            for offset in [0, 1, 5] {
                let mut streamed = vec![f32::NAN; n + offset];
                let out = &mut streamed[offset..];
                ties_elect(&streaming, &base, &views, &weights, 0.7, out).unwrap();
                assert_eq!(bits(out), bits(&got), "TIES streamed at {offset} {what}");
            }

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
                let mut streamed = vec![f32::NAN; n + 3];
                let out = &mut streamed[3..];
                let streaming = cpu.with_streaming_stores_from(0);
                fisher_merge(&streaming, &views, &fisher_views, &weights, params, out).unwrap();
                assert_eq!(
                    bits(out),
                    bits(&expect),
                    "Fisher streamed {params:?} {what}"
                );
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
            // The trim is exact; the scale bounds the agreeing mean by the largest entry.
            assert_close(&format!("TIES in one call {what}"), &got, &expect, |j| {
                let largest = finite
                    .iter()
                    .map(|t| f64::from(t[j].to_f32()).abs())
                    .fold(0.0, f64::max);
                ties_tolerance(models, f64::from(base[j].to_f32()).abs() + 0.7 * largest)
            });
        }
    }
}

/// Votes that `f32` rounds to the wrong sign or to nothing, products that underflow or overflow
/// `f32`: the elected sign stays the reference's, and those elements are the reference's bits
/// (its `f64` arithmetic); the others stay within [`ties_tolerance`].
fn ties_votes_near_rounding(cpu: &Cpu) {
    // Exact vote +1, elected +, mean of (1e8 + 8, 3, 3); an `f32` vote in model order is -8.
    let wrong_sign = [1e8 + 8.0, -13.0, -1e8, 3.0, 3.0];
    // Exact vote -1; in `f32` the positive side swallows the 1.
    let swallowed = [1e8, -1e8, 1.0, -2.0, 0.0];
    let n = 41;
    let mut taus: Vec<Vec<f32>> = (0..5).map(|i| normal(n, 300 + i)).collect();
    let hard = [0, 15, 16, 31, 40];
    for (k, &j) in hard.iter().enumerate() {
        let lane = if k % 2 == 0 { wrong_sign } else { swallowed };
        for (t, v) in taus.iter_mut().zip(lane) {
            t[j] = v;
        }
    }
    let views: Vec<&[f32]> = taus.iter().map(Vec::as_slice).collect();
    let base = normal::<f32>(n, 9);
    let ones = [1.0f32; 5];
    for rule in [
        TiesElection::default(),
        TiesElection::default()
            .with_zero_sum_elects_positive(true)
            .with_normalize(false),
    ] {
        let (mut got, mut expect) = (vec![f32::NAN; n], vec![0.0; n]);
        ties_elect_with(cpu, &base, &views, &ones, 0.5, rule, &mut got).unwrap();
        ties_elect_with_ref(&base, &views, &ones, 0.5, rule, &mut expect).unwrap();
        assert_close(
            &format!("TIES near rounding {rule:?}"),
            &got,
            &expect,
            |j| ties_tolerance(5, ties_scale(&base, &views, &ones, 0.5, rule, j)),
        );
        for j in hard {
            assert_eq!(got[j].to_bits(), expect[j].to_bits(), "{rule:?} [{j}]");
        }
    }
    // Products below f32's range (weights 1e-30, entries 1e-20) and above it (weights 4).
    for (weight, scale) in [(1e-30f32, 1e-20f32), (4.0, 1e38)] {
        let taus: Vec<Vec<f32>> = (0..3)
            .map(|i| {
                normal::<f32>(n, 400 + i)
                    .iter()
                    .map(|v| v * scale)
                    .collect()
            })
            .collect();
        let views: Vec<&[f32]> = taus.iter().map(Vec::as_slice).collect();
        let weights = [weight; 3];
        let (mut got, mut expect) = (vec![f32::NAN; n], vec![0.0; n]);
        ties_elect(cpu, &base, &views, &weights, 0.5, &mut got).unwrap();
        ties_elect_ref(&base, &views, &weights, 0.5, &mut expect).unwrap();
        assert_eq!(
            bits(&got),
            bits(&expect),
            "TIES weights {weight}, entries {scale}"
        );
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
    ties_votes_near_rounding,
    shared_reductions,
    ties_fisher_f32,
    typed_bf16_and_f16,
    ties_fisher_f16,
    ties_fisher_bf16,
    shared_non_finite,
    bad_inputs
);
