//! The kernel family on any GPU: WGSL compute kernels through wgpu, on Vulkan, Metal, DX12 and
//! GL natively and on WebGPU in the browser, each the twin of a `kernels-core` reference.
//!
//! One dependency and one `use` give the whole GPU backend: the ops, their parameter types,
//! the views, element types and error of `kernels-core`, and `wgpu` itself, re-exported.
//!
//! ```
//! use kernels_wgpu::prelude::*;
//!
//! let ctx = Context::new_blocking(ContextOptions::default())?;
//! // w_t is [in = 3, out = 2]: inputs with |x| <= 0.2 skip their row, which is never read.
//! let w_t = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2)?)?;
//! let x = GpuTensor::from_slice(&ctx, &[0.5f32, -0.1, 2.0])?;
//! let mut y = GpuTensor::<f32>::zeros(&ctx, 2, 1)?;
//! sparse_input_gemv(&ctx, &w_t, &x, 0.2, &mut y)?;
//! assert_eq!(y.to_vec_blocking(&ctx)?, [10.5, 13.0]);
//! # Ok::<(), kernels_wgpu::Error>(())
//! ```
//!
//! Conventions shared with `kernels-cpu`: the same op has the same name and argument order
//! (backend first, then inputs, parameters, the output last); "how many" is a `KeepRule`; ops
//! with more than three knobs take a params struct with `Default` and `with_*` setters. Where
//! the GPU differs it says so: ops that must read something back (a selection's histograms, an
//! MLP's report, ComPEFT's codes, a factorisation's small core) are `async` (on native,
//! [`block_on`] them); results are `f32` tensors, or the same host types as the CPU's where a
//! factorisation downloads them ([`linalg`]).
//!
//! # Design
//!
//! * A [`Context`] picks an adapter (best first, or by name; `KERNELS_WGPU_ADAPTER` overrides on
//!   native), requests the adapter's own limits and the optional features it offers
//!   (`shader-f16`, subgroups, each of which can be turned off or required), compiles each
//!   pipeline once per kernel, variant and override constants, and pools scratch buffers.
//! * A [`GpuTensor`] is split into pages of whole rows, each at most one storage binding
//!   ([`Context::page_bytes`]); ops run page by page, so tensors larger than the binding limit
//!   work.
//! * Ops validate everything on the host with the same `kernels_core` validation as every other
//!   backend, record their dispatches and submit them; they do not wait. Reading results back
//!   ([`GpuTensor::to_vec`]) and creating a context are `async`, so the crate works on wasm,
//!   where blocking is impossible; `*_blocking` helpers exist on native.
//! * Errors are `kernels_core::Error`: shape and parameter errors as everywhere,
//!   `Unsupported` for a missing adapter or feature (saying how to get one), `OutOfMemory` and
//!   `DeviceFailure` from the device. Nothing panics on caller input.
//!
//! # Precision
//!
//! Against the `kernels-core` reference on the same inputs. The bounds are tested on every
//! kernel variant; each constant's docs derive it.
//!
//! | op | promise |
//! |---|---|
//! | top-k cut, k-th value, TIES trim, Breadcrumbs, calibration, DARE's mask, ComPEFT's codes and bytes | bit-identical |
//! | ternary decode | exact (`scale * code`) |
//! | GEMV (dense, gathered, sparse-input), ternary GEMV | [`gemv::gemv_tolerance`]: `(n + 1) u sum |w_ij x_j|` |
//! | weighted mean, task arithmetic, linear combination, TIES election, Fisher merging and accumulation | [`merge::reduction_tolerance`]: `(3 N + 4) u sum |terms|` |
//! | Gram matrix | [`interpolate::gram_tolerance`]: `(ITEMS + log2 WORKGROUP + 5) u sqrt(G_ii G_jj)` |
//! | SLERP, Model Stock | a linear combination whose coefficients come from a Gram matrix within that bound |
//! | sum of squares | [`merge::SUM_SQUARES_RELATIVE_TOLERANCE`] |
//! | DARE's survivors | [`masks::DARE_RELATIVE_TOLERANCE`] (`2 u` relative); with the L1-preserving rescale [`masks::DARE_L1_RELATIVE_TOLERANCE`] |
//! | decompress-and-add | [`ternary::ternary_add_tolerance`] |
//! | ComPEFT's scale | [`compress::SCALE_RELATIVE_TOLERANCE`] |
//! | CATS and TEAL MLPs | [`mlp::mlp_tolerance`], the CPU's bound widened for WGSL's `exp` |
//! | GEMM | [`linalg::gemm_tolerance`]: `(k + 3) u (|alpha| sum |a_ip b_pj| + |beta c_ij|)` |
//! | projections, Householder QR, randomized SVD, LoRA extraction, OPCM step | the CPU's [`linalg::factorisation_tolerance`] (`16 eps sqrt(max(m, n))` of `||A||_F`) |
//!
//! The same inputs give the same bits on a given device and page size (the sweep's partial sums
//! follow the pages); the `shader-f16` and subgroup variants give the portable kernels' bits.
//!
//! # Cargo features
//!
//! Which of wgpu's backends are built; which GPU features the kernels use is chosen at run time
//! ([`ContextOptions`]). The defaults are wgpu's own.
//!
//! | feature | default | backend |
//! |---|---|---|
//! | `vulkan` | yes | Vulkan (Linux, Windows, Android; Mesa's lavapipe without a GPU) |
//! | `metal` | yes | Metal (macOS, iOS) |
//! | `dx12` | yes | Direct3D 12 (Windows) |
//! | `gles` | yes | OpenGL ES / desktop GL (the fallback on older drivers) |
//! | `webgpu` | yes | WebGPU in the browser (wasm32) |
//! | `webgl` | no | WebGL2 in the browser (wasm32), where WebGPU is missing |

#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod calibrate;
pub mod compress;
mod context;
pub mod gemv;
pub mod interpolate;
pub mod linalg;
pub mod masks;
pub mod merge;
pub mod mlp;
pub mod select;
mod tensor;
pub mod ternary;

pub use context::{AdapterChoice, Context, ContextOptions, FeatureUse, GpuFeatures};
/// Runs a future to completion on this thread: the blocking form of every `async` op (native
/// only; in a browser, `.await` them).
#[cfg(not(target_arch = "wasm32"))]
pub use pollster::block_on;
pub use tensor::{GpuElement, GpuTensor};

pub use kernels_core::{
    self, CounterRng, DType, Element, Error, MatMut, MatRef, MultiPass, Result, bf16, f16, format,
};
/// The wgpu this crate is built on, for the adapter and device types [`Context`] exposes.
pub use wgpu;

/// Everything a user of the GPU backend needs, in one `use kernels_wgpu::prelude::*;`: the
/// context and tensors, every op and its parameter types, and the views, element types and
/// error.
pub mod prelude {
    #[cfg(not(target_arch = "wasm32"))]
    pub use crate::block_on;
    pub use crate::calibrate::calibrate_threshold;
    pub use crate::compress::{CompeftCut, CompeftParams, compeft, compeft_codes, moments};
    pub use crate::gemv::{gathered_gemv, gathered_gemv_uploaded, gemv, gemv_t, sparse_input_gemv};
    pub use crate::interpolate::{gram, linear_combination, model_stock, slerp};
    pub use crate::linalg::{
        GpuSvdRef, Lora, OpcmParams, Qr, RsvdParams, Svd, Transpose, gemm, householder_qr,
        lora_extract_randomized, opcm_project, project_onto, project_out, randomized_svd,
    };
    pub use crate::masks::{
        BreadcrumbsParams, DareParams, DareRescale, breadcrumbs, dare, ties_trim,
    };
    pub use crate::merge::{
        FisherParams, TiesElection, TiesParams, fisher_accumulate, fisher_merge, sum_squares,
        task_arithmetic, ties, ties_elect, ties_elect_with, weighted_mean,
    };
    pub use crate::mlp::{
        CatsMlpWeights, MlpReport, MlpScratch, TealMlpWeights, TealThresholds, cats_mlp, teal_mlp,
    };
    pub use crate::select::{
        KeepRule, TopKApplier, TopKCut, kth_largest_magnitude, topk_cut, topk_keep,
    };
    pub use crate::ternary::{GpuTernary, ternary_add, ternary_decode, ternary_gemv};
    pub use crate::{
        AdapterChoice, Context, ContextOptions, FeatureUse, GpuElement, GpuFeatures, GpuTensor,
    };
    pub use kernels_core::format::{TernaryHeader, TernaryLayout};
    pub use kernels_core::{DType, Element, Error, Mat, MatMut, MatRef, Result, bf16, f16};
}

/// The crate's README, whose examples run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
