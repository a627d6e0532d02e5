//! Decoding speed and quality (issue 15), printed as BENCHMARKS.md's tables:
//!
//! * SmolLM2-135M-Instruct (`scripts/fetch-smollm2.sh`), f32 and bf16 weights: thresholds
//!   calibrated on one text and perplexity on another (both named below); per policy and thread
//!   count, tokens/s of greedy decoding (the 37-token chat prompt "What is the capital of
//!   France?", 128 tokens, the end-of-sequence token ignored); the bandwidth bound of a token
//!   (every weight read once: the layers and the output projection, over STREAM) against its
//!   time; a layer's time (the token's, less the output projection's, over the layers) against
//!   its weights' bound; and the MLP's share of a token. The bounds count dense reads, so a
//!   sparse policy can pass 100 %; and SmolLM2's 270 MB of bf16 weights sit partly in this
//!   machine's ~300 MiB L3, so even dense decoding can.
//! * A Llama-2-7B-shaped random model of 2 layers (bf16; weights stream from memory): the same
//!   speed columns, thresholds calibrated on random tokens (its perplexity means nothing).
//!
//! Decoding runs on `kernels_cpu`'s spinning team, as `kernels generate` does. The STREAM-style
//! read of 1 GiB is measured in the same run for each thread count.
//!
//! Run: `cargo run --release -p kernels-benches --bin decode [-- MODEL.gguf]` (about 10 minutes;
//! without the SmolLM2 file only the 7B shape runs). `CALIB_TOKENS` and `EVAL_TOKENS` (default
//! 1024 each) cap the texts; `SKIP_7B=1` leaves the 7B shape out.

use std::path::Path;
use std::time::Instant;

use half::bf16;
use kernels_benches::{gb_per_s, median_time, stream_read};
use kernels_core::{Element, Result};
use kernels_cpu::Cpu;
use kernels_cpu::prelude::gemv;
use kernels_llm::calibrate::calibrate;
use kernels_llm::gguf::Gguf;
use kernels_llm::model::{Decoder, Llama, LlamaConfig, Policy, RopeStyle, Site, synthetic_gguf};
use kernels_llm::tokenizer::Tokenizer;

/// The calibration text and the evaluation text: on every Debian machine (`base-files`).
const CALIBRATION_TEXT: &str = "/usr/share/common-licenses/Apache-2.0";
const EVALUATION_TEXT: &str = "/usr/share/common-licenses/GPL-3";
const PROMPT: &str = "What is the capital of France?";
const DECODE_TOKENS: usize = 128;
const THREADS: [usize; 2] = [1, 2];

/// A policy at a sparsity, as the tables name it.
#[derive(Clone, Copy)]
struct Setting {
    label: &'static str,
    policy: Policy,
    sparsity: f64,
}

const SETTINGS: [Setting; 4] = [
    Setting {
        label: "dense",
        policy: Policy::Dense,
        sparsity: 0.0,
    },
    Setting {
        label: "CATS 50 %",
        policy: Policy::Cats,
        sparsity: 0.5,
    },
    Setting {
        label: "CATS 70 %",
        policy: Policy::Cats,
        sparsity: 0.7,
    },
    Setting {
        label: "TEAL 50 %",
        policy: Policy::Teal,
        sparsity: 0.5,
    },
];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    let streams: Vec<f64> = {
        let buffer = vec![1.0f32; (1 << 30) / 4];
        let cpu = Cpu::detect();
        THREADS
            .iter()
            .map(|&t| {
                let time = median_time(5, || {
                    std::hint::black_box(stream_read(&cpu, &buffer, t));
                });
                gb_per_s(buffer.len() * 4, time)
            })
            .collect()
    };
    for (t, s) in THREADS.iter().zip(&streams) {
        println!("STREAM-style read, 1 GiB, {t} thread(s): {s:.2} GB/s");
    }
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    if Path::new(&path).exists() {
        let bytes = std::fs::read(&path).expect("the model file reads");
        let file = Gguf::parse(&bytes)?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let text = |p: &str, cap: usize| -> Result<Vec<u32>> {
            let s = std::fs::read_to_string(p).expect("Debian's common-licenses");
            let mut tokens = tokenizer.encode(&s)?;
            tokens.truncate(cap);
            Ok(tokens)
        };
        let texts = Texts {
            calibration: text(CALIBRATION_TEXT, env_usize("CALIB_TOKENS", 1024))?,
            evaluation: text(EVALUATION_TEXT, env_usize("EVAL_TOKENS", 1024))?,
            prompt: tokenizer.encode(&tokenizer.chat_prompt(PROMPT)?)?,
        };
        println!(
            "\n#### SmolLM2-135M-Instruct ({path}): calibrated on {} ({} tokens), perplexity on {} ({} tokens), {} prompt tokens, {DECODE_TOKENS} generated\n",
            CALIBRATION_TEXT,
            texts.calibration.len(),
            EVALUATION_TEXT,
            texts.evaluation.len(),
            texts.prompt.len()
        );
        header(true);
        run::<f32>("f32", &file, &texts, &streams, true)?;
        run::<bf16>("bf16", &file, &texts, &streams, true)?;
    } else {
        println!("\n{path} not found (scripts/fetch-smollm2.sh fetches it): SmolLM2 skipped");
    }
    if std::env::var("SKIP_7B").is_err() {
        let config = LlamaConfig {
            vocab: 32_000,
            hidden: 4096,
            intermediate: 11_008,
            layers: 2,
            heads: 32,
            kv_heads: 32,
            head_dim: 128,
            rope_theta: 10_000.0,
            rope_style: RopeStyle::Interleaved,
            rms_eps: 1e-5,
            context: 4096,
        };
        let bytes = synthetic_gguf(&config, 7, false);
        let file = Gguf::parse(&bytes)?;
        let random = |n: usize, seed: u64| -> Vec<u32> {
            let rng = kernels_core::CounterRng::new(seed);
            (0..n as u64)
                .map(|i| rng.u32_at(i) % config.vocab as u32)
                .collect()
        };
        let texts = Texts {
            calibration: random(64, 1),
            evaluation: Vec::new(),
            prompt: random(4, 2),
        };
        println!(
            "\n#### Llama-2-7B shape, 2 layers, random bf16 weights: calibrated on 64 random tokens, 4 prompt tokens, 32 generated\n"
        );
        header(false);
        run::<bf16>("bf16", &file, &texts, &streams, false)?;
    }
    Ok(())
}

struct Texts {
    calibration: Vec<u32>,
    evaluation: Vec<u32>,
    prompt: Vec<u32>,
}

fn header(perplexity: bool) {
    let ppl = if perplexity { " perplexity |" } else { "" };
    println!(
        "| weights | policy |{ppl} threads | tok/s | ms/token | bound / token | ms/layer | layer bound ms | bound / layer | MLP share |"
    );
    let dashes = if perplexity { "---|" } else { "" };
    println!("|---|---|{dashes}---|---|---|---|---|---|---|---|");
}

/// Weight bytes a layer reads when every row is read.
fn layer_bytes(c: &LlamaConfig, element: usize) -> usize {
    let attention = 2 * c.hidden * c.heads * c.head_dim + 2 * c.hidden * c.kv_width();
    (attention + 3 * c.hidden * c.intermediate) * element
}

fn run<W: Element>(
    dtype: &str,
    file: &Gguf<'_>,
    texts: &Texts,
    streams: &[f64],
    with_perplexity: bool,
) -> Result<()> {
    let dense = Llama::<W>::from_gguf(file)?;
    let c = dense.config.clone();
    let window = 256.min(c.context);
    let tokens = if with_perplexity { DECODE_TOKENS } else { 32 };
    let mut logits = vec![0.0; c.vocab];
    for setting in SETTINGS
        .iter()
        .filter(|s| with_perplexity || s.label != "CATS 70 %")
    {
        let cpu = Cpu::detect().with_threads(2)?.with_spinning_team();
        let mut model = Llama::<W>::from_gguf_with(file, setting.policy)?;
        let mut decoder = Decoder::new(&c, window)?;
        if setting.policy != Policy::Dense {
            let thresholds = calibrate(
                &dense,
                &cpu,
                &mut decoder,
                &texts.calibration,
                setting.policy,
                setting.sparsity,
                &mut logits,
            )?;
            model.set_thresholds(thresholds)?;
        }
        let perplexity = if with_perplexity {
            let p = model.perplexity(&cpu, &mut decoder, &texts.evaluation, &mut logits)?;
            format!(" {:.2} |", p.value())
        } else {
            String::new()
        };
        for (&threads, &stream) in THREADS.iter().zip(streams) {
            let cpu = Cpu::detect().with_threads(threads)?.with_spinning_team();
            let mut decoder = Decoder::new(&c, texts.prompt.len() + tokens)?;
            let mut first = None;
            let mut count = 0;
            model.generate(
                &cpu,
                &mut decoder,
                &texts.prompt,
                tokens,
                None,
                &mut logits,
                |_| {
                    first.get_or_insert_with(Instant::now);
                    count += 1;
                    true
                },
            )?;
            let seconds = first.map_or(0.0, |f: Instant| f.elapsed().as_secs_f64());
            let per_token_ms = seconds * 1e3 / (count - 1) as f64;
            let (mlp_ms, head_ms) = mlp_and_head_ms(&model, &cpu, &texts.prompt)?;
            let layer_ms = (per_token_ms - head_ms) / c.layers as f64;
            let element = core::mem::size_of::<W>();
            let ms = |bytes: usize| bytes as f64 / (stream * 1e9) * 1e3;
            let bound_ms = ms(layer_bytes(&c, element));
            let token_bound_ms =
                ms(c.layers * layer_bytes(&c, element) + c.vocab * c.hidden * element);
            println!(
                "| {dtype} | {} |{perplexity} {threads} | {:.1} | {per_token_ms:.2} | {:.0} % | {layer_ms:.3} | {bound_ms:.3} | {:.0} % | {:.0} % |",
                setting.label,
                1e3 / per_token_ms,
                100.0 * token_bound_ms / per_token_ms,
                100.0 * bound_ms / layer_ms,
                100.0 * mlp_ms / per_token_ms,
            );
        }
    }
    Ok(())
}

/// The median time of every layer's MLP in turn (on the inputs a token gave them) and of the
/// output projection, in ms: a token's MLP share and its fixed head cost.
fn mlp_and_head_ms<W: Element>(model: &Llama<W>, cpu: &Cpu, prompt: &[u32]) -> Result<(f64, f64)> {
    let c = &model.config;
    let mut decoder = Decoder::new(c, prompt.len())?;
    let mut logits = vec![0.0; c.vocab];
    let mut inputs = vec![Vec::new(); c.layers];
    for &t in prompt {
        model.forward_observed(cpu, &mut decoder, t, &mut logits, &mut |layer, site, x| {
            if site == Site::MlpInput {
                inputs[layer] = x.to_vec();
            }
            Ok(())
        })?;
    }
    let mut out = vec![0.0; c.hidden];
    let mut failed = None;
    let mlp = median_time(15, || {
        for (layer, x) in inputs.iter().enumerate() {
            if let Err(e) = model.mlp(cpu, &mut decoder, layer, x, &mut out) {
                failed = Some(e);
            }
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    let head = model.output.as_ref().unwrap_or(&model.embed);
    let x = &inputs[c.layers - 1];
    let head_time = median_time(15, || {
        if let Err(e) = gemv(cpu, head.view(), x, &mut logits) {
            failed = Some(e);
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    Ok((mlp.as_secs_f64() * 1e3, head_time.as_secs_f64() * 1e3))
}
