//! Dense linear algebra on `f32`: what OPCM continual merging, LoRA extraction, Twin-Merging and
//! EVA need. Each routine implements a contract of `kernels_core::ops::{project, lowrank}` and is
//! tested against its `f64` reference.
//!
//! | routine | contract | how |
//! |---|---|---|
//! | [`gemm`] | `C = alpha op(A) op(B) + beta C` | faer's GEMM under `std`, a portable SIMD kernel otherwise |
//! | [`householder_qr`] | thin `A = Q R`, `diag(R) >= 0` | blocked Householder (compact WY), trailing updates by GEMM |
//! | [`cgs2`] | the same for tall-skinny full-rank `A` | block classical Gram-Schmidt, twice |
//! | [`project_out`], [`project_onto`] (and `_in_place`) | `X - Q (Q^T X)`, `Q (Q^T X)` | column panels of `X`, each read from memory once: a register-tiled streaming kernel up to rank 64, two GEMMs above |
//! | [`lu`], [`ldu`] | `P A = L U`, `P A = L D U1` | blocked right-looking LU with partial pivoting |
//! | [`thin_svd`] | `A = U diag(s) V^T` | Householder QR, then one-sided Jacobi on `R^T` |
//! | [`randomized_svd`] | rank-`r` truncated SVD | range finder, power iterations re-orthonormalised by QR |
//! | [`symmetric_eigen`] | `S = V diag(w) V^T` | cyclic Jacobi, for Gram-sized matrices |
//! | [`lora_extract`], [`lora_extract_randomized`] | `delta ~ B A` | thin SVD with a [`LoraRank`] rule, or randomized SVD at a fixed rank |
//! | [`opcm_project`] | the OPCM step | four GEMMs |
//! | [`StreamingSvd`] | truncated SVD / PCA of rows seen in minibatches | incremental SVD keeping rank-`r` state |
//!
//! # Precision
//!
//! Arithmetic is `f32` (inputs in f16 or bf16 are widened). Factorisations are backward stable:
//! the reconstruction error relative to `||A||_F`, the orthogonality `||Q^T Q - I||_2` and the
//! singular-value error relative to `s_max` are bounded by [`F32_FACTORISATION_TOLERANCE`]
//! `* eps * sqrt(max(m, n))` (LU: times `sqrt(min(m, n))` of pivot growth), and the tests check
//! that bound on random, rank-deficient, zero and ill-conditioned (condition `1e6`) matrices.
//!
//! # Errors
//!
//! Shape mismatches are [`Error::ShapeMismatch`]; NaN or infinity in an input is
//! [`Error::NonFinite`]; an iteration that does not meet its criterion within its bound is
//! [`Error::NotConverged`]; LDU's small pivots and CGS2's dependent columns are
//! [`Error::Singular`].
//!
//! # Determinism
//!
//! Same inputs, same bits for a given [`Cpu`] (instruction set, thread count and GEMM backend).
//! faer's threaded GEMM and the block-parallel Jacobi sweeps round differently for a different
//! thread count, so unlike the memory-bound kernels these results are not promised identical
//! across thread counts.

mod gemm;
mod lu;
mod project;
mod qr;
mod svd;

pub use gemm::{GemmBackend, Transpose, gemm};
pub use kernels_core::ops::lowrank::{
    F32_FACTORISATION_TOLERANCE, Ldu, Lora, LoraRank, Lu, LuParams, MAX_JACOBI_SWEEPS, OpcmParams,
    RsvdParams, Svd, SvdRef, SymmetricEigen, factorisation_tolerance,
};
pub use kernels_core::ops::project::Qr;
pub use lu::{ldu, lu};
pub use project::{project_onto, project_onto_in_place, project_out, project_out_in_place};
pub use qr::{CGS2_DEPENDENCE_TOLERANCE, cgs2, householder_qr};
pub use svd::{
    Centering, StreamingSvd, lora_extract, lora_extract_randomized, opcm_project, randomized_svd,
    symmetric_eigen, thin_svd,
};

use kernels_core::{DType, Element, Error, Mat, MatMut, MatRef, Result};

use crate::Cpu;
use crate::simd::{Simd, WithSimd};
use gemm::{View, ViewMut, gemm_views};

/// `a` widened to an owned `f32` matrix; NaN or infinity is [`Error::NonFinite`] (flat index).
/// `m` itself if every element is finite, else [`Error::Overflow`] naming it: a factor of finite
/// input that is not finite overflowed `f32` (its columns' norms exceed `f32::MAX`).
pub(crate) fn finite_factor(what: &'static str, m: Mat<f32>) -> Result<Mat<f32>> {
    if qr::all_finite(m.as_slice()) {
        Ok(m)
    } else {
        Err(Error::Overflow { what })
    }
}

pub(crate) fn widen_checked<T: Element>(what: &'static str, a: MatRef<'_, T>) -> Result<Mat<f32>> {
    let mut out = Mat::zeros(a.rows(), a.cols())?;
    for (i, row) in a.row_iter().enumerate() {
        for (j, (o, &v)) in out.row_mut(i).iter_mut().zip(row).enumerate() {
            *o = v.to_f32();
            if !o.is_finite() {
                return Err(Error::NonFinite {
                    what,
                    index: i * a.cols() + j,
                });
            }
        }
    }
    Ok(out)
}

/// An `f32` operand: borrowed when the input already is `f32`, widened otherwise.
pub(crate) enum F32Operand<'a> {
    Borrowed(MatRef<'a, f32>),
    Owned(Mat<f32>),
}

impl F32Operand<'_> {
    pub(crate) fn view(&self) -> MatRef<'_, f32> {
        match self {
            Self::Borrowed(view) => *view,
            Self::Owned(mat) => mat.as_ref(),
        }
    }
}

/// The factorisations work on matrices whose largest magnitude lies in `[2^-40, 2^40]`: below,
/// rounding noise reaches the subnormals and loses its precision (Jacobi would not converge);
/// above, the products of the range finder overflow. A matrix outside is scaled by a power of
/// two (exact) to a largest magnitude in `[0.5, 1)`, and its singular values scaled back.
const SAFE_EXPONENT: i32 = 40;

/// The largest magnitude of finite values (a fold without NaN handling, which vectorises).
#[inline(always)]
pub(crate) fn largest_magnitude(row: &[f32], so_far: f32) -> f32 {
    row.iter()
        .fold(so_far, |m, v| if v.abs() > m { v.abs() } else { m })
}

/// The exponent `e` to scale a matrix whose largest magnitude is `largest` by `2^-e` (see
/// [`SAFE_EXPONENT`]), where it needs scaling.
pub(crate) fn rescaling(largest: f32) -> Option<i32> {
    let (_, e) = libm::frexpf(largest);
    (largest > 0.0 && !(-SAFE_EXPONENT..=SAFE_EXPONENT).contains(&e)).then_some(e)
}

/// `a * 2^-e`, a new matrix.
pub(crate) fn scaled(a: MatRef<'_, f32>, e: i32) -> Result<Mat<f32>> {
    Mat::from_fn(a.rows(), a.cols(), |i, j| libm::scalbnf(a.at(i, j), -e))
}

/// Singular values `s * 2^e` of a matrix scaled by `2^-e`; [`Error::Overflow`] where they
/// exceed `f32` (their matrix's norm does).
pub(crate) fn unscale_singular_values(s: &mut [f32], e: i32) -> Result<()> {
    for v in s.iter_mut() {
        *v = libm::scalbnf(*v, e);
        if !v.is_finite() {
            return Err(Error::Overflow {
                what: "singular values",
            });
        }
    }
    Ok(())
}

/// `a` as `f32` without a copy where it already is `f32`, checked as [`widen_checked`], and its
/// largest magnitude (found in the same pass).
// PERF: a randomized SVD of a 4096 x 4096 f32 matrix spent a tenth of its time copying it (and
// faulting in the copy's pages).
pub(crate) fn as_f32_checked<'a, T: Element>(
    cpu: &Cpu,
    what: &'static str,
    a: MatRef<'a, T>,
) -> Result<(F32Operand<'a>, f32)> {
    if T::DTYPE != DType::F32 {
        let owned = widen_checked(what, a)?;
        let largest = largest_magnitude(owned.as_slice(), 0.0);
        return Ok((F32Operand::Owned(owned), largest));
    }
    let view = MatRef::new(
        bytemuck::cast_slice(a.as_slice()),
        a.rows(),
        a.cols(),
        a.row_stride(),
    )?;
    // PERF: threaded over row ranges and dispatched (it ran on one thread as the baseline's
    // SSE2): the pass reads the whole matrix, as each of the randomized SVD's products does.
    let mut parts = alloc::vec![(None, 0.0f32); view.rows()];
    crate::parallel::split_outputs(cpu, &mut parts, 4 * view.cols(), 1, |rows, part| {
        cpu.dispatch(CheckRows {
            view,
            rows,
            out: part,
        });
    });
    let mut largest = 0.0f32;
    for (i, &(bad, row_largest)) in parts.iter().enumerate() {
        if let Some(j) = bad {
            return Err(Error::NonFinite {
                what,
                index: i * a.cols() + j,
            });
        }
        largest = largest.max(row_largest);
    }
    Ok((F32Operand::Borrowed(view), largest))
}

/// For each row of `rows`, the first non-finite entry's column (if any) and the largest
/// magnitude.
struct CheckRows<'a, 'b> {
    view: MatRef<'a, f32>,
    rows: core::ops::Range<usize>,
    out: &'b mut [(Option<usize>, f32)],
}

impl WithSimd for CheckRows<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        for (i, o) in self.rows.zip(self.out) {
            let row = self.view.row(i);
            // PERF: sixteen running maxima, compared as `>` (one `max` instruction a vector).
            // A NaN fails every comparison and an infinity is beyond `f32::MAX`, so the row
            // is finite exactly when its largest magnitude is at most `f32::MAX`.
            let mut largest = [0.0f32; 16];
            let chunks = row.chunks_exact(16);
            let mut tail = 0.0f32;
            let mut nan = false;
            for &v in chunks.remainder() {
                nan |= v.is_nan();
                tail = if v.abs() > tail { v.abs() } else { tail };
            }
            for chunk in chunks {
                for (m, &v) in largest.iter_mut().zip(chunk) {
                    nan |= v.is_nan();
                    *m = if v.abs() > *m { v.abs() } else { *m };
                }
            }
            let row_largest = largest_magnitude(&largest, tail);
            *o = if !nan && row_largest <= f32::MAX {
                (None, row_largest)
            } else {
                (row.iter().position(|v| !v.is_finite()), 0.0)
            };
        }
    }
}

/// `a^T` widened to `f32`, checked as [`widen_checked`].
pub(crate) fn transposed_checked<T: Element>(
    cpu: &Cpu,
    what: &'static str,
    a: MatRef<'_, T>,
) -> Result<Mat<f32>> {
    let (a, _) = as_f32_checked(cpu, what, a)?;
    qr::transpose(a.view())
}

/// `op(a) op(b)` as a new matrix.
pub(crate) fn product(
    cpu: &Cpu,
    a: MatRef<'_, f32>,
    a_op: Transpose,
    b: MatRef<'_, f32>,
    b_op: Transpose,
) -> Result<Mat<f32>> {
    let rows = if a_op == Transpose::No {
        a.rows()
    } else {
        a.cols()
    };
    let cols = if b_op == Transpose::No {
        b.cols()
    } else {
        b.rows()
    };
    let mut c = Mat::zeros(rows, cols)?;
    gemm(cpu, 1.0, a, a_op, b, b_op, 0.0, c.as_mut())?;
    Ok(c)
}

/// The `rows x cols` block of `a` at `(row, col)`, mutably; callers pass blocks inside `a`.
pub(crate) fn block_mut(
    a: &mut Mat<f32>,
    row: usize,
    col: usize,
    rows: usize,
    cols: usize,
) -> MatMut<'_, f32> {
    // Unreachable from input: callers pass blocks of the factorisation's own working matrix.
    a.as_mut()
        .submatrix_mut(row, col, rows, cols)
        .expect("block inside the matrix")
}
