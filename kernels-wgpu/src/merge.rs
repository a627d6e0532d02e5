//! Merge reductions on the GPU: weighted mean (soups), task arithmetic, TIES election and
//! disjoint mean, Fisher merging and Fisher accumulation, the twins of
//! `kernels_core::ops::merge`'s references.
//!
//! # Contracts
//!
//! * Element-wise over tensors of one shape (they page alike); inputs `f32`, `f16` or `bf16`,
//!   Fisher diagonals and outputs `f32`, arithmetic `f32` (WGSL has no `f64`). Each output is
//!   within [`reduction_tolerance`] of the reference while the sums it keeps stay within `f32`
//!   (for Fisher merging `sum w'_i F'_i |theta_i|` with the weights over their sum, so a Fisher
//!   entry near `f32::MAX` may overflow where the reference's `f64` does not). Terms below
//!   `f32`'s normal range may flush to zero; in Fisher merging's quotient that adds up to
//!   `(N + 1) 2^-126 (1 + |out|) / sum w'_i F'_i`, a model whose `w'_i F'_i` is below that range
//!   may be lost altogether (with `|w'_i F'_i theta_i| (1 + |out|) / sum w'_i F'_i`), and a
//!   `sum w'_i F'_i` below `(N + 1) 2^-126` may count as zero (the plain-mean fallback).
//!   Validation is the reference's own.
//! * Four models per pass (two for Fisher merging: each brings two tensors): WebGPU guarantees
//!   only 8 storage bindings per stage. Any number of models works; each further pass re-reads
//!   the `f32` running sums.
//! * TIES elects `sign(sum w_i tau_i)` from an `f32` sum: where the reference's `f64` sum is
//!   within rounding of zero, the GPU may elect another sign (or none). Exact cancellation (all
//!   equal and opposite) elects none on both (`+` on both under
//!   [`TiesElection::zero_sum_elects_positive`]). WGSL lets a GPU flush subnormals, and a
//!   term `c_i tau_i` (with the scaled weights `c_i` below) under `f32`'s normal range keeps
//!   only absolute precision: each agreeing one adds up to `|lambda| 2^-126 / sum c_agreeing`
//!   to the error (`lambda` undivided without `normalize`), however large `lambda` makes the
//!   output, and an election sum within `N 2^-126` of zero may elect otherwise.
//! * Each model's coefficient (`w_i / sum w` for the means, `lambda w_i` for task arithmetic, for
//!   TIES the weights scaled by a power of two so the largest is in `[1/2, 1)`) is formed in
//!   `f64` and rounded once to `f32`. One that is not zero but outside `f32`'s normal range
//!   (weights whose ratio passes about `2^126`, a `lambda w_i` past `f32::MAX`) would lose its
//!   term to a GPU's flushed subnormals or overflow, so the call is refused with
//!   [`Error::Unsupported`] before anything runs; the CPU takes such coefficients in `f64`.

use kernels_core::backend::{
    SQUARES_IN_F64_BELOW, fisher_weight, validate_fisher_accumulate, validate_fisher_merge,
    validate_task_arithmetic, validate_ties_elect, validate_weighted_mean,
};
pub use kernels_core::ops::merge::{FisherParams, TiesElection, TiesParams};
use kernels_core::{Error, Result};
use kernels_wgsl::Family;

use crate::context::{Batch, Bind, Context, Kernel, Pipeline, Slot};
use crate::tensor::{GpuElement, GpuTensor};

/// Invocations per workgroup of the element-wise kernels.
const WORKGROUP: u32 = 256;

/// Models one pass of [`weighted_mean`], [`task_arithmetic`] or [`ties_elect`] reads.
const MODELS_PER_PASS: usize = 4;

/// Models one pass of [`fisher_merge`] reads (a parameter and a Fisher tensor each).
const FISHER_MODELS_PER_PASS: usize = 2;

/// Bound on `|out - out_ref|` for an output of `terms` weighted terms whose absolute values add
/// up to `abs_sum` (for a mean, divided by `sum w`): `(3 terms + 4) u abs_sum + tiny`.
///
/// Per term, the `f32` coefficient (a weight times `lambda` or `1 / sum w`), the product and the
/// addition each round once, relative to at most `abs_sum`; a division, a base and a final scale
/// add up to four more. `tiny` absorbs subnormal flushes, which GPUs may apply.
///
/// ```
/// use kernels_wgpu::merge::reduction_tolerance;
/// use kernels_wgpu::prelude::*;
/// let ctx = Context::new_blocking(ContextOptions::default())?;
/// let (a, b) = ([0.1f32, 0.7], [0.3f32, -0.2]);
/// let models = [GpuTensor::from_slice(&ctx, &a)?, GpuTensor::from_slice(&ctx, &b)?];
/// let mut out = GpuTensor::<f32>::zeros(&ctx, 2, 1)?;
/// weighted_mean(&ctx, &[&models[0], &models[1]], &[1.0, 2.0], &mut out)?;
/// for (j, got) in out.to_vec_blocking(&ctx)?.into_iter().enumerate() {
///     let exact = (f64::from(a[j]) + 2.0 * f64::from(b[j])) / 3.0;
///     let abs_sum = (f64::from(a[j].abs()) + 2.0 * f64::from(b[j].abs())) / 3.0;
///     assert!((f64::from(got) - exact).abs() <= reduction_tolerance(2, abs_sum));
/// }
/// # Ok::<(), Error>(())
/// ```
#[must_use]
pub fn reduction_tolerance(terms: usize, abs_sum: f64) -> f64 {
    (3 * terms + 4) as f64 * f64::from(f32::EPSILON / 2.0) * abs_sum + 1e-30
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct MergeParams {
    len: u32,
    models: u32,
    accumulate: u32,
    pub(crate) flags: u32,
    coef: [f32; 4],
    scalar: f32,
    pub(crate) tile_base: u32,
    pad: [u32; 2],
}

// Slots: in0..in3, sum0..sum2, params.
const SLOTS: &[Slot] = &[
    Slot::Read,
    Slot::Read,
    Slot::Read,
    Slot::Read,
    Slot::ReadWrite,
    Slot::ReadWrite,
    Slot::ReadWrite,
    Slot::Uniform,
];

const fn kernel(entry: &'static str) -> Kernel {
    Kernel {
        family: Family::Merge,
        entry,
        slots: SLOTS,
        needs_subgroups: false,
    }
}

const LINEAR_PASS: Kernel = kernel("linear_pass");
const FISHER_PASS: Kernel = kernel("fisher_pass");
const FISHER_FINISH: Kernel = kernel("fisher_finish");
const TIES_PASS: Kernel = kernel("ties_pass");
const TIES_FINISH: Kernel = kernel("ties_finish");
const FISHER_ACCUMULATE: Kernel = kernel("fisher_accumulate");
pub(crate) const GRAM_TILES: Kernel = kernel("gram_tiles");

// The bits of `MergeParams::flags` (merge.wgsl's FLAG_*).
const FLAG_ZERO_SUM_ELECTS_POSITIVE: u32 = 1;
const FLAG_NORMALIZE: u32 = 2;
pub(crate) const FLAG_CENTER: u32 = 4;

/// The `f32` coefficients of `exact`, each zero or a normal `f32` (see the module docs).
pub(crate) fn f32_coefficients(exact: impl IntoIterator<Item = f64>) -> Result<Vec<f32>> {
    exact
        .into_iter()
        .map(|c| {
            let rounded = c as f32;
            if c == 0.0 || rounded.is_normal() {
                Ok(rounded)
            } else {
                Err(Error::Unsupported {
                    feature: "a merge coefficient outside f32's normal range on the GPU",
                    hint: "keep the weights (and lambda times them) within 2^126 of each other \
                           and of 1, or merge on the CPU, which keeps them in f64",
                })
            }
        })
        .collect()
}

fn pipeline(ctx: &Context, kernel: &Kernel, encoding: u32) -> Result<std::sync::Arc<Pipeline>> {
    ctx.pipeline(
        kernel,
        false,
        &[("WORKGROUP", WORKGROUP), ("ELEMENT", encoding)],
    )
}

/// The lengths of `tensors`, for the shared validation.
fn lens<T: bytemuck::Pod>(tensors: &[&GpuTensor<T>]) -> impl Iterator<Item = usize> {
    tensors.iter().map(|t| t.len())
}

/// Checks every tensor has `out`'s shape (so their pages pair up).
fn same_shape<T: bytemuck::Pod>(
    what: &'static str,
    tensors: &[&GpuTensor<T>],
    out: &GpuTensor<f32>,
) -> Result<()> {
    tensors
        .iter()
        .try_for_each(|t| t.expect_shape(what, out.shape()))
}

/// One element-wise dispatch over page `page` of the output.
struct PassInputs<'a> {
    inputs: [Bind<'a>; 4],
    sums: [Bind<'a>; 3],
    params: MergeParams,
}

fn dispatch(batch: &mut Batch<'_>, pipeline: &Pipeline, pass: PassInputs<'_>) -> Result<()> {
    let len = pass.params.len;
    let params = batch.uniform(&pass.params)?;
    let [a, b, c, d] = pass.inputs;
    let [s0, s1, s2] = pass.sums;
    let grid = batch.grid(len.div_ceil(WORKGROUP));
    batch.dispatch(
        pipeline,
        &[a, b, c, d, s0, s1, s2, Bind::Buffer(&params)],
        grid,
    );
    Ok(())
}

pub(crate) fn pass_params(
    len: usize,
    models: usize,
    accumulate: bool,
    coef: &[f32],
    scalar: f32,
) -> MergeParams {
    let mut c = [0.0; 4];
    c[..coef.len()].copy_from_slice(coef);
    MergeParams {
        len: len as u32,
        models: models as u32,
        accumulate: u32::from(accumulate),
        flags: 0,
        coef: c,
        scalar,
        tile_base: 0,
        pad: [0; 2],
    }
}

/// Binds model `m` of `group` on `page`, or a placeholder past the group's end.
fn model_binds<'a, T: bytemuck::Pod>(group: &[&'a GpuTensor<T>], page: usize) -> [Bind<'a>; 4] {
    core::array::from_fn(|m| {
        group
            .get(m)
            .map_or(Bind::Unused, |t| Bind::Buffer(t.page(page).0))
    })
}

/// `out = sum over k of coefs[k] * tensors[k]`, four tensors per pass (validated by the caller).
pub(crate) fn combine<T: GpuElement>(
    ctx: &Context,
    tensors: &[&GpuTensor<T>],
    coefs: &[f32],
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    let pipeline = pipeline(ctx, &LINEAR_PASS, T::ENCODING)?;
    let mut batch = ctx.batch()?;
    for page in 0..out.page_count() {
        let (sum, len) = out.page(page);
        for (g, (group, coef)) in tensors
            .chunks(MODELS_PER_PASS)
            .zip(coefs.chunks(MODELS_PER_PASS))
            .enumerate()
        {
            dispatch(
                &mut batch,
                &pipeline,
                PassInputs {
                    inputs: model_binds(group, page),
                    sums: [Bind::Buffer(sum), Bind::Unused, Bind::Unused],
                    params: pass_params(len, group.len(), g > 0, coef, 0.0),
                },
            )?;
        }
    }
    batch.submit()
}

/// Weighted mean `out = sum w_i theta_i / sum w_i` (the twin of `weighted_mean_ref`).
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let a = GpuTensor::from_slice(&ctx, &[1.0f32, 2.0, 3.0])?;
/// let b = GpuTensor::from_slice(&ctx, &[3.0f32, 2.0, -1.0])?;
/// let mut out = GpuTensor::zeros(&ctx, 3, 1)?;
/// weighted_mean(&ctx, &[&a, &b], &[1.0, 3.0], &mut out)?;
/// assert_eq!(out.to_vec_blocking(&ctx)?, [2.5, 2.0, 0.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn weighted_mean<T: GpuElement>(
    ctx: &Context,
    models: &[&GpuTensor<T>],
    weights: &[f32],
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    let sum = validate_weighted_mean(lens(models), weights, out.len())?;
    same_shape("models[i]", models, out)?;
    let coefs = f32_coefficients(weights.iter().map(|&w| f64::from(w) / sum))?;
    combine(ctx, models, &coefs, out)
}

/// Task arithmetic `out = base + lambda * sum w_i tau_i` (the twin of `task_arithmetic_ref`).
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let base = GpuTensor::from_slice(&ctx, &[1.0f32, 2.0])?;
/// let tau = GpuTensor::from_slice(&ctx, &[0.5f32, -1.0])?;
/// let mut out = GpuTensor::zeros(&ctx, 2, 1)?;
/// task_arithmetic(&ctx, &base, &[&tau], &[1.0], 2.0, &mut out)?;
/// assert_eq!(out.to_vec_blocking(&ctx)?, [2.0, 0.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn task_arithmetic<T: GpuElement>(
    ctx: &Context,
    base: &GpuTensor<T>,
    taus: &[&GpuTensor<T>],
    weights: &[f32],
    lambda: f32,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    validate_task_arithmetic(base.len(), lens(taus), weights, lambda, out.len())?;
    same_shape("base", &[base], out)?;
    same_shape("taus[i]", taus, out)?;
    let tensors: Vec<&GpuTensor<T>> = core::iter::once(base).chain(taus.iter().copied()).collect();
    let coefs = f32_coefficients(
        core::iter::once(1.0).chain(weights.iter().map(|&w| f64::from(lambda) * f64::from(w))),
    )?;
    combine(ctx, &tensors, &coefs, out)
}

/// TIES election and disjoint mean over already-trimmed task vectors (the twin of
/// `ties_elect_ref`): `s = sign(sum w_i tau_i)`, mean of the agreeing `w_i tau_i` over their
/// `w_i`, `out = base + lambda * mean`. See the module docs for the election's precision.
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let base = GpuTensor::from_slice(&ctx, &[10.0f32; 4])?;
/// let t1 = GpuTensor::from_slice(&ctx, &[1.0f32, -2.0, 3.0, 0.0])?;
/// let t2 = GpuTensor::from_slice(&ctx, &[3.0f32, 1.0, -1.0, 0.0])?;
/// let mut out = GpuTensor::zeros(&ctx, 4, 1)?;
/// ties_elect(&ctx, &base, &[&t1, &t2], &[1.0, 1.0], 1.0, &mut out)?;
/// assert_eq!(out.to_vec_blocking(&ctx)?, [12.0, 8.0, 13.0, 10.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn ties_elect<T: GpuElement>(
    ctx: &Context,
    base: &GpuTensor<T>,
    trimmed: &[&GpuTensor<T>],
    weights: &[f32],
    lambda: f32,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    elect(
        ctx,
        base,
        trimmed,
        weights,
        lambda,
        TiesElection::default(),
        out,
    )
}

/// TIES election under another [`TiesElection`] rule (the twin of `ties_elect_with_ref`):
/// entries whose sign equals `rule.elect(sum w_i tau_i)` agree (a zero entry never does);
/// `out = base + lambda * rule.combine(sum of agreeing w_i tau_i, sum of their w_i)`.
/// mergekit's rule elects `+` for a zero sum and, without `normalize`, adds the agreeing
/// weighted sum undivided. See the module docs for the election's precision.
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let base = GpuTensor::from_slice(&ctx, &[10.0f32; 3])?;
/// let t1 = GpuTensor::from_slice(&ctx, &[1.0f32, -2.0, 0.0])?;
/// let t2 = GpuTensor::from_slice(&ctx, &[3.0f32, 2.0, 0.0])?;
/// let mergekit = TiesElection::default().with_zero_sum_elects_positive(true).with_normalize(false);
/// let mut out = GpuTensor::zeros(&ctx, 3, 1)?;
/// ties_elect_with(&ctx, &base, &[&t1, &t2], &[1.0, 1.0], 0.5, mergekit, &mut out)?;
/// // Element 1 sums to zero: + is elected and only t2 agrees.
/// assert_eq!(out.to_vec_blocking(&ctx)?, [12.0, 11.0, 10.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn ties_elect_with<T: GpuElement>(
    ctx: &Context,
    base: &GpuTensor<T>,
    trimmed: &[&GpuTensor<T>],
    weights: &[f32],
    lambda: f32,
    rule: TiesElection,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    elect(ctx, base, trimmed, weights, lambda, rule, out)
}

/// TIES merging of whole tensors in one call: trim each task vector to what `params.keep` keeps
/// ([`crate::masks::ties_trim`], into `N` scratch `f32` tensors of the tensor's shape), then elect
/// and take the disjoint mean ([`ties_elect`]). The twin of `ties_ref`; `async` because the
/// trimming selects.
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let base = GpuTensor::from_slice(&ctx, &[10.0f32; 4])?;
/// let t1 = GpuTensor::from_slice(&ctx, &[1.0f32, -2.0, 3.0, 0.1])?;
/// let t2 = GpuTensor::from_slice(&ctx, &[3.0f32, 1.0, -1.0, 0.2])?;
/// let params = TiesParams::default().with_keep(KeepRule::Density(0.75));
/// let mut out = GpuTensor::zeros(&ctx, 4, 1)?;
/// block_on(ties(&ctx, &base, &[&t1, &t2], &[1.0, 1.0], params, &mut out))?;
/// assert_eq!(out.to_vec_blocking(&ctx)?, [12.0, 8.0, 13.0, 10.0]);
/// # Ok::<(), Error>(())
/// ```
pub async fn ties<T: GpuElement>(
    ctx: &Context,
    base: &GpuTensor<T>,
    taus: &[&GpuTensor<T>],
    weights: &[f32],
    params: TiesParams,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    validate_ties_elect(base.len(), lens(taus), weights, params.lambda, out.len())?;
    same_shape("taus[i]", taus, out)?;
    let mut trimmed = Vec::with_capacity(taus.len());
    for tau in taus {
        let mut t = GpuTensor::<f32>::zeros(ctx, tau.rows(), tau.cols())?;
        crate::masks::ties_trim(ctx, tau, params.keep, &mut t).await?;
        trimmed.push(t);
    }
    let views: Vec<&GpuTensor<f32>> = trimmed.iter().collect();
    let rule = TiesElection::default();
    elect(ctx, base, &views, weights, params.lambda, rule, out)
}

/// [`ties_elect_with`] with trimmed task vectors of another element type than the base.
fn elect<T: GpuElement, U: GpuElement>(
    ctx: &Context,
    base: &GpuTensor<T>,
    trimmed: &[&GpuTensor<U>],
    weights: &[f32],
    lambda: f32,
    rule: TiesElection,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    validate_ties_elect(base.len(), lens(trimmed), weights, lambda, out.len())?;
    same_shape("base", &[base], out)?;
    same_shape("trimmed[i]", trimmed, out)?;
    // The election's sign and the mean are the same for any common scale of the weights: a power
    // of two brings the largest into [1/2, 1), exactly, so no weighted term outgrows its value.
    let largest = weights.iter().fold(0.0f64, |a, &w| a.max(f64::from(w)));
    let scale = 2f64.powi(-(largest.log2().floor() as i32 + 1));
    let weights = &f32_coefficients(weights.iter().map(|&w| f64::from(w) * scale))?;
    // Undivided, the agreeing sum carries the weights' scale, which lambda takes back.
    let finish_scalar = if rule.normalize {
        lambda
    } else {
        f32_coefficients([f64::from(lambda) / scale])?[0]
    };
    let flags = (u32::from(rule.zero_sum_elects_positive) * FLAG_ZERO_SUM_ELECTS_POSITIVE)
        | (u32::from(rule.normalize) * FLAG_NORMALIZE);
    let linear = pipeline(ctx, &LINEAR_PASS, U::ENCODING)?;
    let agree = pipeline(ctx, &TIES_PASS, U::ENCODING)?;
    let finish = pipeline(ctx, &TIES_FINISH, T::ENCODING)?;
    let mut batch = ctx.batch()?;
    for page in 0..out.page_count() {
        let (num, len) = out.page(page);
        let den = batch.scratch(len as u64 * 4)?;
        let elected = batch.scratch(len as u64 * 4)?;
        let groups = || {
            trimmed
                .chunks(MODELS_PER_PASS)
                .zip(weights.chunks(MODELS_PER_PASS))
                .enumerate()
        };
        for (g, (group, w)) in groups() {
            dispatch(
                &mut batch,
                &linear,
                PassInputs {
                    inputs: model_binds(group, page),
                    sums: [Bind::Buffer(&elected), Bind::Unused, Bind::Unused],
                    params: pass_params(len, group.len(), g > 0, w, 0.0),
                },
            )?;
        }
        for (g, (group, w)) in groups() {
            dispatch(
                &mut batch,
                &agree,
                PassInputs {
                    inputs: model_binds(group, page),
                    sums: [
                        Bind::Buffer(num),
                        Bind::Buffer(&den),
                        Bind::Buffer(&elected),
                    ],
                    params: MergeParams {
                        flags,
                        ..pass_params(len, group.len(), g > 0, w, 0.0)
                    },
                },
            )?;
        }
        dispatch(
            &mut batch,
            &finish,
            PassInputs {
                inputs: model_binds(&[base], page),
                sums: [Bind::Buffer(num), Bind::Buffer(&den), Bind::Unused],
                params: MergeParams {
                    flags,
                    ..pass_params(len, 1, false, &[], finish_scalar)
                },
            },
        )?;
    }
    batch.submit()
}

/// Fisher merging `out = sum w'_i F'_i theta_i / sum w'_i F'_i`, `F'_i = max(F_i, floor)`,
/// `w'_i = w_i` or `w_i / ||F_i||_2` with [`FisherParams::with_normalization`] (the squared norms
/// from [`sum_squares`] over each model's Fisher); the plain weighted mean where every
/// `w'_i F'_i` is zero (the twin of `fisher_merge_ref`).
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let a = GpuTensor::from_slice(&ctx, &[1.0f32, -2.0, 4.0])?;
/// let b = GpuTensor::from_slice(&ctx, &[3.0f32, 6.0, -4.0])?;
/// let fa = GpuTensor::from_slice(&ctx, &[1.0f32, 1.0, 1.0])?;
/// let fb = GpuTensor::from_slice(&ctx, &[3.0f32, 0.0, 1.0])?;
/// let mut out = GpuTensor::zeros(&ctx, 3, 1)?;
/// fisher_merge(&ctx, &[&a, &b], &[&fa, &fb], &[1.0, 1.0], FisherParams::default(), &mut out)?;
/// assert_eq!(out.to_vec_blocking(&ctx)?, [2.5, -2.0, 0.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn fisher_merge<T: GpuElement>(
    ctx: &Context,
    thetas: &[&GpuTensor<T>],
    fishers: &[&GpuTensor<f32>],
    weights: &[f32],
    params: FisherParams<'_>,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    let weight_sum =
        validate_fisher_merge(lens(thetas), lens(fishers), weights, params, out.len())?;
    let floor = params.floor;
    // Divided by their sum in f64 and rounded once: the plain mean needs no `1 / sum`, which
    // overflows f32 for weights summing below 3e-39 (the Fisher quotient does not change).
    let weights = f32_coefficients(
        (0..thetas.len()).map(|i| f64::from(fisher_weight(weights, params, i)) / weight_sum),
    )?;
    same_shape("thetas[i]", thetas, out)?;
    same_shape("fishers[i]", fishers, out)?;
    let pass = pipeline(ctx, &FISHER_PASS, T::ENCODING)?;
    let finish = pipeline(ctx, &FISHER_FINISH, T::ENCODING)?;
    let mut batch = ctx.batch()?;
    for page in 0..out.page_count() {
        let (num, len) = out.page(page);
        let den = batch.scratch(len as u64 * 4)?;
        let plain = batch.scratch(len as u64 * 4)?;
        for (g, ((theta, fisher), w)) in thetas
            .chunks(FISHER_MODELS_PER_PASS)
            .zip(fishers.chunks(FISHER_MODELS_PER_PASS))
            .zip(weights.chunks(FISHER_MODELS_PER_PASS))
            .enumerate()
        {
            let [t0, t1, ..] = model_binds(theta, page);
            let [f0, f1, ..] = model_binds(fisher, page);
            dispatch(
                &mut batch,
                &pass,
                PassInputs {
                    inputs: [t0, t1, f0, f1],
                    sums: [Bind::Buffer(num), Bind::Buffer(&den), Bind::Buffer(&plain)],
                    params: pass_params(len, theta.len(), g > 0, w, floor),
                },
            )?;
        }
        dispatch(
            &mut batch,
            &finish,
            PassInputs {
                inputs: [Bind::Unused, Bind::Unused, Bind::Unused, Bind::Unused],
                sums: [Bind::Buffer(num), Bind::Buffer(&den), Bind::Buffer(&plain)],
                params: pass_params(len, 0, false, &[], 1.0),
            },
        )?;
    }
    batch.submit()
}

/// Diagonal Fisher accumulation `fisher += scale * grad^2` (the twin of
/// `fisher_accumulate_ref`), `scale` finite and `>= 0`.
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let mut fisher = GpuTensor::from_slice(&ctx, &[1.0f32, 0.0])?;
/// let grad = GpuTensor::from_slice(&ctx, &[2.0f32, -3.0])?;
/// fisher_accumulate(&ctx, &mut fisher, &grad, 0.5)?;
/// assert_eq!(fisher.to_vec_blocking(&ctx)?, [3.0, 4.5]);
/// # Ok::<(), Error>(())
/// ```
pub fn fisher_accumulate<T: GpuElement>(
    ctx: &Context,
    fisher: &mut GpuTensor<f32>,
    grad: &GpuTensor<T>,
    scale: f32,
) -> Result<()> {
    validate_fisher_accumulate(fisher.len(), grad.len(), scale)?;
    grad.expect_shape("grad", fisher.shape())?;
    let pipeline = pipeline(ctx, &FISHER_ACCUMULATE, T::ENCODING)?;
    let mut batch = ctx.batch()?;
    for page in 0..fisher.page_count() {
        let (sum, len) = fisher.page(page);
        dispatch(
            &mut batch,
            &pipeline,
            PassInputs {
                inputs: model_binds(&[grad], page),
                sums: [Bind::Buffer(sum), Bind::Unused, Bind::Unused],
                params: pass_params(len, 1, true, &[], scale),
            },
        )?;
    }
    batch.submit()
}

/// Relative bound on [`sum_squares`] against the reference: `(ITEMS + log2 WORKGROUP + 3) u`,
/// `u = 2^-24`. The squares are non-negative, each rounded once, and summed in `f32` by `ITEMS`
/// additions per invocation and a `log2 WORKGROUP`-level tree per tile of 4096; tiles combine in
/// `f64`.
pub const SUM_SQUARES_RELATIVE_TOLERANCE: f64 =
    (crate::select::ITEMS + crate::select::WORKGROUP.ilog2() + 3) as f64
        * (f32::EPSILON as f64 / 2.0);

/// `sum x^2` of a tensor, within [`SUM_SQUARES_RELATIVE_TOLERANCE`] of `sum_squares_ref`:
/// summed tensor by tensor over a model's Fisher, the squared norm
/// [`FisherParams::with_normalization`] takes. `async`: the tile sums are read back.
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let x = GpuTensor::from_slice(&ctx, &[3.0f32, 4.0])?;
/// assert_eq!(block_on(sum_squares(&ctx, &x))?, 25.0);
/// # Ok::<(), Error>(())
/// ```
///
/// The sum keeps the range of `f64`, as the CPU's: a tile whose `f32` sum of squares is not finite,
/// or below [`SQUARES_IN_F64_BELOW`] while some entry is not zero (squares lost to underflow), is
/// read back and summed in `f64` on the host. Only such tiles are read, 16 KiB of `f32` each.
pub async fn sum_squares<T: GpuElement>(ctx: &Context, x: &GpuTensor<T>) -> Result<f64> {
    let tiles = crate::compress::tile_moments(ctx, &[x], 0.0).await?;
    let tile_len = crate::select::TILE;
    let mut tiles = tiles.iter();
    let mut total = 0.0f64;
    for page in 0..x.page_count() {
        let (buffer, len) = x.page(page);
        for (first, tile) in (0..len).step_by(tile_len).zip(&mut tiles) {
            let in_range = tile.squares.is_finite()
                && (tile.squares >= SQUARES_IN_F64_BELOW || tile.largest == 0.0);
            total += if in_range {
                f64::from(tile.squares)
            } else {
                let count = tile_len.min(len - first);
                let values: Vec<T> = ctx.read_buffer_at(buffer, first, count).await?;
                values
                    .iter()
                    .map(|v| f64::from(v.to_f32()) * f64::from(v.to_f32()))
                    .sum()
            };
        }
    }
    Ok(total)
}
