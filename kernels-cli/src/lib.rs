//! The `kernels` command-line tool, as a library: mergekit's YAML configs run over safetensors
//! checkpoints on the public ops of `kernels-cpu` and `kernels-wgpu` (the binary is a thin
//! `main` over [`cli`]).
//!
//! Modules: [`config`] reads mergekit's YAML, [`checkpoint`] opens model directories
//! (memory-mapped, header-checked), [`output`] writes sharded safetensors atomically, [`merge`]
//! runs a merge tensor by tensor, [`device`] routes its ops to the CPU or the GPU,
//! [`synthetic`] writes Llama-shaped test models, [`llm`] calibrates, evaluates and runs
//! `kernels-llm`'s decoder.

pub mod checkpoint;
pub mod cli;
pub mod compeft;
pub mod config;
pub mod device;
pub mod llm;
pub mod lora;
pub mod merge;
mod opcm;
pub mod output;
pub mod synthetic;
