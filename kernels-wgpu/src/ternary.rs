//! Packed ternary tensors on the GPU: GEMV, decode and decompress-and-add straight from 2-bit
//! codes in device memory, the twins of `kernels_core::ops::ternary`'s references.
//!
//! # Contracts
//!
//! * A [`GpuTernary`] is uploaded from the packed format, validated in full by the reference
//!   decoder first; its codes live in one storage binding (16 codes per word), so it holds at
//!   most `4 x binding_bytes` entries.
//! * [`ternary_gemv`] is within [`crate::gemv::gemv_tolerance`] of `ternary_gemv_ref`;
//!   [`ternary_decode`] is exact (`scale * code`, `+0.0` for zero codes); [`ternary_add`] adds
//!   `f32(lambda * scale) * code` in `f32` (rounding once more to `f16` or `bf16` parameters),
//!   within [`ternary_add_tolerance`] of `ternary_add_ref` (which rounds once from `f64`); a zero
//!   code leaves its parameter's bits alone.

use kernels_core::format::{self, TernaryHeader};
use kernels_core::{Error, Result};
use kernels_wgsl::Family;

use crate::context::{Bind, Context, Kernel, Slot};
use crate::select::tiled_pipeline;
use crate::tensor::{GpuElement, GpuTensor};

/// Invocations per workgroup of the ternary kernels (the tiles' workgroup).
pub(crate) const WORKGROUP: u32 = crate::select::WORKGROUP;

/// Bound on `|theta' - theta'_ref|` for [`ternary_add`] of a step `s = lambda * scale` onto
/// `theta` of type `T`: `u (|s| + 2 |theta + s|)`, plus one ulp of `T` for a 16-bit `T`.
/// The `f32` step and the `f32` sum each round once and the reference rounds the exact sum
/// once more; a 16-bit result rounds once more on each side, and where the two `f32` sums
/// straddle a rounding boundary of `T` the results differ by one ulp of `T` (`2 u_T |sum|`,
/// `u_T = 2^-11` for f16 and `2^-8` for bf16, or the smallest subnormal below the normal range).
///
/// ```
/// use kernels_wgpu::prelude::*;
/// use kernels_wgpu::ternary::ternary_add_tolerance;
/// let ctx = Context::new_blocking(ContextOptions::default())?;
/// let bytes = kernels_wgpu::format::encode(&[1, -1], &[2], 0.1, TernaryLayout::Dense2Bit)?;
/// let mut theta = GpuTensor::from_slice(&ctx, &[1.0f32, 1.0])?;
/// ternary_add(&ctx, &mut theta, &GpuTernary::upload(&ctx, &bytes)?, 3.0)?;
/// let step = 3.0 * f64::from(0.1f32);
/// for (got, exact) in theta.to_vec_blocking(&ctx)?.into_iter().zip([1.0 + step, 1.0 - step]) {
///     assert!((f64::from(got) - exact).abs() <= ternary_add_tolerance::<f32>(1.0, step));
/// }
/// // A bf16 parameter may land one bf16 ulp away.
/// assert!(ternary_add_tolerance::<bf16>(1.0, step) > ternary_add_tolerance::<f32>(1.0, step));
/// # Ok::<(), Error>(())
/// ```
#[must_use]
pub fn ternary_add_tolerance<T: GpuElement>(theta: f32, step: f64) -> f64 {
    let sum = (f64::from(theta) + step).abs();
    let unit = f64::from(f32::EPSILON / 2.0);
    // One ulp of T at the sum: relative above T's normal range, its smallest subnormal below.
    let narrow = match T::ENCODING {
        kernels_wgsl::element::F16 => {
            f64::from(half::f16::EPSILON.to_f32()) * sum
                + f64::from(half::f16::from_bits(1).to_f32())
        }
        kernels_wgsl::element::BF16 => {
            f64::from(half::bf16::EPSILON.to_f32()) * sum
                + f64::from(half::bf16::from_bits(1).to_f32())
        }
        _ => 0.0,
    };
    unit * (step.abs() + 2.0 * sum) + narrow + 1e-45
}

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct TernaryParams {
    pub(crate) len: u32,
    pub(crate) rows: u32,
    pub(crate) cols: u32,
    pub(crate) first_code: u32,
    pub(crate) scale: f32,
    pub(crate) tile_base: u32,
    pub(crate) pad: [u32; 2],
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
pub(crate) const MOMENTS: Kernel = kernel("tile_moments");
const ADD_PACKED: Kernel = kernel("ternary_add_packed");

/// A ternary tensor in device memory: its header and its codes, 2 bits each (the GPU's
/// counterpart of the CPU's `PackedTernary`).
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let bytes = kernels_wgpu::format::encode(&[1, 0, -1, 1], &[2, 2], 0.5, TernaryLayout::Dense2Bit)?;
/// let codes = GpuTernary::upload(&ctx, &bytes)?;
/// assert_eq!((codes.header().shape(), codes.header().nnz), (&[2, 2][..], 3));
/// let x = GpuTensor::from_slice(&ctx, &[1.0f32, 2.0])?;
/// let mut y = GpuTensor::zeros(&ctx, 2, 1)?;
/// ternary_gemv(&ctx, &codes, &x, &mut y)?;
/// assert_eq!(y.to_vec_blocking(&ctx)?, [0.5, 0.5]);
/// let mut values = GpuTensor::zeros(&ctx, 4, 1)?;
/// ternary_decode(&ctx, &codes, &mut values)?;
/// assert_eq!(values.to_vec_blocking(&ctx)?, [0.5, 0.0, -0.5, 0.5]);
/// let mut theta = GpuTensor::from_slice(&ctx, &[1.0f32; 4])?;
/// ternary_add(&ctx, &mut theta, &codes, 2.0)?;
/// assert_eq!(theta.to_vec_blocking(&ctx)?, [2.0, 1.0, 0.0, 2.0]);
/// # Ok::<(), Error>(())
/// ```
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
    let pipeline = tiled_pipeline(ctx, &GEMV, kernels_wgsl::element::F32)?;
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
    let pipeline = tiled_pipeline(ctx, kernel, kernels_wgsl::element::F32)?;
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
    let packed = T::ENCODING != kernels_wgsl::element::F32;
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
