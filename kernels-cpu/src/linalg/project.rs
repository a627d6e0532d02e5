//! The fused projections `X - Q (Q^T X)` and `Q (Q^T X)`, into an output or in place.
//!
//! `X` (`m x n`) is cut into column panels small enough to stay in the last-level cache between
//! two passes, so it is read from memory once and its result written once; `Q^T X` never exists
//! beyond one panel, and the in-place forms need no second copy of `X`.
//!
//! * Up to rank [`STREAMING_MAX_RANK`], each pass is a register-tiled kernel that reads `X` where
//!   it lies (no packing): the coefficients `C = Q^T X_p` accumulate row block by row block in
//!   vector registers, then `X_p -/+ Q C` is formed tile by tile and stored. Every element is a
//!   sum in a fixed order (over rows for `C`, over `Q`'s columns for the result), whatever the
//!   tile, the instruction set's width or the thread split: the results are the same bits for any
//!   thread count on a given instruction set.
//! * Above it the two products have enough arithmetic per element for a packed GEMM to win: each
//!   panel takes two [`gemm_views`] calls (faer's where built).

use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

use kernels_core::backend::validate_projection;
use kernels_core::{DType, Element, Error, Mat, MatMut, MatRef, Result};

use super::qr::all_finite;
use super::{Transpose, View, ViewMut, gemm_views, widen_checked};
use crate::{Cpu, Simd, WithSimd, parallel};

/// The largest rank (columns of `Q`) the streaming kernel takes; above it, two GEMMs per panel.
// PERF: at r = 64 the streaming kernel still beats faer's in-place composition on 4096 x 11008
// (see BENCHMARKS.md); its tiles are not packed, so at larger ranks a packed GEMM's L1 reuse
// of `Q` wins.
pub(crate) const STREAMING_MAX_RANK: usize = 64;

/// Bytes of `X` per panel on the streaming path: a panel of each thread sits in the last-level
/// cache between its two passes.
// PERF: measured on 4096 x 11008 at r = 16, 2 threads (see `panel_columns`).
const STREAMING_PANEL_BYTES: usize = 2 << 20;

/// Rows of `X` per block of the coefficient pass: a block's tile of columns stays in L1 while
/// every group of `Q`'s columns passes over it, and `C`'s tile is loaded and stored once per
/// block.
const ROW_BLOCK: usize = 64;

/// Columns of `X` per panel.
// PERF (GEMM path): measured on 4096 x 11008 at r = 256 (2 threads, the 300 MiB-L3 Xeon): 64-column
// panels that fit L2 took twice as long as 2048-column ones; a narrow panel of a row-major matrix
// touches one page per row (TLB misses, short prefetch streams) and each panel pays a GEMM call's
// packing.
fn panel_columns(m: usize, r: usize) -> usize {
    let bytes = if r <= STREAMING_MAX_RANK {
        STREAMING_PANEL_BYTES
    } else {
        32 << 20
    };
    (bytes / (4 * m.max(1))).clamp(64, 4096) / 64 * 64
}

/// `out = X - Q (Q^T X)`: the part of `X` orthogonal to the columns of `Q` (`m x r`,
/// orthonormal columns, not checked: that costs as much as the projection).
///
/// Fused: `X` is read from memory once and `out` written once (see the module docs). Each element
/// is within the bounds of [`gemm`](crate::linalg::gemm) composed: the coefficients' and then
/// the update's (rounding and gradual underflow). On error `out` is unspecified: a NaN or
/// infinity in `Q` or `X` is [`Error::NonFinite`], and a finite `X` whose coefficients `Q^T X`
/// overflow `f32` (columns near `f32::MAX` in norm) is [`Error::Overflow`], never an infinity in
/// `out`.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let q = [1.0f32, 0.0, 0.0]; // the x axis, 3 x 1
/// let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // 3 x 2
/// let mut out = [0.0f32; 6];
/// let (q, x) = (MatRef::from_slice(&q, 3, 1)?, MatRef::from_slice(&x, 3, 2)?);
/// project_out(&Cpu::detect(), q, x, MatMut::from_slice(&mut out, 3, 2)?)?;
/// assert_eq!(out, [0.0, 0.0, 3.0, 4.0, 5.0, 6.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn project_out<Q: Element, X: Element>(
    cpu: &Cpu,
    q: MatRef<'_, Q>,
    x: MatRef<'_, X>,
    mut out: MatMut<'_, f32>,
) -> Result<()> {
    validate_projection(q.shape(), x.shape(), out.shape())?;
    let source = Source::of(x);
    project(cpu, q, source, &ViewMut::of(&mut out), Keep::Complement)
}

/// `out = Q (Q^T X)`: the part of `X` in the span of the columns of `Q`; fused as
/// [`project_out`].
///
/// ```
/// use kernels_cpu::prelude::*;
/// let q = [1.0f32, 0.0, 0.0]; // the x axis, 3 x 1
/// let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // 3 x 2
/// let mut out = [0.0f32; 6];
/// let (q, x) = (MatRef::from_slice(&q, 3, 1)?, MatRef::from_slice(&x, 3, 2)?);
/// project_onto(&Cpu::detect(), q, x, MatMut::from_slice(&mut out, 3, 2)?)?;
/// assert_eq!(out, [1.0, 2.0, 0.0, 0.0, 0.0, 0.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn project_onto<Q: Element, X: Element>(
    cpu: &Cpu,
    q: MatRef<'_, Q>,
    x: MatRef<'_, X>,
    mut out: MatMut<'_, f32>,
) -> Result<()> {
    validate_projection(q.shape(), x.shape(), out.shape())?;
    let source = Source::of(x);
    project(cpu, q, source, &ViewMut::of(&mut out), Keep::Span)
}

/// `X -= Q (Q^T X)` in place: [`project_out`] without a second matrix the size of `X`, each
/// element rounded as [`project_out`] rounds it (the same bits on the streaming path).
///
/// On error `X` is unspecified (panels before the failing one may be projected): a NaN or
/// infinity in `Q` or `X` is [`Error::NonFinite`], coefficients overflowing `f32` are
/// [`Error::Overflow`].
///
/// ```
/// use kernels_cpu::prelude::*;
/// let q = [1.0f32, 0.0, 0.0]; // the x axis, 3 x 1
/// let mut x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // 3 x 2
/// let q = MatRef::from_slice(&q, 3, 1)?;
/// project_out_in_place(&Cpu::detect(), q, MatMut::from_slice(&mut x, 3, 2)?)?;
/// assert_eq!(x, [0.0, 0.0, 3.0, 4.0, 5.0, 6.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn project_out_in_place<Q: Element>(
    cpu: &Cpu,
    q: MatRef<'_, Q>,
    mut x: MatMut<'_, f32>,
) -> Result<()> {
    validate_projection(q.shape(), x.shape(), x.shape())?;
    let target = ViewMut::of(&mut x);
    project(
        cpu,
        q,
        Source::of_target(&target),
        &target,
        Keep::Complement,
    )
}

/// `X = Q (Q^T X)` in place: [`project_onto`] without a second matrix, with
/// [`project_out_in_place`]'s rounding and errors.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let q = [1.0f32, 0.0, 0.0]; // the x axis, 3 x 1
/// let mut x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // 3 x 2
/// let q = MatRef::from_slice(&q, 3, 1)?;
/// project_onto_in_place(&Cpu::detect(), q, MatMut::from_slice(&mut x, 3, 2)?)?;
/// assert_eq!(x, [1.0, 2.0, 0.0, 0.0, 0.0, 0.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn project_onto_in_place<Q: Element>(
    cpu: &Cpu,
    q: MatRef<'_, Q>,
    mut x: MatMut<'_, f32>,
) -> Result<()> {
    validate_projection(q.shape(), x.shape(), x.shape())?;
    let target = ViewMut::of(&mut x);
    project(cpu, q, Source::of_target(&target), &target, Keep::Span)
}

/// Which part of `X` a projection keeps.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// `X - Q (Q^T X)`.
    Complement,
    /// `Q (Q^T X)`.
    Span,
}

/// `X` as the kernels read it: element `(i, j)` at `ptr + i * rs + j`, `rows x cols`.
#[derive(Clone, Copy)]
struct Source<T> {
    ptr: *const T,
    rows: usize,
    cols: usize,
    rs: usize,
}

// SAFETY: built from a borrow that outlives the projection; threads only read through it.
unsafe impl<T: Sync> Send for Source<T> {}
unsafe impl<T: Sync> Sync for Source<T> {}

impl<T: Element> Source<T> {
    fn of(x: MatRef<'_, T>) -> Self {
        Self {
            ptr: x.as_slice().as_ptr(),
            rows: x.rows(),
            cols: x.cols(),
            rs: x.row_stride(),
        }
    }

    /// `len` elements of row `i` from column `j`.
    ///
    /// # Safety
    /// `i < rows`, `j + len <= cols`, and the borrow the source came from is alive and not
    /// written while the slice lives.
    #[inline(always)]
    unsafe fn chunk(&self, i: usize, j: usize, len: usize) -> &[T] {
        // SAFETY: in bounds, per the caller.
        unsafe { core::slice::from_raw_parts(self.ptr.add(i * self.rs + j), len) }
    }

    /// Columns `cols` of the source.
    fn columns(&self, cols: Range<usize>) -> Self {
        // An empty source has no buffer to offset into (see `ViewMut::columns`).
        let start = if self.rows == 0 { 0 } else { cols.start };
        Self {
            // SAFETY: within (or one past) row 0 of a source with rows, or no offset.
            ptr: unsafe { self.ptr.add(start) },
            cols: cols.len(),
            ..*self
        }
    }

    /// The smallest flat index (in the whole `X` of `total_cols` columns, whose column `offset`
    /// this source starts at) of a non-finite element.
    ///
    /// # Safety
    /// As [`Source::chunk`].
    unsafe fn first_non_finite(&self, offset: usize, total_cols: usize) -> Option<usize> {
        (0..self.rows).find_map(|i| {
            // SAFETY: row `i` holds `cols` elements, per the caller.
            let row = unsafe { self.chunk(i, 0, self.cols) };
            row.iter()
                .position(|v| !v.to_f32().is_finite())
                .map(|j| i * total_cols + offset + j)
        })
    }
}

impl Source<f32> {
    /// The matrix an in-place projection reads and then overwrites.
    fn of_target(target: &ViewMut) -> Self {
        let [rows, cols, rs] = target.layout();
        Self {
            ptr: target.as_ptr(),
            rows,
            cols,
            rs,
        }
    }
}

fn project<Q: Element, X: Element>(
    cpu: &Cpu,
    q: MatRef<'_, Q>,
    x: Source<X>,
    out: &ViewMut,
    keep: Keep,
) -> Result<()> {
    let (m, n, r) = (x.rows, x.cols, q.cols());
    let q = widen_checked("q", q)?;
    let parts = parallel::parts_for(
        cpu.threads(),
        m * n * size_of::<X>(),
        cpu.min_bytes_per_thread(),
    );
    let single = Cpu {
        threads: Some(1),
        ..*cpu
    };
    // Parts start on whole cache lines of `out`'s rows.
    let ranges: Vec<Range<usize>> = parallel::ranges(n, parts, 16).collect();
    let panel = panel_columns(m, r).min(ranges.first().map_or(1, ExactSizeIterator::len));
    let mut first_bad = vec![Ok(None); ranges.len()];
    let items: Vec<_> = ranges.into_iter().zip(first_bad.iter_mut()).collect();
    parallel::for_each(items, |(columns, bad)| {
        let part = Part {
            cpu: &single,
            q: &q,
            x: x.columns(columns.clone()),
            out: out.columns(columns.clone()),
            offset: columns.start,
            total_cols: n,
            keep,
        };
        // SAFETY: `x` and `out` are views of live borrows with validated shapes; each part
        // writes only its own columns of `out` and reads only its own columns of `x` (which
        // are `out`'s in place).
        *bad = unsafe { part.run(panel) };
    });
    // A non-finite `x` anywhere is the error (as in the reference, which checks data first),
    // else the first part's failure.
    let (mut first, mut failure) = (None::<usize>, None);
    for bad in first_bad {
        match bad {
            Ok(Some(index)) => first = Some(first.map_or(index, |f| f.min(index))),
            Ok(None) => {}
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    match (first, failure) {
        (Some(index), _) => Err(Error::NonFinite { what: "x", index }),
        (None, Some(e)) => Err(e),
        (None, None) => Ok(()),
    }
}

/// One thread's columns of a projection.
struct Part<'a, X> {
    cpu: &'a Cpu,
    q: &'a Mat<f32>,
    x: Source<X>,
    out: ViewMut,
    /// The first of these columns in the whole `X`.
    offset: usize,
    total_cols: usize,
    keep: Keep,
}

impl<X: Element> Part<'_, X> {
    /// Projects the part panel by panel; returns the first flat index of a non-finite `x` in
    /// it, if any, having searched all of it before it reports a finite panel's coefficients
    /// overflowing.
    ///
    /// # Safety
    /// `x` and `out` are views of live borrows, `out` written by no one else while this runs and
    /// either overlapping `x` exactly (in place) or not at all.
    unsafe fn run(&self, panel: usize) -> Result<Option<usize>> {
        let (m, n, r) = (self.x.rows, self.x.cols, self.q.cols());
        let streaming = r <= STREAMING_MAX_RANK;
        let mut widened = if streaming || X::DTYPE == DType::F32 {
            Vec::new()
        } else {
            vec![0.0f32; m * panel]
        };
        let mut coefficients = vec![0.0f32; r * panel];
        for p0 in (0..n).step_by(panel) {
            let width = panel.min(n - p0);
            let x = self.x.columns(p0..p0 + width);
            let out = self.out.columns(p0..p0 + width);
            let c = &mut coefficients[..r * width];
            // SAFETY: per the caller; the scratch buffers are this call's own.
            let x_f32 = unsafe {
                if streaming {
                    self.cpu.dispatch(Coefficients {
                        q: self.q.as_slice(),
                        r,
                        x,
                        c: &mut *c,
                    });
                    None
                } else {
                    let x_f32 = f32_view(x, &mut widened);
                    gemm_views(
                        self.cpu,
                        1.0,
                        View::of(self.q.as_ref(), Transpose::No).transposed(),
                        x_f32,
                        0.0,
                        &ViewMut::of_slice(c, r, width),
                    );
                    Some(x_f32)
                }
            };
            // A NaN or infinity in the panel makes its coefficients non-finite (`Q` is finite),
            // so only then is `X` searched; a finite panel's coefficients that are not have
            // overflowed. PERF: scanning every panel up front cost a pass over `X`. With no
            // columns in `Q` there are no coefficients, and the panel itself is checked.
            // SAFETY (both searches): per the caller.
            let finite = if r == 0 {
                unsafe { x.first_non_finite(0, 0) }.is_none()
            } else {
                all_finite(c)
            };
            if !finite {
                let this_part = self.x;
                return match unsafe { this_part.first_non_finite(self.offset, self.total_cols) } {
                    Some(index) => Ok(Some(index)),
                    None => Err(Error::Overflow {
                        what: "the projection's coefficients Q^T X",
                    }),
                };
            }
            // SAFETY: per the caller.
            unsafe {
                match x_f32 {
                    None => self.cpu.dispatch(Update {
                        q: self.q.as_slice(),
                        r,
                        c,
                        x,
                        out: &out,
                        keep: self.keep,
                    }),
                    Some(x_f32) => {
                        let q = View::of(self.q.as_ref(), Transpose::No);
                        let c = View::of(MatRef::from_slice(c, r, width)?, Transpose::No);
                        if self.keep == Keep::Complement {
                            if !core::ptr::eq(x_f32.as_ptr(), out.as_ptr()) {
                                out.copy_from_view(x_f32);
                            }
                            gemm_views(self.cpu, -1.0, q, c, 1.0, &out);
                        } else {
                            gemm_views(self.cpu, 1.0, q, c, 0.0, &out);
                        }
                    }
                }
            }
        }
        Ok(None)
    }
}

/// The panel as an `f32` view: itself, or widened into `scratch` (`rows x cols`, contiguous).
///
/// # Safety
/// As [`Source::chunk`].
unsafe fn f32_view<X: Element>(x: Source<X>, scratch: &mut [f32]) -> View {
    if X::DTYPE == DType::F32 {
        return View::strided(x.ptr.cast(), x.rows, x.cols, x.rs);
    }
    for i in 0..x.rows {
        // SAFETY: per the caller.
        let row = unsafe { x.chunk(i, 0, x.cols) };
        for (o, v) in scratch[i * x.cols..][..x.cols].iter_mut().zip(row) {
            *o = v.to_f32();
        }
    }
    View::strided(scratch.as_ptr(), x.rows, x.cols, x.cols)
}

/// The coefficient pass: `c = Q^T x` (`r x cols`, contiguous), summed over rows in order.
struct Coefficients<'a, X> {
    /// `Q`, `rows x r`, contiguous.
    q: &'a [f32],
    r: usize,
    x: Source<X>,
    c: &'a mut [f32],
}

impl<X: Element> WithSimd for Coefficients<'_, X> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        // PERF: the widest tile whose accumulators, loaded rows and broadcast fit the registers:
        // 8 x 3 vectors of `C` with 32 registers, 4 x 3 with 16.
        // SAFETY: `Coefficients` is built only from views checked by `Part::run`'s caller.
        unsafe {
            if S::REGISTERS >= 32 {
                coefficients::<S, X, 8, 3>(s, self);
            } else {
                coefficients::<S, X, 4, 3>(s, self);
            }
        }
    }
}

/// # Safety
/// `op.x` is readable, `op.q` holds `x.rows` rows of `r` and `op.c` `r` rows of `x.cols`.
#[inline(always)]
unsafe fn coefficients<S: Simd, X: Element, const KT: usize, const NV: usize>(
    s: S,
    op: Coefficients<'_, X>,
) {
    let Coefficients { q, r, x, c } = op;
    let (m, w, l) = (x.rows, x.cols, S::LANES);
    c.fill(0.0);
    for i0 in (0..m).step_by(ROW_BLOCK) {
        let rows = i0..(i0 + ROW_BLOCK).min(m);
        let mut j = 0;
        // SAFETY (every tile): its rows and columns are within `x`, `q` and `c`.
        while j + NV * l <= w {
            unsafe { coefficient_tiles::<S, X, KT, NV>(s, q, x, rows.clone(), j, r, c) };
            j += NV * l;
        }
        while j + l <= w {
            unsafe { coefficient_tiles::<S, X, KT, 1>(s, q, x, rows.clone(), j, r, c) };
            j += l;
        }
        for j in j..w {
            for k in 0..r {
                let mut sum = c[k * w + j];
                for i in rows.clone() {
                    let v = unsafe { x.chunk(i, j, 1)[0].to_f32() };
                    sum = s.mul_add_lane(q[i * r + k], v, sum);
                }
                c[k * w + j] = sum;
            }
        }
    }
}

/// `c[k, j..j + NV L] += sum_i q[i, k] x[i, j..]` for every `k`, `KT` at a time, over `rows`.
///
/// # Safety
/// As [`coefficients`], with `j + NV L <= x.cols`.
#[inline(always)]
unsafe fn coefficient_tiles<S: Simd, X: Element, const KT: usize, const NV: usize>(
    s: S,
    q: &[f32],
    x: Source<X>,
    rows: Range<usize>,
    j: usize,
    r: usize,
    c: &mut [f32],
) {
    let mut k0 = 0;
    while k0 < r {
        // The last group takes the remainder one column of `Q` at a time.
        if k0 + KT <= r {
            // SAFETY: per the caller.
            unsafe { coefficient_tile::<S, X, KT, NV>(s, q, x, rows.clone(), j, r, k0, c) };
            k0 += KT;
        } else {
            // SAFETY: per the caller.
            unsafe { coefficient_tile::<S, X, 1, NV>(s, q, x, rows.clone(), j, r, k0, c) };
            k0 += 1;
        }
    }
}

/// One `KT x NV` vector tile of `c`, held in registers over `rows`.
///
/// # Safety
/// As [`coefficient_tiles`], with `k0 + KT <= r`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn coefficient_tile<S: Simd, X: Element, const KT: usize, const NV: usize>(
    s: S,
    q: &[f32],
    x: Source<X>,
    rows: Range<usize>,
    j: usize,
    r: usize,
    k0: usize,
    c: &mut [f32],
) {
    let (w, l) = (x.cols, S::LANES);
    let mut acc = [[s.zero(); NV]; KT];
    for (kk, acc) in acc.iter_mut().enumerate() {
        for (v, acc) in acc.iter_mut().enumerate() {
            *acc = s.load(&c[(k0 + kk) * w + j + v * l..][..l]);
        }
    }
    for i in rows {
        // SAFETY: row `i` and columns `j..j + NV L` are within `x`, per the caller.
        let xs: [S::F32; NV] =
            core::array::from_fn(|v| s.load(unsafe { x.chunk(i, j + v * l, l) }));
        let qi = &q[i * r + k0..][..KT];
        for (acc, &qk) in acc.iter_mut().zip(qi) {
            let qk = s.splat(qk);
            for (acc, &xv) in acc.iter_mut().zip(&xs) {
                *acc = s.mul_add(qk, xv, *acc);
            }
        }
    }
    for (kk, acc) in acc.iter().enumerate() {
        for (v, &acc) in acc.iter().enumerate() {
            s.store(acc, &mut c[(k0 + kk) * w + j + v * l..][..l]);
        }
    }
}

/// The update pass: `out = x - Q c` or `out = Q c`, each element summed over `Q`'s columns in
/// order (from `x`'s element, or from zero).
struct Update<'a, X> {
    /// `Q`, `rows x r`, contiguous.
    q: &'a [f32],
    r: usize,
    c: &'a [f32],
    x: Source<X>,
    out: &'a ViewMut,
    keep: Keep,
}

impl<X: Element> WithSimd for Update<'_, X> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        // PERF: as `Coefficients`: 8 rows x 3 vectors with 32 registers, 4 x 3 with 16.
        // SAFETY: `Update` is built only from views checked by `Part::run`'s caller.
        unsafe {
            if S::REGISTERS >= 32 {
                update::<S, X, 8, 3>(s, &self);
            } else {
                update::<S, X, 4, 3>(s, &self);
            }
        }
    }
}

/// # Safety
/// As [`Part::run`], for one panel.
#[inline(always)]
unsafe fn update<S: Simd, X: Element, const RT: usize, const NV: usize>(s: S, op: &Update<'_, X>) {
    let m = op.x.rows;
    let mut i = 0;
    // SAFETY (both): the rows are within the panel.
    while i + RT <= m {
        unsafe { update_rows::<S, X, RT, NV>(s, op, i) };
        i += RT;
    }
    while i < m {
        unsafe { update_rows::<S, X, 1, NV>(s, op, i) };
        i += 1;
    }
}

/// Rows `i0..i0 + RT` of the update, across the panel.
///
/// # Safety
/// As [`update`], with `i0 + RT <= rows`.
#[inline(always)]
unsafe fn update_rows<S: Simd, X: Element, const RT: usize, const NV: usize>(
    s: S,
    op: &Update<'_, X>,
    i0: usize,
) {
    let (w, l, r) = (op.x.cols, S::LANES, op.r);
    let sign = match op.keep {
        Keep::Complement => -1.0f32,
        Keep::Span => 1.0,
    };
    // `-q` is exact: the sum is `x - q_0 c_0 - q_1 c_1 ...`, each step one fused multiply-add.
    let mut qs = [[0.0f32; STREAMING_MAX_RANK]; RT];
    for (rr, qs) in qs.iter_mut().enumerate() {
        for (o, &v) in qs.iter_mut().zip(&op.q[(i0 + rr) * r..][..r]) {
            *o = sign * v;
        }
    }
    let mut j = 0;
    // SAFETY (every tile): within the panel, per the caller.
    while j + NV * l <= w {
        unsafe { update_tile::<S, X, RT, NV>(s, op, &qs, r, i0, j) };
        j += NV * l;
    }
    while j + l <= w {
        unsafe { update_tile::<S, X, RT, 1>(s, op, &qs, r, i0, j) };
        j += l;
    }
    for j in j..w {
        for (rr, qs) in qs.iter().enumerate() {
            let mut sum = match op.keep {
                // SAFETY: within the panel, per the caller.
                Keep::Complement => unsafe { op.x.chunk(i0 + rr, j, 1)[0].to_f32() },
                Keep::Span => 0.0,
            };
            for (k, &qk) in qs[..r].iter().enumerate() {
                sum = s.mul_add_lane(qk, op.c[k * w + j], sum);
            }
            unsafe { op.out.row_mut(i0 + rr, j, 1)[0] = sum };
        }
    }
}

/// One `RT x NV` vector tile of the output, held in registers over `Q`'s columns.
///
/// # Safety
/// As [`update_rows`], with `j + NV L <= cols`.
#[inline(always)]
unsafe fn update_tile<S: Simd, X: Element, const RT: usize, const NV: usize>(
    s: S,
    op: &Update<'_, X>,
    qs: &[[f32; STREAMING_MAX_RANK]; RT],
    r: usize,
    i0: usize,
    j: usize,
) {
    let (w, l) = (op.x.cols, S::LANES);
    let mut acc = [[s.zero(); NV]; RT];
    if op.keep == Keep::Complement {
        for (rr, acc) in acc.iter_mut().enumerate() {
            for (v, acc) in acc.iter_mut().enumerate() {
                // SAFETY: within the panel, per the caller.
                *acc = s.load(unsafe { op.x.chunk(i0 + rr, j + v * l, l) });
            }
        }
    }
    for k in 0..r {
        let cs: [S::F32; NV] = core::array::from_fn(|v| s.load(&op.c[k * w + j + v * l..][..l]));
        for (acc, qs) in acc.iter_mut().zip(qs) {
            let qk = s.splat(qs[k]);
            for (acc, &cv) in acc.iter_mut().zip(&cs) {
                *acc = s.mul_add(qk, cv, *acc);
            }
        }
    }
    for (rr, acc) in acc.iter().enumerate() {
        for (v, &acc) in acc.iter().enumerate() {
            // SAFETY: within the panel, which no one else writes, per the caller; the element's
            // source (in place, the same element) was read above.
            s.store(acc, unsafe { op.out.row_mut(i0 + rr, j + v * l, l) });
        }
    }
}
