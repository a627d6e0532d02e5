//! The CATS and TEAL MLPs on every kernel variant and element type: the CPU suite's own bodies
//! (`common::cpu::mlp`), run through the GPU.

mod common;

use common::cpu::mlp::{
    Layer, MlpBackend, cats_shapes_batches_and_thresholds, real_model_sizes,
    teal_shapes_batches_and_thresholds,
};
use kernels_core::ops::sparse::{CatsMlpWeights, MlpReport, TealMlpWeights, TealThresholds};
use kernels_core::{Error, MatMut, MatRef, Result};
use kernels_wgpu::mlp::{GpuCatsMlp, GpuTealMlp, cats_mlp, mlp_tolerance, teal_mlp};
use kernels_wgpu::{Context, GpuElement, GpuTensor, block_on};

fn upload<T: GpuElement>(ctx: &Context, m: MatRef<'_, T>) -> Result<GpuTensor<T>> {
    GpuTensor::from_matrix(ctx, m)
}

fn download(ctx: &Context, t: &GpuTensor<f32>, mut y: MatMut<'_, f32>) -> Result<()> {
    let values = t.to_vec_blocking(ctx)?;
    let cols = y.cols().max(1);
    for (r, row) in values.chunks(cols).enumerate().take(y.rows()) {
        y.row_mut(r).copy_from_slice(row);
    }
    Ok(())
}

impl<T: GpuElement> MlpBackend<T> for Context {
    fn name(&self) -> String {
        format!("{} {:?}", self.adapter_info().name, self.features())
    }

    fn cats(
        &self,
        x: MatRef<'_, f32>,
        weights: CatsMlpWeights<'_, T>,
        threshold: f32,
        y: MatMut<'_, f32>,
    ) -> Result<MlpReport> {
        let [gate, up, down_t] =
            [weights.gate, weights.up, weights.down_t].map(|m| upload(self, m));
        let (gate, up, down_t) = (gate?, up?, down_t?);
        let x_gpu = upload(self, x)?;
        let mut y_gpu = GpuTensor::<f32>::zeros(self, y.rows(), y.cols())?;
        let weights = GpuCatsMlp {
            gate: &gate,
            up: &up,
            down_t: &down_t,
        };
        let report = block_on(cats_mlp(self, &x_gpu, weights, threshold, &mut y_gpu))?;
        download(self, &y_gpu, y)?;
        Ok(report)
    }

    fn teal(
        &self,
        x: MatRef<'_, f32>,
        weights: TealMlpWeights<'_, T>,
        thresholds: TealThresholds,
        y: MatMut<'_, f32>,
    ) -> Result<MlpReport> {
        let [gate_t, up_t, down_t] =
            [weights.gate_t, weights.up_t, weights.down_t].map(|m| upload(self, m));
        let (gate_t, up_t, down_t) = (gate_t?, up_t?, down_t?);
        let x_gpu = upload(self, x)?;
        let mut y_gpu = GpuTensor::<f32>::zeros(self, y.rows(), y.cols())?;
        let weights = GpuTealMlp {
            gate_t: &gate_t,
            up_t: &up_t,
            down_t: &down_t,
        };
        let report = block_on(teal_mlp(self, &x_gpu, weights, thresholds, &mut y_gpu))?;
        download(self, &y_gpu, y)?;
        Ok(report)
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

fn cats_everywhere(ctx: &Context) {
    cats_shapes_batches_and_thresholds(ctx);
}

fn teal_everywhere(ctx: &Context) {
    teal_shapes_batches_and_thresholds(ctx);
}

fn real_sizes(ctx: &Context) {
    // A real layer cut into 8 KiB pages is hundreds of dispatches per projection, minutes on a
    // software GPU; the other bodies cover paging.
    if ctx.page_bytes() < common::SMALL_PAGE_BYTES * 8 {
        eprintln!("real sizes skipped on {} B pages", ctx.page_bytes());
        return;
    }
    real_model_sizes(ctx);
}

fn bad_inputs(ctx: &Context) {
    let layer = Layer::<f32>::new(8, 4, 1);
    let upload_all = |w: CatsMlpWeights<'_, f32>| {
        [w.gate, w.up, w.down_t].map(|m| GpuTensor::from_matrix(ctx, m).unwrap())
    };
    let [gate, up, down_t] = upload_all(layer.cats());
    let weights = GpuCatsMlp {
        gate: &gate,
        up: &up,
        down_t: &down_t,
    };
    let five = GpuTensor::<f32>::zeros(ctx, 5, 4).unwrap();
    let mut y5 = GpuTensor::<f32>::zeros(ctx, 5, 4).unwrap();
    assert!(matches!(
        block_on(cats_mlp(ctx, &five, weights, 0.0, &mut y5)),
        Err(Error::InvalidParam { name: "batch", .. })
    ));
    let one = GpuTensor::<f32>::zeros(ctx, 1, 4).unwrap();
    let mut y1 = GpuTensor::<f32>::zeros(ctx, 1, 4).unwrap();
    assert!(matches!(
        block_on(cats_mlp(ctx, &one, weights, f32::NAN, &mut y1)),
        Err(Error::InvalidParam {
            name: "threshold",
            ..
        })
    ));
    let short_up =
        GpuTensor::from_matrix(ctx, MatRef::from_slice(&layer.up[..28], 7, 4).unwrap()).unwrap();
    let wrong = GpuCatsMlp {
        up: &short_up,
        ..weights
    };
    assert!(matches!(
        block_on(cats_mlp(ctx, &one, wrong, 0.0, &mut y1)),
        Err(Error::ShapeMismatch { what: "w_up", .. })
    ));
    let mut y2 = GpuTensor::<f32>::zeros(ctx, 2, 4).unwrap();
    assert!(matches!(
        block_on(cats_mlp(ctx, &one, weights, 0.0, &mut y2)),
        Err(Error::ShapeMismatch { what: "y", .. })
    ));
    let teal = GpuTealMlp {
        gate_t: &gate,
        up_t: &up,
        down_t: &down_t,
    };
    assert!(matches!(
        block_on(teal_mlp(
            ctx,
            &one,
            teal,
            TealThresholds::new(0.0, 0.0),
            &mut y1
        )),
        Err(Error::ShapeMismatch { .. })
    ));
    ctx.check().unwrap();
}

gpu_tests!(cats_everywhere, teal_everywhere, real_sizes, bad_inputs);
