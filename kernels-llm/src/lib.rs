//! A Llama-family decoder built on the kernel crates, for sparse decoding with CATS or TEAL
//! (issue 15): [`gguf`] parses llama.cpp's GGUF files from a byte slice and dequantises their
//! tensors; [`source`] loads from them or from a Hugging Face checkpoint's tensors; [`model`] holds the Llama architecture and decodes dense, CATS or TEAL; [`generate`]
//! does greedy generation and perplexity, [`calibrate`] the per-layer thresholds. Decoding a
//! small model token by token is a loop of small kernels: give it a `kernels_cpu::Cpu` with
//! `with_spinning_team()` so its threads start in under a microsecond.
//!
//! The crate has no file system in its core and no threads beyond the kernels' own, so it builds
//! for `wasm32` as for native targets; callers hand it bytes (a memory-mapped file, a download).
//!
//! ```
//! use kernels_llm::gguf::{Gguf, Writer};
//! let mut w = Writer::new();
//! w.metadata_str("general.architecture", "llama");
//! let bytes = w.finish();
//! assert_eq!(Gguf::parse(&bytes)?.str("general.architecture"), Some("llama"));
//! # Ok::<(), kernels_core::Error>(())
//! ```
//!
//! # Cargo features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `std` | yes | the CPU kernels' threads (without it, the crate is `no_std` + `alloc`) |
//! | `huggingface` | yes | [`LlamaConfig::from_hf_config`](model::LlamaConfig::from_hf_config) and [`Llama::from_hf`](model::Llama::from_hf): Hugging Face `config.json` (`serde_json` without `std`) |
//! | `gpu` | no | `gpu::GpuLlama`: the matrix products on the GPU through `kernels-wgpu`; implies `std` |
//! | `tokenizer` | yes | [`tokenizer`]: tokenisation (Hugging Face's `tokenizers`) and chat templates (`minijinja`); implies `std` |

#![no_std]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod calibrate;
pub mod generate;
pub mod gguf;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod model;
pub mod source;
#[cfg(feature = "tokenizer")]
pub mod tokenizer;

/// The crate's README, whose examples run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
