//! Threshold calibration: the exact `k`-quantile of `|a|` in memory (threaded), and the streaming
//! two-pass form for every layer and sparsity site of a model at once.
//!
//! The threshold is the one of [`kernels_core::ops::sparse::calibrate_threshold_ref`]: the smallest
//! `t >= 0` with `#{|a| <= t} / n >= k`. Both forms return it bit for bit (selection is exact).
//! Used as the CATS/TEAL threshold, a fraction `k` of such activations is then inactive (`|a| <= t`).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use kernels_core::backend::{MagnitudeBracket, MagnitudeHistogram, quantile_rank};
use kernels_core::{Error, MultiPass, Result};

use crate::Cpu;
use crate::select::{Parts, observe_chunk, rank_keys, refine_chunk, validate};

/// The exact `k`-quantile threshold of `samples` taken as one vector (`k` in `[0, 1]`; finite
/// samples, not all empty): the radix select of [`crate::select`], threaded.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let batches: [&[f32]; 2] = [&[0.5, -0.1, 0.3], &[-0.9, 0.2]];
/// // Half of the samples (rounded up: 3 of 5) have |a| <= t.
/// assert_eq!(calibrate_threshold(&Cpu::detect(), &batches, 0.5)?, 0.3);
/// # Ok::<(), Error>(())
/// ```
pub fn calibrate_threshold(cpu: &Cpu, samples: &[&[f32]], k: f64) -> Result<f32> {
    let n: usize = samples.iter().map(|s| s.len()).sum();
    let rank = quantile_rank(n as u64, k)?;
    let parts = Parts::new(cpu, samples, 1);
    if rank == 0 {
        validate(cpu, &parts)?;
        return Ok(0.0);
    }
    let [found] = rank_keys(cpu, &parts, [rank])?;
    Ok(f32::from_bits(found.key))
}

/// Where a threshold applies in a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Site {
    /// CATS: `a = silu(W_gate x)`, the gate's output.
    GateActivation,
    /// TEAL: `x`, the input of gate and up.
    MlpInput,
    /// TEAL: `h = silu(g) * u`, the input of down.
    DownInput,
    /// TEAL: the input of the query, key and value projections.
    AttentionInput,
    /// TEAL: the input of the attention output projection.
    AttentionOutput,
}

#[derive(Clone, Debug)]
enum Stage {
    Histogram(MagnitudeHistogram),
    Refining(MagnitudeBracket),
    Done(f32),
}

/// Streaming calibration of many `(layer, site)` thresholds at once, over activations too large
/// to keep, in the [`MultiPass`] protocol: feed every chunk to [`Self::feed`], call
/// [`MultiPass::next_pass`], feed the same chunks again (any chunking, the same order per key),
/// then [`MultiPass::finish`] gives every threshold. Memory: 256 KiB per key in pass 1, 512 KiB
/// in pass 2.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let cpu = Cpu::detect();
/// let layers: [&[f32]; 2] = [&[0.5, -0.1, 0.3, -0.9], &[2.0, 1.0]];
/// let thresholds = Calibration::new(0.5)?.run(
///     || layers.iter().enumerate(),
///     |cal, (layer, a)| cal.feed(&cpu, layer, Site::GateActivation, a),
/// )?;
/// assert_eq!(thresholds, [(0, Site::GateActivation, 0.3), (1, Site::GateActivation, 1.0)]);
/// # Ok::<(), Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Calibration {
    k: f64,
    stages: BTreeMap<(usize, Site), Stage>,
    pass: Pass,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    First,
    Refining,
    Finished,
}

impl Calibration {
    /// A calibration for sparsity `k` in `[0, 1]` at every key.
    pub fn new(k: f64) -> Result<Self> {
        quantile_rank(1, k)?;
        Ok(Self {
            k,
            stages: BTreeMap::new(),
            pass: Pass::First,
        })
    }

    /// The next chunk of samples of `(layer, site)` in the current pass; a key first seen in
    /// pass 2 is a [`Error::PassOrder`].
    pub fn feed(&mut self, cpu: &Cpu, layer: usize, site: Site, samples: &[f32]) -> Result<()> {
        let stage = match self.pass {
            Pass::First => Some(
                self.stages
                    .entry((layer, site))
                    .or_insert_with(|| Stage::Histogram(MagnitudeHistogram::new())),
            ),
            Pass::Refining => self.stages.get_mut(&(layer, site)),
            Pass::Finished => {
                return Err(Error::PassOrder {
                    what: "Calibration::feed",
                    expected: "no more chunks once next_pass() has returned false",
                });
            }
        };
        match stage {
            Some(Stage::Histogram(h)) => observe_chunk(cpu, h, samples),
            Some(Stage::Refining(bracket)) => refine_chunk(cpu, bracket, samples),
            Some(Stage::Done(_)) => Ok(()),
            None => Err(Error::PassOrder {
                what: "Calibration::feed",
                expected: "in pass 2, only the (layer, site) keys of pass 1",
            }),
        }
    }
}

impl MultiPass for Calibration {
    type Output = Vec<(usize, Site, f32)>;

    fn next_pass(&mut self) -> Result<bool> {
        let mut stages = self.stages.clone();
        let mut again = false;
        for stage in stages.values_mut() {
            *stage = match stage {
                Stage::Histogram(h) => match quantile_rank(h.total(), self.k)? {
                    0 => Stage::Done(0.0),
                    rank => {
                        again = true;
                        Stage::Refining(h.kth_smallest(rank)?)
                    }
                },
                Stage::Refining(bracket) => Stage::Done(bracket.value()?),
                Stage::Done(t) => Stage::Done(*t),
            };
        }
        self.stages = stages;
        self.pass = if again {
            Pass::Refining
        } else {
            Pass::Finished
        };
        Ok(again)
    }

    fn finish(&self) -> Result<Vec<(usize, Site, f32)>> {
        self.stages
            .iter()
            .map(|(&(layer, site), stage)| match stage {
                Stage::Done(t) => Ok((layer, site, *t)),
                _ => Err(Error::PassOrder {
                    what: "Calibration::finish",
                    expected: "every pass fed, until next_pass() returns false",
                }),
            })
            .collect()
    }
}
