//! SIMD CPU kernels of the family, each a fast implementation of a contract of `kernels-core`
//! and tested against its scalar reference.
//!
//! Every kernel enters through one dispatch point, [`Cpu::dispatch`]: the instruction set is
//! detected once ([`Isa::best`]) and each kernel is compiled for AVX-512, AVX2+FMA, NEON, wasm
//! simd128 and scalar code from one generic body ([`WithSimd`]). A [`Cpu`] can also be pinned to
//! any available instruction set, which is how the tests cover every path this machine has.
//!
//! ```
//! use kernels_cpu::{Cpu, Isa};
//! let cpu = Cpu::detect();
//! let x = [3.0f32, 4.0];
//! assert_eq!(kernels_cpu::reduce::sum_squares(&cpu, &x), 25.0);
//! assert!(Cpu::with_isa(Isa::Scalar).is_ok());
//! ```
//!
//! # Modules
//!
//! | module | kernels |
//! |---|---|
//! | [`gemv`] | dense, sparse-input and gathered GEMV |
//! | `mlp`, `calibrate` | CATS/TEAL MLPs, threshold calibration |
//! | `select` | exact magnitude top-k (cut, mask, indices), k-th magnitude, streaming top-k |
//! | `compress` | ComPEFT: moments, global top-k, packed encoding |
//! | `ternary` | packed ternary decode, ternary GEMV, decompress-and-add |
//! | `masks` | DARE, TIES trim, Breadcrumbs |
//! | [`merge`] | weighted mean, task arithmetic, TIES election, Fisher merging and accumulation |
//! | [`reduce`] | sum of squares |
//! | `linalg` | GEMM, Householder and CGS2 QR, fused projections, LU/LDU, thin and randomized SVD, symmetric eigendecomposition, LoRA extraction, the OPCM step, streaming truncated SVD |
//!
//! # Cargo features
//!
//! | feature | default | adds |
//! |---|---|---|
//! | `std` | yes | threads in the kernels that split work; faer's GEMM under `linalg` (not on wasm32); implies `alloc` |
//! | `alloc` | via `std` | kernels that keep scratch or return owned results: [`mlp`], [`calibrate`], [`select`], [`compress`], [`ternary`], [`masks`], `linalg` |
//!
//! Without features the crate is `#![no_std]`: CPU detection uses CPUID directly and needs no
//! operating-system support beyond saving vector registers.

#![no_std]

#[cfg(any(feature = "alloc", test))]
extern crate alloc;

#[cfg(feature = "alloc")]
pub mod calibrate;
#[cfg(feature = "alloc")]
pub mod compress;
pub mod gemv;
mod isa;
#[cfg(feature = "alloc")]
pub mod linalg;
#[cfg(feature = "alloc")]
pub mod masks;
pub mod merge;
#[cfg(feature = "alloc")]
pub mod mlp;
mod parallel;
pub mod reduce;
#[cfg(feature = "alloc")]
pub mod select;
mod simd;
#[cfg(feature = "alloc")]
pub mod ternary;

pub use isa::Isa;
#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
pub use simd::Neon;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub use simd::Simd128;
pub use simd::{KeyMasks, Scalar, Simd, WithSimd};
#[cfg(target_arch = "x86_64")]
pub use simd::{V3, V4};

use kernels_core::{Error, Result};

/// The CPU backend: which instruction set the kernels run on, and over how many threads they
/// split their work.
///
/// Cheap to copy; make one with [`Cpu::detect`] and pass it to every kernel. Results do not depend
/// on the thread count: every kernel splits its *outputs* (rows of a GEMV, column ranges of an
/// AXPY) so each output element is computed by one thread with the same operations in the same
/// order, whatever the split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpu {
    isa: Isa,
    threads: usize,
    min_bytes_per_thread: usize,
    #[cfg(feature = "alloc")]
    gemm_backend: linalg::GemmBackend,
}

impl Cpu {
    fn new(isa: Isa, threads: usize) -> Self {
        Self {
            isa,
            threads,
            min_bytes_per_thread: gemv::MIN_BYTES_PER_THREAD,
            #[cfg(feature = "alloc")]
            gemm_backend: linalg::GemmBackend::Auto,
        }
    }

    /// The best instruction set of this CPU (detected once per process) and, with `std`, one
    /// thread per core of rayon's global pool.
    #[must_use]
    pub fn detect() -> Self {
        Self::new(Isa::best(), default_threads())
    }

    /// Pinned to `isa`, if this CPU has it (threads as [`Cpu::detect`]).
    pub fn with_isa(isa: Isa) -> Result<Self> {
        if isa.is_available() {
            Ok(Self::new(isa, default_threads()))
        } else {
            Err(Error::Unsupported {
                feature: isa.name(),
                hint: "this CPU (or, for simd128, this build) lacks it; use Cpu::detect()",
            })
        }
    }

    /// The same backend splitting work into `threads` parts (`>= 1`; above 1 needs `std`).
    pub fn with_threads(self, threads: usize) -> Result<Self> {
        if threads == 0 {
            return Err(Error::InvalidParam {
                name: "threads",
                value: 0.0,
                expected: ">= 1",
            });
        }
        if threads > 1 && !cfg!(feature = "std") {
            return Err(Error::Unsupported {
                feature: "threads",
                hint: "enable kernels-cpu's `std` feature",
            });
        }
        Ok(Self { threads, ..self })
    }

    /// One single-threaded backend per available instruction set, best first: what tests iterate
    /// over.
    pub fn all_available() -> impl Iterator<Item = Self> {
        Isa::available().map(|isa| Self::new(isa, 1))
    }

    /// The instruction set in use.
    #[must_use]
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// How many parts the kernels split their work into.
    #[must_use]
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The same backend giving each thread at least `bytes` of weights to read (default 1 MiB:
    /// below that, waking a thread costs more than it saves). Tests set 1 to split even tiny
    /// problems; results never depend on it.
    #[must_use]
    pub fn with_min_bytes_per_thread(self, bytes: usize) -> Self {
        Self {
            min_bytes_per_thread: bytes.max(1),
            ..self
        }
    }

    /// Weight bytes each thread reads at least.
    #[must_use]
    pub fn min_bytes_per_thread(&self) -> usize {
        self.min_bytes_per_thread
    }

    /// The same backend with the linear-algebra kernels multiplying through `backend`.
    #[cfg(feature = "alloc")]
    #[must_use]
    pub fn with_gemm_backend(self, backend: linalg::GemmBackend) -> Self {
        Self {
            gemm_backend: backend,
            ..self
        }
    }

    /// The GEMM the linear-algebra kernels call.
    #[cfg(feature = "alloc")]
    #[must_use]
    pub fn gemm_backend(&self) -> linalg::GemmBackend {
        self.gemm_backend
    }

    /// Runs a kernel body on this backend's instruction set, on the calling thread.
    pub fn dispatch<Op: WithSimd>(&self, op: Op) -> Op::Output {
        simd::run(self.isa, op)
    }
}

fn default_threads() -> usize {
    #[cfg(feature = "std")]
    {
        rayon::current_num_threads().max(1)
    }
    #[cfg(not(feature = "std"))]
    {
        1
    }
}

impl Default for Cpu {
    fn default() -> Self {
        Self::detect()
    }
}
