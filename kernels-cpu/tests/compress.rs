//! ComPEFT on every ISA, element type and thread count: packed bytes identical to the reference
//! coded by the reference encoder, the scale within its named tolerance.

use kernels_core::ops::ternary::compeft_ref;
use kernels_cpu::compress::SCALE_RELATIVE_TOLERANCE;
use kernels_cpu::format;
use kernels_cpu::prelude::*;
use kernels_testkit::{isa_tests, normal, task_vector};

/// Vectors of at least this many entries take the selection's sampled path.
const SAMPLED_MIN: usize = 1 << 16;

const LAYOUTS: [TernaryLayout; 2] = [TernaryLayout::Dense2Bit, TernaryLayout::SparseRice];

/// Checks the packed tensors against the reference: same bytes but the scale.
fn check_model<T: Element>(cpu: &Cpu, tensors: &[Vec<T>], keep: KeepRule, what: &str) {
    let shapes: Vec<Vec<u64>> = tensors
        .iter()
        .map(|t| {
            if t.len() % 2 == 0 && !t.is_empty() {
                vec![2, t.len() as u64 / 2]
            } else {
                vec![t.len() as u64]
            }
        })
        .collect();
    let views: Vec<&[T]> = tensors.iter().map(Vec::as_slice).collect();
    let params = CompeftParams::default().with_keep(keep).with_alpha(1.5);
    let (expect, codes) = compeft_ref(&views, params).unwrap();
    let scale = expect.scale;
    // The codes themselves, and the same decision.
    let (decided, got) = compeft_codes(cpu, &views, params).unwrap();
    assert_eq!((decided.cut, decided.total), (expect.cut, expect.total));
    assert_eq!(got, codes, "{what} {:?} {keep:?} codes", T::DTYPE);
    for layout in LAYOUTS {
        let input: Vec<(&[T], &[u64])> = views
            .iter()
            .zip(&shapes)
            .map(|(t, s)| (*t, s.as_slice()))
            .collect();
        let (decided, packed) = compeft(cpu, &input, params, layout).unwrap();
        let label = format!("{what} {:?} {keep:?} {layout:?} {cpu:?}", T::DTYPE);
        assert!(
            (f64::from(decided.scale) - f64::from(scale)).abs()
                <= SCALE_RELATIVE_TOLERANCE * f64::from(scale).abs() + 1e-37,
            "{label}: scale {} vs {scale}",
            decided.scale
        );
        for ((bytes, expect_codes), shape) in packed.iter().zip(&codes).zip(&shapes) {
            let expect = format::encode(expect_codes, shape, decided.scale, layout).unwrap();
            assert_eq!(bytes, &expect, "{label}");
        }
    }
}

fn models<T: Element>(cpu: &Cpu) {
    for (sizes, seed) in [
        (&[0usize, 1][..], 1),
        (&[3, 64, 65], 2),
        (&[1000, 17, 4099], 3),
    ] {
        let tensors: Vec<Vec<T>> = sizes
            .iter()
            .map(|&n| task_vector(n, seed * 100 + n as u64, 0.0))
            .collect();
        let what = format!("sizes {sizes:?}");
        for density in [0.05, 0.1, 0.5, 0.9, 1.0] {
            check_model(cpu, &tensors, KeepRule::Density(density), &what);
        }
        let n: usize = sizes.iter().sum();
        for keep in [KeepRule::Count(n as u64 / 3), KeepRule::Threshold(0.5)] {
            check_model(cpu, &tensors, keep, &what);
        }
    }
}

fn compeft_f32(cpu: &Cpu) {
    models::<f32>(cpu);
}
fn compeft_f16(cpu: &Cpu) {
    models::<f16>(cpu);
}
fn compeft_bf16(cpu: &Cpu) {
    models::<bf16>(cpu);
}

/// Above `SAMPLED_MIN` the selection takes its sampled path.
fn large_model(cpu: &Cpu) {
    let n = SAMPLED_MIN / 2 + 33;
    let tensors = vec![normal::<f32>(n, 1), task_vector::<f32>(n, 2, 0.0)];
    check_model(cpu, &tensors, KeepRule::Density(0.1), "large");
}

fn moments_ignore_threads(cpu: &Cpu) {
    let x: Vec<bf16> = normal(10_007, 4);
    let one = moments(&cpu.with_threads(1).unwrap(), &x).unwrap();
    assert_eq!(moments(cpu, &x).unwrap(), one);
    // Squares overflow f32 here; the moments must not.
    let huge = [3e38f32, -3e38, 1e38, 0.0];
    let m = moments(cpu, &huge).unwrap();
    assert!(m.std().is_finite() && m.std() > 1e38, "{m:?}");
}

fn bad_inputs(cpu: &Cpu) {
    let x: Vec<f32> = normal(100, 3);
    let shape = [100u64];
    let layout = TernaryLayout::Dense2Bit;
    assert!(
        compeft(
            cpu,
            &[(&x[..], &[99][..])],
            CompeftParams::default(),
            layout
        )
        .is_err()
    );
    assert!(
        compeft(
            cpu,
            &[(&x[..], &shape[..])],
            CompeftParams::default().with_keep(KeepRule::Density(0.0)),
            layout
        )
        .is_err()
    );
    assert!(
        compeft(
            cpu,
            &[(&x[..], &shape[..])],
            CompeftParams::default().with_alpha(f32::NAN),
            layout
        )
        .is_err()
    );
    let mut bad = x.clone();
    bad[42] = f32::INFINITY;
    assert!(matches!(
        compeft(
            cpu,
            &[(&x[..], &shape[..]), (&bad[..], &shape[..])],
            CompeftParams::default(),
            layout
        ),
        Err(Error::NonFinite { index: 142, .. })
    ));
}

/// The streaming protocol: pass errors, and a decision equal to the one-call form's.
fn streaming_protocol(cpu: &Cpu) {
    let tensors = [normal::<f32>(5000, 5), normal::<f32>(77, 6)];
    let views: Vec<&[f32]> = tensors.iter().map(Vec::as_slice).collect();
    let params = CompeftParams::default();
    let mut plan = Compeft::new(params).unwrap();
    assert!(matches!(plan.finish(), Err(Error::PassOrder { .. })));
    for t in &views {
        plan.feed(cpu, t).unwrap();
    }
    while plan.next_pass().unwrap() {
        for t in &views {
            plan.feed(cpu, t).unwrap();
        }
    }
    assert!(matches!(
        plan.feed(cpu, views[0]),
        Err(Error::PassOrder { .. })
    ));
    let decided = plan.finish().unwrap();
    assert_eq!(decided, compeft_codes(cpu, &views, params).unwrap().0);
    let mut encoder = CompeftEncoder::new(&decided);
    let mut codes = vec![0i8; 4];
    assert!(matches!(
        encoder.code(cpu, views[0], &mut codes),
        Err(Error::LengthMismatch { .. })
    ));
}

isa_tests!(
    streaming_protocol,
    compeft_f32,
    compeft_f16,
    compeft_bf16,
    large_model,
    moments_ignore_threads,
    bad_inputs
);
