//! Task-vector masks on the GPU: DARE with the shared counter-based generator, TIES trimming
//! and Model Breadcrumbs, the twins of `kernels_core::ops::merge`'s references.
//!
//! # Contracts
//!
//! * TIES trim and Breadcrumbs keep exactly the reference's entries (radix select on the
//!   magnitude keys, ties by lower index; see [`crate::select`]) and write them widened to `f32`,
//!   exactly; the rest are `+0.0`. They are `async`: the selection reads histograms back.
//! * The survivors are exactly the reference's: element `first_index + i` survives iff the top
//!   24 bits of its Philox4x32-10 word reach `DareParams::drop_threshold()`, computed in 32-bit
//!   integers on the GPU. Any chunking or paging of a tensor draws the same mask.
//! * A survivor is `tau_i * scale` rounded once in `f32` with `scale` rounded to `f32` (WGSL has
//!   no `f64`); the reference rounds the `f64` product once. They differ by at most
//!   [`DARE_RELATIVE_TOLERANCE`] relative (plus `2^-149` where the survivor is subnormal, rounded
//!   in absolute terms); dropped entries are exactly `+0.0`.
//! * [`DareRescale::PreserveL1`] first sums `|tau|` and the survivors' `|tau|` in `f32` per tile
//!   of 4096 entries, combined in `f64` on the host (hence `async`); its survivors are within
//!   [`DARE_L1_RELATIVE_TOLERANCE`].

pub use kernels_core::ops::merge::{BreadcrumbsParams, DareParams, DareRescale};
use kernels_core::ops::select::KeepRule;
use kernels_core::{CounterRng, Error, Result};
use kernels_wgsl::Family;

use crate::context::{Bind, Context, Kernel, Slot};
use crate::select::{ITEMS, TILE, tiled_pipeline};
use crate::tensor::{GpuElement, GpuTensor};

/// Invocations per workgroup of the DARE kernels (the tiles' workgroup).
const WORKGROUP: u32 = crate::select::WORKGROUP;

/// Relative bound on a survivor against the reference: `2 u`, `u = 2^-24` (the `f32` scale's
/// rounding and the product's, against one rounding of the exact product).
pub const DARE_RELATIVE_TOLERANCE: f64 = f32::EPSILON as f64;

/// Relative bound on a [`DareRescale::PreserveL1`] survivor against the reference:
/// `(2 (ITEMS + log2 WORKGROUP + 1) + 2) u`. Each L1 norm is a sum of non-negative terms, in
/// `f32` by `ITEMS` additions per invocation and a `log2 WORKGROUP`-level tree per tile, then in
/// `f64`: relative error `(ITEMS + log2 WORKGROUP + 1) u` each; their ratio adds both, and the
/// `f32` scale and product two more.
pub const DARE_L1_RELATIVE_TOLERANCE: f64 =
    (2 * (ITEMS + WORKGROUP.ilog2() + 1) + 2) as f64 * (f32::EPSILON as f64 / 2.0);

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct DareUniform {
    len: u32,
    first_lo: u32,
    first_hi: u32,
    drop_threshold: u32,
    key: [u32; 2],
    scale: f32,
    tile_base: u32,
}

const fn dare_kernel(entry: &'static str) -> Kernel {
    Kernel {
        family: Family::Dare,
        entry,
        slots: &[Slot::Read, Slot::ReadWrite, Slot::Uniform],
        needs_subgroups: false,
    }
}

const DARE: Kernel = dare_kernel("dare");
const DARE_L1_SUMS: Kernel = dare_kernel("dare_l1_sums");

/// DARE: `out_i = tau_i * scale` where element `first_index + i` survives, else 0 (the twin of
/// `dare_ref`; `first_index` is the flat index of `tau`'s first element in the whole tensor).
/// `async` for [`DareRescale::PreserveL1`], whose norms are read back; the other rules only
/// submit.
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let tau = GpuTensor::from_slice(&ctx, &[1.0f32; 1000])?;
/// let mut out = GpuTensor::zeros(&ctx, 1000, 1)?;
/// let params = DareParams::default().with_drop(0.5).with_seed(7);
/// block_on(dare(&ctx, &tau, params, 0, &mut out))?;
/// let out = out.to_vec_blocking(&ctx)?;
/// // The same mask as on the CPU; survivors rescaled by 1 / (1 - p).
/// assert!(out.iter().all(|&v| v == 0.0 || v == 2.0));
/// # Ok::<(), Error>(())
/// ```
pub async fn dare<T: GpuElement>(
    ctx: &Context,
    tau: &GpuTensor<T>,
    params: DareParams,
    first_index: u64,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    out.expect_len("out", tau.len())?;
    kernels_core::backend::validate_dare(params, first_index, tau.len())?;
    tau.expect_shape("tau", out.shape())?;
    let uniform = |page: usize, first: u64, scale: f64, tile_base: usize| DareUniform {
        len: tau.page(page).1 as u32,
        first_lo: first as u32,
        first_hi: (first >> 32) as u32,
        drop_threshold: params.drop_threshold(),
        key: CounterRng::new(params.seed).key(),
        scale: scale as f32,
        tile_base: tile_base as u32,
    };
    let scale = match params.rescale {
        DareRescale::InverseKeep => 1.0 / (1.0 - params.drop),
        DareRescale::None => 1.0,
        DareRescale::PreserveL1 => {
            let tiles: usize = (0..tau.page_count())
                .map(|p| tau.page(p).1.div_ceil(TILE))
                .sum();
            let bytes = (tiles.max(1) * 2 * 4) as u64;
            let sums = ctx.take_storage(bytes)?;
            let read = async {
                let pipeline = tiled_pipeline(ctx, &DARE_L1_SUMS, T::ENCODING)?;
                let mut batch = ctx.batch()?;
                let (mut first, mut tile_base) = (first_index, 0);
                for page in 0..tau.page_count() {
                    let len = tau.page(page).1;
                    let params = batch.uniform(&uniform(page, first, 0.0, tile_base))?;
                    let grid = batch.grid(len.div_ceil(TILE) as u32);
                    batch.dispatch(
                        &pipeline,
                        &[
                            Bind::Buffer(tau.page(page).0),
                            Bind::Buffer(&sums),
                            Bind::Buffer(&params),
                        ],
                        grid,
                    );
                    first = first.wrapping_add(len as u64);
                    tile_base += len.div_ceil(TILE);
                }
                batch.submit()?;
                ctx.read_buffer::<f32>(&sums, tiles.max(1) * 2).await
            }
            .await;
            ctx.give_back([sums]);
            let read = read?;
            let (all, kept) = read
                .chunks_exact(2)
                .take(tiles)
                .fold((0.0f64, 0.0f64), |(a, k), pair| {
                    (a + f64::from(pair[0]), k + f64::from(pair[1]))
                });
            kernels_core::ops::merge::l1_scale(all, kept)
        }
        _ => {
            // `DareRescale` is non-exhaustive: a rule added later must be implemented here.
            return Err(Error::Unsupported {
                feature: "this DARE rescale rule on the GPU",
                hint: "use InverseKeep, None or PreserveL1",
            });
        }
    };
    let pipeline = tiled_pipeline(ctx, &DARE, T::ENCODING)?;
    let mut batch = ctx.batch()?;
    let mut first = first_index;
    for page in 0..out.page_count() {
        let (target, len) = out.page(page);
        let params = batch.uniform(&uniform(page, first, scale, 0))?;
        let grid = batch.grid((len as u32).div_ceil(WORKGROUP));
        batch.dispatch(
            &pipeline,
            &[
                Bind::Buffer(tau.page(page).0),
                Bind::Buffer(target),
                Bind::Buffer(&params),
            ],
            grid,
        );
        first = first.wrapping_add(len as u64);
    }
    batch.submit()
}

/// TIES trim: keeps what `keep` keeps of `tau` by magnitude (ties by lower index) and zeroes
/// the rest (the twin of `ties_trim_ref`): [`crate::select::topk_keep`] under its TIES name.
/// Written as `f32` (exact; on the CPU the output may also be the tensor's own type).
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let tau = GpuTensor::from_slice(&ctx, &[0.5f32, -3.0, 1.0, 2.0])?;
/// let mut trimmed = GpuTensor::zeros(&ctx, 4, 1)?;
/// block_on(ties_trim(&ctx, &tau, KeepRule::Density(0.5), &mut trimmed))?;
/// assert_eq!(trimmed.to_vec_blocking(&ctx)?, [0.0, -3.0, 0.0, 2.0]);
/// # Ok::<(), Error>(())
/// ```
pub async fn ties_trim<T: GpuElement>(
    ctx: &Context,
    tau: &GpuTensor<T>,
    keep: KeepRule,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    out.expect_len("out", tau.len())?;
    crate::select::topk_keep(ctx, tau, keep, out).await
}

/// Model Breadcrumbs: keeps the entries whose magnitude rank (descending, ties by lower index)
/// lies in `[top, top + keep)` of [`BreadcrumbsParams::counts`] and zeroes the rest (the twin of
/// `breadcrumbs_ref`).
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let tau = [0.1f32, -5.0, 0.3, 0.2, -0.4, 0.05, 3.0, 0.01, -0.2, 0.6];
/// let tau = GpuTensor::from_slice(&ctx, &tau)?;
/// let mut out = GpuTensor::zeros(&ctx, 10, 1)?;
/// let params = BreadcrumbsParams::default().with_density(0.5).with_gamma(0.1);
/// block_on(breadcrumbs(&ctx, &tau, params, &mut out))?;
/// assert_eq!(out.to_vec_blocking(&ctx)?, [0.0, 0.0, 0.3, 0.2, -0.4, 0.0, 3.0, 0.0, 0.0, 0.6]);
/// # Ok::<(), Error>(())
/// ```
pub async fn breadcrumbs<T: GpuElement>(
    ctx: &Context,
    tau: &GpuTensor<T>,
    params: BreadcrumbsParams,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    out.expect_len("out", tau.len())?;
    let (top, keep) = params.counts(tau.len() as u64)?;
    crate::select::keep_band(ctx, tau, top + keep, top, out).await
}
