//! The CATS and TEAL MLPs on every kernel variant and element type: the CPU suite's own bodies
//! (`kernels_testkit::mlp`), run through the GPU.

use kernels_core::ops::sparse::{CatsMlpWeights, MlpReport, TealMlpWeights, TealThresholds};
use kernels_core::{Error, MatMut, MatRef, Result};
use kernels_testkit::gpu_tests;
use kernels_testkit::mlp::{
    Layer, MlpBackend, cats_shapes_batches_and_thresholds, real_model_sizes,
    teal_shapes_batches_and_thresholds,
};
use kernels_wgpu::mlp::{MlpScratch, cats_mlp, mlp_tolerance, teal_mlp};
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

/// The GPU backend, for the shared bodies.
struct OnGpu<'a>(&'a Context);

impl<T: GpuElement> MlpBackend<T> for OnGpu<'_> {
    fn name(&self) -> String {
        format!("{} {:?}", self.0.adapter_info().name, self.0.features())
    }

    fn cats(
        &self,
        x: MatRef<'_, f32>,
        weights: CatsMlpWeights<MatRef<'_, T>>,
        threshold: f32,
        y: MatMut<'_, f32>,
    ) -> Result<MlpReport> {
        let [gate, up, down_t] =
            [weights.gate, weights.up, weights.down_t].map(|m| upload(self.0, m));
        let (gate, up, down_t) = (gate?, up?, down_t?);
        let x_gpu = upload(self.0, x)?;
        let mut y_gpu = GpuTensor::<f32>::zeros(self.0, y.rows(), y.cols())?;
        let weights = CatsMlpWeights {
            gate: &gate,
            up: &up,
            down_t: &down_t,
        };
        let mut scratch = MlpScratch::new();
        cats_mlp(self.0, &x_gpu, weights, threshold, &mut y_gpu, &mut scratch)?;
        download(self.0, &y_gpu, y)?;
        block_on(scratch.report(self.0))
    }

    fn teal(
        &self,
        x: MatRef<'_, f32>,
        weights: TealMlpWeights<MatRef<'_, T>>,
        thresholds: TealThresholds,
        y: MatMut<'_, f32>,
    ) -> Result<MlpReport> {
        let [gate_t, up_t, down_t] =
            [weights.gate_t, weights.up_t, weights.down_t].map(|m| upload(self.0, m));
        let (gate_t, up_t, down_t) = (gate_t?, up_t?, down_t?);
        let x_gpu = upload(self.0, x)?;
        let mut y_gpu = GpuTensor::<f32>::zeros(self.0, y.rows(), y.cols())?;
        let weights = TealMlpWeights {
            gate_t: &gate_t,
            up_t: &up_t,
            down_t: &down_t,
        };
        let mut scratch = MlpScratch::new();
        teal_mlp(
            self.0,
            &x_gpu,
            weights,
            thresholds,
            &mut y_gpu,
            &mut scratch,
        )?;
        download(self.0, &y_gpu, y)?;
        block_on(scratch.report(self.0))
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
    cats_shapes_batches_and_thresholds(&OnGpu(ctx));
}

fn teal_everywhere(ctx: &Context) {
    teal_shapes_batches_and_thresholds(&OnGpu(ctx));
}

fn real_sizes(ctx: &Context) {
    // A real layer cut into 8 KiB pages is hundreds of dispatches per projection, minutes on a
    // software GPU; the other bodies cover paging.
    if ctx.page_bytes() < kernels_testkit::gpu::SMALL_PAGE_BYTES * 8 {
        eprintln!("real sizes skipped on {} B pages", ctx.page_bytes());
        return;
    }
    real_model_sizes(&OnGpu(ctx));
}

fn bad_inputs(ctx: &Context) {
    let layer = Layer::<f32>::new(8, 4, 1);
    let upload_all = |w: CatsMlpWeights<MatRef<'_, f32>>| {
        [w.gate, w.up, w.down_t].map(|m| GpuTensor::from_matrix(ctx, m).unwrap())
    };
    let [gate, up, down_t] = upload_all(layer.cats());
    let weights = CatsMlpWeights {
        gate: &gate,
        up: &up,
        down_t: &down_t,
    };
    let scratch = &mut MlpScratch::new();
    let five = GpuTensor::<f32>::zeros(ctx, 5, 4).unwrap();
    let mut y5 = GpuTensor::<f32>::zeros(ctx, 5, 4).unwrap();
    assert!(matches!(
        cats_mlp(ctx, &five, weights, 0.0, &mut y5, scratch),
        Err(Error::InvalidParam { name: "batch", .. })
    ));
    let one = GpuTensor::<f32>::zeros(ctx, 1, 4).unwrap();
    let mut y1 = GpuTensor::<f32>::zeros(ctx, 1, 4).unwrap();
    assert!(matches!(
        cats_mlp(ctx, &one, weights, f32::NAN, &mut y1, scratch),
        Err(Error::InvalidParam {
            name: "threshold",
            ..
        })
    ));
    let short_up =
        GpuTensor::from_matrix(ctx, MatRef::from_slice(&layer.up[..28], 7, 4).unwrap()).unwrap();
    let wrong = CatsMlpWeights {
        up: &short_up,
        ..weights
    };
    assert!(matches!(
        cats_mlp(ctx, &one, wrong, 0.0, &mut y1, scratch),
        Err(Error::ShapeMismatch { what: "w_up", .. })
    ));
    let mut y2 = GpuTensor::<f32>::zeros(ctx, 2, 4).unwrap();
    assert!(matches!(
        cats_mlp(ctx, &one, weights, 0.0, &mut y2, scratch),
        Err(Error::ShapeMismatch { what: "y", .. })
    ));
    let teal = TealMlpWeights {
        gate_t: &gate,
        up_t: &up,
        down_t: &down_t,
    };
    assert!(matches!(
        teal_mlp(
            ctx,
            &one,
            teal,
            TealThresholds::new(0.0, 0.0),
            &mut y1,
            scratch
        ),
        Err(Error::ShapeMismatch { .. })
    ));
    // Nothing ran: the scratch reports nothing.
    assert_eq!(block_on(scratch.report(ctx)).unwrap(), MlpReport::default());
    ctx.check().unwrap();
}

/// A decode loop: each token written into the same input tensor, the MLP recorded without a
/// read-back, the report read only at the end (it is the last token's).
fn decode_loop_reuses_its_tensors(ctx: &Context) {
    let layer = Layer::<f32>::new(64, 16, 5);
    let [gate, up, down_t] = [&layer.gate, &layer.up, &layer.down_t]
        .map(|w| GpuTensor::from_matrix(ctx, MatRef::from_slice(w, 64, 16).unwrap()).unwrap());
    let weights = CatsMlpWeights {
        gate: &gate,
        up: &up,
        down_t: &down_t,
    };
    let tokens = kernels_testkit::normal::<f32>(3 * 16, 6);
    let mut x = GpuTensor::<f32>::zeros(ctx, 1, 16).unwrap();
    let mut y = GpuTensor::<f32>::zeros(ctx, 1, 16).unwrap();
    let mut scratch = MlpScratch::new();
    let mut host = vec![0.0f32; 16];
    let mut host_scratch = kernels_cpu::mlp::MlpScratch::new();
    let cpu = kernels_cpu::Cpu::detect();
    for token in tokens.chunks(16) {
        x.write(ctx, token).unwrap();
        cats_mlp(ctx, &x, weights, 0.2, &mut y, &mut scratch).unwrap();
        kernels_cpu::mlp::cats_mlp(
            &cpu,
            MatRef::from_slice(token, 1, 16).unwrap(),
            layer.cats(),
            0.2,
            MatMut::from_slice(&mut host, 1, 16).unwrap(),
            &mut host_scratch,
        )
        .unwrap();
    }
    let got = y.to_vec_blocking(ctx).unwrap();
    for (g, h) in got.iter().zip(&host) {
        assert!((g - h).abs() <= 1e-4 * (1.0 + h.abs()), "{g} vs {h}");
    }
    assert_eq!(
        block_on(scratch.report(ctx)).unwrap(),
        *host_scratch.report()
    );
}

/// A batch runs in one pass per matrix, yet each sample's output is the bits that sample gets
/// alone, and the report is the union of the samples' reports.
fn batches_give_each_sample_its_own_bits(ctx: &Context) {
    let (inter, hidden) = (300, 70);
    let layer = Layer::<f32>::new(inter, hidden, 21);
    let shape = |m: &[f32], rows, cols| {
        GpuTensor::from_matrix(ctx, MatRef::from_slice(m, rows, cols).unwrap()).unwrap()
    };
    let (gate, up, down_t) = (
        shape(&layer.gate, inter, hidden),
        shape(&layer.up, inter, hidden),
        shape(&layer.down_t, inter, hidden),
    );
    let (gate_t, up_t) = (
        shape(&layer.transposed(&layer.gate), hidden, inter),
        shape(&layer.transposed(&layer.up), hidden, inter),
    );
    let cats = CatsMlpWeights {
        gate: &gate,
        up: &up,
        down_t: &down_t,
    };
    let teal = TealMlpWeights {
        gate_t: &gate_t,
        up_t: &up_t,
        down_t: &down_t,
    };
    let thresholds = TealThresholds::new(0.6, 0.5);
    for samples in 2..=4 {
        let x_host = kernels_testkit::normal::<f32>(samples * hidden, 22 + samples as u64);
        let x = shape(&x_host, samples, hidden);
        for use_teal in [false, true] {
            let run = |x: &GpuTensor<f32>, rows: usize| {
                let mut y = GpuTensor::<f32>::zeros(ctx, rows, hidden).unwrap();
                let mut scratch = MlpScratch::new();
                if use_teal {
                    teal_mlp(ctx, x, teal, thresholds, &mut y, &mut scratch).unwrap();
                } else {
                    cats_mlp(ctx, x, cats, 0.4, &mut y, &mut scratch).unwrap();
                }
                (
                    y.to_vec_blocking(ctx).unwrap(),
                    block_on(scratch.report(ctx)).unwrap(),
                )
            };
            let (together, report) = run(&x, samples);
            let mut union = vec![false; inter];
            for (b, row) in x_host.chunks(hidden).enumerate() {
                let (alone, alone_report) = run(&shape(row, 1, hidden), 1);
                assert_eq!(
                    kernels_testkit::bits(&together[b * hidden..][..hidden]),
                    kernels_testkit::bits(&alone),
                    "teal {use_teal} batch {samples} sample {b}"
                );
                for &i in &alone_report.active {
                    union[i as usize] = true;
                }
            }
            let expect: Vec<u32> = (0..inter as u32).filter(|&i| union[i as usize]).collect();
            assert_eq!(
                report.active, expect,
                "teal {use_teal} batch {samples}: report"
            );
            assert!(
                report.active.len() < inter,
                "some row was skipped by every sample"
            );
        }
    }
}

gpu_tests!(
    batches_give_each_sample_its_own_bits,
    cats_everywhere,
    teal_everywhere,
    real_sizes,
    bad_inputs,
    decode_loop_reuses_its_tensors
);
