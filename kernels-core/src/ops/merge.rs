//! Merge reductions and task-vector masks: weighted mean (model soups), task arithmetic, TIES,
//! Fisher merging and Fisher accumulation, DARE and Breadcrumbs.
//!
//! # Contracts
//!
//! * Every reduction is element-wise over `N >= 1` equally long slices, so a frontend streams a
//!   model tensor by tensor, or chunk by chunk, and gets the same bits as over the whole. (TIES
//!   trimming, Breadcrumbs and the L1-preserving DARE rescale select over the slice they are given:
//!   give them a whole tensor, as mergekit does.)
//! * Inputs `T: Element`, outputs `f32`, accumulation `f64` in the references.
//! * Models come with one weight each, in the same order (`models`, then `weights`). Weights must
//!   be finite; where an op divides by a sum of weights they must also be non-negative with a
//!   positive sum. NaN or infinite *data* propagate as IEEE 754 says.
//! * DARE masks depend only on `(seed, flat index)` (see [`crate::CounterRng`]): pass the flat
//!   index of a chunk's first element as `first_index` and any chunking gives the same mask.

use crate::backend::{
    fisher_weight, validate_fisher_accumulate, validate_fisher_merge, validate_task_arithmetic,
    validate_ties_elect, validate_weighted_mean,
};
#[cfg(feature = "alloc")]
use crate::error::check_len;
use crate::error::check_param;
use crate::ops::select::KeepRule;
use crate::{CounterRng, Element, Real, Result};

/// `sum w_i models_i[j]` in `f64`, in model order: the sum every reference reduction starts from.
pub(crate) fn weighted_sum_at<T: Element>(models: &[&[T]], weights: &[f32], j: usize) -> f64 {
    models
        .iter()
        .zip(weights)
        .map(|(m, &w)| f64::from(w) * m[j].to_f64())
        .sum()
}

/// Weighted mean (model soups, linear merge): `out = sum w_i theta_i / sum w_i`.
///
/// ```
/// use kernels_core::ops::merge::weighted_mean_ref;
/// let mut out = [0.0f32; 2];
/// weighted_mean_ref(&[&[1.0f32, 2.0][..], &[4.0, -1.0]], &[1.0, 2.0], &mut out)?;
/// assert_eq!(out, [3.0, 0.0]);
/// // Negative weights, or weights that sum to zero, are errors.
/// assert!(weighted_mean_ref(&[&[1.0f32][..]], &[-1.0], &mut [0.0]).is_err());
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn weighted_mean_ref<T: Element>(
    models: &[&[T]],
    weights: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let sum = validate_weighted_mean(models.iter().map(|m| m.len()), weights, out.len())?;
    for (j, o) in out.iter_mut().enumerate() {
        let acc = weighted_sum_at(models, weights, j);
        *o = (acc / sum) as f32;
    }
    Ok(())
}

/// Task arithmetic: `out = base + lambda * sum w_i tau_i`. Weights may be negative (negation).
///
/// ```
/// use kernels_core::ops::merge::task_arithmetic_ref;
/// let (base, add, forget) = ([1.0f32, 1.0], [0.5f32, 0.0], [0.0f32, 0.25]);
/// let mut out = [0.0f32; 2];
/// task_arithmetic_ref(&base, &[&add, &forget], &[1.0, -1.0], 2.0, &mut out)?;
/// assert_eq!(out, [2.0, 0.5]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn task_arithmetic_ref<T: Element>(
    base: &[T],
    taus: &[&[T]],
    weights: &[f32],
    lambda: f32,
    out: &mut [f32],
) -> Result<()> {
    validate_task_arithmetic(
        base.len(),
        taus.iter().map(|t| t.len()),
        weights,
        lambda,
        out.len(),
    )?;
    for (j, o) in out.iter_mut().enumerate() {
        let acc = weighted_sum_at(taus, weights, j);
        *o = (base[j].to_f64() + f64::from(lambda) * acc) as f32;
    }
    Ok(())
}

/// Parameters of TIES merging.
///
/// ```
/// use kernels_core::ops::{merge::TiesParams, select::KeepRule};
/// let params = TiesParams::default().with_keep(KeepRule::Density(0.1)).with_lambda(0.8);
/// assert_eq!((params.keep, params.lambda), (KeepRule::Density(0.1), 0.8));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct TiesParams {
    /// What each task vector keeps by magnitude. Default `Density(0.2)` (the paper's k).
    pub keep: KeepRule,
    /// Scale of the merged task vector, finite. Default 1.
    pub lambda: f32,
}

impl Default for TiesParams {
    fn default() -> Self {
        Self {
            keep: KeepRule::Density(0.2),
            lambda: 1.0,
        }
    }
}

impl TiesParams {
    /// The same parameters keeping `keep` of each task vector.
    #[must_use]
    pub const fn with_keep(mut self, keep: KeepRule) -> Self {
        self.keep = keep;
        self
    }

    /// The same parameters scaling the merged task vector by `lambda`.
    #[must_use]
    pub const fn with_lambda(mut self, lambda: f32) -> Self {
        self.lambda = lambda;
        self
    }
}

/// How TIES elects a sign and combines the entries that agree with it.
///
/// The default is the paper's rule, which [`ties_elect_ref`] uses: a weighted sum of exactly zero
/// elects no sign (nothing agrees), and the agreeing entries are averaged (divided by their
/// weights' sum). mergekit's `ties`, `dare_ties`, `breadcrumbs_ties` and `della` elect `+` for a
/// sum of zero (`sum >= 0`) and divide only when their `normalize` option is on.
///
/// ```
/// use kernels_core::ops::merge::TiesElection;
/// let mergekit = TiesElection::default().with_zero_sum_elects_positive(true).with_normalize(false);
/// assert!(mergekit.zero_sum_elects_positive && !mergekit.normalize);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TiesElection {
    /// A weighted sum of exactly zero elects `+` (mergekit) rather than no sign. Default false.
    pub zero_sum_elects_positive: bool,
    /// Divide the agreeing weighted sum by the agreeing weights' sum (the disjoint mean), or
    /// add it undivided. Default true.
    pub normalize: bool,
}

impl Default for TiesElection {
    fn default() -> Self {
        Self {
            zero_sum_elects_positive: false,
            normalize: true,
        }
    }
}

impl TiesElection {
    /// The same rule, electing `+` for a zero sum or not.
    #[must_use]
    pub const fn with_zero_sum_elects_positive(mut self, yes: bool) -> Self {
        self.zero_sum_elects_positive = yes;
        self
    }

    /// The same rule, dividing by the agreeing weights or not.
    #[must_use]
    pub const fn with_normalize(mut self, yes: bool) -> Self {
        self.normalize = yes;
        self
    }

    /// The sign elected for a weighted sum: `1`, `-1` or `0` (none; NaN elects none).
    #[inline(always)]
    #[must_use]
    pub fn elect(self, sum: f64) -> f64 {
        if self.zero_sum_elects_positive && sum == 0.0 {
            1.0
        } else {
            crate::backend::ties_sign(sum)
        }
    }

    /// What the agreeing entries add to the base (before `lambda`): their weighted sum `num`,
    /// divided by their weights' sum `den` when normalising (0 where none agrees).
    #[inline(always)]
    #[must_use]
    pub fn combine(self, num: f64, den: f64) -> f64 {
        if !self.normalize {
            num
        } else if den > 0.0 {
            num / den
        } else {
            0.0
        }
    }
}

/// TIES elect and disjoint mean over already-trimmed task vectors (streamable):
/// `s = sign(sum w_i tau_i)`; `mean = sum_{i: sign(tau_i) = s} w_i tau_i / sum_{same i} w_i`
/// (0 where no model agrees); `out = base + lambda * mean`. The paper's rule
/// ([`TiesElection::default`]); [`ties_elect_with_ref`] takes another.
///
/// ```
/// use kernels_core::ops::merge::ties_elect_ref;
/// let (a, b) = ([1.0f32, -1.0, 0.0], [-3.0f32, -1.0, 2.0]);
/// let mut out = [0.0f32; 3];
/// ties_elect_ref(&[0.0f32; 3], &[&a, &b], &[1.0, 1.0], 1.0, &mut out)?;
/// assert_eq!(out, [-3.0, -1.0, 2.0]); // element 0 elects the sign of 1 - 3
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn ties_elect_ref<T: Element>(
    base: &[T],
    trimmed: &[&[T]],
    weights: &[f32],
    lambda: f32,
    out: &mut [f32],
) -> Result<()> {
    ties_elect_with_ref(base, trimmed, weights, lambda, TiesElection::default(), out)
}

/// TIES elect and combine under an [`TiesElection`] rule: entries whose sign equals
/// `rule.elect(sum w_i tau_i)` agree (a zero entry never does);
/// `out = base + lambda * rule.combine(sum of agreeing w_i tau_i, sum of their w_i)`.
///
/// ```
/// use kernels_core::ops::merge::{TiesElection, ties_elect_with_ref};
/// let (a, b) = ([1.0f32, 2.0], [-1.0f32, 2.0]);
/// let mergekit = TiesElection::default().with_zero_sum_elects_positive(true).with_normalize(false);
/// let mut out = [0.0f32; 2];
/// ties_elect_with_ref(&[0.0f32; 2], &[&a, &b], &[1.0, 1.0], 1.0, mergekit, &mut out)?;
/// // Element 0: 1 - 1 = 0 elects +, so a's 1 counts; element 1: both, summed, not averaged.
/// assert_eq!(out, [1.0, 4.0]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn ties_elect_with_ref<T: Element>(
    base: &[T],
    trimmed: &[&[T]],
    weights: &[f32],
    lambda: f32,
    rule: TiesElection,
    out: &mut [f32],
) -> Result<()> {
    validate_ties_elect(
        base.len(),
        trimmed.iter().map(|t| t.len()),
        weights,
        lambda,
        out.len(),
    )?;
    for (j, o) in out.iter_mut().enumerate() {
        *o = crate::backend::ties_elect_at(base[j], trimmed, weights, lambda, rule, j);
    }
    Ok(())
}

/// TIES trim: zero all but what `keep` keeps of `tau` by magnitude (ties by lower index).
///
/// ```
/// use kernels_core::ops::{merge::ties_trim_ref, select::KeepRule};
/// let mut out = [0.0f32; 4];
/// ties_trim_ref(&[0.5f32, -2.0, 2.0, 0.1], KeepRule::Density(0.25), &mut out)?;
/// assert_eq!(out, [0.0, -2.0, 0.0, 0.0]); // the tie at 2.0 goes to the lower index
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn ties_trim_ref<T: Element>(tau: &[T], keep: KeepRule, out: &mut [f32]) -> Result<()> {
    check_len("out", tau.len(), out.len())?;
    let mask = crate::ops::select::topk_mask_ref(tau, keep)?;
    for ((o, &t), kept) in out.iter_mut().zip(tau).zip(mask) {
        *o = if kept { t.to_f32() } else { 0.0 };
    }
    Ok(())
}

/// TIES merging of whole tensors: trim each task vector ([`ties_trim_ref`]), then elect and take
/// the disjoint mean ([`ties_elect_ref`]).
///
/// ```
/// use kernels_core::ops::{merge::{TiesParams, ties_ref}, select::KeepRule};
/// let (a, b) = ([1.0f32, 0.1, -0.2], [-0.1f32, 0.3, -2.0]);
/// let params = TiesParams::default().with_keep(KeepRule::Count(1)).with_lambda(0.5);
/// let mut out = [0.0f32; 3];
/// ties_ref(&[1.0f32; 3], &[&a, &b], &[1.0, 1.0], params, &mut out)?;
/// // a keeps 1.0, b keeps -2.0: they no longer meet anywhere.
/// assert_eq!(out, [1.5, 1.0, 0.0]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn ties_ref<T: Element>(
    base: &[T],
    taus: &[&[T]],
    weights: &[f32],
    params: TiesParams,
    out: &mut [f32],
) -> Result<()> {
    validate_ties_elect(
        base.len(),
        taus.iter().map(|t| t.len()),
        weights,
        params.lambda,
        out.len(),
    )?;
    let mut trimmed = alloc::vec::Vec::with_capacity(taus.len());
    for tau in taus {
        let mut t = alloc::vec![0.0f32; tau.len()];
        ties_trim_ref(tau, params.keep, &mut t)?;
        trimmed.push(t);
    }
    let views: alloc::vec::Vec<&[f32]> = trimmed.iter().map(alloc::vec::Vec::as_slice).collect();
    let base: alloc::vec::Vec<f32> = base.iter().map(|b| b.to_f32()).collect();
    ties_elect_ref(&base, &views, weights, params.lambda, out)
}

/// Parameters of Fisher merging beyond the models' weights.
///
/// ```
/// use kernels_core::ops::merge::FisherParams;
/// // ||F_i||_2^2 of each model's whole Fisher, summed tensor by tensor with `sum_squares`.
/// let squared_norms = [4.0, 16.0];
/// let params = FisherParams::default().with_floor(1e-8).with_normalization(&squared_norms);
/// assert_eq!(params.floor, 1e-8);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct FisherParams<'a> {
    /// Fisher entries below this are raised to it, `>= 0`. Default 0.
    pub floor: f32,
    /// Per-model normalisation: model `i`'s weight becomes `w_i / ||F_i||_2`, from these squared
    /// norms of each model's whole Fisher (finite, `> 0`). Default: none.
    pub squared_norms: Option<&'a [f64]>,
}

impl<'a> FisherParams<'a> {
    /// The same parameters with a Fisher floor.
    #[must_use]
    pub const fn with_floor(mut self, floor: f32) -> Self {
        self.floor = floor;
        self
    }

    /// The same parameters normalising each model by its Fisher's norm.
    #[must_use]
    pub const fn with_normalization(mut self, squared_norms: &'a [f64]) -> Self {
        self.squared_norms = Some(squared_norms);
        self
    }
}

/// Fisher merging: `out = sum w'_i F'_i theta_i / sum w'_i F'_i` with `F'_i = max(F_i, floor)` and
/// `w'_i = w_i`, or `w_i / ||F_i||_2` with [`FisherParams::with_normalization`].
///
/// Where every `w'_i F'_i` is zero the result is the plain weighted mean
/// `sum w'_i theta_i / sum w'_i` (never 0/0). Negative Fisher entries are invalid data but are
/// not scanned for; a floor makes them harmless.
///
/// ```
/// use kernels_core::ops::merge::{FisherParams, fisher_merge_ref};
/// let (theta_a, theta_b) = ([1.0f32, 1.0], [3.0f32, 3.0]);
/// let (fisher_a, fisher_b) = ([1.0f32, 0.0], [3.0f32, 0.0]);
/// let mut out = [0.0f32; 2];
/// let params = FisherParams::default();
/// fisher_merge_ref(&[&theta_a, &theta_b], &[&fisher_a, &fisher_b], &[1.0, 3.0], params, &mut out)?;
/// // (1 * 1 * 1 + 3 * 3 * 3) / (1 * 1 + 3 * 3); element 1 has no Fisher mass anywhere: the plain
/// // weighted mean.
/// assert_eq!(out, [2.8, 2.5]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn fisher_merge_ref<T: Element>(
    thetas: &[&[T]],
    fishers: &[&[f32]],
    weights: &[f32],
    params: FisherParams<'_>,
    out: &mut [f32],
) -> Result<()> {
    let weight_sum = validate_fisher_merge(
        thetas.iter().map(|t| t.len()),
        fishers.iter().map(|f| f.len()),
        weights,
        params,
        out.len(),
    )?;
    for (j, o) in out.iter_mut().enumerate() {
        let (mut num, mut den, mut plain) = (0.0f64, 0.0f64, 0.0f64);
        for (i, (theta, fisher)) in thetas.iter().zip(fishers).enumerate() {
            let w = f64::from(fisher_weight(weights, params, i));
            let f = f64::from(crate::backend::floored_fisher(fisher[j], params.floor));
            let v = theta[j].to_f64();
            num += w * f * v;
            den += w * f;
            plain += w * v;
        }
        *o = if den > 0.0 || den.is_nan() {
            num / den
        } else {
            plain / weight_sum
        } as f32;
    }
    Ok(())
}

/// `sum x^2` of a chunk in `f64`: stream it over every tensor of a model's Fisher to get
/// `||F_i||_2^2` for [`FisherParams::with_normalization`].
///
/// ```
/// use kernels_core::ops::merge::sum_squares_ref;
/// let chunks: [&[f32]; 2] = [&[3.0], &[4.0, 0.0]];
/// assert_eq!(chunks.iter().map(|c| sum_squares_ref(c)).sum::<f64>(), 25.0);
/// ```
pub fn sum_squares_ref<T: Element>(x: &[T]) -> f64 {
    x.iter().map(|v| v.to_f64() * v.to_f64()).sum()
}

/// Diagonal Fisher accumulation `fisher += scale * g^2`, `scale` finite and `>= 0`.
///
/// ```
/// use kernels_core::ops::merge::fisher_accumulate_ref;
/// let mut fisher = [1.0f32, 0.0];
/// fisher_accumulate_ref(&mut fisher, &[2.0f32, -1.0], 0.5)?;
/// assert_eq!(fisher, [3.0, 0.5]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn fisher_accumulate_ref<T: Element>(fisher: &mut [f32], grad: &[T], scale: f32) -> Result<()> {
    validate_fisher_accumulate(fisher.len(), grad.len(), scale)?;
    for (f, g) in fisher.iter_mut().zip(grad) {
        let g = g.to_f64();
        *f = (f64::from(*f) + f64::from(scale) * g * g) as f32;
    }
    Ok(())
}

/// How DARE rescales the surviving entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DareRescale {
    /// Multiply by `1 / (1 - p)`, preserving the expectation (the paper's rule). Default.
    #[default]
    InverseKeep,
    /// Multiply by `||tau||_1 / ||kept||_1` over the slice given, preserving its L1 norm
    /// (zero when nothing survives).
    PreserveL1,
    /// Keep survivors as they are.
    None,
}

/// Parameters of DARE (drop and rescale).
///
/// ```
/// use kernels_core::ops::merge::{DareParams, DareRescale};
/// let params = DareParams::default().with_drop(0.5).with_seed(7).with_rescale(DareRescale::None);
/// assert_eq!((params.drop, params.seed), (0.5, 7));
/// params.validate()?;
/// assert!(DareParams::default().with_drop(1.0).validate().is_err());
/// // Element i is dropped iff its 24-bit draw is below the threshold: half of 2^24 here.
/// assert_eq!(params.drop_threshold(), 1 << 23);
/// let rng = kernels_core::CounterRng::new(params.seed);
/// let kept = (0..10_000).filter(|&i| params.keeps(&rng, i)).count();
/// assert!((4_500..5_500).contains(&kept));
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct DareParams {
    /// Drop probability `p` in `[0, 1)`. Default 0.9 (the paper's common setting).
    pub drop: f64,
    /// Seed of the counter-based generator. Default 0.
    pub seed: u64,
    /// Rescaling rule. Default [`DareRescale::InverseKeep`].
    pub rescale: DareRescale,
}

impl Default for DareParams {
    fn default() -> Self {
        Self {
            drop: 0.9,
            seed: 0,
            rescale: DareRescale::InverseKeep,
        }
    }
}

impl DareParams {
    /// Parameters with drop probability `drop`, seed `seed` and the default rescale.
    #[must_use]
    pub const fn new(drop: f64, seed: u64) -> Self {
        Self {
            drop,
            seed,
            rescale: DareRescale::InverseKeep,
        }
    }

    /// The same parameters with another drop probability.
    #[must_use]
    pub const fn with_drop(mut self, drop: f64) -> Self {
        self.drop = drop;
        self
    }

    /// The same parameters with another seed.
    #[must_use]
    pub const fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The same parameters with another rescale rule.
    #[must_use]
    pub const fn with_rescale(mut self, rescale: DareRescale) -> Self {
        self.rescale = rescale;
        self
    }

    /// Validates the parameters.
    pub fn validate(&self) -> Result<()> {
        check_param(
            "drop",
            self.drop,
            "in [0, 1)",
            (0.0..1.0).contains(&self.drop),
        )
    }

    /// The integer drop threshold: element `i` is dropped iff `rng.u24_at(i) < threshold`,
    /// with `threshold = ceil(p * 2^24)`. Integer, so every backend drops the same entries.
    #[must_use]
    pub fn drop_threshold(&self) -> u32 {
        libm::ceil(self.drop * 16_777_216.0) as u32
    }

    /// Whether element `index` survives.
    #[inline]
    #[must_use]
    pub fn keeps(&self, rng: &CounterRng, index: u64) -> bool {
        rng.u24_at(index) >= self.drop_threshold()
    }
}

/// DARE: `out_i = tau_i * scale` where element `first_index + i` survives, else 0.
///
/// ```
/// use kernels_core::ops::merge::{DareParams, dare_ref};
/// let tau = [1.0f32; 8];
/// let params = DareParams::default().with_drop(0.5).with_seed(3);
/// let (mut whole, mut halves) = ([0.0f32; 8], [0.0f32; 8]);
/// dare_ref(&tau, params, 0, &mut whole)?;
/// // Chunked by flat index, the same mask.
/// dare_ref(&tau[..4], params, 0, &mut halves[..4])?;
/// dare_ref(&tau[4..], params, 4, &mut halves[4..])?;
/// assert_eq!(whole, halves);
/// assert!(whole.iter().all(|&v| v == 0.0 || v == 2.0)); // survivors scaled by 1 / (1 - p)
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn dare_ref<T: Element>(
    tau: &[T],
    params: DareParams,
    first_index: u64,
    out: &mut [f32],
) -> Result<()> {
    crate::error::check_len("out", tau.len(), out.len())?;
    crate::backend::validate_dare(params, first_index, tau.len())?;
    let rng = CounterRng::new(params.seed);
    let (mut l1_all, mut l1_kept) = (0.0f64, 0.0f64);
    for (i, (o, t)) in out.iter_mut().zip(tau).enumerate() {
        let v = t.to_f64();
        l1_all += v.abs();
        if params.keeps(&rng, first_index + i as u64) {
            l1_kept += v.abs();
            *o = v as f32;
        } else {
            *o = 0.0;
        }
    }
    let scale = match params.rescale {
        DareRescale::InverseKeep => 1.0 / (1.0 - params.drop),
        DareRescale::PreserveL1 => l1_scale(l1_all, l1_kept),
        DareRescale::None => 1.0,
    };
    for o in out.iter_mut() {
        *o = (f64::from(*o) * scale) as f32;
    }
    Ok(())
}

/// The L1-preserving rescale on its own: multiplies `sparse` (a sparsified copy of `original`)
/// by `||original||_1 / ||sparse||_1`, so the sparse tensor keeps the original's L1 norm, and
/// returns that scale (`0` where `sparse` is all zeros, which it leaves as it is). mergekit's
/// `rescale: true` for its magnitude methods (TIES trimming, Breadcrumbs); DARE and DELLA apply
/// it themselves ([`DareRescale::PreserveL1`]). Sums in `f64`, each product rounded once.
///
/// ```
/// use kernels_core::ops::merge::preserve_l1_ref;
/// let original = [4.0f32, -1.0, 0.5, -2.5];
/// let mut trimmed = [4.0f32, 0.0, 0.0, -2.5];
/// assert_eq!(preserve_l1_ref(&original, &mut trimmed)?, 8.0 / 6.5);
/// assert_eq!(trimmed.iter().map(|v| v.abs()).sum::<f32>(), 8.0);
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn preserve_l1_ref<T: Element>(original: &[T], sparse: &mut [f32]) -> Result<f64> {
    crate::error::check_len("sparse", original.len(), sparse.len())?;
    let all: f64 = original.iter().map(|v| v.to_f64().abs()).sum();
    let kept: f64 = sparse.iter().map(|v| f64::from(*v).abs()).sum();
    let scale = l1_scale(all, kept);
    if kept > 0.0 {
        for v in sparse.iter_mut() {
            *v = (f64::from(*v) * scale) as f32;
        }
    }
    Ok(scale)
}

/// `all / kept`, or 0 where nothing is kept: the scale of [`DareRescale::PreserveL1`] and
/// [`preserve_l1_ref`].
#[inline]
#[must_use]
pub fn l1_scale(all: f64, kept: f64) -> f64 {
    if kept > 0.0 { all / kept } else { 0.0 }
}

/// Parameters of Model Breadcrumbs: two fractions of the tensor, as the paper and mergekit
/// define them.
///
/// ```
/// use kernels_core::ops::merge::BreadcrumbsParams;
/// let params = BreadcrumbsParams::default().with_density(0.8).with_gamma(0.05);
/// assert_eq!(params.counts(100)?, (5, 80)); // drop the top 5, keep the next 80
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct BreadcrumbsParams {
    /// Fraction kept, in `(0, 1]`. Default 0.9.
    pub density: f64,
    /// Fraction of largest magnitudes dropped (outliers), in `[0, 1)`, with `density + gamma <= 1`.
    /// Default 0.01.
    pub gamma: f64,
}

impl Default for BreadcrumbsParams {
    fn default() -> Self {
        Self {
            density: 0.9,
            gamma: 0.01,
        }
    }
}

impl BreadcrumbsParams {
    /// Parameters with the given density and outlier fraction.
    #[must_use]
    pub const fn new(density: f64, gamma: f64) -> Self {
        Self { density, gamma }
    }

    /// The same parameters keeping another fraction.
    #[must_use]
    pub const fn with_density(mut self, density: f64) -> Self {
        self.density = density;
        self
    }

    /// The same parameters dropping another fraction of outliers.
    #[must_use]
    pub const fn with_gamma(mut self, gamma: f64) -> Self {
        self.gamma = gamma;
        self
    }

    /// `(top, keep)` for `n` entries: the `floor(gamma n)` largest magnitudes are dropped and the
    /// next `floor(density n)` kept (so `gamma n < 1` drops no outlier).
    pub fn counts(&self, n: u64) -> Result<(u64, u64)> {
        check_param(
            "gamma",
            self.gamma,
            "in [0, 1)",
            (0.0..1.0).contains(&self.gamma),
        )?;
        check_param(
            "density",
            self.density,
            "in (0, 1]",
            self.density > 0.0 && self.density <= 1.0,
        )?;
        check_param(
            "density + gamma",
            self.density + self.gamma,
            "<= 1",
            self.density + self.gamma <= 1.0,
        )?;
        let keep = libm::floor(self.density * n as f64) as u64;
        let top = libm::floor(self.gamma * n as f64) as u64;
        Ok((top, keep.min(n - top)))
    }
}

/// Model Breadcrumbs: keep entries whose magnitude rank (descending, ties by lower index) lies in
/// `[top, top + keep)` of [`BreadcrumbsParams::counts`]; zero the rest.
///
/// ```
/// use kernels_core::ops::merge::{BreadcrumbsParams, breadcrumbs_ref};
/// let tau = [0.1f32, -9.0, 0.5, 0.3, -0.2, 0.05, 0.4, 0.01, 0.6, -0.7];
/// let mut out = [0.0f32; 10];
/// // Drop the top 10 % (the outlier -9) and keep the next 30 %.
/// breadcrumbs_ref(&tau, BreadcrumbsParams::new(0.3, 0.1), &mut out)?;
/// assert_eq!(out, [0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.6, -0.7]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn breadcrumbs_ref<T: Element>(
    tau: &[T],
    params: BreadcrumbsParams,
    out: &mut [f32],
) -> Result<()> {
    check_len("out", tau.len(), out.len())?;
    let (top, keep) = params.counts(tau.len() as u64)?;
    let outer = crate::ops::select::topk_mask_ref(tau, KeepRule::Count(top + keep))?;
    let outliers = crate::ops::select::topk_mask_ref(tau, KeepRule::Count(top))?;
    for (j, o) in out.iter_mut().enumerate() {
        *o = if outer[j] && !outliers[j] {
            tau[j].to_f32()
        } else {
            0.0
        };
    }
    Ok(())
}

/// Parameters of DELLA's `MagPrune` (mergekit's `della_magprune`): a random drop whose keep
/// probability rises with the entry's magnitude rank within its row.
///
/// In a row of `cols` entries ranked `r = 0 .. cols` by ascending magnitude (ties: the lower
/// index ranks lower; NaN ranks highest), entry `r` is kept with probability
/// `p_r = density - epsilon + 2 epsilon r / (cols - 1)` (`density` for a one-column row), drawn
/// from the counter-based generator as DARE draws: kept iff its 24-bit draw is at least
/// `ceil((1 - p_r) 2^24)`. A 1-D tensor is one row.
///
/// ```
/// use kernels_core::ops::merge::{DareRescale, DellaParams};
/// let params = DellaParams::new(0.5, 0.1, 7);
/// assert_eq!(params.rescale, DareRescale::PreserveL1); // mergekit's `rescale: true`
/// assert_eq!(params.keep_probability(0, 3), 0.4);
/// assert!((params.keep_probability(2, 3) - 0.6).abs() < 1e-15);
/// assert!(DellaParams::new(0.5, 0.5, 0).validate().is_err()); // density - epsilon must be > 0
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct DellaParams {
    /// Mean keep probability, in `(0, 1]`; 1 keeps the tensor as it is (no rescale).
    pub density: f64,
    /// Half-width of the keep probabilities around `density`, `>= 0`, with
    /// `0 < density - epsilon` and `density + epsilon < 1` unless `density` is 1.
    pub epsilon: f64,
    /// Seed of the counter-based generator.
    pub seed: u64,
    /// Rescaling of the survivors: [`DareRescale::PreserveL1`] (mergekit's default),
    /// [`DareRescale::InverseKeep`] (each survivor divided by its own `p_r`, the paper's rule) or
    /// [`DareRescale::None`].
    pub rescale: DareRescale,
}

impl DellaParams {
    /// Parameters with the given density, epsilon and seed, preserving the L1 norm.
    #[must_use]
    pub const fn new(density: f64, epsilon: f64, seed: u64) -> Self {
        Self {
            density,
            epsilon,
            seed,
            rescale: DareRescale::PreserveL1,
        }
    }

    /// The same parameters with another rescale rule.
    #[must_use]
    pub const fn with_rescale(mut self, rescale: DareRescale) -> Self {
        self.rescale = rescale;
        self
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
            "epsilon",
            self.epsilon,
            "finite and >= 0",
            self.epsilon.is_finite() && self.epsilon >= 0.0,
        )?;
        if self.density < 1.0 {
            check_param(
                "density - epsilon",
                self.density - self.epsilon,
                "> 0",
                self.density - self.epsilon > 0.0,
            )?;
            check_param(
                "density + epsilon",
                self.density + self.epsilon,
                "< 1",
                self.density + self.epsilon < 1.0,
            )?;
        }
        Ok(())
    }

    /// Keep probability of the entry of ascending magnitude rank `rank` in a row of `cols`.
    #[must_use]
    pub fn keep_probability(&self, rank: usize, cols: usize) -> f64 {
        if cols <= 1 {
            return self.density;
        }
        let position = rank as f64 / (cols - 1) as f64;
        self.density - self.epsilon + 2.0 * self.epsilon * position
    }

    /// The integer drop threshold of rank `rank`: dropped iff `rng.u24_at(i) < threshold`.
    #[must_use]
    pub fn drop_threshold(&self, rank: usize, cols: usize) -> u32 {
        libm::ceil((1.0 - self.keep_probability(rank, cols)) * 16_777_216.0) as u32
    }
}

/// The ascending magnitude ranks of a row, DELLA's order: `ranks[j]` is entry `j`'s rank, by
/// `|x|` with ties to the lower index (NaN highest). `order` is scratch of the row's length.
#[cfg(feature = "alloc")]
fn della_ranks<T: Element>(row: &[T], order: &mut [u32], ranks: &mut [u32]) {
    for (j, o) in order.iter_mut().enumerate() {
        *o = j as u32;
    }
    // The key is unique (it holds the index), so the unstable sort is deterministic.
    order.sort_unstable_by_key(|&j| ((row[j as usize].to_f32().abs().to_bits()), j));
    for (rank, &j) in order.iter().enumerate() {
        ranks[j as usize] = rank as u32;
    }
}

/// DELLA over one row, the unit every backend runs (a row's ranking needs all of it): writes
/// the survivors of `row` into `out` (divided by their keep probability under
/// [`DareRescale::InverseKeep`], else as they are) and returns the row's L1 norms
/// `(||row||_1, ||kept||_1)` in `f64`. `first` is the flat index of `row[0]`, `rng` is
/// `CounterRng::new(params.seed)` (made once per tensor); `order` and `ranks` are scratch of the
/// row's length.
///
/// ```
/// use kernels_core::{CounterRng, ops::merge::{DareRescale, DellaParams, della_row}};
/// let row = [4.0f32, -1.0, 0.5, 2.0];
/// let params = DellaParams::new(0.5, 0.25, 9).with_rescale(DareRescale::None);
/// let (mut order, mut ranks, mut out) = ([0u32; 4], [0u32; 4], [0.0f32; 4]);
/// let (all, kept) = della_row(&row, 0, params, &CounterRng::new(9), &mut order, &mut ranks, &mut out);
/// assert_eq!(all, 7.5);
/// assert_eq!(kept, out.iter().map(|v| f64::from(v.abs())).sum::<f64>());
/// ```
#[cfg(feature = "alloc")]
pub fn della_row<T: Element>(
    row: &[T],
    first: u64,
    params: DellaParams,
    rng: &CounterRng,
    order: &mut [u32],
    ranks: &mut [u32],
    out: &mut [f32],
) -> (f64, f64) {
    let cols = row.len();
    della_ranks(row, order, ranks);
    let (mut all, mut kept) = (0.0f64, 0.0f64);
    for (j, (o, t)) in out.iter_mut().zip(row).enumerate() {
        let rank = ranks[j] as usize;
        let v = t.to_f64();
        all += v.abs();
        *o = if rng.u24_at(first + j as u64) >= params.drop_threshold(rank, cols) {
            kept += v.abs();
            if params.rescale == DareRescale::InverseKeep {
                (v * (1.0 / params.keep_probability(rank, cols))) as f32
            } else {
                v as f32
            }
        } else {
            0.0
        };
    }
    (all, kept)
}

/// DELLA's `MagPrune` over a tensor of rows of `cols` entries ([`DellaParams`]): `out_i = tau_i`
/// times the rescale where element `first_index + i` survives, else 0. With
/// [`DareRescale::PreserveL1`] the scale is `||tau||_1 / ||kept||_1` over the slice given (give it
/// a whole tensor), 0 when nothing survives.
///
/// ```
/// use kernels_core::ops::merge::{DellaParams, della_ref};
/// let tau: Vec<f32> = (1..=8).map(|i| i as f32).collect(); // two rows of four
/// let mut out = [0.0f32; 8];
/// della_ref(&tau, 4, DellaParams::new(0.5, 0.2, 1), 0, &mut out)?;
/// let l1 = |v: &[f32]| v.iter().map(|x| x.abs()).sum::<f32>();
/// assert!((l1(&out) - l1(&tau)).abs() < 1e-4); // the L1 norm is kept
/// assert!(della_ref(&tau, 3, DellaParams::new(0.5, 0.2, 1), 0, &mut out).is_err()); // 8 % 3 != 0
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn della_ref<T: Element>(
    tau: &[T],
    cols: usize,
    params: DellaParams,
    first_index: u64,
    out: &mut [f32],
) -> Result<()> {
    crate::backend::validate_della(params, cols, first_index, tau.len(), out.len())?;
    if params.density >= 1.0 {
        for (o, t) in out.iter_mut().zip(tau) {
            *o = t.to_f32();
        }
        return Ok(());
    }
    let rng = CounterRng::new(params.seed);
    let (mut order, mut ranks) = (alloc::vec![0u32; cols], alloc::vec![0u32; cols]);
    let (mut l1_all, mut l1_kept) = (0.0f64, 0.0f64);
    for (r, (row, out_row)) in tau.chunks(cols).zip(out.chunks_mut(cols)).enumerate() {
        let first = first_index + (r * cols) as u64;
        let (all, kept) = della_row(row, first, params, &rng, &mut order, &mut ranks, out_row);
        l1_all += all;
        l1_kept += kept;
    }
    if params.rescale == DareRescale::PreserveL1 {
        let scale = l1_scale(l1_all, l1_kept);
        for o in out.iter_mut() {
            *o = (f64::from(*o) * scale) as f32;
        }
    }
    Ok(())
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;
    use crate::Error;
    use alloc::vec;
    use alloc::vec::Vec;
    use half::f16;
    use proptest::prelude::*;

    #[test]
    fn weighted_mean_and_task_arithmetic_by_hand() {
        let a = [1.0f32, 2.0, 3.0];
        let b = [3.0f32, 2.0, -1.0];
        let mut out = [0.0; 3];
        weighted_mean_ref(&[&a, &b], &[1.0, 3.0], &mut out).unwrap();
        assert_eq!(out, [2.5, 2.0, 0.0]);
        task_arithmetic_ref(&a, &[&b, &a], &[0.5, -1.0], 2.0, &mut out).unwrap();
        assert_eq!(
            out,
            [
                1.0 + 2.0 * (1.5 - 1.0),
                2.0 + 2.0 * (1.0 - 2.0),
                3.0 + 2.0 * (-0.5 - 3.0)
            ]
        );
    }

    #[test]
    fn bad_merge_inputs_are_errors() {
        let a = [1.0f32; 3];
        let short = [1.0f32; 2];
        let mut out = [0.0; 3];
        assert!(matches!(
            weighted_mean_ref(&[&a, &short], &[1.0, 1.0], &mut out),
            Err(Error::LengthMismatch {
                what: "models[i]",
                expected: 3,
                found: 2
            })
        ));
        assert!(weighted_mean_ref::<f32>(&[], &[], &mut out).is_err());
        assert!(weighted_mean_ref(&[&a], &[1.0, 2.0], &mut out).is_err());
        assert!(weighted_mean_ref(&[&a, &a], &[1.0, -0.5], &mut out).is_err());
        assert!(weighted_mean_ref(&[&a, &a], &[0.0, 0.0], &mut out).is_err());
        assert!(weighted_mean_ref(&[&a], &[f32::NAN], &mut out).is_err());
        assert!(task_arithmetic_ref(&a, &[&a], &[1.0], f32::INFINITY, &mut out).is_err());
        let floor = |f| FisherParams::default().with_floor(f);
        assert!(fisher_merge_ref(&[&a], &[&a], &[1.0], floor(-1.0), &mut out).is_err());
        assert!(fisher_accumulate_ref(&mut out, &a, -2.0).is_err());
        for norms in [&[0.0][..], &[f64::NAN], &[1.0, 1.0]] {
            let normalized = FisherParams::default().with_normalization(norms);
            assert!(fisher_merge_ref(&[&a], &[&a], &[1.0], normalized, &mut out).is_err());
        }
        let trim_nothing = TiesParams::default().with_keep(KeepRule::Density(0.0));
        assert!(ties_ref(&a, &[&a], &[1.0], trim_nothing, &mut out).is_err());
        assert!(dare_ref(&a, DareParams::new(1.0, 0), 0, &mut out).is_err());
        assert!(dare_ref(&a, DareParams::new(-0.1, 0), 0, &mut out).is_err());
        assert!(breadcrumbs_ref(&a, BreadcrumbsParams::new(0.9, 0.2), &mut out).is_err());
        assert!(breadcrumbs_ref(&a, BreadcrumbsParams::new(0.5, 1.0), &mut out).is_err());
    }

    #[test]
    fn ties_elects_signs_and_averages_disjointly() {
        let base = [10.0f32; 5];
        let t1 = [1.0f32, -2.0, 3.0, 0.0, 2.0];
        let t2 = [3.0f32, 1.0, -1.0, 0.0, 0.0];
        let mut out = [0.0; 5];
        ties_elect_ref(&base, &[&t1, &t2], &[1.0, 1.0], 1.0, &mut out).unwrap();
        // Entry 0: both agree (+): mean 2. Entry 1: sum -1 -> '-': only t1: -2.
        // Entry 2: sum 2 -> '+': only t1: 3. Entry 3: no sign: 0.
        // Entry 4: a trimmed (zero) entry does not vote in the mean: 2, not 1.
        assert_eq!(out, [12.0, 8.0, 13.0, 10.0, 12.0]);
    }

    #[test]
    fn ties_on_one_model_is_trimmed_task_arithmetic() {
        let rng = CounterRng::new(3);
        let tau: Vec<f16> = (0..101).map(|i| f16::from_f64(rng.normal_at(i))).collect();
        let base: Vec<f16> = (0..101)
            .map(|i| f16::from_f64(rng.normal_at(1000 + i)))
            .collect();
        let mut trimmed = vec![0.0f32; 101];
        ties_trim_ref(&tau, KeepRule::Density(0.3), &mut trimmed).unwrap();
        assert_eq!(trimmed.iter().filter(|v| **v != 0.0).count(), 30);
        let (mut ties, mut ta) = (vec![0.0; 101], vec![0.0; 101]);
        let params = TiesParams::default()
            .with_keep(KeepRule::Density(0.3))
            .with_lambda(0.7);
        ties_ref(&base, &[&tau], &[1.0], params, &mut ties).unwrap();
        let base: Vec<f32> = base.iter().map(|b| b.to_f32()).collect();
        task_arithmetic_ref(&base, &[&trimmed], &[1.0], 0.7, &mut ta).unwrap();
        assert_eq!(ties, ta);
    }

    #[test]
    fn fisher_with_equal_fishers_is_the_weighted_mean() {
        let a = [1.0f32, -2.0, 4.0];
        let b = [3.0f32, 6.0, -4.0];
        let f = [0.5f32, 2.0, 7.0];
        let (mut fisher, mut mean) = ([0.0; 3], [0.0; 3]);
        let plain = FisherParams::default();
        fisher_merge_ref(&[&a, &b], &[&f, &f], &[1.0, 3.0], plain, &mut fisher).unwrap();
        weighted_mean_ref(&[&a, &b], &[1.0, 3.0], &mut mean).unwrap();
        assert_eq!(fisher, mean);
        // All-zero Fishers fall back to the plain mean instead of 0/0.
        let z = [0.0f32; 3];
        fisher_merge_ref(&[&a, &b], &[&z, &z], &[1.0, 3.0], plain, &mut fisher).unwrap();
        assert_eq!(fisher, mean);
        // Unequal Fishers pull towards the confident model.
        let fa = [1.0f32, 1.0, 1.0];
        let fb = [3.0f32, 0.0, 1.0];
        fisher_merge_ref(&[&a, &b], &[&fa, &fb], &[1.0, 1.0], plain, &mut fisher).unwrap();
        assert_eq!(fisher, [2.5, -2.0, 0.0]);
        // A floor lifts the zero Fisher.
        let floored = plain.with_floor(1.0);
        fisher_merge_ref(&[&a, &b], &[&fa, &fb], &[1.0, 1.0], floored, &mut fisher).unwrap();
        assert_eq!(fisher[1], 2.0);
        // Normalised by ||F_i||: weights 1 / 2 and 2 / 4 are equal, so the plain Fisher merge.
        let normalized = plain.with_normalization(&[4.0, 16.0]);
        let mut by_norm = [0.0; 3];
        fisher_merge_ref(
            &[&a, &b],
            &[&fa, &fb],
            &[1.0, 2.0],
            normalized,
            &mut by_norm,
        )
        .unwrap();
        assert_eq!(by_norm, [2.5, -2.0, 0.0]);
        let mut acc = [1.0f32, 0.0];
        fisher_accumulate_ref(&mut acc, &[2.0f32, -3.0], 0.5).unwrap();
        assert_eq!(acc, [3.0, 4.5]);
    }

    #[test]
    fn dare_drops_about_p_and_rescales() {
        let n = 20_000;
        let tau: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32).collect();
        let mut out = vec![0.0; n];
        let params = DareParams::new(0.9, 11);
        dare_ref(&tau, params, 0, &mut out).unwrap();
        let kept = out.iter().filter(|v| **v != 0.0).count() as f64 / n as f64;
        // Binomial(n, 0.1): sd = sqrt(0.09 / n) ~ 0.0021; allow 5 sd.
        assert!((kept - 0.1).abs() < 0.011, "kept {kept}");
        for (o, t) in out.iter().zip(&tau) {
            assert!(*o == 0.0 || (*o - t * 10.0).abs() <= 1e-5 * o.abs());
        }
        let mut l1 = vec![0.0; n];
        dare_ref(
            &tau,
            params.with_rescale(DareRescale::PreserveL1),
            0,
            &mut l1,
        )
        .unwrap();
        let (a, b): (f64, f64) = (
            tau.iter().map(|v| f64::from(*v)).sum(),
            l1.iter().map(|v| f64::from(*v)).sum(),
        );
        assert!((a - b).abs() <= 1e-6 * a);
        // The boundary: an element whose draw equals the integer threshold survives.
        let rng = CounterRng::new(11);
        let draw = rng.u24_at(5);
        let at_boundary = DareParams::new(f64::from(draw) / 16_777_216.0, 11);
        assert_eq!(at_boundary.drop_threshold(), draw);
        assert!(at_boundary.keeps(&rng, 5));
        assert!(!DareParams::new(f64::from(draw + 1) / 16_777_216.0, 11).keeps(&rng, 5));
        // p = 0 keeps everything unchanged.
        dare_ref(&tau, DareParams::new(0.0, 5), 0, &mut out).unwrap();
        assert_eq!(out, tau);
    }

    #[test]
    fn breadcrumbs_drops_both_tails() {
        let tau = [0.1f32, -5.0, 0.3, 0.2, -0.4, 0.05, 3.0, 0.01, -0.2, 0.6];
        let mut out = [0.0; 10];
        // top = floor(0.1 * 10) = 1 (the -5), keep = floor(0.5 * 10) = 5: 3, 0.6, -0.4, 0.3, 0.2.
        breadcrumbs_ref(&tau, BreadcrumbsParams::new(0.5, 0.1), &mut out).unwrap();
        assert_eq!(out, [0.0, 0.0, 0.3, 0.2, -0.4, 0.0, 3.0, 0.0, 0.0, 0.6]);
        // gamma * n < 1 drops no outlier, so the tensor is not zeroed.
        breadcrumbs_ref(&tau, BreadcrumbsParams::new(0.2, 0.05), &mut out).unwrap();
        assert_eq!(out, [0.0, -5.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0]);
    }

    proptest! {
        #[test]
        fn dare_mask_is_independent_of_chunking(seed in any::<u64>(), split in 0usize..64, p in 0.0f64..0.99) {
            let tau: Vec<f32> = (0..64).map(|i| i as f32 - 31.5).collect();
            let params = DareParams::new(p, seed);
            let mut whole = vec![0.0; 64];
            dare_ref(&tau, params, 0, &mut whole).unwrap();
            let mut parts = vec![0.0; 64];
            let (a, b) = parts.split_at_mut(split);
            dare_ref(&tau[..split], params, 0, a).unwrap();
            dare_ref(&tau[split..], params, split as u64, b).unwrap();
            prop_assert_eq!(whole, parts);
        }

        #[test]
        fn reductions_are_elementwise_so_chunking_does_not_matter(
            values in prop::collection::vec(-100.0f32..100.0, 3 * 17),
            split in 0usize..17,
        ) {
            let (m0, rest) = values.split_at(17);
            let (m1, m2) = rest.split_at(17);
            let weights = [0.5, 1.5, 2.0];
            let mut whole = vec![0.0; 17];
            weighted_mean_ref(&[m0, m1, m2], &weights, &mut whole).unwrap();
            let mut parts = vec![0.0; 17];
            let (a, b) = parts.split_at_mut(split);
            weighted_mean_ref(&[&m0[..split], &m1[..split], &m2[..split]], &weights, a).unwrap();
            weighted_mean_ref(&[&m0[split..], &m1[split..], &m2[split..]], &weights, b).unwrap();
            prop_assert_eq!(whole, parts);
        }
    }
}
