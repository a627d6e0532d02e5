//! Threshold calibration against the reference quantile, bit for bit.

mod common;

use common::normal;
use kernels_core::Error;
use kernels_core::ops::sparse::calibrate_threshold_ref;
use kernels_cpu::Cpu;
use kernels_cpu::calibrate::{Calibration, Site, calibrate_threshold};

fn exact_quantiles(cpu: &Cpu) {
    for n in [1, 2, 7, 64, 1000, 300_007] {
        let mut samples = normal::<f32>(n, n as u64);
        // Ties and signed zeros.
        for (i, v) in samples.iter_mut().enumerate().step_by(5) {
            *v = if i % 2 == 0 { 0.5 } else { -0.0 };
        }
        for k in [0.0, 1e-6, 0.1, 0.5, 0.7, 0.9, 1.0] {
            assert_eq!(
                calibrate_threshold(cpu, &samples, k).unwrap(),
                calibrate_threshold_ref(&samples, k).unwrap(),
                "n={n} k={k}"
            );
        }
    }
    assert!(matches!(
        calibrate_threshold(cpu, &[], 0.5),
        Err(Error::InvalidParam { .. })
    ));
    assert!(matches!(
        calibrate_threshold(cpu, &[1.0, f32::NAN], 0.5),
        Err(Error::NonFinite { index: 1, .. })
    ));
    assert!(calibrate_threshold(cpu, &[1.0], -0.1).is_err());
}

fn streaming_calibration_of_many_layers_equals_the_reference(cpu: &Cpu) {
    let layers: Vec<[Vec<f32>; 3]> = (0..4)
        .map(|l| [0, 1, 2].map(|s| normal::<f32>(5000 + 17 * l, (10 * l + s) as u64)))
        .collect();
    let sites = [Site::GateActivation, Site::MlpInput, Site::DownInput];
    let mut calibration = Calibration::new(cpu, 0.6).unwrap();
    for (l, data) in layers.iter().enumerate() {
        for (site, samples) in sites.iter().zip(data) {
            for chunk in samples.chunks(999) {
                calibration.observe(l, *site, chunk).unwrap();
            }
        }
    }
    assert!(
        calibration.thresholds().is_err(),
        "thresholds need both passes"
    );
    calibration.start_refining().unwrap();
    assert!(
        calibration.observe(0, Site::MlpInput, &[1.0]).is_err(),
        "pass 1 is over"
    );
    assert!(
        calibration.refine(9, Site::MlpInput, &[1.0]).is_err(),
        "unknown layer"
    );
    for (l, data) in layers.iter().enumerate() {
        for (site, samples) in sites.iter().zip(data) {
            for chunk in samples.chunks(1234) {
                calibration.refine(l, *site, chunk).unwrap();
            }
        }
    }
    let thresholds = calibration.thresholds().unwrap();
    assert_eq!(thresholds.len(), 12);
    for (l, site, t) in thresholds {
        let samples = &layers[l][sites.iter().position(|s| *s == site).unwrap()];
        assert_eq!(t, calibrate_threshold_ref(samples, 0.6).unwrap());
    }
    assert!(Calibration::new(cpu, 1.5).is_err());
}

isa_tests!(
    exact_quantiles,
    streaming_calibration_of_many_layers_equals_the_reference
);
