//! The decoder with its products on the GPU (lavapipe in CI): every position's logits against
//! the `f64` reference within the CPU's [`LOGIT_RELATIVE_TOLERANCE`], dense, CATS and TEAL, `f32`
//! and `bf16` weights; greedy generation and perplexity through the same [`Forward`] as the CPU.
#![cfg(feature = "gpu")]

use kernels_core::bf16;
use kernels_cpu::Cpu;
use kernels_llm::generate::{generate, perplexity};
use kernels_llm::gguf::Gguf;
use kernels_llm::gpu::GpuLlama;
use kernels_llm::model::{
    Decoder, Forward, LOGIT_RELATIVE_TOLERANCE, LayerThresholds, Llama, LlamaConfig, OnCpu, Policy,
    RopeStyle, reference_logits, synthetic_gguf,
};
use kernels_wgpu::prelude::{Context, ContextOptions, GpuElement};

const CONFIG: LlamaConfig = LlamaConfig {
    vocab: 37,
    hidden: 32,
    intermediate: 40,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    head_dim: 8,
    rope_theta: 10_000.0,
    rope_style: RopeStyle::Interleaved,
    rms_eps: 1e-5,
    context: 32,
};

const PROMPT: [u32; 6] = [3, 17, 0, 36, 5, 21];

/// Thresholds that skip a good share of each site's activations (as the CPU tests use).
const SPARSE: LayerThresholds = LayerThresholds {
    gate_activation: 0.2,
    attention_input: 0.5,
    attention_output: 0.2,
    mlp_input: 0.6,
    down_input: 0.1,
};

/// A GPU context, or `None` where the environment says to skip GPU tests.
fn gpu_or_skip() -> Option<Context> {
    match Context::new_blocking(ContextOptions::default()) {
        Ok(ctx) => Some(ctx),
        Err(e) if std::env::var_os("KERNELS_WGPU_SKIP_WITHOUT_ADAPTER").is_some() => {
            eprintln!("skipped: no GPU adapter: {e}");
            None
        }
        Err(e) => panic!("no GPU adapter (set KERNELS_WGPU_SKIP_WITHOUT_ADAPTER to skip): {e}"),
    }
}

fn matches_reference<W: GpuElement>(ctx: &Context, file: &Gguf<'_>, policy: Policy) {
    let mut model = Llama::<W>::from_gguf_with(file, policy).unwrap();
    if policy != Policy::Dense {
        model.set_thresholds(vec![SPARSE; CONFIG.layers]).unwrap();
    }
    let mut on_gpu = GpuLlama::new(ctx, &model).unwrap();
    let mut decoder = Decoder::new(&CONFIG, PROMPT.len()).unwrap();
    let mut logits = vec![0.0f32; CONFIG.vocab];
    for (pos, &t) in PROMPT.iter().enumerate() {
        on_gpu.forward(&mut decoder, t, &mut logits).unwrap();
        let expect = reference_logits(&model, &PROMPT[..=pos]).unwrap();
        let scale = 1.0 + expect.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (j, (g, e)) in logits.iter().zip(&expect).enumerate() {
            assert!(
                (f64::from(*g) - e).abs() <= LOGIT_RELATIVE_TOLERANCE * scale,
                "{policy:?} {:?} pos {pos} logit {j}: {g} vs {e}",
                W::DTYPE
            );
        }
    }
}

#[test]
fn the_gpu_forward_matches_the_reference() {
    let Some(ctx) = gpu_or_skip() else {
        return;
    };
    let bytes = synthetic_gguf(&CONFIG, 9, false);
    let file = Gguf::parse(&bytes).unwrap();
    for policy in [Policy::Dense, Policy::Cats, Policy::Teal] {
        matches_reference::<f32>(&ctx, &file, policy);
        matches_reference::<bf16>(&ctx, &file, policy);
    }
}

#[test]
fn generation_and_perplexity_run_on_the_gpu_as_on_the_cpu() {
    let Some(ctx) = gpu_or_skip() else {
        return;
    };
    let bytes = synthetic_gguf(&CONFIG, 4, true);
    let model = Llama::<f32>::from_gguf(&Gguf::parse(&bytes).unwrap()).unwrap();
    let cpu = Cpu::detect();
    let mut on_cpu = OnCpu {
        model: &model,
        cpu: &cpu,
    };
    let mut on_gpu = GpuLlama::new(&ctx, &model).unwrap();
    let mut decoder = Decoder::new(&CONFIG, 16).unwrap();
    let mut logits = vec![0.0f32; CONFIG.vocab];
    let text: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % 37).collect();
    let mut scored = |m: &mut dyn Forward| perplexity(m, &mut decoder, &text, &mut logits).unwrap();
    let (cpu_ppl, gpu_ppl) = (scored(&mut on_cpu), scored(&mut on_gpu));
    assert_eq!(cpu_ppl.tokens_scored, gpu_ppl.tokens_scored);
    let relative = (cpu_ppl.value() - gpu_ppl.value()).abs() / cpu_ppl.value();
    assert!(
        relative < 1e-4,
        "{} vs {}",
        cpu_ppl.value(),
        gpu_ppl.value()
    );
    let answer = generate(
        &mut on_gpu,
        &mut decoder,
        &PROMPT,
        5,
        None,
        &mut logits,
        |_| true,
    );
    assert_eq!(answer.unwrap().len(), 5);
    // A token outside the vocabulary is refused before anything runs on the device.
    assert!(on_gpu.forward(&mut decoder, 99, &mut logits).is_err());
    assert!(on_gpu.forward(&mut decoder, 1, &mut logits[1..]).is_err());
}

/// The GPU's weights are the model's, rounded once: a bf16 model is not an f32 one.
#[test]
fn the_gpu_reads_the_models_own_weight_type() {
    let Some(ctx) = gpu_or_skip() else {
        return;
    };
    let bytes = synthetic_gguf(&CONFIG, 2, true);
    let file = Gguf::parse(&bytes).unwrap();
    let run = |logits: &mut Vec<f32>, forward: &mut dyn Forward| {
        let mut decoder = Decoder::new(&CONFIG, 2).unwrap();
        forward.forward(&mut decoder, 7, logits).unwrap();
    };
    let (f, b) = (
        Llama::<f32>::from_gguf(&file).unwrap(),
        Llama::<bf16>::from_gguf(&file).unwrap(),
    );
    let (mut lf, mut lb) = (vec![0.0; CONFIG.vocab], vec![0.0; CONFIG.vocab]);
    run(&mut lf, &mut GpuLlama::new(&ctx, &f).unwrap());
    run(&mut lb, &mut GpuLlama::new(&ctx, &b).unwrap());
    assert_ne!(lf, lb);
}
