//! ComPEFT on the GPU: the moments, the global top-k selection and the sign codes on the
//! device; the host writes the bytes of either layout (the twins of
//! `kernels_core::ops::ternary`'s `compeft_ref` and the CPU's `compress`).
//!
//! # Contracts
//!
//! * [`compeft`] writes exactly the bytes `format::encode` writes for `compeft_ref`'s codes, and
//!   [`compeft_codes`] gives those codes: the selection is bit-identical ([`crate::select`]);
//!   the scale `alpha * sigma` is within [`SCALE_RELATIVE_TOLERANCE`] (sums in `f32` per tile of
//!   4096, combined in `f64`).
//! * `async`: the selection reads its histograms back, and the codes come back to the host.

use kernels_core::format::{self, TernaryLayout};
use kernels_core::ops::ternary::Moments;
pub use kernels_core::ops::ternary::{CompeftCut, CompeftParams};
use kernels_core::{Error, Result};

use crate::context::{Bind, Context};
use crate::select::{ITEMS, Sink, TILE, apply_cuts, find_cut, tiled_pipeline};
use crate::tensor::{GpuElement, GpuTensor};
use crate::ternary::{MOMENTS, TernaryParams, WORKGROUP};

/// Relative bound on `|scale - scale_ref| / scale_ref` for [`compeft`]:
/// `(ITEMS + log2 WORKGROUP + 4) u`, `u = 2^-24`.
///
/// A tile's squared deviations are non-negative terms, each rounded in the subtraction and the
/// square (`3 u` relative), summed in `f32` by `ITEMS` additions per invocation and a tree of
/// `log2 WORKGROUP` levels; tiles combine in `f64`. The standard deviation halves the variance's
/// relative error, and the final `f32` rounding adds one `u`; the bound takes no credit for the
/// halving.
pub const SCALE_RELATIVE_TOLERANCE: f64 =
    (ITEMS + WORKGROUP.ilog2() + 4) as f64 * (f32::EPSILON as f64 / 2.0);

/// `(sum d, sum d^2)` with `d = v - shift` over every entry of `tensors`, from per-tile `f32`
/// sums combined in `f64`.
async fn tile_sums<T: GpuElement>(
    ctx: &Context,
    tensors: &[&GpuTensor<T>],
    shift: f32,
) -> Result<(f64, f64)> {
    Ok(tile_moments(ctx, tensors, shift)
        .await?
        .iter()
        .fold((0.0, 0.0), |(s, q), tile| {
            (s + f64::from(tile.sum), q + f64::from(tile.squares))
        }))
}

/// What the device sums over one tile of `TILE` entries: `d = v - shift`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TileMoments {
    /// `sum d`, in `f32`.
    pub sum: f32,
    /// `sum d^2`, in `f32`.
    pub squares: f32,
    /// `max |d|`.
    pub largest: f32,
}

/// Every tile's [`TileMoments`], tensor by tensor, page by page, in order.
pub(crate) async fn tile_moments<T: GpuElement>(
    ctx: &Context,
    tensors: &[&GpuTensor<T>],
    shift: f32,
) -> Result<Vec<TileMoments>> {
    let pipeline = tiled_pipeline(ctx, &MOMENTS, T::ENCODING)?;
    let tiles: usize = tensors
        .iter()
        .flat_map(|t| (0..t.page_count()).map(|p| t.page(p).1.div_ceil(TILE)))
        .sum();
    if tiles == 0 {
        return Ok(Vec::new());
    }
    let sums = ctx.take_storage((tiles * 3 * 4) as u64)?;
    let read = async {
        let mut batch = ctx.batch()?;
        let mut tile_base = 0;
        for t in tensors {
            for page in 0..t.page_count() {
                let (buffer, len) = t.page(page);
                let params = batch.uniform(&TernaryParams {
                    len: len as u32,
                    scale: shift,
                    tile_base: tile_base as u32,
                    ..TernaryParams::default()
                })?;
                let page_tiles = len.div_ceil(TILE);
                let grid = batch.grid(page_tiles as u32);
                batch.dispatch(
                    &pipeline,
                    &[
                        Bind::Unused,
                        Bind::Buffer(buffer),
                        Bind::Buffer(&sums),
                        Bind::Buffer(&params),
                        Bind::Unused,
                    ],
                    grid,
                );
                tile_base += page_tiles;
            }
        }
        batch.submit()?;
        ctx.read_buffer::<f32>(&sums, tiles * 3).await
    }
    .await;
    ctx.give_back([sums]);
    Ok(read?
        .chunks_exact(3)
        .map(|t| TileMoments {
            sum: t[0],
            squares: t[1],
            largest: t[2],
        })
        .collect())
}

/// The moments (count, mean, and std with Bessel's correction) of every entry of `tensors`
/// taken as one vector: a pass around zero gives the mean, a second around the `f32` mean the
/// deviations. Non-finite entries give non-finite moments.
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let x = GpuTensor::from_slice(&ctx, &[1.0f32, 2.0, 3.0])?;
/// let m = block_on(moments(&ctx, &[&x]))?;
/// assert_eq!((m.count(), m.mean(), m.std()), (3, 2.0, 1.0));
/// # Ok::<(), Error>(())
/// ```
pub async fn moments<T: GpuElement>(ctx: &Context, tensors: &[&GpuTensor<T>]) -> Result<Moments> {
    let n: u64 = tensors.iter().map(|t| t.len() as u64).sum();
    if n == 0 {
        return Ok(Moments::default());
    }
    let (sum, _) = tile_sums(ctx, tensors, 0.0).await?;
    let shift = (sum / n as f64) as f32;
    let (dev, squares) = tile_sums(ctx, tensors, shift).await?;
    // With d = v - shift: sum (v - mean)^2 = sum d^2 - (sum d)^2 / n.
    let mean = f64::from(shift) + dev / n as f64;
    let m2 = (squares - dev * dev / n as f64).max(0.0);
    Ok(Moments::from_stats(n, mean, m2))
}

/// The decision of ComPEFT over `taus` taken as one vector, and the cut to apply to them.
async fn decide<T: GpuElement>(
    ctx: &Context,
    taus: &[&GpuTensor<T>],
    params: CompeftParams,
) -> Result<(CompeftCut, crate::select::Cut)> {
    params.validate()?;
    let (cut, equal_total) = find_cut(ctx, taus, params.keep).await?;
    let moments = moments(ctx, taus).await?;
    let decided = CompeftCut {
        scale: params.scale(&moments)?,
        cut: cut.public(equal_total),
        total: moments.count(),
    };
    Ok((decided, cut))
}

/// The codes of `tau` under `cut` (spending its ties), read back.
async fn codes_of<T: GpuElement>(
    ctx: &Context,
    tau: &GpuTensor<T>,
    cut: &mut crate::select::Cut,
) -> Result<Vec<i8>> {
    let words: Vec<u64> = (0..tau.page_count())
        .map(|p| tau.page(p).1.div_ceil(16).max(1) as u64 * 4)
        .collect();
    let buffers = words
        .iter()
        .map(|&bytes| ctx.take_storage(bytes))
        .collect::<Result<Vec<_>>>()?;
    let read = async {
        apply_cuts(ctx, tau, cut, None, Sink::Codes(&buffers)).await?;
        let mut codes = Vec::with_capacity(tau.len());
        for (page, buffer) in buffers.iter().enumerate() {
            let page_words = ctx
                .read_buffer::<u32>(buffer, (words[page] / 4) as usize)
                .await?;
            let len = tau.page(page).1;
            codes.extend(
                (0..len).map(|i| match (page_words[i / 16] >> (2 * (i % 16))) & 3 {
                    1 => 1i8,
                    2 => -1,
                    _ => 0,
                }),
            );
        }
        Ok::<_, Error>(codes)
    }
    .await;
    ctx.give_back(buffers);
    read
}

/// ComPEFT of a whole model held on the device: the decision and each tensor packed with its
/// shape in `layout` (the twin of `compeft_ref` followed by `format::encode`, byte for byte).
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let a = GpuTensor::from_slice(&ctx, &[0.5f32, -3.0, 1.0, 0.0])?;
/// let b = GpuTensor::from_slice(&ctx, &[2.0f32, -0.25])?;
/// let model: [(&GpuTensor<f32>, &[u64]); 2] = [(&a, &[2, 2]), (&b, &[2])];
/// let params = CompeftParams::default().with_keep(KeepRule::Density(0.5));
/// let (decided, packed) = block_on(compeft(&ctx, &model, params, TernaryLayout::SparseRice))?;
/// assert_eq!((decided.total, packed.len()), (6, 2));
/// # Ok::<(), Error>(())
/// ```
pub async fn compeft<T: GpuElement>(
    ctx: &Context,
    tensors: &[(&GpuTensor<T>, &[u64])],
    params: CompeftParams,
    layout: TernaryLayout,
) -> Result<(CompeftCut, Vec<Vec<u8>>)> {
    for (tau, shape) in tensors {
        kernels_core::backend::check_shape(shape, tau.len())?;
    }
    let taus: Vec<&GpuTensor<T>> = tensors.iter().map(|(t, _)| *t).collect();
    let (decided, mut cut) = decide(ctx, &taus, params).await?;
    let mut packed = Vec::with_capacity(tensors.len());
    for (tau, shape) in tensors {
        let codes = codes_of(ctx, tau, &mut cut).await?;
        packed.push(format::encode(&codes, shape, decided.scale, layout)?);
    }
    Ok((decided, packed))
}

/// ComPEFT of a whole model held on the device, as codes: the decision and each tensor's codes in
/// `{-1, 0, 1}` (the twin of `compeft_ref`, code for code).
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let a = GpuTensor::from_slice(&ctx, &[0.5f32, -3.0, 1.0, 0.0])?;
/// let b = GpuTensor::from_slice(&ctx, &[2.0f32, -0.25])?;
/// let params = CompeftParams::default().with_keep(KeepRule::Count(2));
/// let (_, codes) = block_on(compeft_codes(&ctx, &[&a, &b], params))?;
/// assert_eq!(codes, [vec![0, -1, 0, 0], vec![1, 0]]);
/// # Ok::<(), Error>(())
/// ```
pub async fn compeft_codes<T: GpuElement>(
    ctx: &Context,
    taus: &[&GpuTensor<T>],
    params: CompeftParams,
) -> Result<(CompeftCut, Vec<Vec<i8>>)> {
    let (decided, mut cut) = decide(ctx, taus, params).await?;
    let mut codes = Vec::with_capacity(taus.len());
    for tau in taus {
        codes.push(codes_of(ctx, tau, &mut cut).await?);
    }
    Ok((decided, codes))
}
