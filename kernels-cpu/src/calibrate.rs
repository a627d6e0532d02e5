//! Threshold calibration: the exact `k`-quantile of `|a|` in memory (threaded), and the streaming
//! two-pass form for every layer and sparsity site of a model at once.
//!
//! The threshold is the one of [`kernels_core::ops::sparse::calibrate_threshold_ref`]: the smallest
//! `t >= 0` with `#{|a| <= t} / n >= k`. Both forms return it bit for bit (selection is exact).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use kernels_core::ops::select::{MagnitudeBracket, MagnitudeHistogram};
use kernels_core::ops::sparse::quantile_rank;
use kernels_core::{Error, Result};

use crate::Cpu;
use crate::select::{Parts, observe_chunk, rank_key, refine_chunk, validate};

/// The exact `k`-quantile threshold of `samples` (`k` in `[0, 1]`; finite, non-empty samples):
/// the radix select of [`crate::select`], threaded.
pub fn calibrate_threshold(cpu: &Cpu, samples: &[f32], k: f64) -> Result<f32> {
    let rank = quantile_rank(samples.len() as u64, k)?;
    let slices = [samples];
    let parts = Parts::new(cpu, &slices, 1);
    if rank == 0 {
        validate(cpu, &parts)?;
        return Ok(0.0);
    }
    Ok(f32::from_bits(rank_key(cpu, &parts, rank)?.key))
}

/// Where a threshold applies in an MLP layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Site {
    /// CATS: `a = silu(W_gate x)`, the gate's output.
    GateActivation,
    /// TEAL: `x`, the input of gate and up.
    MlpInput,
    /// TEAL: `h = silu(g) * u`, the input of down.
    DownInput,
}

enum Stage {
    Histogram(MagnitudeHistogram),
    Refining(MagnitudeBracket),
    Zero,
}

/// Streaming calibration of many `(layer, site)` thresholds at once, over activations too large
/// to keep: feed every chunk once to [`Self::observe`], call [`Self::start_refining`], feed the same
/// chunks again (any chunking, same order per key) to [`Self::refine`], then read
/// [`Self::thresholds`]. Memory: 256 KiB per key in pass 1, 512 KiB in pass 2.
pub struct Calibration {
    cpu: Cpu,
    k: f64,
    stages: BTreeMap<(usize, Site), Stage>,
    refining: bool,
}

impl Calibration {
    /// A calibration for sparsity `k` in `[0, 1]` at every key, counting on `cpu`.
    pub fn new(cpu: &Cpu, k: f64) -> Result<Self> {
        quantile_rank(1, k)?;
        Ok(Self {
            cpu: *cpu,
            k,
            stages: BTreeMap::new(),
            refining: false,
        })
    }

    fn wrong_pass(expected: &'static str) -> Error {
        Error::InvalidParam {
            name: "calibration pass",
            value: 0.0,
            expected,
        }
    }

    /// Pass 1: a chunk of samples of `(layer, site)`.
    pub fn observe(&mut self, layer: usize, site: Site, samples: &[f32]) -> Result<()> {
        if self.refining {
            return Err(Self::wrong_pass("observe() before start_refining()"));
        }
        match self
            .stages
            .entry((layer, site))
            .or_insert_with(|| Stage::Histogram(MagnitudeHistogram::new()))
        {
            Stage::Histogram(h) => observe_chunk(&self.cpu, h, samples),
            _ => unreachable!("only histograms before refining"),
        }
    }

    /// Ends pass 1.
    pub fn start_refining(&mut self) -> Result<()> {
        for stage in self.stages.values_mut() {
            let Stage::Histogram(h) = stage else {
                return Err(Self::wrong_pass("start_refining() once"));
            };
            let rank = quantile_rank(h.total(), self.k)?;
            *stage = if rank == 0 {
                Stage::Zero
            } else {
                Stage::Refining(h.kth_smallest(rank)?)
            };
        }
        self.refining = true;
        Ok(())
    }

    /// Pass 2: the same chunks again.
    pub fn refine(&mut self, layer: usize, site: Site, samples: &[f32]) -> Result<()> {
        if !self.refining {
            return Err(Self::wrong_pass("refine() after start_refining()"));
        }
        match self.stages.get_mut(&(layer, site)) {
            Some(Stage::Refining(bracket)) => refine_chunk(&self.cpu, bracket, samples),
            Some(Stage::Zero) => Ok(()),
            _ => Err(Error::InvalidParam {
                name: "layer",
                value: layer as f64,
                expected: "a (layer, site) seen in pass 1",
            }),
        }
    }

    /// Every `(layer, site, threshold)`, in key order.
    pub fn thresholds(&self) -> Result<Vec<(usize, Site, f32)>> {
        self.stages
            .iter()
            .map(|(&(layer, site), stage)| match stage {
                Stage::Refining(bracket) => Ok((layer, site, bracket.value()?)),
                Stage::Zero => Ok((layer, site, 0.0)),
                Stage::Histogram(_) => Err(Self::wrong_pass("thresholds() after both passes")),
            })
            .collect()
    }
}
