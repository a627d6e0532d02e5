//! Synthetic Llama-shaped checkpoints: a base model and fine-tunes of it (the base plus small
//! independent deltas), written as real model directories (`config.json`, safetensors through
//! [`crate::output::OutputDir`], so sharded and atomic as any output). For demos, tests and the
//! merge benchmark; the values come from the counter-based generator, so a seed names a model.

use std::path::Path;

use anyhow::Result;
use kernels_core::CounterRng;
use rayon::prelude::*;

use crate::checkpoint::ElementType;
use kernels_cpu::Cpu;

use crate::merge::Narrower;
use crate::output::{OutputDir, PlannedTensor};

/// The shape of a synthetic Llama.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlamaShape {
    /// Decoder layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// MLP size.
    pub intermediate: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

impl LlamaShape {
    /// The tensors, in a loader's order: embedding, per layer attention, MLP and norms, final
    /// norm, untied `lm_head`.
    #[must_use]
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, m) = (self.hidden, self.intermediate);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            for name in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                out.push((format!("{p}.self_attn.{name}.weight"), vec![h, h]));
            }
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![m, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![m, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, m]));
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        out.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        out
    }

    /// Parameters in all.
    #[must_use]
    pub fn parameters(&self) -> usize {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// Writes a model directory at `dir`: the base model (`delta_seed` `None`) or a fine-tune of it
/// (the base plus `N(0, delta_scale^2)` from `delta_seed`). Base weights are `N(0, 0.02^2)`,
/// norms 1.
///
/// # Errors
///
/// An existing `dir`, an I/O error.
pub fn write_model(
    dir: &Path,
    shape: LlamaShape,
    dtype: ElementType,
    base_seed: u64,
    delta: Option<(u64, f32)>,
) -> Result<()> {
    let tensors = shape.tensors();
    let plan = tensors
        .iter()
        .map(|(name, shape)| PlannedTensor {
            name: name.clone(),
            shape: shape.clone(),
            dtype,
        })
        .collect();
    let mut out = OutputDir::create(dir, false, 5_000_000_000, plan)?;
    let base = CounterRng::new(base_seed);
    let delta_rng = delta.map(|(seed, scale)| (CounterRng::new(seed), scale));
    let (cpu, mut narrower) = (Cpu::detect(), Narrower::default());
    let mut first = 0u64;
    for (name, shape) in &tensors {
        let n: usize = shape.iter().product();
        let norm = name.ends_with("norm.weight");
        let values: Vec<f32> = (0..n)
            .into_par_iter()
            .map(|i| {
                let index = first + i as u64;
                let b = if norm {
                    1.0
                } else {
                    0.02 * base.normal_at(index) as f32
                };
                match &delta_rng {
                    Some((rng, scale)) => b + scale * rng.normal_at(index) as f32,
                    None => b,
                }
            })
            .collect();
        first += n as u64;
        out.write_next(narrower.bytes(&cpu, &values, dtype)?)?;
    }
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": (shape.hidden / 64).max(1),
        "num_key_value_heads": (shape.hidden / 64).max(1),
        "vocab_size": shape.vocab,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false,
        "torch_dtype": dtype.torch_name(),
    });
    out.write_file(
        "config.json",
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    out.commit()?;
    Ok(())
}
