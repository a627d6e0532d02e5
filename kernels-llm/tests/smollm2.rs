//! SmolLM2-135M-Instruct from its GGUF (`scripts/fetch-smollm2.sh`; skipped where absent): the
//! dense forward pass, f32 and bf16 weights, predicts " Paris" after "The capital of France is",
//! and greedy decoding of the chat-templated question answers Paris.

use kernels_cpu::Cpu;
use kernels_llm::gguf::Gguf;
use kernels_llm::model::{Decoder, Llama};
use kernels_llm::tokenizer::Tokenizer;

fn model_bytes() -> Option<Vec<u8>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let bytes = std::fs::read(&path).ok();
    if bytes.is_none() {
        eprintln!("skipped: {} not fetched", path.display());
    }
    bytes
}

/// The id of each token, looked up in the file's vocabulary (each word of the prompt is one
/// token of SmolLM2's byte-level BPE; `Ġ` marks a leading space).
fn ids(file: &Gguf<'_>, tokens: &[&str]) -> Vec<u32> {
    let vocab = file
        .get("tokenizer.ggml.tokens")
        .unwrap()
        .as_array()
        .unwrap();
    tokens
        .iter()
        .map(|t| {
            vocab
                .iter()
                .position(|v| v.as_str() == Some(t))
                .unwrap_or_else(|| panic!("{t} not in the vocabulary")) as u32
        })
        .collect()
}

fn next_token<W: kernels_core::Element>(file: &Gguf<'_>, prompt: &[u32]) -> (u32, f32) {
    let model = Llama::<W>::from_gguf(file).unwrap();
    let cpu = Cpu::detect();
    let mut decoder = Decoder::new(&model.config, 64).unwrap();
    let mut logits = vec![0.0; model.config.vocab];
    for &t in prompt {
        model.forward(&cpu, &mut decoder, t, &mut logits).unwrap();
    }
    let (best, &top) = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap();
    let runner_up = logits
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != best)
        .map(|(_, &v)| v)
        .fold(f32::NEG_INFINITY, f32::max);
    (best as u32, top - runner_up)
}

#[test]
fn the_capital_of_france_is_paris() {
    let Some(bytes) = model_bytes() else {
        return;
    };
    let file = Gguf::parse(&bytes).unwrap();
    let prompt = ids(&file, &["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]);
    let paris = ids(&file, &["ĠParis"])[0];
    let (f32_best, f32_margin) = next_token::<f32>(&file, &prompt);
    assert_eq!(f32_best, paris, "f32 weights (margin {f32_margin})");
    let (bf16_best, bf16_margin) = next_token::<half::bf16>(&file, &prompt);
    assert_eq!(bf16_best, paris, "bf16 weights (margin {bf16_margin})");
    eprintln!("\" Paris\" by {f32_margin} (f32) and {bf16_margin} (bf16) logits");
}

/// Greedy decoding of `prompt` for at most `max` tokens, stopping at `eos`.
fn greedy<W: kernels_core::Element>(
    file: &Gguf<'_>,
    prompt: &[u32],
    eos: u32,
    max: usize,
) -> Vec<u32> {
    let model = Llama::<W>::from_gguf(file).unwrap();
    let mut decoder = Decoder::new(&model.config, prompt.len() + max).unwrap();
    let mut logits = vec![0.0; model.config.vocab];
    model
        .generate(
            &Cpu::detect(),
            &mut decoder,
            prompt,
            max,
            Some(eos),
            &mut logits,
            |_| true,
        )
        .unwrap()
}

#[test]
fn the_chat_answer_names_paris() {
    let Some(bytes) = model_bytes() else {
        return;
    };
    let file = Gguf::parse(&bytes).unwrap();
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    assert_eq!(
        tokenizer.encode("The capital of France is").unwrap(),
        ids(&file, &["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"])
    );
    // Digits split one by one (SmolLM2's pre-tokeniser), the space before them a token of its
    // own ("in", "Ġ", "2", "0", "2", "4"), and the text round-trips.
    let digits = tokenizer.encode("in 2024").unwrap();
    let two = tokenizer.token_id("2").unwrap();
    assert_eq!(
        (digits.len(), digits[2], digits[4]),
        (6, two, two),
        "{digits:?}"
    );
    assert_eq!(tokenizer.decode(&digits).unwrap(), "in 2024");
    let prompt = tokenizer
        .chat_prompt("What is the capital of France?")
        .unwrap();
    assert!(
        prompt.starts_with("<|im_start|>system\n") && prompt.ends_with("<|im_start|>assistant\n")
    );
    let ids = tokenizer.encode(&prompt).unwrap();
    assert_eq!(
        ids[0],
        tokenizer.token_id("<|im_start|>").unwrap(),
        "special tokens are parsed"
    );
    let eos = tokenizer.eos.unwrap();
    for answer in [
        greedy::<f32>(&file, &ids, eos, 24),
        greedy::<half::bf16>(&file, &ids, eos, 24),
    ] {
        let text = tokenizer.decode(&answer).unwrap();
        eprintln!("{} prompt tokens; answer: {text:?}", ids.len());
        assert!(text.contains("Paris"), "{text:?}");
    }
}

/// English prose scores a perplexity a small model reaches (tens, not thousands), in windows.
#[test]
fn perplexity_of_english_prose_is_plausible() {
    let Some(bytes) = model_bytes() else {
        return;
    };
    let file = Gguf::parse(&bytes).unwrap();
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    let text = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, \
        France. It is named after the engineer Gustave Eiffel, whose company designed and built \
        the tower from 1887 to 1889. Locally nicknamed the Iron Lady, it was constructed as the \
        centrepiece of the 1889 World's Fair.";
    let tokens = tokenizer.encode(text).unwrap();
    let model = Llama::<f32>::from_gguf(&file).unwrap();
    let mut decoder = Decoder::new(&model.config, 32).unwrap();
    let mut logits = vec![0.0; model.config.vocab];
    let p = model
        .perplexity(&Cpu::detect(), &mut decoder, &tokens, &mut logits)
        .unwrap();
    let windows = tokens.len().div_ceil(32);
    assert_eq!(p.tokens_scored, tokens.len() - windows);
    eprintln!(
        "perplexity {:.2} over {} tokens",
        p.value(),
        p.tokens_scored
    );
    assert!((2.0..60.0).contains(&p.value()), "{}", p.value());
}

const CALIBRATION_TEXT: &str = "The Great Wall of China is a series of fortifications that were \
    built across the historical northern borders of ancient Chinese states and Imperial China as \
    protection against various nomadic groups from the Eurasian Steppe. Several walls were built \
    from as early as the 7th century BC, with selective stretches later joined by Qin Shi Huang.";
const EVALUATION_TEXT: &str = "The Amazon River in South America is the largest river by \
    discharge volume of water in the world, and the disputed longest river system in the world \
    in comparison to the Nile. The headwaters of the Apurimac River on Nevado Mismi had been \
    considered for nearly a century as the Amazon basin's most distant source.";

/// CATS and TEAL at 50 %, calibrated on one paragraph and evaluated on another: their perplexity
/// beside the dense model's, and what each answers to the chat question (reported; the bar is
/// only that sparsity costs some perplexity without breaking the model).
#[test]
fn cats_and_teal_at_half_sparsity() {
    use kernels_llm::calibrate::calibrate;
    use kernels_llm::model::Policy;
    let Some(bytes) = model_bytes() else {
        return;
    };
    let file = Gguf::parse(&bytes).unwrap();
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    let cpu = Cpu::detect();
    let dense = Llama::<half::bf16>::from_gguf(&file).unwrap();
    let mut decoder = Decoder::new(&dense.config, 64).unwrap();
    let mut logits = vec![0.0; dense.config.vocab];
    let calibration = tokenizer.encode(CALIBRATION_TEXT).unwrap();
    let evaluation = tokenizer.encode(EVALUATION_TEXT).unwrap();
    let base = dense
        .perplexity(&cpu, &mut decoder, &evaluation, &mut logits)
        .unwrap();
    eprintln!(
        "dense: perplexity {:.2} over {} tokens",
        base.value(),
        base.tokens_scored
    );
    let question = tokenizer
        .encode(
            &tokenizer
                .chat_prompt("What is the capital of France?")
                .unwrap(),
        )
        .unwrap();
    for policy in [Policy::Cats, Policy::Teal] {
        let thresholds = calibrate(
            &dense,
            &cpu,
            &mut decoder,
            &calibration,
            policy,
            0.5,
            &mut logits,
        )
        .unwrap();
        let mut model = Llama::<half::bf16>::from_gguf_with(&file, policy).unwrap();
        model.set_thresholds(thresholds).unwrap();
        let p = model
            .perplexity(&cpu, &mut decoder, &evaluation, &mut logits)
            .unwrap();
        let mut answer_decoder = Decoder::new(&model.config, question.len() + 24).unwrap();
        let answer = model
            .generate(
                &cpu,
                &mut answer_decoder,
                &question,
                24,
                tokenizer.eos,
                &mut logits,
                |_| true,
            )
            .unwrap();
        let text = tokenizer.decode(&answer).unwrap();
        eprintln!(
            "{policy:?} 50 %: perplexity {:.2}; answer {text:?}",
            p.value()
        );
        assert!(
            p.value() > base.value() * 0.9 && p.value() < base.value() * 5.0,
            "{policy:?}"
        );
    }
}
