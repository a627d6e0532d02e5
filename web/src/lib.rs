//! The demo page's wasm module: merge, compress, sparse GEMV and low rank on the user's GPU through
//! WebGPU, or on the CPU's simd128 kernels where the browser has no WebGPU adapter. Nothing is
//! uploaded anywhere: the user's files are read from memory and the results downloaded from the
//! page.
//!
//! [`demos`] holds the work as plain async Rust (the host tests run it); this file is the thin
//! layer the page's JavaScript calls: an [`Engine`] per backend, progress callbacks,
//! cancellation, and every error as a sentence for the page.

pub mod decode;
pub mod demos;
pub mod models;

use std::cell::Cell;

use kernels_core::Error;
use kernels_cpu::Cpu;
use kernels_wgpu::{Context, ContextOptions};
use wasm_bindgen::prelude::*;

use demos::{Backend, MergeKnobs, Method};
use models::Model;

/// Milliseconds from the page's clock (`performance.now()`); 0 where there is no window.
fn now() -> f64 {
    web_sys::window()
        .and_then(|w| w.performance())
        .map_or(0.0, |p| p.now())
}

/// Lets the page's event loop run (paint progress, handle a click on Cancel).
async fn yield_to_page() {
    let Some(window) = web_sys::window() else {
        return;
    };
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        let _ = window.set_timeout_with_callback(&resolve);
    });
    let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
}

fn sentence(e: &Error) -> JsError {
    JsError::new(&e.to_string())
}

/// The backend the demos run on, chosen once: a WebGPU adapter where the browser has one, the CPU
/// kernels otherwise (with the reason shown on the page).
#[wasm_bindgen]
pub struct Engine {
    backend: Backend,
    fallback_reason: Option<String>,
    cancelled: Cell<bool>,
}

/// A merged model and what the merge took.
#[wasm_bindgen(getter_with_clone)]
pub struct MergeOutcome {
    /// The merged `model.safetensors`.
    pub bytes: Vec<u8>,
    /// Milliseconds the merge took (reading the files and writing the result included).
    pub millis: f64,
    /// Bytes of the input models (as stored) and of the output, per second, in GB/s.
    pub gb_per_s: f64,
    /// Tensors merged.
    pub tensors: usize,
    /// The worst `|merged - reference| / bound` over every element (at most 1 passes).
    pub worst_ratio: f64,
}

/// ComPEFT's report.
#[wasm_bindgen(getter_with_clone)]
pub struct CompressOutcome {
    /// Bits per parameter of the packed task vector.
    pub bits_per_parameter: f64,
    /// `||tau - decoded|| / ||tau||`.
    pub relative_error: f64,
    /// Bytes of the fine-tune as stored.
    pub original_bytes: usize,
    /// Bytes of the packed task vector.
    pub compressed_bytes: usize,
    /// Entries kept.
    pub kept: u64,
    /// Whether the codes equal the reference's.
    pub codes_match: bool,
    /// Milliseconds.
    pub millis: f64,
}

/// Dense and sparse GEMV timings.
#[wasm_bindgen(getter_with_clone)]
pub struct GemvOutcome {
    /// Milliseconds per dense GEMV.
    pub dense_ms: f64,
    /// Milliseconds per sparse-input GEMV.
    pub sparse_ms: f64,
    /// The worst `|y - reference| / bound` (at most 1 passes).
    pub worst_ratio: f64,
}

/// A decode run.
#[wasm_bindgen(getter_with_clone)]
pub struct DecodeOutcome {
    /// The generated text.
    pub text: String,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated: usize,
    /// Generated tokens per second (after the prompt; the page's yields between tokens counted).
    pub tokens_per_s: f64,
    /// The dense model's first logits against the reference: the worst `|error| / bound`.
    pub worst_ratio: f64,
}

/// A low-rank approximation.
#[wasm_bindgen(getter_with_clone)]
pub struct LowRankOutcome {
    /// The approximated image, row-major grey values.
    pub image: Vec<f32>,
    /// Relative error at ranks 1 to `rank`.
    pub errors: Vec<f64>,
    /// The worst singular value's `|s - reference| / bound` (at most 1 passes).
    pub worst_ratio: f64,
    /// Milliseconds.
    pub millis: f64,
}

#[wasm_bindgen]
impl Engine {
    /// The GPU if `prefer_gpu` and the browser offers an adapter, else the CPU.
    pub async fn create(prefer_gpu: bool) -> Engine {
        let (backend, fallback_reason) = if prefer_gpu {
            match Context::new(ContextOptions::default()).await {
                Ok(ctx) => (Backend::Gpu(Box::new(ctx)), None),
                Err(e) => (Backend::Cpu(Cpu::detect()), Some(e.to_string())),
            }
        } else {
            (
                Backend::Cpu(Cpu::detect()),
                Some("the CPU was asked for".into()),
            )
        };
        Engine {
            backend,
            fallback_reason,
            cancelled: Cell::new(false),
        }
    }

    /// Where the demos run, in words.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// Whether the demos run on a GPU.
    pub fn on_gpu(&self) -> bool {
        matches!(self.backend, Backend::Gpu(_))
    }

    /// Why the engine runs on the CPU, if it does.
    pub fn fallback_reason(&self) -> Option<String> {
        self.fallback_reason.clone()
    }

    /// Asks the running demo to stop at its next step.
    pub fn cancel(&self) {
        self.cancelled.set(true);
    }

    fn start(&self) {
        self.cancelled.set(false);
    }

    async fn step(
        &self,
        progress: &js_sys::Function,
        done: usize,
        total: usize,
    ) -> Result<(), JsError> {
        let _ = progress.call2(
            &JsValue::NULL,
            &JsValue::from(done as f64),
            &JsValue::from(total as f64),
        );
        yield_to_page().await;
        if self.cancelled.get() {
            return Err(JsError::new("cancelled"));
        }
        Ok(())
    }

    /// A synthetic set of `count` models (a base first) as safetensors files.
    pub fn synthetic_models(count: usize, seed: u32) -> Result<js_sys::Array, JsError> {
        let files = models::synthetic(count, u64::from(seed)).map_err(|e| JsError::new(&e))?;
        Ok(files
            .iter()
            .map(|f| js_sys::Uint8Array::from(&f[..]))
            .collect())
    }

    /// Diagonal Fisher information for the synthetic set's `count` fine-tunes, as safetensors.
    pub fn synthetic_fishers(count: usize, seed: u32) -> Result<js_sys::Array, JsError> {
        let files =
            models::synthetic_fishers(count, u64::from(seed)).map_err(|e| JsError::new(&e))?;
        Ok(files
            .iter()
            .map(|f| js_sys::Uint8Array::from(&f[..]))
            .collect())
    }

    /// Merges `files` (safetensors bytes; the first is the base) with `method`
    /// (`task_arithmetic`, `ties`, `dare`, or `fisher` with `fishers`: one file of diagonal Fisher
    /// information per fine-tune, same tensors) and its knobs; `progress(done, total)` is called
    /// per tensor. The merged model keeps the base's tensor types.
    #[allow(clippy::too_many_arguments)]
    pub async fn merge(
        &self,
        files: Vec<js_sys::Uint8Array>,
        fishers: Vec<js_sys::Uint8Array>,
        method: &str,
        lambda: f32,
        density: f64,
        drop: f64,
        seed: u32,
        progress: &js_sys::Function,
    ) -> Result<MergeOutcome, JsError> {
        self.start();
        let start = now();
        let method = Method::parse(method).map_err(|e| JsError::new(&e))?;
        if files.len() < 2 {
            return Err(JsError::new(
                "pick a base model and at least one fine-tuned model (two or three files)",
            ));
        }
        let models: Vec<Model> = files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let which = if i == 0 {
                    "the base model".to_string()
                } else {
                    format!("model {}", i + 1)
                };
                let model = Model::parse(&f.to_vec(), &which)?;
                Ok((which, model))
            })
            .collect::<Result<Vec<_>, String>>()
            .and_then(|models| {
                for (which, model) in &models[1..] {
                    models[0].1.check_same_layout(model, which)?;
                }
                Ok(models.into_iter().map(|(_, m)| m).collect())
            })
            .map_err(|e| JsError::new(&e))?;
        let knobs = MergeKnobs {
            method,
            lambda,
            density,
            drop,
            seed: u64::from(seed),
        };
        let fisher_models: Vec<Model> = if method == Method::Fisher {
            if fishers.len() != models.len() - 1 {
                return Err(JsError::new(&format!(
                    "Fisher merging needs one Fisher file per fine-tuned model: {} fine-tune(s), {} Fisher file(s)",
                    models.len() - 1,
                    fishers.len()
                )));
            }
            fishers
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let which = format!("Fisher file {}", i + 1);
                    let fisher = Model::parse(&f.to_vec(), &which)?;
                    models[0].check_same_layout(&fisher, &which)?;
                    Ok(fisher)
                })
                .collect::<Result<_, String>>()
                .map_err(|e| JsError::new(&e))?
        } else {
            Vec::new()
        };
        let (base, tuned) = (&models[0], &models[1..]);
        let total = base.tensors.len();
        let mut merged = Vec::with_capacity(total);
        let (mut first_index, mut worst) = (0u64, 0.0f64);
        for (i, t) in base.tensors.iter().enumerate() {
            self.step(progress, i, total).await?;
            let others: Vec<&models::Tensor> = tuned.iter().map(|m| &m.tensors[i]).collect();
            let merged_tensor = if method == Method::Fisher {
                let fishers: Vec<&models::Tensor> =
                    fisher_models.iter().map(|m| &m.tensors[i]).collect();
                demos::fisher_tensor(&self.backend, &others, &fishers).await
            } else {
                demos::merge_tensor(&self.backend, t, &others, knobs, first_index).await
            };
            let (values, check) = merged_tensor.map_err(|e| sentence(&e))?;
            worst = worst.max(check.worst_ratio);
            first_index += t.values.len() as u64;
            merged.push(values);
        }
        self.step(progress, total, total).await?;
        let entries: Vec<(&str, &[usize], models::Stored, &[f32])> = base
            .tensors
            .iter()
            .zip(&merged)
            .map(|(t, v)| (&t.name[..], &t.shape[..], t.stored, &v[..]))
            .collect();
        let bytes = models::write(&entries).map_err(|e| JsError::new(&e))?;
        let millis = now() - start;
        let moved: usize = models
            .iter()
            .chain(&fisher_models)
            .map(Model::stored_bytes)
            .sum::<usize>()
            + bytes.len();
        Ok(MergeOutcome {
            bytes,
            millis,
            gb_per_s: moved as f64 / (millis.max(1e-3) * 1e6),
            tensors: total,
            worst_ratio: worst,
        })
    }

    /// ComPEFT of `tuned - base` keeping `density` of the entries.
    pub async fn compress(
        &self,
        base: Vec<u8>,
        tuned: Vec<u8>,
        density: f64,
    ) -> Result<demos::Compressed, JsError> {
        self.start();
        let start = now();
        let base = Model::parse(&base, "the base model").map_err(|e| JsError::new(&e))?;
        let tuned = Model::parse(&tuned, "the fine-tuned model").map_err(|e| JsError::new(&e))?;
        base.check_same_layout(&tuned, "the fine-tuned model")
            .map_err(|e| JsError::new(&e))?;
        let mut c = demos::compress(&self.backend, &base, &tuned, density)
            .await
            .map_err(|e| sentence(&e))?;
        c.millis = now() - start;
        Ok(c)
    }

    /// Dense and sparse-input GEMV of an f16 `[inputs, outputs]` matrix at `sparsity`, `repeats`
    /// of each.
    pub async fn gemv(
        &self,
        inputs: usize,
        outputs: usize,
        sparsity: f64,
        repeats: usize,
    ) -> Result<GemvOutcome, JsError> {
        self.start();
        let t = demos::gemv_timing(&self.backend, inputs, outputs, sparsity, repeats, &now)
            .await
            .map_err(|e| sentence(&e))?;
        Ok(GemvOutcome {
            dense_ms: t.dense_ms,
            sparse_ms: t.sparse_ms,
            worst_ratio: t.check.worst_ratio,
        })
    }

    /// A tiny synthetic `llama` GGUF with a byte-level tokenizer, for the decode demo.
    #[must_use]
    pub fn synthetic_llm(seed: u32) -> Vec<u8> {
        decode::synthetic_model(u64::from(seed))
    }

    /// Greedy generation of up to `max_tokens` after `prompt` from a GGUF model with CATS at
    /// `sparsity`, on the CPU kernels (the decoder's GPU path reads back synchronously, which a
    /// page cannot); `on_token(text)` sees each token as it comes, and Cancel stops between two.
    pub async fn decode(
        &self,
        gguf: Vec<u8>,
        prompt: &str,
        max_tokens: usize,
        sparsity: f64,
        on_token: &js_sys::Function,
    ) -> Result<DecodeOutcome, JsError> {
        self.start();
        yield_to_page().await;
        let cpu = match &self.backend {
            Backend::Cpu(cpu) => *cpu,
            Backend::Gpu(_) => Cpu::detect(),
        };
        let mut session = decode::Session::start(&cpu, &gguf, prompt, max_tokens, sparsity)
            .map_err(|e| sentence(&e))?;
        let start = now();
        while let Some(piece) = session.step(&cpu).map_err(|e| sentence(&e))? {
            let _ = on_token.call1(&JsValue::NULL, &JsValue::from_str(&piece));
            yield_to_page().await;
            if self.cancelled.get() {
                break;
            }
        }
        let seconds = (now() - start) / 1e3;
        let generated = session.generated.len();
        Ok(DecodeOutcome {
            text: session.text().map_err(|e| sentence(&e))?,
            prompt_tokens: session.prompt_tokens,
            generated,
            tokens_per_s: if seconds > 0.0 {
                generated as f64 / seconds
            } else {
                0.0
            },
            worst_ratio: session.check.worst_ratio,
        })
    }

    /// The rank-`rank` approximation of a grey `height x width` image.
    pub async fn low_rank(
        &self,
        pixels: Vec<f32>,
        height: usize,
        width: usize,
        rank: usize,
    ) -> Result<LowRankOutcome, JsError> {
        self.start();
        let start = now();
        if pixels.len() != height * width {
            return Err(JsError::new(&format!(
                "the image has {} pixels where {height} x {width} needs {}",
                pixels.len(),
                height * width
            )));
        }
        let r = demos::low_rank(&self.backend, &pixels, height, width, rank)
            .await
            .map_err(|e| sentence(&e))?;
        Ok(LowRankOutcome {
            image: r.image,
            errors: r.errors,
            worst_ratio: r.check.worst_ratio,
            millis: now() - start,
        })
    }
}
