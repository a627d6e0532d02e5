//! The CATS and TEAL MLPs on every ISA, element type, batch size and thread count, against the
//! reference (the shared bodies in `common::mlp`).

mod common;

use common::mlp::{
    Layer, MlpBackend, cats_shapes_batches_and_thresholds, real_model_sizes,
    teal_shapes_batches_and_thresholds,
};
use kernels_core::ops::sparse::{CatsMlpWeights, MlpReport, TealMlpWeights, TealThresholds};
use kernels_core::{Element, Error, MatMut, MatRef, Result};
use kernels_cpu::Cpu;
use kernels_cpu::mlp::{cats_mlp, mlp_tolerance, teal_mlp};

impl<T: Element> MlpBackend<T> for Cpu {
    fn name(&self) -> String {
        format!("{self:?}")
    }

    fn cats(
        &self,
        x: MatRef<'_, f32>,
        weights: CatsMlpWeights<'_, T>,
        threshold: f32,
        y: MatMut<'_, f32>,
    ) -> Result<MlpReport> {
        cats_mlp(self, x, weights, threshold, y)
    }

    fn teal(
        &self,
        x: MatRef<'_, f32>,
        weights: TealMlpWeights<'_, T>,
        thresholds: TealThresholds,
        y: MatMut<'_, f32>,
    ) -> Result<MlpReport> {
        teal_mlp(self, x, weights, thresholds, y)
    }

    fn tolerance(&self, hidden: usize, active: usize, propagated: f64, direct: f64, _: f64) -> f64 {
        mlp_tolerance(hidden, active, propagated, direct)
    }
}

fn cats_everywhere(cpu: &Cpu) {
    cats_shapes_batches_and_thresholds(cpu);
}

fn teal_everywhere(cpu: &Cpu) {
    teal_shapes_batches_and_thresholds(cpu);
}

fn real_sizes(cpu: &Cpu) {
    real_model_sizes(cpu);
}

fn bad_inputs(cpu: &Cpu) {
    let layer = Layer::<f32>::new(8, 4, 1);
    let x = vec![0.0; 5 * 4];
    let mut y = vec![0.0; 5 * 4];
    let five = cats_mlp(
        cpu,
        MatRef::from_slice(&x, 5, 4).unwrap(),
        layer.cats(),
        0.0,
        MatMut::from_slice(&mut y, 5, 4).unwrap(),
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
    );
    assert!(matches!(
        y_shape,
        Err(Error::ShapeMismatch { what: "y", .. })
    ));
}

isa_tests!(cats_everywhere, teal_everywhere, real_sizes, bad_inputs);
