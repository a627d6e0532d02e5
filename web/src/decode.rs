//! The decode demo: a GGUF model from the user's disk (or a tiny synthetic one), its tokenizer,
//! CATS thresholds calibrated on the prompt at a chosen sparsity, and greedy generation on the CPU
//! kernels (simd128 in the browser), with tokens/s. The dense model's logits for the prompt's first
//! token are checked against the `f64` reference first.

use kernels_core::{Error, Result, bf16};
use kernels_cpu::Cpu;
use kernels_llm::calibrate::calibrate;
use kernels_llm::generate::argmax;
use kernels_llm::gguf::Gguf;
use kernels_llm::model::{
    Decoder, LOGIT_RELATIVE_TOLERANCE, Llama, LlamaConfig, Policy, RopeStyle, reference_logits,
    synthetic_writer,
};
use kernels_llm::tokenizer::{Tokenizer, byte_level_alphabet};

use crate::demos::Check;

/// A tiny `llama` GGUF with a byte-level tokenizer (the 256 byte tokens and an end token, no
/// merges) and random weights: its text is noise, but every step of the demo runs on it.
#[must_use]
pub fn synthetic_model(seed: u64) -> Vec<u8> {
    let config = LlamaConfig {
        vocab: 257,
        hidden: 64,
        intermediate: 192,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        rope_theta: 10_000.0,
        rope_style: RopeStyle::Interleaved,
        rms_eps: 1e-5,
        context: 256,
    };
    let mut w = synthetic_writer(&config, seed, false);
    let alphabet: Vec<String> = byte_level_alphabet().iter().map(char::to_string).collect();
    let mut tokens: Vec<&str> = alphabet.iter().map(String::as_str).collect();
    tokens.push("<|endoftext|>");
    let mut types = vec![1i32; 256];
    types.push(3);
    w.metadata_str("tokenizer.ggml.model", "gpt2");
    w.metadata_str("tokenizer.ggml.pre", "default");
    w.metadata_strs("tokenizer.ggml.tokens", &tokens);
    w.metadata_strs("tokenizer.ggml.merges", &[]);
    w.metadata_i32s("tokenizer.ggml.token_type", &types);
    w.metadata_u32("tokenizer.ggml.eos_token_id", 256);
    w.finish()
}

/// A decode in progress: the CATS model after the prompt, stepped one token at a time so the page
/// can show each token and stop between two.
pub struct Session {
    tokenizer: Tokenizer,
    model: Llama<bf16>,
    decoder: Decoder,
    logits: Vec<f32>,
    eos: Option<u32>,
    /// The next token (greedy), not yet shown.
    next: u32,
    /// Tokens shown so far.
    pub generated: Vec<u32>,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// The dense model's first logits against the `f64` reference.
    pub check: Check,
}

impl Session {
    /// Reads the model and its tokenizer, checks the dense model's logits for the prompt's first
    /// token against the reference, calibrates CATS thresholds at `sparsity` on the prompt itself,
    /// and runs the prompt through the CATS model; room for `max_tokens` more (at most the model's
    /// context).
    ///
    /// # Errors
    ///
    /// The reader's, tokenizer's and decoder's errors (not a GGUF file, an architecture or
    /// tokenizer the crate does not know, a prompt longer than the model's context), and an empty
    /// prompt.
    pub fn start(
        cpu: &Cpu,
        gguf: &[u8],
        prompt: &str,
        max_tokens: usize,
        sparsity: f64,
    ) -> Result<Self> {
        let file = Gguf::parse(gguf)?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let ids = tokenizer.encode(prompt)?;
        if ids.is_empty() {
            return Err(Error::InvalidParam {
                name: "prompt",
                value: 0.0,
                expected: "some text (it encodes to no token)",
            });
        }
        let dense = Llama::<bf16>::from_gguf(&file)?;
        let capacity = (ids.len() + max_tokens).min(dense.config.context);
        let mut decoder = Decoder::new(&dense.config, capacity)?;
        let mut logits = vec![0.0f32; dense.config.vocab];
        dense.forward(cpu, &mut decoder, ids[0], &mut logits)?;
        let expect = reference_logits(&dense, &ids[..1])?;
        let scale = 1.0 + expect.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let mut check = Check::default();
        for (&got, &e) in logits.iter().zip(&expect) {
            check.add(got, e, LOGIT_RELATIVE_TOLERANCE * scale);
        }
        decoder.reset();
        let thresholds = calibrate(
            &dense,
            cpu,
            &mut decoder,
            &ids,
            Policy::Cats,
            sparsity,
            &mut logits,
        )?;
        drop(dense);
        let mut model = Llama::<bf16>::from_gguf_with(&file, Policy::Cats)?;
        model.set_thresholds(thresholds)?;
        decoder.reset();
        for &t in &ids {
            model.forward(cpu, &mut decoder, t, &mut logits)?;
        }
        Ok(Self {
            next: argmax(&logits),
            eos: file
                .u64("tokenizer.ggml.eos_token_id")
                .and_then(|v| u32::try_from(v).ok()),
            tokenizer,
            model,
            decoder,
            logits,
            generated: Vec::new(),
            prompt_tokens: ids.len(),
            check,
        })
    }

    /// The next token's text, or `None` once the model ends its answer or the room is used up.
    ///
    /// # Errors
    ///
    /// The decoder's and tokenizer's errors.
    pub fn step(&mut self, cpu: &Cpu) -> Result<Option<String>> {
        let full = self.decoder.len() >= self.decoder.capacity();
        if Some(self.next) == self.eos || full {
            return Ok(None);
        }
        let token = self.next;
        self.generated.push(token);
        if self.decoder.len() < self.decoder.capacity() {
            self.model
                .forward(cpu, &mut self.decoder, token, &mut self.logits)?;
            self.next = argmax(&self.logits);
        }
        self.tokenizer.decode(&[token]).map(Some)
    }

    /// Everything generated so far, as text.
    ///
    /// # Errors
    ///
    /// The tokenizer's.
    pub fn text(&self) -> Result<String> {
        self.tokenizer.decode(&self.generated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_synthetic_model_decodes_and_matches_the_reference() {
        let cpu = Cpu::detect();
        let model = synthetic_model(1);
        let mut session = Session::start(&cpu, &model, "Hello, world", 12, 0.5).unwrap();
        assert!(session.check.passed(), "{:?}", session.check);
        assert_eq!(session.prompt_tokens, "Hello, world".len());
        let mut pieces = String::new();
        while let Some(piece) = session.step(&cpu).unwrap() {
            pieces.push_str(&piece);
        }
        assert!(!session.generated.is_empty() && session.generated.len() <= 12);
        assert_eq!(pieces, session.text().unwrap());
        assert!(
            session.step(&cpu).unwrap().is_none(),
            "a finished session stays finished"
        );
        assert!(Session::start(&cpu, b"GGUF but not really", "x", 1, 0.5).is_err());
        let e = Session::start(&cpu, &model, "", 1, 0.5).err().unwrap();
        assert!(e.to_string().contains("prompt"), "{e}");
    }
}
