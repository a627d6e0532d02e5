//! Householder thin QR (blocked, compact WY) and CGS2.
//!
//! The factorisations work on `A^T` (row `j` is column `j` of `A`), so every reflector, dot
//! product and update inside a panel runs over contiguous memory, and the trailing updates are
//! three GEMMs per panel of [`PANEL`] columns.

use alloc::vec::Vec;

use kernels_core::backend::validate_cgs2;
use kernels_core::ops::project::Qr;
use kernels_core::{Element, Error, Mat, MatMut, MatRef, Result};

use super::{Transpose, block_mut, finite_factor, gemm, product, transposed_checked};
use crate::Cpu;
use crate::simd::{Simd, WithSimd};

/// Columns per Householder panel and per CGS2 block.
// PERF: 32 columns keep a panel of a 4096-row matrix (512 KiB) in L2 while it is factored, and
// make the trailing GEMMs deep enough (k = 32) to run near their peak.
const PANEL: usize = 32;

/// Below this ratio of its norm after and before orthogonalisation, CGS2 takes a column to be
/// dependent on the previous ones: a few units of `f32` rounding, where the remaining direction
/// is noise.
pub const CGS2_DEPENDENCE_TOLERANCE: f64 = 8.0 * f32::EPSILON as f64;

/// `a . b` with eight partial sums.
// PERF: eight independent sums let the compiler vectorise and pipeline the reduction, which a
// single running sum would serialise on the add latency.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut partial = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            partial[i] += x[i] * y[i];
        }
    }
    partial.iter().sum::<f32>() + tail
}

/// `y += alpha x`.
#[inline(always)]
pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// `sum x_i^2` in `f64`, which neither overflows nor underflows for any finite `f32`.
#[inline(always)]
pub(crate) fn sum_squares_f64(x: &[f32]) -> f64 {
    let mut partial = [0.0f64; 4];
    let chunks = x.chunks_exact(4);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum();
    for c in chunks {
        for i in 0..4 {
            partial[i] += f64::from(c[i]) * f64::from(c[i]);
        }
    }
    partial.iter().sum::<f64>() + tail
}

/// The reflector `H = I - tau v v^T` (`v[0] = 1`) with `H x = beta e0`: on return `x[0]` is
/// `beta` and `x[1..]` holds `v[1..]`; returns `tau` (0 when `x[1..]` is already zero).
#[inline(always)]
fn make_reflector(x: &mut [f32]) -> f32 {
    let Some((head, tail)) = x.split_first_mut() else {
        return 0.0;
    };
    let tail_squares = sum_squares_f64(tail);
    if tail_squares == 0.0 {
        return 0.0;
    }
    let alpha = f64::from(*head);
    let norm = libm::sqrt(alpha * alpha + tail_squares);
    // beta takes the sign opposite to alpha: alpha - beta cannot cancel.
    let beta = if alpha >= 0.0 { -norm } else { norm };
    let divisor = alpha - beta;
    for t in tail {
        *t = (f64::from(*t) / divisor) as f32;
    }
    *head = beta as f32;
    ((beta - alpha) / beta) as f32
}

/// `y = (I - tau v v^T) y` with `v = [1, v_tail]`.
#[inline(always)]
fn apply_reflector(tau: f32, v_tail: &[f32], y: &mut [f32]) {
    // Unreachable: reflectors are built for columns with at least one row below the diagonal.
    let (y0, y_tail) = y.split_first_mut().expect("reflector of length >= 1");
    let w = tau * (*y0 + dot(v_tail, y_tail));
    *y0 -= w;
    axpy(-w, v_tail, y_tail);
}

/// The reflectors of one panel (`nb` rows of `w` from row `start`, each `m` long), each applied
/// to the panel's later rows; returns their `tau`s.
///
/// PERF: dispatched, so the reflectors' dot products, updates and scalings (plain loops the
/// compiler vectorises, no fused multiply-adds: the same bits on every ISA) are compiled for
/// the CPU's ISA rather than the baseline's SSE2 (a 4096 x 16 QR took 1.5x as long).
struct Panel<'a> {
    w: &'a mut [f32],
    m: usize,
    start: usize,
    nb: usize,
}

impl WithSimd for Panel<'_> {
    type Output = [f32; PANEL];

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> [f32; PANEL] {
        let Self { w, m, start, nb } = self;
        let mut taus = [0.0f32; PANEL];
        for jj in 0..nb {
            let j = start + jj;
            let (head, rest) = w.split_at_mut((j + 1) * m);
            let x = &mut head[j * m + j..];
            taus[jj] = make_reflector(x);
            let v_tail = &x[1..];
            for later in rest.chunks_exact_mut(m).take(nb - jj - 1) {
                apply_reflector(taus[jj], v_tail, &mut later[j..]);
            }
        }
        taus
    }
}

/// CGS2 inside one block of rows (columns of `A`) already orthogonal to the previous blocks:
/// each row against the block's earlier ones, twice, then normalised; the coefficients and
/// norms go to `r`. Dispatched as [`Panel`] is.
struct Orthonormalise<'a> {
    blk: &'a mut [f32],
    m: usize,
    start: usize,
    r: &'a mut Mat<f32>,
    original: &'a [f64],
}

impl WithSimd for Orthonormalise<'_> {
    type Output = Result<()>;

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> Result<()> {
        let Self {
            blk,
            m,
            start,
            r,
            original,
        } = self;
        for jj in 0..blk.len() / m {
            let j = start + jj;
            let (finished, current) = blk.split_at_mut(jj * m);
            let v = &mut current[..m];
            for _pass in 0..2 {
                let mut coefficients = [0.0f32; PANEL];
                for (c, q) in coefficients.iter_mut().zip(finished.chunks_exact(m)) {
                    *c = dot(q, v);
                }
                for (ii, (q, &c)) in finished.chunks_exact(m).zip(&coefficients).enumerate() {
                    *r.at_mut(start + ii, j) += c;
                    axpy(-c, q, v);
                }
            }
            let norm = libm::sqrt(sum_squares_f64(v));
            if !(norm > CGS2_DEPENDENCE_TOLERANCE * original[j]) {
                return Err(Error::Singular {
                    what: "CGS2",
                    index: j,
                });
            }
            *r.at_mut(j, j) = norm as f32;
            let inverse = (1.0 / norm) as f32;
            for t in v.iter_mut() {
                *t *= inverse;
            }
        }
        Ok(())
    }
}

/// One panel's block reflector `H_j0 ... H_{j0+nb-1} = I - V T V^T`.
struct BlockReflector {
    /// First column of the panel.
    start: usize,
    /// `V^T`, `nb x (m - start)`: unit diagonal, zeros above it.
    vt: Mat<f32>,
    /// `nb x nb`, upper triangular.
    t: Mat<f32>,
}

/// Householder QR of the matrix whose columns are the rows of `w` (`n x m`), in place: on return
/// row `j < k` holds `R[..=j, j]` in its first `j + 1` entries (rows `j >= k` hold all `k`), and
/// the returned block reflectors hold `Q`.
fn factor(cpu: &Cpu, w: &mut Mat<f32>) -> Result<Vec<BlockReflector>> {
    let (n, m) = (w.rows(), w.cols());
    let k = m.min(n);
    let mut blocks = Vec::with_capacity(k.div_ceil(PANEL));
    for start in (0..k).step_by(PANEL) {
        let nb = PANEL.min(k - start);
        let taus = cpu.dispatch(Panel {
            w: w.as_mut_slice(),
            m,
            start,
            nb,
        });
        let width = m - start;
        let mut vt = Mat::zeros(nb, width)?;
        for jj in 0..nb {
            let row = vt.row_mut(jj);
            row[jj] = 1.0;
            row[jj + 1..].copy_from_slice(&w.row(start + jj)[start + jj + 1..]);
        }
        // LAPACK's larft (forward, columnwise): T[..i, i] = -tau_i T[..i, ..i] (V[:, ..i]^T v_i).
        let mut t = Mat::zeros(nb, nb)?;
        for i in 0..nb {
            *t.at_mut(i, i) = taus[i];
            let z: Vec<f32> = (0..i)
                .map(|p| dot(&vt.row(p)[i..], &vt.row(i)[i..]))
                .collect();
            for p in 0..i {
                let s: f32 = (p..i).map(|q| t.at(p, q) * z[q]).sum();
                *t.at_mut(p, i) = -taus[i] * s;
            }
        }
        // Trailing columns: W2 <- W2 (I - V T V^T) = W2 - ((W2 V) T) V^T.
        let trailing = n - start - nb;
        if trailing > 0 {
            let w2 = block_mut(w, start + nb, start, trailing, width);
            apply_from_right(cpu, w2, &vt, &t, Transpose::No)?;
        }
        blocks.push(BlockReflector { start, vt, t });
    }
    Ok(blocks)
}

/// `target <- target - ((target V) op(T)) V^T`: the rows of `target` times `I - V op(T) V^T`,
/// three GEMMs.
fn apply_from_right(
    cpu: &Cpu,
    mut target: MatMut<'_, f32>,
    vt: &Mat<f32>,
    t: &Mat<f32>,
    t_op: Transpose,
) -> Result<()> {
    let y = product(
        cpu,
        target.as_ref(),
        Transpose::No,
        vt.as_ref(),
        Transpose::Yes,
    )?;
    let z = product(cpu, y.as_ref(), Transpose::No, t.as_ref(), t_op)?;
    gemm(
        cpu,
        -1.0,
        z.as_ref(),
        Transpose::No,
        vt.as_ref(),
        Transpose::No,
        1.0,
        target.rb_mut(),
    )
}

/// `Q^T` (`k x m`) from the block reflectors, accumulated backwards.
fn form_qt(cpu: &Cpu, blocks: &[BlockReflector], m: usize, k: usize) -> Result<Mat<f32>> {
    let mut qt = Mat::zeros(k, m)?;
    for i in 0..k {
        *qt.at_mut(i, i) = 1.0;
    }
    for BlockReflector { start, vt, t } in blocks.iter().rev() {
        // Q2 <- (I - V T V^T) Q2, i.e. Qt2 <- Qt2 - ((Qt2 V) T^T) V^T.
        let (rows, width) = (k - start, m - start);
        let qt2 = block_mut(&mut qt, *start, *start, rows, width);
        apply_from_right(cpu, qt2, vt, t, Transpose::Yes)?;
    }
    Ok(qt)
}

/// `a^T` as a new matrix.
pub(crate) fn transpose(a: MatRef<'_, f32>) -> Result<Mat<f32>> {
    // PERF: tiles of 8 x 8, and the tiles of eight output rows one after another, so that at
    // most eight output cache lines are in flight. Rows of 4 KiB multiples all map to one L1
    // set, and 32 x 32 tiles wrote 16 to 32 lines of one set: every store missed L1, and the
    // transposes took a fifth of a 4096 x 16 QR. A whole tile is read into a local array first:
    // eight row reads, then eight column writes.
    const T: usize = 8;
    let (rows, cols) = (a.rows(), a.cols());
    let mut out = Mat::zeros(cols, rows)?;
    for (block, dst) in out.as_mut_slice().chunks_mut(T * rows.max(1)).enumerate() {
        let j0 = block * T;
        let width = dst.len() / rows.max(1);
        let mut i0 = 0;
        if width == T {
            while i0 + T <= rows {
                let mut tile = [[0.0f32; T]; T];
                for (r, line) in tile.iter_mut().enumerate() {
                    line.copy_from_slice(&a.row(i0 + r)[j0..j0 + T]);
                }
                for (c, out_row) in dst.chunks_exact_mut(rows).enumerate() {
                    for (o, line) in out_row[i0..i0 + T].iter_mut().zip(&tile) {
                        *o = line[c];
                    }
                }
                i0 += T;
            }
        }
        for i in i0..rows {
            for (out_row, &v) in dst.chunks_exact_mut(rows).zip(&a.row(i)[j0..]) {
                out_row[i] = v;
            }
        }
    }
    Ok(out)
}

/// Householder QR of `w = A^T` (consumed) as `(Q^T, R)` with `diag(R) >= 0`.
pub(crate) fn qr_of_transposed(cpu: &Cpu, mut w: Mat<f32>) -> Result<(Mat<f32>, Mat<f32>)> {
    let (n, m) = (w.rows(), w.cols());
    let k = m.min(n);
    let blocks = factor(cpu, &mut w)?;
    let mut qt = form_qt(cpu, &blocks, m, k)?;
    let mut r = Mat::from_fn(k, n, |i, j| if i <= j { w.at(j, i) } else { 0.0 })?;
    for i in 0..k {
        if r.at(i, i) < 0.0 {
            r.row_mut(i).iter_mut().for_each(|v| *v = -*v);
            qt.row_mut(i).iter_mut().for_each(|v| *v = -*v);
        }
    }
    Ok((qt, r))
}

/// Householder thin QR, blocked: `A = Q R` with `Q` `m x k` orthonormal and `R` `k x n` upper
/// triangular with `diag(R) >= 0` (`k = min(m, n)`); rank-deficient `A` is fine.
///
/// ```
/// use kernels_core::MatRef;
/// use kernels_cpu::{Cpu, linalg::householder_qr};
/// let a = [3.0f32, 1.0, 4.0, 2.0]; // [[3, 1], [4, 2]]
/// let qr = householder_qr(&Cpu::detect(), MatRef::from_slice(&a, 2, 2)?)?;
/// assert!((qr.r.at(0, 0) - 5.0).abs() < 1e-6);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn householder_qr<T: Element>(cpu: &Cpu, a: MatRef<'_, T>) -> Result<Qr<f32>> {
    let (qt, r) = qr_of_transposed(cpu, transposed_checked(cpu, "a", a)?)?;
    Ok(Qr {
        q: transpose(finite_factor("q", qt)?.as_ref())?,
        r: finite_factor("r", r)?,
    })
}

/// CGS2 thin QR of a tall-skinny full-rank `a` (`m >= n`): blocks of 32 columns are
/// orthogonalised against the previous ones by two GEMM passes, then among themselves, twice.
/// A column whose norm falls below [`CGS2_DEPENDENCE_TOLERANCE`] of its original norm is
/// [`Error::Singular`].
///
/// ```
/// use kernels_cpu::prelude::*;
/// let a = [3.0f32, 1.0, 4.0, 2.0, 0.0, 2.0]; // 3 x 2
/// let qr = cgs2(&Cpu::detect(), MatRef::from_slice(&a, 3, 2)?)?;
/// assert!((qr.r.at(0, 0) - 5.0).abs() < 1e-6); // the norm of the first column
/// assert!(Mat::widen(qr.q.as_ref()).orthogonality_error()? < 1e-6);
/// # Ok::<(), Error>(())
/// ```
pub fn cgs2<T: Element>(cpu: &Cpu, a: MatRef<'_, T>) -> Result<Qr<f32>> {
    validate_cgs2(a.shape())?;
    let (m, n) = (a.rows(), a.cols());
    let mut w = transposed_checked(cpu, "a", a)?;
    let original: Vec<f64> = (0..n)
        .map(|j| libm::sqrt(sum_squares_f64(w.row(j))))
        .collect();
    let mut r = Mat::zeros(n, n)?;
    for start in (0..n).step_by(PANEL) {
        let nb = PANEL.min(n - start);
        let (done, rest) = w.as_mut_slice().split_at_mut(start * m);
        let qt_done = MatRef::from_slice(done, start, m)?;
        let mut blk = MatMut::from_slice(&mut rest[..nb * m], nb, m)?;
        if start > 0 {
            for _pass in 0..2 {
                let c = product(cpu, qt_done, Transpose::No, blk.as_ref(), Transpose::Yes)?;
                for i in 0..start {
                    for (rv, cv) in r.row_mut(i)[start..start + nb].iter_mut().zip(c.row(i)) {
                        *rv += cv;
                    }
                }
                gemm(
                    cpu,
                    -1.0,
                    c.as_ref(),
                    Transpose::Yes,
                    qt_done,
                    Transpose::No,
                    1.0,
                    blk.rb_mut(),
                )?;
            }
        }
        cpu.dispatch(Orthonormalise {
            blk: blk.as_mut_slice(),
            m,
            start,
            r: &mut r,
            original: &original,
        })?;
    }
    Ok(Qr {
        q: transpose(finite_factor("q", w)?.as_ref())?,
        r: finite_factor("r", r)?,
    })
}

/// Whether every element is finite.
// PERF: a fold without an early exit vectorises (16 lanes per AVX-512 compare); `any` with its
// per-element branch took a fifth of the projection's time.
#[inline(always)]
pub(crate) fn all_finite(x: &[f32]) -> bool {
    x.iter().fold(true, |ok, v| ok & v.is_finite())
}
