//! Greedy chat with a GGUF model, dense weights: streams the answer and prints tokens per
//! second for the prompt and for the answer.
//!
//! Run: `cargo run --release -p kernels-llm --example chat -- [--bf16] [QUESTION]` (the model is
//! the SmolLM2 file `scripts/fetch-smollm2.sh` fetches, or `KERNELS_LLM_MODEL`; without one, a
//! tiny random model written here, whose answer is noise).

use std::io::Write;
use std::time::Instant;

use kernels_core::{Element, bf16};
use kernels_cpu::Cpu;
use kernels_llm::gguf::Gguf;
use kernels_llm::model::{Decoder, Llama, LlamaConfig, RopeStyle, synthetic_gguf};
use kernels_llm::tokenizer::Tokenizer;

fn run<W: Element>(
    file: &Gguf<'_>,
    prompt: &[u32],
    tokenizer: Option<&Tokenizer>,
) -> kernels_core::Result<()> {
    let loaded = Instant::now();
    let model = Llama::<W>::from_gguf(file)?;
    println!(
        "loaded {} layers as {:?} in {:.2} s",
        model.layers.len(),
        W::DTYPE,
        loaded.elapsed().as_secs_f64()
    );
    let cpu = Cpu::detect();
    let max = 64;
    let mut decoder = Decoder::new(
        &model.config,
        (prompt.len() + max).min(model.config.context),
    )?;
    let mut logits = vec![0.0; model.config.vocab];
    let eos = tokenizer.and_then(|t| t.eos);
    let started = Instant::now();
    let mut first = None;
    let (mut shown, mut printed) = (Vec::new(), 0);
    let answer = model.generate(&cpu, &mut decoder, prompt, max, eos, &mut logits, |t| {
        first.get_or_insert_with(Instant::now);
        shown.push(t);
        match tokenizer {
            Some(tok) => {
                // What the answer so far adds to what is printed (a token may end mid-character).
                let text = tok.decode(&shown).unwrap_or_default();
                if let Some(new) = text.get(printed..) {
                    print!("{new}");
                    printed = text.len();
                }
            }
            None => print!("{t} "),
        }
        let _ = std::io::stdout().flush();
        true
    })?;
    let prefill = first.map_or(started.elapsed(), |f| f - started);
    let decode = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    println!();
    println!(
        "prompt: {} tokens in {:.3} s ({:.1} tok/s); answer: {} tokens in {:.3} s ({:.1} tok/s)",
        prompt.len(),
        prefill.as_secs_f64(),
        prompt.len() as f64 / prefill.as_secs_f64(),
        answer.len(),
        decode,
        answer.len().saturating_sub(1) as f64 / decode.max(1e-9)
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bf16_weights = args.iter().any(|a| a == "--bf16");
    let question = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| "What is the capital of France?".into());
    let path = std::env::var("KERNELS_LLM_MODEL").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
        .into()
    });
    let bytes = std::fs::read(&path).unwrap_or_else(|_| {
        println!("{path} not found: a tiny random model instead");
        let config = LlamaConfig {
            vocab: 64,
            hidden: 32,
            intermediate: 48,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            rope_theta: 10_000.0,
            rope_style: RopeStyle::Interleaved,
            rms_eps: 1e-5,
            context: 128,
        };
        synthetic_gguf(&config, 1, true)
    });
    let file = Gguf::parse(&bytes)?;
    let tokenizer = Tokenizer::from_gguf(&file).ok();
    let prompt = match &tokenizer {
        Some(t) => t.encode(&t.chat_prompt(&question)?)?,
        None => vec![1, 2, 3],
    };
    if bf16_weights {
        run::<bf16>(&file, &prompt, tokenizer.as_ref())?;
    } else {
        run::<f32>(&file, &prompt, tokenizer.as_ref())?;
    }
    Ok(())
}
