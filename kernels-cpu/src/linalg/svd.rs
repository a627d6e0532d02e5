//! Thin SVD (Householder QR, then one-sided Jacobi), randomized truncated SVD, symmetric
//! eigendecomposition, LoRA extraction, the OPCM step and the streaming truncated SVD.

use alloc::vec;
use alloc::vec::Vec;

use kernels_core::ops::lowrank::{LoraRank, RsvdParams, lora_rank, opcm_rank};
use kernels_core::{CounterRng, Element, Error, Mat, MatMut, MatRef, Result};

use super::qr::{dot, qr_of_transposed, transpose};
use super::{Transpose, gemm, product, transposed_checked, widen_checked};
use crate::Cpu;

/// Sweep bound of the one-sided Jacobi SVD and of the symmetric Jacobi eigensolver. Random
/// matrices converge in 6 to 12 sweeps; condition `1e6` in about 15.
pub const MAX_JACOBI_SWEEPS: usize = 60;

/// A thin SVD in `f32`: `A = U diag(s) V^T`, `s` descending, signs normalised as
/// `kernels_core::ops::lowrank::Svd` (largest-magnitude entry of each column of `U` positive).
#[derive(Clone, Debug, PartialEq)]
pub struct Svd {
    /// `m x k`, orthonormal columns.
    pub u: Mat<f32>,
    /// `k` singular values, descending, `>= 0`.
    pub s: Vec<f32>,
    /// `n x k`, orthonormal columns.
    pub v: Mat<f32>,
}

/// `f64` dot product of `f32` vectors with four partial sums.
// PERF: Jacobi's stopping test compares this against `eps_f32 sqrt(k)` of the norms; an `f32`
// sum's own rounding (about `eps sqrt(k)` too) would keep the sweeps from converging.
#[inline(always)]
fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    let mut partial = [0.0f64; 4];
    let (a4, b4) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = a4
        .remainder()
        .iter()
        .zip(b4.remainder())
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    for (x, y) in a4.zip(b4) {
        for i in 0..4 {
            partial[i] += f64::from(x[i]) * f64::from(y[i]);
        }
    }
    partial.iter().sum::<f64>() + tail
}

/// Rotates rows `p < q` of `rows` (each `len` long): `(x, y) <- (c x - s y, s x + c y)`.
#[inline(always)]
fn rotate_rows(rows: &mut [f32], len: usize, p: usize, q: usize, c: f32, s: f32) {
    let (left, right) = rows.split_at_mut(q * len);
    let x = &mut left[p * len..][..len];
    let y = &mut right[..len];
    for (x, y) in x.iter_mut().zip(y.iter_mut()) {
        let (a, b) = (*x, *y);
        *x = c * a - s * b;
        *y = s * a + c * b;
    }
}

/// Cyclic one-sided Jacobi on the rows of `x` (`k x len`), accumulating the same rotations into
/// the rows of `rotations` (`k x k`), until every pair of rows is orthogonal to within
/// `eps sqrt(k)` of the product of their norms.
fn jacobi_sweeps(x: &mut Mat<f32>, rotations: &mut Mat<f32>) -> Result<()> {
    let (k, len) = (x.rows(), x.cols());
    let tol = f64::from(f32::EPSILON) * libm::sqrt(k.max(1) as f64);
    for _sweep in 0..MAX_JACOBI_SWEEPS {
        let mut rotated = false;
        let mut norms: Vec<f64> = (0..k).map(|j| dot_f64(x.row(j), x.row(j))).collect();
        for p in 0..k.saturating_sub(1) {
            // de Rijk's ordering: the largest remaining row first cuts the sweep count.
            let largest = (p..k)
                .max_by(|&a, &b| norms[a].total_cmp(&norms[b]).then(b.cmp(&a)))
                .unwrap_or(p);
            if largest != p {
                swap_rows(x, p, largest);
                swap_rows(rotations, p, largest);
                norms.swap(p, largest);
            }
            for q in p + 1..k {
                let (alpha, beta) = (norms[p], norms[q]);
                let gamma = dot_f64(x.row(p), x.row(q));
                if gamma == 0.0 || gamma.abs() <= tol * libm::sqrt(alpha * beta) {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + libm::sqrt(1.0 + zeta * zeta));
                let c = 1.0 / libm::sqrt(1.0 + t * t);
                let s = c * t;
                rotate_rows(x.as_mut_slice(), len, p, q, c as f32, s as f32);
                rotate_rows(rotations.as_mut_slice(), k, p, q, c as f32, s as f32);
                norms[p] = dot_f64(x.row(p), x.row(p));
                norms[q] = dot_f64(x.row(q), x.row(q));
            }
        }
        if !rotated {
            return Ok(());
        }
    }
    Err(Error::NotConverged {
        what: "one-sided Jacobi SVD",
        iterations: MAX_JACOBI_SWEEPS,
    })
}

fn swap_rows(m: &mut Mat<f32>, a: usize, b: usize) {
    if a == b {
        return;
    }
    let (lo, hi) = (a.min(b), a.max(b));
    let cols = m.cols();
    let (top, bottom) = m.as_mut_slice().split_at_mut(hi * cols);
    top[lo * cols..][..cols].swap_with_slice(&mut bottom[..cols]);
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

/// Flips the sign of each singular pair so that the largest-magnitude entry of `u`'s column is
/// positive (the first such entry on ties). `vt` holds `V^T` (rows are right vectors).
fn normalise_signs(u: &mut Mat<f32>, vt: &mut Mat<f32>) {
    for j in 0..u.cols() {
        let mut best = 0;
        for i in 0..u.rows() {
            if u.at(i, j).abs() > u.at(best, j).abs() {
                best = i;
            }
        }
        if u.rows() > 0 && u.at(best, j) < 0.0 {
            for i in 0..u.rows() {
                *u.at_mut(i, j) = -u.at(i, j);
            }
            vt.row_mut(j).iter_mut().for_each(|v| *v = -*v);
        }
    }
}

/// Thin SVD of the matrix `A` given as `w = A^T` (`n x m`, `m >= n`), as `(U, s, V^T)`.
fn svd_of_transposed_tall(cpu: &Cpu, w: Mat<f32>) -> Result<(Mat<f32>, Vec<f32>, Mat<f32>)> {
    // A = Q R; Jacobi on X = R^T, whose columns are R's rows: X V_x = W with orthogonal columns,
    // so R = V_x S U_x^T and A = (Q V_x) S U_x^T with U_x = W / S.
    let (qt, mut r) = qr_of_transposed(cpu, w)?;
    let k = r.rows();
    let mut rotations = Mat::from_fn(k, k, |i, j| if i == j { 1.0 } else { 0.0 });
    jacobi_sweeps(&mut r, &mut rotations)?;
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
    let mut vt = Mat::zeros(k, r.cols());
    let mut v_x_t = Mat::zeros(k, k);
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

/// Thin SVD of `A` given as `w = A^T`, any shape.
fn svd_of_transposed(cpu: &Cpu, w: Mat<f32>) -> Result<Svd> {
    let (n, m) = (w.rows(), w.cols());
    if m >= n {
        let (u, s, vt) = svd_of_transposed_tall(cpu, w)?;
        Ok(Svd {
            u,
            s,
            v: transpose(vt.as_ref()),
        })
    } else {
        // A^T = U' S V'^T, so A = V' S U'^T; A^T given transposed is A itself.
        let (u_t, s, mut vt_t) = svd_of_transposed_tall(cpu, transpose(w.as_ref()))?;
        let mut u = transpose(vt_t.as_ref());
        let mut ut_of_a = transpose(u_t.as_ref());
        normalise_signs(&mut u, &mut ut_of_a);
        vt_t = ut_of_a;
        Ok(Svd {
            u,
            s,
            v: transpose(vt_t.as_ref()),
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
pub fn thin_svd<T: Element>(cpu: &Cpu, a: MatRef<'_, T>) -> Result<Svd> {
    svd_of_transposed(cpu, transposed_checked("a", a)?)
}

/// Randomized truncated SVD (Halko, Martinsson and Tropp): `rank + oversample` Gaussian probes
/// (the same counter-based draws as the reference), `power_iterations` each re-orthonormalised
/// by Householder QR, then the thin SVD of the projected `(rank + oversample) x n` matrix.
pub fn randomized_svd<T: Element>(cpu: &Cpu, a: MatRef<'_, T>, params: RsvdParams) -> Result<Svd> {
    let a = widen_checked("a", a)?;
    let (m, n) = (a.rows(), a.cols());
    let k = m.min(n);
    if params.rank == 0 || params.rank > k {
        return Err(Error::InvalidParam {
            name: "rank",
            value: params.rank as f64,
            expected: "in 1..=min(rows, cols)",
        });
    }
    let probes = params.rank.saturating_add(params.oversample).min(k);
    let rng = CounterRng::new(params.seed);
    // Omega^T (probes x n), drawn at the reference's indices.
    let omega_t = Mat::from_fn(probes, n, |j, i| {
        rng.normal_at((i * probes + j) as u64) as f32
    });
    let orthonormal_rows = |w: Mat<f32>| qr_of_transposed(cpu, w).map(|(qt, _)| qt);
    // Bases are kept transposed (probes x m): Y^T = Omega^T A^T.
    let mut qt = orthonormal_rows(product(
        cpu,
        omega_t.as_ref(),
        Transpose::No,
        a.as_ref(),
        Transpose::Yes,
    )?)?;
    for _ in 0..params.power_iterations {
        let zt = orthonormal_rows(product(
            cpu,
            qt.as_ref(),
            Transpose::No,
            a.as_ref(),
            Transpose::No,
        )?)?;
        qt = orthonormal_rows(product(
            cpu,
            zt.as_ref(),
            Transpose::No,
            a.as_ref(),
            Transpose::Yes,
        )?)?;
    }
    // B = Q^T A (probes x n); its thin SVD from B^T given transposed, i.e. B.
    let b = product(cpu, qt.as_ref(), Transpose::No, a.as_ref(), Transpose::No)?;
    let small = svd_of_transposed(cpu, transpose(b.as_ref()))?;
    let mut u = product(
        cpu,
        qt.as_ref(),
        Transpose::Yes,
        small.u.as_ref(),
        Transpose::No,
    )?;
    let mut vt = transpose(small.v.as_ref());
    normalise_signs(&mut u, &mut vt);
    let r = params.rank.min(small.s.len());
    Ok(Svd {
        u: leading_cols(&u, r),
        s: small.s[..r].to_vec(),
        v: transpose(leading_rows(&vt, r).as_ref()),
    })
}

fn leading_cols(a: &Mat<f32>, cols: usize) -> Mat<f32> {
    Mat::from_fn(a.rows(), cols, |i, j| a.at(i, j))
}

fn leading_rows(a: &Mat<f32>, rows: usize) -> Mat<f32> {
    Mat::from_fn(rows, a.cols(), |i, j| a.at(i, j))
}

/// `S = V diag(values) V^T` of a symmetric matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct SymmetricEigen {
    /// Eigenvalues, descending.
    pub values: Vec<f32>,
    /// `n x n`; column `j` is the eigenvector of `values[j]`, its largest-magnitude entry positive.
    pub vectors: Mat<f32>,
}

/// Symmetric eigendecomposition by cyclic two-sided Jacobi (accurate to the last bits of the
/// small eigenvalues, and simple; `O(n^3)` per sweep, meant for Gram matrices of a few hundred
/// rows, which is what the Gram-matrix path of low-rank methods forms). Only the lower triangle
/// of `s` is read. At most [`MAX_JACOBI_SWEEPS`] sweeps, else [`Error::NotConverged`].
pub fn symmetric_eigen<T: Element>(cpu: &Cpu, s: MatRef<'_, T>) -> Result<SymmetricEigen> {
    let _ = cpu;
    let n = s.rows();
    s.expect_shape("s (square)", [n, n])?;
    let lower = widen_checked("s", s)?;
    // Work in f64: a sweep is O(n^3) on a matrix that is small by contract, and f64 keeps the
    // rotation angles of nearly equal eigenvalues exact to f32 precision.
    let mut a: Vec<f64> = (0..n * n)
        .map(|x| {
            let (i, j) = (x / n, x % n);
            f64::from(if i >= j {
                lower.at(i, j)
            } else {
                lower.at(j, i)
            })
        })
        .collect();
    let mut vectors: Vec<f64> = (0..n * n)
        .map(|x| if x / n == x % n { 1.0 } else { 0.0 })
        .collect();
    let mut converged = false;
    for _sweep in 0..MAX_JACOBI_SWEEPS {
        let off: f64 = (0..n * n)
            .filter(|x| x / n != x % n)
            .map(|x| a[x] * a[x])
            .sum();
        let diag: f64 = (0..n).map(|i| a[i * n + i] * a[i * n + i]).sum();
        // Off-diagonal mass below (eps_f32 / 100)^2 of the total: far beneath f32 resolution.
        let floor = f64::from(f32::EPSILON) / 100.0;
        if off <= floor * floor * (diag + off) || off == 0.0 {
            converged = true;
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (a[p * n + p], a[q * n + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + libm::sqrt(1.0 + theta * theta));
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / libm::sqrt(1.0 + t * t);
                let sn = t * c;
                // A <- J^T A J on rows and columns p, q.
                for r in 0..n {
                    let (arp, arq) = (a[r * n + p], a[r * n + q]);
                    a[r * n + p] = c * arp - sn * arq;
                    a[r * n + q] = sn * arp + c * arq;
                }
                for r in 0..n {
                    let (apr, aqr) = (a[p * n + r], a[q * n + r]);
                    a[p * n + r] = c * apr - sn * aqr;
                    a[q * n + r] = sn * apr + c * aqr;
                }
                for r in 0..n {
                    let (vrp, vrq) = (vectors[r * n + p], vectors[r * n + q]);
                    vectors[r * n + p] = c * vrp - sn * vrq;
                    vectors[r * n + q] = sn * vrp + c * vrq;
                }
            }
        }
    }
    if !converged && n > 0 {
        return Err(Error::NotConverged {
            what: "symmetric Jacobi eigensolver",
            iterations: MAX_JACOBI_SWEEPS,
        });
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| a[y * n + y].total_cmp(&a[x * n + x]).then(x.cmp(&y)));
    let values = order.iter().map(|&j| a[j * n + j] as f32).collect();
    let mut vectors = Mat::from_fn(n, n, |i, j| vectors[i * n + order[j]] as f32);
    for j in 0..n {
        let best = (0..n).fold(0, |b, i| {
            if vectors.at(i, j).abs() > vectors.at(b, j).abs() {
                i
            } else {
                b
            }
        });
        if vectors.at(best, j) < 0.0 {
            for i in 0..n {
                *vectors.at_mut(i, j) = -vectors.at(i, j);
            }
        }
    }
    Ok(SymmetricEigen { values, vectors })
}

/// A LoRA pair `delta ~ B A` in `f32`.
#[derive(Clone, Debug, PartialEq)]
pub struct Lora {
    /// `m x r`: `U_r sqrt(S_r)`.
    pub b: Mat<f32>,
    /// `r x n`: `sqrt(S_r) V_r^T`.
    pub a: Mat<f32>,
    /// The singular values the rank rule saw, descending (all of them for the thin SVD).
    pub singular_values: Vec<f32>,
}

fn lora_from_svd(svd: &Svd, r: usize) -> Lora {
    let root: Vec<f32> = svd.s[..r].iter().map(|&v| libm::sqrtf(v)).collect();
    Lora {
        b: Mat::from_fn(svd.u.rows(), r, |i, j| svd.u.at(i, j) * root[j]),
        a: Mat::from_fn(r, svd.v.rows(), |i, j| root[i] * svd.v.at(j, i)),
        singular_values: svd.s.clone(),
    }
}

/// LoRA extraction from the exact thin SVD: `B = U_r sqrt(S_r)`, `A = sqrt(S_r) V_r^T`, with `r`
/// picked by `rank` (fixed, energy kept, or relative error).
pub fn lora_extract<T: Element>(cpu: &Cpu, delta: MatRef<'_, T>, rank: LoraRank) -> Result<Lora> {
    let svd = thin_svd(cpu, delta)?;
    let s: Vec<f64> = svd.s.iter().map(|&v| f64::from(v)).collect();
    let r = lora_rank(rank, &s)?;
    Ok(lora_from_svd(&svd, r))
}

/// LoRA extraction of rank `params.rank` from the randomized SVD: what large `delta`s
/// (4096 x 11008 projections) call, at a fraction of the exact SVD's cost.
pub fn lora_extract_randomized<T: Element>(
    cpu: &Cpu,
    delta: MatRef<'_, T>,
    params: RsvdParams,
) -> Result<Lora> {
    let svd = randomized_svd(cpu, delta, params)?;
    Ok(lora_from_svd(&svd, svd.s.len()))
}

/// The OPCM projection (see `kernels_core::ops::lowrank::opcm_project_ref` for the contract):
/// `P = U^T tau V`, zero its diagonal and leading `r x r` block, `out = U P V^T`, four GEMMs.
pub fn opcm_project<T: Element>(
    cpu: &Cpu,
    u: MatRef<'_, T>,
    s: &[f32],
    v: MatRef<'_, T>,
    tau: MatRef<'_, T>,
    alpha: f64,
    mut out: MatMut<'_, f32>,
) -> Result<()> {
    let (m, n) = (tau.rows(), tau.cols());
    if u.rows() != m {
        return Err(Error::ShapeMismatch {
            what: "u",
            expected: [m, u.cols()],
            found: u.shape(),
        });
    }
    if v.rows() != n {
        return Err(Error::ShapeMismatch {
            what: "v",
            expected: [n, v.cols()],
            found: v.shape(),
        });
    }
    let expected = u.cols().min(v.cols());
    if s.len() != expected {
        return Err(Error::LengthMismatch {
            what: "s",
            expected,
            found: s.len(),
        });
    }
    out.expect_shape("out", [m, n])?;
    let r = opcm_rank(s, alpha)?;
    let (u, v, tau) = (
        widen_checked("u", u)?,
        widen_checked("v", v)?,
        widen_checked("tau", tau)?,
    );
    let ut_tau = product(cpu, u.as_ref(), Transpose::Yes, tau.as_ref(), Transpose::No)?;
    let mut p = product(
        cpu,
        ut_tau.as_ref(),
        Transpose::No,
        v.as_ref(),
        Transpose::No,
    )?;
    for i in 0..p.rows() {
        for (j, x) in p.row_mut(i).iter_mut().enumerate() {
            if i == j || (i < r && j < r) {
                *x = 0.0;
            }
        }
    }
    let up = product(cpu, u.as_ref(), Transpose::No, p.as_ref(), Transpose::No)?;
    gemm(
        cpu,
        1.0,
        up.as_ref(),
        Transpose::No,
        v.as_ref(),
        Transpose::Yes,
        0.0,
        out.rb_mut(),
    )
}

/// Streaming truncated SVD / PCA of rows that arrive in minibatches (what EVA runs over
/// activations): only the rank-`r` state (`r` singular values, `r x dim` right vectors, and the
/// mean when centring) is kept between updates.
///
/// Each [`StreamingSvd::update`] takes the SVD of `[diag(s) V^T; batch]` (and, when centring,
/// the mean-correction row of incremental PCA) and keeps its leading `r` triplets; it returns
/// how far the subspace moved, so a caller can stop once it settles. When the rows seen have
/// rank at most `r` the state is exact; otherwise it is the standard incremental approximation
/// (Ross et al. 2008), which drops what each truncation discards.
#[derive(Clone, Debug)]
pub struct StreamingSvd {
    cpu: Cpu,
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
    /// A state for rows of `dim` columns keeping `rank` components (`1 <= rank <= dim`); with
    /// `center`, the running mean is subtracted (PCA).
    pub fn new(cpu: &Cpu, dim: usize, rank: usize, center: bool) -> Result<Self> {
        if rank == 0 || rank > dim {
            return Err(Error::InvalidParam {
                name: "rank",
                value: rank as f64,
                expected: "in 1..=dim",
            });
        }
        Ok(Self {
            cpu: *cpu,
            dim,
            rank,
            center,
            rows_seen: 0,
            mean: vec![0.0; dim],
            s: Vec::new(),
            vt: Mat::zeros(0, dim),
        })
    }

    /// Folds in a minibatch of rows (`b x dim`). Returns the subspace change
    /// `||sin Theta||_F^2 = r - ||V_old^T V_new||_F^2` between the components before and after
    /// (0 when unchanged, up to `r`; the first batch returns the kept rank). On error the state
    /// is unchanged.
    pub fn update<T: Element>(&mut self, batch: MatRef<'_, T>) -> Result<f64> {
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
        let mut stacked = Mat::zeros(stacked_rows, self.dim);
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
        let svd = svd_of_transposed(&self.cpu, transpose(stacked.as_ref()))?;
        let r = self.rank.min(svd.s.len());
        let vt_new = transpose(svd.v.as_ref().submatrix(0, 0, self.dim, r)?);
        let change = if kept == 0 {
            r as f64
        } else {
            let overlap = product(
                &self.cpu,
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
