//! `C = alpha op(A) op(B) + beta C` on `f32`: the product every factorisation here is built on.
//!
//! Two backends sit behind one entry point, chosen by [`Cpu::gemm_backend`]:
//!
//! * [`GemmBackend::Auto`] (the default) runs faer's GEMM where it is built (the `std` feature,
//!   any target but wasm32): AVX-512 and AVX2 micro-kernels with packing and threading that no
//!   kernel here beat. Elsewhere it is the portable kernel.
//! * [`GemmBackend::Portable`] is this crate's kernel, generic over [`Simd`]: a `4 x 2` vector
//!   register tile over packed panels. It needs only `alloc`, runs on one thread and is what a
//!   `no_std` build uses.
//!
//! Both compute every output element as a sum over `k` in blocks: each agrees with the exact
//! product within the classical `|c - c_exact| <= k eps sum_p |a_ip b_pj|` (times a small
//! constant, which the tests name), not bit for bit with each other.

use alloc::vec;

use kernels_core::backend::{try_vec, validate_gemm};
use kernels_core::{MatMut, MatRef, Result};

use crate::{Cpu, Simd, WithSimd};

pub use kernels_core::ops::project::Transpose;

/// Which GEMM the linear-algebra kernels call (see [`gemm`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GemmBackend {
    /// faer's GEMM where this build has it, the portable kernel elsewhere.
    #[default]
    Auto,
    /// This crate's SIMD kernel, on one thread.
    Portable,
}

/// A strided read-only operand: element `(i, j)` is at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct View {
    ptr: *const f32,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// A strided output.
pub(crate) struct ViewMut {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    rs: usize,
}

// SAFETY: views are built from borrows that outlive every call made with them; the output views
// handed to different threads cover disjoint elements (see `linalg::project`).
unsafe impl Send for View {}
unsafe impl Sync for View {}
unsafe impl Send for ViewMut {}
unsafe impl Sync for ViewMut {}

impl View {
    pub(crate) fn of(m: MatRef<'_, f32>, op: Transpose) -> Self {
        let (rows, cols, rs, cs) = match op {
            Transpose::No => (m.rows(), m.cols(), m.row_stride(), 1),
            Transpose::Yes => (m.cols(), m.rows(), 1, m.row_stride()),
        };
        Self {
            ptr: m.as_slice().as_ptr(),
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// Row-major elements at `ptr + i * rs + j`.
    pub(crate) fn strided(ptr: *const f32, rows: usize, cols: usize, rs: usize) -> Self {
        Self {
            ptr,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// Where element `(0, 0)` is.
    pub(crate) fn as_ptr(&self) -> *const f32 {
        self.ptr
    }

    /// The transposed operand.
    pub(crate) fn transposed(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Element `(i, j)`.
    ///
    /// # Safety
    /// `i < rows`, `j < cols`, and the borrow the view came from is alive.
    #[inline(always)]
    unsafe fn at(&self, i: usize, j: usize) -> f32 {
        // SAFETY: in bounds of the validated view, per the caller.
        unsafe { *self.ptr.add(i * self.rs + j * self.cs) }
    }
}

impl ViewMut {
    pub(crate) fn of(m: &mut MatMut<'_, f32>) -> Self {
        Self {
            ptr: m.as_mut_slice().as_mut_ptr(),
            rows: m.rows(),
            cols: m.cols(),
            rs: m.row_stride(),
        }
    }

    /// A contiguous `rows x cols` buffer as a view.
    pub(crate) fn of_slice(buffer: &mut [f32], rows: usize, cols: usize) -> Self {
        debug_assert!(buffer.len() >= rows * cols);
        Self {
            ptr: buffer.as_mut_ptr(),
            rows,
            cols,
            rs: cols,
        }
    }

    /// Where element `(0, 0)` is.
    pub(crate) fn as_ptr(&self) -> *const f32 {
        self.ptr
    }

    /// `[rows, cols, row stride]`.
    pub(crate) fn layout(&self) -> [usize; 3] {
        [self.rows, self.cols, self.rs]
    }

    /// `len` elements of row `i` from column `j`.
    ///
    /// # Safety
    /// `i < rows`, `j + len <= cols`, the borrow the view came from is alive, and nothing else
    /// reads or writes these elements while the slice lives.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn row_mut(&self, i: usize, j: usize, len: usize) -> &mut [f32] {
        // SAFETY: in bounds and unshared, per the caller.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.add(i * self.rs + j), len) }
    }

    /// Runs `f` on each row of the view.
    ///
    /// # Safety
    /// The view is in bounds of a live borrow.
    unsafe fn for_each_row(&self, mut f: impl FnMut(usize, &mut [f32])) {
        for i in 0..self.rows {
            // SAFETY: row `i` of the view holds `cols` elements, per the caller.
            f(i, unsafe {
                core::slice::from_raw_parts_mut(self.ptr.add(i * self.rs), self.cols)
            });
        }
    }

    /// `c = beta c`, with `beta == 0` writing zeros without reading (BLAS's convention).
    ///
    /// # Safety
    /// The view is in bounds of a live borrow.
    pub(crate) unsafe fn scale(&self, beta: f32) {
        // SAFETY: forwarded from the caller.
        unsafe {
            self.for_each_row(|_, row| {
                if beta == 0.0 {
                    row.fill(0.0);
                } else {
                    for v in row.iter_mut() {
                        *v *= beta;
                    }
                }
            });
        }
    }

    /// Copies `src` (of the view's shape) into the view.
    ///
    /// # Safety
    /// Both views are in bounds of live borrows that do not overlap.
    pub(crate) unsafe fn copy_from_view(&self, src: View) {
        debug_assert_eq!([src.rows, src.cols, src.cs], [self.rows, self.cols, 1]);
        for i in 0..self.rows {
            // SAFETY: row `i` of both views holds `cols` elements, per the caller.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    src.ptr.add(i * src.rs),
                    self.ptr.add(i * self.rs),
                    self.cols,
                );
            };
        }
    }

    /// Columns `cols` of the view (within its column count).
    pub(crate) fn columns(&self, cols: core::ops::Range<usize>) -> Self {
        debug_assert!(cols.end <= self.cols);
        // A view without rows has no buffer to offset into (an empty view's is empty, found by
        // Miri on a 0 x 5000 projection); its columns are as empty.
        let start = if self.rows == 0 {
            0
        } else {
            cols.start.min(self.cols)
        };
        Self {
            // SAFETY: the view has rows and `start <= self.cols`, so the pointer stays in (or one
            // past) row 0; or the offset is 0.
            ptr: unsafe { self.ptr.add(start) },
            rows: self.rows,
            cols: cols.len(),
            rs: self.rs,
        }
    }
}

/// `c = alpha op(a) op(b) + beta c`. With `beta == 0` the old `c` is not read (a NaN there does
/// not propagate), as in BLAS. NaN and infinity in `a` or `b` propagate as IEEE arithmetic does.
///
/// Runs on [`Cpu::gemm_backend`]: faer's GEMM by default where this build has it (`std`, not
/// wasm32), else this crate's portable SIMD kernel (one thread, `alloc` only). On both, the
/// unscaled `op(a) op(b)` is formed in `f32` and `alpha` scales it: each element is within
/// `4 (k + 3) u (|alpha| sum_p |a_ip b_pj| + |beta c_ij|) + (|alpha| k + 2) 2^-149` of the exact
/// result (`u = 2^-24`; the last term is gradual underflow's) while `sum_p |a_ip b_pj|` stays
/// within `f32`'s range. An `alpha` other than `±1` with a nonzero `beta` on faer's backend costs
/// a scratch copy of `c` (faer would fold `alpha` into an operand, which can overflow or underflow
/// where the scaled product does not), so it can fail with [`kernels_core::Error::OutOfMemory`].
///
/// ```
/// use kernels_core::{MatMut, MatRef};
/// use kernels_cpu::{Cpu, linalg::{Transpose, gemm}};
/// let a = [1.0f32, 2.0, 3.0, 4.0]; // [[1, 2], [3, 4]]
/// let mut c = [0.0f32; 4];
/// let a = MatRef::from_slice(&a, 2, 2)?;
/// gemm(&Cpu::detect(), 1.0, a, Transpose::Yes, a, Transpose::No, 0.0,
///      MatMut::from_slice(&mut c, 2, 2)?)?;
/// assert_eq!(c, [10.0, 14.0, 14.0, 20.0]); // A^T A
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn gemm(
    cpu: &Cpu,
    alpha: f32,
    a: MatRef<'_, f32>,
    a_op: Transpose,
    b: MatRef<'_, f32>,
    b_op: Transpose,
    beta: f32,
    mut c: MatMut<'_, f32>,
) -> Result<()> {
    validate_gemm(alpha, a.shape(), a_op, b.shape(), b_op, beta, c.shape())?;
    let (a, b) = (View::of(a, a_op), View::of(b, b_op));
    let c = ViewMut::of(&mut c);
    if runs_faer(cpu) && alpha.abs() != 1.0 && beta != 0.0 {
        let len = c.rows * c.cols;
        let mut scaled_product = try_vec("gemm's scaled product", len)?;
        scaled_product.resize(len, 0.0f32);
        let scratch = ViewMut {
            ptr: scaled_product.as_mut_ptr(),
            rows: c.rows,
            cols: c.cols,
            rs: c.cols,
        };
        // SAFETY: the views come from live borrows with validated shapes; `c` is a unique
        // borrow and `scratch` a fresh buffer of its shape, so neither overlaps `a` or `b`.
        unsafe {
            gemm_views(cpu, alpha, a, b, 0.0, &scratch);
            c.for_each_row(|i, row| {
                for (v, p) in row.iter_mut().zip(&scaled_product[i * c.cols..]) {
                    *v = beta * *v + p;
                }
            });
        }
    } else {
        // SAFETY: as above.
        unsafe { gemm_views(cpu, alpha, a, b, beta, &c) };
    }
    Ok(())
}

/// Whether [`gemm_views`] runs faer's GEMM on `cpu`.
fn runs_faer(cpu: &Cpu) -> bool {
    cfg!(all(feature = "std", not(target_arch = "wasm32")))
        && cpu.gemm_backend() == GemmBackend::Auto
}

/// [`gemm`] on validated views. On faer's backend, an `alpha` other than `±1` needs `beta == 0`
/// (see [`gemm`] for why and how the public entry point meets it).
///
/// # Safety
/// Every view is in bounds of a live borrow, shapes agree (`c` is `a.rows x b.cols`,
/// `a.cols == b.rows`) and `c` overlaps neither `a` nor `b`.
pub(crate) unsafe fn gemm_views(cpu: &Cpu, alpha: f32, a: View, b: View, beta: f32, c: &ViewMut) {
    #[cfg(all(feature = "std", not(target_arch = "wasm32")))]
    if runs_faer(cpu) {
        // SAFETY: forwarded from the caller.
        unsafe { faer_gemm(cpu.threads(), alpha, a, b, beta, c) };
        return;
    }
    cpu.dispatch(Portable {
        alpha,
        a,
        b,
        beta,
        c,
    });
}

#[cfg(all(feature = "std", not(target_arch = "wasm32")))]
unsafe fn faer_gemm(threads: usize, alpha: f32, a: View, b: View, beta: f32, c: &ViewMut) {
    use faer::{Accum, Par};
    // PERF: below about 2^21 multiply-adds, waking a second thread costs more than it saves
    // (a parked rayon worker takes 75 to 90 us to wake; 2^18 made a 4096 x 16 QR 1.4x slower
    // on 2 threads than on one).
    let par = if threads > 1 && a.rows * a.cols * b.cols >= 1 << 21 {
        Par::rayon(threads)
    } else {
        Par::Seq
    };
    // faer folds `alpha` into an operand, exact only for ±1; any other scales the product after.
    let folded = if alpha.abs() == 1.0 { alpha } else { 1.0 };
    debug_assert!(folded == alpha || beta == 0.0, "see gemm_views");
    // SAFETY: faer reads and writes exactly the elements the validated views describe.
    unsafe {
        let lhs = faer::MatRef::from_raw_parts(a.ptr, a.rows, a.cols, a.rs as isize, a.cs as isize);
        let rhs = faer::MatRef::from_raw_parts(b.ptr, b.rows, b.cols, b.rs as isize, b.cs as isize);
        let accum = if beta == 0.0 {
            Accum::Replace
        } else {
            if beta != 1.0 {
                c.scale(beta);
            }
            Accum::Add
        };
        let dst = faer::MatMut::from_raw_parts_mut(c.ptr, c.rows, c.cols, c.rs as isize, 1);
        faer::linalg::matmul::matmul(dst, accum, lhs, rhs, folded, par);
        if folded != alpha {
            // Not `scale`: `alpha == 0` must still turn an infinite product into NaN.
            c.for_each_row(|_, row| row.iter_mut().for_each(|v| *v *= alpha));
        }
    }
}

/// The portable kernel (see the module docs).
struct Portable<'c> {
    alpha: f32,
    a: View,
    b: View,
    beta: f32,
    c: &'c ViewMut,
}

/// Rows of the register tile.
const TILE_ROWS: usize = 4;
/// Depth of a packed panel: `KC` rows of `B` stay in L1/L2 while a row block of `A` streams.
const KC: usize = 256;
/// Columns of `B` packed at once.
const NC: usize = 512;

impl WithSimd for Portable<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let Self {
            alpha,
            a,
            b,
            beta,
            c,
        } = self;
        let (m, k, n) = (a.rows, a.cols, b.cols);
        // SAFETY (here and below): indices stay within the validated shapes.
        unsafe { c.scale(beta) };
        if k == 0 || m == 0 || n == 0 {
            return;
        }
        let tile_cols = 2 * S::LANES;
        let panel_cols = NC.min(n).div_ceil(tile_cols) * tile_cols;
        let mut b_pack = vec![0.0f32; KC * panel_cols];
        let mut a_pack = [0.0f32; TILE_ROWS * KC];
        let mut tile = [0.0f32; TILE_ROWS * 32];
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            let tiles = nc.div_ceil(tile_cols);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                // Pack B[pc.., jc..] tile by tile: tile t holds `kc` rows of `tile_cols` floats.
                for t in 0..tiles {
                    let packed = &mut b_pack[t * kc * tile_cols..][..kc * tile_cols];
                    for (p, row) in packed.chunks_exact_mut(tile_cols).enumerate() {
                        for (jj, v) in row.iter_mut().enumerate() {
                            let j = jc + t * tile_cols + jj;
                            *v = if j < jc + nc {
                                unsafe { b.at(pc + p, j) }
                            } else {
                                0.0
                            };
                        }
                    }
                }
                for ic in (0..m).step_by(TILE_ROWS) {
                    let mr = TILE_ROWS.min(m - ic);
                    for p in 0..kc {
                        for r in 0..TILE_ROWS {
                            a_pack[p * TILE_ROWS + r] = if r < mr {
                                unsafe { a.at(ic + r, pc + p) }
                            } else {
                                0.0
                            };
                        }
                    }
                    for t in 0..tiles {
                        let packed = &b_pack[t * kc * tile_cols..][..kc * tile_cols];
                        micro_kernel(s, &a_pack[..kc * TILE_ROWS], packed, &mut tile);
                        let j0 = jc + t * tile_cols;
                        let width = tile_cols.min(jc + nc - j0);
                        for r in 0..mr {
                            for jj in 0..width {
                                unsafe {
                                    *c.ptr.add((ic + r) * c.rs + j0 + jj) +=
                                        alpha * tile[r * tile_cols + jj];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `tile[r][j] = sum_p a_pack[p][r] * b_pack[p][j]` over a `TILE_ROWS x 2 LANES` tile.
// PERF: inlined into the dispatched body so the eight accumulators live in vector registers
// under its target features.
#[inline(always)]
fn micro_kernel<S: Simd>(s: S, a_pack: &[f32], b_pack: &[f32], tile: &mut [f32]) {
    let lanes = S::LANES;
    let mut acc = [[s.zero(); 2]; TILE_ROWS];
    for (a, b) in a_pack
        .chunks_exact(TILE_ROWS)
        .zip(b_pack.chunks_exact(2 * lanes))
    {
        let (b0, b1) = (s.load(&b[..lanes]), s.load(&b[lanes..]));
        for (r, acc) in acc.iter_mut().enumerate() {
            let ar = s.splat(a[r]);
            acc[0] = s.mul_add(ar, b0, acc[0]);
            acc[1] = s.mul_add(ar, b1, acc[1]);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        s.store(acc[0], &mut tile[2 * r * lanes..][..lanes]);
        s.store(acc[1], &mut tile[(2 * r + 1) * lanes..][..lanes]);
    }
}
