//! The decoder with its matrix products on the GPU (feature `gpu`, through `kernels-wgpu`).
//!
//! [`GpuLlama`] uploads a [`Llama`]'s matrices once, stored as its policy's GPU kernels read
//! them, and runs each token's products there: the stacked q/k/v and the attention output as
//! dense or sparse-input GEMVs, the MLP as `kernels_wgpu`'s CATS or TEAL kernel (a dense model
//! runs the CATS kernel with a threshold that keeps every row: the same sums), the logits as a
//! GEMV. The embedding lookup, norms, rotary embeddings, attention over the KV cache and the
//! residual adds stay on the CPU, shared with [`Llama::forward`], so each product is an upload
//! of its input and a read-back of its output: three round trips per layer. That is what a
//! first GPU path needs to be right and to run on any adapter (lavapipe in CI); attention and
//! norms on the GPU, with the whole token recorded into one submission, are what would make it
//! fast.
//!
//! # Precision
//!
//! Each GPU product is within its kernel's documented bound of the CPU's
//! (`kernels_wgpu::gemv::gemv_tolerance`, `kernels_wgpu::mlp::mlp_tolerance`: `f32` sums in
//! another order), so the logits are within [`LOGIT_RELATIVE_TOLERANCE`] of the `f64`
//! reference, as on the CPU; the tests hold both to it.
//!
//! [`LOGIT_RELATIVE_TOLERANCE`]: crate::model::LOGIT_RELATIVE_TOLERANCE

use alloc::vec::Vec;

use kernels_core::{Error, MatRef, Result};
use kernels_cpu::Cpu;
use kernels_wgpu::prelude::{
    CatsMlpWeights, Context, GpuElement, GpuTensor, MlpScratch, TealMlpWeights, TealThresholds,
    cats_mlp, gemv, sparse_input_gemv, teal_mlp,
};

use crate::model::{
    Decoder, Forward, Llama, LlamaConfig, Matrix, MlpBuffers, Observer, Policy, Products,
};

/// One layer's matrices on the device.
struct GpuLayer<W: GpuElement> {
    qkv: GpuTensor<W>,
    wo: GpuTensor<W>,
    /// CATS and dense: `W_gate` as stored; TEAL: transposed.
    gate: GpuTensor<W>,
    /// As `gate`.
    up: GpuTensor<W>,
    /// `W_down` transposed (both MLP kernels read it by intermediate row).
    down_t: GpuTensor<W>,
}

/// A [`Llama`] whose matrix products run on the GPU.
///
/// ```
/// use kernels_llm::gpu::GpuLlama;
/// use kernels_llm::gguf::Gguf;
/// use kernels_llm::model::{Decoder, Forward, Llama, LlamaConfig, RopeStyle, synthetic_gguf};
/// use kernels_wgpu::prelude::{Context, ContextOptions};
/// let config = LlamaConfig {
///     vocab: 16, hidden: 8, intermediate: 24, layers: 2, heads: 2, kv_heads: 1, head_dim: 4,
///     rope_theta: 10_000.0, rope_style: RopeStyle::Interleaved, rms_eps: 1e-5, context: 8,
/// };
/// let bytes = synthetic_gguf(&config, 1, true);
/// let model = Llama::<f32>::from_gguf(&Gguf::parse(&bytes)?)?;
/// let ctx = Context::new_blocking(ContextOptions::default())?;
/// let mut on_gpu = GpuLlama::new(&ctx, &model)?;
/// let mut decoder = Decoder::new(&model.config, 4)?;
/// let mut logits = vec![0.0; config.vocab];
/// on_gpu.forward(&mut decoder, 3, &mut logits)?;
/// assert!(logits.iter().all(|v| v.is_finite()));
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub struct GpuLlama<'a, W: GpuElement> {
    ctx: &'a Context,
    model: &'a Llama<W>,
    layers: Vec<GpuLayer<W>>,
    output: GpuTensor<W>,
    /// Inputs and outputs of the products, `[1, width]`.
    hidden_in: GpuTensor<f32>,
    heads_in: GpuTensor<f32>,
    qkv_out: GpuTensor<f32>,
    hidden_out: GpuTensor<f32>,
    logits_out: GpuTensor<f32>,
    scratch: MlpScratch,
    /// Runs the rest of the forward (the attention over the KV cache among it).
    cpu: Cpu,
}

/// `m` on the device as stored, or transposed first where `transpose`.
fn upload<W: GpuElement>(ctx: &Context, m: &Matrix<W>, transpose: bool) -> Result<GpuTensor<W>> {
    if !transpose {
        return GpuTensor::from_matrix(ctx, m.view());
    }
    let v = m.view();
    let (rows, cols) = (v.rows(), v.cols());
    let mut t = Vec::with_capacity(rows * cols);
    for c in 0..cols {
        t.extend((0..rows).map(|r| v.row(r)[c]));
    }
    GpuTensor::from_matrix(ctx, MatRef::from_slice(&t, cols, rows)?)
}

impl<'a, W: GpuElement> GpuLlama<'a, W> {
    /// Uploads `model`'s matrices to `ctx`'s device. The model's thresholds are read at each
    /// token, so [`Llama::set_thresholds`] before or after both work.
    ///
    /// # Errors
    ///
    /// The device's: a matrix past its limits, memory exhausted ([`Error::TooLarge`] or
    /// [`Error::OutOfMemory`], [`Error::DeviceFailure`]).
    pub fn new(ctx: &'a Context, model: &'a Llama<W>) -> Result<Self> {
        let c = &model.config;
        // The dense model reads `W_down` transposed too (the CATS kernel keeping every row).
        let transpose_down = model.policy == Policy::Dense;
        let layers = model
            .layers
            .iter()
            .map(|l| {
                Ok(GpuLayer {
                    qkv: upload(ctx, &l.qkv, false)?,
                    wo: upload(ctx, &l.wo, false)?,
                    gate: upload(ctx, &l.gate, false)?,
                    up: upload(ctx, &l.up, false)?,
                    down_t: upload(ctx, &l.down, transpose_down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let output = upload(ctx, model.output.as_ref().unwrap_or(&model.embed), false)?;
        let q = c.heads * c.head_dim;
        Ok(Self {
            ctx,
            model,
            layers,
            output,
            hidden_in: GpuTensor::zeros(ctx, 1, c.hidden)?,
            heads_in: GpuTensor::zeros(ctx, 1, q)?,
            qkv_out: GpuTensor::zeros(ctx, 1, q + 2 * c.kv_width())?,
            hidden_out: GpuTensor::zeros(ctx, 1, c.hidden)?,
            logits_out: GpuTensor::zeros(ctx, 1, c.vocab)?,
            scratch: MlpScratch::new(),
            cpu: Cpu::detect(),
        })
    }

    /// The model it runs.
    #[must_use]
    pub fn model(&self) -> &'a Llama<W> {
        self.model
    }

    /// A projection of `x` (already in `input`) as the policy computes it, read back to `out`.
    fn project(
        ctx: &Context,
        teal: bool,
        m: &GpuTensor<W>,
        input: &GpuTensor<f32>,
        threshold: f32,
        output: &mut GpuTensor<f32>,
        out: &mut [f32],
    ) -> Result<()> {
        if teal {
            sparse_input_gemv(ctx, m, input, threshold, output)?;
        } else {
            gemv(ctx, m, input, output)?;
        }
        read_back(ctx, output, out)
    }
}

fn read_back(ctx: &Context, from: &GpuTensor<f32>, out: &mut [f32]) -> Result<()> {
    let values = from.to_vec_blocking(ctx)?;
    if values.len() != out.len() {
        return Err(Error::LengthMismatch {
            what: "a product's output",
            expected: out.len(),
            found: values.len(),
        });
    }
    out.copy_from_slice(&values);
    Ok(())
}

impl<W: GpuElement> Products for GpuLlama<'_, W> {
    fn cpu(&self) -> &Cpu {
        &self.cpu
    }

    fn qkv(&mut self, l: usize, x: &[f32], out: &mut [f32]) -> Result<()> {
        let teal = self.model.policy == Policy::Teal;
        let threshold = self.model.thresholds()[l].attention_input;
        self.hidden_in.write(self.ctx, x)?;
        let m = &self.layers[l].qkv;
        Self::project(
            self.ctx,
            teal,
            m,
            &self.hidden_in,
            threshold,
            &mut self.qkv_out,
            out,
        )
    }

    fn attention_output(&mut self, l: usize, x: &[f32], out: &mut [f32]) -> Result<()> {
        let teal = self.model.policy == Policy::Teal;
        let threshold = self.model.thresholds()[l].attention_output;
        self.heads_in.write(self.ctx, x)?;
        let m = &self.layers[l].wo;
        Self::project(
            self.ctx,
            teal,
            m,
            &self.heads_in,
            threshold,
            &mut self.hidden_out,
            out,
        )
    }

    fn mlp(
        &mut self,
        l: usize,
        x: &[f32],
        _: MlpBuffers<'_>,
        out: &mut [f32],
        _: &mut Observer<'_>,
    ) -> Result<()> {
        let (layer, t) = (&self.layers[l], self.model.thresholds()[l]);
        self.hidden_in.write(self.ctx, x)?;
        let (ctx, x, y) = (self.ctx, &self.hidden_in, &mut self.hidden_out);
        match self.model.policy {
            Policy::Dense | Policy::Cats => {
                let weights = CatsMlpWeights {
                    gate: &layer.gate,
                    up: &layer.up,
                    down_t: &layer.down_t,
                };
                // Dense: no |silu(g)| is at or below -1, so every row is kept.
                let threshold = if self.model.policy == Policy::Dense {
                    -1.0
                } else {
                    t.gate_activation
                };
                cats_mlp(ctx, x, weights, threshold, y, &mut self.scratch)?;
            }
            Policy::Teal => {
                let weights = TealMlpWeights {
                    gate_t: &layer.gate,
                    up_t: &layer.up,
                    down_t: &layer.down_t,
                };
                let thresholds = TealThresholds::new(t.mlp_input, t.down_input);
                teal_mlp(ctx, x, weights, thresholds, y, &mut self.scratch)?;
            }
        }
        read_back(ctx, y, out)
    }

    fn logits(&mut self, x: &[f32], out: &mut [f32]) -> Result<()> {
        self.hidden_in.write(self.ctx, x)?;
        gemv(
            self.ctx,
            &self.output,
            &self.hidden_in,
            &mut self.logits_out,
        )?;
        read_back(self.ctx, &self.logits_out, out)
    }
}

impl<W: GpuElement> Forward for GpuLlama<'_, W> {
    fn config(&self) -> &LlamaConfig {
        &self.model.config
    }

    fn forward(&mut self, decoder: &mut Decoder, token: u32, logits: &mut [f32]) -> Result<()> {
        let model = self.model;
        model.forward_with(self, decoder, token, logits, &mut |_, _, _| Ok(()))
    }
}
