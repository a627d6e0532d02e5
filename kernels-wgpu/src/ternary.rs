//! Ternary compression on the GPU: ComPEFT (moments, global top-k selection and sign codes on
//! the device; the host writes the bytes of either layout), and GEMV, decode and
//! decompress-and-add straight from 2-bit codes in device memory, the twins of
//! `kernels_core::ops::ternary`'s references.
//!
//! # Contracts
//!
//! * [`compeft`] writes exactly the bytes `format::encode` writes for `compeft_ref`'s codes: the
//!   selection is bit-identical ([`crate::select`]); the scale `alpha * sigma` is within
//!   [`SCALE_RELATIVE_TOLERANCE`] (sums in `f32` per tile of 4096, combined in `f64`).
//! * A [`GpuTernary`] is uploaded from the packed format, validated in full by the reference
//!   decoder first; its codes live in one storage binding (16 codes per word), so it holds at
//!   most `4 x binding_bytes` entries.
//! * [`ternary_gemv`] is within [`crate::gemv::gemv_tolerance`] of `ternary_gemv_ref`;
//!   [`ternary_decode`] is exact (`scale * code`, `+0.0` for zero codes); [`ternary_add`] adds
//!   `f32(lambda * scale) * code` in `f32` (rounding once more to `f16` or `bf16` parameters),
//!   within [`ternary_add_tolerance`] of `ternary_add_ref` (which rounds once from `f64`); a zero
//!   code leaves its parameter's bits alone.

use kernels_core::format::{self, TernaryHeader, TernaryLayout};
use kernels_core::ops::select::keep_count;
use kernels_core::ops::ternary::CompeftParams;
use kernels_core::{Error, Result};
use shaders::Family;

use crate::context::{Bind, Context, Kernel, Slot};
use crate::select::{ITEMS, Sink, TILE, apply_cuts, find_cut, tiled_pipeline};
use crate::tensor::{GpuElement, GpuTensor};

/// Invocations per workgroup of the ternary kernels (the tiles' workgroup).
pub const WORKGROUP: u32 = crate::select::WORKGROUP;

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

/// Bound on `|theta' - theta'_ref|` for [`ternary_add`] of a step `s = lambda * scale` onto
/// `theta` of type `T`: `u (|s| + 2 |theta + s|)`, plus one ulp of `T` for a 16-bit `T`.
/// The `f32` step and the `f32` sum each round once and the reference rounds the exact sum
/// once more; a 16-bit result rounds once more on each side, and where the two `f32` sums
/// straddle a rounding boundary of `T` the results differ by one ulp of `T` (`2 u_T |sum|`,
/// `u_T = 2^-11` for f16 and `2^-8` for bf16, or the smallest subnormal below the normal range).
#[must_use]
pub fn ternary_add_tolerance<T: GpuElement>(theta: f32, step: f64) -> f64 {
    let sum = (f64::from(theta) + step).abs();
    let unit = f64::from(f32::EPSILON / 2.0);
    // One ulp of T at the sum: relative above T's normal range, its smallest subnormal below.
    let narrow = match T::ENCODING {
        shaders::element::F16 => {
            f64::from(half::f16::EPSILON.to_f32()) * sum
                + f64::from(half::f16::from_bits(1).to_f32())
        }
        shaders::element::BF16 => {
            f64::from(half::bf16::EPSILON.to_f32()) * sum
                + f64::from(half::bf16::from_bits(1).to_f32())
        }
        _ => 0.0,
    };
    unit * (step.abs() + 2.0 * sum) + narrow + 1e-45
}

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct TernaryParams {
    len: u32,
    rows: u32,
    cols: u32,
    first_code: u32,
    scale: f32,
    tile_base: u32,
    pad: [u32; 2],
}

// Slots: codes, x, out, params, theta (packed f16 or bf16).
const SLOTS: &[Slot] = &[
    Slot::Read,
    Slot::Read,
    Slot::ReadWrite,
    Slot::Uniform,
    Slot::ReadWrite,
];

const fn kernel(entry: &'static str) -> Kernel {
    Kernel {
        family: Family::Ternary,
        entry,
        slots: SLOTS,
        needs_subgroups: false,
    }
}

const GEMV: Kernel = kernel("ternary_gemv");
const DECODE: Kernel = kernel("ternary_decode");
const ADD: Kernel = kernel("ternary_add");
const MOMENTS: Kernel = kernel("tile_moments");
const ADD_PACKED: Kernel = kernel("ternary_add_packed");

/// A ternary tensor in device memory: its header and its codes, 2 bits each.
pub struct GpuTernary {
    header: TernaryHeader,
    codes: wgpu::Buffer,
}

impl core::fmt::Debug for GpuTernary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GpuTernary")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// Packs codes 2 bits each, 16 to a word (the dense layout, as words).
fn pack_words(codes: &[i8]) -> Vec<u32> {
    let mut words = vec![0u32; codes.len().div_ceil(16).max(1)];
    for (i, &c) in codes.iter().enumerate() {
        let bits = match c {
            1 => 1,
            -1 => 2,
            _ => 0,
        };
        words[i / 16] |= bits << (2 * (i % 16));
    }
    words
}

impl GpuTernary {
    /// Uploads a packed ternary tensor (either layout), after validating every byte with the
    /// reference decoder.
    pub fn upload(ctx: &Context, packed: &[u8]) -> Result<Self> {
        let header = TernaryHeader::parse(packed)?;
        let words = header.numel.div_ceil(16).max(1);
        if words * 4 > ctx.binding_bytes() {
            return Err(Error::InvalidParam {
                name: "packed",
                value: header.numel as f64,
                expected: "at most 4 x binding_bytes entries (the codes fill one storage binding)",
            });
        }
        let (header, codes) = format::decode(packed, header.numel as usize)?;
        let words = pack_words(&codes);
        let bytes = (words.len() * 4) as u64;
        let buffer = ctx.allocating("ternary codes", bytes, || {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("ternary codes"),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })?;
        ctx.write_buffer(&buffer, bytemuck::cast_slice(&words));
        Ok(Self {
            header,
            codes: buffer,
        })
    }

    /// The header (shape, scale, non-zero count).
    #[must_use]
    pub fn header(&self) -> &TernaryHeader {
        &self.header
    }

    fn len(&self) -> usize {
        self.header.numel as usize
    }
}

/// Ternary GEMV from codes `[out, in]` on the device: `y = scale * codes x` (the twin of
/// `ternary_gemv_ref`).
pub fn ternary_gemv(
    ctx: &Context,
    codes: &GpuTernary,
    x: &GpuTensor<f32>,
    y: &mut GpuTensor<f32>,
) -> Result<()> {
    let &[rows, cols] = codes.header.shape() else {
        return Err(Error::InvalidParam {
            name: "packed shape",
            value: codes.header.ndim as f64,
            expected: "two dimensions [out, in]",
        });
    };
    x.expect_len("x", cols as usize)?;
    y.expect_len("y", rows as usize)?;
    let Some(y_buffer) = y.single_page("y")? else {
        return Ok(());
    };
    let mut batch = ctx.batch()?;
    let Some(x_buffer) = x.single_page("x")? else {
        batch.clear(y_buffer);
        return batch.submit();
    };
    let pipeline = tiled_pipeline(ctx, &GEMV, shaders::element::F32)?;
    let params = batch.uniform(&TernaryParams {
        len: codes.len() as u32,
        rows: rows as u32,
        cols: cols as u32,
        scale: codes.header.scale,
        ..TernaryParams::default()
    })?;
    let grid = batch.grid(rows as u32);
    batch.dispatch(
        &pipeline,
        &[
            Bind::Buffer(&codes.codes),
            Bind::Buffer(x_buffer),
            Bind::Buffer(y_buffer),
            Bind::Buffer(&params),
            Bind::Unused,
        ],
        grid,
    );
    batch.submit()
}

/// Runs `kernel` element-wise over `out`'s pages, code `i` of page `p` being the code of the
/// page's first entry plus `i`.
fn elementwise(
    ctx: &Context,
    kernel: &Kernel,
    codes: &GpuTernary,
    scale: f32,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    out.expect_len("out", codes.len())?;
    let pipeline = tiled_pipeline(ctx, kernel, shaders::element::F32)?;
    let mut batch = ctx.batch()?;
    let mut first = 0usize;
    for page in 0..out.page_count() {
        let (buffer, len) = out.page(page);
        let params = batch.uniform(&TernaryParams {
            len: len as u32,
            first_code: first as u32,
            scale,
            ..TernaryParams::default()
        })?;
        let grid = batch.grid((len as u32).div_ceil(WORKGROUP));
        batch.dispatch(
            &pipeline,
            &[
                Bind::Buffer(&codes.codes),
                Bind::Unused,
                Bind::Buffer(buffer),
                Bind::Buffer(&params),
                Bind::Unused,
            ],
            grid,
        );
        first += len;
    }
    batch.submit()
}

/// Decodes to values: `out = scale * code` (exact; `+0.0` for a zero code whatever the scale's
/// sign).
pub fn ternary_decode(ctx: &Context, codes: &GpuTernary, out: &mut GpuTensor<f32>) -> Result<()> {
    elementwise(ctx, &DECODE, codes, codes.header.scale, out)
}

/// Decompress and add: `theta += lambda * scale * code` (the twin of `ternary_add_ref`):
/// `f32` parameters add in place; `f16` and `bf16` ones add in `f32` and round once to their
/// type (round to nearest even, on the device). See the module docs for the precision.
pub fn ternary_add<T: GpuElement>(
    ctx: &Context,
    theta: &mut GpuTensor<T>,
    codes: &GpuTernary,
    lambda: f32,
) -> Result<()> {
    if !lambda.is_finite() {
        return Err(Error::InvalidParam {
            name: "lambda",
            value: f64::from(lambda),
            expected: "finite",
        });
    }
    theta.expect_len("theta", codes.len())?;
    let step = (f64::from(lambda) * f64::from(codes.header.scale)) as f32;
    let packed = T::ENCODING != shaders::element::F32;
    let (kernel, per_invocation) = if packed { (&ADD_PACKED, 2) } else { (&ADD, 1) };
    let pipeline = tiled_pipeline(ctx, kernel, T::ENCODING)?;
    let mut batch = ctx.batch()?;
    let mut first = 0usize;
    for page in 0..theta.page_count() {
        let (buffer, len) = theta.page(page);
        let params = batch.uniform(&TernaryParams {
            len: len as u32,
            first_code: first as u32,
            scale: step,
            ..TernaryParams::default()
        })?;
        let invocations = len.div_ceil(per_invocation) as u32;
        let grid = batch.grid(invocations.div_ceil(WORKGROUP));
        let (values, words) = if packed {
            (Bind::Unused, Bind::Buffer(buffer))
        } else {
            (Bind::Buffer(buffer), Bind::Unused)
        };
        batch.dispatch(
            &pipeline,
            &[
                Bind::Buffer(&codes.codes),
                Bind::Unused,
                values,
                Bind::Buffer(&params),
                words,
            ],
            grid,
        );
        first += len;
    }
    batch.submit()
}

/// Mean and sum of squared deviations of all entries of `tensors`, from per-tile `f32` sums
/// combined in `f64`, around a shift (the first entry's value is a good one: it keeps the sums
/// of deviations small where the mean is far from zero).
async fn moments<T: GpuElement>(ctx: &Context, tensors: &[&GpuTensor<T>]) -> Result<(f64, f64)> {
    let n: u64 = tensors.iter().map(|t| t.len() as u64).sum();
    if n == 0 {
        return Ok((0.0, 0.0));
    }
    let pipeline = tiled_pipeline(ctx, &MOMENTS, T::ENCODING)?;
    let tiles: usize = tensors
        .iter()
        .flat_map(|t| (0..t.page_count()).map(|p| t.page(p).1.div_ceil(TILE)))
        .sum();
    let bytes = (tiles * 2 * 4) as u64;
    let sums = ctx.take_storage(bytes)?;
    let mut shift = 0.0f64;
    let mut total = (0.0f64, 0.0f64);
    // Pass 1 around zero gives the mean; pass 2 around the f32 mean gives the deviations.
    for pass in 0..2 {
        let mut batch = ctx.batch()?;
        let mut tile_base = 0;
        for t in tensors {
            for page in 0..t.page_count() {
                let (buffer, len) = t.page(page);
                let params = batch.uniform(&TernaryParams {
                    len: len as u32,
                    scale: shift as f32,
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
        let read = match ctx.read_buffer::<f32>(&sums, tiles * 2).await {
            Ok(read) => read,
            Err(e) => {
                ctx.give_back([sums]);
                return Err(e);
            }
        };
        total = read.chunks_exact(2).fold((0.0, 0.0), |(s, q), pair| {
            (s + f64::from(pair[0]), q + f64::from(pair[1]))
        });
        if pass == 0 {
            shift = f64::from((total.0 / n as f64) as f32);
        }
    }
    ctx.give_back([sums]);
    // With d = v - shift: sum (v - mean)^2 = sum d^2 - (sum d)^2 / n.
    let mean = shift + total.0 / n as f64;
    let m2 = (total.1 - total.0 * total.0 / n as f64).max(0.0);
    Ok((mean, m2))
}

/// ComPEFT of a whole model held on the device: `alpha * sigma` and each tensor packed with its
/// shape in `layout` (the twin of `compeft_ref` followed by `format::encode`).
pub async fn compeft<T: GpuElement>(
    ctx: &Context,
    tensors: &[(&GpuTensor<T>, &[u64])],
    params: CompeftParams,
    layout: TernaryLayout,
) -> Result<(f32, Vec<Vec<u8>>)> {
    params.validate()?;
    for (tau, shape) in tensors {
        format::check_shape(shape, tau.len())?;
    }
    let taus: Vec<&GpuTensor<T>> = tensors.iter().map(|(t, _)| *t).collect();
    let n: u64 = taus.iter().map(|t| t.len() as u64).sum();
    let k = keep_count(params.density, n)?;
    let (mut cut, _) = find_cut(ctx, &taus, k).await?;
    let (_, m2) = moments(ctx, &taus).await?;
    let sigma = if n < 2 {
        0.0
    } else {
        (m2 / (n - 1) as f64).sqrt()
    };
    let scale = (f64::from(params.alpha) * sigma) as f32;
    let mut packed = Vec::with_capacity(tensors.len());
    for (tau, shape) in tensors {
        let words: Vec<u64> = (0..tau.page_count())
            .map(|p| tau.page(p).1.div_ceil(16).max(1) as u64 * 4)
            .collect();
        let buffers = words
            .iter()
            .map(|&bytes| ctx.take_storage(bytes))
            .collect::<Result<Vec<_>>>()?;
        let applied = apply_cuts(ctx, tau, &mut cut, None, Sink::Codes(&buffers)).await;
        let mut codes = Vec::with_capacity(tau.len());
        let mut failure = applied.err();
        for (page, buffer) in buffers.iter().enumerate() {
            if failure.is_some() {
                break;
            }
            match ctx
                .read_buffer::<u32>(buffer, (words[page] / 4) as usize)
                .await
            {
                Ok(page_words) => {
                    let len = tau.page(page).1;
                    codes.extend((0..len).map(|i| {
                        match (page_words[i / 16] >> (2 * (i % 16))) & 3 {
                            1 => 1i8,
                            2 => -1,
                            _ => 0,
                        }
                    }));
                }
                Err(e) => failure = Some(e),
            }
        }
        ctx.give_back(buffers);
        if let Some(e) = failure {
            return Err(e);
        }
        packed.push(format::encode(&codes, shape, scale, layout)?);
    }
    Ok((scale, packed))
}
