//! Ternary compression (ComPEFT): global statistics, global top-k, ternary codes, ternary GEMV and
//! decompress-and-add. The packed byte format lives in [`crate::format`].
//!
//! # Contracts
//!
//! * `tau = theta_ft - theta_base` arrives as one or many slices taken as one flat vector (a whole
//!   model). `sigma = std(tau)` over **all** entries before pruning, with Bessel's correction
//!   (`n - 1`, as `torch.std`; 0 when `n = 1`). The entries the [`KeepRule`] keeps of the whole
//!   model by `|tau|` (the global top-`floor(d n)` for a density `d`, ties by lower flat index,
//!   see [`crate::ops::select`]) become `sign(tau)` (a kept exact zero stays 0, as
//!   `torch.sign`), the rest 0; the scale is `alpha * sigma`. Codes are `i8` in `{-1, 0, 1}`.
//! * Streaming: [`Compeft`] reads the tensors twice (statistics and histogram, then the exact
//!   cut) and then [`CompeftEncoder`] codes them one at a time, so memory is one tensor plus
//!   512 KiB.
//! * NaN or infinite `tau` is rejected ([`crate::Error::NonFinite`]).

use crate::backend::check_codes;
#[cfg(feature = "alloc")]
use crate::backend::sign_code;
use crate::error::{check_len, check_param};
use crate::ops::select::{KeepRule, TopKCut};
use crate::{Element, MatRef, Real, Result};
#[cfg(feature = "alloc")]
use crate::{MultiPass, format, ops::select::TopKApplier};

/// Parameters of ComPEFT.
///
/// ```
/// use kernels_core::ops::{select::KeepRule, ternary::CompeftParams};
/// use kernels_core::ops::ternary::Moments;
/// let params = CompeftParams::default().with_keep(KeepRule::Density(0.05)).with_alpha(2.0);
/// assert_eq!((params.keep, params.alpha), (KeepRule::Density(0.05), 2.0));
/// params.validate()?;
/// assert!(CompeftParams::default().with_alpha(f32::NAN).validate().is_err());
/// let mut moments = Moments::default();
/// moments.observe(&[1.0f32, -1.0, 1.0, -1.0]); // std = sqrt(4 / 3)
/// assert!((f64::from(params.scale(&moments)?) - 2.0 * (4.0f64 / 3.0).sqrt()).abs() < 1e-6);
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct CompeftParams {
    /// What the whole model keeps by magnitude. Default `Density(0.1)`.
    pub keep: KeepRule,
    /// Scale multiplier `alpha`, finite. Default 1.
    pub alpha: f32,
}

impl Default for CompeftParams {
    fn default() -> Self {
        Self {
            keep: KeepRule::Density(0.1),
            alpha: 1.0,
        }
    }
}

impl CompeftParams {
    /// The same parameters keeping `keep` of the model.
    #[must_use]
    pub const fn with_keep(mut self, keep: KeepRule) -> Self {
        self.keep = keep;
        self
    }

    /// The same parameters with another scale multiplier.
    #[must_use]
    pub const fn with_alpha(mut self, alpha: f32) -> Self {
        self.alpha = alpha;
        self
    }

    /// Validates the parameters.
    pub fn validate(&self) -> Result<()> {
        self.keep.validate()?;
        check_param(
            "alpha",
            f64::from(self.alpha),
            "finite",
            self.alpha.is_finite(),
        )
    }

    /// The scale of the codes, `alpha * sigma`, for the model's [`Moments`]; an
    /// [`crate::Error::InvalidParam`] naming `alpha` where that overflows `f32` (no encoding could hold
    /// it).
    pub fn scale(&self, moments: &Moments) -> Result<f32> {
        let scale = (f64::from(self.alpha) * moments.std()) as f32;
        check_param(
            "alpha",
            f64::from(self.alpha),
            "small enough that alpha * std(tau) is a finite f32",
            scale.is_finite(),
        )?;
        Ok(scale)
    }
}

/// Running count, mean and sum of squared deviations (Chan et al.'s pairwise update), so a std
/// over many chunks is as accurate as over one.
///
/// ```
/// use kernels_core::ops::ternary::Moments;
/// let (mut whole, mut first, mut second) = (Moments::default(), Moments::default(), Moments::default());
/// whole.observe(&[1.0f32, 2.0, 3.0, 4.0]);
/// first.observe(&[1.0f32, 2.0]);
/// second.observe(&[3.0f32, 4.0]);
/// first.combine(&second); // what two threads' blocks merge into
/// assert_eq!((first.count(), first.mean()), (4, 2.5));
/// assert!((first.std() - whole.std()).abs() < 1e-15);
/// // A backend's per-block statistics: 2 entries, mean 3.5, sum of squared deviations 0.5.
/// let mut blocks = Moments::default();
/// blocks.combine(&Moments::from_stats(2, 1.5, 0.5));
/// blocks.combine(&Moments::from_stats(2, 3.5, 0.5));
/// assert!((blocks.std() - whole.std()).abs() < 1e-15);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Moments {
    count: u64,
    mean: f64,
    m2: f64,
}

impl Moments {
    /// Adds a chunk.
    pub fn observe<T: Element>(&mut self, chunk: &[T]) {
        if chunk.is_empty() {
            return;
        }
        let n = chunk.len() as f64;
        let mean = chunk.iter().map(|v| v.to_f64()).sum::<f64>() / n;
        let m2 = chunk
            .iter()
            .map(|v| (v.to_f64() - mean) * (v.to_f64() - mean))
            .sum::<f64>();
        self.combine(&Self::from_stats(chunk.len() as u64, mean, m2));
    }

    /// The moments of `count` entries with this mean and sum of squared deviations (what a fast
    /// backend computes per block, to [`Self::combine`]).
    #[must_use]
    pub fn from_stats(count: u64, mean: f64, m2: f64) -> Self {
        Self { count, mean, m2 }
    }

    /// Adds the entries another `Moments` has seen.
    pub fn combine(&mut self, other: &Self) {
        if other.count == 0 {
            return;
        }
        let (a, b) = (self.count as f64, other.count as f64);
        let total = a + b;
        let delta = other.mean - self.mean;
        self.m2 += other.m2 + delta * delta * a * b / total;
        self.mean += delta * b / total;
        self.count += other.count;
    }

    /// Entries seen.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean (0 when empty).
    #[must_use]
    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// Standard deviation with Bessel's correction (0 when fewer than two entries).
    #[must_use]
    pub fn std(&self) -> f64 {
        if self.count < 2 {
            0.0
        } else {
            libm::sqrt(self.m2 / (self.count - 1) as f64)
        }
    }
}

/// What ComPEFT decided for a whole model: the scale and where the top-k cuts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CompeftCut {
    /// `alpha * sigma`.
    pub scale: f32,
    /// The global cut.
    pub cut: TopKCut,
    /// Entries in the model.
    pub total: u64,
}

/// Streaming ComPEFT over a model read tensor by tensor (reference), in the [`MultiPass`]
/// protocol: every tensor to [`Self::feed`] until [`MultiPass::next_pass`] returns `false`, then
/// [`MultiPass::finish`], then each tensor in the same order to a [`CompeftEncoder`].
///
/// ```
/// use kernels_core::{MultiPass, ops::ternary::{Compeft, CompeftEncoder, CompeftParams}};
/// use kernels_core::ops::select::KeepRule;
/// let tensors: [&[f32]; 2] = [&[0.5, -3.0, 1.0, 0.0], &[2.0, -0.25]];
/// let params = CompeftParams::default().with_keep(KeepRule::Density(0.5));
/// let decided = Compeft::new(params)?.run(|| tensors, |c, t| c.feed(t))?;
/// let mut encoder = CompeftEncoder::new(&decided);
/// let mut codes = [0i8; 4];
/// encoder.code(tensors[0], &mut codes)?;
/// assert_eq!(codes, [0, -1, 1, 0]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
#[derive(Clone, Debug)]
pub struct Compeft {
    params: CompeftParams,
    moments: Moments,
    topk: crate::ops::select::StreamingTopK,
    first_pass: bool,
}

#[cfg(feature = "alloc")]
impl Compeft {
    /// A plan; validates `params`.
    pub fn new(params: CompeftParams) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            params,
            moments: Moments::default(),
            topk: crate::ops::select::StreamingTopK::new(params.keep)?,
            first_pass: true,
        })
    }

    /// The next tensor (or chunk) of the current pass.
    pub fn feed<T: Element>(&mut self, tau: &[T]) -> Result<()> {
        self.topk.feed(tau)?;
        if self.first_pass {
            self.moments.observe(tau);
        }
        Ok(())
    }
}

#[cfg(feature = "alloc")]
impl MultiPass for Compeft {
    type Output = CompeftCut;

    fn next_pass(&mut self) -> Result<bool> {
        let again = self.topk.next_pass()?;
        self.first_pass = false;
        Ok(again)
    }

    fn finish(&self) -> Result<CompeftCut> {
        Ok(CompeftCut {
            scale: self.params.scale(&self.moments)?,
            cut: self.topk.finish()?,
            total: self.topk.total(),
        })
    }
}

/// Codes tensors in flat order under a [`CompeftCut`] (reference).
///
/// ```
/// use kernels_core::format::{self, TernaryLayout};
/// use kernels_core::ops::{select::KeepRule, ternary::{CompeftEncoder, CompeftParams, compeft_ref}};
/// let tau = [0.5f32, -3.0, 1.0, 2.0];
/// let (decided, _) = compeft_ref(&[&tau], CompeftParams::default().with_keep(KeepRule::Count(2)))?;
/// let bytes = CompeftEncoder::new(&decided).encode(&tau, &[2, 2], TernaryLayout::Dense2Bit)?;
/// assert_eq!(format::decode(&bytes, 4)?.1, [0, -1, 0, 1]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
#[derive(Clone, Debug)]
pub struct CompeftEncoder {
    applier: TopKApplier,
    scale: f32,
}

#[cfg(feature = "alloc")]
impl CompeftEncoder {
    /// An encoder starting at flat index 0.
    #[must_use]
    pub fn new(decided: &CompeftCut) -> Self {
        Self {
            applier: TopKApplier::new(&decided.cut),
            scale: decided.scale,
        }
    }

    /// Codes the next tensor: `codes[i] = sign(tau_i)` if kept, else 0.
    pub fn code<T: Element>(&mut self, tau: &[T], codes: &mut [i8]) -> Result<()> {
        check_len("codes", tau.len(), codes.len())?;
        crate::error::check_finite("tau", tau)?;
        for (c, t) in codes.iter_mut().zip(tau) {
            let v = t.to_f32();
            *c = if self.applier.keeps(v) {
                sign_code(v)
            } else {
                0
            };
        }
        Ok(())
    }

    /// Codes the next tensor and packs it with `shape` in `layout` ([`format::encode`]).
    pub fn encode<T: Element>(
        &mut self,
        tau: &[T],
        shape: &[u64],
        layout: format::TernaryLayout,
    ) -> Result<alloc::vec::Vec<u8>> {
        let mut codes = alloc::vec![0i8; tau.len()];
        self.code(tau, &mut codes)?;
        format::encode(&codes, shape, self.scale, layout)
    }
}

/// ComPEFT of a whole model held in memory (reference): the decision and one code vector per
/// slice.
///
/// ```
/// use kernels_core::ops::{select::KeepRule, ternary::{CompeftParams, compeft_ref}};
/// let tensors: [&[f32]; 2] = [&[0.5, -3.0, 1.0], &[2.0, -0.25, 0.0]];
/// let params = CompeftParams::default().with_keep(KeepRule::Density(0.5)).with_alpha(1.0);
/// let (decided, codes) = compeft_ref(&tensors, params)?;
/// assert_eq!(codes, [vec![0, -1, 1], vec![1, 0, 0]]);
/// assert_eq!((decided.cut.magnitude, decided.total), (1.0, 6));
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn compeft_ref<T: Element>(
    taus: &[&[T]],
    params: CompeftParams,
) -> Result<(CompeftCut, alloc::vec::Vec<alloc::vec::Vec<i8>>)> {
    params.validate()?;
    let n: usize = taus.iter().map(|t| t.len()).sum();
    let flat: alloc::vec::Vec<f64> = taus
        .iter()
        .flat_map(|t| t.iter().map(|v| v.to_f64()))
        .collect();
    let kept = crate::ops::select::topk_indices_ref(taus, params.keep)?;
    let cut = crate::ops::select::topk_cut_ref(taus, params.keep)?;
    let mut moments = Moments::default();
    for t in taus {
        moments.observe(t);
    }
    let mut codes = alloc::vec![0i8; n];
    for i in kept {
        codes[i as usize] = sign_code(flat[i as usize] as f32);
    }
    let mut out = alloc::vec::Vec::with_capacity(taus.len());
    let mut start = 0;
    for t in taus {
        out.push(codes[start..start + t.len()].to_vec());
        start += t.len();
    }
    let decided = CompeftCut {
        scale: params.scale(&moments)?,
        cut,
        total: n as u64,
    };
    Ok((decided, out))
}

/// Ternary GEMV: `y_r = scale * (sum of x over +1 codes of row r - sum over -1 codes)`,
/// codes `[out, in]`.
///
/// ```
/// use kernels_core::{MatRef, ops::ternary::ternary_gemv_ref};
/// let codes = [1i8, 0, -1, 1]; // [[1, 0], [-1, 1]]
/// let mut y = [0.0f32; 2];
/// ternary_gemv_ref(MatRef::from_slice(&codes, 2, 2)?, 0.5, &[2.0, 4.0], &mut y)?;
/// assert_eq!(y, [1.0, 1.0]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn ternary_gemv_ref(codes: MatRef<'_, i8>, scale: f32, x: &[f32], y: &mut [f32]) -> Result<()> {
    check_len("x", codes.cols(), x.len())?;
    check_len("y", codes.rows(), y.len())?;
    check_param("scale", f64::from(scale), "finite", scale.is_finite())?;
    for (yr, row) in y.iter_mut().zip(codes.row_iter()) {
        check_codes(row)?;
        let s: f64 = row
            .iter()
            .zip(x)
            .map(|(&c, &v)| f64::from(c) * f64::from(v))
            .sum();
        *yr = (f64::from(scale) * s) as f32;
    }
    Ok(())
}

/// Decompress and add: `theta_i += lambda * scale * code_i`, rounded once to `T`.
///
/// ```
/// use kernels_core::ops::ternary::ternary_add_ref;
/// let mut theta = [1.0f32, 1.0, 1.0];
/// ternary_add_ref(&mut theta, &[1, 0, -1], 0.25, 2.0)?;
/// assert_eq!(theta, [1.5, 1.0, 0.5]);
/// assert!(ternary_add_ref(&mut theta, &[2, 0, 0], 0.25, 2.0).is_err()); // not a ternary code
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn ternary_add_ref<T: Element>(
    theta: &mut [T],
    codes: &[i8],
    scale: f32,
    lambda: f32,
) -> Result<()> {
    check_len("codes", theta.len(), codes.len())?;
    check_codes(codes)?;
    check_param("scale", f64::from(scale), "finite", scale.is_finite())?;
    check_param("lambda", f64::from(lambda), "finite", lambda.is_finite())?;
    let step = f64::from(lambda) * f64::from(scale);
    for (t, &c) in theta.iter_mut().zip(codes) {
        if c != 0 {
            *t = T::from_f32((t.to_f64() + step * f64::from(c)) as f32);
        }
    }
    Ok(())
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;
    use half::bf16;
    use proptest::prelude::*;

    #[test]
    fn compeft_by_hand() {
        let a = [0.5f32, -2.0, 0.1];
        let b = [3.0f32, -0.2];
        let params = CompeftParams::default()
            .with_keep(KeepRule::Density(0.4))
            .with_alpha(2.0);
        let (decided, codes) = compeft_ref(&[&a[..], &b[..]], params).unwrap();
        let scale = decided.scale;
        // n = 5, k = 2: 3.0 and -2.0. Sample std of the five values:
        let mean = (0.5 - 2.0 + 0.1 + 3.0 - 0.2) / 5.0;
        let var = [0.5, -2.0, 0.1, 3.0, -0.2]
            .iter()
            .map(|v: &f64| (v - mean) * (v - mean))
            .sum::<f64>()
            / 4.0;
        assert!((f64::from(scale) - 2.0 * var.sqrt()).abs() < 1e-6);
        assert_eq!(codes, [vec![0, -1, 0], vec![1, 0]]);
    }

    #[test]
    fn ternary_gemv_and_add_by_hand() {
        let codes = [1i8, -1, 0, 0, 1, 1];
        let m = MatRef::from_slice(&codes, 2, 3).unwrap();
        let mut y = [0.0; 2];
        ternary_gemv_ref(m, 0.5, &[1.0, 2.0, 4.0], &mut y).unwrap();
        assert_eq!(y, [0.5 * (1.0 - 2.0), 0.5 * 6.0]);
        let mut theta = [bf16::from_f32(1.0); 6];
        ternary_add_ref(&mut theta, &codes, 0.5, 2.0).unwrap();
        let got: Vec<f32> = theta.iter().map(|t| t.to_f32()).collect();
        assert_eq!(got, [2.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
        assert!(
            ternary_gemv_ref(
                MatRef::from_slice(&[2i8], 1, 1).unwrap(),
                1.0,
                &[1.0],
                &mut y[..1]
            )
            .is_err()
        );
        assert!(ternary_add_ref(&mut theta, &codes, f32::NAN, 1.0).is_err());
        assert!(compeft_ref(&[&[f32::INFINITY][..]], CompeftParams::default()).is_err());
        let keep_nothing = CompeftParams::default().with_keep(KeepRule::Density(0.0));
        assert!(Compeft::new(keep_nothing).is_err());
        assert!(Compeft::new(CompeftParams::default().with_alpha(f32::INFINITY)).is_err());
    }

    proptest! {
        #[test]
        fn streaming_compeft_equals_in_memory(
            values in prop::collection::vec((-6i32..=6).prop_map(|v| v as f32 * 0.5), 1..300),
            density in 0.01f64..=1.0,
            split in 0usize..300,
        ) {
            let split = split.min(values.len());
            let tensors = [&values[..split], &values[split..]];
            let params = CompeftParams::default()
                .with_keep(KeepRule::Density(density))
                .with_alpha(1.5);
            let (expect, codes) = compeft_ref(&tensors, params).unwrap();
            let decided = Compeft::new(params).unwrap().run(|| tensors, Compeft::feed).unwrap();
            prop_assert!((decided.scale - expect.scale).abs() <= 1e-6 * expect.scale.abs().max(1e-30));
            prop_assert_eq!((decided.cut, decided.total), (expect.cut, expect.total));
            let mut coder = CompeftEncoder::new(&decided);
            for (t, expect) in tensors.iter().zip(&codes) {
                let mut got = vec![0i8; t.len()];
                coder.code(t, &mut got).unwrap();
                prop_assert_eq!(&got, expect);
            }
            let nonzero = codes.iter().flatten().filter(|&&c| c != 0).count() as u64;
            prop_assert!(nonzero <= (density * values.len() as f64).floor() as u64);
        }

        #[test]
        fn chunked_moments_equal_whole(values in prop::collection::vec(-1e3f64..1e3, 2..100), split in 0usize..100) {
            let split = split.min(values.len());
            let mut whole = Moments::default();
            whole.observe(&values.iter().map(|&v| v as f32).collect::<Vec<_>>());
            let mut parts = Moments::default();
            let vals: Vec<f32> = values.iter().map(|&v| v as f32).collect();
            parts.observe(&vals[..split]);
            parts.observe(&vals[split..]);
            prop_assert!((whole.std() - parts.std()).abs() <= 1e-9 * whole.std().max(1.0));
            // Against the definition: the two-pass sample standard deviation.
            let n = vals.len() as f64;
            let mean = vals.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = vals.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / (n - 1.0);
            prop_assert!((whole.std() - var.sqrt()).abs() <= 1e-9 * var.sqrt().max(1.0));
            prop_assert!((whole.mean() - mean).abs() <= 1e-9 * mean.abs().max(1.0));
        }
    }
}
