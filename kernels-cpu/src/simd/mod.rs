//! The SIMD abstraction every kernel is written against, and its one dispatch point.
//!
//! A kernel is a type implementing [`WithSimd`]: its body is generic over `S: Simd` and is
//! compiled once per instruction set, inside a function that enables that set's target features
//! ([`crate::Cpu::dispatch`]). The token types ([`Scalar`], `V3`, `V4`, `Neon`, `Simd128`) can
//! only be made where their instruction set is known to be available, which is what makes the
//! intrinsics inside them sound.

use crate::Isa;
use kernels_core::Element;

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
mod neon;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod v3;
#[cfg(target_arch = "x86_64")]
mod v4;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm;

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
pub use neon::Neon;
pub use scalar::Scalar;
#[cfg(target_arch = "x86_64")]
pub use v3::V3;
#[cfg(target_arch = "x86_64")]
pub use v4::V4;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub use wasm::Simd128;

/// Bytes of a cache line: the unit prefetches walk in.
#[cfg(feature = "alloc")]
pub(crate) const CACHE_LINE: usize = 64;

/// The alignment, in bytes, from which [`SimdKernels::store_streaming`] bypasses the caches (a
/// cache line, the widest vector).
pub(crate) const STREAM_ALIGN: usize = 64;

/// The default of [`crate::Cpu::with_streaming_stores_from`]: about the last-level cache of a
/// desktop CPU, where a smaller output would still be in the cache for whatever reads it next.
pub(crate) const STREAMING_MIN_BYTES: usize = 32 << 20;

/// Elements of `out` before its first [`STREAM_ALIGN`] boundary when `streaming` (none
/// otherwise): a streaming kernel writes these one by one, then whole vectors from the boundary.
#[inline(always)]
pub(crate) fn stream_head(out: &[f32], streaming: bool) -> usize {
    if streaming {
        out.as_ptr().align_offset(STREAM_ALIGN).min(out.len())
    } else {
        0
    }
}

/// A kernel body, compiled once per instruction set.
pub trait WithSimd {
    /// What the kernel returns.
    type Output;
    /// Runs the kernel with the vector operations of `simd`.
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output;
}

/// Vector operations on `f32` lanes.
///
/// Every method is `#[inline(always)]` in every implementation. PERF: a method that is not
/// inlined into the `#[target_feature]` function that dispatched the kernel runs without its
/// target features: one call per vector instead of one instruction.
pub trait Simd: SimdKernels + Copy + Send + Sync + 'static {
    /// The instruction set.
    const ISA: Isa;
    /// `f32` lanes of a vector (`Self::F32`).
    const LANES: usize;

    /// All lanes zero.
    fn zero(self) -> Self::F32;
    /// All lanes `value`.
    fn splat(self, value: f32) -> Self::F32;
    /// Loads `LANES` elements, widened to `f32`. Panics unless `chunk.len() == LANES`: like a
    /// slice index, a kernel author's contract (every kernel here passes exact chunks), which the
    /// implementations assert so a wrong length never reads out of bounds.
    fn load<T: Element>(self, chunk: &[T]) -> Self::F32;
    /// Stores the lanes. Panics unless `out.len() == LANES`.
    fn store(self, v: Self::F32, out: &mut [f32]);
    /// Stores the lanes rounded to `T` exactly as [`Element::from_f32`] rounds (to nearest even,
    /// NaN kept a quiet NaN). Panics unless `out.len() == LANES`.
    #[inline(always)]
    fn store_as<T: Element>(self, v: Self::F32, out: &mut [T]) {
        let mut lanes = [0.0f32; 16];
        self.store(v, &mut lanes[..Self::LANES]);
        assert_eq!(out.len(), Self::LANES);
        for (o, &x) in out.iter_mut().zip(&lanes) {
            *o = T::from_f32(x);
        }
    }
    /// `a * b + c` (fused where the instruction set has it).
    fn mul_add(self, a: Self::F32, b: Self::F32, c: Self::F32) -> Self::F32;
    /// `a + b`.
    fn add(self, a: Self::F32, b: Self::F32) -> Self::F32;
    /// `a * b`.
    fn mul(self, a: Self::F32, b: Self::F32) -> Self::F32;
    /// [`Simd::mul_add`] on one lane, rounded exactly as the vector form (fused where that is), so
    /// tails of slices compute the same bits as vector lanes and chunking never changes a result.
    #[inline(always)]
    fn mul_add_lane(self, a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
    /// The sum of the lanes.
    fn reduce_sum(self, v: Self::F32) -> f32;
    /// Hints that the cache line holding `at` will be read soon (a no-op where the instruction set
    /// has no prefetch instruction). Never faults.
    #[inline(always)]
    fn prefetch<T>(self, at: &T) {
        let _ = at;
    }
}

/// The kernel-specific vector operations: private to the crate, so [`Simd`] stays sealed and
/// these may change with the kernels.
mod sealed {
    use super::interleave4;

    /// Lane masks of [`SimdKernels::classify_keys`].
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct KeyMasks {
        /// `key < lo`.
        pub below: u32,
        /// `lo <= key <= hi`.
        pub within: u32,
        /// `key > hi`.
        pub above: u32,
        /// The lane is infinite or NaN (`key >= 0x7F80_0000`).
        pub non_finite: u32,
        /// The lane's sign bit is set (`-0.0` included).
        pub negative: u32,
    }

    /// Key bounds of [`SimdKernels::classify_words`], in the key space of one 16-bit element
    /// type: a word's key is `word & 0x7FFF` (bf16 and f16 alike order their magnitudes as
    /// their bits), so 16-bit lanes compare keys without widening.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct WordBounds {
        /// Keys below this one are `below`.
        pub lo: u16,
        /// Keys above this one are `above` (`hi + 1 == lo` where no key lies within).
        pub hi: u16,
        /// Keys from this one up are infinite or NaN.
        pub non_finite: u16,
    }

    /// The operations only this crate's kernels use, on every [`super::Simd`] type.
    pub trait SimdKernels: Copy {
        /// A vector of `LANES` `f32`: what every vector operation of [`super::Simd`] takes.
        type F32: Copy;
        /// Vector registers the instruction set has: register-tiled kernels size their tiles so
        /// the accumulators, the loaded operands and a broadcast fit without spilling.
        const REGISTERS: usize;

        /// Classifies the magnitude keys (`|v|` as bits, see `kernels_core::ops::select::magnitude_key`)
        /// of the lanes against `lo <= hi <= 0x7F80_0000`: bit `j` of each mask is lane `j`'s.
        fn classify_keys(self, v: Self::F32, lo: u32, hi: u32) -> KeyMasks;
        /// Whether [`SimdKernels::classify_words`] and [`SimdKernels::keep_words`] are vector
        /// operations here: kernels on 16-bit elements take them only then, and widen to `f32`
        /// lanes elsewhere.
        const WORD_KEYS: bool = false;
        /// [`SimdKernels::classify_keys`] on the `2 * LANES` 16-bit elements stored as `words`
        /// (at most 32), against bounds in their own key space ([`WordBounds`]); bit `j` of each
        /// mask is word `j`'s. The default is the scalar twin of the vector forms.
        #[inline(always)]
        fn classify_words(self, words: &[u16], bounds: WordBounds) -> KeyMasks {
            assert!(words.len() <= 32);
            let mut m = KeyMasks::default();
            for (j, &w) in words.iter().enumerate() {
                let key = w & 0x7FFF;
                m.below |= u32::from(key < bounds.lo) << j;
                m.above |= u32::from(key > bounds.hi) << j;
                m.within |= u32::from((bounds.lo..=bounds.hi).contains(&key)) << j;
                m.non_finite |= u32::from(key >= bounds.non_finite) << j;
                m.negative |= u32::from(w >> 15) << j;
            }
            m
        }
        /// `out_j = words_j` where bit `j` of `mask` is set, `0` (`+0.0`) elsewhere; `words` and
        /// `out` are `2 * LANES` long. The default is the scalar twin of the vector forms.
        #[inline(always)]
        fn keep_words(self, mask: u32, words: &[u16], out: &mut [u16]) {
            assert!(words.len() <= 32 && out.len() == words.len());
            for (j, (o, &w)) in out.iter_mut().zip(words).enumerate() {
                *o = if (mask >> j) & 1 == 1 { w } else { 0 };
            }
        }
        /// Ternary lanes from 2-bit codes: lane `j` reads bits `2j, 2j + 1` of `codes` (the packed
        /// dense layout): `01` is `+1.0`, `10` is `-1.0`, `00` is `0.0` (`11` is never passed).
        fn ternary(self, codes: u32) -> Self::F32;
        /// `v` where bit `j` of `mask` is set, `+0.0` elsewhere.
        fn keep_lanes(self, mask: u32, v: Self::F32) -> Self::F32;
        /// `v` limited to `[lo, hi]`, a NaN lane kept NaN.
        fn clamp(self, v: Self::F32, lo: f32, hi: f32) -> Self::F32;
        /// `2^n` for lanes holding integers in `-126..=127`.
        fn pow2i(self, n: Self::F32) -> Self::F32;
        /// `a / b`, correctly rounded.
        fn div(self, a: Self::F32, b: Self::F32) -> Self::F32;
        /// `(v as f64 * scale) as f32` per lane: the product in `f64`, rounded once.
        fn mul_f64_rounded(self, v: Self::F32, scale: f64) -> Self::F32;
        /// Fisher merging's 16 results: `(num_j / den_j) as f32` where `den_j` is positive or
        /// NaN, `(plain_j / weight_sum) as f32` where it is not (each one correctly rounded `f64`
        /// division, rounded once to `f32`). The default is the scalar twin of the vector forms.
        #[inline(always)]
        fn fisher_quotients(
            self,
            num: &[f64; 16],
            den: &[f64; 16],
            plain: &[f64; 16],
            weight_sum: f64,
        ) -> [f32; 16] {
            let mut out = [0.0f32; 16];
            for (j, out) in out.iter_mut().enumerate() {
                *out = if den[j] > 0.0 || den[j].is_nan() {
                    num[j] / den[j]
                } else {
                    plain[j] / weight_sum
                } as f32;
            }
            out
        }
        /// Stores the lanes into `out` (`LANES` long) past the caches (a non-temporal store)
        /// where the instruction set has one and `out` is aligned to the vector's width; a plain
        /// store otherwise. A kernel streams from a [`super::STREAM_ALIGN`] boundary, so every
        /// vector of a line takes the same kind of store. Other threads see these stores in
        /// order only after [`SimdKernels::stream_fence`].
        fn store_streaming(self, v: Self::F32, out: &mut [f32]);
        /// [`super::Simd::prefetch`] into the second-level cache only: many streams prefetched
        /// into L1 evict each other there (their lines share a set when the streams share an
        /// offset within a page).
        #[inline(always)]
        fn prefetch_l2<T>(self, at: &T) {
            let _ = at;
        }
        /// Orders every earlier [`SimdKernels::store_streaming`] before every later store (x86's
        /// `sfence`); nothing where those are plain stores.
        #[inline(always)]
        fn stream_fence(self) {}
        /// The counter-based draws of 64 consecutive elements against an integer threshold: bit
        /// `4 b + w` is set iff the top 24 bits of word `w` of Philox4x32-10 block `first_block + b`
        /// (`b < 16`, see [`kernels_core::CounterRng`]) are `>= threshold`: which elements survive
        /// DARE.
        #[inline(always)]
        fn philox_u24_at_least(self, first_block: u64, key: [u32; 2], threshold: u32) -> u64 {
            let counters = [
                core::array::from_fn(|b| (first_block + b as u64) as u32),
                core::array::from_fn(|b| ((first_block + b as u64) >> 32) as u32),
                [0; 16],
                [0; 16],
            ];
            let words = kernels_core::backend::philox4x32_10_lanes::<16>(counters, key);
            let masks: [u32; 4] = core::array::from_fn(|w| {
                (0..16).fold(0, |m, b| {
                    m | (u32::from(words[w][b] >> 8 >= threshold) << b)
                })
            });
            interleave4(masks)
        }
    }
}

#[cfg_attr(not(feature = "alloc"), allow(unused_imports))]
pub(crate) use sealed::WordBounds;
pub(crate) use sealed::{KeyMasks, SimdKernels};

/// Lanes' keys are compared as `i32`: a key has its sign bit clear, so signed order is key order.
const KEY_MAGNITUDE: i32 = 0x7FFF_FFFF;
/// The largest finite key.
const LARGEST_FINITE_KEY: i32 = 0x7F7F_FFFF;

/// Interleaves four 16-bit masks: bit `b` of `masks[w]` becomes bit `4 b + w`.
#[inline(always)]
fn interleave4(masks: [u32; 4]) -> u64 {
    let spread = |mask: u32| {
        let mut x = u64::from(mask & 0xFFFF);
        x = (x | (x << 24)) & 0x0000_00FF_0000_00FF;
        x = (x | (x << 12)) & 0x000F_000F_000F_000F;
        x = (x | (x << 6)) & 0x0303_0303_0303_0303;
        (x | (x << 3)) & 0x1111_1111_1111_1111
    };
    spread(masks[0]) | (spread(masks[1]) << 1) | (spread(masks[2]) << 2) | (spread(masks[3]) << 3)
}

/// Widens one element with plain scalar code.
#[inline(always)]
fn widen<T: Element>(x: T) -> f32 {
    x.to_f32()
}

/// Reinterprets a chunk of 16-bit elements as their storage words.
#[cfg_attr(not(feature = "alloc"), allow(dead_code))]
#[inline(always)]
pub(crate) fn bits16<T: Element>(chunk: &[T]) -> &[u16] {
    bytemuck::cast_slice(chunk)
}

/// Reinterprets a chunk of 16-bit elements as their storage words, to write.
#[cfg_attr(not(feature = "alloc"), allow(dead_code))]
#[inline(always)]
pub(crate) fn bits16_mut<T: Element>(chunk: &mut [T]) -> &mut [u16] {
    bytemuck::cast_slice_mut(chunk)
}

/// Whether kernels on `T` classify its storage words on `S` ([`SimdKernels::WORD_KEYS`]).
#[cfg(feature = "alloc")]
#[inline(always)]
pub(crate) fn word_keys<S: Simd, T: Element>() -> bool {
    S::WORD_KEYS && core::mem::size_of::<T>() == 2
}

#[cfg(feature = "alloc")]
impl WordBounds {
    /// The bounds of `T`'s words (a 16-bit type) that classify as the `f32` keys `lo <= hi <=
    /// 0x7F80_0000` of their widened values do: widening is exact and keeps the magnitude order,
    /// so each bound is a count of the words whose widened key lies below it.
    pub(crate) fn of<T: Element>(lo: u32, hi: u32) -> Self {
        // The number of words (keys 0..=0x7FFF) whose widened key is below `bound` (inclusive:
        // at most `bound`), by bisection: the widened key grows with the word up to infinity,
        // past which (NaN) no bound of finite data reaches.
        let count_below = |bound: u32, inclusive: bool| {
            let (mut lo, mut hi) = (0u32, 0x8000u32);
            while lo < hi {
                let mid = u32::midpoint(lo, hi);
                let word = bytemuck::pod_read_unaligned::<T>(&(mid as u16).to_ne_bytes());
                let key = word.to_f32().to_bits() & 0x7FFF_FFFF;
                if key < bound || (inclusive && key == bound) {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            lo as u16
        };
        Self {
            lo: count_below(lo, false),
            // At least one: the key of +0.0 (0) is at most any bound.
            hi: count_below(hi, true) - 1,
            non_finite: count_below(LARGEST_FINITE_KEY as u32, true),
        }
    }
}

/// Widens `src` into `dst[..src.len()]`, with vector loads where whole vectors fit.
#[inline(always)]
pub(crate) fn widen_into<S: Simd, T: Element>(s: S, src: &[T], dst: &mut [f32]) {
    let main = src.len() - src.len() % S::LANES;
    for (a, b) in src[..main]
        .chunks_exact(S::LANES)
        .zip(dst.chunks_exact_mut(S::LANES))
    {
        s.store(s.load(a), b);
    }
    for (d, x) in dst[main..src.len()].iter_mut().zip(&src[main..]) {
        *d = x.to_f32();
    }
}

/// `src` as `N` `f32`: itself when it already is (no copy), else widened into `buf` (a short
/// `src` fills only the front of `buf`; the rest keeps what it held).
///
/// PERF: a copy of `f32` would compile to a call of `memcpy` per block, which costs more than
/// the kernels' work on it.
#[inline(always)]
pub(crate) fn widened<'a, S: Simd, T: Element, const N: usize>(
    s: S,
    src: &'a [T],
    buf: &'a mut [f32; N],
) -> &'a [f32; N] {
    if T::DTYPE == kernels_core::DType::F32 && src.len() == N {
        let values: &[f32] = bytemuck::cast_slice(src);
        if let Ok(values) = values.try_into() {
            return values;
        }
    }
    widen_into(s, src, buf);
    buf
}

/// `src` as `N` `f32` lanes, by value: a whole `f32` block is loaded as it is and a whole `bf16`
/// block widened word by word (a shift), both without a round trip through memory; other blocks
/// go through `buf` ([`widened`]).
///
/// PERF: the lane kernels keep the block in registers. Widened into a buffer and read back, a
/// `bf16` block of 32 lanes in TIES election ran 2.7x slower than 16 lanes in one run of a build
/// and as fast in the next (where the buffer fell on the stack, Zen 4); in registers, 1.07x to
/// 1.1x faster than the fast run (one thread, in L1).
#[inline(always)]
pub(crate) fn widened_lanes<S: Simd, T: Element, const N: usize>(
    s: S,
    src: &[T],
    buf: &mut [f32; N],
) -> [f32; N] {
    if src.len() == N {
        match T::DTYPE {
            kernels_core::DType::F32 => {
                if let Ok(values) = <&[f32; N]>::try_from(bytemuck::cast_slice::<T, f32>(src)) {
                    return *values;
                }
            }
            kernels_core::DType::BF16 => {
                if let Ok(words) = <&[u16; N]>::try_from(bits16(src)) {
                    let mut lanes = [0.0f32; N];
                    for (lane, &word) in lanes.iter_mut().zip(words) {
                        *lane = f32::from_bits(u32::from(word) << 16);
                    }
                    return lanes;
                }
            }
            kernels_core::DType::F16 => {}
        }
    }
    *widened(s, src, buf)
}

/// Largest error, in units in the last place of the result, of the vector `e^x` that SiLU (in
/// the CATS and TEAL MLPs) and the attention weights use in place of `libm::expf`, over every
/// `f32` input whose `e^x` is a normal `f32`. A subnormal result is within that many of its
/// absolute spacing (`2^-149`); below `-104` the result is `0`, above `89` it is `+inf`; NaN stays
/// NaN. The tests sweep every 4099th `f32` from `-104` to `89` on every instruction set (the worst
/// seen: 1.2 ulps).
pub const EXP_ULPS: f64 = 2.0;

/// `e^v` per lane, within [`EXP_ULPS`] (Cody-Waite reduction to `r` in `[-ln 2 / 2, ln 2 / 2]`,
/// Cephes' degree-7 polynomial for `e^r`, then two exact scalings by powers of two so that
/// results down to the subnormals and up to overflow come out right).
///
/// PERF: 16 lanes in about twenty instructions, against about twenty cycles per `libm::expf`
/// call: SiLU over SmolLM2's 1536 gate activations took a tenth of a TEAL layer's main thread.
#[inline(always)]
pub(crate) fn exp<S: Simd>(s: S, v: S::F32) -> S::F32 {
    /// Adding and subtracting `1.5 * 2^23` rounds an `f32` below `2^22` to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    /// `ln 2` split so that `n * LN2_HI` is exact for `|n| <= 2^15`.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const POLY: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];
    let round = |x: S::F32| s.add(s.add(x, s.splat(ROUND)), s.splat(-ROUND));
    let x = s.clamp(v, -104.0, 89.0);
    let n = round(s.mul(x, s.splat(core::f32::consts::LOG2_E)));
    let r = s.mul_add(n, s.splat(-LN2_HI), x);
    let r = s.mul_add(n, s.splat(-LN2_LO), r);
    let p = POLY[1..]
        .iter()
        .fold(s.splat(POLY[0]), |p, &c| s.mul_add(p, r, s.splat(c)));
    let y = s.mul_add(p, s.mul(r, r), s.add(r, s.splat(1.0)));
    // n in -150..=129: 2^n as two factors in the normal range, the first product exact.
    let first = round(s.mul(n, s.splat(0.5)));
    let second = s.add(n, s.mul(first, s.splat(-1.0)));
    s.mul(s.mul(y, s.pow2i(first)), s.pow2i(second))
}

/// `values` (at most `S::LANES` of them) as a vector, the lanes past them zero: so a slice's tail
/// goes through the same vector code as its whole chunks.
#[inline(always)]
pub(crate) fn load_padded<S: Simd>(s: S, values: &[f32]) -> S::F32 {
    if values.len() == S::LANES {
        return s.load(values);
    }
    let mut padded = [0.0f32; 16];
    padded[..values.len()].copy_from_slice(values);
    s.load(&padded[..S::LANES])
}

/// The first `out.len()` (at most `S::LANES`) lanes of `v` into `out`.
#[inline(always)]
pub(crate) fn store_padded<S: Simd>(s: S, v: S::F32, out: &mut [f32]) {
    if out.len() == S::LANES {
        s.store(v, out);
        return;
    }
    let mut padded = [0.0f32; 16];
    s.store(v, &mut padded[..S::LANES]);
    out.copy_from_slice(&padded[..out.len()]);
}

/// Runs `op` on `isa`. The caller guarantees `isa.is_available()`.
#[inline]
pub(crate) fn run<Op: WithSimd>(isa: Isa, op: Op) -> Op::Output {
    debug_assert!(isa.is_available());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is available (the caller's guarantee, checked by `Cpu`'s constructors).
        Isa::Avx512 => unsafe { run_v4(op) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { run_v3(op) },
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        Isa::Neon => op.with_simd(Neon::new()),
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        Isa::Simd128 => op.with_simd(Simd128::new()),
        _ => op.with_simd(Scalar),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1,bmi2,lzcnt")]
unsafe fn run_v3<Op: WithSimd>(op: Op) -> Op::Output {
    // SAFETY: this function only runs where its target features exist.
    op.with_simd(unsafe { V3::new_unchecked() })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c,popcnt,bmi1,bmi2,lzcnt")]
unsafe fn run_v4<Op: WithSimd>(op: Op) -> Op::Output {
    // SAFETY: this function only runs where its target features exist.
    op.with_simd(unsafe { V4::new_unchecked() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;
    use alloc::vec::Vec;
    use half::{bf16, f16};
    use kernels_core::DType;

    struct RoundTrip<'a, T>(&'a [T]);

    impl<T: Element> WithSimd for RoundTrip<'_, T> {
        type Output = Vec<f32>;
        fn with_simd<S: Simd>(self, s: S) -> Vec<f32> {
            // x * 1 + (-0), then + (-0): exact for every x including -0, so every lane must come
            // back bit for bit.
            let mut out = alloc::vec![0.0; self.0.len() / S::LANES * S::LANES];
            for (c, o) in self
                .0
                .chunks_exact(S::LANES)
                .zip(out.chunks_exact_mut(S::LANES))
            {
                let minus_zero = s.splat(-0.0);
                s.store(
                    s.add(s.mul_add(s.load(c), s.splat(1.0), minus_zero), minus_zero),
                    o,
                );
            }
            out
        }
    }

    struct LaneSums<'a>(&'a [f32]);

    impl WithSimd for LaneSums<'_> {
        type Output = Vec<f32>;
        fn with_simd<S: Simd>(self, s: S) -> Vec<f32> {
            self.0
                .chunks_exact(S::LANES)
                .map(|c| s.reduce_sum(s.load(c)))
                .collect()
        }
    }

    struct Classify<'a>(&'a [f32], u32, u32);

    impl WithSimd for Classify<'_> {
        type Output = Vec<KeyMasks>;
        fn with_simd<S: Simd>(self, s: S) -> Vec<KeyMasks> {
            self.0
                .chunks_exact(S::LANES)
                .map(|c| s.classify_keys(s.load(c), self.1, self.2))
                .collect()
        }
    }

    /// Every 16-bit word of `T` classifies by its word bounds as its widened value does by the
    /// `f32` bounds, for bounds on, between and beyond `T`'s keys.
    fn word_bounds_classify_as_the_widened_keys<T: Element>() {
        let word = |w: u16| bytemuck::pod_read_unaligned::<T>(&w.to_ne_bytes()).to_f32();
        let key = |w: u16| word(w).to_bits() & 0x7FFF_FFFF;
        let (one, big) = (key(T::from_f32(1.0).to_f32().to_bits() as u16), 0x7F7F_FFFF);
        let mut bounds = alloc::vec![(0, 0), (0, 0x7F80_0000), (1, 1), (one, one), (big, big)];
        for w in [1u16, 0x0400, 0x3C00, 0x3F80, 0x7BFF, 0x7C00, 0x7F7F, 0x7F80] {
            let k = key(w);
            bounds.extend([(k, k), (k - 1, k + 1), (k + 1, k + 1), (k - 1, key(w + 7))]);
        }
        for (lo, hi) in bounds {
            let lo = lo.min(INFINITY_KEY);
            let hi = hi.clamp(lo, INFINITY_KEY);
            let b = WordBounds::of::<T>(lo, hi);
            for w in 0..=u16::MAX {
                let want = Scalar.classify_keys(word(w), lo, hi);
                let got = Scalar.classify_words(&[w], b);
                assert_eq!(got, want, "{:?} word {w:#06x} [{lo:#x}, {hi:#x}]", T::DTYPE);
            }
        }
    }

    /// `INFINITY_KEY` of the select, the largest bound a cut takes.
    const INFINITY_KEY: u32 = 0x7F80_0000;

    #[test]
    fn word_bounds_classify_bf16_and_f16_as_their_widened_keys() {
        word_bounds_classify_as_the_widened_keys::<bf16>();
        word_bounds_classify_as_the_widened_keys::<f16>();
    }

    struct ClassifyWords<'a>(&'a [u16], WordBounds, u32);

    impl WithSimd for ClassifyWords<'_> {
        type Output = Vec<(KeyMasks, Vec<u16>)>;
        fn with_simd<S: Simd>(self, s: S) -> Self::Output {
            let width = if S::WORD_KEYS { 2 * S::LANES } else { 1 };
            self.0
                .chunks_exact(width)
                .map(|c| {
                    let mut kept = alloc::vec![0xABCD; width];
                    s.keep_words(self.2, c, &mut kept);
                    (s.classify_words(c, self.1), kept)
                })
                .collect()
        }
    }

    #[test]
    fn word_classes_and_kept_words_match_scalar_on_every_isa() {
        let specials = [
            0u16, 0x8000, 1, 0x8001, 0x3F80, 0xBF80, 0x3C00, 0x7BFF, 0x7C00, 0xFC00, 0x7F7F,
            0x7F80, 0xFF80, 0x7FC0, 0xFFFF, 0x4000, 0x3FFF,
        ];
        let words: Vec<u16> = (0..192)
            .map(|i| specials[(i * 7) % specials.len()])
            .collect();
        for (lo, hi, non_finite) in [
            (0, 0, 0x7F80),
            (0x3C00, 0x3F80, 0x7C00),
            (0x4000, 0x3FFF, 1),
        ] {
            let bounds = WordBounds { lo, hi, non_finite };
            for mask in [0, u32::MAX, 0x5A5A_C3C3] {
                for cpu in Cpu::all_available() {
                    let got = cpu.dispatch(ClassifyWords(&words, bounds, mask));
                    let width = words.len() / got.len();
                    for (chunk, (masks, kept)) in words.chunks(width).zip(got) {
                        let what = alloc::format!("{} {bounds:?} {mask:#x}", cpu.isa());
                        assert_eq!(masks, Scalar.classify_words(chunk, bounds), "{what}");
                        let mut want = alloc::vec![0; width];
                        Scalar.keep_words(mask, chunk, &mut want);
                        assert_eq!(kept, want, "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn key_classes_match_scalar_lane_by_lane() {
        let specials = [
            0.0f32,
            -0.0,
            f32::MIN_POSITIVE,
            -1e-45,
            1.0,
            -1.0,
            1.5,
            -2.0,
            f32::MAX,
            -f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            3.0,
            -0.5,
        ];
        let values: Vec<f32> = (0..64).map(|i| specials[(i * 7) % 16]).collect();
        for (lo, hi) in [
            (0, 0),
            (1.0f32.to_bits(), 2.0f32.to_bits()),
            (0, 0x7F80_0000),
        ] {
            let expect: Vec<KeyMasks> = values
                .iter()
                .map(|&v| Scalar.classify_keys(v, lo, hi))
                .collect();
            for cpu in Cpu::all_available() {
                let lanes = cpu.isa().f32_lanes();
                for (chunk, got) in expect
                    .chunks(lanes)
                    .zip(cpu.dispatch(Classify(&values, lo, hi)))
                {
                    let gather = |f: fn(&KeyMasks) -> u32| {
                        chunk
                            .iter()
                            .enumerate()
                            .fold(0, |m, (j, k)| m | (f(k) << j))
                    };
                    let want = KeyMasks {
                        below: gather(|k| k.below),
                        within: gather(|k| k.within),
                        above: gather(|k| k.above),
                        non_finite: gather(|k| k.non_finite),
                        negative: gather(|k| k.negative),
                    };
                    assert_eq!(got, want, "{} [{lo:#x}, {hi:#x}]", cpu.isa());
                }
            }
        }
    }

    struct Ternary(u32);

    impl WithSimd for Ternary {
        type Output = Vec<f32>;
        fn with_simd<S: Simd>(self, s: S) -> Vec<f32> {
            let mut out = alloc::vec![0.0; S::LANES];
            s.store(s.ternary(self.0), &mut out);
            out
        }
    }

    struct Exp<'a>(&'a [f32]);

    impl WithSimd for Exp<'_> {
        type Output = Vec<f32>;
        fn with_simd<S: Simd>(self, s: S) -> Vec<f32> {
            let mut out = alloc::vec![0.0; self.0.len()];
            for (c, o) in self
                .0
                .chunks_exact(S::LANES)
                .zip(out.chunks_exact_mut(S::LANES))
            {
                s.store(exp(s, s.load(c)), o);
            }
            out
        }
    }

    /// Every 4099th `f32` from `-0` to `-104` and from `0` to `89` (under Miri every 4099 * 64th),
    /// the edges of the clamp, overflow and underflow, and the non-finite values; a multiple of
    /// 16 long.
    fn exp_inputs() -> Vec<f32> {
        let step = if cfg!(miri) { 4099 * 64 } else { 4099 };
        let mut inputs: Vec<f32> = (0..=89f32.to_bits())
            .step_by(step)
            .chain(((-0f32).to_bits()..=(-104f32).to_bits()).step_by(step))
            .map(f32::from_bits)
            .collect();
        inputs.extend([
            88.72283,
            88.72284,
            88.7229,
            -87.33654,
            -87.33655,
            -103.972,
            -103.973,
            -104.0,
            89.0,
            -104.5,
            89.5,
            1e-10,
            -1e-10,
            200.0,
            -200.0,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -0.5 * core::f32::consts::LN_2,
        ]);
        inputs.resize(inputs.len().next_multiple_of(16), 1.0);
        inputs
    }

    #[test]
    fn exp_is_within_its_ulps_on_every_isa() {
        let inputs = exp_inputs();
        for cpu in Cpu::all_available() {
            let got = cpu.dispatch(Exp(&inputs));
            let mut worst = 0.0f64;
            for (&x, &y) in inputs.iter().zip(&got) {
                let exact = libm::exp(f64::from(x));
                let context = alloc::format!("{}: exp({x:e}) = {y:e}, exact {exact:e}", cpu.isa());
                if x.is_nan() {
                    assert!(y.is_nan(), "{context}");
                    continue;
                }
                // Rounding turns every value from 2^128 - 2^103 up into +inf.
                let overflow = 2f64.powi(128);
                if exact >= overflow {
                    assert_eq!(y, f32::INFINITY, "{context}");
                    continue;
                }
                let value = if y == f32::INFINITY {
                    overflow
                } else {
                    f64::from(y)
                };
                let ulp = if exact >= f64::from(f32::MIN_POSITIVE) {
                    2f64.powi(libm::floor(libm::log2(exact)) as i32 - 23)
                } else {
                    2f64.powi(-149)
                };
                let ulps = (value - exact).abs() / ulp;
                assert!(ulps <= EXP_ULPS, "{context}: {ulps} ulps");
                worst = worst.max(ulps);
            }
            // The bound is tight enough to mean something: the polynomial does err by an ulp.
            assert!(worst > 0.5, "{}: worst {worst} ulps", cpu.isa());
        }
    }

    #[test]
    fn ternary_lanes_follow_the_codes_on_every_isa() {
        for codes in [0u32, 0x5555_5555, 0xAAAA_AAAA, 0x9868_A586] {
            for cpu in Cpu::all_available() {
                let got = cpu.dispatch(Ternary(codes));
                for (j, g) in got.iter().enumerate() {
                    let expect = match (codes >> (2 * j)) & 3 {
                        1 => 1.0f32,
                        2 => -1.0,
                        _ => 0.0,
                    };
                    assert_eq!(g.to_bits(), expect.to_bits(), "{} lane {j}", cpu.isa());
                }
            }
        }
    }

    struct MulF64Rounded<'a>(&'a [f32], f64);

    impl WithSimd for MulF64Rounded<'_> {
        type Output = Vec<f32>;
        fn with_simd<S: Simd>(self, s: S) -> Vec<f32> {
            let mut out = alloc::vec![0.0; self.0.len()];
            for (o, v) in out
                .chunks_exact_mut(S::LANES)
                .zip(self.0.chunks_exact(S::LANES))
            {
                s.store(s.mul_f64_rounded(s.load(v), self.1), o);
            }
            out
        }
    }

    #[test]
    fn f64_products_round_once_on_every_isa() {
        // Products that f32 arithmetic would round twice, subnormals, overflow, signed zeros.
        let mut values = alloc::vec![
            1.0f32,
            -3.0,
            0.1,
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            1e-45,
            -0.0,
            0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            16_777_215.0,
            -1.000_000_1,
            3.402_823e30,
            7.0e-39,
            0.333_333_34,
        ];
        values.extend((0..48).map(|i| (i as f32 * 0.618_034).sin() * 10f32.powi(i % 9 - 4)));
        for scale in [1.0 / (1.0 - 0.9), 1.0 / 3.0, 1e-300, 1e300, -2.5, 0.0] {
            for cpu in Cpu::all_available() {
                for (v, g) in values
                    .iter()
                    .zip(cpu.dispatch(MulF64Rounded(&values, scale)))
                {
                    let expect = (f64::from(*v) * scale) as f32;
                    assert_eq!(g.to_bits(), expect.to_bits(), "{} {v} * {scale}", cpu.isa());
                }
            }
        }
    }

    /// Writes `values` with streaming stores, one vector at each offset of a buffer, and fences.
    struct StreamAt<'a>(&'a [f32], usize);

    impl WithSimd for StreamAt<'_> {
        type Output = Vec<f32>;
        fn with_simd<S: Simd>(self, s: S) -> Vec<f32> {
            let mut out = alloc::vec![0.0; 64];
            let at = self.1;
            s.store_streaming(s.load(&self.0[..S::LANES]), &mut out[at..at + S::LANES]);
            s.stream_fence();
            out
        }
    }

    #[test]
    fn streaming_stores_write_the_lanes_at_every_offset_on_every_isa() {
        let values: Vec<f32> = (0..16).map(|i| 0.25 + i as f32).collect();
        for cpu in Cpu::all_available() {
            // Offsets on and off the 64-byte boundary (where the plain store takes over).
            for at in 0..=32 {
                let got = cpu.dispatch(StreamAt(&values, at));
                let lanes = cpu.dispatch(Lanes);
                for (j, g) in got.iter().enumerate() {
                    let expect = if (at..at + lanes).contains(&j) {
                        values[j - at]
                    } else {
                        0.0
                    };
                    assert_eq!(g.to_bits(), expect.to_bits(), "{} at {at} [{j}]", cpu.isa());
                }
            }
        }
    }

    struct Lanes;

    impl WithSimd for Lanes {
        type Output = usize;
        fn with_simd<S: Simd>(self, _: S) -> usize {
            S::LANES
        }
    }

    struct KeepLanes<'a>(&'a [f32], u32);

    impl WithSimd for KeepLanes<'_> {
        type Output = Vec<f32>;
        fn with_simd<S: Simd>(self, s: S) -> Vec<f32> {
            let mut out = alloc::vec![0.0; S::LANES];
            s.store(s.keep_lanes(self.1, s.load(&self.0[..S::LANES])), &mut out);
            out
        }
    }

    #[test]
    fn keep_lanes_zero_the_rest_on_every_isa() {
        let values: Vec<f32> = (0..16).map(|i| -1.5 - i as f32).collect();
        // Every byte in every position (AVX2 looks its lanes up in a table of 256).
        let masks = (0..=0xFFFFu32)
            .step_by(257)
            .chain([0b1010_0110_0101_1001, 0x8001]);
        for mask in masks {
            for cpu in Cpu::all_available() {
                for (j, g) in cpu.dispatch(KeepLanes(&values, mask)).iter().enumerate() {
                    let expect = if (mask >> j) & 1 == 1 { values[j] } else { 0.0 };
                    assert_eq!(g.to_bits(), expect.to_bits(), "{} lane {j}", cpu.isa());
                }
            }
        }
    }

    struct Draws(u64, [u32; 2], u32);

    impl WithSimd for Draws {
        type Output = u64;
        fn with_simd<S: Simd>(self, s: S) -> u64 {
            s.philox_u24_at_least(self.0, self.1, self.2)
        }
    }

    #[test]
    fn philox_draws_match_the_generator_on_every_isa() {
        let rng = kernels_core::CounterRng::new(0x1234_5678_9ABC_DEF0);
        // Includes a low word that wraps inside the 16 blocks, and a threshold equal to a draw.
        for first in [
            0u64,
            5,
            u64::from(u32::MAX) - 7,
            u64::from(u32::MAX) - 3,
            (7 << 32) + 3,
            (u64::MAX >> 2) - 15,
        ] {
            for threshold in [0, 1 << 23, rng.u24_at(first * 4 + 9), 1 << 24] {
                let expect = (0..64u64).fold(0, |bits, e| {
                    bits | (u64::from(rng.u24_at(first * 4 + e) >= threshold) << e)
                });
                for cpu in Cpu::all_available() {
                    let got = cpu.dispatch(Draws(first, rng.key(), threshold));
                    assert_eq!(
                        got,
                        expect,
                        "{} block {first} threshold {threshold}",
                        cpu.isa()
                    );
                }
            }
        }
    }

    struct StoreAs<'a, T>(&'a [f32], core::marker::PhantomData<T>);

    impl<T: Element> WithSimd for StoreAs<'_, T> {
        type Output = Vec<T>;
        fn with_simd<S: Simd>(self, s: S) -> Vec<T> {
            let mut out = alloc::vec![T::from_f32(0.0); self.0.len() / S::LANES * S::LANES];
            for (c, o) in self
                .0
                .chunks_exact(S::LANES)
                .zip(out.chunks_exact_mut(S::LANES))
            {
                s.store_as(s.load(c), o);
            }
            out
        }
    }

    fn check_store_as<T: Element>() {
        // Every rounding case: halfway points, odd and even last bits, subnormals of both
        // formats, overflow to infinity, infinities and NaNs with payloads, both signs.
        let mut values: Vec<f32> = (0..=u16::MAX)
            .flat_map(|h| {
                let base = u32::from(h) << 16;
                [
                    base,
                    base | 0x7FFF,
                    base | 0x8000,
                    base | 0x8001,
                    base | 0xFFFF,
                ]
            })
            .map(f32::from_bits)
            .collect();
        values.extend((0..=u16::MAX).map(|h| f16::from_bits(h).to_f32() * 1.000_01));
        values.truncate(values.len() / 16 * 16);
        for cpu in Cpu::all_available() {
            let got = cpu.dispatch(StoreAs::<T>(&values, core::marker::PhantomData));
            for (g, &v) in got.iter().zip(&values) {
                let expect = T::from_f32(v);
                assert_eq!(
                    bytemuck::bytes_of(g),
                    bytemuck::bytes_of(&expect),
                    "{} {:?} from {v:e} ({:#x})",
                    cpu.isa(),
                    T::DTYPE,
                    v.to_bits()
                );
            }
        }
    }

    #[test]
    fn narrowing_stores_round_as_the_element_type_on_every_isa() {
        check_store_as::<f32>();
        check_store_as::<f16>();
        check_store_as::<bf16>();
    }

    fn check_loads<T: Element>() {
        // Every 16-bit pattern, which covers every f16 and bf16 (NaNs included: compared by bits).
        let values: Vec<T> = (0..=u16::MAX)
            .map(|b| match T::DTYPE {
                DType::F16 => T::from_f32(f16::from_bits(b).to_f32()),
                DType::BF16 => T::from_f32(bf16::from_bits(b).to_f32()),
                DType::F32 => T::from_f32(f32::from(b) - 30_000.0),
            })
            .collect();
        for cpu in Cpu::all_available() {
            let got = cpu.dispatch(RoundTrip(&values));
            for (g, v) in got.iter().zip(&values) {
                let expect = v.to_f32();
                assert!(
                    g.to_bits() == expect.to_bits() || (g.is_nan() && expect.is_nan()),
                    "{} {:?}: {g} vs {expect}",
                    cpu.isa(),
                    T::DTYPE
                );
            }
        }
    }

    #[test]
    fn widening_loads_are_exact_on_every_isa() {
        check_loads::<f32>();
        check_loads::<f16>();
        check_loads::<bf16>();
    }

    #[test]
    fn lane_sums_add_every_lane() {
        let values: Vec<f32> = (0..64).map(|i| (1u64 << (i % 20)) as f32).collect();
        for cpu in Cpu::all_available() {
            let lanes = cpu.isa().f32_lanes();
            let sums = cpu.dispatch(LaneSums(&values));
            for (chunk, sum) in values.chunks_exact(lanes).zip(sums) {
                // Powers of two below 2^20, at most 16 of them: exact in f32.
                assert_eq!(sum, chunk.iter().sum::<f32>(), "{}", cpu.isa());
            }
        }
    }
}
