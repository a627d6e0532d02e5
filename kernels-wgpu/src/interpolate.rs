//! Interpolation on the GPU: linear combinations with weights of any sign, Gram matrices of task
//! vectors, SLERP and Model Stock, the twins of `kernels_core::ops::interpolate`'s references
//! and of `kernels_cpu::interpolate`.
//!
//! # Contracts
//!
//! * Element-wise over tensors of one shape (they page alike); inputs `f32`, `f16` or `bf16`,
//!   outputs `f32`, arithmetic `f32`. A linear combination is within
//!   [`crate::merge::reduction_tolerance`] of the reference; its `f32` coefficients must be zero
//!   or normal (see [`crate::merge`]).
//! * [`gram`] sums each tile of [`TILE`] products in `f32` on the device and the tiles in `f64`
//!   on the host, within [`gram_tolerance`]. A tile whose `f32` sum is not finite is read back
//!   and summed in `f64` on the host, so overflow costs time, not range.
//! * [`slerp`] and [`model_stock`] take their coefficients in `f64` on the host from the GPU's
//!   Gram matrix: they differ from the reference's by what a Gram matrix within
//!   [`gram_tolerance`] moves them, and where the reference's `|cos|` lies within that of
//!   SLERP's lerp threshold, the GPU may take the other branch.

use kernels_core::Result;
use kernels_core::backend::{
    validate_gram, validate_linear_combination, validate_model_stock, validate_slerp,
};
pub use kernels_core::ops::interpolate::{model_stock_ratio, slerp_coefficients};

use crate::context::{Bind, Context};
use crate::merge::{FLAG_CENTER, GRAM_TILES, combine, f32_coefficients, pass_params};
use crate::select::{ITEMS, WORKGROUP, tiled_pipeline};
use crate::tensor::{GpuElement, GpuTensor};

/// Entries one workgroup of [`gram`] sums in `f32` before the host takes over in `f64`.
pub const TILE: usize = crate::select::TILE;

/// Relative part of [`gram_tolerance`]: `(ITEMS + log2 WORKGROUP + 5) u`, `u = 2^-24`. Each
/// product rounds once after its two centred factors did (3), each invocation adds `ITEMS`
/// products in turn and the workgroup's tree `log2 WORKGROUP` levels; the host's `f64` sum of
/// tiles adds 1 more than it could cost.
pub const GRAM_RELATIVE_TOLERANCE: f64 =
    (ITEMS + WORKGROUP.ilog2() + 5) as f64 * (f32::EPSILON as f64 / 2.0);

/// Bound on `|G_ij - G_ij_ref|` for vectors of `len` entries whose reference Gram diagonal
/// holds `g_ii` and `g_jj`: [`GRAM_RELATIVE_TOLERANCE`] times `sqrt(g_ii g_jj)` (which bounds
/// `sum |m_i - c| |m_j - c|` by Cauchy-Schwarz), plus `len 2^-126 (1 + sqrt g_ii + sqrt g_jj)`
/// for factors and products a GPU may flush below `f32`'s normal range.
///
/// ```
/// use kernels_wgpu::interpolate::gram_tolerance;
/// // Under 2e-6 of sqrt(g_ii g_jj) = 6, whatever the length.
/// assert!(gram_tolerance(1000, 4.0, 9.0) < 2e-6 * 6.0);
/// ```
#[must_use]
pub fn gram_tolerance(len: usize, g_ii: f64, g_jj: f64) -> f64 {
    let (a, b) = (g_ii.abs().sqrt(), g_jj.abs().sqrt());
    GRAM_RELATIVE_TOLERANCE * a * b + len as f64 * f64::from(f32::MIN_POSITIVE) * (1.0 + a + b)
}

/// Linear combination `out = sum w_i m_i`, weights any finite numbers (the twin of
/// `linear_combination_ref`).
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let a = GpuTensor::from_slice(&ctx, &[1.0f32, 2.0])?;
/// let b = GpuTensor::from_slice(&ctx, &[4.0f32, -1.0])?;
/// let mut out = GpuTensor::zeros(&ctx, 2, 1)?;
/// linear_combination(&ctx, &[&a, &b], &[1.5, -0.5], &mut out)?;
/// assert_eq!(out.to_vec_blocking(&ctx)?, [-0.5, 3.5]);
/// # Ok::<(), Error>(())
/// ```
pub fn linear_combination<T: GpuElement>(
    ctx: &Context,
    models: &[&GpuTensor<T>],
    weights: &[f32],
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    validate_linear_combination(models.iter().map(|m| m.len()), weights, out.len())?;
    for m in models {
        m.expect_shape("models[i]", out.shape())?;
    }
    let coefs = f32_coefficients(weights.iter().map(|&w| f64::from(w)))?;
    combine(ctx, models, &coefs, out)
}

/// Gram matrix of `N` tensors, centred on `center` when one is given:
/// `out[i * N + j] = sum_k (m_i[k] - c[k]) (m_j[k] - c[k])`, both triangles, each within
/// [`gram_tolerance`] of `gram_ref` (the twin of the CPU's `gram`). `async`: the tile sums are
/// read back.
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let a = GpuTensor::from_slice(&ctx, &[1.0f32, 2.0])?;
/// let b = GpuTensor::from_slice(&ctx, &[3.0f32, -1.0])?;
/// let mut g = [0.0f64; 4];
/// block_on(gram(&ctx, &[&a, &b], None, &mut g))?;
/// assert_eq!(g, [5.0, 1.0, 1.0, 10.0]);
/// # Ok::<(), Error>(())
/// ```
pub async fn gram<T: GpuElement>(
    ctx: &Context,
    models: &[&GpuTensor<T>],
    center: Option<&GpuTensor<T>>,
    out: &mut [f64],
) -> Result<()> {
    let n = validate_gram(
        models.iter().map(|m| m.len()),
        center.map(GpuTensor::len),
        out.len(),
    )?;
    let shape = models[0].shape();
    for m in models {
        m.expect_shape("models[i]", shape)?;
    }
    if let Some(c) = center {
        c.expect_shape("center", shape)?;
    }
    let first = models[0];
    let pairs: Vec<(usize, usize)> = (0..n).flat_map(|i| (i..n).map(move |j| (i, j))).collect();
    let page_tiles: Vec<usize> = (0..first.page_count())
        .map(|p| first.page(p).1.div_ceil(TILE))
        .collect();
    let tiles: usize = page_tiles.iter().sum();
    let sums = ctx.take_storage(((pairs.len() * tiles).max(1) * 4) as u64)?;
    let read = async {
        // PERF: a dispatch per pair re-reads each tensor N times; slerp and Model Stock take
        // two to four, where the binding limit (8 storage buffers) would not fit them all in one.
        let pipeline = tiled_pipeline(ctx, &GRAM_TILES, T::ENCODING)?;
        let mut batch = ctx.batch()?;
        let flags = if center.is_some() { FLAG_CENTER } else { 0 };
        for (pair, &(i, j)) in pairs.iter().enumerate() {
            let mut tile_base = pair * tiles;
            for (page, &count) in page_tiles.iter().enumerate() {
                let mut params = pass_params(first.page(page).1, 2, false, &[], 0.0);
                params.flags = flags;
                params.tile_base = tile_base as u32;
                let params = batch.uniform(&params)?;
                let grid = batch.grid(count as u32);
                batch.dispatch(
                    &pipeline,
                    &[
                        Bind::Buffer(models[i].page(page).0),
                        Bind::Buffer(models[j].page(page).0),
                        center.map_or(Bind::Unused, |c| Bind::Buffer(c.page(page).0)),
                        Bind::Unused,
                        Bind::Buffer(&sums),
                        Bind::Unused,
                        Bind::Unused,
                        Bind::Buffer(&params),
                    ],
                    grid,
                );
                tile_base += count;
            }
        }
        batch.submit()?;
        ctx.read_buffer::<f32>(&sums, pairs.len() * tiles).await
    }
    .await;
    ctx.give_back([sums]);
    let partials = read?;
    for (pair, &(i, j)) in pairs.iter().enumerate() {
        let mut total = 0.0f64;
        let mut partial = partials[pair * tiles..(pair + 1) * tiles].iter();
        for page in 0..first.page_count() {
            let len = first.page(page).1;
            for (start, &sum) in (0..len).step_by(TILE).zip(&mut partial) {
                total += if sum.is_finite() {
                    f64::from(sum)
                } else {
                    let count = TILE.min(len - start);
                    let a: Vec<T> = ctx
                        .read_buffer_at(models[i].page(page).0, start, count)
                        .await?;
                    let b: Vec<T> = ctx
                        .read_buffer_at(models[j].page(page).0, start, count)
                        .await?;
                    let c: Option<Vec<T>> = match center {
                        Some(c) => Some(ctx.read_buffer_at(c.page(page).0, start, count).await?),
                        None => None,
                    };
                    (0..count)
                        .map(|k| {
                            let shift = c.as_ref().map_or(0.0, |c| f64::from(c[k].to_f32()));
                            (f64::from(a[k].to_f32()) - shift) * (f64::from(b[k].to_f32()) - shift)
                        })
                        .sum()
                };
            }
        }
        out[i * n + j] = total;
        out[j * n + i] = total;
    }
    Ok(())
}

/// SLERP of two whole tensors (the twin of `slerp_ref`): `out = s0 v0 + s1 v1` with
/// [`slerp_coefficients`] of their [`gram`] matrix; `t` finite, not clamped. `async`: the Gram
/// matrix is read back.
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let v0 = GpuTensor::from_slice(&ctx, &[1.0f32, 0.0])?;
/// let v1 = GpuTensor::from_slice(&ctx, &[0.0f32, 1.0])?;
/// let mut out = GpuTensor::zeros(&ctx, 2, 1)?;
/// block_on(slerp(&ctx, &v0, &v1, 0.5, &mut out))?;
/// let out = out.to_vec_blocking(&ctx)?;
/// assert!((out[0] - 0.5f32.sqrt()).abs() < 1e-6 && (out[1] - 0.5f32.sqrt()).abs() < 1e-6);
/// # Ok::<(), Error>(())
/// ```
pub async fn slerp<T: GpuElement>(
    ctx: &Context,
    v0: &GpuTensor<T>,
    v1: &GpuTensor<T>,
    t: f32,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    validate_slerp(t)?;
    out.expect_len("out", v0.len())?;
    v0.expect_shape("v0", out.shape())?;
    v1.expect_shape("v1", out.shape())?;
    let mut g = [0.0f64; 4];
    gram(ctx, &[v0, v1], None, &mut g).await?;
    let [s0, s1] = slerp_coefficients(f64::from(t), g);
    linear_combination(ctx, &[v0, v1], &[s0 as f32, s1 as f32], out)
}

/// Model Stock of whole tensors (the twin of `model_stock_ref`): `out = t mean(models) +
/// (1 - t) base` with `t` = [`model_stock_ratio`] of the task vectors' [`gram`] matrix;
/// `N >= 2` fine-tunes. `async`: the Gram matrix is read back.
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let base = GpuTensor::from_slice(&ctx, &[0.0f32, 0.0])?;
/// let a = GpuTensor::from_slice(&ctx, &[1.0f32, 0.0])?;
/// let b = GpuTensor::from_slice(&ctx, &[0.5f32, 0.75f32.sqrt()])?;
/// let mut out = GpuTensor::zeros(&ctx, 2, 1)?;
/// block_on(model_stock(&ctx, &base, &[&a, &b], &mut out))?;
/// assert!((out.to_vec_blocking(&ctx)?[0] - 0.5).abs() < 1e-6);
/// # Ok::<(), Error>(())
/// ```
pub async fn model_stock<T: GpuElement>(
    ctx: &Context,
    base: &GpuTensor<T>,
    models: &[&GpuTensor<T>],
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    let n = models.len();
    validate_model_stock(n)?;
    out.expect_len("out", base.len())?;
    base.expect_shape("base", out.shape())?;
    let mut g = vec![0.0f64; n * n];
    gram(ctx, models, Some(base), &mut g).await?;
    let t = model_stock_ratio(&g)?;
    let mut all = models.to_vec();
    all.push(base);
    let mut weights = vec![(t / n as f64) as f32; n];
    weights.push((1.0 - t) as f32);
    linear_combination(ctx, &all, &weights, out)
}
