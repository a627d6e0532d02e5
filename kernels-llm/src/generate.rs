//! What a user runs a model for: greedy generation with a stop token, and perplexity over
//! non-overlapping windows of a text.

use alloc::vec::Vec;

use kernels_core::{Element, Error, Result};
use kernels_cpu::Cpu;

use crate::model::{Decoder, Forward, Llama, OnCpu};

/// The most likely token of `logits` (the first of equals; NaN never wins).
///
/// ```
/// assert_eq!(kernels_llm::generate::argmax(&[0.5, 2.0, f32::NAN, 2.0]), 1);
/// ```
#[must_use]
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0 as u32
}

/// `log softmax(logits)[target]` in `f64`.
fn log_probability(logits: &[f32], target: u32) -> f64 {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    let sum: f64 = logits.iter().map(|&v| libm::exp(f64::from(v) - max)).sum();
    f64::from(logits[target as usize]) - max - libm::log(sum)
}

/// The result of [`Llama::perplexity`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Perplexity {
    /// Tokens whose probability was scored (every token of a window but its first).
    pub tokens_scored: usize,
    /// Their summed negative log-likelihood, nats.
    pub nll: f64,
}

impl Perplexity {
    /// `exp(nll / tokens_scored)` (NaN when nothing was scored).
    #[must_use]
    pub fn value(&self) -> f64 {
        libm::exp(self.nll / self.tokens_scored as f64)
    }
}

/// Greedy decoding: runs `prompt` through `decoder` (which it resets first), then appends
/// the most likely token until `max_tokens` are generated or `stop` comes up (not
/// included). `on_token` sees each token as it is chosen (for streaming) and may stop the
/// generation by returning `false`. `logits` is the caller's vocabulary-sized buffer.
///
/// # Errors
///
/// [`Error::InvalidParam`] for an empty prompt or a decoder too small for the prompt and
/// `max_tokens`; the model's [`Forward::forward`] errors.
pub fn generate(
    model: &mut dyn Forward,
    decoder: &mut Decoder,
    prompt: &[u32],
    max_tokens: usize,
    stop: Option<u32>,
    logits: &mut [f32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::InvalidParam {
            name: "prompt",
            value: 0.0,
            expected: "at least one token",
        });
    }
    // The last generated token is never run through the model.
    let needed = prompt.len() + max_tokens.saturating_sub(1);
    if needed > decoder.capacity() {
        return Err(Error::InvalidParam {
            name: "max_tokens",
            value: max_tokens as f64,
            expected: "fitting the decoder's capacity after the prompt",
        });
    }
    decoder.reset();
    for &t in prompt {
        model.forward(decoder, t, logits)?;
    }
    let mut out = Vec::with_capacity(max_tokens);
    while out.len() < max_tokens {
        let next = argmax(logits);
        if Some(next) == stop {
            break;
        }
        out.push(next);
        if !on_token(next) || out.len() == max_tokens {
            break;
        }
        model.forward(decoder, next, logits)?;
    }
    Ok(out)
}

/// Perplexity of `tokens` cut into non-overlapping windows of `decoder.capacity()` tokens
/// (the last may be shorter), each decoded from an empty cache; within a window every token
/// but the first is scored against the logits before it.
///
/// # Errors
///
/// [`Error::InvalidParam`] for fewer than two tokens; the model's [`Forward::forward`] errors.
pub fn perplexity(
    model: &mut dyn Forward,
    decoder: &mut Decoder,
    tokens: &[u32],
    logits: &mut [f32],
) -> Result<Perplexity> {
    if tokens.len() < 2 {
        return Err(Error::InvalidParam {
            name: "tokens",
            value: tokens.len() as f64,
            expected: "at least two",
        });
    }
    let mut result = Perplexity {
        tokens_scored: 0,
        nll: 0.0,
    };
    for window in tokens.chunks(decoder.capacity()) {
        decoder.reset();
        for (pos, &t) in window.iter().enumerate() {
            if pos > 0 {
                result.nll -= log_probability(logits, t);
                result.tokens_scored += 1;
            }
            if pos + 1 < window.len() {
                model.forward(decoder, t, logits)?;
            }
        }
    }
    Ok(result)
}

impl<W: Element> Llama<W> {
    /// [`generate`] on the CPU kernels.
    ///
    /// # Errors
    ///
    /// As [`generate`].
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &self,
        cpu: &Cpu,
        decoder: &mut Decoder,
        prompt: &[u32],
        max_tokens: usize,
        stop: Option<u32>,
        logits: &mut [f32],
        on_token: impl FnMut(u32) -> bool,
    ) -> Result<Vec<u32>> {
        let mut model = OnCpu { model: self, cpu };
        generate(
            &mut model, decoder, prompt, max_tokens, stop, logits, on_token,
        )
    }

    /// [`perplexity`] on the CPU kernels.
    ///
    /// # Errors
    ///
    /// As [`perplexity`].
    pub fn perplexity(
        &self,
        cpu: &Cpu,
        decoder: &mut Decoder,
        tokens: &[u32],
        logits: &mut [f32],
    ) -> Result<Perplexity> {
        perplexity(&mut OnCpu { model: self, cpu }, decoder, tokens, logits)
    }
}
