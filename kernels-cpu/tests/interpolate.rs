//! The ops mergekit's methods need beyond the classic reductions, on every ISA, element type and
//! thread count, against the references: linear combinations, Gram matrices, SLERP, Model Stock,
//! DELLA's ranked drop and TIES under mergekit's election rule.

use kernels_core::Real;
use kernels_core::ops::interpolate::{
    gram_ref, linear_combination_ref, model_stock_ref, slerp_coefficients, slerp_ref,
};
use kernels_core::ops::merge::{della_ref, preserve_l1_ref, ties_elect_with_ref};
use kernels_cpu::CounterRng;
use kernels_cpu::interpolate::gram_tolerance;
use kernels_cpu::masks::DARE_L1_RELATIVE_TOLERANCE;
use kernels_cpu::merge::{reduction_tolerance, ties_tolerance};
use kernels_cpu::prelude::*;
use kernels_testkit::merge::ties_scale;
use kernels_testkit::{EDGE_DIMS, assert_close, bits, isa_tests, normal};

const LENGTHS: [usize; 10] = [0, 1, 3, 5, 63, 64, 65, 1000, 1031, 5003];

fn models<T: Element>(n: usize, count: usize, seed: u64) -> Vec<Vec<T>> {
    (0..count)
        .map(|m| normal(n, seed + 17 * m as u64))
        .collect()
}

fn linear_combination_matches<T: Element>(cpu: &Cpu) {
    for n in LENGTHS {
        for count in [1, 2, 3, 5] {
            let ms: Vec<Vec<T>> = models(n, count, n as u64);
            let views: Vec<&[T]> = ms.iter().map(|m| &m[..]).collect();
            let weights: Vec<f32> = (0..count).map(|i| 0.75 - 0.5 * i as f32).collect();
            let (mut got, mut expect) = (vec![f32::NAN; n], vec![0.0; n]);
            linear_combination(cpu, &views, &weights, &mut got).unwrap();
            linear_combination_ref(&views, &weights, &mut expect).unwrap();
            for j in 0..n {
                let abs: f64 = views
                    .iter()
                    .zip(&weights)
                    .map(|(m, w)| f64::from(w.abs()) * m[j].to_f64().abs())
                    .sum();
                let err = (f64::from(got[j]) - f64::from(expect[j])).abs();
                assert!(
                    err <= reduction_tolerance(count, abs),
                    "{:?} n={n} N={count} j={j}: {} vs {}",
                    T::DTYPE,
                    got[j],
                    expect[j]
                );
            }
        }
    }
}

fn gram_matches<T: Element>(cpu: &Cpu) {
    for n in LENGTHS.iter().copied().chain(EDGE_DIMS) {
        let ms: Vec<Vec<T>> = models(n, 4, 5 + n as u64);
        let center: Vec<T> = normal(n, 999);
        let views: Vec<&[T]> = ms.iter().map(|m| &m[..]).collect();
        for c in [None, Some(&center[..])] {
            let (mut got, mut expect) = (vec![f64::NAN; 16], vec![0.0; 16]);
            gram(cpu, &views, c, &mut got).unwrap();
            gram_ref(&views, c, &mut expect).unwrap();
            for i in 0..4 {
                for j in 0..4 {
                    let tol = gram_tolerance(n, expect[i * 5], expect[j * 5]);
                    assert!(
                        (got[i * 4 + j] - expect[i * 4 + j]).abs() <= tol,
                        "{:?} n={n} ({i}, {j}): {} vs {}",
                        T::DTYPE,
                        got[i * 4 + j],
                        expect[i * 4 + j]
                    );
                }
            }
            // Symmetric to the bit.
            for i in 0..4 {
                for j in 0..4 {
                    assert_eq!(got[i * 4 + j].to_bits(), got[j * 4 + i].to_bits());
                }
            }
        }
    }
}

fn slerp_and_model_stock_match<T: Element>(cpu: &Cpu) {
    for n in [1usize, 2, 65, 1000, 4099] {
        let ms: Vec<Vec<T>> = models(n, 4, 70 + n as u64);
        // Correlated fine-tunes: a shared base plus small independent offsets.
        let base: Vec<T> = normal(n, 3);
        let tuned: Vec<Vec<T>> = ms
            .iter()
            .map(|m| {
                m.iter()
                    .zip(&base)
                    .map(|(d, b)| T::from_f32(b.to_f32() + 0.1 * d.to_f32()))
                    .collect()
            })
            .collect();
        for t in [0.0f32, 0.3, 0.5, 1.0, 1.5] {
            let (mut got, mut expect) = (vec![f32::NAN; n], vec![0.0; n]);
            slerp(cpu, &base, &tuned[0], t, &mut got).unwrap();
            slerp_ref(&base, &tuned[0], t, &mut expect).unwrap();
            let mut g = [0.0; 4];
            gram_ref(&[&base[..], &tuned[0][..]], None, &mut g).unwrap();
            let [s0, s1] = slerp_coefficients(f64::from(t), g);
            for j in 0..n {
                let abs = (s0 * base[j].to_f64()).abs() + (s1 * tuned[0][j].to_f64()).abs();
                let err = (f64::from(got[j]) - f64::from(expect[j])).abs();
                assert!(
                    err <= reduction_tolerance(2, abs),
                    "slerp n={n} t={t} j={j}"
                );
            }
        }
        if n < 2 {
            continue; // one element: all task vectors are parallel or opposite
        }
        let views: Vec<&[T]> = tuned.iter().map(|m| &m[..]).collect();
        for count in [2, 3, 4] {
            let (mut got, mut expect) = (vec![f32::NAN; n], vec![0.0; n]);
            model_stock(cpu, &base, &views[..count], &mut got).unwrap();
            model_stock_ref(&base, &views[..count], &mut expect).unwrap();
            for j in 0..n {
                let scale = views[..count]
                    .iter()
                    .map(|m| m[j].to_f64().abs())
                    .sum::<f64>()
                    + base[j].to_f64().abs();
                // t and 1 - t are rounded to f32 (relative u), the Gram entries agree to 1e-12.
                let err = (f64::from(got[j]) - f64::from(expect[j])).abs();
                assert!(
                    err <= reduction_tolerance(count + 1, 2.0 * scale),
                    "model stock n={n} N={count} j={j}: {} vs {}",
                    got[j],
                    expect[j]
                );
            }
        }
    }
}

fn della_matches<T: Element>(cpu: &Cpu) {
    for (rows, cols) in [(0, 5), (1, 1), (3, 1), (1, 7), (4, 65), (17, 64), (5, 1000)] {
        let n = rows * cols;
        let tau: Vec<T> = normal(n, 11 + n as u64);
        for (density, epsilon) in [(0.5, 0.1), (0.1, 0.05), (0.9, 0.0), (1.0, 0.3)] {
            for rescale in [
                DareRescale::InverseKeep,
                DareRescale::None,
                DareRescale::PreserveL1,
            ] {
                for first in [0u64, 5, 1 << 33] {
                    let params = DellaParams::new(density, epsilon, 21).with_rescale(rescale);
                    let (mut got, mut expect) = (vec![f32::NAN; n], vec![0.0; n]);
                    della(cpu, &tau, cols, params, first, &mut got).unwrap();
                    della_ref(&tau, cols, params, first, &mut expect).unwrap();
                    let what = format!("{:?} {rows}x{cols} d={density} {rescale:?}", T::DTYPE);
                    if rescale == DareRescale::PreserveL1 {
                        for (g, e) in got.iter().zip(&expect) {
                            assert_eq!(*g == 0.0, *e == 0.0, "{what}: mask");
                            let err = (f64::from(*g) - f64::from(*e)).abs();
                            assert!(err <= DARE_L1_RELATIVE_TOLERANCE * f64::from(e.abs()));
                        }
                    } else {
                        assert_eq!(bits(&got), bits(&expect), "{what}");
                    }
                }
            }
        }
    }
}

fn ties_election_rules_match<T: Element>(cpu: &Cpu) {
    for n in LENGTHS {
        // Coarse values: exact zero sums and zero entries happen often.
        let rng = CounterRng::new(n as u64);
        let ms: Vec<Vec<T>> = (0..3u64)
            .map(|m| {
                (0..n as u64)
                    .map(|i| T::from_f32((rng.u32_at(m * 100_000 + i) % 5) as f32 - 2.0))
                    .collect()
            })
            .collect();
        let base: Vec<T> = normal(n, 1);
        let views: Vec<&[T]> = ms.iter().map(|m| &m[..]).collect();
        for positive in [false, true] {
            for normalize in [false, true] {
                let rule = TiesElection::default()
                    .with_zero_sum_elects_positive(positive)
                    .with_normalize(normalize);
                let (mut got, mut expect) = (vec![f32::NAN; n], vec![0.0; n]);
                ties_elect_with(cpu, &base, &views, &[1.0, 1.0, 2.0], 0.5, rule, &mut got).unwrap();
                ties_elect_with_ref(&base, &views, &[1.0, 1.0, 2.0], 0.5, rule, &mut expect)
                    .unwrap();
                let what = format!("{:?} n={n} {rule:?}", T::DTYPE);
                assert_close(&what, &got, &expect, |j| {
                    ties_tolerance(3, ties_scale(&base, &views, &[1.0, 1.0, 2.0], 0.5, rule, j))
                });
            }
        }
    }
}

/// Trimmed task vectors rescaled to their original L1 norm, across the sums' block boundaries
/// and on all-zero input (nothing kept: left as it is, scale 0).
fn preserve_l1_matches<T: Element>(cpu: &Cpu) {
    for n in LENGTHS.iter().copied().chain([4095, 4096, 4097, 12_289]) {
        let tau: Vec<T> = normal(n, 40 + n as u64);
        for keep in [0, 1.min(n), n / 3, n] {
            let mut trimmed = vec![0.0f32; n];
            ties_trim(cpu, &tau, KeepRule::Count(keep as u64), &mut trimmed).unwrap();
            let mut expect = trimmed.clone();
            let want = preserve_l1_ref(&tau, &mut expect).unwrap();
            let got = preserve_l1(cpu, &tau, &mut trimmed).unwrap();
            assert!(
                (got - want).abs() <= DARE_L1_RELATIVE_TOLERANCE * want,
                "{:?} n={n} keep={keep}: scale {got} vs {want}",
                T::DTYPE
            );
            for (j, (g, e)) in trimmed.iter().zip(&expect).enumerate() {
                let tol = DARE_L1_RELATIVE_TOLERANCE * f64::from(e.abs());
                assert!(
                    (f64::from(*g) - f64::from(*e)).abs() <= tol,
                    "{:?} n={n} keep={keep} [{j}]: {g} vs {e}",
                    T::DTYPE
                );
            }
        }
    }
}

fn preserve_l1_all(cpu: &Cpu) {
    preserve_l1_matches::<f32>(cpu);
    preserve_l1_matches::<bf16>(cpu);
}

fn linear_combination_f32(cpu: &Cpu) {
    linear_combination_matches::<f32>(cpu);
    linear_combination_matches::<bf16>(cpu);
    linear_combination_matches::<f16>(cpu);
}

fn gram_all(cpu: &Cpu) {
    gram_matches::<f32>(cpu);
    gram_matches::<bf16>(cpu);
}

fn slerp_and_model_stock(cpu: &Cpu) {
    slerp_and_model_stock_match::<f32>(cpu);
    slerp_and_model_stock_match::<bf16>(cpu);
}

fn della_all(cpu: &Cpu) {
    della_matches::<f32>(cpu);
    della_matches::<f16>(cpu);
}

fn ties_election_rules(cpu: &Cpu) {
    ties_election_rules_match::<f32>(cpu);
    ties_election_rules_match::<bf16>(cpu);
}

isa_tests!(
    linear_combination_f32,
    gram_all,
    slerp_and_model_stock,
    della_all,
    ties_election_rules,
    preserve_l1_all
);

#[test]
fn mergekit_election_differs_from_the_paper_only_where_it_should() {
    let cpu = Cpu::detect();
    let base = [0.0f32; 3];
    let (a, b) = ([1.0f32, 2.0, 0.0], [-1.0f32, 2.0, 0.0]);
    let mut paper = [0.0f32; 3];
    ties_elect(&cpu, &base, &[&a, &b], &[1.0, 1.0], 1.0, &mut paper).unwrap();
    assert_eq!(paper, [0.0, 2.0, 0.0]); // a zero sum elects nothing
    let mergekit = TiesElection::default()
        .with_zero_sum_elects_positive(true)
        .with_normalize(false);
    let mut out = [0.0f32; 3];
    ties_elect_with(&cpu, &base, &[&a, &b], &[1.0, 1.0], 1.0, mergekit, &mut out).unwrap();
    assert_eq!(out, [1.0, 4.0, 0.0]); // + elected, sums undivided, zeros never vote
}

#[test]
fn della_keeps_large_entries_more_often() {
    let cpu = Cpu::detect();
    let cols = 1000;
    let tau: Vec<f32> = (0..100 * cols).map(|i| (i % cols) as f32 + 1.0).collect();
    let mut out = vec![0.0f32; tau.len()];
    let params = DellaParams::new(0.5, 0.4, 3).with_rescale(DareRescale::None);
    della(&cpu, &tau, cols, params, 0, &mut out).unwrap();
    let kept = |range: std::ops::Range<usize>| {
        (0..100)
            .flat_map(|r| range.clone().map(move |c| r * cols + c))
            .filter(|&i| out[i] != 0.0)
            .count() as f64
            / (100 * range.len()) as f64
    };
    // Ranks 0..100 keep with p ~ 0.1 to 0.18; ranks 900..1000 with p ~ 0.82 to 0.9.
    assert!((0.1..0.2).contains(&kept(0..100)), "{}", kept(0..100));
    assert!(
        (0.8..0.92).contains(&kept(900..1000)),
        "{}",
        kept(900..1000)
    );
}

#[test]
fn bad_inputs_are_errors() {
    let cpu = Cpu::detect();
    let a = [1.0f32; 6];
    let mut out = [0.0f32; 6];
    assert!(della(&cpu, &a, 4, DellaParams::new(0.5, 0.1, 0), 0, &mut out).is_err());
    assert!(della(&cpu, &a, 0, DellaParams::new(0.5, 0.1, 0), 0, &mut out).is_err());
    assert!(della(&cpu, &a, 3, DellaParams::new(0.5, 0.6, 0), 0, &mut out).is_err());
    assert!(della(&cpu, &a, 3, DellaParams::new(0.0, 0.0, 0), 0, &mut out).is_err());
    assert!(
        della(
            &cpu,
            &a,
            3,
            DellaParams::new(0.5, 0.1, 0),
            u64::MAX,
            &mut out
        )
        .is_err()
    );
    assert!(slerp(&cpu, &a, &a, f32::INFINITY, &mut out).is_err());
    assert!(slerp(&cpu, &a, &a[..5], 0.5, &mut out).is_err());
    assert!(model_stock(&cpu, &a, &[&a], &mut out).is_err());
    assert!(gram(&cpu, &[&a], None, &mut [0.0; 2]).is_err());
    assert!(linear_combination(&cpu, &[&a], &[f32::NAN], &mut out).is_err());
    assert!(preserve_l1(&cpu, &a, &mut out[..5]).is_err());
    assert!(preserve_l1_ref(&a, &mut out[..5]).is_err());
}
