//! A Hugging Face `config.json` on arbitrary bytes: the reader never panics; a config it accepts
//! passes `validate` and rotates in halves; where its model is small, a checkpoint of that shape
//! loads from the same bytes and decodes a token to finite logits.
#![no_main]

use kernels_cpu::Cpu;
use kernels_llm::model::{Decoder, Llama, LlamaConfig, Policy, RopeStyle};
use kernels_llm::source::synthetic_hf;
use libfuzzer_sys::fuzz_target;

/// Largest model (in weights) the target builds, so a run stays fast.
const MAX_WEIGHTS: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Ok(config) = LlamaConfig::from_hf_config(data) else {
        return;
    };
    config.validate().unwrap();
    assert_eq!(config.rope_style, RopeStyle::Halves);
    let c = &config;
    let per_layer = c.hidden as u128
        * ((c.heads + 2 * c.kv_heads) * c.head_dim + c.heads * c.head_dim + 3 * c.intermediate)
            as u128;
    let weights = c.layers as u128 * per_layer + 2 * (c.vocab * c.hidden) as u128;
    if weights > MAX_WEIGHTS as u128 || c.context > 1 << 12 {
        return;
    }
    let (_, tensors) = synthetic_hf(c, 1, false);
    let model = Llama::<f32>::from_hf(data, &tensors, Policy::Dense).unwrap();
    let mut decoder = Decoder::new(c, 1).unwrap();
    let mut logits = vec![0.0; c.vocab];
    model
        .forward(&Cpu::detect(), &mut decoder, 0, &mut logits)
        .unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));
});
