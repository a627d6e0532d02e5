//! Activation sparsity (CATS, TEAL): dense, sparse-input and gathered-output GEMV, the CATS and
//! TEAL MLPs, and threshold calibration.
//!
//! # Contracts
//!
//! * Weights are `T: Element`, vectors `f32`, results `f32`. References accumulate in `f64`.
//! * An activation `v` is **active** under threshold `t` iff `!(|v| <= t)`: `|v| > t` for
//!   numbers, and NaN is always active so that it propagates into the result instead of being
//!   silently dropped. `t <= 0` keeps every non-zero entry, so it computes the dense product;
//!   `t = +inf` keeps only NaNs. A NaN threshold is an [`Error::InvalidParam`](crate::Error::InvalidParam).
//! * Skipped rows are never read (the CPU suite proves it with an instrumented view).
//! * Infinite or NaN weights and activations propagate as IEEE 754 says; nothing is rejected.
//!
//! # Layouts
//!
//! `w` is the `nn.Linear` layout `[out, in]` (read by output row); `w_t` is its transpose
//! `[in, out]` (read by input row, so a skipped activation skips one contiguous row).

#[cfg(feature = "alloc")]
use crate::MatMut;
#[cfg(feature = "alloc")]
use crate::backend::{
    quantile_rank, validate_cats_mlp, validate_sparse_input_gemv, validate_teal_mlp,
};
use crate::backend::{validate_gathered_gemv, validate_gemv};
use crate::error::check_param;
use crate::{Element, MatRef, Real, Result};

/// `silu(g) = g / (1 + e^-g)`, in `f64` (the reference form).
///
/// ```
/// use kernels_core::ops::sparse::{silu_f32, silu_f64};
/// assert_eq!(silu_f64(0.0), 0.0);
/// assert!((silu_f64(2.0) - 2.0 / (1.0 + (-2.0f64).exp())).abs() < 1e-15);
/// assert!((f64::from(silu_f32(2.0)) - silu_f64(2.0)).abs() < 1e-6);
/// ```
#[must_use]
pub fn silu_f64(g: f64) -> f64 {
    g / (1.0 + libm::exp(-g))
}

/// Whether activation `v` survives threshold `t` (see the module contract): `!(|v| <= t)`, so
/// strictly above it, or NaN. `t = 0` skips exact zeros only; a negative `t` keeps everything.
///
/// ```
/// use kernels_core::ops::sparse::is_active;
/// assert!(is_active(0.3, 0.2) && is_active(-0.3, 0.2) && !is_active(0.2, 0.2));
/// assert!(!is_active(0.0, 0.0) && is_active(0.0, -1.0) && is_active(f32::NAN, 1e30));
/// ```
#[inline(always)]
#[must_use]
pub fn is_active(v: f32, t: f32) -> bool {
    !(v.abs() <= t)
}

/// How many entries of `x` are active under threshold `t`: the rows a sparse-input GEMV reads.
///
/// ```
/// use kernels_core::ops::sparse::count_active;
/// assert_eq!(count_active(&[0.5, -0.1, 2.0, f32::NAN], 0.2), 3); // NaN is always active
/// ```
#[must_use]
pub fn count_active(x: &[f32], t: f32) -> usize {
    x.iter().filter(|&&v| is_active(v, t)).count()
}

fn dot_ref<T: Element>(row: &[T], x: &[f32]) -> f64 {
    row.iter()
        .zip(x)
        .map(|(w, v)| w.to_f64() * f64::from(*v))
        .sum()
}

/// Dense GEMV `y = W x` with `W` of shape `[out, in]`.
///
/// ```
/// use kernels_core::{MatRef, ops::sparse::gemv_ref};
/// let w = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // [[1, 2, 3], [4, 5, 6]]
/// let mut y = [0.0f32; 2];
/// gemv_ref(MatRef::from_slice(&w, 2, 3)?, &[1.0, 0.0, -1.0], &mut y)?;
/// assert_eq!(y, [-2.0, -2.0]);
/// assert!(gemv_ref(MatRef::from_slice(&w, 2, 3)?, &[1.0], &mut y).is_err()); // x too short
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn gemv_ref<T: Element>(w: MatRef<'_, T>, x: &[f32], y: &mut [f32]) -> Result<()> {
    validate_gemv(w.shape(), x.len(), y.len())?;
    for (yi, row) in y.iter_mut().zip(w.row_iter()) {
        *yi = dot_ref(row, x) as f32;
    }
    Ok(())
}

/// Dense GEMV through the transposed layout: `y = W_t^T x` with `W_t` of shape `[in, out]`.
///
/// ```
/// use kernels_core::{MatRef, ops::sparse::gemv_t_ref};
/// let w_t = [1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0]; // [in = 3, out = 2]
/// let mut y = [0.0f32; 2];
/// gemv_t_ref(MatRef::from_slice(&w_t, 3, 2)?, &[1.0, 0.0, -1.0], &mut y)?;
/// assert_eq!(y, [-2.0, -2.0]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn gemv_t_ref<T: Element>(w_t: MatRef<'_, T>, x: &[f32], y: &mut [f32]) -> Result<()> {
    sparse_input_gemv_ref(w_t, x, f32::NEG_INFINITY, y)
}

/// Sparse-input GEMV (TEAL form): `y = sum over active i of x_i * w_t[i, :]`, `w_t` `[in, out]`.
/// It reads [`count_active`]`(x, threshold)` rows.
#[cfg(feature = "alloc")]
pub fn sparse_input_gemv_ref<T: Element>(
    w_t: MatRef<'_, T>,
    x: &[f32],
    threshold: f32,
    y: &mut [f32],
) -> Result<()> {
    validate_sparse_input_gemv(w_t.shape(), x.len(), threshold, y.len())?;
    let mut acc = alloc::vec![0.0f64; y.len()];
    for (i, &xi) in x.iter().enumerate() {
        if !is_active(xi, threshold) {
            continue;
        }
        for (a, w) in acc.iter_mut().zip(w_t.row(i)) {
            *a += f64::from(xi) * w.to_f64();
        }
    }
    for (yi, a) in y.iter_mut().zip(acc) {
        *yi = a as f32;
    }
    Ok(())
}

/// Gathered-output GEMV: `out[j] = w[rows[j], :] . x` for the listed rows of `w` `[out, in]`.
///
/// Row indices may repeat and come in any order; one past the end is an error.
///
/// ```
/// use kernels_core::{MatRef, ops::sparse::gathered_gemv_ref};
/// let w = MatRef::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2)?;
/// let mut out = [0.0f32; 3];
/// gathered_gemv_ref(w, &[1.0, 1.0], &[2, 0, 2], &mut out)?;
/// assert_eq!(out, [11.0, 3.0, 11.0]);
/// assert!(gathered_gemv_ref(w, &[1.0, 1.0], &[3], &mut out[..1]).is_err());
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn gathered_gemv_ref<T: Element>(
    w: MatRef<'_, T>,
    x: &[f32],
    rows: &[u32],
    out: &mut [f32],
) -> Result<()> {
    validate_gathered_gemv(w.shape(), x.len(), rows, out.len())?;
    for (o, &r) in out.iter_mut().zip(rows) {
        *o = dot_ref(w.row(r as usize), x) as f32;
    }
    Ok(())
}

/// Largest decode batch the MLP contracts accept.
pub const MAX_MLP_BATCH: usize = 4;

/// `silu(g) = g / (1 + e^-g)` in `f32`, as the fast kernels compute it.
#[inline]
#[must_use]
pub fn silu_f32(g: f32) -> f32 {
    g / (1.0 + libm::expf(-g))
}

/// Weights of a CATS MLP, each `[intermediate, hidden]`, in any backend's matrix type: `M` is a
/// [`MatRef`] on the CPU and a device tensor on the GPU.
///
/// ```
/// use kernels_core::{MatRef, ops::sparse::CatsMlpWeights};
/// let (gate, up, down_t) = ([0.0f32; 6], [0.0f32; 6], [0.0f32; 6]);
/// let weights = CatsMlpWeights {
///     gate: MatRef::from_slice(&gate, 3, 2)?,
///     up: MatRef::from_slice(&up, 3, 2)?,
///     down_t: MatRef::from_slice(&down_t, 3, 2)?,
/// };
/// assert_eq!(weights.map(MatRef::shape).gate, [3, 2]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatsMlpWeights<M> {
    /// `W_gate` in the `nn.Linear` layout (read densely).
    pub gate: M,
    /// `W_up` in the `nn.Linear` layout (rows gathered by the active set).
    pub up: M,
    /// `W_down` transposed (rows read by the active set).
    pub down_t: M,
}

impl<M> CatsMlpWeights<M> {
    /// The same weights through `f` (their shapes, their device copies, ...).
    pub fn map<N>(&self, mut f: impl FnMut(&M) -> N) -> CatsMlpWeights<N> {
        CatsMlpWeights {
            gate: f(&self.gate),
            up: f(&self.up),
            down_t: f(&self.down_t),
        }
    }
}

/// Weights of a TEAL MLP, every projection read by its input index, in any backend's matrix type.
///
/// ```
/// use kernels_core::{MatRef, ops::sparse::TealMlpWeights};
/// let (gate_t, up_t, down_t) = ([0.0f32; 6], [0.0f32; 6], [0.0f32; 6]);
/// let weights = TealMlpWeights {
///     gate_t: MatRef::from_slice(&gate_t, 2, 3)?,
///     up_t: MatRef::from_slice(&up_t, 2, 3)?,
///     down_t: MatRef::from_slice(&down_t, 3, 2)?,
/// };
/// assert_eq!(weights.map(MatRef::shape).down_t, [3, 2]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TealMlpWeights<M> {
    /// `W_gate` transposed, `[hidden, intermediate]`.
    pub gate_t: M,
    /// `W_up` transposed, `[hidden, intermediate]`.
    pub up_t: M,
    /// `W_down` transposed, `[intermediate, hidden]`.
    pub down_t: M,
}

impl<M> TealMlpWeights<M> {
    /// The same weights through `f`.
    pub fn map<N>(&self, mut f: impl FnMut(&M) -> N) -> TealMlpWeights<N> {
        TealMlpWeights {
            gate_t: f(&self.gate_t),
            up_t: f(&self.up_t),
            down_t: f(&self.down_t),
        }
    }
}

/// Calibrated thresholds of the TEAL policy.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct TealThresholds {
    /// Threshold on the hidden state `x`, the input of gate and up. Default 0 (dense).
    pub gate_up: f32,
    /// Threshold on `h = silu(g) * u`, the input of down. Default 0 (dense).
    pub down: f32,
}

impl TealThresholds {
    /// Thresholds for gate/up and down.
    #[must_use]
    pub const fn new(gate_up: f32, down: f32) -> Self {
        Self { gate_up, down }
    }
}

impl Default for TealThresholds {
    fn default() -> Self {
        Self::new(0.0, 0.0)
    }
}

/// What an MLP call read: the rows of the intermediate dimension it touched.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MlpReport {
    /// Intermediate rows of `W_down_t` read (for CATS also of `W_up`), ascending: the union over
    /// the batch of each sample's active set.
    pub active: alloc::vec::Vec<u32>,
    /// The intermediate size.
    pub intermediate: usize,
}

#[cfg(feature = "alloc")]
impl MlpReport {
    /// Fraction of intermediate rows skipped, in `[0, 1]`.
    ///
    /// ```
    /// use kernels_core::ops::sparse::MlpReport;
    /// let report = MlpReport { active: vec![0, 5], intermediate: 8 };
    /// assert_eq!(report.sparsity(), 0.75);
    /// ```
    #[must_use]
    pub fn sparsity(&self) -> f64 {
        if self.intermediate == 0 {
            0.0
        } else {
            1.0 - self.active.len() as f64 / self.intermediate as f64
        }
    }
}

/// The CATS MLP for a decode batch of 1 to 4 rows of `x` `[batch, hidden]`, into `y`.
///
/// `g = W_gate x`, `a = silu(g)`, active set `A_b = {i : a_bi active under t}` per sample, and
/// `y_b = sum over i in A_b of a_bi (W_up[i, :] . x_b) W_down_t[i, :]`. A sample's result does not
/// depend on its batch mates; a row is read once if any sample keeps it.
///
/// ```
/// use kernels_core::{MatMut, MatRef, ops::sparse::{CatsMlpWeights, cats_mlp_ref}};
/// // hidden = 2, intermediate = 2: gate row 1 gives g = 0, so a = silu(0) = 0 is inactive.
/// let (gate, up, down_t) = ([1.0f32, 0.0, 0.0, 0.0], [1.0f32, 1.0, 1.0, 1.0], [1.0f32, 2.0, 3.0, 4.0]);
/// let weights = CatsMlpWeights {
///     gate: MatRef::from_slice(&gate, 2, 2)?,
///     up: MatRef::from_slice(&up, 2, 2)?,
///     down_t: MatRef::from_slice(&down_t, 2, 2)?,
/// };
/// let x = [2.0f32, 1.0];
/// let mut y = [0.0f32; 2];
/// let report = cats_mlp_ref(MatRef::from_slice(&x, 1, 2)?, weights, 0.0, MatMut::from_slice(&mut y, 1, 2)?)?;
/// assert_eq!(report.active, [0]);
/// let h = 2.0 / (1.0 + (-2.0f64).exp()) * 3.0; // silu(2) * (up[0] . x)
/// assert!((f64::from(y[0]) - h).abs() < 1e-6 && (f64::from(y[1]) - 2.0 * h).abs() < 1e-6);
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn cats_mlp_ref<T: Element>(
    x: MatRef<'_, f32>,
    weights: CatsMlpWeights<MatRef<'_, T>>,
    threshold: f32,
    mut y: MatMut<'_, f32>,
) -> Result<MlpReport> {
    let [inter, hidden] =
        validate_cats_mlp(x.shape(), weights.map(MatRef::shape), threshold, y.shape())?;
    let mut read = alloc::vec![false; inter];
    for b in 0..x.rows() {
        let xb = x.row(b);
        let mut acc = alloc::vec![0.0f64; hidden];
        for i in 0..inter {
            let a = silu_f64(dot_ref(weights.gate.row(i), xb));
            if !is_active(a as f32, threshold) {
                continue;
            }
            read[i] = true;
            let h = a * dot_ref(weights.up.row(i), xb);
            for (acc_j, w) in acc.iter_mut().zip(weights.down_t.row(i)) {
                *acc_j += h * w.to_f64();
            }
        }
        for (yj, a) in y.row_mut(b).iter_mut().zip(acc) {
            *yj = a as f32;
        }
    }
    Ok(report_from(&read))
}

#[cfg(feature = "alloc")]
fn report_from(read: &[bool]) -> MlpReport {
    MlpReport {
        active: (0..read.len() as u32)
            .filter(|&i| read[i as usize])
            .collect(),
        intermediate: read.len(),
    }
}

/// The TEAL MLP: each projection's input is thresholded with its own calibrated threshold.
///
/// `g = sparse(W_gate_t, x, t_gate_up)`, `u = sparse(W_up_t, x, t_gate_up)`, `h = silu(g) * u`,
/// `y = sparse(W_down_t, h, t_down)`, where `sparse` is [`sparse_input_gemv_ref`]. The report
/// lists the rows of `W_down_t` read (the active entries of `h`, over the batch).
///
/// ```
/// use kernels_core::{MatMut, MatRef, ops::sparse::{TealMlpWeights, TealThresholds, teal_mlp_ref}};
/// // hidden = 2, intermediate = 2, identity projections: h = silu(x) * x.
/// let identity = [1.0f32, 0.0, 0.0, 1.0];
/// let eye = MatRef::from_slice(&identity, 2, 2)?;
/// let weights = TealMlpWeights { gate_t: eye, up_t: eye, down_t: eye };
/// let x = [3.0f32, 0.1]; // 0.1 is below the gate/up threshold: skipped
/// let mut y = [0.0f32; 2];
/// let thresholds = TealThresholds::new(0.5, 0.0);
/// let report = teal_mlp_ref(MatRef::from_slice(&x, 1, 2)?, weights, thresholds, MatMut::from_slice(&mut y, 1, 2)?)?;
/// assert_eq!(report.active, [0]);
/// assert_eq!(y[1], 0.0);
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn teal_mlp_ref<T: Element>(
    x: MatRef<'_, f32>,
    weights: TealMlpWeights<MatRef<'_, T>>,
    thresholds: TealThresholds,
    mut y: MatMut<'_, f32>,
) -> Result<MlpReport> {
    let [inter, _] =
        validate_teal_mlp(x.shape(), weights.map(MatRef::shape), thresholds, y.shape())?;
    let mut read = alloc::vec![false; inter];
    let mut g = alloc::vec![0.0f32; inter];
    let mut u = alloc::vec![0.0f32; inter];
    for b in 0..x.rows() {
        let xb = x.row(b);
        sparse_input_gemv_ref(weights.gate_t, xb, thresholds.gate_up, &mut g)?;
        sparse_input_gemv_ref(weights.up_t, xb, thresholds.gate_up, &mut u)?;
        let h: alloc::vec::Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| (silu_f64(f64::from(g)) * f64::from(u)) as f32)
            .collect();
        for (r, &v) in read.iter_mut().zip(&h) {
            *r |= is_active(v, thresholds.down);
        }
        sparse_input_gemv_ref(weights.down_t, &h, thresholds.down, y.row_mut(b))?;
    }
    Ok(report_from(&read))
}

/// The ideal speed-up of a memory-bound MLP with a dense gate when a fraction `sparsity` of the
/// up and down rows is skipped: `1 / (1/3 + (2/3)(1 - s))` (1.5x at 50 %, 3x as `s -> 1`).
///
/// ```
/// use kernels_core::ops::sparse::ideal_mlp_speedup;
/// assert!((ideal_mlp_speedup(0.5)? - 1.5).abs() < 1e-12);
/// assert!(ideal_mlp_speedup(1.5).is_err());
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn ideal_mlp_speedup(sparsity: f64) -> Result<f64> {
    check_param(
        "sparsity",
        sparsity,
        "in [0, 1]",
        (0.0..=1.0).contains(&sparsity),
    )?;
    Ok(1.0 / (1.0 / 3.0 + (2.0 / 3.0) * (1.0 - sparsity)))
}

/// The threshold `t` at which a fraction `k` of the samples is inactive: the smallest `t >= 0`
/// with `#{|a| <= t} / n >= k`, i.e. the `ceil(k n)`-th smallest `|a|` (0 when `k = 0`), over
/// `samples` taken as one vector (a calibration set collected batch by batch).
///
/// `k` in `[0, 1]`; samples must be finite and not all empty. Used as a threshold, the strict
/// activity rule ([`is_active`]) then skips exactly the samples with `|a| <= t`.
///
/// ```
/// use kernels_core::ops::sparse::calibrate_threshold_ref;
/// let batches: [&[f32]; 2] = [&[0.5, -0.1, 0.3], &[-0.9, 0.2]];
/// assert_eq!(calibrate_threshold_ref(&batches, 0.5)?, 0.3); // 3 of 5 have |a| <= 0.3
/// assert_eq!(calibrate_threshold_ref(&batches, 0.0)?, 0.0);
/// assert!(calibrate_threshold_ref(&batches, 1.5).is_err());
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn calibrate_threshold_ref(samples: &[&[f32]], k: f64) -> Result<f32> {
    let n: usize = samples.iter().map(|s| s.len()).sum();
    let rank = quantile_rank(n as u64, k)?;
    let mut mags: alloc::vec::Vec<f32> = alloc::vec::Vec::with_capacity(n);
    for chunk in samples {
        crate::error::check_finite("samples", chunk).map_err(|e| match e {
            crate::Error::NonFinite { what, index } => crate::Error::NonFinite {
                what,
                index: index + mags.len(),
            },
            other => other,
        })?;
        mags.extend(chunk.iter().map(|v| v.abs()));
    }
    if rank == 0 {
        return Ok(0.0);
    }
    mags.sort_by(f32::total_cmp);
    Ok(mags[(rank - 1) as usize])
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;
    use crate::Error;
    use alloc::vec;
    use alloc::vec::Vec;
    use half::bf16;

    #[test]
    fn sparse_gemv_matches_hand_computation() {
        // w_t rows: input 0 -> [1, 2], input 1 -> [3, 4], input 2 -> [5, 6].
        let w = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let w_t = MatRef::from_slice(&w, 3, 2).unwrap();
        let mut y = [0.0; 2];
        let x = [0.5, -0.1, 2.0];
        sparse_input_gemv_ref(w_t, &x, 0.2, &mut y).unwrap();
        assert_eq!((count_active(&x, 0.2), y), (2, [0.5 + 10.0, 1.0 + 12.0]));
        // Dense.
        sparse_input_gemv_ref(w_t, &x, 0.0, &mut y).unwrap();
        assert_eq!(
            (count_active(&x, 0.0), y),
            (3, [0.5 - 0.3 + 10.0, 1.0 - 0.4 + 12.0])
        );
        // Infinite threshold: nothing survives.
        sparse_input_gemv_ref(w_t, &x, f32::INFINITY, &mut y).unwrap();
        assert_eq!((count_active(&x, f32::INFINITY), y), (0, [0.0, 0.0]));
        // NaN activations propagate.
        sparse_input_gemv_ref(w_t, &[f32::NAN, 0.0, 0.0], f32::INFINITY, &mut y).unwrap();
        assert!(y.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn transposed_and_gathered_gemv_agree_with_dense() {
        let w: Vec<bf16> = (0..12).map(|i| bf16::from_f32(i as f32 - 5.5)).collect();
        let w_t: Vec<bf16> = (0..12).map(|k| w[(k % 3) * 4 + k / 3]).collect();
        let x = [1.0, -2.0, 0.5, 3.0];
        let mut dense = [0.0; 3];
        gemv_ref(MatRef::from_slice(&w, 3, 4).unwrap(), &x, &mut dense).unwrap();
        let mut via_t = [0.0; 3];
        gemv_t_ref(MatRef::from_slice(&w_t, 4, 3).unwrap(), &x, &mut via_t).unwrap();
        assert_eq!(dense, via_t);
        assert_eq!(dense[0], -5.5 * 1.0 + -4.5 * -2.0 + -3.5 * 0.5 + -2.5 * 3.0);
        let mut gathered = [0.0; 3];
        gathered_gemv_ref(
            MatRef::from_slice(&w, 3, 4).unwrap(),
            &x,
            &[2, 0, 2],
            &mut gathered,
        )
        .unwrap();
        assert_eq!(gathered, [dense[2], dense[0], dense[2]]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let w = [0.0f32; 6];
        let m = MatRef::from_slice(&w, 3, 2).unwrap();
        let mut y2 = [0.0; 2];
        let mut y3 = [0.0; 3];
        assert!(matches!(
            sparse_input_gemv_ref(m, &[1.0; 2], 0.0, &mut y2),
            Err(Error::LengthMismatch {
                what: "x",
                expected: 3,
                found: 2
            })
        ));
        assert!(matches!(
            sparse_input_gemv_ref(m, &[1.0; 3], f32::NAN, &mut y2),
            Err(Error::InvalidParam {
                name: "threshold",
                ..
            })
        ));
        assert!(gemv_ref(m, &[1.0; 2], &mut y2).is_err());
        assert!(gathered_gemv_ref(m, &[1.0; 2], &[3], &mut y3[..1]).is_err());
        assert!(gathered_gemv_ref(m, &[1.0; 2], &[0, 1], &mut y3).is_err());
        assert!(calibrate_threshold_ref(&[], 0.5).is_err());
        assert!(calibrate_threshold_ref(&[&[]], 0.5).is_err());
        assert!(calibrate_threshold_ref(&[&[1.0]], 1.5).is_err());
        assert!(matches!(
            calibrate_threshold_ref(&[&[1.0], &[2.0, f32::NAN]], 0.5),
            Err(Error::NonFinite { index: 2, .. })
        ));
    }

    fn mlp_problem(inter: usize, hidden: usize, batch: usize) -> (Vec<f32>, [Vec<f32>; 3]) {
        let rng = crate::CounterRng::new(7);
        let draw = |offset: u64, n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| rng.normal_at(offset + i as u64) as f32 * 0.5)
                .collect()
        };
        let x = draw(0, batch * hidden);
        let weights = [
            draw(1 << 20, inter * hidden),
            draw(2 << 20, inter * hidden),
            draw(3 << 20, inter * hidden),
        ];
        (x, weights)
    }

    #[test]
    fn cats_mlp_is_dense_at_zero_threshold_and_matches_the_composition() {
        let (inter, hidden, batch) = (24, 7, 3);
        let (x, [gate, up, down_t]) = mlp_problem(inter, hidden, batch);
        let weights = CatsMlpWeights {
            gate: MatRef::from_slice(&gate, inter, hidden).unwrap(),
            up: MatRef::from_slice(&up, inter, hidden).unwrap(),
            down_t: MatRef::from_slice(&down_t, inter, hidden).unwrap(),
        };
        let xm = MatRef::from_slice(&x, batch, hidden).unwrap();
        let t = 0.5;
        let mut y = vec![0.0; batch * hidden];
        let report = cats_mlp_ref(
            xm,
            weights,
            t,
            MatMut::from_slice(&mut y, batch, hidden).unwrap(),
        )
        .unwrap();
        // Recompute sample by sample from the single-op references.
        let mut union = vec![false; inter];
        for b in 0..batch {
            let mut g = vec![0.0; inter];
            gemv_ref(weights.gate, xm.row(b), &mut g).unwrap();
            let mut expect = vec![0.0f64; hidden];
            for i in 0..inter {
                let a = silu_f64(f64::from(g[i]));
                if (a as f32).abs() > t {
                    union[i] = true;
                    let mut u = [0.0];
                    gathered_gemv_ref(weights.up, xm.row(b), &[i as u32], &mut u).unwrap();
                    for j in 0..hidden {
                        expect[j] += a * f64::from(u[0]) * f64::from(down_t[i * hidden + j]);
                    }
                }
            }
            for j in 0..hidden {
                let got = f64::from(y[b * hidden + j]);
                assert!(
                    (got - expect[j]).abs() <= 1e-5 * (1.0 + expect[j].abs()),
                    "{got} {}",
                    expect[j]
                );
            }
        }
        assert_eq!(report.active.len(), union.iter().filter(|&&u| u).count());
        assert!(report.sparsity() > 0.0 && report.sparsity() < 1.0);
        // t <= 0 reads every row.
        let report = cats_mlp_ref(
            xm,
            weights,
            -1.0,
            MatMut::from_slice(&mut y, batch, hidden).unwrap(),
        )
        .unwrap();
        assert_eq!(report.sparsity(), 0.0);
        // Batch 5 is rejected.
        let x5 = vec![0.0; 5 * hidden];
        let mut y5 = vec![0.0; 5 * hidden];
        assert!(
            cats_mlp_ref(
                MatRef::from_slice(&x5, 5, hidden).unwrap(),
                weights,
                0.0,
                MatMut::from_slice(&mut y5, 5, hidden).unwrap()
            )
            .is_err()
        );
    }

    #[test]
    fn teal_mlp_at_zero_thresholds_equals_dense_cats() {
        let (inter, hidden, batch) = (16, 9, 2);
        let (x, [gate, up, down_t]) = mlp_problem(inter, hidden, batch);
        let transpose = |m: &[f32]| -> Vec<f32> {
            (0..inter * hidden)
                .map(|k| m[(k % inter) * hidden + k / inter])
                .collect()
        };
        let (gate_t, up_t) = (transpose(&gate), transpose(&up));
        let xm = MatRef::from_slice(&x, batch, hidden).unwrap();
        let mut y_cats = vec![0.0; batch * hidden];
        let mut y_teal = vec![0.0; batch * hidden];
        cats_mlp_ref(
            xm,
            CatsMlpWeights {
                gate: MatRef::from_slice(&gate, inter, hidden).unwrap(),
                up: MatRef::from_slice(&up, inter, hidden).unwrap(),
                down_t: MatRef::from_slice(&down_t, inter, hidden).unwrap(),
            },
            -1.0,
            MatMut::from_slice(&mut y_cats, batch, hidden).unwrap(),
        )
        .unwrap();
        let weights = TealMlpWeights {
            gate_t: MatRef::from_slice(&gate_t, hidden, inter).unwrap(),
            up_t: MatRef::from_slice(&up_t, hidden, inter).unwrap(),
            down_t: MatRef::from_slice(&down_t, inter, hidden).unwrap(),
        };
        let report = teal_mlp_ref(
            xm,
            weights,
            TealThresholds::new(-1.0, -1.0),
            MatMut::from_slice(&mut y_teal, batch, hidden).unwrap(),
        )
        .unwrap();
        assert_eq!(report.active.len(), inter);
        for (a, b) in y_cats.iter().zip(&y_teal) {
            // TEAL rounds g, u and h to f32 between projections: a few f32 roundings apart.
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
        }
        // A high down threshold reads fewer down rows.
        let sparse = teal_mlp_ref(
            xm,
            weights,
            TealThresholds::new(0.3, 0.2),
            MatMut::from_slice(&mut y_teal, batch, hidden).unwrap(),
        )
        .unwrap();
        assert!(sparse.active.len() < inter);
    }

    #[test]
    fn silu_by_hand() {
        assert_eq!(silu_f64(0.0), 0.0);
        assert!((silu_f64(1.0) - 0.731_058_578_630_004_9).abs() < 1e-15);
        assert!((silu_f64(-1.0) + 0.268_941_421_369_995_1).abs() < 1e-15);
        assert!((silu_f64(30.0) - 30.0).abs() < 1e-10 && silu_f64(-30.0).abs() < 1e-10);
    }

    #[test]
    fn ideal_speedup_matches_the_design() {
        assert_eq!(ideal_mlp_speedup(0.0).unwrap(), 1.0);
        assert!((ideal_mlp_speedup(0.5).unwrap() - 1.5).abs() < 1e-12);
        assert!((ideal_mlp_speedup(1.0).unwrap() - 3.0).abs() < 1e-12);
        assert!(ideal_mlp_speedup(1.1).is_err());
    }

    proptest::proptest! {
        #[test]
        fn sparse_gemv_equals_dense_gemv_of_the_masked_input(
            rows in 0usize..24,
            cols in 0usize..24,
            t in -0.5f32..1.5,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let rng = crate::CounterRng::new(seed);
            let w_t: Vec<f32> = (0..rows * cols).map(|i| rng.normal_at(i as u64) as f32).collect();
            let x: Vec<f32> = (0..rows).map(|i| rng.normal_at((1 << 20) + i as u64) as f32).collect();
            let w_t_view = MatRef::from_slice(&w_t, rows, cols).unwrap();
            let mut sparse = vec![0.0; cols];
            sparse_input_gemv_ref(w_t_view, &x, t, &mut sparse).unwrap();
            let masked: Vec<f32> = x.iter().map(|&v| if v.abs() > t { v } else { 0.0 }).collect();
            proptest::prop_assert_eq!(count_active(&x, t), masked.iter().filter(|v| **v != 0.0).count());
            // The same product through the nn.Linear layout (W = w_t^T).
            let w: Vec<f32> = (0..rows * cols).map(|k| w_t[(k % rows) * cols + k / rows]).collect();
            let mut dense = vec![0.0; cols];
            gemv_ref(MatRef::from_slice(&w, cols, rows).unwrap(), &masked, &mut dense).unwrap();
            for (a, b) in sparse.iter().zip(&dense) {
                proptest::prop_assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{} vs {}", a, b);
            }
        }
    }

    #[test]
    fn calibration_is_the_quantile() {
        let samples = [0.5f32, -0.1, 0.3, -0.9, 0.2];
        let quantile = |k| calibrate_threshold_ref(&[&samples[..2], &samples[2..]], k).unwrap();
        assert_eq!(quantile(0.0), 0.0);
        assert_eq!(quantile(0.2), 0.1);
        assert_eq!(quantile(0.5), 0.3);
        assert_eq!(quantile(0.6), 0.3);
        assert_eq!(quantile(1.0), 0.9);
        // The defining property: at least k n samples are <= t, and fewer are < t.
        let t = quantile(0.7);
        assert!(samples.iter().filter(|v| v.abs() <= t).count() >= 4);
        assert!(samples.iter().filter(|v| v.abs() < t).count() < 4);
    }
}
