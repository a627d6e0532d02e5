//! Every GEMV kernel, on every kernel variant and element type: the CPU suite's own bodies
//! (`kernels_testkit::gemv`), run through the GPU, and what only the GPU has (pages, variants,
//! device limits).

use half::f16;
use kernels_core::{Error, MatRef, Result};
use kernels_testkit::gemv::{
    GemvBackend, bad_inputs, check_sparse, edge_shapes, real_model_sizes, special_values,
    transposed_dense,
};
use kernels_testkit::gpu_tests;
use kernels_testkit::{bits, normal};
use kernels_wgpu::gemv::{gathered_gemv, gemv, gemv_t, gemv_tolerance, sparse_input_gemv};
use kernels_wgpu::{Context, GpuElement, GpuTensor};

fn upload<T: GpuElement>(ctx: &Context, data: &[T], rows: usize, cols: usize) -> GpuTensor<T> {
    GpuTensor::from_matrix(ctx, MatRef::from_slice(data, rows, cols).unwrap()).unwrap()
}

/// Runs `op` on `y`'s contents uploaded, and downloads the result into `y`.
fn into_host(
    ctx: &Context,
    y: &mut [f32],
    op: impl FnOnce(&mut GpuTensor<f32>) -> Result<()>,
) -> Result<()> {
    let mut device = GpuTensor::from_slice(ctx, y)?;
    op(&mut device)?;
    y.copy_from_slice(&device.to_vec_blocking(ctx)?);
    Ok(())
}

/// The GPU backend, for the shared bodies.
struct OnGpu<'a>(&'a Context);

impl<T: GpuElement> GemvBackend<T> for OnGpu<'_> {
    fn name(&self) -> String {
        format!("{} {:?}", self.0.adapter_info().name, self.0.features())
    }

    fn gemv(&self, w: MatRef<'_, T>, x: &[f32], y: &mut [f32]) -> Result<()> {
        let (w, x) = (
            GpuTensor::from_matrix(self.0, w)?,
            GpuTensor::from_slice(self.0, x)?,
        );
        into_host(self.0, y, |y| gemv(self.0, &w, &x, y))
    }

    fn gathered(&self, w: MatRef<'_, T>, x: &[f32], rows: &[u32], out: &mut [f32]) -> Result<()> {
        let (w, x) = (
            GpuTensor::from_matrix(self.0, w)?,
            GpuTensor::from_slice(self.0, x)?,
        );
        into_host(self.0, out, |out| gathered_gemv(self.0, &w, &x, rows, out))
    }

    fn sparse_input(
        &self,
        w_t: MatRef<'_, T>,
        x: &[f32],
        threshold: f32,
        y: &mut [f32],
    ) -> Result<()> {
        let (w_t, x) = (
            GpuTensor::from_matrix(self.0, w_t)?,
            GpuTensor::from_slice(self.0, x)?,
        );
        into_host(self.0, y, |y| {
            sparse_input_gemv(self.0, &w_t, &x, threshold, y)
        })
    }

    fn gemv_t(&self, w_t: MatRef<'_, T>, x: &[f32], y: &mut [f32]) -> Result<()> {
        let (w_t, x) = (
            GpuTensor::from_matrix(self.0, w_t)?,
            GpuTensor::from_slice(self.0, x)?,
        );
        into_host(self.0, y, |y| gemv_t(self.0, &w_t, &x, y))
    }

    fn tolerance(&self, n: usize, abs_sum: f64) -> f64 {
        gemv_tolerance(n, abs_sum)
    }

    /// The variants are compared in `variants_agree_bit_for_bit`, repeats in
    /// `same_inputs_same_bits`.
    fn alternate(&self) -> Option<Self> {
        None
    }
}

fn edge(ctx: &Context) {
    edge_shapes(&OnGpu(ctx));
}

fn real_sizes(ctx: &Context) {
    // Real layers cut into 8 KiB pages are hundreds of dispatches, minutes on a software GPU;
    // the edge shapes and splits cover paging.
    if ctx.page_bytes() < kernels_testkit::gpu::SMALL_PAGE_BYTES * 8 {
        eprintln!("real sizes skipped on {} B pages", ctx.page_bytes());
        return;
    }
    real_model_sizes(&OnGpu(ctx));
}

fn transposed(ctx: &Context) {
    transposed_dense(&OnGpu(ctx));
}

fn specials(ctx: &Context) {
    special_values(&OnGpu(ctx));
}

fn thresholds_and_splits(ctx: &Context) {
    // Rows past one split (256) and a prime count of columns past one workgroup.
    for t in [-1.0, 0.0, 0.3, 1.5] {
        check_sparse::<f16, OnGpu>(&OnGpu(ctx), 700, 263, t, 11);
        check_sparse::<f32, OnGpu>(&OnGpu(ctx), 513, 257, t, 12);
    }
}

fn same_inputs_same_bits(ctx: &Context) {
    let (rows, cols) = (300, 70);
    let w_host = normal::<f16>(rows * cols, 31);
    let w = upload(ctx, &w_host, rows, cols);
    let x = GpuTensor::from_slice(ctx, &normal::<f32>(cols, 32)).unwrap();
    let x_t = GpuTensor::from_slice(ctx, &normal::<f32>(rows, 33)).unwrap();
    let run = || {
        let mut y = GpuTensor::<f32>::zeros(ctx, rows, 1).unwrap();
        gemv(ctx, &w, &x, &mut y).unwrap();
        let mut y_t = GpuTensor::<f32>::zeros(ctx, cols, 1).unwrap();
        sparse_input_gemv(ctx, &w, &x_t, 0.4, &mut y_t).unwrap();
        [y, y_t].map(|t| bits(&t.to_vec_blocking(ctx).unwrap()))
    };
    assert_eq!(run(), run());
}

fn variants_agree_bit_for_bit(ctx: &Context) {
    // The ballot sweep and the `array<f16>` loads add the same products in the same order as the
    // portable kernels: run the same problem on a portable context with the same page size (the
    // sweep's partial sums follow the pages) and compare bits.
    let portable = Context::new_blocking(kernels_wgpu::ContextOptions {
        shader_f16: kernels_wgpu::FeatureUse::Off,
        subgroups: kernels_wgpu::FeatureUse::Off,
        max_page_bytes: Some(ctx.page_bytes()),
        ..kernels_wgpu::ContextOptions::default()
    })
    .unwrap();
    let (rows, cols) = (300, 70);
    let w_host = normal::<f16>(rows * cols, 21);
    let x_host = normal::<f32>(rows, 22);
    let run = |ctx: &Context| {
        let w = upload(ctx, &w_host, rows, cols);
        let x = GpuTensor::from_slice(ctx, &x_host).unwrap();
        let mut y = GpuTensor::<f32>::zeros(ctx, cols, 1).unwrap();
        sparse_input_gemv(ctx, &w, &x, 0.5, &mut y).unwrap();
        let x_cols = GpuTensor::from_slice(ctx, &x_host[..cols]).unwrap();
        let mut y_rows = GpuTensor::<f32>::zeros(ctx, rows, 1).unwrap();
        gemv(ctx, &w, &x_cols, &mut y_rows).unwrap();
        [y, y_rows].map(|t| bits(&t.to_vec_blocking(ctx).unwrap()))
    };
    assert_eq!(run(ctx), run(&portable));
}

fn device_limits(ctx: &Context) {
    bad_inputs(&OnGpu(ctx));
    // A row too wide for one storage binding is refused up front, not split mid-row.
    let too_wide = (ctx.page_bytes() / 4 + 1) as usize;
    if too_wide <= 1 << 20 {
        assert!(matches!(
            GpuTensor::<f32>::zeros(ctx, 1, too_wide),
            Err(Error::InvalidParam { name: "cols", .. })
        ));
    }
    // The device is still healthy after all of that.
    ctx.check().unwrap();
}

gpu_tests!(
    edge,
    real_sizes,
    transposed,
    specials,
    thresholds_and_splits,
    same_inputs_same_bits,
    variants_agree_bit_for_bit,
    device_limits
);
