//! The CATS and TEAL MLPs for decode batches of 1 to 4: the fast twins of `cats_mlp_ref` and
//! `teal_mlp_ref`.
//!
//! # Contracts
//!
//! Those of [`kernels_core::ops::sparse`]: each sample's result depends only on its own input (it
//! sums its own active rows), a weight row is read once per call if any sample keeps it, and the
//! report lists the rows read. Computed in `f32` (`silu` with a vector `exp` within
//! [`crate::EXP_ULPS`]); within [`mlp_tolerance`] of the reference when both judge the same
//! rows active. A row whose activation lies within rounding of the threshold may be judged
//! differently than by the `f64` reference.
//!
//! # How
//!
//! CATS: (1) the dense gate GEMV for all samples in one pass over `W_gate`, with SiLU and the
//! threshold fused after it; (2) gathered dots of the union's `W_up` rows; (3) AXPY of the union's
//! `W_down_t` rows, each sample adding only its own active rows. TEAL: AXPY of the union of active
//! inputs over `W_gate_t` and `W_up_t` (one split over both matrices' columns side by side, so
//! two threads read whole rows of one each), then AXPY of the union of active `h` over `W_down_t`.
//! Threads split rows for dots and columns for AXPYs; the down AXPY sums each half of its rows
//! into a panel of its own and adds the two, the panels' columns split side by side, so two
//! threads stream whole rows ([`crate::gemv::PANEL_MAX_COLS`]).

use alloc::vec::Vec;
use core::ops::Range;

use kernels_core::backend::{validate_cats_mlp, validate_teal_mlp};
pub use kernels_core::ops::sparse::{CatsMlpWeights, MlpReport, TealMlpWeights, TealThresholds};
use kernels_core::ops::sparse::{MAX_MLP_BATCH, is_active};
use kernels_core::{Element, MatMut, MatRef, Result};

use crate::gemv::{COLUMN_ALIGN, ROW_BLOCK, axpy_some, dot_rows, gemv_tolerance, side_by_side};
use crate::parallel::split_columns;
use crate::simd::{exp, load_padded, store_padded};
use crate::{Cpu, Simd, WithSimd};

/// Bound on `|y_j - y_ref_j|` of an MLP output.
///
/// * `propagated = sum_i (|a_i| S_up_i + 1.1 |u_i| S_gate_i) |w_down_t[i, j]|`, where `S_p_i` is
///   the absolute sum `sum_k |W_p[i, k] x_k|` of the dot that produced `g_i` or `u_i` (1.1 bounds
///   `|silu'|`): how the `f32` rounding of the gate and up dots reaches `y_j`;
/// * `direct = sum_i |h_i w_down_t[i, j]|`: the scale of the final AXPY and of the roundings in
///   SiLU and the product `h = a u`;
/// * `max_gate = max |g_i|`: unused here (`exp` is within [`crate::EXP_ULPS`] whatever `g`); the
///   GPU's bound, which has the same arguments, widens with it;
///
/// over the `active` rows, with `hidden` terms per dot. Each dot contributes a
/// [`crate::gemv::gemv_tolerance`]; SiLU (`exp` within 2 ulps, the sum and one division: 4 ulps)
/// and the product add `8 u direct`.
///
/// ```
/// use kernels_cpu::mlp::mlp_tolerance;
/// assert!(mlp_tolerance(576, 768, 10.0, 5.0, 3.0) < 1e-3);
/// ```
#[must_use]
pub fn mlp_tolerance(
    hidden: usize,
    active: usize,
    propagated: f64,
    direct: f64,
    max_gate: f64,
) -> f64 {
    let _ = max_gate;
    let u = f64::from(f32::EPSILON / 2.0);
    gemv_tolerance(hidden, propagated) + gemv_tolerance(active, direct) + 8.0 * u * direct
}

/// The vectors an MLP call works in, owned by the caller so that a decode loop reuses them: after
/// the first call at a given shape, [`cats_mlp`] and [`teal_mlp`] allocate nothing, on any
/// thread count (threads get their parts through `rayon::join`, whose jobs live on the stack;
/// only a pool's first use allocates its threads' state). The tests count it.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let (inter, hidden) = (4, 2);
/// let gate = [1.0f32, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, -1.0];
/// let up = [1.0f32; 8];
/// let down_t = [1.0f32, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0];
/// let weights = CatsMlpWeights {
///     gate: MatRef::from_slice(&gate, inter, hidden)?,
///     up: MatRef::from_slice(&up, inter, hidden)?,
///     down_t: MatRef::from_slice(&down_t, inter, hidden)?,
/// };
/// let cpu = Cpu::detect();
/// let mut scratch = MlpScratch::new();
/// let mut y = [0.0f32; 2];
/// for token in [[2.0f32, 1.0], [1.0, 2.0]] {
///     let x = MatRef::from_slice(&token, 1, hidden)?;
///     cats_mlp(&cpu, x, weights, 0.5, MatMut::from_slice(&mut y, 1, hidden)?, &mut scratch)?;
///     // Rows 2 and 3 have negative gates: silu(g) is above -0.28, so they are skipped.
///     assert_eq!(scratch.report().active, [0, 1]);
/// }
/// # Ok::<(), Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct MlpScratch {
    /// CATS: `silu(W_gate x)`, `[row][sample]`. TEAL: `h`, `[row][sample]`.
    activations: Vec<f32>,
    /// Activity flags, `[row][sample]`.
    active: Vec<bool>,
    /// Per row of the last union, bit `b` set if sample `b` uses it.
    masks: Vec<u8>,
    /// The last AXPY's coefficients, `[union row][sample]`.
    coeffs: Vec<f32>,
    /// TEAL: the union of active inputs, its masks and coefficients; `g` and `u` side by side,
    /// `[sample][g row | u row]`, each `gate_up_stride(inter)` wide.
    input_rows: Vec<u32>,
    input_masks: Vec<u8>,
    input_coeffs: Vec<f32>,
    gate_up: Vec<f32>,
    /// The down AXPY's two panels of rows side by side, `[sample][first | second]`
    /// ([`crate::gemv::PANEL_MAX_COLS`]).
    panel_sums: Vec<f32>,
    /// The rows the last call read; `report.active` is the last union's rows.
    report: MlpReport,
}

impl MlpScratch {
    /// Empty scratch; the first call sizes it.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// What the last call read: the union over its batch of the intermediate rows each sample
    /// kept (empty before the first call).
    #[must_use]
    pub fn report(&self) -> &MlpReport {
        &self.report
    }
}

/// `values` cleared and resized to `len` copies of `fill`, keeping its allocation.
fn reuse<X: Clone>(values: &mut Vec<X>, len: usize, fill: X) {
    values.clear();
    values.resize(len, fill);
}

/// The union over the batch of `active[i * batch + b]`: its rows ascending, and per row the
/// samples using it (bit `b`).
fn union_rows(active: &[bool], batch: usize, rows: &mut Vec<u32>, masks: &mut Vec<u8>) {
    rows.clear();
    masks.clear();
    if batch == 1 {
        // PERF: a decode step's common case, without a fold per row.
        let on = active.iter().enumerate().filter(|(_, on)| **on);
        rows.extend(on.map(|(i, _)| i as u32));
        masks.resize(rows.len(), 1);
        return;
    }
    for (i, flags) in active.chunks_exact(batch).enumerate() {
        let mask = flags
            .iter()
            .enumerate()
            .fold(0u8, |m, (b, &on)| m | (u8::from(on) << b));
        if mask != 0 {
            rows.push(i as u32);
            masks.push(mask);
        }
    }
}

/// `gate[i] = silu(gate[i])`, times `up[i]` where `up` is given, with the vector `exp` (within
/// [`crate::EXP_ULPS`]): whole vectors, the tail padded to one, so every element is computed by
/// the same code wherever it sits.
struct Silu<'a> {
    gate: &'a mut [f32],
    up: Option<&'a [f32]>,
}

impl WithSimd for Silu<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let lanes = S::LANES;
        for (k, gate) in self.gate.chunks_mut(lanes).enumerate() {
            let mut h = silu(s, load_padded(s, gate));
            if let Some(up) = self.up {
                h = s.mul(h, load_padded(s, &up[k * lanes..][..gate.len()]));
            }
            store_padded(s, h, gate);
        }
    }
}

/// `silu(g) = g / (1 + e^-g)` per lane.
#[inline(always)]
fn silu<S: Simd>(s: S, g: S::F32) -> S::F32 {
    let e = exp(s, s.mul(g, s.splat(-1.0)));
    s.div(g, s.add(s.splat(1.0), e))
}

/// The rows of a batch, as an array (unused samples empty).
type BatchRows<'y> = [&'y mut [f32]; MAX_MLP_BATCH];

/// `ys[b][cols] = sum over union rows j used by sample b of coeffs[j * B + b] * w_t[rows[j], cols]`.
struct BatchAxpy<'a, 'y, T> {
    w_t: MatRef<'a, T>,
    rows: &'a [u32],
    masks: &'a [u8],
    coeffs: &'a [f32],
    batch: usize,
    cols: Range<usize>,
    ys: BatchRows<'y>,
}

impl<T: Element> WithSimd for BatchAxpy<'_, '_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let Self {
            w_t,
            rows,
            masks,
            coeffs,
            batch,
            cols,
            mut ys,
        } = self;
        let ys = &mut ys[..batch];
        for y in ys.iter_mut() {
            y.fill(0.0);
        }
        let block_rows = |index: usize| -> [&[T]; ROW_BLOCK] {
            core::array::from_fn(|r| {
                rows.get(index * ROW_BLOCK + r)
                    .map_or(&[][..], |&i| &w_t.row(i as usize)[cols.clone()])
            })
        };
        let mut next = block_rows(0);
        for (index, masks) in masks.chunks(ROW_BLOCK).enumerate() {
            let first = index * ROW_BLOCK;
            let block = next;
            next = block_rows(index + 1);
            for (b, y) in ys.iter_mut().enumerate() {
                let mut picked_rows: [&[T]; ROW_BLOCK] = [&[]; ROW_BLOCK];
                let mut picked_coeffs = [0.0f32; ROW_BLOCK];
                let mut count = 0;
                for (r, &mask) in masks.iter().enumerate() {
                    if mask & (1 << b) != 0 {
                        picked_rows[count] = block[r];
                        picked_coeffs[count] = coeffs[(first + r) * batch + b];
                        count += 1;
                    }
                }
                // Prefetch the next block while the first sample sums this one.
                let ahead: &[&[T]] = if b == 0 { &next } else { &[] };
                axpy_some(s, y, &picked_coeffs[..count], &picked_rows[..count], ahead);
            }
        }
    }
}

/// The rows one AXPY sums through `w_t`: a union's rows ascending, their sample masks and their
/// coefficients `[row][sample]`.
#[derive(Clone, Copy)]
struct AxpyRows<'a, T> {
    w_t: MatRef<'a, T>,
    rows: &'a [u32],
    masks: &'a [u8],
    coeffs: &'a [f32],
}

impl<T: Element> AxpyRows<'_, T> {
    /// The rows before the `at`-th and from it on.
    fn split_at(self, at: usize, batch: usize) -> [Self; 2] {
        let (rows, masks) = (self.rows.split_at(at), self.masks.split_at(at));
        let coeffs = self.coeffs.split_at(at * batch);
        [(rows.0, masks.0, coeffs.0), (rows.1, masks.1, coeffs.1)].map(|(rows, masks, coeffs)| {
            Self {
                w_t: self.w_t,
                rows,
                masks,
                coeffs,
            }
        })
    }
}

/// [`BatchAxpy`] of `N` sources of one width into outputs laid side by side in `ys`' rows
/// (`[first's columns | padding | second's ...]`, `stride` apart), in one split over threads:
/// with as many threads as sources each reads whole rows of one, and the team is woken once.
/// Each source's columns are split on its own multiples of [`COLUMN_ALIGN`], so every column is
/// summed by the same code whatever the split.
fn batch_axpy_side_by_side<T: Element, const N: usize>(
    cpu: &Cpu,
    sources: [AxpyRows<'_, T>; N],
    batch: usize,
    stride: usize,
    ys: BatchRows<'_>,
) {
    let width = sources[0].w_t.cols();
    let rows: usize = sources.iter().map(|s| s.rows.len()).sum();
    split_columns(
        cpu,
        ys,
        N * stride,
        rows.div_ceil(N) * core::mem::size_of::<T>(),
        COLUMN_ALIGN,
        |range, mut ys| {
            side_by_side(range, N, width, stride, |piece, cols, offset| {
                let part = ys.each_mut().map(|y| {
                    let len = y.len();
                    &mut y[offset.min(len)..(offset + cols.len()).min(len)]
                });
                let AxpyRows {
                    w_t,
                    rows,
                    masks,
                    coeffs,
                } = sources[piece];
                cpu.dispatch(BatchAxpy {
                    w_t,
                    rows,
                    masks,
                    coeffs,
                    batch,
                    cols,
                    ys: part,
                });
            });
        },
    );
}

/// [`BatchAxpy`] of `source` into the first `batch` of `ys`, split over threads: each half of
/// its rows summed from zero into `sums`, the two added (panels, as
/// [`crate::gemv::PANEL_MAX_COLS`] describes, here at every width since `sums` is scratch).
///
/// PERF: at Llama-2-7B's 4096-wide `W_down_t` too, whole 8 KB rows per thread beat 4 KB halves:
/// a CATS 50 % layer on two threads took 10.61 ms against 10.86 (medians of three runs).
fn batch_axpy<T: Element>(
    cpu: &Cpu,
    source: AxpyRows<'_, T>,
    batch: usize,
    mut ys: BatchRows<'_>,
    sums: &mut Vec<f32>,
) {
    let stride = source.w_t.cols().next_multiple_of(COLUMN_ALIGN);
    reuse(sums, batch * 2 * stride, 0.0);
    let halves = source.split_at(source.rows.len() / 2, batch);
    batch_axpy_side_by_side(cpu, halves, batch, stride, per_sample(sums, 2 * stride));
    for (y, sums) in ys[..batch]
        .iter_mut()
        .zip(sums.chunks_exact((2 * stride).max(1)))
    {
        let (first, second) = sums.split_at(stride);
        for ((out, a), b) in y.iter_mut().zip(first).zip(second) {
            *out = a + b;
        }
    }
}

/// The width of each of `g` and `u` in [`MlpScratch`]'s `gate_up` rows: `inter` padded to
/// [`COLUMN_ALIGN`], so that each matrix is split on its own multiples of it.
fn gate_up_stride(inter: usize) -> usize {
    inter.next_multiple_of(COLUMN_ALIGN)
}

/// The first `rows` rows of `y`, as a batch.
fn batch_rows<'y>(y: &'y mut MatMut<'_, f32>) -> BatchRows<'y> {
    let mut rows = y.rows_mut();
    core::array::from_fn(|_| rows.next().unwrap_or_default())
}

/// `values` (`[sample][len]`) split per sample.
fn per_sample(values: &mut [f32], len: usize) -> BatchRows<'_> {
    let mut rows = values.chunks_mut(len.max(1));
    core::array::from_fn(|_| rows.next().unwrap_or_default())
}

/// The rows of `x`, as an array (unused samples empty).
fn inputs<'x>(x: &MatRef<'x, f32>) -> [&'x [f32]; MAX_MLP_BATCH] {
    let mut rows = x.row_iter();
    core::array::from_fn(|_| rows.next().unwrap_or_default())
}

/// The CATS MLP (see the module docs): `x` and `y` `[batch, hidden]`, batch 1 to 4; the rows read
/// go to `scratch`'s [`MlpScratch::report`]. A gate activation `a` is active iff
/// `!(|a| <= threshold)` (strict, NaN active): `threshold <= 0` computes the dense MLP.
///
/// See [`MlpScratch`] for an example.
pub fn cats_mlp<T: Element>(
    cpu: &Cpu,
    x: MatRef<'_, f32>,
    weights: CatsMlpWeights<MatRef<'_, T>>,
    threshold: f32,
    mut y: MatMut<'_, f32>,
    scratch: &mut MlpScratch,
) -> Result<()> {
    let [inter, _] =
        validate_cats_mlp(x.shape(), weights.map(MatRef::shape), threshold, y.shape())?;
    let batch = x.rows();
    let xs = inputs(&x);
    let xs = &xs[..batch];
    let s = scratch;
    s.report.intermediate = inter;
    // (1) a = silu(W_gate x) for every sample, one pass over W_gate; the mask fused after it.
    reuse(&mut s.activations, inter * batch, 0.0);
    dot_rows(cpu, |i| weights.gate.row(i), xs, &mut s.activations);
    cpu.dispatch(Silu {
        gate: &mut s.activations,
        up: None,
    });
    reuse(&mut s.active, inter * batch, false);
    for (flag, v) in s.active.iter_mut().zip(&s.activations) {
        *flag = is_active(*v, threshold);
    }
    union_rows(&s.active, batch, &mut s.report.active, &mut s.masks);
    let rows = &s.report.active;
    // (2) u = W_up[i] . x for the union's rows; h = a * u.
    reuse(&mut s.coeffs, rows.len() * batch, 0.0);
    dot_rows(cpu, |j| weights.up.row(rows[j] as usize), xs, &mut s.coeffs);
    for (j, &i) in rows.iter().enumerate() {
        for b in 0..batch {
            s.coeffs[j * batch + b] *= s.activations[i as usize * batch + b];
        }
    }
    // (3) y_b = sum of h_b,i W_down_t[i] over the rows sample b keeps.
    let down = AxpyRows {
        w_t: weights.down_t,
        rows,
        masks: &s.masks,
        coeffs: &s.coeffs,
    };
    batch_axpy(cpu, down, batch, batch_rows(&mut y), &mut s.panel_sums);
    Ok(())
}

/// The TEAL MLP (see the module docs): `x` and `y` `[batch, hidden]`, batch 1 to 4; each
/// projection's input is thresholded with its own threshold (the same strict rule as CATS). The
/// rows of `W_down_t` read go to `scratch`'s [`MlpScratch::report`].
///
/// ```
/// use kernels_cpu::prelude::*;
/// let (hidden, inter) = (2, 3);
/// let gate_t = [1.0f32, 1.0, 1.0, 0.0, 0.0, 0.0]; // [hidden, inter]
/// let up_t = [1.0f32; 6];
/// let down_t = [1.0f32; 6]; // [inter, hidden]
/// let weights = TealMlpWeights {
///     gate_t: MatRef::from_slice(&gate_t, hidden, inter)?,
///     up_t: MatRef::from_slice(&up_t, hidden, inter)?,
///     down_t: MatRef::from_slice(&down_t, inter, hidden)?,
/// };
/// let mut y = [0.0f32; 2];
/// let mut scratch = MlpScratch::new();
/// teal_mlp(
///     &Cpu::detect(),
///     MatRef::from_slice(&[2.0, 0.1], 1, hidden)?, // 0.1 is below the threshold: skipped
///     weights,
///     TealThresholds::new(0.5, 0.0),
///     MatMut::from_slice(&mut y, 1, hidden)?,
///     &mut scratch,
/// )?;
/// let h = 2.0 / (1.0 + (-2.0f32).exp()) * 2.0; // silu(g) * u for each intermediate row
/// assert!((y[0] - 3.0 * h).abs() < 1e-5);
/// assert_eq!(scratch.report().active, [0, 1, 2]);
/// # Ok::<(), Error>(())
/// ```
pub fn teal_mlp<T: Element>(
    cpu: &Cpu,
    x: MatRef<'_, f32>,
    weights: TealMlpWeights<MatRef<'_, T>>,
    thresholds: TealThresholds,
    mut y: MatMut<'_, f32>,
    scratch: &mut MlpScratch,
) -> Result<()> {
    let [inter, hidden] =
        validate_teal_mlp(x.shape(), weights.map(MatRef::shape), thresholds, y.shape())?;
    let batch = x.rows();
    let s = scratch;
    s.report.intermediate = inter;
    // Inputs of gate and up: x thresholded per sample.
    reuse(&mut s.active, hidden * batch, false);
    for b in 0..batch {
        for (i, &v) in x.row(b).iter().enumerate() {
            s.active[i * batch + b] = is_active(v, thresholds.gate_up);
        }
    }
    union_rows(&s.active, batch, &mut s.input_rows, &mut s.input_masks);
    s.input_coeffs.clear();
    s.input_coeffs.extend(
        s.input_rows
            .iter()
            .flat_map(|&i| (0..batch).map(move |b| x.at(b, i as usize))),
    );
    let stride = gate_up_stride(inter);
    reuse(&mut s.gate_up, batch * 2 * stride, 0.0);
    let inputs = |w_t| AxpyRows {
        w_t,
        rows: &s.input_rows,
        masks: &s.input_masks,
        coeffs: &s.input_coeffs,
    };
    let sources = [inputs(weights.gate_t), inputs(weights.up_t)];
    let gate_up = per_sample(&mut s.gate_up, 2 * stride);
    batch_axpy_side_by_side(cpu, sources, batch, stride, gate_up);
    // Input of down: h = silu(g) * u, thresholded per sample; laid out [row][sample].
    reuse(&mut s.activations, inter * batch, 0.0);
    reuse(&mut s.active, inter * batch, false);
    for (b, sample) in s.gate_up.chunks_exact_mut((2 * stride).max(1)).enumerate() {
        let (gate, up) = sample.split_at_mut(stride);
        let (gate, up) = (&mut gate[..inter], &up[..inter]);
        cpu.dispatch(Silu { gate, up: Some(up) });
        for (i, &v) in gate.iter().enumerate() {
            s.activations[i * batch + b] = v;
            s.active[i * batch + b] = is_active(v, thresholds.down);
        }
    }
    union_rows(&s.active, batch, &mut s.report.active, &mut s.masks);
    s.coeffs.clear();
    let h = &s.activations;
    s.coeffs.extend(
        s.report
            .active
            .iter()
            .flat_map(|&i| &h[i as usize * batch..][..batch])
            .copied(),
    );
    let down = AxpyRows {
        w_t: weights.down_t,
        rows: &s.report.active,
        masks: &s.masks,
        coeffs: &s.coeffs,
    };
    batch_axpy(cpu, down, batch, batch_rows(&mut y), &mut s.panel_sums);
    Ok(())
}

const _: () = assert!(MAX_MLP_BATCH <= 8, "sample masks are u8");
