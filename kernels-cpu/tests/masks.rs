//! Masks on every ISA, element type and thread count: DARE, TIES trim and Breadcrumbs
//! bit-identical to the reference for every chunking.

use kernels_core::ops::merge::{breadcrumbs_ref, dare_ref, ties_trim_ref};
use kernels_cpu::CounterRng;
use kernels_cpu::masks::DARE_L1_RELATIVE_TOLERANCE;
use kernels_cpu::prelude::*;
use kernels_testkit::{bits, isa_tests, normal};

const LENGTHS: [usize; 9] = [0, 1, 3, 5, 63, 64, 65, 1000, 4099];

/// Values with ties and exact zeros.
fn tied<T: Element>(n: usize, seed: u64) -> Vec<T> {
    let rng = CounterRng::new(seed);
    (0..n as u64)
        .map(|i| T::from_f32((rng.u32_at(i) % 11) as f32 * 0.5 - 2.5))
        .collect()
}

fn dare_matches<T: Element>(cpu: &Cpu) {
    for n in LENGTHS {
        let tau: Vec<T> = normal(n, 3 + n as u64);
        for drop in [0.0, 0.1, 0.5, 0.9, 0.999] {
            for first in [0u64, 1, 3, (1 << 32) - 7, (1 << 40) + 2] {
                for rescale in [
                    DareRescale::InverseKeep,
                    DareRescale::None,
                    DareRescale::PreserveL1,
                ] {
                    let params = DareParams::new(drop, 42).with_rescale(rescale);
                    let (mut got, mut expect) = (vec![f32::NAN; n], vec![0.0; n]);
                    dare(cpu, &tau, params, first, &mut got).unwrap();
                    dare_ref(&tau, params, first, &mut expect).unwrap();
                    let what = format!(
                        "{:?} n={n} p={drop} first={first} {rescale:?} {cpu:?}",
                        T::DTYPE
                    );
                    if rescale == DareRescale::PreserveL1 {
                        for (g, e) in got.iter().zip(&expect) {
                            assert_eq!(*g == 0.0, *e == 0.0, "{what}: mask");
                            let err = (f64::from(*g) - f64::from(*e)).abs();
                            assert!(
                                err <= DARE_L1_RELATIVE_TOLERANCE * f64::from(e.abs()),
                                "{what}: {g} vs {e}"
                            );
                        }
                        continue;
                    }
                    assert_eq!(bits(&got), bits(&expect), "{what}");
                    // Any chunking draws the same mask.
                    let split = n / 3;
                    let mut chunked = vec![0.0; n];
                    let (a, b) = chunked.split_at_mut(split);
                    dare(cpu, &tau[..split], params, first, a).unwrap();
                    dare(cpu, &tau[split..], params, first + split as u64, b).unwrap();
                    assert_eq!(bits(&chunked), bits(&got), "{what}: chunking");
                }
            }
        }
    }
}

fn dare_f32(cpu: &Cpu) {
    dare_matches::<f32>(cpu);
    // A draw exactly at the threshold survives (the integer comparison is `>=`), in the vector
    // body (index 37) and in a head element (index 1 of a chunk starting at 1).
    let tau = vec![1.0f32; 100];
    for (at, first) in [(37u64, 0u64), (1, 0), (0, 1)] {
        let draw = CounterRng::new(42).u24_at(at + first);
        let params = DareParams::new(f64::from(draw) / 16_777_216.0, 42);
        assert_eq!(params.drop_threshold(), draw);
        let (mut got, mut expect) = (vec![0.0; 100], vec![0.0; 100]);
        dare(cpu, &tau, params, first, &mut got).unwrap();
        dare_ref(&tau, params, first, &mut expect).unwrap();
        assert!(expect[at as usize] > 0.0);
        assert_eq!(bits(&got), bits(&expect), "boundary draw at {at}");
    }
}
fn dare_f16(cpu: &Cpu) {
    dare_matches::<f16>(cpu);
}
fn dare_bf16(cpu: &Cpu) {
    dare_matches::<bf16>(cpu);
}

fn magnitude_masks<T: Element>(cpu: &Cpu) {
    for n in LENGTHS {
        for tau in [tied::<T>(n, n as u64), normal::<T>(n, 9)] {
            let rules = [0.01, 0.2, 0.5, 1.0]
                .map(KeepRule::Density)
                .into_iter()
                .chain([KeepRule::Count(n as u64 / 2), KeepRule::Threshold(0.75)]);
            for keep in rules {
                // Into the tensor's own type, and into f32: both exact.
                let (mut got, mut wide) = (vec![T::from_f32(7.0); n], vec![7.0f32; n]);
                let mut expect = vec![0.0f32; n];
                ties_trim(cpu, &tau, keep, &mut got).unwrap();
                ties_trim(cpu, &tau, keep, &mut wide).unwrap();
                ties_trim_ref(&tau, keep, &mut expect).unwrap();
                let narrow: Vec<f32> = got.iter().map(|x| x.to_f32()).collect();
                let what = format!("trim {:?} n={n} {keep:?} {cpu:?}", T::DTYPE);
                assert_eq!(bits(&narrow), bits(&expect), "{what}");
                assert_eq!(bits(&wide), bits(&expect), "{what} into f32");
            }
            // gamma n < 1 drops no outlier; density + gamma = 1 keeps all but the outliers.
            for (density, gamma) in [
                (0.5, 0.0),
                (0.9, 0.01),
                (0.5, 0.1),
                (0.2, 0.8),
                (0.001, 0.0005),
            ] {
                let params = BreadcrumbsParams::default()
                    .with_density(density)
                    .with_gamma(gamma);
                let (mut got, mut expect) = (vec![f32::NAN; n], vec![0.0; n]);
                breadcrumbs(cpu, &tau, params, &mut got).unwrap();
                breadcrumbs_ref(&tau, params, &mut expect).unwrap();
                assert_eq!(
                    bits(&got),
                    bits(&expect),
                    "breadcrumbs {:?} n={n} {params:?} {cpu:?}",
                    T::DTYPE
                );
            }
        }
    }
}

/// Vectors past the sampled select's threshold (65 536 entries): Breadcrumbs selects both cuts
/// in one sampled pass, then writes vector by vector; split over threads.
fn sampled_magnitude_masks<T: Element>(cpu: &Cpu) {
    let n = 100_003;
    for threads in [1, 3] {
        let cpu = (*cpu).with_threads(threads).unwrap();
        for tau in [tied::<T>(n, 5), normal::<T>(n, 6)] {
            let keep = KeepRule::Density(0.2);
            let (mut got, mut expect) = (vec![T::from_f32(7.0); n], vec![0.0f32; n]);
            ties_trim(&cpu, &tau, keep, &mut got).unwrap();
            ties_trim_ref(&tau, keep, &mut expect).unwrap();
            let narrow: Vec<f32> = got.iter().map(|x| x.to_f32()).collect();
            assert_eq!(
                bits(&narrow),
                bits(&expect),
                "trim {threads} threads {cpu:?}"
            );
            // Far-apart cuts, overlapping brackets, and one cut of none.
            for (density, gamma) in [(0.9, 0.01), (0.001, 0.0005), (0.5, 0.0), (0.3, 0.3)] {
                let params = BreadcrumbsParams::default()
                    .with_density(density)
                    .with_gamma(gamma);
                let (mut got, mut expect) = (vec![f32::NAN; n], vec![0.0; n]);
                breadcrumbs(&cpu, &tau, params, &mut got).unwrap();
                breadcrumbs_ref(&tau, params, &mut expect).unwrap();
                assert_eq!(
                    bits(&got),
                    bits(&expect),
                    "breadcrumbs {:?} {params:?} {threads} threads {cpu:?}",
                    T::DTYPE
                );
            }
        }
    }
}

fn magnitude_f32(cpu: &Cpu) {
    magnitude_masks::<f32>(cpu);
    sampled_magnitude_masks::<f32>(cpu);
}
fn magnitude_bf16(cpu: &Cpu) {
    magnitude_masks::<bf16>(cpu);
    sampled_magnitude_masks::<bf16>(cpu);
}
fn magnitude_f16(cpu: &Cpu) {
    magnitude_masks::<f16>(cpu);
    sampled_magnitude_masks::<f16>(cpu);
}

/// A non-finite 16-bit entry, found by the selection pass (sampled or not) and by the writing
/// pass alone (a threshold rule), wherever it lies.
fn non_finite_16_bit<T: Element>(cpu: &Cpu) {
    for (n, at, bad) in [
        (100, 77, f32::NAN),
        (100, 99, f32::NEG_INFINITY),
        (70_001, 3, f32::INFINITY),
        (70_001, 70_000, -f32::NAN),
    ] {
        let mut tau: Vec<T> = normal(n, 3);
        tau[at] = T::from_f32(bad);
        let mut out = vec![T::from_f32(0.0); n];
        for keep in [KeepRule::Density(0.5), KeepRule::Threshold(0.1)] {
            let what = format!("{:?} n={n} at {at} {bad} {keep:?} {cpu:?}", T::DTYPE);
            let found = ties_trim(cpu, &tau, keep, &mut out);
            assert!(
                matches!(found, Err(Error::NonFinite { index, .. }) if index == at),
                "{what}: {found:?}"
            );
        }
        let mut wide = vec![0.0f32; n];
        let found = breadcrumbs(cpu, &tau, BreadcrumbsParams::default(), &mut wide);
        assert!(
            matches!(found, Err(Error::NonFinite { index, .. }) if index == at),
            "breadcrumbs {:?} n={n}: {found:?}",
            T::DTYPE
        );
    }
}

fn bad_inputs(cpu: &Cpu) {
    let tau: Vec<f32> = normal(100, 1);
    let mut out = vec![0.0f32; 100];
    assert!(matches!(
        dare(cpu, &tau, DareParams::new(1.0, 0), 0, &mut out),
        Err(Error::InvalidParam { name: "drop", .. })
    ));
    assert!(dare(cpu, &tau, DareParams::new(f64::NAN, 0), 0, &mut out).is_err());
    assert!(dare(cpu, &tau, DareParams::new(0.5, 0), 0, &mut out[..99]).is_err());
    let half = KeepRule::Density(0.5);
    assert!(ties_trim(cpu, &tau, KeepRule::Density(0.0), &mut tau.clone()).is_err());
    assert!(ties_trim(cpu, &tau, KeepRule::Count(101), &mut tau.clone()).is_err());
    assert!(ties_trim(cpu, &tau, KeepRule::Threshold(-1.0), &mut tau.clone()).is_err());
    assert!(ties_trim(cpu, &tau, half, &mut out[..3]).is_err());
    assert!(breadcrumbs(cpu, &tau, BreadcrumbsParams::new(0.9, 0.2), &mut out).is_err());
    let mut bad = tau.clone();
    bad[77] = f32::NAN;
    assert!(matches!(
        ties_trim(cpu, &bad, half, &mut out.clone()),
        Err(Error::NonFinite { index: 77, .. })
    ));
    assert!(matches!(
        breadcrumbs(cpu, &bad, BreadcrumbsParams::default(), &mut out),
        Err(Error::NonFinite { index: 77, .. })
    ));
    // A threshold rule needs no selection, and still rejects non-finite data.
    assert!(matches!(
        ties_trim(cpu, &bad, KeepRule::Threshold(0.1), &mut out.clone()),
        Err(Error::NonFinite { index: 77, .. })
    ));
    non_finite_16_bit::<bf16>(cpu);
    non_finite_16_bit::<f16>(cpu);
}

isa_tests!(
    dare_f32,
    dare_f16,
    dare_bf16,
    magnitude_f32,
    magnitude_bf16,
    magnitude_f16,
    bad_inputs
);
