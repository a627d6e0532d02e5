//! Ternary compression (ComPEFT): global statistics, global top-k, ternary codes, ternary GEMV and
//! decompress-and-add. The packed byte format lives in [`crate::format`].
//!
//! # Contracts
//!
//! * `tau = theta_ft - theta_base` arrives as one or many slices taken as one flat vector (a whole
//!   model). `sigma = std(tau)` over **all** entries before pruning, with Bessel's correction
//!   (`n - 1`, as `torch.std`; 0 when `n = 1`). The global top-`floor(d n)` entries by `|tau|`
//!   (ties by lower flat index, see [`crate::ops::select`]) become `sign(tau)` (a kept exact
//!   zero stays 0, as `torch.sign`), the rest 0; the
//!   scale is `alpha * sigma`. Codes are `i8` in `{-1, 0, 1}`.
//! * Streaming: [`CompeftPlan`] reads the tensors twice (statistics and histogram, then the exact
//!   cut) and then codes them one at a time, so memory is one tensor plus 256 KiB.
//! * NaN or infinite `tau` is rejected ([`crate::Error::NonFinite`]).

use crate::error::{check_len, check_param};
use crate::ops::select::TopKCut;
use crate::{Element, Error, MatRef, Real, Result};

/// Parameters of ComPEFT.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct CompeftParams {
    /// Fraction of entries kept, in `(0, 1]`. Default 0.1.
    pub density: f64,
    /// Scale multiplier `alpha`, finite. Default 1.
    pub alpha: f32,
}

impl Default for CompeftParams {
    fn default() -> Self {
        Self {
            density: 0.1,
            alpha: 1.0,
        }
    }
}

impl CompeftParams {
    /// Parameters with the given density and alpha.
    #[must_use]
    pub const fn new(density: f64, alpha: f32) -> Self {
        Self { density, alpha }
    }

    /// Validates the parameters.
    pub fn validate(&self) -> Result<()> {
        check_param(
            "density",
            self.density,
            "in (0, 1]",
            self.density > 0.0 && self.density <= 1.0,
        )?;
        check_param(
            "alpha",
            f64::from(self.alpha),
            "finite",
            self.alpha.is_finite(),
        )
    }
}

/// Running count, mean and sum of squared deviations (Chan et al.'s pairwise update), so a std
/// over many chunks is as accurate as over one.
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
    /// The global top-k cut.
    pub cut: TopKCut,
    /// `floor(density n)`.
    pub kept: u64,
    /// Entries in the model.
    pub total: u64,
}

/// Streaming ComPEFT over a model read tensor by tensor: pass 1 ([`Self::observe`]), pass 2
/// ([`Self::refine`]), then code each tensor in the same order with [`CompeftCoder`].
#[cfg(feature = "alloc")]
#[derive(Clone, Debug)]
pub struct CompeftPlan {
    params: CompeftParams,
    moments: Moments,
    histogram: crate::ops::select::MagnitudeHistogram,
    bracket: Option<crate::ops::select::MagnitudeBracket>,
}

#[cfg(feature = "alloc")]
impl CompeftPlan {
    /// A plan; validates `params`.
    pub fn new(params: CompeftParams) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            params,
            moments: Moments::default(),
            histogram: crate::ops::select::MagnitudeHistogram::new(),
            bracket: None,
        })
    }

    /// Pass 1: statistics and the magnitude histogram of one tensor (or chunk).
    pub fn observe<T: Element>(&mut self, tau: &[T]) -> Result<()> {
        self.histogram.observe(tau)?;
        self.moments.observe(tau);
        Ok(())
    }

    /// Pass 2: the same tensors again, in the same order.
    pub fn refine<T: Element>(&mut self, tau: &[T]) -> Result<()> {
        if self.bracket.is_none() {
            let k = crate::ops::select::keep_count(self.params.density, self.histogram.total())?;
            self.bracket = Some(self.histogram.top_k(k)?);
        }
        self.bracket.as_mut().map_or(Ok(()), |b| b.observe(tau))
    }

    /// The decision, after both passes.
    pub fn finish(&self) -> Result<CompeftCut> {
        let total = self.histogram.total();
        let kept = crate::ops::select::keep_count(self.params.density, total)?;
        let cut = match &self.bracket {
            Some(b) => b.cut()?,
            None if kept == 0 => TopKCut::NONE,
            None => {
                return Err(Error::InvalidParam {
                    name: "pass 2",
                    value: 0.0,
                    expected: "refine() called on every tensor before finish()",
                });
            }
        };
        let scale = (f64::from(self.params.alpha) * self.moments.std()) as f32;
        Ok(CompeftCut {
            scale,
            cut,
            kept,
            total,
        })
    }
}

/// Codes tensors in flat order under a [`CompeftCut`].
#[derive(Clone, Debug)]
pub struct CompeftCoder {
    selector: crate::ops::select::TopKSelector,
}

impl CompeftCoder {
    /// A coder starting at flat index 0.
    #[must_use]
    pub fn new(cut: &CompeftCut) -> Self {
        Self {
            selector: cut.cut.selector(),
        }
    }

    /// Codes the next tensor: `codes[i] = sign(tau_i)` if kept, else 0.
    pub fn code<T: Element>(&mut self, tau: &[T], codes: &mut [i8]) -> Result<()> {
        check_len("codes", tau.len(), codes.len())?;
        crate::error::check_finite("tau", tau)?;
        for (c, t) in codes.iter_mut().zip(tau) {
            let v = t.to_f32();
            *c = if self.selector.keep(v) {
                sign_code(v)
            } else {
                0
            };
        }
        Ok(())
    }
}

/// ComPEFT of a whole model held in memory (reference): returns `alpha * sigma` and one code
/// vector per slice.
#[cfg(feature = "alloc")]
pub fn compeft_ref<T: Element>(
    taus: &[&[T]],
    params: CompeftParams,
) -> Result<(f32, alloc::vec::Vec<alloc::vec::Vec<i8>>)> {
    params.validate()?;
    let n: usize = taus.iter().map(|t| t.len()).sum();
    let flat: alloc::vec::Vec<f64> = taus
        .iter()
        .flat_map(|t| t.iter().map(|v| v.to_f64()))
        .collect();
    let k = crate::ops::select::keep_count(params.density, n as u64)?;
    let kept = crate::ops::select::topk_global_ref(taus, k)?;
    let sigma = if n < 2 {
        0.0
    } else {
        let mean = flat.iter().sum::<f64>() / n as f64;
        libm::sqrt(flat.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1) as f64)
    };
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
    Ok(((f64::from(params.alpha) * sigma) as f32, out))
}

/// `sign(v)` as a code, with `sign(+-0) = 0` as `torch.sign`: a kept zero stays zero.
#[inline]
#[must_use]
pub fn sign_code(v: f32) -> i8 {
    if v > 0.0 {
        1
    } else if v < 0.0 {
        -1
    } else {
        0
    }
}

/// Checks every code is -1, 0 or 1.
pub fn check_codes(codes: &[i8]) -> Result<()> {
    match codes.iter().position(|c| !(-1..=1).contains(c)) {
        None => Ok(()),
        Some(i) => Err(Error::InvalidParam {
            name: "codes",
            value: f64::from(codes[i]),
            expected: "-1, 0 or 1",
        }),
    }
}

/// Ternary GEMV: `y_r = scale * (sum of x over +1 codes of row r - sum over -1 codes)`,
/// codes `[out, in]`.
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
        let (scale, codes) = compeft_ref(&[&a[..], &b[..]], CompeftParams::new(0.4, 2.0)).unwrap();
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
        assert!(CompeftPlan::new(CompeftParams::new(0.0, 1.0)).is_err());
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
            let params = CompeftParams::new(density, 1.5);
            let (scale, codes) = compeft_ref(&tensors, params).unwrap();
            let mut plan = CompeftPlan::new(params).unwrap();
            for t in tensors { plan.observe(t).unwrap(); }
            for t in tensors { plan.refine(t).unwrap(); }
            let decided = plan.finish().unwrap();
            prop_assert!((decided.scale - scale).abs() <= 1e-6 * scale.abs().max(1e-30));
            let mut coder = CompeftCoder::new(&decided);
            for (t, expect) in tensors.iter().zip(&codes) {
                let mut got = vec![0i8; t.len()];
                coder.code(t, &mut got).unwrap();
                prop_assert_eq!(&got, expect);
            }
            let nonzero = codes.iter().flatten().filter(|&&c| c != 0).count() as u64;
            prop_assert!(nonzero <= decided.kept);
            prop_assert_eq!(decided.kept, (density * values.len() as f64).floor() as u64);
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
        }
    }
}
