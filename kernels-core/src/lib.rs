//! Contracts, element types, formats and the scalar reference implementation of every kernel of
//! the family: activation-sparse GEMV and MLPs (CATS, TEAL), magnitude selection, ternary
//! compression (ComPEFT) and its packed format, merge reductions (weighted means, task
//! arithmetic, TIES, DARE, Breadcrumbs, Fisher), orthogonal projection and QR, and low-rank
//! decomposition (thin and randomized SVD, LU/LDU, LoRA extraction, the OPCM step).
//!
//! The references are the **oracle**: simple, `f64`-accumulating and obviously right rather than
//! fast. Every fast kernel (`kernels-cpu`, `kernels-wgpu`) is tested against them; the
//! [precision table](#precision) says how closely.
//!
//! ```
//! use kernels_core::{MatRef, ops::sparse::{count_active, sparse_input_gemv_ref}};
//! // w_t is [in = 3, out = 2]; inputs with |x| <= 0.2 skip their row of w_t.
//! let w_t = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let x = [0.5, -0.1, 2.0];
//! let mut y = [0.0; 2];
//! sparse_input_gemv_ref(MatRef::from_slice(&w_t, 3, 2)?, &x, 0.2, &mut y)?;
//! assert_eq!((count_active(&x, 0.2), y), (2, [10.5, 13.0]));
//! # Ok::<(), kernels_core::Error>(())
//! ```
//!
//! # Cargo features
//!
//! | feature | default | adds |
//! |---|---|---|
//! | `alloc` | yes | references that return owned results (index lists, factorisations, encoders), [`Mat`] |
//!
//! Without features the crate is `#![no_std]` with no allocator: element types, views, errors,
//! parameters and their validation, the random generator, the packed-format decoder and every
//! reference that writes into caller-provided buffers.
//!
//! # Precision
//!
//! What each reference promises, against exact arithmetic on its (already rounded) inputs. Fast
//! kernels promise the bound of their own accumulation, stated beside each kernel.
//!
//! | op | promise |
//! |---|---|
//! | selection, top-k, masks (DARE, Breadcrumbs, TIES trim), packed format | exact, bit for bit |
//! | GEMV, reductions | `f64` accumulation, one final rounding to `f32`: within 1 ulp of `f32` for sums without cancellation |
//! | TIES election | the reference: `f64` vote and combination, one final rounding; fast kernels elect exactly its sign (the CPU) or within rounding of a zero vote (the GPU), values within their bound |
//! | decode attention | scores, softmax and weighted sum in `f64`, one final rounding to `f32` |
//! | QR, SVD, LU, symmetric eigendecomposition | backward stable in `f64`; factors rounded to `f64` (tests hold them to `c * eps_f64 * max(m, n)`) |
//! | randomized SVD | within 1.1x of the optimal rank-r error at oversampling >= r and 2 power iterations (probabilistic, tested) |

#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod backend;
mod element;
mod error;
pub mod format;
pub mod ops;
mod rng;
mod stream;
mod view;

pub use element::{DType, Element, Real};
pub use error::{Error, Result};
pub use rng::{CounterRng, philox4x32_10};
pub use stream::MultiPass;
#[cfg(feature = "alloc")]
pub use view::Mat;
pub use view::{MatMut, MatRef, Transpose};

pub use half::{bf16, f16};

/// The crate's README, whose examples run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
