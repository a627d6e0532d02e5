//! Threshold calibration against the reference quantile, bit for bit.

use kernels_core::ops::sparse::calibrate_threshold_ref;
use kernels_cpu::prelude::*;
use kernels_testkit::{isa_tests, normal};

fn exact_quantiles(cpu: &Cpu) {
    for n in [1, 2, 7, 64, 1000, 300_007] {
        let mut samples = normal::<f32>(n, n as u64);
        // Ties and signed zeros.
        for (i, v) in samples.iter_mut().enumerate().step_by(5) {
            *v = if i % 2 == 0 { 0.5 } else { -0.0 };
        }
        // One vector, and the same samples as batches of any size.
        let (a, b) = samples.split_at(n / 3);
        for k in [0.0, 1e-6, 0.1, 0.5, 0.7, 0.9, 1.0] {
            let expect = calibrate_threshold_ref(&[&samples], k).unwrap();
            assert_eq!(
                calibrate_threshold(cpu, &[&samples], k).unwrap(),
                expect,
                "n={n} k={k}"
            );
            assert_eq!(calibrate_threshold(cpu, &[a, &[], b], k).unwrap(), expect);
        }
    }
    assert!(matches!(
        calibrate_threshold(cpu, &[], 0.5),
        Err(Error::InvalidParam { .. })
    ));
    assert!(matches!(
        calibrate_threshold(cpu, &[&[2.0], &[1.0, f32::NAN]], 0.5),
        Err(Error::NonFinite { index: 2, .. })
    ));
    assert!(calibrate_threshold(cpu, &[&[1.0]], -0.1).is_err());
}

fn streaming_calibration_of_many_layers_equals_the_reference(cpu: &Cpu) {
    let layers: Vec<[Vec<f32>; 3]> = (0..4)
        .map(|l| [0, 1, 2].map(|s| normal::<f32>(5000 + 17 * l, (10 * l + s) as u64)))
        .collect();
    let sites = [Site::GateActivation, Site::MlpInput, Site::DownInput];
    let mut calibration = Calibration::new(0.6).unwrap();
    for (l, data) in layers.iter().enumerate() {
        for (site, samples) in sites.iter().zip(data) {
            for chunk in samples.chunks(999) {
                calibration.feed(cpu, l, *site, chunk).unwrap();
            }
        }
    }
    assert!(
        matches!(calibration.finish(), Err(Error::PassOrder { .. })),
        "thresholds need both passes"
    );
    assert!(calibration.next_pass().unwrap(), "a second pass");
    assert!(
        matches!(
            calibration.feed(cpu, 9, Site::MlpInput, &[1.0]),
            Err(Error::PassOrder { .. })
        ),
        "a key pass 1 did not see"
    );
    for (l, data) in layers.iter().enumerate() {
        for (site, samples) in sites.iter().zip(data) {
            for chunk in samples.chunks(1234) {
                calibration.feed(cpu, l, *site, chunk).unwrap();
            }
        }
    }
    assert!(!calibration.next_pass().unwrap(), "two passes");
    assert!(
        matches!(
            calibration.feed(cpu, 0, Site::MlpInput, &[1.0]),
            Err(Error::PassOrder { .. })
        ),
        "no third pass"
    );
    let thresholds = calibration.finish().unwrap();
    assert_eq!(thresholds.len(), 12);
    for (l, site, t) in thresholds {
        let samples = &layers[l][sites.iter().position(|s| *s == site).unwrap()];
        assert_eq!(t, calibrate_threshold_ref(&[samples], 0.6).unwrap());
    }
    assert!(Calibration::new(1.5).is_err());
}

fn a_pass_over_other_data_is_detected(cpu: &Cpu) {
    let samples = normal::<f32>(1000, 1);
    let mut calibration = Calibration::new(0.5).unwrap();
    calibration.feed(cpu, 0, Site::DownInput, &samples).unwrap();
    calibration.next_pass().unwrap();
    calibration
        .feed(cpu, 0, Site::DownInput, &samples[..500])
        .unwrap();
    assert!(matches!(
        calibration.next_pass(),
        Err(Error::PassOrder { .. })
    ));
}

isa_tests!(
    exact_quantiles,
    streaming_calibration_of_many_layers_equals_the_reference,
    a_pass_over_other_data_is_detected
);
