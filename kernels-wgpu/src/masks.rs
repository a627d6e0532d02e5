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
//!   [`DARE_RELATIVE_TOLERANCE`] relative; dropped entries are exactly `+0.0`.
//! * [`DareRescale::PreserveL1`] needs a reduction over the tensor before the mask; this backend
//!   does not offer it yet and says so (`Error::Unsupported`).

use kernels_core::ops::merge::{BreadcrumbsParams, DareParams, DareRescale};
use kernels_core::ops::select::keep_count;
use kernels_core::{CounterRng, Error, Result};
use shaders::Family;

use crate::context::{Bind, Context, Kernel, Slot};
use crate::tensor::{GpuElement, GpuTensor};

/// Invocations per workgroup of the DARE kernel.
pub const WORKGROUP: u32 = 256;

/// Relative bound on a survivor against the reference: `2 u`, `u = 2^-24` (the `f32` scale's
/// rounding and the product's, against one rounding of the exact product).
pub const DARE_RELATIVE_TOLERANCE: f64 = f32::EPSILON as f64;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct DareUniform {
    len: u32,
    first_lo: u32,
    first_hi: u32,
    drop_threshold: u32,
    key: [u32; 2],
    scale: f32,
    pad: u32,
}

const DARE: Kernel = Kernel {
    family: Family::Dare,
    entry: "dare",
    slots: &[Slot::Read, Slot::ReadWrite, Slot::Uniform],
    needs_subgroups: false,
};

/// DARE: `out_i = tau_i * scale` where element `first_index + i` survives, else 0 (the twin of
/// `dare_ref`; `first_index` is the flat index of `tau`'s first element in the whole tensor).
pub fn dare<T: GpuElement>(
    ctx: &Context,
    tau: &GpuTensor<T>,
    params: DareParams,
    first_index: u64,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    out.expect_len("out", tau.len())?;
    params.validate()?;
    tau.expect_shape("tau", out.shape())?;
    let scale = match params.rescale {
        DareRescale::InverseKeep => 1.0 / (1.0 - params.drop),
        DareRescale::None => 1.0,
        _ => {
            return Err(Error::Unsupported {
                feature: "this DARE rescale rule on the GPU",
                hint: "use DareRescale::InverseKeep or DareRescale::None here, or the CPU kernel \
                       (kernels_cpu::masks::dare) for PreserveL1",
            });
        }
    };
    let pipeline = ctx.pipeline(
        &DARE,
        false,
        &[("WORKGROUP", WORKGROUP), ("ELEMENT", T::ENCODING)],
    )?;
    let key = CounterRng::new(params.seed).key();
    let mut batch = ctx.batch()?;
    let mut first = first_index;
    for page in 0..out.page_count() {
        let (target, len) = out.page(page);
        let uniform = batch.uniform(&DareUniform {
            len: len as u32,
            first_lo: first as u32,
            first_hi: (first >> 32) as u32,
            drop_threshold: params.drop_threshold(),
            key,
            scale: scale as f32,
            pad: 0,
        })?;
        let grid = batch.grid((len as u32).div_ceil(WORKGROUP));
        batch.dispatch(
            &pipeline,
            &[
                Bind::Buffer(tau.page(page).0),
                Bind::Buffer(target),
                Bind::Buffer(&uniform),
            ],
            grid,
        );
        first = first.wrapping_add(len as u64);
    }
    batch.submit()
}

/// TIES trim: keeps the top `floor(density n)` magnitudes of `tau` (ties by lower index) and
/// zeroes the rest (the twin of `ties_trim_ref`, written as `f32`).
pub async fn ties_trim<T: GpuElement>(
    ctx: &Context,
    tau: &GpuTensor<T>,
    density: f64,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    out.expect_len("out", tau.len())?;
    let k = keep_count(density, tau.len() as u64)?;
    crate::select::topk_keep(ctx, tau, k, out).await
}

/// Model Breadcrumbs: keeps the entries whose magnitude rank (descending, ties by lower index)
/// lies in `[top, top + keep)` of [`BreadcrumbsParams::counts`] and zeroes the rest (the twin of
/// `breadcrumbs_ref`).
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
