//! Dense, sparse-input and gathered-output GEMV: the fast twins of `kernels_core::ops::sparse`.
//!
//! # Contracts
//!
//! The contracts of [`kernels_core::ops::sparse`] (layouts, the activity rule `!(|x| <= t)`, NaN
//! propagation, skipped rows never read), computed in `f32` with vector accumulators. Each output
//! is within [`gemv_tolerance`] of the reference, and bit-identical for any thread count.
//!
//! # How
//!
//! * `gemv` (`W` `[out, in]`): four rows at a time against one load of `x`, two accumulators per
//!   row; threads split the rows.
//! * `gemv_t` and `sparse_input_gemv` (`W_t` `[in, out]`): AXPY of up to four active rows at a time
//!   into `y` (one load and store of `y` per four rows); threads split the *columns*, so each
//!   thread reads a contiguous segment of every active row. Matrices at most [`PANEL_MAX_COLS`]
//!   wide are summed in two panels of rows instead (see there): the panels are fixed by the
//!   input, never by the thread count.
//! * `gathered_gemv`: `gemv` over the listed rows.

use kernels_core::backend::{validate_gathered_gemv, validate_gemv, validate_sparse_input_gemv};
use kernels_core::ops::sparse::{count_active, is_active};
use kernels_core::{Element, MatRef, Result};

use crate::parallel::split_outputs;
use crate::{Cpu, Isa, Simd, WithSimd};

/// Rows a dot or AXPY block handles at once.
pub(crate) const ROW_BLOCK: usize = 4;

/// Column boundaries of a threaded split are multiples of this (the widest vector, 16 `f32`,
/// times four), so every column is computed by the same vector or tail code whatever the split.
pub(crate) const COLUMN_ALIGN: usize = 64;

/// Sparse-input GEMVs over matrices at most this many columns wide sum their active rows in two
/// *panels*, the first and the second half of the active rows, each from zero, and then add the
/// two (`y = p0 + p1`); threads split the panels' columns laid side by side, so two threads read
/// whole rows of one panel each. Wider matrices split their columns directly. The panels depend
/// on the input alone, never on the thread count. (The MLPs' down projections, whose panel sums
/// live in `MlpScratch`, use panels at every width.)
///
/// PERF: a column split of a narrow matrix hands each thread short pieces of every active row
/// (SmolLM2's 576-wide rows: 576-byte bf16 pieces, and 320/256 columns on `COLUMN_ALIGN`). Timed
/// over SmolLM2's 150 TEAL matrices at 50 %, two threads: 2.7 ms by halves of the rows against
/// 3.8 ms by halves of the columns (4.7 ms through the aligned split). At 4096 columns a
/// thread's piece of a row is 4 KB (still slower than whole rows, but the panels' sums here
/// live in an 8 KB stack buffer, which 1024 bounds).
pub const PANEL_MAX_COLS: usize = 1024;

/// The width each panel's output takes side by side ([`PANEL_MAX_COLS`]), or `None` for a
/// matrix too wide for panels.
pub(crate) fn panel_stride(cols: usize) -> Option<usize> {
    (cols <= PANEL_MAX_COLS).then(|| cols.next_multiple_of(COLUMN_ALIGN))
}

/// Calls `f(piece, cols, offset)` for each of `pieces` outputs, `width` columns each, laid side
/// by side `stride` apart, that the columns `range` of the row meet: `cols` are the piece's own
/// columns and `offset` is where they start within `range`.
pub(crate) fn side_by_side(
    range: core::ops::Range<usize>,
    pieces: usize,
    width: usize,
    stride: usize,
    mut f: impl FnMut(usize, core::ops::Range<usize>, usize),
) {
    for piece in 0..pieces {
        let start = piece * stride;
        let clamp = |c: usize| c.clamp(start, start + width) - start;
        let cols = clamp(range.start)..clamp(range.end);
        if !cols.is_empty() {
            let offset = start + cols.start - range.start;
            f(piece, cols, offset);
        }
    }
}

/// Below this many weight bytes per part, another thread costs more than it saves.
///
/// PERF: waking a parked rayon worker costs 5 to 90 us on this machine (measured: `rayon::scope`
/// with one spawn, back to back vs after a 100 us pause); a 1.8 MB bf16 SmolLM2 matrix ran slower
/// on two threads than on one, a 3.5 MB f32 one faster.
pub(crate) const MIN_BYTES_PER_THREAD: usize = 1 << 20;

/// [`MIN_BYTES_PER_THREAD`] for a [`Cpu::with_spinning_team`], whose threads start in under a
/// microsecond.
pub(crate) const SPINNING_MIN_BYTES_PER_THREAD: usize = 64 << 10;

/// Bound on `|y_i - y_ref_i|` for a GEMV output that sums `n` products with absolute sum
/// `abs_sum = sum |w_ij x_j|`: `(n + 1) u abs_sum + tiny`, `u = 2^-24` (the GPU's bound).
///
/// Any order of `n - 1` `f32` additions errs by at most `(n - 1) u abs_sum` (Higham, Thm. 4.4),
/// each product by `u` of its own size; `tiny` absorbs subnormal rounding. This is the worst
/// case, and adversarial data reaches it: one large term followed by many small ones that each
/// round the same way (found by the `gemv` fuzz target; an earlier `4 u sqrt(n)` estimate, true
/// only for random rounding errors, failed there).
///
/// ```
/// use kernels_cpu::gemv::gemv_tolerance;
/// use kernels_cpu::prelude::*;
/// let (w, x) = ([0.1_f32, 0.2, 0.3, 0.4, 0.5, 0.6], [1.0_f32, -2.0, 3.0]);
/// let mut y = [0.0_f32; 2];
/// gemv(&Cpu::detect(), MatRef::from_slice(&w, 2, 3)?, &x, &mut y)?;
/// for (i, row) in w.chunks(3).enumerate() {
///     let exact: f64 = row.iter().zip(&x).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
///     let abs_sum: f64 = row.iter().zip(&x).map(|(&a, &b)| f64::from(a * b).abs()).sum();
///     assert!((f64::from(y[i]) - exact).abs() <= gemv_tolerance(3, abs_sum));
/// }
/// # Ok::<(), Error>(())
/// ```
#[must_use]
pub fn gemv_tolerance(n: usize, abs_sum: f64) -> f64 {
    (n as f64 + 1.0) * f64::from(f32::EPSILON / 2.0) * abs_sum + 1e-30
}

/// How far ahead in each row `dot_block` prefetches.
///
/// PERF: four to eight concurrent row streams per thread outrun the hardware prefetcher at page
/// boundaries; 1 KiB ahead measured best (512 B and 2 KiB within noise, 4 KiB worse).
const PREFETCH_BYTES: usize = 1024;

/// `[r0 . x, r1 . x, ...]` for `R` rows of length `x.len()`, prefetching [`PREFETCH_BYTES`] ahead
/// in each row and, past a row's end, into the same slot of `next` (the following block's rows, or
/// empty slices): short rows (SmolLM2's 576) would otherwise start every block cold.
#[inline(always)]
pub(crate) fn dot_block<S: Simd, T: Element, const R: usize>(
    s: S,
    rows: [&[T]; R],
    next: [&[T]; R],
    x: &[f32],
) -> [f32; R] {
    let lanes = S::LANES;
    let n = x.len();
    let rows = rows.map(|r| &r[..n]);
    let main = n - n % (2 * lanes);
    let mut acc0 = [s.zero(); R];
    let mut acc1 = [s.zero(); R];
    let mut c = 0;
    let ahead = PREFETCH_BYTES / core::mem::size_of::<T>();
    while c < main {
        let x0 = s.load(&x[c..c + lanes]);
        let x1 = s.load(&x[c + lanes..c + 2 * lanes]);
        let at = c + ahead;
        for r in 0..R {
            if let Some(v) = rows[r].get(at).or_else(|| next[r].get(at - n)) {
                s.prefetch(v);
            }
        }
        for r in 0..R {
            acc0[r] = s.mul_add(s.load(&rows[r][c..c + lanes]), x0, acc0[r]);
            acc1[r] = s.mul_add(s.load(&rows[r][c + lanes..c + 2 * lanes]), x1, acc1[r]);
        }
        c += 2 * lanes;
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        let mut tail = 0.0f32;
        for j in main..n {
            tail += rows[r][j].to_f32() * x[j];
        }
        out[r] = s.reduce_sum(s.add(acc0[r], acc1[r])) + tail;
    }
    out
}

/// `y += sum_r coeffs[r] * rows[r]` over `y.len()` columns, prefetching the same columns of
/// `next` (the rows of the following block, or empty slices).
///
/// PERF: active rows are scattered, so each block starts four new streams that the hardware
/// prefetcher has not seen; touching the next block's rows while this one is summed hides that
/// start-up latency (measured: the sparse GEMV's fixed cost per block).
#[inline(always)]
pub(crate) fn axpy_block<S: Simd, T: Element, const R: usize>(
    s: S,
    y: &mut [f32],
    coeffs: [f32; R],
    rows: [&[T]; R],
    next: &[&[T]],
) {
    let lanes = S::LANES;
    let n = y.len();
    let rows = rows.map(|r| &r[..n]);
    let splat = coeffs.map(|c| s.splat(c));
    let main = n - n % lanes;
    let mut c = 0;
    while c < main {
        for row in next {
            if let Some(at) = row.get(c) {
                s.prefetch(at);
            }
        }
        let chunk = &mut y[c..c + lanes];
        let mut acc = s.load(&*chunk);
        for r in 0..R {
            acc = s.mul_add(splat[r], s.load(&rows[r][c..c + lanes]), acc);
        }
        s.store(acc, chunk);
        c += lanes;
    }
    for j in main..n {
        let mut acc = y[j];
        for r in 0..R {
            acc += coeffs[r] * rows[r][j].to_f32();
        }
        y[j] = acc;
    }
}

/// AXPY of `k <= ROW_BLOCK` rows (a block's active subset) into `y`, prefetching `next`.
#[inline(always)]
pub(crate) fn axpy_some<S: Simd, T: Element>(
    s: S,
    y: &mut [f32],
    coeffs: &[f32],
    rows: &[&[T]],
    next: &[&[T]],
) {
    match rows.len() {
        1 => axpy_block(s, y, [coeffs[0]], [rows[0]], next),
        2 => axpy_block(s, y, [coeffs[0], coeffs[1]], [rows[0], rows[1]], next),
        3 => axpy_block(
            s,
            y,
            [coeffs[0], coeffs[1], coeffs[2]],
            [rows[0], rows[1], rows[2]],
            next,
        ),
        4 => axpy_block(
            s,
            y,
            [coeffs[0], coeffs[1], coeffs[2], coeffs[3]],
            [rows[0], rows[1], rows[2], rows[3]],
            next,
        ),
        _ => {}
    }
}

/// `y[k * B + b] = row(k) . xs[b]` for `B = xs.len()` samples, four rows at a time (each block of
/// rows is read from memory once and stays in cache for the other samples).
struct DotRows<'w, 'b, T, F> {
    row: F,
    xs: &'b [&'b [f32]],
    y: &'b mut [f32],
    _weights: core::marker::PhantomData<&'w T>,
}

impl<'w, T: Element, F: Fn(usize) -> &'w [T]> WithSimd for DotRows<'w, '_, T, F> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        // PERF: eight rows in flight keep more memory streams busy (measured: bf16 GEMV from ~80 % to
        // ~88 % of STREAM) but need 16 accumulators plus two x vectors, which only AVX-512's 32
        // registers hold without spilling.
        if S::ISA == Isa::Avx512 {
            dot_row_blocks::<S, T, 8>(s, &self.row, self.xs, self.y);
        } else {
            dot_row_blocks::<S, T, ROW_BLOCK>(s, &self.row, self.xs, self.y);
        }
    }
}

#[inline(always)]
fn dot_row_blocks<'w, S: Simd, T: Element + 'w, const R: usize>(
    s: S,
    row: &impl Fn(usize) -> &'w [T],
    xs: &[&[f32]],
    y: &mut [f32],
) {
    let batch = xs.len();
    let rows_total = y.len() / batch.max(1);
    let block = |k: usize| -> [&'w [T]; R] {
        core::array::from_fn(|r| if k + r < rows_total { row(k + r) } else { &[] })
    };
    let mut blocks = y.chunks_exact_mut(R * batch);
    let mut k = 0;
    let mut rows = block(0);
    for out in &mut blocks {
        let next = block(k + R);
        for (b, x) in xs.iter().enumerate() {
            // Prefetch the next block while the first sample reads this one.
            let ahead = if b == 0 { next } else { [&[][..]; R] };
            for (r, v) in dot_block(s, rows, ahead, x).into_iter().enumerate() {
                out[r * batch + b] = v;
            }
        }
        rows = next;
        k += R;
    }
    for out in blocks.into_remainder().chunks_exact_mut(batch) {
        let r = row(k);
        for (o, x) in out.iter_mut().zip(xs) {
            *o = dot_block(s, [r], [&[]], x)[0];
        }
        k += 1;
    }
}

/// Runs `DotRows` over `y` (`rows x xs.len()`), split into row ranges over threads.
pub(crate) fn dot_rows<'w, T: Element>(
    cpu: &Cpu,
    row: impl Fn(usize) -> &'w [T] + Sync,
    xs: &[&[f32]],
    y: &mut [f32],
) {
    let batch = xs.len().max(1);
    let width = xs.first().map_or(0, |x| x.len());
    let row = &row;
    split_outputs(
        cpu,
        y,
        width * core::mem::size_of::<T>() / batch,
        2 * ROW_BLOCK * batch,
        |range, part| {
            let first = range.start / batch;
            cpu.dispatch(DotRows {
                row: |k| row(first + k),
                xs,
                y: part,
                _weights: core::marker::PhantomData,
            });
        },
    );
}

/// Dense GEMV `y = W x`, `W` `[out, in]` (the twin of `gemv_ref`).
///
/// ```
/// use kernels_cpu::prelude::*;
/// let w = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // [out = 2, in = 3]
/// let mut y = [0.0; 2];
/// gemv(&Cpu::detect(), MatRef::from_slice(&w, 2, 3)?, &[1.0, 0.0, -1.0], &mut y)?;
/// assert_eq!(y, [-2.0, -2.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn gemv<T: Element>(cpu: &Cpu, w: MatRef<'_, T>, x: &[f32], y: &mut [f32]) -> Result<()> {
    validate_gemv(w.shape(), x.len(), y.len())?;
    dot_rows(cpu, |r| w.row(r), &[x], y);
    Ok(())
}

/// Gathered-output GEMV `out[k] = w[rows[k]] . x` (the twin of `gathered_gemv_ref`). Row
/// indices may repeat and come in any order; one past the last row is an error.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let w = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // [out = 3, in = 2]
/// let mut out = [0.0; 2];
/// gathered_gemv(&Cpu::detect(), MatRef::from_slice(&w, 3, 2)?, &[1.0, 1.0], &[2, 0], &mut out)?;
/// assert_eq!(out, [11.0, 3.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn gathered_gemv<T: Element>(
    cpu: &Cpu,
    w: MatRef<'_, T>,
    x: &[f32],
    rows: &[u32],
    out: &mut [f32],
) -> Result<()> {
    validate_gathered_gemv(w.shape(), x.len(), rows, out.len())?;
    dot_rows(cpu, |k| w.row(rows[k] as usize), &[x], out);
    Ok(())
}

/// AXPY of the active rows among `rows` of `w_t` into `y`, restricted to the columns `cols`.
struct SparseAxpy<'a, T> {
    w_t: MatRef<'a, T>,
    x: &'a [f32],
    rows: core::ops::Range<usize>,
    threshold: f32,
    cols: core::ops::Range<usize>,
    y: &'a mut [f32],
}

impl<T: Element> WithSimd for SparseAxpy<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let Self {
            w_t,
            x,
            rows,
            threshold,
            cols,
            y,
        } = self;
        y.fill(0.0);
        // Blocks of up to four active rows, gathered one block ahead for prefetching.
        let mut active = x[rows.clone()]
            .iter()
            .zip(rows)
            .filter(|(v, _)| is_active(**v, threshold))
            .map(|(v, i)| (i, v));
        let mut next_block = || {
            let mut coeffs = [0.0f32; ROW_BLOCK];
            let mut rows: [&[T]; ROW_BLOCK] = [&[]; ROW_BLOCK];
            let mut count = 0;
            for (i, &xi) in active.by_ref().take(ROW_BLOCK) {
                coeffs[count] = xi;
                rows[count] = &w_t.row(i)[cols.clone()];
                count += 1;
            }
            (coeffs, rows, count)
        };
        let mut current = next_block();
        while current.2 > 0 {
            let following = next_block();
            let (coeffs, rows, count) = current;
            let next = &following.1[..following.2];
            if count == ROW_BLOCK {
                axpy_block(s, y, coeffs, rows, next);
            } else {
                axpy_some(s, y, &coeffs[..count], &rows[..count], next);
            }
            current = following;
        }
    }
}

/// Sparse-input GEMV (TEAL form): `y = sum over active i of x_i w_t[i, :]`, `w_t` `[in, out]`,
/// the twin of `sparse_input_gemv_ref`. Input `i` is active iff `!(|x_i| <= threshold)`: strictly
/// above the threshold, or NaN (so it propagates), which makes `threshold = 0` skip exact zeros
/// and any negative threshold dense. It reads `count_active(x, threshold)` rows of `w_t` and no
/// other.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let w_t = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // [in = 3, out = 2]
/// let mut y = [0.0; 2];
/// sparse_input_gemv(&Cpu::detect(), MatRef::from_slice(&w_t, 3, 2)?, &[0.5, -0.1, 2.0], 0.2, &mut y)?;
/// assert_eq!(y, [0.5 * 1.0 + 2.0 * 5.0, 0.5 * 2.0 + 2.0 * 6.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn sparse_input_gemv<T: Element>(
    cpu: &Cpu,
    w_t: MatRef<'_, T>,
    x: &[f32],
    threshold: f32,
    y: &mut [f32],
) -> Result<()> {
    validate_sparse_input_gemv(w_t.shape(), x.len(), threshold, y.len())?;
    let active = count_active(x, threshold);
    let (rows, width) = (w_t.rows(), w_t.cols());
    let Some(stride) = panel_stride(width) else {
        split_outputs(
            cpu,
            y,
            active * core::mem::size_of::<T>(),
            COLUMN_ALIGN,
            |cols, part| {
                cpu.dispatch(SparseAxpy {
                    w_t,
                    x,
                    rows: 0..rows,
                    threshold,
                    cols,
                    y: part,
                });
            },
        );
        return Ok(());
    };
    // The second panel starts at the active row that follows half of them.
    let mid = (0..rows)
        .filter(|&i| is_active(x[i], threshold))
        .nth(active / 2)
        .unwrap_or(rows);
    let mut sums = [0.0f32; 2 * PANEL_MAX_COLS];
    let sums = &mut sums[..2 * stride];
    split_outputs(
        cpu,
        sums,
        active.div_ceil(2) * core::mem::size_of::<T>(),
        COLUMN_ALIGN,
        |range, part| {
            side_by_side(range, 2, width, stride, |panel, cols, offset| {
                cpu.dispatch(SparseAxpy {
                    w_t,
                    x,
                    rows: if panel == 0 { 0..mid } else { mid..rows },
                    threshold,
                    y: &mut part[offset..offset + cols.len()],
                    cols,
                });
            });
        },
    );
    let (first, second) = sums.split_at(stride);
    for ((out, a), b) in y.iter_mut().zip(first).zip(second) {
        *out = a + b;
    }
    Ok(())
}

/// Dense GEMV through the transposed layout: `y = W_t^T x` (every row of `w_t` is read).
///
/// ```
/// use kernels_cpu::prelude::*;
/// let w_t = [1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0]; // [in = 3, out = 2]
/// let mut y = [0.0; 2];
/// gemv_t(&Cpu::detect(), MatRef::from_slice(&w_t, 3, 2)?, &[1.0, 0.0, -1.0], &mut y)?;
/// assert_eq!(y, [-2.0, -2.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn gemv_t<T: Element>(cpu: &Cpu, w_t: MatRef<'_, T>, x: &[f32], y: &mut [f32]) -> Result<()> {
    sparse_input_gemv(cpu, w_t, x, f32::NEG_INFINITY, y)
}
