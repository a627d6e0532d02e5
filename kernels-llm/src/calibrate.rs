//! Threshold calibration on text: a dense model decodes the text twice (the two passes of
//! `kernels_cpu::calibrate::Calibration`) while every layer's activations at the sites of a
//! policy are fed to it; each threshold is the exact `sparsity`-quantile of its site's
//! magnitudes over all the text's positions.

use alloc::vec;
use alloc::vec::Vec;

use kernels_core::{Element, Error, MultiPass, Result};
use kernels_cpu::Cpu;
use kernels_cpu::calibrate::Calibration;

use crate::model::{Decoder, LayerThresholds, Llama, Policy, Site};

/// The sites whose thresholds `policy` reads.
#[must_use]
pub fn sites(policy: Policy) -> &'static [Site] {
    match policy {
        Policy::Dense => &[],
        Policy::Cats => &[Site::GateActivation],
        Policy::Teal => &[
            Site::AttentionInput,
            Site::AttentionOutput,
            Site::MlpInput,
            Site::DownInput,
        ],
    }
}

/// Per-layer thresholds for `policy` at `sparsity` (the share of each site's activations to
/// skip, in `[0, 1]`), from decoding `tokens` in non-overlapping windows of the decoder's
/// capacity. `model` must be loaded with [`Policy::Dense`], which computes every site.
///
/// # Errors
///
/// [`Error::InvalidParam`] for a sparse model, no tokens, or a sparsity outside `[0, 1]`; the
/// forward pass's errors.
pub fn calibrate<W: Element>(
    model: &Llama<W>,
    cpu: &Cpu,
    decoder: &mut Decoder,
    tokens: &[u32],
    policy: Policy,
    sparsity: f64,
    logits: &mut [f32],
) -> Result<Vec<LayerThresholds>> {
    if model.policy != Policy::Dense {
        return Err(Error::InvalidParam {
            name: "model",
            value: f64::NAN,
            expected: "loaded with Policy::Dense (which computes every site)",
        });
    }
    if tokens.is_empty() {
        return Err(Error::InvalidParam {
            name: "tokens",
            value: 0.0,
            expected: "at least one",
        });
    }
    let wanted = sites(policy);
    let mut calibration = Calibration::new(sparsity)?;
    let mut thresholds = vec![LayerThresholds::default(); model.config.layers];
    if wanted.is_empty() {
        return Ok(thresholds);
    }
    loop {
        for window in tokens.chunks(decoder.capacity()) {
            decoder.reset();
            for &t in window {
                model.forward_observed(cpu, decoder, t, logits, &mut |layer, site, x| {
                    if wanted.contains(&site) {
                        calibration.feed(cpu, layer, site, x)
                    } else {
                        Ok(())
                    }
                })?;
            }
        }
        if !calibration.next_pass()? {
            break;
        }
    }
    for (layer, site, t) in calibration.finish()? {
        let slot = &mut thresholds[layer];
        match site {
            Site::GateActivation => slot.gate_activation = t,
            Site::AttentionInput => slot.attention_input = t,
            Site::AttentionOutput => slot.attention_output = t,
            Site::MlpInput => slot.mlp_input = t,
            Site::DownInput => slot.down_input = t,
            _ => {}
        }
    }
    Ok(thresholds)
}
