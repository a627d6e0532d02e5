//! GEMV on the GPU: dense `y = W x`, gathered rows, and the dense or sparse-input (TEAL) sweep
//! over the transposed layout, the twins of `kernels_core::ops::sparse`'s references.
//!
//! # Contracts
//!
//! * `W` is `[out, in]` for [`gemv`] and [`gathered_gemv`]; `w_t` is `[in, out]` for [`gemv_t`]
//!   and [`sparse_input_gemv`], whose skipped rows (`|x_i| <= threshold`) are never read.
//! * Weights `f32`, `f16` or `bf16` (widened exactly); `x` and `y` `f32`; accumulation `f32`.
//!   Each output is within [`gemv_tolerance`] of the reference, and the same inputs give the same
//!   bits on a given device.
//! * `x` must fit one storage binding; `W` may be larger (it is processed page by page).

use kernels_core::backend::{validate_gathered_gemv, validate_gemv, validate_sparse_input_gemv};
use kernels_core::{Error, Result};
use kernels_wgsl::Family;

use crate::context::{Batch, Bind, Context, Kernel, Slot};
use crate::tensor::{GpuElement, GpuTensor};

/// Invocations per workgroup of the GEMV kernels (a power of two).
///
/// PERF: 256 invocations keep 8 warps (NVIDIA) or 4 waves (AMD) in flight per workgroup; fewer
/// leave the row-dot tree short of memory parallelism on 4096-wide rows.
pub(crate) const WORKGROUP: u32 = 256;

/// Rows of `w_t` one workgroup of the sweep covers before its partial sum is written.
///
/// PERF: a split gives each workgroup enough rows to stream while the grid (splits x column
/// groups) still fills the device: 4096 x 11008 makes 43 x 16 workgroups. The partial sums cost
/// `4 out` bytes per split, under 1 % of the weights.
const SPLIT_ROWS: u32 = 256;

/// Bound on `|y_i - y_ref_i|` for an output summing `n` products with `abs_sum = sum |w_ij x_j|`:
/// `(n + 1) u abs_sum + tiny`, `u = 2^-24`.
///
/// Any order of `n - 1` `f32` additions errs by at most `(n - 1) u abs_sum` (Higham, Thm. 4.4's
/// first-order bound), each product by `u` of its own size; the GPU's sum order (a tree in
/// [`gemv`], per-split chains in [`gemv_t`]) is fixed but not the reference's, so the bound
/// takes no credit for it. Widening f16 and bf16 is exact. `tiny` absorbs subnormal flushes,
/// which GPUs may apply.
///
/// ```
/// use kernels_wgpu::gemv::gemv_tolerance;
/// use kernels_wgpu::prelude::*;
/// let ctx = Context::new_blocking(ContextOptions::default())?;
/// let (w, x) = ([0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6], [1.0f32, -2.0, 3.0]);
/// let w_gpu = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&w, 2, 3)?)?;
/// let mut y = GpuTensor::<f32>::zeros(&ctx, 2, 1)?;
/// gemv(&ctx, &w_gpu, &GpuTensor::from_slice(&ctx, &x)?, &mut y)?;
/// for (row, y) in w.chunks(3).zip(y.to_vec_blocking(&ctx)?) {
///     let exact: f64 = row.iter().zip(&x).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
///     let abs_sum: f64 = row.iter().zip(&x).map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs()).sum();
///     assert!((f64::from(y) - exact).abs() <= gemv_tolerance(3, abs_sum));
/// }
/// # Ok::<(), Error>(())
/// ```
#[must_use]
pub fn gemv_tolerance(n: usize, abs_sum: f64) -> f64 {
    (n as f64 + 1.0) * f64::from(f32::EPSILON / 2.0) * abs_sum + 1e-30
}

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct GemvParams {
    pub rows: u32,
    pub cols: u32,
    pub row_stride: u32,
    pub first_row: u32,
    pub outputs: u32,
    pub split_rows: u32,
    pub split_base: u32,
    pub threshold: f32,
    pub x_stride: u32,
    pub out_stride: u32,
    pub pad: [u32; 2],
}

/// The samples one row-dot or sweep dispatch serves (a decode batch of 1 to 4): sample `b`'s
/// input vector starts at `b * x_stride` and its outputs at `b * out_stride`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Samples {
    pub count: usize,
    pub x_stride: usize,
    pub out_stride: usize,
}

impl Samples {
    pub(crate) const ONE: Self = Self {
        count: 1,
        x_stride: 0,
        out_stride: 0,
    };
}

// Slots: w, x, partials, gather, params, y.
const SLOTS: &[Slot] = &[
    Slot::Read,
    Slot::Read,
    Slot::ReadWrite,
    Slot::Read,
    Slot::Uniform,
    Slot::ReadWrite,
];

const fn kernel(entry: &'static str, needs_subgroups: bool) -> Kernel {
    Kernel {
        family: Family::Gemv,
        entry,
        slots: SLOTS,
        needs_subgroups,
    }
}

const ROW_DOT: Kernel = kernel("row_dot", false);
const CATS_UP: Kernel = kernel("cats_up", false);
pub(crate) const SILU_PRODUCT: Kernel = kernel("silu_product", false);
const COLUMN_SWEEP: Kernel = kernel("column_sweep", false);
const COLUMN_SWEEP_BALLOT: Kernel = kernel("column_sweep_ballot", true);
const SUM_SPLITS: Kernel = kernel("sum_splits", false);

/// The pipeline of `kernel` for weights of `T`: `gathered` row dots, `gated` sweeps, `samples`
/// per dispatch.
pub(crate) fn pipeline<T: GpuElement>(
    ctx: &Context,
    kernel: &Kernel,
    gathered: bool,
    gated: bool,
    samples: usize,
) -> Result<std::sync::Arc<crate::context::Pipeline>> {
    let native_f16 = ctx.native_f16(T::ENCODING);
    let mut constants = vec![("WORKGROUP", WORKGROUP)];
    // The f16 variant binds `array<f16>` and has no ELEMENT.
    if !native_f16 {
        constants.push(("ELEMENT", T::ENCODING));
    }
    if gathered {
        constants.push(("GATHERED", 1));
    }
    if gated {
        constants.push(("GATED", 1));
    }
    if samples > 1 {
        constants.push(("BATCH", samples as u32));
    }
    ctx.pipeline(kernel, native_f16, &constants)
}

/// What the row-dot kernels compute per output `o`.
#[derive(Clone, Copy)]
pub(crate) enum RowDot<'a> {
    /// `out[o] = W[o, :] . x`.
    Dense,
    /// `out[o] = W[rows[o], :] . x`, `rows` a `u32` buffer.
    Gathered(&'a wgpu::Buffer),
    /// CATS' up projection: with `a = silu(g[o])` (`g` an `f32` buffer), `out[o] = a W[o, :] . x`
    /// where `a` is active under `threshold`, else 0; `a` goes to `gates`.
    CatsUp {
        g: &'a wgpu::Buffer,
        threshold: f32,
        gates: &'a wgpu::Buffer,
    },
}

/// Records row dots of `w`'s pages against each sample's `x` into `out` (`outputs` entries per
/// sample; all whole buffers). An output whose row no page holds is left as it was.
pub(crate) fn record_row_dots<T: GpuElement>(
    batch: &mut Batch<'_>,
    w: &GpuTensor<T>,
    x: &wgpu::Buffer,
    how: RowDot<'_>,
    outputs: usize,
    samples: Samples,
    out: &wgpu::Buffer,
) -> Result<()> {
    let (kernel, gathered) = match how {
        RowDot::Dense => (&ROW_DOT, false),
        RowDot::Gathered(_) => (&ROW_DOT, true),
        RowDot::CatsUp { .. } => (&CATS_UP, false),
    };
    let pipeline = pipeline::<T>(batch.ctx(), kernel, gathered, false, samples.count)?;
    let (aux, threshold, gates) = match how {
        RowDot::Dense => (Bind::Unused, 0.0, Bind::Unused),
        RowDot::Gathered(rows) => (Bind::Buffer(rows), 0.0, Bind::Unused),
        RowDot::CatsUp {
            g,
            threshold,
            gates,
        } => (Bind::Buffer(g), threshold, Bind::Buffer(gates)),
    };
    for (page, first_row, page_rows) in w.pages() {
        let params = batch.uniform(&GemvParams {
            rows: page_rows as u32,
            cols: w.cols() as u32,
            row_stride: w.cols() as u32,
            first_row: first_row as u32,
            outputs: outputs as u32,
            split_rows: 0,
            split_base: 0,
            threshold,
            x_stride: samples.x_stride as u32,
            out_stride: samples.out_stride as u32,
            pad: [0; 2],
        })?;
        let grid = batch.grid(outputs as u32);
        batch.dispatch(
            &pipeline,
            &[
                Bind::Buffer(page),
                Bind::Buffer(x),
                Bind::Buffer(out),
                aux.clone(),
                Bind::Buffer(&params),
                gates.clone(),
            ],
            grid,
        );
    }
    Ok(())
}

/// Row dots of `w` against `x` into `out`, submitted.
fn row_dots<T: GpuElement>(
    ctx: &Context,
    w: &GpuTensor<T>,
    x: &GpuTensor<f32>,
    rows: Option<&GpuTensor<u32>>,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    let outputs = out.len();
    let x_buffer = x.single_page("x")?;
    let out_buffer = out.single_page("y")?;
    let gather = match rows {
        Some(r) => r.single_page("rows")?,
        None => None,
    };
    let Some(out_buffer) = out_buffer else {
        return Ok(());
    };
    let mut batch = ctx.batch()?;
    let Some(x_buffer) = x_buffer else {
        // No input column: every output is an empty sum.
        batch.clear(out_buffer);
        return batch.submit();
    };
    if gather.is_some() {
        // An index no page holds is never written: start from zeros.
        batch.clear(out_buffer);
    }
    let how = gather.map_or(RowDot::Dense, RowDot::Gathered);
    record_row_dots(
        &mut batch,
        w,
        x_buffer,
        how,
        outputs,
        Samples::ONE,
        out_buffer,
    )?;
    batch.submit()
}

/// Dense GEMV `y = W x`, `W` `[out, in]` (the twin of `kernels_core::ops::sparse::gemv_ref`).
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let w = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3)?)?;
/// let x = GpuTensor::from_slice(&ctx, &[1.0f32, 0.0, -1.0])?;
/// let mut y = GpuTensor::<f32>::zeros(&ctx, 2, 1)?;
/// gemv(&ctx, &w, &x, &mut y)?;
/// assert_eq!(y.to_vec_blocking(&ctx)?, [-2.0, -2.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn gemv<T: GpuElement>(
    ctx: &Context,
    w: &GpuTensor<T>,
    x: &GpuTensor<f32>,
    y: &mut GpuTensor<f32>,
) -> Result<()> {
    validate_gemv(w.shape(), x.len(), y.len())?;
    row_dots(ctx, w, x, None, y)
}

/// Gathered-output GEMV: `out[k] = W[rows[k], :] . x` (the twin of `gathered_gemv_ref`). Row
/// indices may repeat and come in any order; an index past the last row is an error.
///
/// `rows` is given on the host (the op validates it) and uploaded; [`gathered_gemv_uploaded`]
/// takes indices already on the device.
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let w = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2)?)?;
/// let x = GpuTensor::from_slice(&ctx, &[1.0f32, 1.0])?;
/// let mut out = GpuTensor::<f32>::zeros(&ctx, 2, 1)?;
/// gathered_gemv(&ctx, &w, &x, &[2, 0], &mut out)?;
/// assert_eq!(out.to_vec_blocking(&ctx)?, [11.0, 3.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn gathered_gemv<T: GpuElement>(
    ctx: &Context,
    w: &GpuTensor<T>,
    x: &GpuTensor<f32>,
    rows: &[u32],
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    validate_gathered_gemv(w.shape(), x.len(), rows, out.len())?;
    let uploaded = GpuTensor::from_slice(ctx, rows)?;
    row_dots(ctx, w, x, Some(&uploaded), out)
}

/// [`gathered_gemv`] with row indices already on the device (a GPU-only form: on the CPU the
/// indices are host memory anyway). Indices are not read back to be checked: an index past the
/// last row yields 0 for its output (never an out-of-bounds read).
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let w = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2)?)?;
/// let x = GpuTensor::from_slice(&ctx, &[1.0f32, 1.0])?;
/// // Indices a previous kernel left on the device; 7 is past the last row.
/// let rows = GpuTensor::from_slice(&ctx, &[2u32, 7])?;
/// let mut out = GpuTensor::<f32>::zeros(&ctx, 2, 1)?;
/// gathered_gemv_uploaded(&ctx, &w, &x, &rows, &mut out)?;
/// assert_eq!(out.to_vec_blocking(&ctx)?, [11.0, 0.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn gathered_gemv_uploaded<T: GpuElement>(
    ctx: &Context,
    w: &GpuTensor<T>,
    x: &GpuTensor<f32>,
    rows: &GpuTensor<u32>,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    x.expect_len("x", w.cols())?;
    out.expect_len("out", rows.len())?;
    row_dots(ctx, w, x, Some(rows), out)
}

/// Dense GEMV through the transposed layout: `y = W_t^T x`, `w_t` `[in, out]` (the twin of
/// `gemv_t_ref`).
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let w_t = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0], 3, 2)?)?;
/// let x = GpuTensor::from_slice(&ctx, &[1.0f32, 0.0, -1.0])?;
/// let mut y = GpuTensor::<f32>::zeros(&ctx, 2, 1)?;
/// gemv_t(&ctx, &w_t, &x, &mut y)?;
/// assert_eq!(y.to_vec_blocking(&ctx)?, [-2.0, -2.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn gemv_t<T: GpuElement>(
    ctx: &Context,
    w_t: &GpuTensor<T>,
    x: &GpuTensor<f32>,
    y: &mut GpuTensor<f32>,
) -> Result<()> {
    sweep(ctx, w_t, x, f32::NEG_INFINITY, y)
}

/// Sparse-input GEMV (TEAL): `y = sum over active i of x_i w_t[i, :]`, reading no skipped row
/// (the twin of `sparse_input_gemv_ref`). Input `i` is active iff `!(|x_i| <= threshold)`:
/// strictly above, or NaN, so `threshold = 0` skips exact zeros and a negative one is dense.
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let w_t = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2)?)?;
/// let x = GpuTensor::from_slice(&ctx, &[0.5f32, -0.1, 2.0])?;
/// let mut y = GpuTensor::<f32>::zeros(&ctx, 2, 1)?;
/// sparse_input_gemv(&ctx, &w_t, &x, 0.2, &mut y)?;
/// assert_eq!(y.to_vec_blocking(&ctx)?, [10.5, 13.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn sparse_input_gemv<T: GpuElement>(
    ctx: &Context,
    w_t: &GpuTensor<T>,
    x: &GpuTensor<f32>,
    threshold: f32,
    y: &mut GpuTensor<f32>,
) -> Result<()> {
    sweep(ctx, w_t, x, threshold, y)
}

fn sweep<T: GpuElement>(
    ctx: &Context,
    w_t: &GpuTensor<T>,
    x: &GpuTensor<f32>,
    threshold: f32,
    y: &mut GpuTensor<f32>,
) -> Result<()> {
    validate_sparse_input_gemv(w_t.shape(), x.len(), threshold, y.len())?;
    let (Some(y_buffer), x_buffer) = (y.single_page("y")?, x.single_page("x")?) else {
        return Ok(());
    };
    let mut batch = ctx.batch()?;
    match x_buffer {
        Some(x_buffer) => record_sweep(
            &mut batch,
            w_t,
            x_buffer,
            None,
            threshold,
            Samples::ONE,
            y_buffer,
        )?,
        None => batch.clear(y_buffer),
    }
    batch.submit()
}

/// Records, per sample, `y = sum over active i of v_i w_t[i, :]` into `batch`, where row `i` is
/// active iff `!(|x_i| <= threshold)` and `v` is `x`, or `values` where given (CATS: the test on
/// `a`, the product with `h`); a row active in several samples is read once. `w_t` has at least
/// one row; all are whole buffers.
pub(crate) fn record_sweep<T: GpuElement>(
    batch: &mut Batch<'_>,
    w_t: &GpuTensor<T>,
    x: &wgpu::Buffer,
    values: Option<&wgpu::Buffer>,
    threshold: f32,
    samples: Samples,
    y: &wgpu::Buffer,
) -> Result<()> {
    let ctx = batch.ctx();
    let cols = w_t.cols();
    // Every page is split alike; the partial sums of all splits must fit one binding.
    let page_splits = |rows: usize| rows.div_ceil(SPLIT_ROWS as usize);
    let splits: usize = w_t.pages().map(|(_, _, rows)| page_splits(rows)).sum();
    let partial_bytes = (splits * samples.count) as u64 * cols as u64 * 4;
    if partial_bytes > ctx.binding_bytes() {
        return Err(Error::InvalidParam {
            name: "w_t",
            value: w_t.len() as f64,
            expected: "a matrix whose per-split partial sums (4 * batch * out * in / 256 bytes) fit one \
                       storage binding",
        });
    }
    let sweep_kernel = if ctx.features().subgroups {
        &COLUMN_SWEEP_BALLOT
    } else {
        &COLUMN_SWEEP
    };
    let gated = values.is_some();
    let sweep = pipeline::<T>(ctx, sweep_kernel, false, gated, samples.count)?;
    let sum = pipeline::<T>(ctx, &SUM_SPLITS, false, false, samples.count)?;
    let partials = batch.scratch(partial_bytes)?;
    let column_groups = (cols as u32).div_ceil(WORKGROUP);
    let values = values.map_or(Bind::Unused, Bind::Buffer);
    let mut split_base = 0;
    for (page, first_row, rows) in w_t.pages() {
        let params = batch.uniform(&GemvParams {
            rows: rows as u32,
            cols: cols as u32,
            row_stride: cols as u32,
            first_row: first_row as u32,
            outputs: 0,
            split_rows: SPLIT_ROWS,
            split_base,
            threshold,
            x_stride: samples.x_stride as u32,
            out_stride: samples.out_stride as u32,
            pad: [0; 2],
        })?;
        batch.dispatch(
            &sweep,
            &[
                Bind::Buffer(page),
                Bind::Buffer(x),
                Bind::Buffer(&partials),
                values.clone(),
                Bind::Buffer(&params),
                Bind::Unused,
            ],
            (column_groups, page_splits(rows) as u32),
        );
        split_base += page_splits(rows) as u32;
    }
    let params = batch.uniform(&GemvParams {
        rows: 0,
        cols: cols as u32,
        row_stride: cols as u32,
        first_row: 0,
        outputs: split_base,
        split_rows: SPLIT_ROWS,
        split_base: 0,
        threshold,
        x_stride: samples.x_stride as u32,
        out_stride: samples.out_stride as u32,
        pad: [0; 2],
    })?;
    batch.dispatch(
        &sum,
        &[
            Bind::Unused,
            Bind::Unused,
            Bind::Buffer(&partials),
            Bind::Unused,
            Bind::Buffer(&params),
            Bind::Buffer(y),
        ],
        (column_groups, 1),
    );
    Ok(())
}
