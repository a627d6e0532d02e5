//! The CATS and TEAL MLPs on every ISA, element type, batch size and thread count, against the
//! reference (the shared bodies in `kernels_testkit::mlp`).

use std::cell::RefCell;

use kernels_cpu::mlp::mlp_tolerance;
use kernels_cpu::prelude::*;
use kernels_testkit::isa_tests;
use kernels_testkit::mlp::{
    Layer, MlpBackend, cats_shapes_batches_and_thresholds, real_model_sizes,
    teal_shapes_batches_and_thresholds,
};

/// The CPU backend, for the shared bodies: one scratch reused by every call, as a decode loop
/// would.
struct OnCpu {
    cpu: Cpu,
    scratch: RefCell<MlpScratch>,
}

impl OnCpu {
    fn new(cpu: &Cpu) -> Self {
        Self {
            cpu: *cpu,
            scratch: RefCell::new(MlpScratch::new()),
        }
    }
}

impl<T: Element> MlpBackend<T> for OnCpu {
    fn name(&self) -> String {
        format!("{:?}", self.cpu)
    }

    fn cats(
        &self,
        x: MatRef<'_, f32>,
        weights: CatsMlpWeights<MatRef<'_, T>>,
        threshold: f32,
        y: MatMut<'_, f32>,
    ) -> Result<MlpReport> {
        let scratch = &mut self.scratch.borrow_mut();
        cats_mlp(&self.cpu, x, weights, threshold, y, scratch)?;
        Ok(scratch.report().clone())
    }

    fn teal(
        &self,
        x: MatRef<'_, f32>,
        weights: TealMlpWeights<MatRef<'_, T>>,
        thresholds: TealThresholds,
        y: MatMut<'_, f32>,
    ) -> Result<MlpReport> {
        let scratch = &mut self.scratch.borrow_mut();
        teal_mlp(&self.cpu, x, weights, thresholds, y, scratch)?;
        Ok(scratch.report().clone())
    }

    fn tolerance(
        &self,
        hidden: usize,
        active: usize,
        propagated: f64,
        direct: f64,
        max_gate: f64,
    ) -> f64 {
        mlp_tolerance(hidden, active, propagated, direct, max_gate)
    }
}

fn cats_everywhere(cpu: &Cpu) {
    cats_shapes_batches_and_thresholds(&OnCpu::new(cpu));
}

fn teal_everywhere(cpu: &Cpu) {
    teal_shapes_batches_and_thresholds(&OnCpu::new(cpu));
}

fn real_sizes(cpu: &Cpu) {
    real_model_sizes(&OnCpu::new(cpu));
}

fn bad_inputs(cpu: &Cpu) {
    let layer = Layer::<f32>::new(8, 4, 1);
    let x = vec![0.0; 5 * 4];
    let mut y = vec![0.0; 5 * 4];
    let scratch = &mut MlpScratch::new();
    let five = cats_mlp(
        cpu,
        MatRef::from_slice(&x, 5, 4).unwrap(),
        layer.cats(),
        0.0,
        MatMut::from_slice(&mut y, 5, 4).unwrap(),
        scratch,
    );
    assert!(matches!(
        five,
        Err(Error::InvalidParam { name: "batch", .. })
    ));
    let nan = cats_mlp(
        cpu,
        MatRef::from_slice(&x[..4], 1, 4).unwrap(),
        layer.cats(),
        f32::NAN,
        MatMut::from_slice(&mut y[..4], 1, 4).unwrap(),
        scratch,
    );
    assert!(matches!(
        nan,
        Err(Error::InvalidParam {
            name: "threshold",
            ..
        })
    ));
    let mut wrong = layer.cats();
    wrong.up = MatRef::from_slice(&layer.up[..28], 7, 4).unwrap();
    let shape = cats_mlp(
        cpu,
        MatRef::from_slice(&x[..4], 1, 4).unwrap(),
        wrong,
        0.0,
        MatMut::from_slice(&mut y[..4], 1, 4).unwrap(),
        scratch,
    );
    assert!(matches!(
        shape,
        Err(Error::ShapeMismatch { what: "w_up", .. })
    ));
    let y_shape = cats_mlp(
        cpu,
        MatRef::from_slice(&x[..4], 1, 4).unwrap(),
        layer.cats(),
        0.0,
        MatMut::from_slice(&mut y[..8], 2, 4).unwrap(),
        scratch,
    );
    assert!(matches!(
        y_shape,
        Err(Error::ShapeMismatch { what: "y", .. })
    ));
}

isa_tests!(cats_everywhere, teal_everywhere, real_sizes, bad_inputs);
