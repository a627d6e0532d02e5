//! The Llama architecture (RMSNorm, rotary embeddings, grouped-query attention with a KV cache,
//! SwiGLU MLP, tied or untied embeddings), decoding one token at a time with dense GEMVs from
//! `kernels-cpu`, weights `f32` or `bf16` (any [`Element`]).
//!
//! # Contract
//!
//! * [`Llama::from_gguf`] and [`Llama::from_hf`] (through [`Llama::from_source`]) check the
//!   architecture, the hyper-parameters against each other and each tensor's shape against
//!   them before they allocate it (so the source's own tensors bound what loading allocates),
//!   widening each tensor to `f32` and rounding it once to `W`.
//! * [`Llama::forward`] appends one token to a [`Decoder`]'s KV cache and writes the next
//!   token's logits; it allocates nothing (the decoder owns every buffer).
//! * Rotary embeddings rotate the pairs the file's row order expects: [`RopeStyle::Interleaved`]
//!   for GGUF (llama.cpp's converter permutes the query and key rows so that adjacent pairs
//!   rotate together), [`RopeStyle::Halves`] for Hugging Face checkpoints.

use alloc::vec;
use alloc::vec::Vec;

use kernels_core::{Element, Error, MatMut, MatRef, Real, Result};
use kernels_cpu::Cpu;
use kernels_cpu::attention::{AttentionHeads, attention};
pub use kernels_cpu::calibrate::Site;
use kernels_cpu::prelude::{
    CatsMlpWeights, MlpScratch, TealMlpWeights, TealThresholds, cats_mlp, gemv, sparse_input_gemv,
    teal_mlp,
};

use crate::gguf::Gguf;
use crate::source::{Naming, Tensor as SourceTensor, TensorSource};

/// Which entries of a head rotate together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// `(x[2i], x[2i + 1])`: GGUF files (ggml's normal mode).
    Interleaved,
    /// `(x[i], x[i + d / 2])`: Hugging Face checkpoints (`rotate_half`).
    Halves,
}

/// The hyper-parameters of a Llama-family model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Model width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key and value heads (grouped-query attention: `heads` is a multiple).
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Rotary base.
    pub rope_theta: f32,
    /// Rotary pairing.
    pub rope_style: RopeStyle,
    /// RMSNorm's epsilon.
    pub rms_eps: f32,
    /// Longest context the model was trained for.
    pub context: usize,
}

/// Largest width, layer or head count a config may give: far beyond any model, and small
/// enough that no product of two overflows.
pub const MAX_DIMENSION: u64 = 1 << 24;

pub(crate) fn invalid(name: &'static str, value: f64, expected: &'static str) -> Error {
    Error::InvalidParam {
        name,
        value,
        expected,
    }
}

impl LlamaConfig {
    /// The hyper-parameters of a GGUF file's `llama` model.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] for another architecture; [`Error::InvalidParam`] for a missing or
    /// inconsistent hyper-parameter (heads not dividing the width, key-value heads not dividing
    /// the heads, an odd head width, a value past [`MAX_DIMENSION`]).
    pub fn from_gguf(file: &Gguf<'_>) -> Result<Self> {
        if file.str("general.architecture") != Some("llama") {
            return Err(Error::Unsupported {
                feature: "a model architecture other than llama",
                hint: "general.architecture must be llama (Llama, SmolLM, Mistral-style models)",
            });
        }
        let size = |key: &'static str, default: Option<u64>| -> Result<usize> {
            let v = file
                .u64(key)
                .or(default)
                .ok_or(invalid(key, f64::NAN, "present"))?;
            if v == 0 || v > MAX_DIMENSION {
                return Err(invalid(key, v as f64, "between 1 and 2^24"));
            }
            Ok(v as usize)
        };
        let hidden = size("llama.embedding_length", None)?;
        let heads = size("llama.attention.head_count", None)?;
        let kv_heads = size("llama.attention.head_count_kv", Some(heads as u64))?;
        let embed = file.tensor("token_embd.weight").ok_or(invalid(
            "token_embd.weight",
            f64::NAN,
            "present",
        ))?;
        let vocab = size("llama.vocab_size", embed.dims.get(1).copied())?;
        if !hidden.is_multiple_of(heads) {
            return Err(invalid(
                "llama.attention.head_count",
                heads as f64,
                "dividing the width into heads",
            ));
        }
        let float = |key: &'static str, default: f64, ok: fn(f64) -> bool| -> Result<f32> {
            let v = file.f64(key).unwrap_or(default);
            if ok(v) {
                Ok(v as f32)
            } else {
                Err(invalid(key, v, "positive and finite"))
            }
        };
        let positive = |v: f64| v > 0.0 && v.is_finite();
        let config = Self {
            vocab,
            hidden,
            intermediate: size("llama.feed_forward_length", None)?,
            layers: size("llama.block_count", None)?,
            heads,
            kv_heads,
            head_dim: hidden / heads,
            rope_theta: float("llama.rope.freq_base", 10_000.0, positive)?,
            rope_style: RopeStyle::Interleaved,
            rms_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5, positive)?,
            context: size("llama.context_length", Some(2048))?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the hyper-parameters against each other: every size between 1 and
    /// [`MAX_DIMENSION`], an even head width, key-value heads dividing the heads, a positive
    /// finite rotary base and epsilon. Every loader calls it; a config built by hand can too.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParam`] naming the first field that fails.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("vocab", self.vocab),
            ("hidden", self.hidden),
            ("intermediate", self.intermediate),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("context", self.context),
        ];
        for (name, v) in sizes {
            if v == 0 || v as u64 > MAX_DIMENSION {
                return Err(invalid(name, v as f64, "between 1 and 2^24"));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(invalid("head_dim", self.head_dim as f64, "even"));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(invalid(
                "kv_heads",
                self.kv_heads as f64,
                "dividing the head count",
            ));
        }
        for (name, v) in [("rope_theta", self.rope_theta), ("rms_eps", self.rms_eps)] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(invalid(name, f64::from(v), "positive and finite"));
            }
        }
        Ok(())
    }

    /// Width of the keys and values of one position (`kv_heads * head_dim`).
    #[must_use]
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The attention's heads, as [`kernels_cpu::attention::attention`] takes them.
    #[must_use]
    pub fn attention_heads(&self) -> AttentionHeads {
        AttentionHeads {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }
}

/// A weight matrix of logical shape `[rows, cols]` (`nn.Linear`'s `[out, in]`), stored row-major
/// as it is or transposed (`[cols, rows]`: the layout a sparse-input GEMV reads by input).
#[derive(Clone, Debug)]
pub struct Matrix<W> {
    data: Vec<W>,
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl<W: Element> Matrix<W> {
    /// The matrix as stored: `[rows, cols]`, or `[cols, rows]` when transposed.
    #[must_use]
    pub fn view(&self) -> MatRef<'_, W> {
        let (r, c) = if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        };
        MatRef::from_slice(&self.data, r, c).expect("checked at load")
    }

    /// Whether it is stored transposed.
    #[must_use]
    pub fn is_transposed(&self) -> bool {
        self.transposed
    }

    /// Logical row `r` of a matrix stored as it is.
    fn row(&self, r: usize) -> &[W] {
        debug_assert!(!self.transposed);
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Logical entry `(r, c)`, widened.
    fn at(&self, r: usize, c: usize) -> f64 {
        let i = if self.transposed {
            c * self.rows + r
        } else {
            r * self.cols + c
        };
        self.data[i].to_f64()
    }

    /// Matrices of one width (stored as they are) stacked row after row.
    fn stacked<const N: usize>(parts: [Self; N]) -> Self {
        let cols = parts[0].cols;
        debug_assert!(parts.iter().all(|m| m.cols == cols && !m.transposed));
        let rows = parts.iter().map(|m| m.rows).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for m in parts {
            data.extend(m.data);
        }
        Self {
            data,
            rows,
            cols,
            transposed: false,
        }
    }

    /// Stored transposed from now on.
    fn transpose(mut self) -> Self {
        let mut t = Vec::with_capacity(self.data.len());
        for c in 0..self.cols {
            t.extend((0..self.rows).map(|r| self.data[r * self.cols + c]));
        }
        self.data = t;
        self.transposed = true;
        self
    }
}

/// How the model skips work, which decides how its matrices are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Every product dense; matrices as `nn.Linear` stores them.
    Dense,
    /// CATS: the MLP keeps the intermediate rows whose `|silu(W_gate x)|` passes the layer's
    /// threshold (`kernels_cpu::mlp::cats_mlp`: gate and up as stored, down transposed);
    /// attention dense.
    Cats,
    /// TEAL: the input of every projection (q, k, v, o, gate, up, down) is thresholded at its
    /// own magnitude (sparse-input GEMVs and `kernels_cpu::mlp::teal_mlp`: every matrix stored
    /// transposed).
    Teal,
}

/// One layer's thresholds: an activation whose magnitude is not above its threshold is skipped
/// (a threshold of 0 or below skips nothing). Each policy reads its own.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct LayerThresholds {
    /// CATS: on `|silu(W_gate x)|`.
    pub gate_activation: f32,
    /// TEAL: on the input of q, k and v (the normalised hidden state).
    pub attention_input: f32,
    /// TEAL: on the input of the attention output projection.
    pub attention_output: f32,
    /// TEAL: on the input of gate and up (the normalised hidden state).
    pub mlp_input: f32,
    /// TEAL: on `h = silu(g) * u`, the input of down.
    pub down_input: f32,
}

/// What [`Llama::forward_observed`] shows each layer's activations to: `(layer, site, values)`.
pub type Observer<'a> = dyn FnMut(usize, Site, &[f32]) -> Result<()> + 'a;

/// One decoder layer's weights.
#[derive(Clone, Debug)]
pub struct Layer<W> {
    /// RMSNorm before attention.
    pub attn_norm: Vec<f32>,
    /// Queries, keys and values stacked, `[(heads + 2 kv_heads) * head_dim, hidden]`, so the
    /// three products are one (every matrix stored as [`Llama::policy`] needs).
    pub qkv: Matrix<W>,
    /// Attention output `[hidden, heads * head_dim]`.
    pub wo: Matrix<W>,
    /// RMSNorm before the MLP.
    pub ffn_norm: Vec<f32>,
    /// MLP gate `[intermediate, hidden]`.
    pub gate: Matrix<W>,
    /// MLP up `[intermediate, hidden]`.
    pub up: Matrix<W>,
    /// MLP down `[hidden, intermediate]`.
    pub down: Matrix<W>,
}

/// A Llama-family model with weights of type `W`.
#[derive(Clone, Debug)]
pub struct Llama<W> {
    /// Hyper-parameters.
    pub config: LlamaConfig,
    /// Token embeddings `[vocab, hidden]`.
    pub embed: Matrix<W>,
    /// Decoder layers.
    pub layers: Vec<Layer<W>>,
    /// Final RMSNorm.
    pub norm: Vec<f32>,
    /// Output projection `[vocab, hidden]`; `None` when tied to the embeddings.
    pub output: Option<Matrix<W>>,
    /// How the decoder layers skip work.
    pub policy: Policy,
    /// Per-layer thresholds of the policy ([`Self::set_thresholds`]); all 0 (dense) at load.
    thresholds: Vec<LayerThresholds>,
}

fn missing_tensor() -> Error {
    invalid("tensor", f64::NAN, "present in the file")
}

/// Tensor `name` of `source`, checked to be of `shape`.
fn read(source: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let found = source.shape(name).ok_or_else(missing_tensor)?;
    if found != shape {
        return Err(match *shape {
            [rows, cols] => Error::ShapeMismatch {
                what: "a weight matrix",
                expected: [rows, cols],
                found: [
                    found.first().copied().unwrap_or(0),
                    found.get(1).copied().unwrap_or(1),
                ],
            },
            _ => Error::LengthMismatch {
                what: "a norm weight",
                expected: shape.iter().product(),
                found: found.iter().product(),
            },
        });
    }
    let values = source.read_f32(name)?;
    if values.len() != shape.iter().product::<usize>() {
        return Err(Error::LengthMismatch {
            what: "a tensor's elements",
            expected: shape.iter().product(),
            found: values.len(),
        });
    }
    Ok(values)
}

/// Tensor `name` of `source` as a `[rows, cols]` matrix of `W`.
fn matrix<W: Element>(
    source: &dyn TensorSource,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Matrix<W>> {
    let values = read(source, name, &[rows, cols])?;
    Ok(Matrix {
        data: values.into_iter().map(W::from_f32).collect(),
        rows,
        cols,
        transposed: false,
    })
}

impl<W: Element> Llama<W> {
    /// The model of a GGUF file, its weights dequantised and rounded to `W`.
    ///
    /// # Errors
    ///
    /// [`LlamaConfig::from_gguf`]'s; a tensor missing or shaped unlike the config says
    /// ([`Error::InvalidParam`], [`Error::ShapeMismatch`], [`Error::LengthMismatch`]); a tensor
    /// type the reader cannot dequantise ([`Error::Unsupported`]).
    pub fn from_gguf(file: &Gguf<'_>) -> Result<Self> {
        Self::from_gguf_with(file, Policy::Dense)
    }

    /// [`Self::from_gguf`], with the matrices stored as `policy` reads them (its thresholds all
    /// 0 until [`Self::set_thresholds`]).
    ///
    /// # Errors
    ///
    /// As [`Self::from_gguf`].
    pub fn from_gguf_with(file: &Gguf<'_>, policy: Policy) -> Result<Self> {
        Self::from_source(LlamaConfig::from_gguf(file)?, file, policy)
    }

    /// The model of a Hugging Face checkpoint: `config` is its `config.json`'s bytes, `source`
    /// its safetensors tensors (named as transformers names them), the matrices stored as
    /// `policy` reads them.
    ///
    /// # Errors
    ///
    /// [`LlamaConfig::from_hf_config`]'s; [`Error::InvalidParam`] for a source not named as
    /// transformers names tensors, or without `lm_head.weight` where the config does not tie
    /// it to the embeddings; then as
    /// [`Self::from_source`].
    #[cfg(feature = "huggingface")]
    pub fn from_hf(config: &[u8], source: &dyn TensorSource, policy: Policy) -> Result<Self> {
        let (config, tied) = crate::source::hf_config(config)?;
        if source.naming() != Naming::HuggingFace {
            return Err(invalid(
                "tensor source",
                f64::NAN,
                "named as transformers names tensors (its rows in its order)",
            ));
        }
        let output = source.naming().name(SourceTensor::Output);
        if !tied && source.shape(&output).is_none() {
            return Err(invalid(
                "lm_head.weight",
                f64::NAN,
                "present, or tie_word_embeddings true",
            ));
        }
        Self::from_source(config, source, policy)
    }

    /// The model of `config`'s shape with the tensors of `source`, each widened to `f32` and
    /// rounded once to `W`, the matrices stored as `policy` reads them (its thresholds all 0
    /// until [`Self::set_thresholds`]). The output projection is tied to the embeddings where
    /// the source has none. `config.rope_style` must match the source's query and key row
    /// order (each config reader sets it: see [`crate::source`]).
    ///
    /// # Errors
    ///
    /// [`LlamaConfig::validate`]'s; a tensor missing or shaped unlike the config says
    /// ([`Error::InvalidParam`], [`Error::ShapeMismatch`], [`Error::LengthMismatch`]); the
    /// source's own errors reading a tensor.
    pub fn from_source(
        config: LlamaConfig,
        source: &dyn TensorSource,
        policy: Policy,
    ) -> Result<Self> {
        use SourceTensor as T;
        config.validate()?;
        let c = config;
        let name = |t: SourceTensor| source.naming().name(t);
        let (teal, cats) = (policy == Policy::Teal, policy == Policy::Cats);
        let stored = |m: Matrix<W>, transpose: bool| if transpose { m.transpose() } else { m };
        let (h, q, kv, ff) = (c.hidden, c.heads * c.head_dim, c.kv_width(), c.intermediate);
        // Grown as layers load: a file claiming many layers reserves nothing it lacks.
        let mut layers = Vec::new();
        for l in 0..c.layers {
            layers.push(Layer {
                attn_norm: read(source, &name(T::AttentionNorm(l)), &[h])?,
                qkv: stored(
                    Matrix::stacked([
                        matrix(source, &name(T::Query(l)), q, h)?,
                        matrix(source, &name(T::Key(l)), kv, h)?,
                        matrix(source, &name(T::Value(l)), kv, h)?,
                    ]),
                    teal,
                ),
                wo: stored(matrix(source, &name(T::AttentionOutput(l)), h, q)?, teal),
                ffn_norm: read(source, &name(T::MlpNorm(l)), &[h])?,
                gate: stored(matrix(source, &name(T::Gate(l)), ff, h)?, teal),
                up: stored(matrix(source, &name(T::Up(l)), ff, h)?, teal),
                down: stored(matrix(source, &name(T::Down(l)), h, ff)?, teal || cats),
            });
        }
        let output = match source.shape(&name(T::Output)) {
            Some(_) => Some(matrix(source, &name(T::Output), c.vocab, h)?),
            None => None,
        };
        Ok(Self {
            embed: matrix(source, &name(T::Embed), c.vocab, h)?,
            norm: read(source, &name(T::Norm), &[h])?,
            layers,
            output,
            policy,
            thresholds: vec![LayerThresholds::default(); c.layers],
            config: c,
        })
    }

    /// Per-layer thresholds of the model's policy.
    #[must_use]
    pub fn thresholds(&self) -> &[LayerThresholds] {
        &self.thresholds
    }

    /// Sets the per-layer thresholds (one per layer; any number but NaN).
    ///
    /// # Errors
    ///
    /// [`Error::LengthMismatch`] for another count than the layers; [`Error::InvalidParam`] for a
    /// NaN threshold.
    pub fn set_thresholds(&mut self, thresholds: Vec<LayerThresholds>) -> Result<()> {
        if thresholds.len() != self.config.layers {
            return Err(Error::LengthMismatch {
                what: "thresholds",
                expected: self.config.layers,
                found: thresholds.len(),
            });
        }
        let all = |t: &LayerThresholds| {
            [
                t.gate_activation,
                t.attention_input,
                t.attention_output,
                t.mlp_input,
                t.down_input,
            ]
        };
        if let Some(bad) = thresholds.iter().flat_map(all).find(|t| t.is_nan()) {
            return Err(invalid("threshold", f64::from(bad), "a number, not NaN"));
        }
        self.thresholds = thresholds;
        Ok(())
    }

    /// Runs token `token` at the decoder's next position: appends its keys and values to the
    /// cache and writes the logits of the token after it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParam`] for a token outside the vocabulary or a full cache;
    /// [`Error::LengthMismatch`] for `logits` not of the vocabulary's length, or a decoder made
    /// for another config.
    pub fn forward(
        &self,
        cpu: &Cpu,
        decoder: &mut Decoder,
        token: u32,
        logits: &mut [f32],
    ) -> Result<()> {
        self.forward_observed(cpu, decoder, token, logits, &mut |_, _, _| Ok(()))
    }

    /// [`Self::forward`], showing `observe` each layer's activations at the [`Site`]s the
    /// forward computes: the attention's input and output, the MLP's input, and under
    /// [`Policy::Dense`] also `silu(W_gate x)` and `h = silu(g) * u` (the sparse policies keep
    /// those inside their kernels). Calibration feeds them to `kernels_cpu::calibrate`.
    ///
    /// # Errors
    ///
    /// As [`Self::forward`], and the observer's own.
    pub fn forward_observed(
        &self,
        cpu: &Cpu,
        decoder: &mut Decoder,
        token: u32,
        logits: &mut [f32],
        observe: &mut Observer<'_>,
    ) -> Result<()> {
        let mut products = CpuProducts { model: self, cpu };
        self.forward_with(&mut products, decoder, token, logits, observe)
    }

    /// One token through the layers, with the matrix products on `products`' device and the
    /// rest (embedding, norms, rotary, attention, residuals) here.
    pub(crate) fn forward_with(
        &self,
        products: &mut dyn Products,
        decoder: &mut Decoder,
        token: u32,
        logits: &mut [f32],
        observe: &mut Observer<'_>,
    ) -> Result<()> {
        let c = &self.config;
        if token as usize >= c.vocab {
            return Err(invalid(
                "token",
                f64::from(token),
                "below the vocabulary size",
            ));
        }
        if logits.len() != c.vocab {
            return Err(Error::LengthMismatch {
                what: "logits",
                expected: c.vocab,
                found: logits.len(),
            });
        }
        if decoder.config != *c {
            return Err(invalid("decoder", f64::NAN, "made for this model's config"));
        }
        let pos = decoder.len;
        if pos >= decoder.capacity {
            return Err(invalid(
                "position",
                pos as f64,
                "below the decoder's capacity",
            ));
        }
        let d = decoder;
        for (x, e) in d.x.iter_mut().zip(self.embed.row(token as usize)) {
            *x = e.to_f32();
        }
        let kv = c.kv_width();
        let heads = c.attention_heads();
        let scale = 1.0 / libm::sqrtf(c.head_dim as f32);
        for (rotation, &f) in d.rotation.iter_mut().zip(&d.inv_freq) {
            let angle = pos as f32 * f;
            *rotation = (libm::cosf(angle), libm::sinf(angle));
        }
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&d.x, &layer.attn_norm, c.rms_eps, &mut d.xb);
            observe(l, Site::AttentionInput, &d.xb)?;
            products.qkv(l, &d.xb, &mut d.qkv)?;
            let at = (l * d.capacity + pos) * kv;
            let (q, kv_new) = d.qkv.split_at_mut(c.heads * c.head_dim);
            d.k_cache[at..at + kv].copy_from_slice(&kv_new[..kv]);
            d.v_cache[at..at + kv].copy_from_slice(&kv_new[kv..]);
            rope(q, c, &d.rotation);
            rope(&mut d.k_cache[at..at + kv], c, &d.rotation);
            let cache = l * d.capacity * kv..(l * d.capacity + pos + 1) * kv;
            let keys = MatRef::from_slice(&d.k_cache[cache.clone()], pos + 1, kv)?;
            let values = MatRef::from_slice(&d.v_cache[cache], pos + 1, kv)?;
            attention(products.cpu(), heads, q, keys, values, scale, &mut d.attn)?;
            observe(l, Site::AttentionOutput, &d.attn)?;
            products.attention_output(l, &d.attn, &mut d.xb)?;
            add(&mut d.x, &d.xb);
            rms_norm(&d.x, &layer.ffn_norm, c.rms_eps, &mut d.xb);
            observe(l, Site::MlpInput, &d.xb)?;
            let buffers = MlpBuffers {
                gate: &mut d.gate,
                up: &mut d.up,
                scratch: &mut d.scratch,
            };
            products.mlp(l, &d.xb, buffers, &mut d.mlp_out, observe)?;
            add(&mut d.x, &d.mlp_out);
        }
        rms_norm(&d.x, &self.norm, c.rms_eps, &mut d.xb);
        products.logits(&d.xb, logits)?;
        d.len += 1;
        Ok(())
    }

    /// Layer `layer`'s MLP as [`Self::forward`] runs it (the policy's kernel and thresholds) on
    /// `x`, the normalised hidden state, into `out`, with `decoder`'s buffers as scratch
    /// (its sequence is left as it is). Public so the MLP's share of a token can be timed.
    ///
    /// ```
    /// use kernels_cpu::Cpu;
    /// use kernels_llm::gguf::Gguf;
    /// use kernels_llm::model::{Decoder, Llama, LlamaConfig, RopeStyle, synthetic_gguf};
    /// let config = LlamaConfig {
    ///     vocab: 16, hidden: 8, intermediate: 24, layers: 2, heads: 2, kv_heads: 1, head_dim: 4,
    ///     rope_theta: 10_000.0, rope_style: RopeStyle::Interleaved, rms_eps: 1e-5, context: 8,
    /// };
    /// let bytes = synthetic_gguf(&config, 1, true);
    /// let model = Llama::<f32>::from_gguf(&Gguf::parse(&bytes)?)?;
    /// let mut decoder = Decoder::new(&model.config, 4)?;
    /// let mut out = vec![0.0; config.hidden];
    /// model.mlp(&Cpu::detect(), &mut decoder, 0, &vec![0.5; config.hidden], &mut out)?;
    /// assert!(out.iter().all(|v| v.is_finite()));
    /// # Ok::<(), kernels_core::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParam`] for a layer past the model's; [`Error::LengthMismatch`] for `x`
    /// or `out` not of the hidden size, or a decoder made for another config.
    pub fn mlp(
        &self,
        cpu: &Cpu,
        decoder: &mut Decoder,
        layer: usize,
        x: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        let c = &self.config;
        if layer >= c.layers {
            return Err(invalid("layer", layer as f64, "below the layer count"));
        }
        if decoder.config != *c {
            return Err(invalid("decoder", f64::NAN, "made for this model's config"));
        }
        for (what, len) in [("x", x.len()), ("out", out.len())] {
            if len != c.hidden {
                return Err(Error::LengthMismatch {
                    what,
                    expected: c.hidden,
                    found: len,
                });
            }
        }
        let buffers = MlpBuffers {
            gate: &mut decoder.gate,
            up: &mut decoder.up,
            scratch: &mut decoder.scratch,
        };
        self.run_mlp(cpu, layer, x, buffers, out, &mut |_, _, _| Ok(()))
    }

    /// Layer `l`'s MLP on `x` into `y` (lengths checked by the callers).
    fn run_mlp(
        &self,
        cpu: &Cpu,
        l: usize,
        x: &[f32],
        buffers: MlpBuffers<'_>,
        y: &mut [f32],
        observe: &mut Observer<'_>,
    ) -> Result<()> {
        let (layer, t, hidden) = (&self.layers[l], &self.thresholds[l], self.config.hidden);
        let MlpBuffers { gate, up, scratch } = buffers;
        let xs = MatRef::from_slice(x, 1, hidden)?;
        match self.policy {
            Policy::Dense => {
                gemv(cpu, layer.gate.view(), x, gate)?;
                gemv(cpu, layer.up.view(), x, up)?;
                for g in gate.iter_mut() {
                    *g = silu(*g);
                }
                observe(l, Site::GateActivation, gate)?;
                for (g, u) in gate.iter_mut().zip(up.iter()) {
                    *g *= u;
                }
                observe(l, Site::DownInput, gate)?;
                gemv(cpu, layer.down.view(), gate, y)?;
            }
            Policy::Cats => {
                let weights = CatsMlpWeights {
                    gate: layer.gate.view(),
                    up: layer.up.view(),
                    down_t: layer.down.view(),
                };
                let ys = MatMut::from_slice(y, 1, hidden)?;
                cats_mlp(cpu, xs, weights, t.gate_activation, ys, scratch)?;
            }
            Policy::Teal => {
                let weights = TealMlpWeights {
                    gate_t: layer.gate.view(),
                    up_t: layer.up.view(),
                    down_t: layer.down.view(),
                };
                let thresholds = TealThresholds::new(t.mlp_input, t.down_input);
                let ys = MatMut::from_slice(y, 1, hidden)?;
                teal_mlp(cpu, xs, weights, thresholds, ys, scratch)?;
            }
        }
        Ok(())
    }
}

/// The matrix products of a forward pass, on one device; [`Llama::forward_with`] runs the rest.
/// Each writes `out` (lengths checked by the caller) as the model's policy and thresholds say.
pub(crate) trait Products {
    /// The CPU that runs the rest of the forward (the attention over the KV cache among it).
    fn cpu(&self) -> &Cpu;
    /// Layer `l`'s stacked queries, keys and values of the normalised state `x`.
    fn qkv(&mut self, l: usize, x: &[f32], out: &mut [f32]) -> Result<()>;
    /// Layer `l`'s attention output projection of the heads' outputs `x`.
    fn attention_output(&mut self, l: usize, x: &[f32], out: &mut [f32]) -> Result<()>;
    /// Layer `l`'s MLP of the normalised state `x` (`buffers` are the CPU's scratch).
    fn mlp(
        &mut self,
        l: usize,
        x: &[f32],
        buffers: MlpBuffers<'_>,
        out: &mut [f32],
        observe: &mut Observer<'_>,
    ) -> Result<()>;
    /// The logits of the final normalised state `x`.
    fn logits(&mut self, x: &[f32], out: &mut [f32]) -> Result<()>;
}

/// The products on the CPU kernels.
struct CpuProducts<'a, W> {
    model: &'a Llama<W>,
    cpu: &'a Cpu,
}

impl<W: Element> CpuProducts<'_, W> {
    /// A projection as the policy computes it: dense, or over the inputs above `threshold`.
    fn project(&self, m: &Matrix<W>, x: &[f32], threshold: f32, y: &mut [f32]) -> Result<()> {
        if self.model.policy == Policy::Teal {
            sparse_input_gemv(self.cpu, m.view(), x, threshold, y)
        } else {
            gemv(self.cpu, m.view(), x, y)
        }
    }
}

impl<W: Element> Products for CpuProducts<'_, W> {
    fn cpu(&self) -> &Cpu {
        self.cpu
    }

    fn qkv(&mut self, l: usize, x: &[f32], out: &mut [f32]) -> Result<()> {
        let threshold = self.model.thresholds[l].attention_input;
        self.project(&self.model.layers[l].qkv, x, threshold, out)
    }

    fn attention_output(&mut self, l: usize, x: &[f32], out: &mut [f32]) -> Result<()> {
        let threshold = self.model.thresholds[l].attention_output;
        self.project(&self.model.layers[l].wo, x, threshold, out)
    }

    fn mlp(
        &mut self,
        l: usize,
        x: &[f32],
        buffers: MlpBuffers<'_>,
        out: &mut [f32],
        observe: &mut Observer<'_>,
    ) -> Result<()> {
        self.model.run_mlp(self.cpu, l, x, buffers, out, observe)
    }

    fn logits(&mut self, x: &[f32], out: &mut [f32]) -> Result<()> {
        let output = self.model.output.as_ref().unwrap_or(&self.model.embed);
        gemv(self.cpu, output.view(), x, out)
    }
}

/// A model that decodes one token at a time on some device: a [`Llama`] on the CPU
/// ([`OnCpu`]), or on the GPU (`kernels_llm::gpu::GpuLlama`, feature `gpu`).
/// [`crate::generate`]'s greedy decoding and perplexity run on either.
pub trait Forward {
    /// The model's hyper-parameters.
    fn config(&self) -> &LlamaConfig;

    /// Runs `token` at the decoder's next position and writes the next token's logits
    /// ([`Llama::forward`]'s contract).
    ///
    /// # Errors
    ///
    /// As [`Llama::forward`].
    fn forward(&mut self, decoder: &mut Decoder, token: u32, logits: &mut [f32]) -> Result<()>;
}

/// A [`Llama`] decoding on the CPU kernels.
#[derive(Clone, Copy, Debug)]
pub struct OnCpu<'a, W> {
    /// The model.
    pub model: &'a Llama<W>,
    /// The CPU backend.
    pub cpu: &'a Cpu,
}

impl<W: Element> Forward for OnCpu<'_, W> {
    fn config(&self) -> &LlamaConfig {
        &self.model.config
    }

    fn forward(&mut self, decoder: &mut Decoder, token: u32, logits: &mut [f32]) -> Result<()> {
        self.model.forward(self.cpu, decoder, token, logits)
    }
}

/// The decoder's buffers an MLP works in.
pub(crate) struct MlpBuffers<'a> {
    gate: &'a mut [f32],
    up: &'a mut [f32],
    scratch: &'a mut MlpScratch,
}

/// The state of one sequence: its KV cache and every buffer a token needs.
#[derive(Clone, Debug)]
pub struct Decoder {
    config: LlamaConfig,
    capacity: usize,
    len: usize,
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
    inv_freq: Vec<f32>,
    /// `(cos, sin)` of each frequency's angle at the position being decoded: computed once per
    /// token, not per layer and head.
    rotation: Vec<(f32, f32)>,
    x: Vec<f32>,
    xb: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    mlp_out: Vec<f32>,
    scratch: MlpScratch,
}

impl Decoder {
    /// A decoder for `config` holding up to `capacity` positions (at most the model's context).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParam`] for a capacity of 0 or past the context length.
    pub fn new(config: &LlamaConfig, capacity: usize) -> Result<Self> {
        if capacity == 0 || capacity > config.context {
            return Err(invalid(
                "capacity",
                capacity as f64,
                "between 1 and the model's context length",
            ));
        }
        let cache = config.layers * capacity * config.kv_width();
        let half = config.head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| {
                let exponent = -2.0 * i as f64 / config.head_dim as f64;
                libm::pow(f64::from(config.rope_theta), exponent) as f32
            })
            .collect();
        Ok(Self {
            config: config.clone(),
            capacity,
            len: 0,
            k_cache: vec![0.0; cache],
            v_cache: vec![0.0; cache],
            inv_freq,
            rotation: vec![(1.0, 0.0); half],
            x: vec![0.0; config.hidden],
            xb: vec![0.0; config.hidden],
            qkv: vec![0.0; (config.heads + 2 * config.kv_heads) * config.head_dim],
            attn: vec![0.0; config.heads * config.head_dim],
            gate: vec![0.0; config.intermediate],
            up: vec![0.0; config.intermediate],
            mlp_out: vec![0.0; config.hidden],
            scratch: MlpScratch::new(),
        })
    }

    /// Positions the decoder can hold.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions decoded so far.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been decoded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the sequence (the buffers stay).
    pub fn reset(&mut self) {
        self.len = 0;
    }
}

fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean = x.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>() / x.len() as f64;
    let inv = (1.0 / libm::sqrt(mean + f64::from(eps))) as f32;
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// Rotates each head of `x` by `rotation`, the `(cos, sin)` of each frequency's angle at the
/// position.
fn rope(x: &mut [f32], c: &LlamaConfig, rotation: &[(f32, f32)]) {
    let half = c.head_dim / 2;
    for head in x.chunks_exact_mut(c.head_dim) {
        for (i, &(cos, sin)) in rotation.iter().enumerate() {
            let (a, b) = match c.rope_style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Halves => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos - x1 * sin;
            head[b] = x0 * sin + x1 * cos;
        }
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + libm::expf(-x))
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Bound on `|logit - logit_ref|` for [`Llama::forward`] against [`reference_logits`], relative
/// to `1 + max |logit_ref|`.
///
/// The fast path rounds every GEMV's dot product to `f32` (within `(n + 1) u` of its terms' sum,
/// `u = 2^-24`) and keeps the residual stream, norms, rotations and softmax in `f32`; the
/// reference does it all in `f64`. RMSNorm renormalises the stream before every product, so the
/// relative error grows by about the widest dot's `(n + 1) u` per matrix and adds over layers
/// rather than compounding: `(n + 1) u` times seven matrices per layer is under `1e-5` for
/// `n` below 2^16 and 16 layers. The bound leaves 10x for the nonlinearities (`exp` in the
/// softmax and SiLU: a few ulps each).
pub const LOGIT_RELATIVE_TOLERANCE: f64 = 1e-4;

/// Logits after the last of `tokens`, computed the plain way as a check on [`Llama::forward`]:
/// in `f64` from the weights widened, the whole sequence recomputed at every position (no KV
/// cache), attention over explicit score matrices, the model's policy and thresholds applied
/// as masks on the activations they compare.
///
/// # Errors
///
/// [`Error::InvalidParam`] for no tokens, a token outside the vocabulary, or more tokens than
/// the context.
pub fn reference_logits<W: Element>(model: &Llama<W>, tokens: &[u32]) -> Result<Vec<f64>> {
    let c = &model.config;
    if tokens.is_empty() || tokens.len() > c.context {
        return Err(invalid(
            "tokens",
            tokens.len() as f64,
            "1 to the context length",
        ));
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
        return Err(invalid(
            "token",
            f64::from(bad),
            "below the vocabulary size",
        ));
    }
    let matvec = |m: &Matrix<W>, x: &[f64]| -> Vec<f64> {
        (0..m.rows)
            .map(|r| (0..m.cols).map(|k| m.at(r, k) * x[k]).sum())
            .collect()
    };
    // The policy's masks: TEAL skips each projection's inputs not above their threshold; CATS
    // the intermediate rows whose |silu(gate)| is not above the layer's.
    let teal = model.policy == Policy::Teal;
    let sparse_input = |x: &[f64], t: f32| -> Vec<f64> {
        x.iter()
            .map(|&v| {
                if !teal || v.abs() > f64::from(t) {
                    v
                } else {
                    0.0
                }
            })
            .collect()
    };
    let norm = |x: &[f64], w: &[f32]| -> Vec<f64> {
        let mean = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / libm::sqrt(mean + f64::from(c.rms_eps));
        x.iter()
            .zip(w)
            .map(|(v, w)| v * inv * f64::from(*w))
            .collect()
    };
    let rotate = |x: &mut [f64], pos: usize| {
        let half = c.head_dim / 2;
        for head in x.chunks_exact_mut(c.head_dim) {
            for i in 0..half {
                let freq = libm::pow(f64::from(c.rope_theta), -2.0 * i as f64 / c.head_dim as f64);
                let (sin, cos) = (libm::sin(pos as f64 * freq), libm::cos(pos as f64 * freq));
                let (a, b) = match c.rope_style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Halves => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    };
    let n = tokens.len();
    let mut stream: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            model
                .embed
                .row(t as usize)
                .iter()
                .map(|v| v.to_f64())
                .collect()
        })
        .collect();
    let group = c.heads / c.kv_heads;
    for (layer, th) in model.layers.iter().zip(&model.thresholds) {
        let normed: Vec<Vec<f64>> = stream
            .iter()
            .map(|x| sparse_input(&norm(x, &layer.attn_norm), th.attention_input))
            .collect();
        let (qd, kv) = (c.heads * c.head_dim, c.kv_width());
        let qkv: Vec<Vec<f64>> = normed.iter().map(|x| matvec(&layer.qkv, x)).collect();
        let mut q: Vec<Vec<f64>> = qkv.iter().map(|r| r[..qd].to_vec()).collect();
        let mut k: Vec<Vec<f64>> = qkv.iter().map(|r| r[qd..qd + kv].to_vec()).collect();
        let v: Vec<Vec<f64>> = qkv.iter().map(|r| r[qd + kv..].to_vec()).collect();
        for (pos, (q, k)) in q.iter_mut().zip(&mut k).enumerate() {
            rotate(q, pos);
            rotate(k, pos);
        }
        for pos in 0..n {
            let mut attended = vec![0.0f64; c.heads * c.head_dim];
            for h in 0..c.heads {
                let kv_head = (h / group) * c.head_dim;
                let query = &q[pos][h * c.head_dim..][..c.head_dim];
                let scores: Vec<f64> = (0..=pos)
                    .map(|t| {
                        let key = &k[t][kv_head..][..c.head_dim];
                        query.iter().zip(key).map(|(a, b)| a * b).sum::<f64>()
                            / libm::sqrt(c.head_dim as f64)
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| libm::exp(s - max)).collect();
                let total: f64 = weights.iter().sum();
                for (t, w) in weights.iter().enumerate() {
                    let value = &v[t][kv_head..][..c.head_dim];
                    for (o, x) in attended[h * c.head_dim..][..c.head_dim]
                        .iter_mut()
                        .zip(value)
                    {
                        *o += w / total * x;
                    }
                }
            }
            let attended = sparse_input(&attended, th.attention_output);
            for (s, o) in stream[pos].iter_mut().zip(matvec(&layer.wo, &attended)) {
                *s += o;
            }
            let normed = sparse_input(&norm(&stream[pos], &layer.ffn_norm), th.mlp_input);
            let gate = matvec(&layer.gate, &normed);
            let up = matvec(&layer.up, &normed);
            let hidden: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| {
                    let a = g / (1.0 + libm::exp(-g));
                    let kept =
                        model.policy != Policy::Cats || a.abs() > f64::from(th.gate_activation);
                    if kept { a * u } else { 0.0 }
                })
                .collect();
            let hidden = sparse_input(&hidden, th.down_input);
            for (s, d) in stream[pos].iter_mut().zip(matvec(&layer.down, &hidden)) {
                *s += d;
            }
        }
    }
    let last = norm(&stream[n - 1], &model.norm);
    Ok(matvec(model.output.as_ref().unwrap_or(&model.embed), &last))
}

/// A GGUF file holding a `llama` model of `config`'s shape with random `f32` weights (normal,
/// scaled by `1 / sqrt(fan-in)`; norm weights around 1) drawn from `seed`: for tests, examples
/// and fuzz seeds. `tied` leaves out `output.weight`.
#[must_use]
pub fn synthetic_gguf(config: &LlamaConfig, seed: u64, tied: bool) -> Vec<u8> {
    synthetic_writer(config, seed, tied).finish()
}

/// [`synthetic_gguf`]'s file before it is finished, for a caller to add metadata to (a
/// tokenizer, a chat template).
#[must_use]
pub fn synthetic_writer(config: &LlamaConfig, seed: u64, tied: bool) -> crate::gguf::Writer {
    /// Normal draws from one generator, each call taking the next indices.
    struct Draws(kernels_core::CounterRng, u64);
    impl Draws {
        fn take(&mut self, n: usize, scale: f64, shift: f64) -> Vec<f32> {
            let first = self.1;
            self.1 += n as u64;
            (first..self.1)
                .map(|i| (shift + scale * self.0.normal_at(i)) as f32)
                .collect()
        }
    }
    let mut draws = Draws(kernels_core::CounterRng::new(seed), 0);
    let c = config;
    let mut w = crate::gguf::Writer::new();
    w.metadata_str("general.architecture", "llama");
    let sizes = [
        ("llama.embedding_length", c.hidden),
        ("llama.feed_forward_length", c.intermediate),
        ("llama.block_count", c.layers),
        ("llama.attention.head_count", c.heads),
        ("llama.attention.head_count_kv", c.kv_heads),
        ("llama.context_length", c.context),
        ("llama.vocab_size", c.vocab),
    ];
    for (key, value) in sizes {
        w.metadata_u32(key, value as u32);
    }
    w.metadata_f32("llama.rope.freq_base", c.rope_theta);
    w.metadata_f32("llama.attention.layer_norm_rms_epsilon", c.rms_eps);
    let mut matrix = |w: &mut crate::gguf::Writer, name: &str, rows: usize, cols: usize| {
        let values = draws.take(rows * cols, 1.0 / libm::sqrt(cols as f64), 0.0);
        w.tensor_f32(name, &[cols as u64, rows as u64], &values);
    };
    let (h, q, kv, ff) = (c.hidden, c.heads * c.head_dim, c.kv_width(), c.intermediate);
    matrix(&mut w, "token_embd.weight", c.vocab, h);
    for l in 0..c.layers {
        let name = |part: &str| alloc::format!("blk.{l}.{part}.weight");
        matrix(&mut w, &name("attn_q"), q, h);
        matrix(&mut w, &name("attn_k"), kv, h);
        matrix(&mut w, &name("attn_v"), kv, h);
        matrix(&mut w, &name("attn_output"), h, q);
        matrix(&mut w, &name("ffn_gate"), ff, h);
        matrix(&mut w, &name("ffn_up"), ff, h);
        matrix(&mut w, &name("ffn_down"), h, ff);
    }
    if !tied {
        matrix(&mut w, "output.weight", c.vocab, h);
    }
    // Norm weights after every matrix (the closure above holds the generator until here).
    for l in 0..c.layers {
        for norm in ["attn_norm", "ffn_norm"] {
            let values = draws.take(h, 0.1, 1.0);
            w.tensor_f32(
                &alloc::format!("blk.{l}.{norm}.weight"),
                &[h as u64],
                &values,
            );
        }
    }
    let values = draws.take(h, 0.1, 1.0);
    w.tensor_f32("output_norm.weight", &[h as u64], &values);
    w
}
