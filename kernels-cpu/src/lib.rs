//! SIMD CPU kernels for sparse inference, task-vector compression and model merging, each a fast
//! implementation of a contract of [`kernels_core`] and tested against its scalar reference.
//!
//! One dependency and one `use` give the whole CPU backend: the ops, their parameter types, and
//! the views, element types and error of [`kernels_core`], re-exported.
//!
//! ```
//! use kernels_cpu::prelude::*;
//!
//! let cpu = Cpu::detect();
//! // w_t is [in = 3, out = 2]: inputs with |x| <= 0.2 skip their row.
//! let w_t = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let mut y = [0.0; 2];
//! sparse_input_gemv(&cpu, MatRef::from_slice(&w_t, 3, 2)?, &[0.5, -0.1, 2.0], 0.2, &mut y)?;
//! assert_eq!(y, [10.5, 13.0]);
//! # Ok::<(), kernels_cpu::Error>(())
//! ```
//!
//! Every kernel enters through one dispatch point, [`Cpu::dispatch`]: the instruction set is
//! detected once ([`Isa::best`]) and each kernel is compiled for AVX-512 (F and BW), AVX2+FMA,
//! NEON, wasm simd128 and scalar code from one generic body ([`WithSimd`]). A [`Cpu`] can also be
//! pinned to any available instruction set, which is how the tests cover every path this machine
//! has.
//!
//! # Modules
//!
//! | module | kernels |
//! |---|---|
//! | [`gemv`] | dense, sparse-input and gathered GEMV |
//! | [`attention`] | decode attention: one query's grouped-query heads over a KV cache |
//! | `mlp`, `calibrate` | CATS/TEAL MLPs with caller-owned scratch, threshold calibration |
//! | `select` | exact magnitude top-k (cut, mask, kept values, indices), k-th magnitude, streaming top-k |
//! | `compress` | ComPEFT: moments, global top-k, codes or packed encoding |
//! | `ternary` | packed ternary tensors: decode, ternary GEMV, decompress-and-add |
//! | `masks` | DARE, TIES trim, Breadcrumbs, DELLA, the L1-preserving rescale |
//! | [`merge`] | weighted mean, task arithmetic, TIES (one call, or trim and elect), Fisher merging and accumulation, sum of squares |
//! | `linalg` | GEMM, Householder and CGS2 QR, fused projections, LU/LDU, thin and randomized SVD, symmetric eigendecomposition, LoRA extraction, the OPCM step, streaming truncated SVD |
//!
//! Conventions shared by every op: the backend comes first (`&cpu`), then inputs, parameters,
//! and the caller's output last; "how many" is a [`KeepRule`](kernels_core::ops::select::KeepRule);
//! ops with more than three knobs take a params struct with `Default` and `with_*` setters;
//! streaming types follow [`MultiPass`]. The same op has the same name and argument order in
//! `kernels-wgpu`.
//!
//! # Cargo features
//!
//! | feature | default | adds |
//! |---|---|---|
//! | `std` | yes | threads in the kernels that split work; faer's GEMM under `linalg` (not on wasm32); implies `alloc` |
//! | `alloc` | via `std` | kernels that keep scratch or return owned results: `mlp`, `calibrate`, `select`, `compress`, `ternary`, `masks`, `linalg`, [`merge::ties`] |
//!
//! Without features the crate is `#![no_std]`: CPU detection uses CPUID directly and needs no
//! operating-system support beyond saving vector registers.

#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(any(feature = "alloc", test))]
extern crate alloc;
#[cfg(any(feature = "std", test))]
extern crate std;

pub mod attention;
#[cfg(feature = "alloc")]
pub mod calibrate;
#[cfg(feature = "alloc")]
pub mod compress;
pub mod gemv;
#[cfg(feature = "alloc")]
pub mod interpolate;
mod isa;
#[cfg(feature = "alloc")]
pub mod linalg;
#[cfg(feature = "alloc")]
pub mod masks;
pub mod merge;
#[cfg(feature = "alloc")]
pub mod mlp;
mod parallel;
#[cfg(feature = "alloc")]
pub mod select;
mod simd;
#[cfg(feature = "std")]
mod team;
#[cfg(feature = "alloc")]
pub mod ternary;

pub use isa::Isa;
#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
pub use simd::Neon;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub use simd::Simd128;
pub use simd::{EXP_ULPS, Scalar, Simd, WithSimd};
#[cfg(target_arch = "x86_64")]
pub use simd::{V3, V4};

#[cfg(feature = "alloc")]
pub use kernels_core::Mat;
pub use kernels_core::{
    self, CounterRng, DType, Element, Error, MatMut, MatRef, MultiPass, Result, bf16, f16, format,
};

/// Everything a user of the CPU backend needs, in one `use kernels_cpu::prelude::*;`: the
/// backend, every op and its parameter types, and the views, element types and error.
pub mod prelude {
    pub use crate::attention::{AttentionHeads, attention};
    #[cfg(feature = "alloc")]
    pub use crate::calibrate::{Calibration, Site, calibrate_threshold};
    #[cfg(feature = "alloc")]
    pub use crate::compress::{
        Compeft, CompeftCut, CompeftEncoder, CompeftParams, compeft, compeft_codes, moments,
    };
    pub use crate::gemv::{gathered_gemv, gemv, gemv_t, sparse_input_gemv};
    #[cfg(feature = "alloc")]
    pub use crate::interpolate::{gram, linear_combination, model_stock, slerp};
    #[cfg(feature = "alloc")]
    pub use crate::linalg::{
        Centering, GemmBackend, Lora, LoraRank, LuParams, OpcmParams, Qr, RsvdParams, StreamingSvd,
        Svd, SvdRef, Transpose, cgs2, gemm, householder_qr, ldu, lora_extract,
        lora_extract_randomized, lu, opcm_project, project_onto, project_onto_in_place,
        project_out, project_out_in_place, randomized_svd, symmetric_eigen, thin_svd,
    };
    #[cfg(feature = "alloc")]
    pub use crate::masks::{
        BreadcrumbsParams, DareParams, DareRescale, DellaParams, breadcrumbs, dare, della,
        preserve_l1, ties_trim,
    };
    #[cfg(feature = "alloc")]
    pub use crate::merge::ties;
    pub use crate::merge::{
        FisherParams, TiesElection, TiesParams, fisher_accumulate, fisher_merge, sum_squares,
        task_arithmetic, ties_elect, ties_elect_with, weighted_mean,
    };
    #[cfg(feature = "alloc")]
    pub use crate::mlp::{
        CatsMlpWeights, MlpReport, MlpScratch, TealMlpWeights, TealThresholds, cats_mlp, teal_mlp,
    };
    #[cfg(feature = "alloc")]
    pub use crate::select::{
        StreamingTopK, TopKApplier, kth_largest_magnitude, topk_cut, topk_indices, topk_keep,
        topk_mask,
    };
    #[cfg(feature = "alloc")]
    pub use crate::ternary::{
        PackedTernary, ternary_add, ternary_codes, ternary_decode, ternary_gemv,
    };
    pub use crate::{Cpu, Isa};
    #[cfg(feature = "alloc")]
    pub use kernels_core::Mat;
    pub use kernels_core::format::{TernaryHeader, TernaryLayout};
    pub use kernels_core::ops::select::{KeepRule, TopKCut};
    pub use kernels_core::{DType, Element, Error, MatMut, MatRef, MultiPass, Result, bf16, f16};
}

/// The CPU backend: which instruction set the kernels run on, and over how many threads they
/// split their work.
///
/// Cheap to copy; make one with [`Cpu::detect`] and pass it to every kernel. Results do not depend
/// on the thread count: every kernel splits its *outputs* (rows of a GEMV, column ranges of an
/// AXPY, or of an AXPY's two panels of rows, see [`gemv::PANEL_MAX_COLS`]) so each
/// output element is computed with the same operations in the same order, whatever the split
/// (the linear algebra promises the same bits for a given count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpu {
    isa: Isa,
    /// `None`: the size of the rayon pool current at each call.
    threads: Option<usize>,
    min_bytes_per_thread: usize,
    /// Outputs this long or longer are written past the caches ([`Cpu::with_streaming_stores_from`]).
    streaming_stores_from: usize,
    /// Splits run on the spinning team ([`Cpu::with_spinning_team`]) instead of rayon.
    spinning: bool,
    #[cfg(feature = "alloc")]
    gemm_backend: linalg::GemmBackend,
}

impl Cpu {
    fn new(isa: Isa, threads: Option<usize>) -> Self {
        Self {
            isa,
            threads,
            min_bytes_per_thread: gemv::MIN_BYTES_PER_THREAD,
            streaming_stores_from: simd::STREAMING_MIN_BYTES,
            spinning: false,
            #[cfg(feature = "alloc")]
            gemm_backend: linalg::GemmBackend::Auto,
        }
    }

    /// The best instruction set of this CPU (detected once per process), splitting work over
    /// the rayon pool current at each call (its global pool, or the pool a caller `install`s
    /// around the call); one thread without `std`.
    #[must_use]
    pub fn detect() -> Self {
        Self::new(Isa::best(), None)
    }

    /// Pinned to `isa`, if this CPU has it (threads as [`Cpu::detect`]).
    pub fn with_isa(isa: Isa) -> Result<Self> {
        if isa.is_available() {
            Ok(Self::new(isa, None))
        } else {
            Err(Error::Unsupported {
                feature: isa.name(),
                hint: "this CPU (or, for simd128, this build) lacks it; use Cpu::detect()",
            })
        }
    }

    /// The same backend splitting work into exactly `threads` parts (`>= 1`; above 1 needs
    /// `std`), run on the rayon pool current at the call.
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
        Ok(Self {
            threads: Some(threads),
            ..self
        })
    }

    /// One single-threaded backend per available instruction set, best first: what tests iterate
    /// over.
    pub fn all_available() -> impl Iterator<Item = Self> {
        Isa::available().map(|isa| Self::new(isa, Some(1)))
    }

    /// The instruction set in use.
    #[must_use]
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// How many parts the kernels split their work into if called now: the count given to
    /// [`Cpu::with_threads`], else the current rayon pool's size.
    #[must_use]
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(current_pool_threads)
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

    /// The same backend writing outputs of at least `bytes` past the caches (non-temporal
    /// stores, where the instruction set has them: AVX2 and AVX-512); default 32 MiB.
    ///
    /// A plain store first reads the line it is about to write, so a kernel that reads one
    /// stream and writes one moves three lines for every two it needs; streaming stores skip that
    /// read (1.15x to 1.46x faster for the weighted mean and task arithmetic on 1e8 elements; a
    /// kernel bound by its instructions gains nothing), but leave the output in memory, not in
    /// the cache, for whatever reads it next. The streaming kernels are the
    /// merges that write a fresh `f32` output (weighted mean, task arithmetic, TIES election,
    /// Fisher merging) and DARE. `usize::MAX` never streams, `0` always does. Results are the
    /// same bits either way.
    ///
    /// ```
    /// use kernels_cpu::prelude::*;
    /// let cpu = Cpu::detect().with_streaming_stores_from(0);
    /// let (a, b) = (vec![1.0f32; 1000], vec![3.0f32; 1000]);
    /// let mut mean = vec![0.0f32; 1000];
    /// weighted_mean(&cpu, &[&a, &b], &[1.0, 1.0], &mut mean)?;
    /// assert!(mean.iter().all(|&m| m == 2.0));
    /// assert_eq!(cpu.streaming_stores_from(), 0);
    /// # Ok::<(), Error>(())
    /// ```
    #[must_use]
    pub fn with_streaming_stores_from(self, bytes: usize) -> Self {
        Self {
            streaming_stores_from: bytes,
            ..self
        }
    }

    /// Output bytes from which kernels write past the caches ([`Cpu::with_streaming_stores_from`]).
    #[must_use]
    pub fn streaming_stores_from(&self) -> usize {
        self.streaming_stores_from
    }

    /// Whether a kernel writing `out` should stream it past the caches.
    pub(crate) fn streams<T>(&self, out: &[T]) -> bool {
        core::mem::size_of_val(out) >= self.streaming_stores_from
    }

    /// The same backend running its splits on a process-wide team of threads that spin for a
    /// few hundred microseconds after each job before they park, instead of on rayon's pool,
    /// and giving each thread at least 64 KiB of weights (as [`Cpu::with_min_bytes_per_thread`];
    /// set that after this to change it). For loops of small kernels microseconds apart, such as
    /// decoding a small model token by token: a spinning thread starts in under a microsecond
    /// where a parked one takes 5 to 90. The team serves one caller at a time; a call made while
    /// it is busy (from another thread, or from inside one of its jobs) runs on rayon as before.
    /// Results are the same bits either way. Without `std` (one thread) this changes nothing.
    ///
    /// ```
    /// use kernels_cpu::prelude::*;
    /// let cpu = Cpu::detect().with_threads(2)?.with_spinning_team();
    /// let w = vec![0.5f32; 4 * 100_000];
    /// let mut y = [0.0f32; 4];
    /// gemv(&cpu, MatRef::from_slice(&w, 4, 100_000)?, &vec![1.0; 100_000], &mut y)?;
    /// assert_eq!(y, [50_000.0; 4]);
    /// # Ok::<(), Error>(())
    /// ```
    #[must_use]
    pub fn with_spinning_team(self) -> Self {
        Self {
            spinning: true,
            min_bytes_per_thread: gemv::SPINNING_MIN_BYTES_PER_THREAD,
            ..self
        }
    }

    /// Whether splits run on the spinning team ([`Cpu::with_spinning_team`]).
    #[must_use]
    pub fn is_spinning(&self) -> bool {
        self.spinning
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

fn current_pool_threads() -> usize {
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

/// The crate's README, whose examples run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
