//! The kernel family on any GPU: WGSL compute kernels through wgpu, on Vulkan, Metal, DX12 and
//! GL natively and on WebGPU in the browser, each the twin of a `kernels-core` reference.
//!
//! ```no_run
//! # fn main() -> kernels_core::Result<()> {
//! use kernels_wgpu::{Context, ContextOptions, GpuTensor, gemv};
//! use kernels_core::MatRef;
//!
//! let ctx = Context::new_blocking(ContextOptions::default())?;
//! let w = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let w = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&w, 2, 3)?)?;
//! let x = GpuTensor::from_slice(&ctx, &[1.0f32, 0.0, -1.0])?;
//! let mut y = GpuTensor::<f32>::zeros(&ctx, 2, 1)?;
//! gemv::gemv(&ctx, &w, &x, &mut y)?;
//! assert_eq!(y.to_vec_blocking(&ctx)?, [-2.0, -2.0]);
//! # Ok(())
//! # }
//! ```
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
//! | weighted mean, task arithmetic, TIES election, Fisher merging and accumulation | [`merge::reduction_tolerance`]: `(3 N + 4) u sum |terms|` |
//! | DARE's survivors | [`masks::DARE_RELATIVE_TOLERANCE`] (`2 u` relative); with the L1-preserving rescale [`masks::DARE_L1_RELATIVE_TOLERANCE`] |
//! | decompress-and-add | [`ternary::ternary_add_tolerance`] |
//! | ComPEFT's scale | [`ternary::SCALE_RELATIVE_TOLERANCE`] |
//!
//! The same inputs give the same bits on a given device and page size (the sweep's partial sums
//! follow the pages); the `shader-f16` and subgroup variants give the portable kernels' bits.
//!
//! # Cargo features
//!
//! None: the crate always builds wgpu's default backends.

#![warn(missing_docs)]

pub mod calibrate;
mod context;
pub mod gemv;
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
