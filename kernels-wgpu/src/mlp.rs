//! The CATS and TEAL MLPs on the GPU for a decode batch of 1 to 4, the twins of
//! `kernels_core::ops::sparse::{cats_mlp_ref, teal_mlp_ref}`.
//!
//! # Contracts
//!
//! * CATS: `g = W_gate x` (dense row dots), `a = silu(g)`, then one workgroup per intermediate
//!   row computes `h = a (W_up[i, :] . x)` only where `a` is active (an inactive row of `W_up` is
//!   never read), and the down projection sweeps `W_down_t` reading only the active rows. TEAL:
//!   two sparse-input sweeps (gate, up) on `x`, `h = silu(g) u`, and a sparse-input sweep of
//!   `W_down_t` on `h`.
//! * Each output is within [`mlp_tolerance`] of the reference, given an activity pattern that
//!   agrees with it: a row whose `|a|` (or `|h|`) lies within rounding of the threshold may be
//!   decided either way, as on the CPU.
//! * The samples of a batch run together: each kernel pass serves all of them, so a row active in
//!   several samples is read once per matrix (as the CPU's batch AXPY does), and each sample's
//!   products are added in the order a batch of one adds them (same bits as running the samples
//!   one by one).
//! * A call records its dispatches and submits them; it reads nothing back. The rows it read are
//!   left on the device in the caller's [`MlpScratch`], which reads them back only when asked
//!   ([`MlpScratch::report`]): a decode loop pays no host round trip per token.

use kernels_core::Result;
use kernels_core::backend::{validate_cats_mlp, validate_teal_mlp};
pub use kernels_core::ops::sparse::{CatsMlpWeights, MlpReport, TealMlpWeights, TealThresholds};
use kernels_core::ops::sparse::{MAX_MLP_BATCH, is_active};

use crate::context::{Batch, Bind};
use crate::gemv::{
    GemvParams, RowDot, SILU_PRODUCT, Samples, WORKGROUP, gemv_tolerance, pipeline,
    record_row_dots, record_sweep,
};
use crate::{Context, GpuElement, GpuTensor};

/// Bound on `|y_j - y_ref_j|` of an MLP output, as `kernels_cpu::mlp::mlp_tolerance` with WGSL's
/// looser `exp`.
///
/// * `propagated = sum_i (|a_i| S_up_i + 1.1 |u_i| S_gate_i) |w_down_t[i, j]|`: how the `f32`
///   rounding of the gate and up dots (absolute sums `S`) reaches `y_j`, each a
///   [`gemv_tolerance`] of `hidden` terms;
/// * `direct = sum_i |h_i w_down_t[i, j]|` over the `active` rows: the scale of the down
///   projection's sum and of the roundings in SiLU and `h = a u`;
/// * `max_gate = max |g_i|`: WGSL allows `exp(x)` an error of `3 + 2 |x|` ulp, which reaches
///   `silu` relatively at most that much, plus 5 ulp for the division, the product and the sums
///   into `h`.
///
/// ```
/// use kernels_wgpu::mlp::mlp_tolerance;
/// // The same arguments as the CPU's bound; large gates widen it.
/// let (quiet, loud) = (mlp_tolerance(576, 768, 10.0, 5.0, 3.0), mlp_tolerance(576, 768, 10.0, 5.0, 30.0));
/// assert!(quiet < loud && loud < 1e-3);
/// ```
#[must_use]
pub fn mlp_tolerance(
    hidden: usize,
    active: usize,
    propagated: f64,
    direct: f64,
    max_gate: f64,
) -> f64 {
    let u = f64::from(f32::EPSILON / 2.0);
    gemv_tolerance(hidden, propagated)
        + gemv_tolerance(active, direct)
        + (8.0 + 2.0 * max_gate) * u * direct
}

/// Where an MLP call leaves, on the device, what it read: per sample the vector whose activity
/// decides the rows (CATS: `a = silu(g)`; TEAL: `h`), read back and turned into an [`MlpReport`]
/// only when [`Self::report`] is asked. Owned by the caller and reused call after call.
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let (inter, hidden) = (4, 2);
/// let gate = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, -1.0], inter, hidden)?)?;
/// let up = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32; 8], inter, hidden)?)?;
/// let down_t = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32; 8], inter, hidden)?)?;
/// let weights = CatsMlpWeights { gate: &gate, up: &up, down_t: &down_t };
/// let mut x = GpuTensor::<f32>::zeros(&ctx, 1, hidden)?;
/// let mut y = GpuTensor::<f32>::zeros(&ctx, 1, hidden)?;
/// let mut scratch = MlpScratch::new();
/// for token in [[2.0f32, 1.0], [1.0, 2.0]] {
///     x.write(&ctx, &token)?;
///     cats_mlp(&ctx, &x, weights, 0.5, &mut y, &mut scratch)?; // records, reads nothing back
/// }
/// // Rows 2 and 3 have negative gates: silu(g) is above -0.28, so they were skipped.
/// assert_eq!(block_on(scratch.report(&ctx))?.active, [0, 1]);
/// # Ok::<(), Error>(())
/// ```
#[derive(Debug, Default)]
pub struct MlpScratch {
    /// The last call's activations, `intermediate` per sample side by side.
    activations: Option<wgpu::Buffer>,
    /// The last call's batch, intermediate size, and the threshold its activity test used.
    last: Option<(usize, usize, f32)>,
}

impl MlpScratch {
    /// Empty scratch; the first call sizes it.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The activations' buffer for `len` values, grown if too small.
    fn activations(&mut self, ctx: &Context, len: usize) -> Result<wgpu::Buffer> {
        let bytes = (len.max(1) * 4) as u64;
        match &self.activations {
            Some(buffer) if buffer.size() >= bytes => Ok(buffer.clone()),
            _ => {
                let buffer = ctx.take_storage(bytes)?;
                self.activations = Some(buffer.clone());
                Ok(buffer)
            }
        }
    }

    /// What the last call read: the union over its batch of the intermediate rows each sample
    /// kept (empty before the first call). Reads the activations back from the device, so it is
    /// `async`.
    pub async fn report(&self, ctx: &Context) -> Result<MlpReport> {
        let Some((batch, inter, threshold)) = self.last else {
            return Ok(MlpReport::default());
        };
        let mut read = vec![false; inter];
        if let Some(buffer) = &self.activations {
            let values = ctx.read_buffer::<f32>(buffer, batch * inter).await?;
            for sample in values.chunks(inter.max(1)) {
                for (r, &v) in read.iter_mut().zip(sample) {
                    *r |= is_active(v, threshold);
                }
            }
        }
        Ok(MlpReport {
            active: (0..inter as u32).filter(|&i| read[i as usize]).collect(),
            intermediate: inter,
        })
    }
}

/// The buffer and byte offset of row `r` of a `[rows, cols]` `f32` tensor.
fn row_at(t: &GpuTensor<f32>, r: usize) -> (&wgpu::Buffer, u64) {
    let page = r / t.rows_per_page();
    let (buffer, _) = t.page(page);
    (buffer, ((r % t.rows_per_page()) * t.cols() * 4) as u64)
}

/// Copies the batch's rows of `x` side by side into one buffer, runs `body` (which fills the
/// outputs side by side and the activations, `intermediate` per sample; it runs only where there
/// is an intermediate row), copies the outputs into `y`'s rows; submits, and notes in `scratch`
/// how to read the activations.
fn batched(
    ctx: &Context,
    x: &GpuTensor<f32>,
    y: &mut GpuTensor<f32>,
    inter: usize,
    threshold: f32,
    scratch: &mut MlpScratch,
    body: impl FnOnce(&mut Batch<'_>, &wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer) -> Result<()>,
) -> Result<()> {
    let [samples, hidden] = x.shape();
    debug_assert!(samples <= MAX_MLP_BATCH);
    scratch.last = None;
    let activations = scratch.activations(ctx, samples * inter)?;
    let mut batch = ctx.batch()?;
    batch.clear(&activations);
    let row_bytes = (hidden * 4) as u64;
    if hidden > 0 {
        let xs = batch.scratch(samples as u64 * row_bytes)?;
        let ys = batch.scratch(samples as u64 * row_bytes)?;
        for b in 0..samples {
            let (x_page, x_offset) = row_at(x, b);
            batch.copy_range(x_page, x_offset, &xs, b as u64 * row_bytes, row_bytes);
        }
        if inter == 0 {
            // No intermediate row: every output is an empty sum.
            batch.clear(&ys);
        } else {
            body(&mut batch, &xs, &ys, &activations)?;
        }
        for b in 0..samples {
            let (y_page, y_offset) = row_at(y, b);
            batch.copy_range(&ys, b as u64 * row_bytes, y_page, y_offset, row_bytes);
        }
    }
    batch.submit()?;
    // Without a hidden column no sample ran: no row was read, whatever the threshold.
    let threshold = if hidden == 0 {
        f32::INFINITY
    } else {
        threshold
    };
    scratch.last = Some((samples, inter, threshold));
    Ok(())
}

/// The batch's layouts: vectors of `hidden` values in, `inter` out (the gate and up steps), and
/// `inter` in, `hidden` out (the down projection).
fn strides(samples: usize, hidden: usize, inter: usize) -> (Samples, Samples) {
    let layout = |x_stride, out_stride| Samples {
        count: samples,
        x_stride,
        out_stride,
    };
    (layout(hidden, inter), layout(inter, hidden))
}

/// The CATS MLP for a decode batch: `x` and `y` `[batch, hidden]`, batch 1 to 4 (the twin of
/// `cats_mlp_ref`). Records and submits; the rows read stay in `scratch` until
/// [`MlpScratch::report`] asks. A gate activation `a` is active iff `!(|a| <= threshold)`.
/// See [`MlpScratch`] for an example.
pub fn cats_mlp<T: GpuElement>(
    ctx: &Context,
    x: &GpuTensor<f32>,
    weights: CatsMlpWeights<&GpuTensor<T>>,
    threshold: f32,
    y: &mut GpuTensor<f32>,
    scratch: &mut MlpScratch,
) -> Result<()> {
    let [inter, hidden] =
        validate_cats_mlp(x.shape(), weights.map(|w| w.shape()), threshold, y.shape())?;
    let (hidden_in, inter_in) = strides(x.rows(), hidden, inter);
    batched(
        ctx,
        x,
        y,
        inter,
        threshold,
        scratch,
        |batch, xs, ys, gates| {
            let g = batch.scratch((x.rows() * inter * 4) as u64)?;
            let h = batch.scratch((x.rows() * inter * 4) as u64)?;
            record_row_dots(batch, weights.gate, xs, RowDot::Dense, inter, hidden_in, &g)?;
            let up = RowDot::CatsUp {
                g: &g,
                threshold,
                gates,
            };
            record_row_dots(batch, weights.up, xs, up, inter, hidden_in, &h)?;
            record_sweep(
                batch,
                weights.down_t,
                gates,
                Some(&h),
                threshold,
                inter_in,
                ys,
            )
        },
    )
}

/// The TEAL MLP for a decode batch: `x` and `y` `[batch, hidden]`, batch 1 to 4 (the twin of
/// `teal_mlp_ref`). Records and submits; the rows of `W_down_t` read stay in `scratch`.
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let (hidden, inter) = (2, 3);
/// let gate_t = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32, 1.0, 1.0, 0.0, 0.0, 0.0], hidden, inter)?)?;
/// let up_t = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32; 6], hidden, inter)?)?;
/// let down_t = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32; 6], inter, hidden)?)?;
/// let weights = TealMlpWeights { gate_t: &gate_t, up_t: &up_t, down_t: &down_t };
/// let x = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[2.0f32, 0.1], 1, hidden)?)?;
/// let mut y = GpuTensor::<f32>::zeros(&ctx, 1, hidden)?;
/// let mut scratch = MlpScratch::new();
/// teal_mlp(&ctx, &x, weights, TealThresholds::new(0.5, 0.0), &mut y, &mut scratch)?;
/// let h = 2.0 / (1.0 + (-2.0f32).exp()) * 2.0; // silu(g) * u for each intermediate row
/// assert!((y.to_vec_blocking(&ctx)?[0] - 3.0 * h).abs() < 1e-4);
/// # Ok::<(), Error>(())
/// ```
pub fn teal_mlp<T: GpuElement>(
    ctx: &Context,
    x: &GpuTensor<f32>,
    weights: TealMlpWeights<&GpuTensor<T>>,
    thresholds: TealThresholds,
    y: &mut GpuTensor<f32>,
    scratch: &mut MlpScratch,
) -> Result<()> {
    let [inter, _] =
        validate_teal_mlp(x.shape(), weights.map(|w| w.shape()), thresholds, y.shape())?;
    let product = pipeline::<T>(ctx, &SILU_PRODUCT, false, false, 1)?;
    let hidden = x.cols();
    let (hidden_in, inter_in) = strides(x.rows(), hidden, inter);
    batched(
        ctx,
        x,
        y,
        inter,
        thresholds.down,
        scratch,
        |batch, xs, ys, h| {
            let values = x.rows() * inter;
            let g = batch.scratch((values * 4) as u64)?;
            let u = batch.scratch((values * 4) as u64)?;
            record_sweep(
                batch,
                weights.gate_t,
                xs,
                None,
                thresholds.gate_up,
                hidden_in,
                &g,
            )?;
            record_sweep(
                batch,
                weights.up_t,
                xs,
                None,
                thresholds.gate_up,
                hidden_in,
                &u,
            )?;
            // h = silu(g) u over every sample's values at once.
            let params = batch.uniform(&GemvParams {
                cols: values as u32,
                ..GemvParams::default()
            })?;
            let groups = (values as u32).div_ceil(WORKGROUP);
            batch.dispatch(
                &product,
                &[
                    Bind::Unused,
                    Bind::Buffer(&g),
                    Bind::Unused,
                    Bind::Buffer(&u),
                    Bind::Buffer(&params),
                    Bind::Buffer(h),
                ],
                (groups, 1),
            );
            record_sweep(
                batch,
                weights.down_t,
                h,
                None,
                thresholds.down,
                inter_in,
                ys,
            )
        },
    )
}
