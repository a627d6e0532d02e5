//! Dense linear algebra on the GPU: GEMM, the fused projections, Householder QR, the randomized
//! SVD, LoRA extraction and the OPCM step, with the CPU routines' names, parameters and results.
//!
//! | routine | contract | how |
//! |---|---|---|
//! | [`gemm`] | `C = alpha op(A) op(B) + beta C` | tiled WGSL kernel, split over `K` when the output has few tiles |
//! | [`project_out`], [`project_onto`] | `X - Q (Q^T X)`, `Q (Q^T X)` | two GEMMs; the second adds `X` as it writes `out` |
//! | [`householder_qr`] | thin `A = Q R`, `diag(R) >= 0` | unblocked Householder on the device, one workgroup per row update |
//! | [`randomized_svd`] | rank-`r` truncated SVD | range finder and power iterations on the device, each basis re-orthonormalised by Householder QR there; the small SVD on the host in `f64` |
//! | [`lora_extract_randomized`] | `delta ~ B A` | the randomized SVD at a fixed rank |
//! | [`opcm_project`] | the OPCM step | four GEMMs and a mask, on the device |
//!
//! # Why Householder and not Cholesky QR or CGS2
//!
//! Cholesky QR (`CholeskyQR2`, shifted or not) orthonormalises through the Gram matrix `A^T A`,
//! which squares the condition number: formed in `f32`, it loses every direction whose singular
//! value is below
//! `sqrt(eps) ~ 2.4e-4` of the largest. The randomized SVD's power iterations make exactly such
//! bases (`(s_j / s_1)^(2q + 1)`: with two iterations, every direction below a fifth of the
//! largest singular value), so a shifted retry would keep failing and the host would do the QR.
//! CGS2 keeps them but needs a host decision per column when a column is dependent (rank-deficient
//! input). Householder needs neither: it is backward stable for any input, rank-deficient included,
//! and its `3k` small dispatches (for `k` columns) run without a host round trip. It is unblocked,
//! so it is meant for the tall-skinny bases these algorithms make (`k` up to a few hundred), not
//! for square matrices of thousands of columns (use the CPU's blocked QR there).
//!
//! # Variants
//!
//! The GEMM's `A` is bound as `array<f16>` where the device has `shader-f16` (the same bits as the
//! packed words). There is no subgroup variant: the tile's reuse goes through workgroup memory, and
//! what would beat it (subgroup matrix operations) is not part of the `subgroups` feature; the
//! Householder reductions could use `subgroupAdd`, but its order is the driver's, which would break
//! the promise that every variant gives the portable kernels' bits.
//!
//! # Precision
//!
//! Arithmetic is `f32` (f16 and bf16 inputs are widened exactly). [`gemm`] is within
//! [`gemm_tolerance`] of the exact product; the factorisations meet the CPU's bound,
//! [`factorisation_tolerance`] relative to `||A||_F`, and are tested with it.
//!
//! # Not on the GPU
//!
//! The exact thin SVD (one-sided Jacobi: sweeps of dependent rotations), LU/LDU (a pivot search per
//! column), the symmetric eigendecomposition of small Gram matrices and the streaming SVD (a small
//! SVD per minibatch) stay on the CPU: each is a chain of small sequential steps that a GPU would run
//! one dispatch at a time. The randomized SVD and LoRA extraction here cover the large matrices.

use std::sync::Arc;

use kernels_core::backend::{
    validate_gemm, validate_opcm, validate_projection, validate_randomized_svd,
};
pub use kernels_core::ops::lowrank::{
    F32_FACTORISATION_TOLERANCE, Lora, OpcmParams, RsvdParams, Svd, factorisation_tolerance,
};
use kernels_core::ops::lowrank::{opcm_rank, thin_svd_ref};
pub use kernels_core::ops::project::{Qr, Transpose};
use kernels_core::{CounterRng, Error, Mat, Result};
use kernels_wgsl::{Family, element};

use crate::context::{Batch, Bind, Context, Kernel, Pipeline, Slot};
use crate::tensor::{GpuElement, GpuTensor};

/// Invocations of the one-dimensional kernels (reductions, masks, Householder row updates).
const WORKGROUP: u32 = 256;

/// Outputs per invocation along each side of the GEMM's register tile (the shader's `MICRO`).
const MICRO: u32 = 4;

/// Workgroups a GEMM aims to keep in flight: an output of fewer tiles (the `r x r` Gram-shaped
/// products, `r x n` coefficients) is split over `K` until it has about this many.
///
/// PERF: enough to fill a large GPU's compute units twice (an H100 has 132); each split costs its
/// `m n` partial products in memory and one more term in the reduction.
const TARGET_WORKGROUPS: usize = 256;

/// A split of `K` covers at least this many `TILE_K` steps, so the partial products stay a small
/// fraction of the traffic.
const MIN_STEPS_PER_SPLIT: usize = 8;

/// Bound on `|c_ij - exact_ij|` of [`gemm`] for a sum of `k` products with
/// `scaled_abs_sum = |alpha| sum_p |a_ip b_pj| + |beta c_ij|`: `(k + 3) u scaled_abs_sum + tiny`
/// (`u = 2^-24`).
///
/// The `k` products summed in any order (tiles, splits and their reduction fix one, not the
/// reference's) err by at most `(k - 1) u` of their absolute sum, each product by `u` (Higham,
/// Thm. 3.1's first-order bound; a fused multiply-add only removes roundings); scaling by `alpha`,
/// by `beta` and the final addition add `3 u`. `tiny` absorbs subnormal flushes, which GPUs may
/// apply.
///
/// ```
/// use kernels_wgpu::linalg::gemm_tolerance;
/// assert!(gemm_tolerance(64, 1.0) < 1e-5);
/// ```
#[must_use]
pub fn gemm_tolerance(k: usize, scaled_abs_sum: f64) -> f64 {
    (k as f64 + 3.0) * f64::from(f32::EPSILON / 2.0) * scaled_abs_sum + 1e-30
}

/// The shader's `LinalgParams`.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct LinalgParams {
    m: u32,
    n: u32,
    k: u32,
    row_tiles: u32,
    a_offset: u32,
    a_rs: u32,
    a_cs: u32,
    b_offset: u32,
    b_rs: u32,
    b_cs: u32,
    c_offset: u32,
    c_rs: u32,
    d_offset: u32,
    d_rs: u32,
    k_split: u32,
    split_stride: u32,
    splits: u32,
    use_d: u32,
    alpha: f32,
    beta: f32,
}

// Slots: a (weights part), b, params, c, d, reflectors.
const SLOTS: &[Slot] = &[
    Slot::Read,
    Slot::Read,
    Slot::Uniform,
    Slot::ReadWrite,
    Slot::Read,
    Slot::ReadWrite,
];

const fn kernel(entry: &'static str) -> Kernel {
    Kernel {
        family: Family::Linalg,
        entry,
        slots: SLOTS,
        needs_subgroups: false,
    }
}

const GEMM_TILE: Kernel = kernel("gemm_tile");
const GEMM_REDUCE: Kernel = kernel("gemm_reduce");
const MASK_BLOCK: Kernel = kernel("mask_block");
const IDENTITY_ROWS: Kernel = kernel("identity_rows");
const TRANSPOSE: Kernel = kernel("transpose");
const HOUSE_VECTOR: Kernel = kernel("house_vector");
const HOUSE_APPLY: Kernel = kernel("house_apply");

/// The GEMM's tile shape for this device: `side x side` invocations (each `MICRO x MICRO`
/// outputs) and `tile_k` steps of `K` staged in workgroup memory.
#[derive(Clone, Copy)]
struct Tiling {
    side: u32,
    tile_k: u32,
}

impl Tiling {
    fn of(ctx: &Context) -> Self {
        let limits = ctx.limits();
        // WebGPU guarantees 256 invocations and 16 KiB; most native devices offer more memory.
        let side = if limits.max_compute_invocations_per_workgroup >= 256
            && limits.max_compute_workgroup_size_x >= 16
            && limits.max_compute_workgroup_size_y >= 16
        {
            16
        } else {
            8
        };
        // Both tiles, plus the reductions' lane sums the module declares.
        let fits = |tile_k: u32| {
            2 * side * MICRO * tile_k * 4 + WORKGROUP * 4
                <= limits.max_compute_workgroup_storage_size
        };
        let tile_k = [32, 16, 8].into_iter().find(|&t| fits(t)).unwrap_or(4);
        Self { side, tile_k }
    }

    fn tile(self) -> usize {
        (self.side * MICRO) as usize
    }
}

/// The pipeline of `kernel` with A, B and D in these encodings.
fn pipeline(ctx: &Context, kernel: &Kernel, a: u32, b: u32, d: u32) -> Result<Arc<Pipeline>> {
    let tiling = Tiling::of(ctx);
    let native_f16 = ctx.native_f16(a);
    let mut constants = vec![
        ("WORKGROUP", WORKGROUP),
        ("SIDE", tiling.side),
        ("TILE_K", tiling.tile_k),
        ("B_ELEMENT", b),
        ("D_ELEMENT", d),
    ];
    // The f16 variant binds `array<f16>` and has no ELEMENT.
    if !native_f16 {
        constants.push(("ELEMENT", a));
    }
    ctx.pipeline(kernel, native_f16, &constants)
}

fn pipeline_f32(ctx: &Context, kernel: &Kernel) -> Result<Arc<Pipeline>> {
    pipeline(ctx, kernel, element::F32, element::F32, element::F32)
}

/// A `u32` shader index, or [`Error::TooLarge`].
fn index(value: usize) -> Result<u32> {
    u32::try_from(value).map_err(|_| Error::TooLarge {
        what: "an index into a GPU operand",
        limit: u64::from(u32::MAX),
        unit: "elements per binding",
    })
}

/// A matrix operand as the GEMM sees it: its pages of whole rows and its element encoding.
#[derive(Clone)]
struct Operand<'a> {
    /// Each page's buffer, first row and row count.
    pages: Vec<(&'a wgpu::Buffer, usize, usize)>,
    rows: usize,
    cols: usize,
    encoding: u32,
}

impl<'a> Operand<'a> {
    fn of<T: GpuElement>(t: &'a GpuTensor<T>) -> Self {
        Self {
            pages: t.pages().collect(),
            rows: t.rows(),
            cols: t.cols(),
            encoding: T::ENCODING,
        }
    }

    /// An `f32` matrix held in one buffer.
    fn f32(buffer: &'a wgpu::Buffer, rows: usize, cols: usize) -> Self {
        Self {
            pages: vec![(buffer, 0, rows)],
            rows,
            cols,
            encoding: element::F32,
        }
    }

    /// The page holding `row` and the row's index within it.
    fn at(&self, row: usize) -> Option<(&'a wgpu::Buffer, usize)> {
        self.pages
            .iter()
            .find(|&&(_, first, rows)| row >= first && row < first + rows)
            .map(|&(buffer, first, _)| (buffer, row - first))
    }

    /// Where its pages start, after the first.
    fn cuts(&self) -> impl Iterator<Item = usize> + '_ {
        self.pages.iter().skip(1).map(|&(_, first, _)| first)
    }

    /// `[rows, cols]` of `op(self)`.
    fn op_shape(&self, op: Transpose) -> [usize; 2] {
        match op {
            Transpose::No => [self.rows, self.cols],
            Transpose::Yes => [self.cols, self.rows],
        }
    }
}

/// `[0, len)` cut at `cuts` into ranges (one empty range when `len` is 0).
fn segments(len: usize, cuts: impl IntoIterator<Item = usize>) -> Vec<(usize, usize)> {
    let mut points: Vec<usize> = cuts.into_iter().filter(|&c| c > 0 && c < len).collect();
    points.sort_unstable();
    points.dedup();
    let mut out = Vec::with_capacity(points.len() + 1);
    let mut start = 0;
    for p in points.into_iter().chain([len]) {
        out.push((start, p));
        start = p;
    }
    out
}

/// One GEMM to record: `c = alpha op(a) op(b) + beta (d or c)`.
struct Gemm<'a> {
    alpha: f32,
    a: Operand<'a>,
    a_op: Transpose,
    b: Operand<'a>,
    b_op: Transpose,
    beta: f32,
    /// The addend `beta` scales when it is not `c` (same shape as `c`).
    d: Option<Operand<'a>>,
    c: Operand<'a>,
}

/// Records `g` (shapes already validated): one tiled dispatch per block of the operands' pages,
/// split over `K` with a reduction where the output has few tiles.
fn record_gemm(batch: &mut Batch<'_>, g: &Gemm<'_>) -> Result<()> {
    let [m, k] = g.a.op_shape(g.a_op);
    let n = g.b.op_shape(g.b_op)[1];
    if m == 0 || n == 0 {
        return Ok(());
    }
    let ctx = batch.ctx();
    let tiling = Tiling::of(ctx);
    let tile = tiling.tile();
    let d_encoding = g.d.as_ref().map_or(element::F32, |d| d.encoding);
    let tile_pipeline = pipeline(ctx, &GEMM_TILE, g.a.encoding, g.b.encoding, element::F32)?;
    let reduce_pipeline = pipeline(ctx, &GEMM_REDUCE, element::F32, element::F32, d_encoding)?;
    let direct_pipeline = if g.d.is_some() {
        pipeline(ctx, &GEMM_TILE, g.a.encoding, g.b.encoding, d_encoding)?
    } else {
        Arc::clone(&tile_pipeline)
    };
    let mut m_cuts: Vec<usize> = g.c.cuts().collect();
    if g.a_op == Transpose::No {
        m_cuts.extend(g.a.cuts());
    }
    if let Some(d) = &g.d {
        m_cuts.extend(d.cuts());
    }
    let n_cuts: Vec<usize> = match g.b_op {
        Transpose::Yes => g.b.cuts().collect(),
        Transpose::No => Vec::new(),
    };
    let mut k_cuts: Vec<usize> = match g.a_op {
        Transpose::Yes => g.a.cuts().collect(),
        Transpose::No => Vec::new(),
    };
    if g.b_op == Transpose::No {
        k_cuts.extend(g.b.cuts());
    }
    for (m0, m1) in segments(m, m_cuts) {
        for (n0, n1) in segments(n, n_cuts.iter().copied()) {
            for (step, (k0, k1)) in segments(k, k_cuts.iter().copied()).into_iter().enumerate() {
                let (rows, cols, depth) = (m1 - m0, n1 - n0, k1 - k0);
                // Every later block of K adds to what the first wrote.
                let (beta, d) = if step == 0 {
                    (g.beta, g.d.as_ref())
                } else {
                    (1.0, None)
                };
                let a = match g.a_op {
                    Transpose::No => {
                        g.a.at(m0)
                            .map(|(buf, r)| (buf, r * g.a.cols + k0, g.a.cols, 1))
                    }
                    Transpose::Yes => {
                        g.a.at(k0)
                            .map(|(buf, r)| (buf, r * g.a.cols + m0, 1, g.a.cols))
                    }
                };
                let b = match g.b_op {
                    Transpose::No => {
                        g.b.at(k0)
                            .map(|(buf, r)| (buf, r * g.b.cols + n0, g.b.cols, 1))
                    }
                    Transpose::Yes => {
                        g.b.at(n0)
                            .map(|(buf, r)| (buf, r * g.b.cols + k0, 1, g.b.cols))
                    }
                };
                let (c_buffer, c_row) = g.c.at(m0).expect("validated: c holds every row of op(a)");
                let d_at = d.and_then(|d| d.at(m0).map(|(buf, r)| (buf, r * d.cols + n0, d.cols)));
                let row_tiles = rows.div_ceil(tile);
                let tiles = row_tiles * cols.div_ceil(tile);
                let steps = depth.div_ceil(tiling.tile_k as usize);
                let mut splits = if tiles >= TARGET_WORKGROUPS {
                    1
                } else {
                    (TARGET_WORKGROUPS / tiles)
                        .min(steps / MIN_STEPS_PER_SPLIT)
                        .max(1)
                };
                // The partial products must fit one binding.
                let partial_bytes = |s: usize| (s * rows * cols * 4) as u64;
                while splits > 1 && partial_bytes(splits) > ctx.binding_bytes() {
                    splits /= 2;
                }
                let k_split = steps.div_ceil(splits) * tiling.tile_k as usize;
                let splits = depth.div_ceil(k_split.max(1)).max(1);
                let mut params = LinalgParams {
                    m: index(rows)?,
                    n: index(cols)?,
                    k: index(depth)?,
                    row_tiles: index(row_tiles)?,
                    k_split: index(k_split.max(1))?,
                    splits: index(splits)?,
                    split_stride: index(rows * cols)?,
                    c_offset: index(c_row * g.c.cols + n0)?,
                    c_rs: index(g.c.cols)?,
                    alpha: g.alpha,
                    beta,
                    ..LinalgParams::default()
                };
                if let Some((_, offset, rs, cs)) = a {
                    (params.a_offset, params.a_rs, params.a_cs) =
                        (index(offset)?, index(rs)?, index(cs)?);
                }
                if let Some((_, offset, rs, cs)) = b {
                    (params.b_offset, params.b_rs, params.b_cs) =
                        (index(offset)?, index(rs)?, index(cs)?);
                }
                if let Some((_, offset, rs)) = d_at {
                    (params.d_offset, params.d_rs, params.use_d) = (index(offset)?, index(rs)?, 1);
                }
                let a_bind = a.map_or(Bind::Unused, |(buf, ..)| Bind::Buffer(buf));
                let b_bind = b.map_or(Bind::Unused, |(buf, ..)| Bind::Buffer(buf));
                let d_bind = d_at.map_or(Bind::Unused, |(buf, ..)| Bind::Buffer(buf));
                let grid = (index(cols.div_ceil(tile))?, index(row_tiles * splits)?);
                if splits == 1 {
                    let uniform = batch.uniform(&params)?;
                    let chosen = if d_at.is_some() {
                        &direct_pipeline
                    } else {
                        &tile_pipeline
                    };
                    batch.dispatch(
                        chosen,
                        &[
                            a_bind,
                            b_bind,
                            Bind::Buffer(&uniform),
                            Bind::Buffer(c_buffer),
                            d_bind,
                            Bind::Unused,
                        ],
                        grid,
                    );
                    continue;
                }
                let partials = batch.scratch(partial_bytes(splits))?;
                let uniform = batch.uniform(&params)?;
                batch.dispatch(
                    &tile_pipeline,
                    &[
                        a_bind,
                        b_bind,
                        Bind::Buffer(&uniform),
                        Bind::Buffer(&partials),
                        Bind::Unused,
                        Bind::Unused,
                    ],
                    grid,
                );
                let reduce = batch.uniform(&LinalgParams {
                    b_offset: 0,
                    ..params
                })?;
                let groups = batch.grid(index(rows * cols)?.div_ceil(WORKGROUP));
                batch.dispatch(
                    &reduce_pipeline,
                    &[
                        Bind::Unused,
                        Bind::Buffer(&partials),
                        Bind::Buffer(&reduce),
                        Bind::Buffer(c_buffer),
                        d_bind,
                        Bind::Unused,
                    ],
                    groups,
                );
            }
        }
    }
    Ok(())
}

/// `c = alpha op(a) op(b) + beta c` on the device. With `beta == 0` the old `c` is not read (a NaN
/// there does not propagate), as in BLAS; NaN and infinity in `a` or `b` propagate.
///
/// `a` and `b` may be `f32`, `f16` or `bf16` (widened exactly; `a` bound as `array<f16>` where
/// the device has `shader-f16`); the products accumulate in `f32`, each element within
/// [`gemm_tolerance`] of the exact result. Operands of any size: the product runs block by block
/// over their pages. Records and submits; reads nothing back.
///
/// ```
/// use kernels_wgpu::prelude::*;
/// let ctx = Context::new_blocking(ContextOptions::default())?;
/// let a = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32, 2.0, 3.0, 4.0], 2, 2)?)?;
/// let mut c = GpuTensor::<f32>::zeros(&ctx, 2, 2)?;
/// gemm(&ctx, 1.0, &a, Transpose::Yes, &a, Transpose::No, 0.0, &mut c)?;
/// assert_eq!(c.to_vec_blocking(&ctx)?, [10.0, 14.0, 14.0, 20.0]); // A^T A
/// # Ok::<(), Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn gemm<A: GpuElement, B: GpuElement>(
    ctx: &Context,
    alpha: f32,
    a: &GpuTensor<A>,
    a_op: Transpose,
    b: &GpuTensor<B>,
    b_op: Transpose,
    beta: f32,
    c: &mut GpuTensor<f32>,
) -> Result<()> {
    validate_gemm(alpha, a.shape(), a_op, b.shape(), b_op, beta, c.shape())?;
    let mut batch = ctx.batch()?;
    record_gemm(
        &mut batch,
        &Gemm {
            alpha,
            a: Operand::of(a),
            a_op,
            b: Operand::of(b),
            b_op,
            beta,
            d: None,
            c: Operand::of(c),
        },
    )?;
    batch.submit()
}

/// A scratch buffer of `rows x cols` `f32` that must be one binding.
fn scratch_matrix(
    batch: &mut Batch<'_>,
    what: &'static str,
    rows: usize,
    cols: usize,
) -> Result<wgpu::Buffer> {
    let bytes = (rows * cols).max(1) as u64 * 4;
    if bytes > batch.ctx().binding_bytes() {
        return Err(Error::TooLarge {
            what,
            limit: batch.ctx().binding_bytes() / 4,
            unit: "f32 elements (one storage binding of the device)",
        });
    }
    batch.scratch(bytes)
}

fn project<Q: GpuElement, X: GpuElement>(
    ctx: &Context,
    q: &GpuTensor<Q>,
    x: &GpuTensor<X>,
    out: &mut GpuTensor<f32>,
    complement: bool,
) -> Result<()> {
    validate_projection(q.shape(), x.shape(), out.shape())?;
    let (r, n) = (q.cols(), x.cols());
    let mut batch = ctx.batch()?;
    let coefficients = scratch_matrix(&mut batch, "the projection's coefficients Q^T X", r, n)?;
    record_gemm(
        &mut batch,
        &Gemm {
            alpha: 1.0,
            a: Operand::of(q),
            a_op: Transpose::Yes,
            b: Operand::of(x),
            b_op: Transpose::No,
            beta: 0.0,
            d: None,
            c: Operand::f32(&coefficients, r, n),
        },
    )?;
    record_gemm(
        &mut batch,
        &Gemm {
            alpha: if complement { -1.0 } else { 1.0 },
            a: Operand::of(q),
            a_op: Transpose::No,
            b: Operand::f32(&coefficients, r, n),
            b_op: Transpose::No,
            beta: if complement { 1.0 } else { 0.0 },
            d: complement.then(|| Operand::of(x)),
            c: Operand::of(out),
        },
    )?;
    batch.submit()
}

/// `out = X - Q (Q^T X)`: the part of `X` orthogonal to the columns of `Q` (`m x r`, orthonormal
/// columns, not checked).
///
/// Two GEMMs in one submission: the `r x n` coefficients `Q^T X`, then `out = X - Q C`, which reads
/// `X` as the addend while it writes `out` (no copy of `X`). Each element is within the two
/// [`gemm_tolerance`]s composed; NaN and infinity propagate. The coefficients must fit one storage
/// binding ([`Error::TooLarge`] otherwise).
///
/// ```
/// use kernels_wgpu::prelude::*;
/// let ctx = Context::new_blocking(ContextOptions::default())?;
/// let q = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32, 0.0, 0.0], 3, 1)?)?; // the x axis
/// let x = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2)?)?;
/// let mut out = GpuTensor::<f32>::zeros(&ctx, 3, 2)?;
/// project_out(&ctx, &q, &x, &mut out)?;
/// assert_eq!(out.to_vec_blocking(&ctx)?, [0.0, 0.0, 3.0, 4.0, 5.0, 6.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn project_out<Q: GpuElement, X: GpuElement>(
    ctx: &Context,
    q: &GpuTensor<Q>,
    x: &GpuTensor<X>,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    project(ctx, q, x, out, true)
}

/// `out = Q (Q^T X)`: the part of `X` in the span of the columns of `Q`; as [`project_out`].
///
/// ```
/// use kernels_wgpu::prelude::*;
/// let ctx = Context::new_blocking(ContextOptions::default())?;
/// let q = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32, 0.0, 0.0], 3, 1)?)?;
/// let x = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2)?)?;
/// let mut out = GpuTensor::<f32>::zeros(&ctx, 3, 2)?;
/// project_onto(&ctx, &q, &x, &mut out)?;
/// assert_eq!(out.to_vec_blocking(&ctx)?, [1.0, 2.0, 0.0, 0.0, 0.0, 0.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn project_onto<Q: GpuElement, X: GpuElement>(
    ctx: &Context,
    q: &GpuTensor<Q>,
    x: &GpuTensor<X>,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    project(ctx, q, x, out, false)
}

/// Records `grid`-sized dispatch of a one-dimensional kernel over `m x n` elements of `c`.
fn record_elementwise(
    batch: &mut Batch<'_>,
    kernel: &Kernel,
    params: LinalgParams,
    b: Bind<'_>,
    c: &wgpu::Buffer,
) -> Result<()> {
    let pipeline = pipeline_f32(batch.ctx(), kernel)?;
    let uniform = batch.uniform(&params)?;
    let groups = batch.grid(index(params.m as usize * params.n as usize)?.div_ceil(WORKGROUP));
    batch.dispatch(
        &pipeline,
        &[
            Bind::Unused,
            b,
            Bind::Buffer(&uniform),
            Bind::Buffer(c),
            Bind::Unused,
            Bind::Unused,
        ],
        groups,
    );
    Ok(())
}

/// Householder QR of the `rows` rows (length `len`) of `w`, in place: afterwards entry `(c, j)`
/// of `w` for `c >= j` is `R[j, c]` of the matrix whose columns are `w`'s rows. Returns `Q^T`
/// (`min(rows, len) x len`) in a buffer of the context's pool (give it back).
fn record_householder_rows(
    batch: &mut Batch<'_>,
    w: &wgpu::Buffer,
    rows: usize,
    len: usize,
) -> Result<wgpu::Buffer> {
    let k = rows.min(len);
    let ctx = batch.ctx();
    let vector = pipeline_f32(ctx, &HOUSE_VECTOR)?;
    let apply = pipeline_f32(ctx, &HOUSE_APPLY)?;
    let reflectors = scratch_matrix(batch, "Householder reflectors", k + 1, len)?;
    let qt_bytes = (k * len).max(1) as u64 * 4;
    let qt = batch.ctx().take_storage(qt_bytes)?;
    let betas = index(k * len)?;
    let base = LinalgParams {
        m: index(len)?,
        b_offset: betas,
        ..LinalgParams::default()
    };
    let apply_to = |batch: &mut Batch<'_>,
                    target: &wgpu::Buffer,
                    j: usize,
                    first: usize,
                    end: usize|
     -> Result<()> {
        if first >= end {
            return Ok(());
        }
        let uniform = batch.uniform(&LinalgParams {
            k: index(j)?,
            n: index(end)?,
            a_offset: index(first)?,
            ..base
        })?;
        let groups = batch.grid(index(end - first)?);
        batch.dispatch(
            &apply,
            &[
                Bind::Unused,
                Bind::Unused,
                Bind::Buffer(&uniform),
                Bind::Buffer(target),
                Bind::Unused,
                Bind::Buffer(&reflectors),
            ],
            groups,
        );
        Ok(())
    };
    for j in 0..k {
        let uniform = batch.uniform(&LinalgParams {
            k: index(j)?,
            ..base
        })?;
        batch.dispatch(
            &vector,
            &[
                Bind::Unused,
                Bind::Unused,
                Bind::Buffer(&uniform),
                Bind::Buffer(w),
                Bind::Unused,
                Bind::Buffer(&reflectors),
            ],
            (1, 1),
        );
        apply_to(batch, w, j, j + 1, rows)?;
    }
    // Q^T = [I 0] H_{k-1} ... H_0: the reflectors applied to the identity's rows in reverse;
    // row c < j is e_c, which reflector j (zero before j) leaves alone.
    record_elementwise(
        batch,
        &IDENTITY_ROWS,
        LinalgParams {
            m: index(k)?,
            n: index(len)?,
            ..LinalgParams::default()
        },
        Bind::Unused,
        &qt,
    )?;
    for j in (0..k).rev() {
        apply_to(batch, &qt, j, j, k)?;
    }
    Ok(qt)
}

/// `a^T` (`n x m`, `f32`) in one pooled buffer (give it back), written by `batch`.
fn record_transposed<T: GpuElement>(
    batch: &mut Batch<'_>,
    a: &GpuTensor<T>,
) -> Result<wgpu::Buffer> {
    let [m, n] = a.shape();
    let bytes = (m * n).max(1) as u64 * 4;
    if bytes > batch.ctx().binding_bytes() {
        return Err(Error::TooLarge {
            what: "a (the GPU's Householder QR holds it in one storage binding)",
            limit: batch.ctx().binding_bytes() / 4,
            unit: "elements",
        });
    }
    let w = batch.ctx().take_storage(bytes)?;
    let pipeline = pipeline(
        batch.ctx(),
        &TRANSPOSE,
        element::F32,
        T::ENCODING,
        element::F32,
    )?;
    for (page, first, rows) in a.pages() {
        let uniform = batch.uniform(&LinalgParams {
            m: index(rows)?,
            n: index(n)?,
            c_offset: index(first)?,
            c_rs: index(m)?,
            ..LinalgParams::default()
        })?;
        let groups = batch.grid(index(rows * n)?.div_ceil(WORKGROUP));
        batch.dispatch(
            &pipeline,
            &[
                Bind::Unused,
                Bind::Buffer(page),
                Bind::Buffer(&uniform),
                Bind::Buffer(&w),
                Bind::Unused,
                Bind::Unused,
            ],
            groups,
        );
    }
    Ok(w)
}

/// The first non-finite element of `a` as [`Error::NonFinite`], or [`Error::Overflow`] naming
/// `what` when there is none: what a factorisation whose result is not finite reports.
async fn non_finite_cause<T: GpuElement>(
    ctx: &Context,
    a: &GpuTensor<T>,
    what: &'static str,
) -> Error {
    match a.to_vec(ctx).await {
        Ok(values) => match values.iter().position(|v| !v.to_f32().is_finite()) {
            Some(index) => Error::NonFinite { what: "a", index },
            None => Error::Overflow { what },
        },
        Err(e) => e,
    }
}

/// Householder thin QR on the device: `A = Q R` with `Q` `m x k` orthonormal and `R` `k x n`
/// upper triangular with `diag(R) >= 0` (`k = min(m, n)`); rank-deficient `A` is fine. The
/// contract of `kernels_cpu::linalg::householder_qr`, downloaded as the same [`Qr`].
///
/// Unblocked: `3k` small dispatches in one submission and no host round trip until the download,
/// so it suits tall-skinny `A` (see the module docs). `A` must fit one storage binding as `f32`
/// ([`Error::TooLarge`]). NaN or infinity in `A` is [`Error::NonFinite`].
///
/// ```
/// use kernels_wgpu::prelude::*;
/// let ctx = Context::new_blocking(ContextOptions::default())?;
/// let a = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[3.0f32, 1.0, 4.0, 2.0], 2, 2)?)?;
/// let qr = block_on(householder_qr(&ctx, &a))?;
/// assert!((qr.r.at(0, 0) - 5.0).abs() < 1e-6); // the norm of the first column
/// assert!(Mat::widen(qr.q.as_ref()).orthogonality_error()? < 1e-6);
/// # Ok::<(), Error>(())
/// ```
pub async fn householder_qr<T: GpuElement>(ctx: &Context, a: &GpuTensor<T>) -> Result<Qr<f32>> {
    let [m, n] = a.shape();
    let k = m.min(n);
    let mut batch = ctx.batch()?;
    let w = record_transposed(&mut batch, a)?;
    let qt = record_householder_rows(&mut batch, &w, n, m);
    let submitted = qt.and_then(|qt| batch.submit().map(|()| qt));
    let qt = match submitted {
        Ok(qt) => qt,
        Err(e) => {
            ctx.give_back([w]);
            return Err(e);
        }
    };
    let downloaded = async {
        let qt = ctx.read_buffer::<f32>(&qt, k * m).await?;
        let w = ctx.read_buffer::<f32>(&w, n * m).await?;
        Ok::<_, Error>((qt, w))
    }
    .await;
    ctx.give_back([w, qt]);
    let (qt, w) = downloaded?;
    let q = Mat::from_fn(m, k, |i, j| qt[j * m + i])?;
    let r = Mat::from_fn(k, n, |j, c| if c >= j { w[c * m + j] } else { 0.0 })?;
    if !(q.as_slice().iter().all(|v| v.is_finite()) && r.as_slice().iter().all(|v| v.is_finite())) {
        return Err(non_finite_cause(ctx, a, "r (a column's norm overflows f32)").await);
    }
    Ok(Qr { q, r })
}

/// Randomized truncated SVD on the device (Halko, Martinsson and Tropp): `rank + oversample`
/// Gaussian probes (the same counter-based draws as the CPU and the reference, made on the host
/// and uploaded), `power_iterations` each re-orthonormalised by Householder QR on the device, the
/// projected `(rank + oversample) x n` matrix downloaded and its thin SVD taken on the host in
/// `f64`, and `U = Q U_B` on the device. The contract of `kernels_cpu::linalg::randomized_svd`,
/// with the same [`Svd`] result.
///
/// `A` may be paged; the bases (`probes x m` and `probes x n`, `f32`) must each fit one storage
/// binding ([`Error::TooLarge`]). NaN or infinity in `A` is [`Error::NonFinite`]; unlike the CPU,
/// `A` is not rescaled, so a matrix whose norm overflows `f32` is [`Error::Overflow`].
///
/// ```
/// use kernels_wgpu::prelude::*;
/// let ctx = Context::new_blocking(ContextOptions::default())?;
/// // A rank-2 matrix: its two singular values are found to f32 rounding.
/// let a = Mat::from_fn(40, 30, |i, j| {
///     3.0 * ((i % 5) as f32 - 2.0) * ((j % 3) as f32 - 1.0) + 0.5 * ((i % 2) as f32) * ((j % 7) as f32)
/// })?;
/// let gpu = GpuTensor::from_matrix(&ctx, a.as_ref())?;
/// let params = RsvdParams::new(2).with_oversample(4).with_power_iterations(1).with_seed(7);
/// let svd = block_on(randomized_svd(&ctx, &gpu, params))?;
/// let exact = kernels_core::ops::lowrank::thin_svd_ref(a.as_ref())?;
/// for (s, e) in svd.s.iter().zip(&exact.s) {
///     assert!((f64::from(*s) - e).abs() <= 1e-4 * exact.s[0]);
/// }
/// # Ok::<(), Error>(())
/// ```
pub async fn randomized_svd<T: GpuElement>(
    ctx: &Context,
    a: &GpuTensor<T>,
    params: RsvdParams,
) -> Result<Svd<f32>> {
    let probes = validate_randomized_svd(a.shape(), params)?;
    let [m, n] = a.shape();
    let rng = CounterRng::new(params.seed);
    // Omega^T (probes x n), drawn at the reference's indices.
    let omega_t = Mat::from_fn(probes, n, |j, i| {
        rng.normal_at((i * probes + j) as u64) as f32
    })?;
    let omega_t = GpuTensor::from_matrix(ctx, omega_t.as_ref())?;
    let a_operand = Operand::of(a);
    let product = |batch: &mut Batch<'_>,
                   left: &wgpu::Buffer,
                   a_op: Transpose,
                   rows: usize|
     -> Result<wgpu::Buffer> {
        // left (probes x rows) times op(A): probes x (n or m).
        let cols = if a_op == Transpose::No { n } else { m };
        let out = scratch_matrix(batch, "a randomized SVD's basis", probes, cols)?;
        record_gemm(
            batch,
            &Gemm {
                alpha: 1.0,
                a: Operand::f32(left, probes, rows),
                a_op: Transpose::No,
                b: a_operand.clone(),
                b_op: a_op,
                beta: 0.0,
                d: None,
                c: Operand::f32(&out, probes, cols),
            },
        )?;
        Ok(out)
    };
    let mut batch = ctx.batch()?;
    // Y^T = Omega^T A^T (probes x m), orthonormalised: Q^T.
    let yt = scratch_matrix(&mut batch, "a randomized SVD's basis", probes, m)?;
    record_gemm(
        &mut batch,
        &Gemm {
            alpha: 1.0,
            a: Operand::of(&omega_t),
            a_op: Transpose::No,
            b: a_operand.clone(),
            b_op: Transpose::Yes,
            beta: 0.0,
            d: None,
            c: Operand::f32(&yt, probes, m),
        },
    )?;
    let mut pooled = Vec::new();
    let mut qt = record_householder_rows(&mut batch, &yt, probes, m)?;
    for _ in 0..params.power_iterations {
        let zt = product(&mut batch, &qt, Transpose::No, m)?;
        let zq = record_householder_rows(&mut batch, &zt, probes, n)?;
        let yt = product(&mut batch, &zq, Transpose::Yes, n)?;
        pooled.extend([qt, zq]);
        qt = record_householder_rows(&mut batch, &yt, probes, m)?;
    }
    // B = Q^T A (probes x n).
    let b = product(&mut batch, &qt, Transpose::No, m)?;
    let b_download = ctx.take_storage((probes * n).max(1) as u64 * 4)?;
    batch.copy_range(&b, 0, &b_download, 0, (probes * n).max(1) as u64 * 4);
    batch.submit()?;
    ctx.give_back(pooled);
    let b = ctx.read_buffer::<f32>(&b_download, probes * n).await;
    ctx.give_back([b_download]);
    let b = Mat::from_fn(probes, n, {
        let b = b?;
        move |i, j| b[i * n + j]
    })?;
    if !b.as_slice().iter().all(|v| v.is_finite()) {
        ctx.give_back([qt]);
        return Err(non_finite_cause(ctx, a, "a (its norm overflows f32 on the GPU)").await);
    }
    let small = thin_svd_ref(b.as_ref())?;
    let r = params.rank.min(small.s.len());
    // U = Q U_B (m x r) on the device.
    let u_b = Mat::from_fn(probes, r, |i, j| small.u.at(i, j) as f32)?;
    let u_b = GpuTensor::from_matrix(ctx, u_b.as_ref())?;
    let u = GpuTensor::<f32>::zeros(ctx, m, r)?;
    let mut batch = ctx.batch()?;
    let recorded = record_gemm(
        &mut batch,
        &Gemm {
            alpha: 1.0,
            a: Operand::f32(&qt, probes, m),
            a_op: Transpose::Yes,
            b: Operand::of(&u_b),
            b_op: Transpose::No,
            beta: 0.0,
            d: None,
            c: Operand::of(&u),
        },
    )
    .and_then(|()| batch.submit());
    ctx.give_back([qt]);
    recorded?;
    let u_values = u.to_vec(ctx).await?;
    let mut u = Mat::from_fn(m, r, |i, j| u_values[i * r + j])?;
    let mut v = Mat::from_fn(n, r, |i, j| small.v.at(i, j) as f32)?;
    for (j, flipped) in u.normalise_column_signs().into_iter().enumerate() {
        if flipped {
            for i in 0..n {
                *v.at_mut(i, j) = -v.at(i, j);
            }
        }
    }
    Ok(Svd {
        u,
        s: small.s[..r].iter().map(|&s| s as f32).collect(),
        v,
    })
}

/// LoRA extraction of rank `params.rank` from [`randomized_svd`]: `B = U_r sqrt(S_r)`,
/// `A = sqrt(S_r) V_r^T`, as `kernels_cpu::linalg::lora_extract_randomized`.
///
/// ```
/// use kernels_wgpu::prelude::*;
/// let ctx = Context::new_blocking(ContextOptions::default())?;
/// let delta = Mat::from_fn(30, 20, |i, j| ((i % 3) as f32 - 1.0) * ((j % 4) as f32 - 1.5))?;
/// let gpu = GpuTensor::from_matrix(&ctx, delta.as_ref())?;
/// let lora = block_on(lora_extract_randomized(&ctx, &gpu, RsvdParams::new(1)))?;
/// assert_eq!((lora.b.shape(), lora.a.shape()), ([30, 1], [1, 20]));
/// let (b, a, delta) = (Mat::widen(lora.b.as_ref()), Mat::widen(lora.a.as_ref()), Mat::widen(delta.as_ref()));
/// assert!(b.matmul(&a)?.distance(&delta)? <= 1e-5 * delta.frobenius_norm());
/// # Ok::<(), Error>(())
/// ```
pub async fn lora_extract_randomized<T: GpuElement>(
    ctx: &Context,
    delta: &GpuTensor<T>,
    params: RsvdParams,
) -> Result<Lora<f32>> {
    let svd = randomized_svd(ctx, delta, params).await?;
    svd.lora(svd.s.len())
}

/// The merged task vector's SVD on the device, for [`opcm_project`]: `u` `m x p`, `s` (on the
/// host: the block size is chosen from it), `v` `n x q`.
#[derive(Clone, Copy, Debug)]
pub struct GpuSvdRef<'a, T: GpuElement> {
    /// Left singular vectors, `m x p`.
    pub u: &'a GpuTensor<T>,
    /// Singular values, `min(p, q)`, descending.
    pub s: &'a [f32],
    /// Right singular vectors, `n x q`.
    pub v: &'a GpuTensor<T>,
}

/// The OPCM projection of a new task vector `tau` (`m x n`) against the merged task vector's SVD
/// (see `kernels_core::ops::lowrank::opcm_project_ref`): `P = U^T tau V`, its diagonal and leading
/// `r x r` block zeroed, `out = U P V^T`; four GEMMs and the mask in one submission. Each
/// intermediate (`p x n`, `p x q`, `m x q`) must fit one storage binding ([`Error::TooLarge`]).
///
/// ```
/// use kernels_wgpu::prelude::*;
/// let ctx = Context::new_blocking(ContextOptions::default())?;
/// // The merged task vector diag(2, 1, 0.5): its SVD is the identity's columns.
/// let eye = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], 3, 3)?)?;
/// let s = [2.0f32, 1.0, 0.5];
/// let tau = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32; 9], 3, 3)?)?;
/// let mut out = GpuTensor::<f32>::zeros(&ctx, 3, 3)?;
/// let merged = GpuSvdRef { u: &eye, s: &s, v: &eye };
/// opcm_project(&ctx, merged, &tau, OpcmParams::default(), &mut out)?;
/// // The protected block is r = 1: with the diagonal, what tau shares with the merged
/// // directions goes; the rest stays.
/// assert_eq!(out.to_vec_blocking(&ctx)?, [0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn opcm_project<T: GpuElement>(
    ctx: &Context,
    merged: GpuSvdRef<'_, T>,
    tau: &GpuTensor<T>,
    params: OpcmParams,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    let GpuSvdRef { u, s, v } = merged;
    validate_opcm(u.shape(), s.len(), v.shape(), tau.shape())?;
    let [m, n] = tau.shape();
    out.expect_shape("out", [m, n])?;
    let r = opcm_rank(s, params.alpha)?;
    let (p, q) = (u.cols(), v.cols());
    let mut batch = ctx.batch()?;
    let ut_tau = scratch_matrix(&mut batch, "OPCM's U^T tau", p, n)?;
    let block = scratch_matrix(&mut batch, "OPCM's P", p, q)?;
    let up = scratch_matrix(&mut batch, "OPCM's U P", m, q)?;
    let steps = [
        (
            Operand::of(u),
            Transpose::Yes,
            Operand::of(tau),
            Transpose::No,
            Operand::f32(&ut_tau, p, n),
        ),
        (
            Operand::f32(&ut_tau, p, n),
            Transpose::No,
            Operand::of(v),
            Transpose::No,
            Operand::f32(&block, p, q),
        ),
        (
            Operand::of(u),
            Transpose::No,
            Operand::f32(&block, p, q),
            Transpose::No,
            Operand::f32(&up, m, q),
        ),
        (
            Operand::f32(&up, m, q),
            Transpose::No,
            Operand::of(v),
            Transpose::Yes,
            Operand::of(out),
        ),
    ];
    for (i, (a, a_op, b, b_op, c)) in steps.into_iter().enumerate() {
        record_gemm(
            &mut batch,
            &Gemm {
                alpha: 1.0,
                a,
                a_op,
                b,
                b_op,
                beta: 0.0,
                d: None,
                c,
            },
        )?;
        if i == 1 {
            record_elementwise(
                &mut batch,
                &MASK_BLOCK,
                LinalgParams {
                    m: index(p)?,
                    n: index(q)?,
                    k: index(r)?,
                    c_rs: index(q)?,
                    ..LinalgParams::default()
                },
                Bind::Unused,
                &block,
            )?;
        }
    }
    batch.submit()
}
