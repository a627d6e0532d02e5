//! LU with partial pivoting (blocked, right-looking) and its LDU form.

use alloc::vec::Vec;

use kernels_core::backend::pivot_row;
use kernels_core::ops::lowrank::{Ldu, Lu, LuParams};
use kernels_core::{Element, Error, Mat, MatRef, Result};

use super::{Transpose, gemm, widen_checked};
use crate::Cpu;
use crate::simd::{Simd, WithSimd};

/// Columns per panel.
// PERF: 48-column panels make the trailing update a GEMM of depth 48, deep enough to run near
// peak, while the panel (factored with row operations) stays small.
const PANEL: usize = 48;

/// LU with partial pivoting: the largest `|a|` of each column is its pivot (the lowest row on
/// ties); a zero pivot column is skipped, as LAPACK's `getrf` does.
///
/// ```
/// use kernels_core::MatRef;
/// use kernels_cpu::{Cpu, linalg::lu};
/// let a = [1.0f32, 2.0, 4.0, 3.0]; // [[1, 2], [4, 3]]: row 1 is the first pivot
/// let f = lu(&Cpu::detect(), MatRef::from_slice(&a, 2, 2)?)?;
/// assert_eq!(f.perm, [1, 0]);
/// assert_eq!(f.u.row(0), &[4.0, 3.0]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn lu<T: Element>(cpu: &Cpu, a: MatRef<'_, T>) -> Result<Lu<f32>> {
    let mut w = widen_checked("a", a)?;
    let (m, n) = (w.rows(), w.cols());
    let k = m.min(n);
    let mut perm: Vec<usize> = (0..m).collect();
    for start in (0..k).step_by(PANEL) {
        let nb = PANEL.min(k - start);
        cpu.dispatch(Panel {
            w: &mut w,
            perm: &mut perm,
            start,
            nb,
        })?;
        let (end, trailing) = (start + nb, n - start - nb);
        // A22 -= L21 U12. L21 shares rows with A22: copy it out (m x nb, small next to A22).
        let below = m - end;
        if below == 0 || trailing == 0 {
            continue;
        }
        let l21 = Mat::from_fn(below, nb, |i, j| w.at(end + i, start + j))?;
        let (top, bottom) = w.as_mut().split_rows_at(end)?;
        let u12 = top.as_ref().submatrix(start, end, nb, trailing)?;
        let a22 = bottom.submatrix_mut(0, end, below, trailing)?;
        gemm(
            cpu,
            -1.0,
            l21.as_ref(),
            Transpose::No,
            u12,
            Transpose::No,
            1.0,
            a22,
        )?;
    }
    // Row slices rather than element by element: these copies touch all of `w`.
    let mut l = Mat::zeros(m, k)?;
    let mut u = Mat::zeros(k, n)?;
    for i in 0..m {
        let row = w.row(i);
        let below = i.min(k);
        l.row_mut(i)[..below].copy_from_slice(&row[..below]);
        if i < k {
            l.row_mut(i)[i] = 1.0;
            u.row_mut(i)[i..].copy_from_slice(&row[i..]);
        }
    }
    Ok(Lu { perm, l, u })
}

/// One panel's unblocked work: its LU ([`factor_panel`]), then `U12 = L11^{-1} A12` by row
/// operations on contiguous rows.
///
/// PERF: dispatched, so these plain loops (no fused multiply-adds: the same bits on every ISA)
/// are compiled for the CPU's ISA rather than the baseline's SSE2.
struct Panel<'a> {
    w: &'a mut Mat<f32>,
    perm: &'a mut [usize],
    start: usize,
    nb: usize,
}

impl WithSimd for Panel<'_> {
    type Output = Result<()>;

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> Result<()> {
        let Self { w, perm, start, nb } = self;
        factor_panel(w, perm, start, nb)?;
        let (end, n) = (start + nb, w.cols());
        for i in start + 1..end {
            let (above, row) = w.as_mut_slice().split_at_mut(i * n);
            let row = &mut row[..n];
            for p in start..i {
                let factor = row[p];
                let pivot_row = &above[p * n..][end..n];
                for (x, u) in row[end..].iter_mut().zip(pivot_row) {
                    *x -= factor * u;
                }
            }
        }
        Ok(())
    }
}

/// Unblocked LU of columns `start..start + nb` (all rows from `start`), swapping whole rows.
///
/// The panel is factored in a transposed copy (row `jj` holds panel column `jj`), so the pivot
/// search and every column update run over contiguous memory; the copy goes back at the end.
// PERF: on the row-major matrix each pivot search strode down a column, one cache line per
// row: 2048 x 2048 took 118 ms against faer's 101.
#[inline(always)]
fn factor_panel(w: &mut Mat<f32>, perm: &mut [usize], start: usize, nb: usize) -> Result<()> {
    let (m, n) = (w.rows(), w.cols());
    let rows = m - start;
    let mut panel = Mat::zeros(nb, rows)?;
    for i in 0..rows {
        for (jj, &v) in w.row(start + i)[start..start + nb].iter().enumerate() {
            *panel.at_mut(jj, i) = v;
        }
    }
    for jj in 0..nb {
        let pivot = pivot_row(jj..rows, |i| f64::from(panel.at(jj, i).abs()));
        if pivot != jj {
            for c in 0..nb {
                panel.row_mut(c).swap(jj, pivot);
            }
            // Whole rows of the matrix (the panel's columns are rewritten below).
            let (j, p) = (start + jj, start + pivot);
            let (top, bottom) = w.as_mut_slice().split_at_mut(p * n);
            top[j * n..][..n].swap_with_slice(&mut bottom[..n]);
            perm.swap(j, p);
        }
        let d = panel.at(jj, jj);
        if d == 0.0 {
            continue;
        }
        let (done, later) = panel.as_mut_slice().split_at_mut((jj + 1) * rows);
        let l_column = &mut done[jj * rows..][jj + 1..];
        for f in l_column.iter_mut() {
            *f /= d;
        }
        for column in later.chunks_exact_mut(rows) {
            let u = column[jj];
            for (x, f) in column[jj + 1..].iter_mut().zip(l_column.iter()) {
                *x -= f * u;
            }
        }
    }
    for i in 0..rows {
        for (jj, v) in w.row_mut(start + i)[start..start + nb]
            .iter_mut()
            .enumerate()
        {
            *v = panel.at(jj, i);
        }
    }
    Ok(())
}

/// LDU with partial pivoting: [`lu`], then `U = D U1`. A pivot with
/// `|d| <= max(pivot_guard, k eps) * max|A|` (or zero) is [`Error::Singular`]: in `f32` the
/// pivot of an exactly singular matrix is rounding noise of about `k eps max|A|`
/// (`k = min(m, n)`, `eps = f32::EPSILON`), so a smaller guard could not see it.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let cpu = Cpu::detect();
/// let a = [2.0f32, 4.0, 1.0, 5.0]; // [[2, 4], [1, 5]]
/// let factors = ldu(&cpu, MatRef::from_slice(&a, 2, 2)?, LuParams::default())?;
/// assert_eq!(factors.perm, [0, 1]);
/// assert_eq!(factors.d, [2.0, 3.0]); // U1 has a unit diagonal
/// assert_eq!(factors.u.at(0, 1), 2.0);
/// // A singular matrix is an error, not a factorisation of noise.
/// let singular = [1.0f32, 2.0, 2.0, 4.0];
/// let result = ldu(&cpu, MatRef::from_slice(&singular, 2, 2)?, LuParams::default());
/// assert!(matches!(result, Err(Error::Singular { .. })));
/// # Ok::<(), Error>(())
/// ```
pub fn ldu<T: Element>(cpu: &Cpu, a: MatRef<'_, T>, params: LuParams) -> Result<Ldu<f32>> {
    if !(params.pivot_guard.is_finite() && params.pivot_guard >= 0.0) {
        return Err(Error::InvalidParam {
            name: "pivot_guard",
            value: params.pivot_guard,
            expected: "finite and >= 0",
        });
    }
    let Lu { perm, l, mut u } = lu(cpu, a)?;
    let scale = a
        .row_iter()
        .flatten()
        .map(|v| f64::from(v.to_f32().abs()))
        .fold(0.0, f64::max);
    let guard = params
        .pivot_guard
        .max(u.rows() as f64 * f64::from(f32::EPSILON));
    let mut d = Vec::with_capacity(u.rows());
    for i in 0..u.rows() {
        let pivot = u.at(i, i);
        if f64::from(pivot.abs()) <= guard * scale || pivot == 0.0 {
            return Err(Error::Singular {
                what: "LDU",
                index: i,
            });
        }
        u.row_mut(i).iter_mut().for_each(|v| *v /= pivot);
        d.push(pivot);
    }
    Ok(Ldu { perm, l, d, u })
}
