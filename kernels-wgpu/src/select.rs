//! Magnitude selection on the GPU: the top-k cut and the k-th largest magnitude over one tensor
//! or many taken as one flat vector (a whole model), and applying cuts, the twins of
//! `kernels_core::ops::select`'s references.
//!
//! # Contracts
//!
//! * Bit-identical to the reference: the order is that of the `u32` image of `|x|`
//!   (`magnitude_key`), widened exactly from `f16` and `bf16`; exactly `k` entries are kept, ties
//!   going to the lower flat index across pages and tensors. NaN and infinities are
//!   `Error::NonFinite` with the first one's flat index, as in the reference.
//! * Radix select: one histogram pass per digit (11, 10 and 10 bits, from the top) over every
//!   tensor, each counting only the keys under the bin chosen so far; the host reads the 8 KiB
//!   histogram back between passes (so these functions are `async`). Applying a cut is one pass,
//!   plus a counting pass (and a read-back of one count per 4096 entries) when only some of the
//!   entries equal to the cut are kept.
//! * Any number of entries: the device counts in `u32`, so tensors are histogrammed in groups
//!   of fewer than 2^32 entries and the host adds the groups' counts in `u64`.

pub use kernels_core::ops::select::{KeepRule, TopKCut};
use kernels_core::ops::select::{Selection, magnitude_key};
use kernels_core::{Error, Result};
use kernels_wgsl::Family;

use crate::context::{Bind, Context, Kernel, Slot};
use crate::tensor::{GpuElement, GpuTensor};

/// Invocations per workgroup of the selection kernels.
pub(crate) const WORKGROUP: u32 = 256;

/// Entries each invocation handles; a workgroup owns a tile of `WORKGROUP * ITEMS` entries.
///
/// PERF: a tile of 4096 entries amortises the flush of a 2048-bin workgroup histogram to the
/// global one (most bins are empty and skipped).
pub(crate) const ITEMS: u32 = 16;

/// Entries of one tile.
pub(crate) const TILE: usize = (WORKGROUP * ITEMS) as usize;

/// The digits of a 31-bit key, from the top: `(shift, bits)`.
const DIGITS: [(u32, u32); 3] = [(20, 11), (10, 10), (0, 10)];

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct SelectParams {
    len: u32,
    shift: u32,
    digit_mask: u32,
    prefix_mask: u32,
    prefix: u32,
    nan_slot: u32,
    tile_base: u32,
    has_b: u32,
    key_a: u32,
    ties_a: u32,
    key_b: u32,
    ties_b: u32,
    pack: u32,
    pad: [u32; 3],
}

// Slots: x, counts, params, out, packed.
const SLOTS: &[Slot] = &[
    Slot::Read,
    Slot::ReadWrite,
    Slot::Uniform,
    Slot::ReadWrite,
    Slot::ReadWrite,
];

const fn kernel(entry: &'static str) -> Kernel {
    Kernel {
        family: Family::Select,
        entry,
        slots: SLOTS,
        needs_subgroups: false,
    }
}

const HISTOGRAM: Kernel = kernel("histogram");
const COUNT_EQUAL: Kernel = kernel("count_equal");
const APPLY_CUTS: Kernel = kernel("apply_cuts");

/// The pipeline of a tiled kernel (tiles of [`WORKGROUP`] x [`ITEMS`] entries: selection, and
/// the per-tile sums of ComPEFT's moments and DARE's norms) over entries of `encoding`.
pub(crate) fn tiled_pipeline(
    ctx: &Context,
    kernel: &Kernel,
    encoding: u32,
) -> Result<std::sync::Arc<crate::context::Pipeline>> {
    ctx.pipeline(
        kernel,
        false,
        &[
            ("WORKGROUP", WORKGROUP),
            ("ITEMS", ITEMS),
            ("ELEMENT", encoding),
        ],
    )
}

fn pipeline<T: GpuElement>(
    ctx: &Context,
    kernel: &Kernel,
) -> Result<std::sync::Arc<crate::context::Pipeline>> {
    tiled_pipeline(ctx, kernel, T::ENCODING)
}

/// Which of the entries equal to a cut's magnitude it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ties {
    /// All of them (no counting needed).
    All,
    /// The first this many, in flat order.
    First(u64),
}

/// A cut as the kernels apply it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cut {
    key: u32,
    ties: Ties,
}

impl Cut {
    fn from_public(cut: &TopKCut) -> Self {
        Self {
            key: magnitude_key(cut.magnitude),
            ties: Ties::First(cut.ties),
        }
    }

    pub(crate) fn public(&self, equal_total: u64) -> TopKCut {
        TopKCut {
            magnitude: f32::from_bits(self.key),
            ties: match self.ties {
                Ties::All => equal_total,
                Ties::First(t) => t,
            },
        }
    }

    fn needs_ranks(&self) -> bool {
        matches!(self.ties, Ties::First(t) if t > 0)
    }

    /// The ties this tensor may keep, as the kernel's `u32` (a tensor has fewer than 2^32).
    fn ties_here(&self) -> u32 {
        match self.ties {
            Ties::All => u32::MAX,
            Ties::First(t) => t.min(u64::from(u32::MAX)) as u32,
        }
    }

    /// Spends the ties that `equal` entries of one tensor took.
    fn consume(&mut self, equal: u64) {
        if let Ties::First(t) = &mut self.ties {
            *t = t.saturating_sub(equal);
        }
    }
}

/// One histogram pass over `group` (fewer than 2^32 entries, so no `u32` count overflows):
/// the bins, and per page the index of its first non-finite entry (`u32::MAX` for none).
async fn histogram_pass<T: GpuElement>(
    ctx: &Context,
    group: &[&GpuTensor<T>],
    shift: u32,
    bits: u32,
    prefix_mask: u32,
    prefix: u32,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let pipeline = pipeline::<T>(ctx, &HISTOGRAM)?;
    let bins = 1usize << bits;
    let pages: usize = group.iter().map(|s| s.page_count()).sum();
    let mut init = vec![0u32; bins];
    init.resize(bins + pages, u32::MAX);
    let bytes = (init.len() * 4) as u64;
    let counts = ctx.take_storage(bytes)?;
    ctx.write_buffer(&counts, bytemuck::cast_slice(&init));
    let read = async {
        let mut batch = ctx.batch()?;
        let mut nan_slot = 0;
        for slice in group {
            for page in 0..slice.page_count() {
                let (buffer, len) = slice.page(page);
                let params = batch.uniform(&SelectParams {
                    len: len as u32,
                    shift,
                    digit_mask: (1u32 << bits) - 1,
                    prefix_mask,
                    prefix,
                    nan_slot,
                    ..SelectParams::default()
                })?;
                let grid = batch.grid(len.div_ceil(TILE) as u32);
                batch.dispatch(
                    &pipeline,
                    &[
                        Bind::Buffer(buffer),
                        Bind::Buffer(&counts),
                        Bind::Buffer(&params),
                        Bind::Unused,
                        Bind::Unused,
                    ],
                    grid,
                );
                nan_slot += 1;
            }
        }
        batch.submit()?;
        ctx.read_buffer::<u32>(&counts, init.len()).await
    }
    .await;
    ctx.give_back([counts]);
    let mut histogram = read?;
    let nan = histogram.split_off(bins);
    Ok((histogram, nan))
}

/// Splits tensors of lengths `lens` (each at most `limit`) into consecutive runs of at most
/// `limit` entries in all.
fn count_groups(lens: &[u64], limit: u64) -> Vec<core::ops::Range<usize>> {
    let mut groups = Vec::new();
    let (mut start, mut len) = (0, 0u64);
    for (i, &l) in lens.iter().enumerate() {
        if len + l > limit {
            groups.push(start..i);
            (start, len) = (i, 0);
        }
        len += l;
    }
    groups.push(start..lens.len());
    groups
}

/// The cut of what `keep` keeps and the number of entries equal to its magnitude (known for a
/// top-k; 0 for a threshold, whose cut keeps none of them). Every entry is validated.
pub(crate) async fn find_cut<T: GpuElement>(
    ctx: &Context,
    slices: &[&GpuTensor<T>],
    keep: KeepRule,
) -> Result<(Cut, u64)> {
    keep.validate()?;
    let lens: Vec<u64> = slices.iter().map(|s| s.len() as u64).collect();
    let n: u64 = lens.iter().sum();
    // Every tensor has fewer than 2^32 entries; the device's counts are u32.
    let groups = count_groups(&lens, u64::from(u32::MAX));
    let mut prefix = 0u32;
    let mut prefix_mask = 0u32;
    let mut remaining = 0;
    let mut equal_total = 0;
    for (pass, &(shift, bits)) in DIGITS.iter().enumerate() {
        let mut histogram = vec![0u64; 1 << bits];
        let mut first_bad = Vec::new();
        for group in &groups {
            let group = &slices[group.clone()];
            let (counts, bad) =
                histogram_pass(ctx, group, shift, bits, prefix_mask, prefix).await?;
            for (total, count) in histogram.iter_mut().zip(counts) {
                *total += u64::from(count);
            }
            first_bad.extend(bad);
        }
        if pass == 0 {
            // The first non-finite entry in flat order: pages are numbered in flat order.
            let mut offset = 0u64;
            let pages = slices
                .iter()
                .flat_map(|s| (0..s.page_count()).map(|p| s.page(p).1 as u64));
            for (len, bad) in pages.zip(first_bad) {
                if bad != u32::MAX {
                    return Err(Error::NonFinite {
                        what: "x",
                        index: (offset + u64::from(bad)) as usize,
                    });
                }
                offset += len;
            }
            match keep.selection(n)? {
                Selection::Cut(cut) => return Ok((Cut::from_public(&cut), 0)),
                Selection::Top(0) => return Ok((Cut::from_public(&TopKCut::NONE), 0)),
                Selection::Top(k) => remaining = k,
            }
        }
        let mut chosen = 0;
        for (bin, &count) in histogram.iter().enumerate().rev() {
            if count >= remaining {
                chosen = bin;
                equal_total = count;
                break;
            }
            remaining -= count;
        }
        prefix |= (chosen as u32) << shift;
        prefix_mask |= ((1u32 << bits) - 1) << shift;
    }
    let ties = if remaining == equal_total {
        Ties::All
    } else {
        Ties::First(remaining)
    };
    Ok((Cut { key: prefix, ties }, equal_total))
}

/// The cut of what `keep` keeps of `slices` taken as one flat vector (the twin of
/// `topk_cut_ref`). `async`: the radix select reads its histograms back. Apply it tensor by
/// tensor with a [`TopKApplier`].
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let a = GpuTensor::from_slice(&ctx, &[0.5f32, -3.0, 1.0])?;
/// let b = GpuTensor::from_slice(&ctx, &[2.0f32, -2.0])?;
/// let cut = block_on(topk_cut(&ctx, &[&a, &b], KeepRule::Count(2)))?;
/// assert_eq!(cut, TopKCut { magnitude: 2.0, ties: 1 });
/// # Ok::<(), Error>(())
/// ```
pub async fn topk_cut<T: GpuElement>(
    ctx: &Context,
    slices: &[&GpuTensor<T>],
    keep: KeepRule,
) -> Result<TopKCut> {
    let (cut, equal_total) = find_cut(ctx, slices, keep).await?;
    Ok(cut.public(equal_total))
}

/// The k-th largest magnitude of `slices` taken as one flat vector, `1 <= k <= n` (the twin of
/// `kth_largest_magnitude_ref`).
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let a = GpuTensor::from_slice(&ctx, &[0.5f32, -3.0, 1.0, 2.0, -2.0])?;
/// assert_eq!(block_on(kth_largest_magnitude(&ctx, &[&a], 4))?, 1.0);
/// # Ok::<(), Error>(())
/// ```
pub async fn kth_largest_magnitude<T: GpuElement>(
    ctx: &Context,
    slices: &[&GpuTensor<T>],
    k: u64,
) -> Result<f32> {
    kernels_core::backend::check_kth(k)?;
    Ok(topk_cut(ctx, slices, KeepRule::Count(k)).await?.magnitude)
}

/// Where [`apply_cuts`] writes: the kept values (`out = kept ? x : 0`), or the kept entries'
/// sign codes packed 2 bits each, one buffer per page of `x` (each from its page's first entry).
pub(crate) enum Sink<'a> {
    Values(&'a mut GpuTensor<f32>),
    Codes(&'a [wgpu::Buffer]),
}

impl Sink<'_> {
    fn binds(&self, page: usize) -> (Bind<'_>, Bind<'_>) {
        match self {
            Sink::Values(out) => (Bind::Buffer(out.page(page).0), Bind::Unused),
            Sink::Codes(codes) => (Bind::Unused, Bind::Buffer(&codes[page])),
        }
    }
}

/// Applies cut `a` (and drops what cut `b` keeps) to `x`, writing to `sink`, and spends the
/// ties the tensor's equal entries took.
pub(crate) async fn apply_cuts<T: GpuElement>(
    ctx: &Context,
    x: &GpuTensor<T>,
    a: &mut Cut,
    b: Option<&mut Cut>,
    sink: Sink<'_>,
) -> Result<()> {
    if let Sink::Values(out) = &sink {
        x.expect_shape("out", out.shape())?;
    }
    let tiles: Vec<usize> = (0..x.page_count())
        .map(|p| x.page(p).1.div_ceil(TILE))
        .collect();
    let total_tiles: usize = tiles.iter().sum();
    let offsets_bytes = (total_tiles.max(1) * 2 * 4) as u64;
    let offsets = ctx.take_storage(offsets_bytes)?;
    let result = apply_with_offsets(ctx, x, a, b, &sink, &tiles, &offsets).await;
    ctx.give_back([offsets]);
    result
}

async fn apply_with_offsets<T: GpuElement>(
    ctx: &Context,
    x: &GpuTensor<T>,
    a: &mut Cut,
    b: Option<&mut Cut>,
    sink: &Sink<'_>,
    tiles: &[usize],
    offsets: &wgpu::Buffer,
) -> Result<()> {
    let total_tiles: usize = tiles.iter().sum();
    let offsets_bytes = (total_tiles.max(1) * 2 * 4) as u64;
    let b_key = b.as_ref().map_or(u32::MAX, |b| b.key);
    let apply = pipeline::<T>(ctx, &APPLY_CUTS)?;
    let params = |page: usize, tile_base: usize, a: &Cut, b: Option<&Cut>| SelectParams {
        len: x.page(page).1 as u32,
        tile_base: tile_base as u32,
        has_b: u32::from(b.is_some()),
        key_a: a.key,
        ties_a: a.ties_here(),
        key_b: b_key,
        ties_b: b.map_or(0, Cut::ties_here),
        pack: u32::from(matches!(sink, Sink::Codes(_))),
        ..SelectParams::default()
    };
    let mut equal = (0u64, 0u64);
    if a.needs_ranks() || b.as_ref().is_some_and(|b| b.needs_ranks()) {
        // Count the entries equal to each cut per tile, then turn the counts into each tile's
        // exclusive offset among the equal entries of the whole tensor.
        let count = pipeline::<T>(ctx, &COUNT_EQUAL)?;
        let mut batch = ctx.batch()?;
        let mut tile_base = 0;
        for (page, &page_tiles) in tiles.iter().enumerate() {
            let uniform = batch.uniform(&params(page, tile_base, a, b.as_deref()))?;
            let grid = batch.grid(page_tiles as u32);
            batch.dispatch(
                &count,
                &[
                    Bind::Buffer(x.page(page).0),
                    Bind::Buffer(offsets),
                    Bind::Buffer(&uniform),
                    Bind::Unused,
                    Bind::Unused,
                ],
                grid,
            );
            tile_base += page_tiles;
        }
        batch.submit()?;
        let counts = ctx
            .read_buffer::<u32>(offsets, (offsets_bytes / 4) as usize)
            .await?;
        let mut exclusive = vec![0u32; counts.len()];
        for t in 0..total_tiles {
            // Offsets beyond the ties kept only need to stay beyond them: clamp to u32.
            exclusive[2 * t] = equal.0.min(u64::from(u32::MAX)) as u32;
            exclusive[2 * t + 1] = equal.1.min(u64::from(u32::MAX)) as u32;
            equal.0 += u64::from(counts[2 * t]);
            equal.1 += u64::from(counts[2 * t + 1]);
        }
        ctx.write_buffer(offsets, bytemuck::cast_slice(&exclusive));
    } else {
        // No cut keeps only some of its equal entries: ranks are unused.
        ctx.write_buffer(offsets, &vec![0u8; offsets_bytes as usize]);
    }
    let mut batch = ctx.batch()?;
    let mut tile_base = 0;
    for (page, &page_tiles) in tiles.iter().enumerate() {
        let uniform = batch.uniform(&params(page, tile_base, a, b.as_deref()))?;
        let grid = batch.grid(page_tiles as u32);
        let (values, codes) = sink.binds(page);
        batch.dispatch(
            &apply,
            &[
                Bind::Buffer(x.page(page).0),
                Bind::Buffer(offsets),
                Bind::Buffer(&uniform),
                values,
                codes,
            ],
            grid,
        );
        tile_base += page_tiles;
    }
    batch.submit()?;
    a.consume(equal.0);
    if let Some(b) = b {
        b.consume(equal.1);
    }
    Ok(())
}

/// Applies a [`TopKCut`] tensor by tensor, in flat order, across any number of tensors:
/// `out = kept ? x : 0` (the twin of the reference `TopKApplier`; `f16` and `bf16` entries are
/// written widened, exactly).
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let a = GpuTensor::from_slice(&ctx, &[0.5f32, -3.0, 1.0])?;
/// let b = GpuTensor::from_slice(&ctx, &[2.0f32, -2.0])?;
/// let cut = block_on(topk_cut(&ctx, &[&a, &b], KeepRule::Count(2)))?;
/// let mut applier = TopKApplier::new(&cut);
/// let (mut ka, mut kb) = (GpuTensor::zeros(&ctx, 3, 1)?, GpuTensor::zeros(&ctx, 2, 1)?);
/// block_on(applier.keep(&ctx, &a, &mut ka))?;
/// block_on(applier.keep(&ctx, &b, &mut kb))?;
/// assert_eq!(ka.to_vec_blocking(&ctx)?, [0.0, -3.0, 0.0]);
/// assert_eq!(kb.to_vec_blocking(&ctx)?, [2.0, 0.0]);
/// # Ok::<(), Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct TopKApplier {
    cut: Cut,
}

impl TopKApplier {
    /// An applier of `cut`, starting at flat index 0.
    #[must_use]
    pub fn new(cut: &TopKCut) -> Self {
        Self {
            cut: Cut::from_public(cut),
        }
    }

    /// The next tensor in flat order with what the cut drops zeroed: `out = kept ? x : 0`.
    /// `async` where some of the entries equal to the cut are kept (they are ranked on the
    /// device and counted back).
    pub async fn keep<T: GpuElement>(
        &mut self,
        ctx: &Context,
        x: &GpuTensor<T>,
        out: &mut GpuTensor<f32>,
    ) -> Result<()> {
        apply_cuts(ctx, x, &mut self.cut, None, Sink::Values(out)).await
    }
}

/// What `keep` keeps of one tensor (ties by lower index): `out = kept ? x : 0`, widened exactly
/// to `f32` (the twin of the CPU's `topk_keep`; TIES trimming is this op).
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let x = GpuTensor::from_slice(&ctx, &[0.5f32, -3.0, 1.0, 2.0])?;
/// let mut out = GpuTensor::zeros(&ctx, 4, 1)?;
/// block_on(topk_keep(&ctx, &x, KeepRule::Threshold(0.75), &mut out))?;
/// assert_eq!(out.to_vec_blocking(&ctx)?, [0.0, -3.0, 1.0, 2.0]);
/// # Ok::<(), Error>(())
/// ```
pub async fn topk_keep<T: GpuElement>(
    ctx: &Context,
    x: &GpuTensor<T>,
    keep: KeepRule,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    x.expect_shape("out", out.shape())?;
    let (mut cut, _) = find_cut(ctx, &[x], keep).await?;
    apply_cuts(ctx, x, &mut cut, None, Sink::Values(out)).await
}

/// The cuts of one tensor's top `outer` and top `inner` (`inner <= outer`), applied together:
/// keeps the entries ranked in `[inner, outer)` (Breadcrumbs' band).
pub(crate) async fn keep_band<T: GpuElement>(
    ctx: &Context,
    x: &GpuTensor<T>,
    outer: u64,
    inner: u64,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    x.expect_shape("out", out.shape())?;
    let (mut a, _) = find_cut(ctx, &[x], KeepRule::Count(outer)).await?;
    let (mut b, _) = find_cut(ctx, &[x], KeepRule::Count(inner)).await?;
    apply_cuts(ctx, x, &mut a, Some(&mut b), Sink::Values(out)).await
}

#[cfg(test)]
mod tests {
    use super::count_groups;

    #[test]
    fn count_groups_stay_within_the_limit_in_order() {
        assert_eq!(
            count_groups(&[], 10),
            vec![core::ops::Range { start: 0, end: 0 }]
        );
        assert_eq!(
            count_groups(&[3, 4, 3], 10),
            vec![core::ops::Range { start: 0, end: 3 }]
        );
        assert_eq!(count_groups(&[3, 4, 4], 10), [0..2, 2..3]);
        assert_eq!(count_groups(&[10, 10, 0, 1], 10), [0..1, 1..3, 3..4]);
        let lens = [7, 2, 9, 1, 1, 8];
        let groups = count_groups(&lens, 9);
        assert_eq!(groups.first().map(|g| g.start), Some(0));
        assert_eq!(groups.last().map(|g| g.end), Some(lens.len()));
        for pair in groups.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
        }
        for g in &groups {
            assert!(lens[g.clone()].iter().sum::<u64>() <= 9, "{g:?}");
        }
    }
}
