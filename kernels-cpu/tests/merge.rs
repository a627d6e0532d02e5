//! Merge reductions on every ISA, element type and thread count, against the reference; chunking
//! and threading never change a bit.

mod common;

use common::{assert_close, bits, normal, sparse_taus};
use half::{bf16, f16};
use kernels_core::ops::merge::{
    fisher_accumulate_ref, fisher_merge_ref, task_arithmetic_ref, ties_elect_ref, weighted_mean_ref,
};
use kernels_core::{Element, Error};
use kernels_cpu::Cpu;
use kernels_cpu::merge::{
    fisher_accumulate, fisher_merge, reduction_tolerance, task_arithmetic, ties_elect,
    weighted_mean,
};

const LENGTHS: [usize; 10] = [0, 1, 3, 15, 16, 17, 63, 65, 1000, 4097];

fn check_reductions<T: Element>(cpu: &Cpu, n: usize, models: usize, seed: u64) {
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
    weighted_mean(cpu, &views, &weights, &mut got).unwrap();
    weighted_mean_ref(&views, &weights, &mut expect).unwrap();
    let what = format!("weighted mean {:?} n={n} N={models} {cpu:?}", T::DTYPE);
    assert_close(&what, &got, &expect, |j| {
        reduction_tolerance(models, abs(j) / sum)
    });
    // Two chunks give the same bits as the whole.
    let split = n / 3;
    let mut chunked = vec![0.0; n];
    let (a, b) = chunked.split_at_mut(split);
    let heads: Vec<&[T]> = views.iter().map(|m| &m[..split]).collect();
    let tails: Vec<&[T]> = views.iter().map(|m| &m[split..]).collect();
    weighted_mean(cpu, &heads, &weights, a).unwrap();
    weighted_mean(cpu, &tails, &weights, b).unwrap();
    assert_eq!(bits(&chunked), bits(&got), "{what}: chunking changed a bit");

    let base = normal::<T>(n, seed + 100);
    let signed: Vec<f32> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| if i % 2 == 1 { -w } else { *w })
        .collect();
    task_arithmetic(cpu, &base, &views, &signed, 0.3, &mut got).unwrap();
    task_arithmetic_ref(&base, &views, &signed, 0.3, &mut expect).unwrap();
    assert_close(&format!("task arithmetic {what}"), &got, &expect, |j| {
        reduction_tolerance(models, f64::from(base[j].to_f32()).abs() + 0.3 * abs(j))
    });
    let mut single = vec![0.0; n];
    task_arithmetic(
        &cpu.with_threads(1).unwrap(),
        &base,
        &views,
        &signed,
        0.3,
        &mut single,
    )
    .unwrap();
    assert_eq!(bits(&single), bits(&got), "thread count changed a bit");

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
    fisher_accumulate(cpu, &mut fisher, views[0], 0.7).unwrap();
    fisher_accumulate_ref(&mut fisher_ref, views[0], 0.7).unwrap();
    assert_close("fisher accumulate", &fisher, &fisher_ref, |j| {
        reduction_tolerance(2, scale_abs[j])
    });
}

fn every_length_model_count_and_type(cpu: &Cpu) {
    for (k, &n) in LENGTHS.iter().enumerate() {
        for models in [1, 2, 3, 8] {
            let seed = (k * 10 + models) as u64;
            check_reductions::<f32>(cpu, n, models, seed);
            check_reductions::<f16>(cpu, n, models, seed);
            check_reductions::<bf16>(cpu, n, models, seed);
        }
    }
}

fn non_finite_data_propagates(cpu: &Cpu) {
    let a = [1.0f32, f32::NAN, 3.0, f32::INFINITY].repeat(5);
    let b = [1.0f32; 20];
    let mut out = [0.0; 20];
    weighted_mean(cpu, &[&a, &b], &[1.0, 1.0], &mut out).unwrap();
    for (o, v) in out.iter().zip(&a) {
        assert_eq!(o.is_nan(), v.is_nan());
        assert_eq!(o.is_infinite(), v.is_infinite());
    }
}

fn ties_and_fisher<T: Element>(cpu: &Cpu) {
    for &n in &LENGTHS {
        for models in [1, 2, 3, 8] {
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
            for floor in [0.0, 1e-3] {
                fisher_merge(cpu, &views, &fisher_views, &weights, floor, &mut got).unwrap();
                fisher_merge_ref(&views, &fisher_views, &weights, floor, &mut expect).unwrap();
                assert_eq!(bits(&got), bits(&expect), "Fisher floor={floor} {what}");
            }
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
    fisher_merge(cpu, &views, &fisher_views, &weights, 0.0, &mut wide).unwrap();
    fisher_merge(cpu, &views, &fisher_views, &weights, 0.0, &mut narrow).unwrap();
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
    assert!(fisher_merge(cpu, &[&a[..]], &[&a[..]], &[1.0], -1.0, &mut out).is_err());
    assert!(fisher_merge(cpu, &[&a[..]], &[&short[..]], &[1.0], 0.0, &mut out).is_err());
    assert!(fisher_merge(cpu, &[&a[..]], &[&a[..]], &[0.0], 0.0, &mut out).is_err());
}

isa_tests!(
    every_length_model_count_and_type,
    ties_fisher_f32,
    typed_bf16_and_f16,
    ties_fisher_f16,
    ties_fisher_bf16,
    non_finite_data_propagates,
    bad_inputs
);
