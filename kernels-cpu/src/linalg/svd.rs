//! Thin SVD (Householder QR, then one-sided Jacobi), randomized truncated SVD, symmetric
//! eigendecomposition, LoRA extraction, the OPCM step and the streaming truncated SVD.

use alloc::vec;
use alloc::vec::Vec;

use kernels_core::backend::{jacobi_rotation, negligible, validate_opcm, validate_randomized_svd};
use kernels_core::ops::lowrank::{
    Lora, LoraRank, MAX_JACOBI_SWEEPS, OpcmParams, RsvdParams, Svd, SvdRef, SymmetricEigen,
    lora_rank, opcm_rank,
};
use kernels_core::{CounterRng, Element, Error, Mat, MatMut, MatRef, MultiPass, Result};

use super::qr::{dot, qr_of_transposed, transpose};
use super::{
    Transpose, as_f32_checked, gemm, largest_magnitude, product, rescaling, scaled,
    transposed_checked, unscale_singular_values, widen_checked,
};
use crate::Cpu;
use crate::simd::{Simd, WithSimd};

/// `f64` dot product of `f32` vectors with eight partial sums.
// PERF: Jacobi's stopping test compares this against `eps_f32 sqrt(k)` of the norms; an `f32`
// sum's own rounding (about `eps sqrt(k)` too) would keep the sweeps from converging.
#[inline(always)]
fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    let mut partial = [0.0f64; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            partial[i] += f64::from(x[i]) * f64::from(y[i]);
        }
    }
    partial.iter().sum::<f64>() + tail
}

/// The rows Jacobi rotates, shared by the threads of one round: each thread owns the rows of
/// the two blocks it was dealt, so no row is touched by two threads at once.
struct JacobiRows {
    x: *mut f32,
    len: usize,
    rotations: *mut f32,
    k: usize,
    norms: *mut f64,
    tol: f64,
}

// SAFETY: see the type's docs; rounds are separated by the join of `parallel::for_each`.
unsafe impl Sync for JacobiRows {}
unsafe impl Send for JacobiRows {}

impl JacobiRows {
    /// Orthogonalises rows `p` and `q` (a no-op when they already are, to within the
    /// tolerance); returns whether it rotated.
    ///
    /// # Safety
    /// `p != q`, both `< k`, and no other thread touches rows `p`, `q` meanwhile.
    #[inline(always)]
    unsafe fn pair(&self, p: usize, q: usize) -> bool {
        // SAFETY: rows p and q are disjoint, in bounds, and ours alone, per the caller.
        let (xp, xq, rp, rq, np, nq) = unsafe {
            (
                core::slice::from_raw_parts_mut(self.x.add(p * self.len), self.len),
                core::slice::from_raw_parts_mut(self.x.add(q * self.len), self.len),
                core::slice::from_raw_parts_mut(self.rotations.add(p * self.k), self.k),
                core::slice::from_raw_parts_mut(self.rotations.add(q * self.k), self.k),
                &mut *self.norms.add(p),
                &mut *self.norms.add(q),
            )
        };
        let (alpha, beta) = (*np, *nq);
        let gamma = dot_f64(xp, xq);
        if gamma == 0.0 || gamma.abs() <= self.tol * libm::sqrt(alpha * beta) {
            return false;
        }
        let zeta = (beta - alpha) / (2.0 * gamma);
        let t = zeta.signum() / (zeta.abs() + libm::sqrt(1.0 + zeta * zeta));
        let c = 1.0 / libm::sqrt(1.0 + t * t);
        let s = c * t;
        rotate(xp, xq, c as f32, s as f32);
        rotate(rp, rq, c as f32, s as f32);
        // The rotation's exact effect on the squared norms; each sweep starts from fresh ones,
        // so rounding cannot accumulate across sweeps.
        *np = (alpha - t * gamma).max(0.0);
        *nq = (beta + t * gamma).max(0.0);
        true
    }
}

/// `(x, y) <- (c x - s y, s x + c y)`.
#[inline(always)]
fn rotate(x: &mut [f32], y: &mut [f32], c: f32, s: f32) {
    for (x, y) in x.iter_mut().zip(y.iter_mut()) {
        let (a, b) = (*x, *y);
        *x = c * a - s * b;
        *y = s * a + c * b;
    }
}

/// One thread's share of a round of the block-parallel sweep: the pairs inside `first` and
/// inside `second` (with `within`, the first round), then every pair across them; returns
/// whether any pair rotated.
///
/// PERF: dispatched, so the rotations and `f64` dot products (plain loops the compiler
/// vectorises) are compiled for the CPU's ISA, not the baseline's SSE2; plain loops without
/// fused multiply-adds, so every ISA rotates to the same bits.
struct PairBlocks<'a> {
    rows: &'a JacobiRows,
    first: &'a [usize],
    second: &'a [usize],
    within: bool,
}

impl WithSimd for PairBlocks<'_> {
    type Output = bool;

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> bool {
        let rows = self.rows;
        let mut any = false;
        if self.within {
            for part in [self.first, self.second] {
                for (a, &p) in part.iter().enumerate() {
                    any |= rotate_against(rows, p, &part[a + 1..]);
                }
            }
        }
        for &p in self.first {
            any |= rotate_against(rows, p, self.second);
        }
        any
    }
}

/// Every pair of row `p` and a row of `others`; returns whether any rotated.
// PERF: `inline(always)`, a function rather than a closure, so that it is compiled inside the
// dispatched kernel with its target features (a closure was not inlined: 5x slower).
#[inline(always)]
fn rotate_against(rows: &JacobiRows, p: usize, others: &[usize]) -> bool {
    let mut any = false;
    for &q in others {
        // SAFETY: the rows of a deal belong to this thread alone during the round (the
        // caller's deal), and `p != q`: the rows of a block are distinct, the blocks of a deal
        // are disjoint.
        any |= unsafe { rows.pair(p, q) };
    }
    any
}

/// A whole sweep on one thread in de Rijk's order: for each position, the longest remaining
/// row first; returns whether any pair rotated. Dispatched as [`PairBlocks`] is.
struct PivotedSweep<'a> {
    rows: &'a JacobiRows,
    order: &'a mut [usize],
}

impl WithSimd for PivotedSweep<'_> {
    type Output = bool;

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> bool {
        let (rows, order) = (self.rows, self.order);
        let k = order.len();
        let mut any = false;
        for a in 0..k {
            // SAFETY: no other thread runs; positions are in bounds.
            let norm = |p: usize| unsafe { *rows.norms.add(p) };
            let largest = (a..k)
                .max_by(|&x, &y| norm(order[x]).total_cmp(&norm(order[y])).then(y.cmp(&x)))
                .unwrap_or(a);
            order.swap(a, largest);
            for b in a + 1..k {
                // SAFETY: one thread; order[a] != order[b].
                any |= unsafe { rows.pair(order[a], order[b]) };
            }
        }
        any
    }
}

/// Jacobi's stopping test, in units of `f32::EPSILON`: each pair of rows ends orthogonal to
/// within this many `eps` of the product of their norms, so `||V^T V - I||_2` stays within about
/// `2 eps sqrt(k)`. Rotating a pair and storing it in `f32` leaves its (exact, `f64`) inner
/// product near `eps / sqrt(len)` of the norms, well below this: the sweeps converge.
// A looser `eps sqrt(k)` let 1024 x 1024 factors lose orthogonality to 4e-4 (Frobenius).
const JACOBI_ORTHOGONALITY: f64 = 2.0;

/// Jacobi's deflation threshold, relative to the norm of the longest row: `f32::EPSILON`.
/// Zeroing such rows moves the matrix by at most `eps sqrt(k)` of its norm, within the
/// contract's reconstruction bound; a singular value that small is not resolved by `f32` input.
const NEGLIGIBLE_ROW: f64 = f32::EPSILON as f64;

/// Rows below which one thread runs the whole sweep.
const PARALLEL_JACOBI_MIN_ROWS: usize = 128;

/// Cyclic one-sided Jacobi on the rows of `x` (`k x len`), accumulating the same rotations into
/// the rows of `rotations` (`k x k`), until every pair of rows is orthogonal to within
/// [`JACOBI_ORTHOGONALITY`]` * eps` of the product of their norms.
///
/// Each sweep orders the rows by decreasing norm (de Rijk: fewer sweeps) and, on several
/// threads, splits them into `2 threads` blocks dealt in round-robin rounds: every pair of blocks
/// meets once per sweep, the pairs inside a block in the first round, so each pair of rows is
/// visited once per sweep as in the cyclic order.
fn jacobi_sweeps(cpu: &Cpu, x: &mut Mat<f32>, rotations: &mut Mat<f32>) -> Result<()> {
    let (k, len) = (x.rows(), x.cols());
    let mut norms = vec![0.0f64; k];
    let rows = JacobiRows {
        x: x.as_mut_slice().as_mut_ptr(),
        len,
        rotations: rotations.as_mut_slice().as_mut_ptr(),
        k,
        norms: norms.as_mut_ptr(),
        tol: JACOBI_ORTHOGONALITY * f64::from(f32::EPSILON),
    };
    let threads = if k >= PARALLEL_JACOBI_MIN_ROWS {
        cpu.threads()
    } else {
        1
    };
    let blocks = if threads > 1 { 2 * threads } else { 1 };
    for _sweep in 0..MAX_JACOBI_SWEEPS {
        let mut order: Vec<usize> = (0..k).collect();
        for (j, n) in norms.iter_mut().enumerate() {
            // SAFETY: no pair is in flight between sweeps; row j is in bounds.
            let row = unsafe { core::slice::from_raw_parts(rows.x.add(j * len), len) };
            *n = dot_f64(row, row);
        }
        // Deflation: a row below `NEGLIGIBLE_ROW` of the largest is rounding noise (of the QR
        // of rank-deficient input, or left by rotations), and is set to zero. Rotating it
        // against a row eps^-1 times longer leaves an inner product above the relative
        // stopping test every time, so the sweeps would not end.
        let largest = norms.iter().fold(0.0f64, |m, &n| m.max(n));
        for (j, n) in norms.iter_mut().enumerate() {
            if *n > 0.0 && *n <= NEGLIGIBLE_ROW * NEGLIGIBLE_ROW * largest {
                *n = 0.0;
                // SAFETY: as above.
                unsafe { core::slice::from_raw_parts_mut(rows.x.add(j * len), len) }.fill(0.0);
            }
        }
        order.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]).then(a.cmp(&b)));
        let bounds: Vec<core::ops::Range<usize>> = crate::parallel::ranges(k, blocks, 1).collect();
        let rotated = core::sync::atomic::AtomicBool::new(false);
        let run = |first: &[usize], second: &[usize], within: bool| {
            let pairs = PairBlocks {
                rows: &rows,
                first,
                second,
                within,
            };
            if cpu.dispatch(pairs) {
                rotated.store(true, core::sync::atomic::Ordering::Relaxed);
            }
        };
        let players = bounds.len();
        if players <= 1 {
            let sweep = PivotedSweep {
                rows: &rows,
                order: &mut order,
            };
            if cpu.dispatch(sweep) {
                rotated.store(true, core::sync::atomic::Ordering::Relaxed);
            }
        } else {
            // The circle method: player 0 stays, the others rotate one seat per round.
            let players = players + players % 2;
            for round in 0..players - 1 {
                let seat = |i: usize| {
                    if i == 0 {
                        0
                    } else {
                        1 + (i - 1 + round) % (players - 1)
                    }
                };
                let deals: Vec<(usize, usize)> = (0..players / 2)
                    .map(|i| {
                        let (a, b) = (seat(i), seat(players - 1 - i));
                        (a.min(b), a.max(b))
                    })
                    .collect();
                crate::parallel::for_each(deals, |(a, b)| {
                    let first = &order[bounds[a].clone()];
                    // With an odd block count, the block seated against the empty seat only
                    // needs its own pairs (in the first round).
                    let second = bounds.get(b).map_or(&[][..], |r| &order[r.clone()]);
                    run(first, second, round == 0);
                });
            }
        }
        if !rotated.into_inner() {
            return Ok(());
        }
    }
    Err(Error::NotConverged {
        what: "one-sided Jacobi SVD",
        iterations: MAX_JACOBI_SWEEPS,
    })
}

/// Replaces the rows of `rows` whose singular value is zero by unit vectors orthogonal to every
/// other row (so both factors stay orthonormal for rank-deficient input).
fn complete_orthonormal(rows: &mut Mat<f32>, s: &[f32]) {
    let dim = rows.cols();
    let mut candidate = 0;
    for j in 0..rows.rows() {
        if s[j] > 0.0 {
            continue;
        }
        while candidate < dim {
            let mut v = vec![0.0f32; dim];
            v[candidate] = 1.0;
            candidate += 1;
            for _pass in 0..2 {
                for i in 0..rows.rows() {
                    if i != j && (s[i] > 0.0 || i < j) {
                        let d = dot(rows.row(i), &v);
                        super::qr::axpy(-d, rows.row(i), &mut v);
                    }
                }
            }
            let norm = libm::sqrt(dot_f64(&v, &v));
            // Some axis keeps at least 1/sqrt(dim) outside a subspace of lower dimension.
            if norm > 0.5 / libm::sqrt(dim as f64) {
                let inverse = (1.0 / norm) as f32;
                for (o, x) in rows.row_mut(j).iter_mut().zip(&v) {
                    *o = x * inverse;
                }
                break;
            }
        }
    }
}

/// Normalises the signs of `u`'s columns (see `Mat::normalise_column_signs`) and flips the
/// matching rows of `vt` (`V^T`: rows are right vectors).
fn normalise_signs(u: &mut Mat<f32>, vt: &mut Mat<f32>) {
    for (j, flipped) in u.normalise_column_signs().into_iter().enumerate() {
        if flipped {
            for v in vt.row_mut(j) {
                *v = -*v;
            }
        }
    }
}

/// Thin SVD of the matrix `A` given as `w = A^T` (`n x m`, `m >= n`), as `(U, s, V^T)`.
fn svd_of_transposed_tall(cpu: &Cpu, w: Mat<f32>) -> Result<(Mat<f32>, Vec<f32>, Mat<f32>)> {
    // A = Q R; Jacobi on X = R^T, whose columns are R's rows: X V_x = W with orthogonal columns,
    // so R = V_x S U_x^T and A = (Q V_x) S U_x^T with U_x = W / S.
    let (qt, mut r) = qr_of_transposed(cpu, w)?;
    let k = r.rows();
    let mut rotations = Mat::from_fn(k, k, |i, j| if i == j { 1.0 } else { 0.0 })?;
    jacobi_sweeps(cpu, &mut r, &mut rotations)?;
    let mut order: Vec<(f32, usize)> = (0..k)
        .map(|j| (libm::sqrt(dot_f64(r.row(j), r.row(j))) as f32, j))
        .collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let s: Vec<f32> = order
        .iter()
        .map(|&(sigma, _)| {
            if sigma >= f32::MIN_POSITIVE {
                sigma
            } else {
                0.0
            }
        })
        .collect();
    let mut vt = Mat::zeros(k, r.cols())?;
    let mut v_x_t = Mat::zeros(k, k)?;
    for (row, (&(sigma, j), &kept)) in order.iter().zip(&s).enumerate() {
        if kept > 0.0 {
            let inverse = 1.0 / f64::from(sigma);
            for (o, &x) in vt.row_mut(row).iter_mut().zip(r.row(j)) {
                *o = (f64::from(x) * inverse) as f32;
            }
        }
        v_x_t.row_mut(row).copy_from_slice(rotations.row(j));
    }
    complete_orthonormal(&mut vt, &s);
    let mut u = product(
        cpu,
        qt.as_ref(),
        Transpose::Yes,
        v_x_t.as_ref(),
        Transpose::Yes,
    )?;
    normalise_signs(&mut u, &mut vt);
    Ok((u, s, vt))
}

/// Thin SVD of `A` given as `w = A^T`, any shape, scaled first where its magnitude needs it.
fn svd_of_transposed(cpu: &Cpu, w: Mat<f32>) -> Result<Svd<f32>> {
    if let Some(e) = rescaling(largest_magnitude(w.as_slice(), 0.0)) {
        let mut svd = svd_of_transposed_in_range(cpu, scaled(w.as_ref(), e)?)?;
        unscale_singular_values(&mut svd.s, e)?;
        return Ok(svd);
    }
    svd_of_transposed_in_range(cpu, w)
}

/// [`svd_of_transposed`] of a matrix within the safe magnitudes.
fn svd_of_transposed_in_range(cpu: &Cpu, w: Mat<f32>) -> Result<Svd<f32>> {
    let (n, m) = (w.rows(), w.cols());
    if m >= n {
        let (u, s, vt) = svd_of_transposed_tall(cpu, w)?;
        Ok(Svd {
            u,
            s,
            v: transpose(vt.as_ref())?,
        })
    } else {
        // A^T is tall, and given transposed it is A itself: A^T = U' S V'^T, so A = V' S U'^T.
        let (u_of_t, s, vt_of_t) = svd_of_transposed_tall(cpu, transpose(w.as_ref())?)?;
        let mut u = transpose(vt_of_t.as_ref())?;
        let mut vt = transpose(u_of_t.as_ref())?;
        normalise_signs(&mut u, &mut vt);
        Ok(Svd {
            u,
            s,
            v: transpose(vt.as_ref())?,
        })
    }
}

/// Thin SVD, `A = U diag(s) V^T` with `k = min(m, n)` (see `kernels_core::ops::lowrank` for the
/// contract): a blocked Householder QR, then one-sided Jacobi (at most [`MAX_JACOBI_SWEEPS`]
/// sweeps; not converging is [`Error::NotConverged`]) on the `k x k` triangular factor.
///
/// ```
/// use kernels_core::MatRef;
/// use kernels_cpu::{Cpu, linalg::thin_svd};
/// let a = [3.0f32, 0.0, 0.0, -2.0];
/// let svd = thin_svd(&Cpu::detect(), MatRef::from_slice(&a, 2, 2)?)?;
/// assert_eq!(svd.s, [3.0, 2.0]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn thin_svd<T: Element>(cpu: &Cpu, a: MatRef<'_, T>) -> Result<Svd<f32>> {
    svd_of_transposed(cpu, transposed_checked(cpu, "a", a)?)
}

/// Randomized truncated SVD (Halko, Martinsson and Tropp): `rank + oversample` Gaussian probes
/// (the same counter-based draws as the reference), `power_iterations` each re-orthonormalised
/// by Householder QR, then the thin SVD of the projected `(rank + oversample) x n` matrix.
///
/// ```
/// use kernels_cpu::prelude::*;
/// // A rank-2 matrix: its two singular values are found exactly (to f32 rounding).
/// let a = Mat::from_fn(40, 30, |i, j| {
///     3.0 * ((i % 5) as f32 - 2.0) * ((j % 3) as f32 - 1.0) + 0.5 * ((i % 2) as f32) * ((j % 7) as f32)
/// })?;
/// let cpu = Cpu::detect();
/// let exact = thin_svd(&cpu, a.as_ref())?;
/// let params = RsvdParams::new(2).with_oversample(4).with_power_iterations(1).with_seed(7);
/// let svd = randomized_svd(&cpu, a.as_ref(), params)?;
/// assert_eq!(svd.s.len(), 2);
/// for (s, e) in svd.s.iter().zip(&exact.s) {
///     assert!((s - e).abs() <= 1e-4 * exact.s[0]);
/// }
/// # Ok::<(), Error>(())
/// ```
pub fn randomized_svd<T: Element>(
    cpu: &Cpu,
    a: MatRef<'_, T>,
    params: RsvdParams,
) -> Result<Svd<f32>> {
    let probes = validate_randomized_svd(a.shape(), params)?;
    let (a, largest) = as_f32_checked(cpu, "a", a)?;
    if let Some(e) = rescaling(largest) {
        let mut svd = randomized_svd(cpu, scaled(a.view(), e)?.as_ref(), params)?;
        unscale_singular_values(&mut svd.s, e)?;
        return Ok(svd);
    }
    let a = a.view();
    let n = a.cols();
    let rng = CounterRng::new(params.seed);
    // Omega^T (probes x n), drawn at the reference's indices. PERF: threaded, because the
    // Box-Muller draws of a 11008 x 128 sketch cost 35 ms on one core (5 % of the whole SVD).
    let mut omega_t = Mat::zeros(probes, n)?;
    crate::parallel::split_outputs(cpu, omega_t.as_mut_slice(), 64, n.max(1), |range, part| {
        for (flat, o) in range.zip(part) {
            let (j, i) = (flat / n, flat % n);
            *o = rng.normal_at((i * probes + j) as u64) as f32;
        }
    });
    let orthonormal_rows = |w: Mat<f32>| qr_of_transposed(cpu, w).map(|(qt, _)| qt);
    // Bases are kept transposed (probes x m): Y^T = Omega^T A^T.
    let mut qt = orthonormal_rows(product(
        cpu,
        omega_t.as_ref(),
        Transpose::No,
        a,
        Transpose::Yes,
    )?)?;
    for _ in 0..params.power_iterations {
        let zt = orthonormal_rows(product(cpu, qt.as_ref(), Transpose::No, a, Transpose::No)?)?;
        qt = orthonormal_rows(product(cpu, zt.as_ref(), Transpose::No, a, Transpose::Yes)?)?;
    }
    // B^T = A^T Q (n x probes). PERF: faer's GEMM writes this layout 1.5x faster than B's own
    // (33 against 56 ms for 4096 x 11008 and 32 probes, one thread).
    let b_t = product(cpu, a, Transpose::Yes, qt.as_ref(), Transpose::Yes)?;
    // U = Q U_B, with U_B given as it comes out of each branch (transposed or not).
    let (u_b, u_b_layout, s, v) = if b_t.rows() >= b_t.cols()
        && rescaling(largest_magnitude(b_t.as_slice(), 0.0)).is_none()
    {
        // B is wide: its tall transpose B^T = U' S V'^T, given transposed (B itself, one
        // transpose of the n x probes matrix), gives B = V' S U'^T, and the n x probes factor
        // U' needs no transposes (six of them took 20 ms of a 4096 x 11008, 128-probe SVD).
        let (right, s, left_t) = svd_of_transposed_tall(cpu, transpose(b_t.as_ref())?)?;
        (left_t, Transpose::Yes, s, right)
    } else {
        let small = svd_of_transposed(cpu, b_t)?;
        (small.u, Transpose::No, small.s, small.v)
    };
    let mut u = product(cpu, qt.as_ref(), Transpose::Yes, u_b.as_ref(), u_b_layout)?;
    let r = params.rank.min(s.len());
    let mut v = v.leading_cols(r);
    let flipped = u.normalise_column_signs();
    for row in 0..v.rows() {
        for (x, _) in v.row_mut(row).iter_mut().zip(&flipped).filter(|(_, f)| **f) {
            *x = -*x;
        }
    }
    Ok(Svd {
        u: u.leading_cols(r),
        s: s[..r].to_vec(),
        v,
    })
}

/// Symmetric eigendecomposition by cyclic two-sided Jacobi, the contract of
/// `kernels_core::ops::lowrank::symmetric_eigen_ref` (only the lower triangle of `s` is read).
///
/// Accurate to the last bits of the small eigenvalues and simple, but `O(n^3)` per sweep: meant
/// for the Gram matrices (a few hundred rows) that low-rank methods form. The rotations run in
/// `f64` on contiguous rows: a rotation updates rows `p` and `q`, and symmetry gives the two
/// columns, so no pass strides down a column of the working matrix.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let s = [2.0f32, 1.0, 1.0, 2.0]; // eigenvalues 3 and 1
/// let eigen = symmetric_eigen(MatRef::from_slice(&s, 2, 2)?)?;
/// assert!((eigen.values[0] - 3.0).abs() < 1e-6 && (eigen.values[1] - 1.0).abs() < 1e-6);
/// // The first eigenvector is (1, 1) / sqrt(2).
/// assert!((eigen.vectors.at(0, 0) - eigen.vectors.at(1, 0)).abs() < 1e-6);
/// # Ok::<(), Error>(())
/// ```
pub fn symmetric_eigen<T: Element>(s: MatRef<'_, T>) -> Result<SymmetricEigen<f32>> {
    let n = s.rows();
    s.expect_shape("s (square)", [n, n])?;
    let mut a = vec![0.0f64; n * n];
    for i in 0..n {
        for (j, v) in s.row(i)[..=i].iter().enumerate() {
            let v = f64::from(v.to_f32());
            if !v.is_finite() {
                return Err(Error::NonFinite {
                    what: "s",
                    index: i * n + j,
                });
            }
            a[i * n + j] = v;
            a[j * n + i] = v;
        }
    }
    // Rows of V^T: the rotations act on contiguous rows there too.
    let mut vt: Vec<f64> = (0..n * n)
        .map(|x| if x / n == x % n { 1.0 } else { 0.0 })
        .collect();
    let norm = libm::sqrt(a.iter().map(|x| x * x).sum());
    let mut converged = false;
    for _sweep in 0..MAX_JACOBI_SWEEPS {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (app, aqq, apq) = (a[p * n + p], a[q * n + q], a[p * n + q]);
                if negligible(apq, app, aqq, norm) {
                    continue;
                }
                rotated = true;
                let (c, sn, t) = jacobi_rotation(app, aqq, apq);
                // Rows p and q of J^T A; outside the 2 x 2 block they are rows of J^T A J.
                rotate_pair(&mut a, n, p, q, c, sn);
                a[p * n + p] = app - t * apq;
                a[q * n + q] = aqq + t * apq;
                a[p * n + q] = 0.0;
                a[q * n + p] = 0.0;
                for r in 0..n {
                    if r != p && r != q {
                        a[r * n + p] = a[p * n + r];
                        a[r * n + q] = a[q * n + r];
                    }
                }
                rotate_pair(&mut vt, n, p, q, c, sn);
            }
        }
        if !rotated {
            converged = true;
            break;
        }
    }
    if !converged {
        return Err(Error::NotConverged {
            what: "symmetric Jacobi eigensolver",
            iterations: MAX_JACOBI_SWEEPS,
        });
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| a[y * n + y].total_cmp(&a[x * n + x]).then(x.cmp(&y)));
    let values = order.iter().map(|&j| a[j * n + j] as f32).collect();
    let mut vectors = Mat::from_fn(n, n, |i, j| vt[order[j] * n + i] as f32)?;
    vectors.normalise_column_signs();
    Ok(SymmetricEigen { values, vectors })
}

/// Rows `p < q` of the `n`-column matrix `m`: `(x, y) <- (c x - s y, s x + c y)`.
#[inline(always)]
fn rotate_pair(m: &mut [f64], n: usize, p: usize, q: usize, c: f64, s: f64) {
    let (top, bottom) = m.split_at_mut(q * n);
    for (x, y) in top[p * n..][..n].iter_mut().zip(&mut bottom[..n]) {
        let (u, v) = (*x, *y);
        *x = c * u - s * v;
        *y = s * u + c * v;
    }
}

/// LoRA extraction from the exact thin SVD: `B = U_r sqrt(S_r)`, `A = sqrt(S_r) V_r^T`, with `r`
/// picked by `rank` (fixed, energy kept, or relative error).
///
/// ```
/// use kernels_cpu::prelude::*;
/// // delta = b a^T with b = (1, 2, 3), a = (1, -1): rank one.
/// let delta = Mat::from_fn(3, 2, |i, j| (i + 1) as f32 * if j == 0 { 1.0 } else { -1.0 })?;
/// let lora = lora_extract(&Cpu::detect(), delta.as_ref(), LoraRank::Energy(0.99))?;
/// assert_eq!((lora.b.shape(), lora.a.shape()), ([3, 1], [1, 2]));
/// let product = Mat::widen(lora.b.as_ref()).matmul(&Mat::widen(lora.a.as_ref()))?;
/// assert!(product.distance(&Mat::widen(delta.as_ref()))? < 1e-5);
/// # Ok::<(), Error>(())
/// ```
pub fn lora_extract<T: Element>(
    cpu: &Cpu,
    delta: MatRef<'_, T>,
    rank: LoraRank,
) -> Result<Lora<f32>> {
    let svd = thin_svd(cpu, delta)?;
    let s: Vec<f64> = svd.s.iter().map(|&v| f64::from(v)).collect();
    let r = lora_rank(rank, &s)?;
    svd.lora(r)
}

/// LoRA extraction of rank `params.rank` from the randomized SVD: what large `delta`s
/// (4096 x 11008 projections) call, at a fraction of the exact SVD's cost.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let delta = Mat::from_fn(30, 20, |i, j| ((i % 3) as f32 - 1.0) * ((j % 4) as f32 - 1.5))?;
/// let lora = lora_extract_randomized(&Cpu::detect(), delta.as_ref(), RsvdParams::new(1))?;
/// assert_eq!((lora.b.shape(), lora.a.shape()), ([30, 1], [1, 20]));
/// let (b, a, delta) = (Mat::widen(lora.b.as_ref()), Mat::widen(lora.a.as_ref()), Mat::widen(delta.as_ref()));
/// assert!(b.matmul(&a)?.distance(&delta)? <= 1e-5 * delta.frobenius_norm());
/// # Ok::<(), Error>(())
/// ```
pub fn lora_extract_randomized<T: Element>(
    cpu: &Cpu,
    delta: MatRef<'_, T>,
    params: RsvdParams,
) -> Result<Lora<f32>> {
    let svd = randomized_svd(cpu, delta, params)?;
    svd.lora(svd.s.len())
}

/// The OPCM projection of a new task vector `tau` (`m x n`) against the merged task vector's SVD
/// `merged` (see `kernels_core::ops::lowrank::opcm_project_ref` for the contract):
/// `P = U^T tau V`, zero its diagonal and leading `r x r` block, `out = U P V^T`, four GEMMs.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let cpu = Cpu::detect();
/// // The merged task vector so far, and its SVD.
/// let merged = [2.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.5];
/// let svd = thin_svd(&cpu, MatRef::from_slice(&merged, 3, 3)?)?;
/// let tau = [1.0f32; 9];
/// let mut out = [0.0f32; 9];
/// opcm_project(
///     &cpu,
///     svd.as_ref(),
///     MatRef::from_slice(&tau, 3, 3)?,
///     OpcmParams::default(),
///     MatMut::from_slice(&mut out, 3, 3)?,
/// )?;
/// // The protected block is r = 1 (2 of the sum 3.5 is more than alpha = half): with the
/// // diagonal, what tau shares with the merged directions goes; the rest stays.
/// for (i, v) in out.iter().enumerate() {
///     let expect = if i % 4 == 0 { 0.0 } else { 1.0 };
///     assert!((v - expect).abs() < 1e-5, "{i}: {v}");
/// }
/// # Ok::<(), Error>(())
/// ```
pub fn opcm_project<T: Element>(
    cpu: &Cpu,
    merged: SvdRef<'_, T>,
    tau: MatRef<'_, T>,
    params: OpcmParams,
    mut out: MatMut<'_, f32>,
) -> Result<()> {
    let SvdRef { u, s, v } = merged;
    validate_opcm(u.shape(), s.len(), v.shape(), tau.shape())?;
    let (m, n) = (tau.rows(), tau.cols());
    out.expect_shape("out", [m, n])?;
    let r = opcm_rank(s, params.alpha)?;
    let (u, v, tau) = (
        as_f32_checked(cpu, "u", u)?.0,
        as_f32_checked(cpu, "v", v)?.0,
        as_f32_checked(cpu, "tau", tau)?.0,
    );
    let ut_tau = product(cpu, u.view(), Transpose::Yes, tau.view(), Transpose::No)?;
    let mut p = product(cpu, ut_tau.as_ref(), Transpose::No, v.view(), Transpose::No)?;
    for i in 0..p.rows() {
        for (j, x) in p.row_mut(i).iter_mut().enumerate() {
            if i == j || (i < r && j < r) {
                *x = 0.0;
            }
        }
    }
    let up = product(cpu, u.view(), Transpose::No, p.as_ref(), Transpose::No)?;
    gemm(
        cpu,
        1.0,
        up.as_ref(),
        Transpose::No,
        v.view(),
        Transpose::Yes,
        0.0,
        out.rb_mut(),
    )
}

/// Whether the streaming SVD subtracts the running mean of the rows (PCA) or not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Centering {
    /// The rows as they are: a truncated SVD of everything seen. Default.
    #[default]
    None,
    /// The rows minus their running mean: PCA.
    Mean,
}

/// Streaming truncated SVD / PCA of rows that arrive in minibatches (what EVA runs over
/// activations): only the rank-`r` state (`r` singular values, `r x dim` right vectors, and the
/// mean when centring) is kept between batches. It follows the [`MultiPass`] protocol with a
/// single pass: [`Self::feed`] every batch, then [`MultiPass::finish`] (or read the state at any
/// time).
///
/// ```
/// use kernels_cpu::prelude::*;
/// let cpu = Cpu::detect();
/// // Rows on the line y = 2x: one component.
/// let batches = [[1.0f32, 2.0, -1.0, -2.0], [3.0, 6.0, 0.5, 1.0]];
/// let mut pca = StreamingSvd::new(2, 1, Centering::None)?;
/// for rows in &batches {
///     pca.feed(&cpu, MatRef::from_slice(rows, 2, 2)?)?;
/// }
/// assert!(!pca.next_pass()?);
/// assert_eq!(pca.rows_seen(), 4);
/// assert_eq!(pca.singular_values().len(), 1);
/// assert_eq!(pca.mean(), [0.0, 0.0]); // not centring
/// assert_eq!(pca.components().shape(), [1, 2]);
/// let components = pca.finish()?;
/// assert!((components.at(0, 1) / components.at(0, 0) - 2.0).abs() < 1e-5);
/// # Ok::<(), Error>(())
/// ```
///
/// Each [`StreamingSvd::feed`] takes the SVD of `[diag(s) V^T; batch]` (and, when centring,
/// the mean-correction row of incremental PCA) and keeps its leading `r` triplets; it returns
/// how far the subspace moved, so a caller can stop once it settles. When the rows seen have
/// rank at most `r` the state is exact; otherwise it is the standard incremental approximation
/// (Ross et al. 2008), which drops what each truncation discards.
#[derive(Clone, Debug)]
pub struct StreamingSvd {
    dim: usize,
    rank: usize,
    center: bool,
    rows_seen: u64,
    mean: Vec<f64>,
    s: Vec<f32>,
    /// `s.len() x dim`.
    vt: Mat<f32>,
}

impl StreamingSvd {
    /// A state for rows of `dim` columns keeping `rank` components (`1 <= rank <= dim`).
    pub fn new(dim: usize, rank: usize, centering: Centering) -> Result<Self> {
        if rank == 0 || rank > dim {
            return Err(Error::InvalidParam {
                name: "rank",
                value: rank as f64,
                expected: "in 1..=dim",
            });
        }
        Ok(Self {
            dim,
            rank,
            center: centering == Centering::Mean,
            rows_seen: 0,
            mean: vec![0.0; dim],
            s: Vec::new(),
            vt: Mat::zeros(0, dim)?,
        })
    }

    /// Folds in a minibatch of rows (`b x dim`). Returns the subspace change
    /// `||sin Theta||_F^2 = r - ||V_old^T V_new||_F^2` between the components before and after
    /// (0 when unchanged, up to `r`; the first batch returns the kept rank), so a caller can stop
    /// once it settles. On error the state is unchanged.
    pub fn feed<T: Element>(&mut self, cpu: &Cpu, batch: MatRef<'_, T>) -> Result<f64> {
        let b = batch.rows();
        if batch.cols() != self.dim {
            return Err(Error::ShapeMismatch {
                what: "batch",
                expected: [b, self.dim],
                found: batch.shape(),
            });
        }
        let mut x = widen_checked("batch", batch)?;
        if b == 0 {
            return Ok(0.0);
        }
        let kept = self.s.len();
        let correction = self.center && self.rows_seen > 0;
        let stacked_rows = kept + b + usize::from(correction);
        let mut stacked = Mat::zeros(stacked_rows, self.dim)?;
        for i in 0..kept {
            for (o, &v) in stacked.row_mut(i).iter_mut().zip(self.vt.row(i)) {
                *o = self.s[i] * v;
            }
        }
        let mut new_mean = self.mean.clone();
        if self.center {
            let (n_old, n_b) = (self.rows_seen as f64, b as f64);
            let batch_mean: Vec<f64> = (0..self.dim)
                .map(|j| (0..b).map(|i| f64::from(x.at(i, j))).sum::<f64>() / n_b)
                .collect();
            for (j, m) in new_mean.iter_mut().enumerate() {
                *m = (n_old * self.mean[j] + n_b * batch_mean[j]) / (n_old + n_b);
            }
            for i in 0..b {
                for (v, m) in x.row_mut(i).iter_mut().zip(&batch_mean) {
                    *v = (f64::from(*v) - m) as f32;
                }
            }
            if correction {
                let weight = libm::sqrt(n_old * n_b / (n_old + n_b));
                for (j, o) in stacked.row_mut(kept + b).iter_mut().enumerate() {
                    *o = (weight * (self.mean[j] - batch_mean[j])) as f32;
                }
            }
        }
        for i in 0..b {
            stacked.row_mut(kept + i).copy_from_slice(x.row(i));
        }
        let svd = svd_of_transposed(cpu, transpose(stacked.as_ref())?)?;
        let r = self.rank.min(svd.s.len());
        let vt_new = transpose(svd.v.as_ref().submatrix(0, 0, self.dim, r)?)?;
        let change = if kept == 0 {
            r as f64
        } else {
            let overlap = product(
                cpu,
                self.vt.as_ref(),
                Transpose::No,
                vt_new.as_ref(),
                Transpose::Yes,
            )?;
            let captured: f64 = overlap
                .as_slice()
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum();
            (kept.max(r) as f64 - captured).max(0.0)
        };
        self.s = svd.s[..r].to_vec();
        self.vt = vt_new;
        self.mean = new_mean;
        self.rows_seen += b as u64;
        Ok(change)
    }

    /// Singular values of the (centred) rows seen, descending, at most `rank`.
    #[must_use]
    pub fn singular_values(&self) -> &[f32] {
        &self.s
    }

    /// The components as rows (`singular_values().len() x dim`), orthonormal.
    #[must_use]
    pub fn components(&self) -> &Mat<f32> {
        &self.vt
    }

    /// The running mean of the rows (zeros unless centring).
    #[must_use]
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }

    /// Rows folded in so far.
    #[must_use]
    pub fn rows_seen(&self) -> u64 {
        self.rows_seen
    }
}

impl MultiPass for StreamingSvd {
    /// The components as rows (`singular_values().len() x dim`), orthonormal.
    type Output = Mat<f32>;

    /// One pass: always `false`.
    fn next_pass(&mut self) -> Result<bool> {
        Ok(false)
    }

    fn finish(&self) -> Result<Mat<f32>> {
        Ok(self.vt.clone())
    }
}
