//! Threshold calibration on the GPU: the `k`-quantile of `|a|` over activation samples held on
//! the device, exact (the twin of `kernels_core::ops::sparse::calibrate_threshold_ref`).
//!
//! The samples of one layer and site may be spread over any number of tensors (a calibration
//! set is collected batch by batch); they are taken as one vector. The quantile is the radix
//! selection of [`crate::select`], so it is bit-identical to the reference; it is `async`
//! because the selection reads histograms back.

use kernels_core::Result;
use kernels_core::backend::quantile_rank;

use crate::select::{KeepRule, kth_largest_magnitude, topk_cut};
use crate::{Context, GpuTensor};

/// The threshold `t` at which a fraction `k` of the samples is inactive: the `ceil(k n)`-th
/// smallest `|a|` (0 when that rank is 0). `k` in `[0, 1]`; samples finite and not empty.
///
/// ```
/// # use kernels_wgpu::prelude::*;
/// # let ctx = Context::new_blocking(ContextOptions::default())?;
/// let a = GpuTensor::from_slice(&ctx, &[0.5f32, -0.1, 0.3])?;
/// let b = GpuTensor::from_slice(&ctx, &[-0.9f32, 0.2])?;
/// // Half of the samples (rounded up: 3 of 5) have |a| <= t.
/// assert_eq!(block_on(calibrate_threshold(&ctx, &[&a, &b], 0.5))?, 0.3);
/// # Ok::<(), Error>(())
/// ```
pub async fn calibrate_threshold(
    ctx: &Context,
    samples: &[&GpuTensor<f32>],
    k: f64,
) -> Result<f32> {
    let n: u64 = samples.iter().map(|s| s.len() as u64).sum();
    let rank = quantile_rank(n, k)?;
    if rank == 0 {
        // Still reject non-finite samples, as the reference does: a selection of nothing checks
        // every entry.
        topk_cut(ctx, samples, KeepRule::Count(0)).await?;
        return Ok(0.0);
    }
    // The rank-th smallest is the (n - rank + 1)-th largest.
    kth_largest_magnitude(ctx, samples, n - rank + 1).await
}
