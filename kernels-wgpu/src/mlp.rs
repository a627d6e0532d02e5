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
//! * The samples of a batch run one after another in one submission, so a row active in several
//!   samples is read once per sample (a fused batch sweep is left for later). The report, read
//!   back from the device, lists the union of the active rows (hence `async`).

use kernels_core::ops::sparse::{
    CatsMlpWeights, MlpReport, TealMlpWeights, TealThresholds, is_active, validate_cats_mlp,
    validate_teal_mlp,
};
use kernels_core::{MatRef, Result};

use crate::context::{Batch, Bind};
use crate::gemv::{
    GemvParams, RowDot, SILU_PRODUCT, WORKGROUP, gemv_tolerance, pipeline, record_row_dots,
    record_sweep,
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

/// The weights of a CATS MLP on the device, each `[intermediate, hidden]`.
#[derive(Clone, Copy, Debug)]
pub struct GpuCatsMlp<'a, T: GpuElement> {
    /// `W_gate` in the `nn.Linear` layout (read densely).
    pub gate: &'a GpuTensor<T>,
    /// `W_up` in the `nn.Linear` layout (rows read by the active set).
    pub up: &'a GpuTensor<T>,
    /// `W_down` transposed (rows read by the active set).
    pub down_t: &'a GpuTensor<T>,
}

/// The weights of a TEAL MLP on the device, every projection read by its input index.
#[derive(Clone, Copy, Debug)]
pub struct GpuTealMlp<'a, T: GpuElement> {
    /// `W_gate` transposed, `[hidden, intermediate]`.
    pub gate_t: &'a GpuTensor<T>,
    /// `W_up` transposed, `[hidden, intermediate]`.
    pub up_t: &'a GpuTensor<T>,
    /// `W_down` transposed, `[intermediate, hidden]`.
    pub down_t: &'a GpuTensor<T>,
}

/// Zero-sized stand-ins with a tensor's shape, so that the reference's own validation checks
/// GPU tensors (a `Vec<()>` allocates nothing).
struct Shape(Vec<()>, [usize; 2]);

impl Shape {
    fn of<T: bytemuck::Pod>(t: &GpuTensor<T>) -> Self {
        Self(vec![(); t.len()], t.shape())
    }

    fn view(&self) -> Result<MatRef<'_, ()>> {
        MatRef::from_slice(&self.0, self.1[0], self.1[1])
    }
}

/// The buffer and byte offset of row `r` of a `[rows, cols]` `f32` tensor.
fn row_at(t: &GpuTensor<f32>, r: usize) -> (&wgpu::Buffer, u64) {
    let page = r / t.rows_per_page();
    let (buffer, _) = t.page(page);
    (buffer, ((r % t.rows_per_page()) * t.cols() * 4) as u64)
}

/// Per sample `b`: copies row `b` of `x` into a vector, runs `sample` (which fills the output
/// vector and the vector to report on; it runs only where there is an intermediate row), copies
/// the output into row `b` of `y`; after the submission reads the report vectors back and marks
/// the rows `active` keeps.
async fn per_sample(
    ctx: &Context,
    x: &GpuTensor<f32>,
    y: &mut GpuTensor<f32>,
    inter: usize,
    active: impl Fn(f32) -> bool,
    mut sample: impl FnMut(&mut Batch<'_>, &wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer) -> Result<()>,
) -> Result<MlpReport> {
    let [batch_size, hidden] = x.shape();
    if hidden == 0 {
        return Ok(MlpReport {
            active: Vec::new(),
            intermediate: inter,
        });
    }
    let mut reported = Vec::with_capacity(batch_size);
    let result = async {
        let mut batch = ctx.batch()?;
        for b in 0..batch_size {
            let xb = batch.scratch((hidden * 4) as u64)?;
            let yb = batch.scratch((hidden * 4) as u64)?;
            let report = ctx.take_storage((inter * 4) as u64)?;
            reported.push(report.clone());
            let (x_page, x_offset) = row_at(x, b);
            batch.copy_range(x_page, x_offset, &xb, 0, (hidden * 4) as u64);
            if inter == 0 {
                // No intermediate row: every output is an empty sum.
                batch.clear(&yb);
            } else {
                sample(&mut batch, &xb, &yb, &report)?;
            }
            let (y_page, y_offset) = row_at(y, b);
            batch.copy_range(&yb, 0, y_page, y_offset, (hidden * 4) as u64);
        }
        batch.submit()?;
        let mut read = vec![false; inter];
        for report in &reported {
            let values = ctx.read_buffer::<f32>(report, inter).await?;
            for (r, v) in read.iter_mut().zip(values) {
                *r |= active(v);
            }
        }
        Ok(MlpReport {
            active: (0..inter as u32).filter(|&i| read[i as usize]).collect(),
            intermediate: inter,
        })
    }
    .await;
    ctx.give_back(reported);
    result
}

/// The CATS MLP for a decode batch: `x` and `y` `[batch, hidden]`, batch 1 to 4 (the twin of
/// `cats_mlp_ref`).
pub async fn cats_mlp<T: GpuElement>(
    ctx: &Context,
    x: &GpuTensor<f32>,
    weights: GpuCatsMlp<'_, T>,
    threshold: f32,
    y: &mut GpuTensor<f32>,
) -> Result<MlpReport> {
    let x_host = vec![0.0f32; x.len()];
    let shapes = [weights.gate, weights.up, weights.down_t].map(Shape::of);
    let [inter, _] = validate_cats_mlp(
        MatRef::from_slice(&x_host, x.rows(), x.cols())?,
        &CatsMlpWeights {
            gate: shapes[0].view()?,
            up: shapes[1].view()?,
            down_t: shapes[2].view()?,
        },
        threshold,
        y.shape(),
    )?;
    per_sample(
        ctx,
        x,
        y,
        inter,
        |a| is_active(a, threshold),
        |batch, xb, yb, gates| {
            let g = batch.scratch((inter * 4) as u64)?;
            let h = batch.scratch((inter * 4) as u64)?;
            record_row_dots(batch, weights.gate, xb, RowDot::Dense, inter, &g)?;
            let up = RowDot::CatsUp {
                g: &g,
                threshold,
                gates,
            };
            record_row_dots(batch, weights.up, xb, up, inter, &h)?;
            record_sweep(batch, weights.down_t, gates, Some(&h), threshold, yb)
        },
    )
    .await
}

/// The TEAL MLP for a decode batch: `x` and `y` `[batch, hidden]`, batch 1 to 4 (the twin of
/// `teal_mlp_ref`).
pub async fn teal_mlp<T: GpuElement>(
    ctx: &Context,
    x: &GpuTensor<f32>,
    weights: GpuTealMlp<'_, T>,
    thresholds: TealThresholds,
    y: &mut GpuTensor<f32>,
) -> Result<MlpReport> {
    let x_host = vec![0.0f32; x.len()];
    let shapes = [weights.gate_t, weights.up_t, weights.down_t].map(Shape::of);
    let [inter, _] = validate_teal_mlp(
        MatRef::from_slice(&x_host, x.rows(), x.cols())?,
        &TealMlpWeights {
            gate_t: shapes[0].view()?,
            up_t: shapes[1].view()?,
            down_t: shapes[2].view()?,
        },
        thresholds,
        y.shape(),
    )?;
    let product = pipeline::<T>(ctx, &SILU_PRODUCT, false, false)?;
    per_sample(
        ctx,
        x,
        y,
        inter,
        |h| is_active(h, thresholds.down),
        |batch, xb, yb, h| {
            let g = batch.scratch((inter * 4) as u64)?;
            let u = batch.scratch((inter * 4) as u64)?;
            record_sweep(batch, weights.gate_t, xb, None, thresholds.gate_up, &g)?;
            record_sweep(batch, weights.up_t, xb, None, thresholds.gate_up, &u)?;
            let params = batch.uniform(&GemvParams {
                cols: inter as u32,
                ..GemvParams::default()
            })?;
            let groups = (inter as u32).div_ceil(WORKGROUP);
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
            record_sweep(batch, weights.down_t, h, None, thresholds.down, yb)
        },
    )
    .await
}
