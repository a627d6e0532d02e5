//! The CATS and TEAL MLPs for decode batches of 1 to 4: the fast twins of `cats_mlp_ref` and
//! `teal_mlp_ref`.
//!
//! # Contracts
//!
//! Those of [`kernels_core::ops::sparse`]: each sample's result depends only on its own input (it
//! sums its own active rows), a weight row is read once per call if any sample keeps it, and the
//! report lists the rows read. Computed in `f32` (`silu` with `expf`); within
//! [`mlp_tolerance`] of the reference when both judge the same rows active. A row whose activation lies
//! within rounding of the threshold may be judged differently than by the `f64` reference.
//!
//! # How
//!
//! CATS: (1) the dense gate GEMV for all samples in one pass over `W_gate`, with SiLU and the
//! threshold fused after it; (2) gathered dots of the union's `W_up` rows; (3) AXPY of the union's
//! `W_down_t` rows, each sample adding only its own active rows. TEAL: AXPY of the union of active
//! inputs over `W_gate_t` and `W_up_t`, then AXPY of the union of active `h` over `W_down_t`.
//! Threads split rows for dots and columns for AXPYs.

use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

use kernels_core::ops::sparse::{
    CatsMlpWeights, MAX_MLP_BATCH, MlpReport, TealMlpWeights, TealThresholds, is_active, silu_f32,
    validate_cats_mlp, validate_teal_mlp,
};
use kernels_core::{Element, MatMut, MatRef, Result};

use crate::gemv::{COLUMN_ALIGN, ROW_BLOCK, axpy_some, dot_rows, gemv_tolerance};
use crate::parallel::{for_each, parts_for, ranges};
use crate::{Cpu, Simd, WithSimd};

/// Bound on `|y_j - y_ref_j|` of an MLP output.
///
/// * `propagated = sum_i (|a_i| S_up_i + 1.1 |u_i| S_gate_i) |w_down_t[i, j]|`, where `S_p_i` is
///   the absolute sum `sum_k |W_p[i, k] x_k|` of the dot that produced `g_i` or `u_i` (1.1 bounds
///   `|silu'|`): how the `f32` rounding of the gate and up dots reaches `y_j`;
/// * `direct = sum_i |h_i w_down_t[i, j]|`: the scale of the final AXPY and of the roundings in
///   SiLU and the product `h = a u`;
///
/// over the `active` rows, with `hidden` terms per dot. Each dot contributes a
/// [`crate::gemv::gemv_tolerance`]; SiLU (`expf`, one division) and the product add `8 u direct`.
#[must_use]
pub fn mlp_tolerance(hidden: usize, active: usize, propagated: f64, direct: f64) -> f64 {
    let u = f64::from(f32::EPSILON / 2.0);
    gemv_tolerance(hidden, propagated) + gemv_tolerance(active, direct) + 8.0 * u * direct
}

/// Rows of a matrix read by an AXPY, in blocks of up to four, with each sample's subset.
struct UnionRows {
    /// Row indices (ascending), the union over the batch.
    rows: Vec<u32>,
    /// Per row, bit `b` set if sample `b` uses it.
    masks: Vec<u8>,
}

impl UnionRows {
    /// From `active[i * batch + b]`.
    fn new(active: &[bool], batch: usize) -> Self {
        let mut rows = Vec::new();
        let mut masks = Vec::new();
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
        Self { rows, masks }
    }
}

/// `ys[b][cols] = sum over union rows j used by sample b of coeffs[j * B + b] * w_t[rows[j], cols]`.
struct BatchAxpy<'a, 'y, T> {
    w_t: MatRef<'a, T>,
    union: &'a UnionRows,
    coeffs: &'a [f32],
    cols: Range<usize>,
    ys: &'a mut [&'y mut [f32]],
}

impl<T: Element> WithSimd for BatchAxpy<'_, '_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let Self {
            w_t,
            union,
            coeffs,
            cols,
            ys,
        } = self;
        let batch = ys.len();
        for y in ys.iter_mut() {
            y.fill(0.0);
        }
        let block_rows = |index: usize| -> [&[T]; ROW_BLOCK] {
            core::array::from_fn(|r| {
                union
                    .rows
                    .get(index * ROW_BLOCK + r)
                    .map_or(&[][..], |&i| &w_t.row(i as usize)[cols.clone()])
            })
        };
        let mut next = block_rows(0);
        for (index, masks) in union.masks.chunks(ROW_BLOCK).enumerate() {
            let first = index * ROW_BLOCK;
            let rows = next;
            next = block_rows(index + 1);
            for (b, y) in ys.iter_mut().enumerate() {
                let mut picked_rows: [&[T]; ROW_BLOCK] = [&[]; ROW_BLOCK];
                let mut picked_coeffs = [0.0f32; ROW_BLOCK];
                let mut count = 0;
                for (r, &mask) in masks.iter().enumerate() {
                    if mask & (1 << b) != 0 {
                        picked_rows[count] = rows[r];
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

/// Runs [`BatchAxpy`] over the columns of `w_t`, split over threads.
fn batch_axpy<T: Element>(
    cpu: &Cpu,
    w_t: MatRef<'_, T>,
    union: &UnionRows,
    coeffs: &[f32],
    ys: Vec<&mut [f32]>,
) {
    let cols = w_t.cols();
    let weight_bytes = union.rows.len() * cols * core::mem::size_of::<T>();
    let parts = parts_for(cpu.threads(), weight_bytes, cpu.min_bytes_per_thread());
    let splits: Vec<Range<usize>> = ranges(cols, parts, COLUMN_ALIGN).collect();
    let mut work: Vec<(Range<usize>, Vec<&mut [f32]>)> = splits
        .iter()
        .map(|r| (r.clone(), Vec::with_capacity(ys.len())))
        .collect();
    for y in ys {
        let mut rest = y;
        for (range, part) in &mut work {
            let (mine, tail) = rest.split_at_mut(range.len());
            part.push(mine);
            rest = tail;
        }
    }
    if work.is_empty() {
        return;
    }
    for_each(work, |(cols, mut ys)| {
        cpu.dispatch(BatchAxpy {
            w_t,
            union,
            coeffs,
            cols,
            ys: &mut ys,
        });
    });
}

fn report(union: &UnionRows, intermediate: usize) -> MlpReport {
    MlpReport {
        active: union.rows.clone(),
        intermediate,
    }
}

/// The CATS MLP (see the module docs); `x` `[batch, hidden]`, `y` `[batch, hidden]`.
pub fn cats_mlp<T: Element>(
    cpu: &Cpu,
    x: MatRef<'_, f32>,
    weights: CatsMlpWeights<'_, T>,
    threshold: f32,
    mut y: MatMut<'_, f32>,
) -> Result<MlpReport> {
    let [inter, _] = validate_cats_mlp(x, &weights, threshold, y.shape())?;
    let xs: Vec<&[f32]> = x.row_iter().collect();
    let batch = xs.len();
    // (1) a = silu(W_gate x) for every sample, one pass over W_gate; the mask fused after it.
    let mut a = vec![0.0f32; inter * batch];
    dot_rows(cpu, |i| weights.gate.row(i), &xs, &mut a);
    let mut active = vec![false; inter * batch];
    for (flag, v) in active.iter_mut().zip(a.iter_mut()) {
        *v = silu_f32(*v);
        *flag = is_active(*v, threshold);
    }
    let union = UnionRows::new(&active, batch);
    // (2) u = W_up[i] . x for the union's rows; h = a * u.
    let mut h = vec![0.0f32; union.rows.len() * batch];
    dot_rows(cpu, |j| weights.up.row(union.rows[j] as usize), &xs, &mut h);
    for (j, &i) in union.rows.iter().enumerate() {
        for b in 0..batch {
            h[j * batch + b] *= a[i as usize * batch + b];
        }
    }
    // (3) y_b = sum of h_b,i W_down_t[i] over the rows sample b keeps.
    batch_axpy(cpu, weights.down_t, &union, &h, y.rows_mut().collect());
    Ok(report(&union, inter))
}

/// The TEAL MLP (see the module docs); `x` `[batch, hidden]`, `y` `[batch, hidden]`.
pub fn teal_mlp<T: Element>(
    cpu: &Cpu,
    x: MatRef<'_, f32>,
    weights: TealMlpWeights<'_, T>,
    thresholds: TealThresholds,
    mut y: MatMut<'_, f32>,
) -> Result<MlpReport> {
    let [inter, hidden] = validate_teal_mlp(x, &weights, thresholds, y.shape())?;
    let batch = x.rows();
    // Inputs of gate and up: x thresholded per sample.
    let mut x_active = vec![false; hidden * batch];
    for b in 0..batch {
        for (i, &v) in x.row(b).iter().enumerate() {
            x_active[i * batch + b] = is_active(v, thresholds.gate_up);
        }
    }
    let x_union = UnionRows::new(&x_active, batch);
    let x_coeffs: Vec<f32> = x_union
        .rows
        .iter()
        .flat_map(|&i| (0..batch).map(move |b| x.at(b, i as usize)))
        .collect();
    let mut g = vec![0.0f32; batch * inter];
    let mut u = vec![0.0f32; batch * inter];
    batch_axpy(
        cpu,
        weights.gate_t,
        &x_union,
        &x_coeffs,
        g.chunks_mut(inter.max(1)).collect(),
    );
    batch_axpy(
        cpu,
        weights.up_t,
        &x_union,
        &x_coeffs,
        u.chunks_mut(inter.max(1)).collect(),
    );
    // Input of down: h = silu(g) * u, thresholded per sample; laid out [row][sample].
    let mut h = vec![0.0f32; inter * batch];
    let mut h_active = vec![false; inter * batch];
    for b in 0..batch {
        for i in 0..inter {
            let v = silu_f32(g[b * inter + i]) * u[b * inter + i];
            h[i * batch + b] = v;
            h_active[i * batch + b] = is_active(v, thresholds.down);
        }
    }
    let h_union = UnionRows::new(&h_active, batch);
    let h_coeffs: Vec<f32> = h_union
        .rows
        .iter()
        .flat_map(|&i| &h[i as usize * batch..][..batch])
        .copied()
        .collect();
    batch_axpy(
        cpu,
        weights.down_t,
        &h_union,
        &h_coeffs,
        y.rows_mut().collect(),
    );
    Ok(report(&h_union, inter))
}

const _: () = assert!(MAX_MLP_BATCH <= 8, "sample masks are u8");
