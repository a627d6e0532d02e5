//! The SIMD abstraction every kernel is written against, and its one dispatch point.
//!
//! A kernel is a type implementing [`WithSimd`]: its body is generic over `S: Simd` and is
//! compiled once per instruction set, inside a function that enables that set's target features
//! ([`crate::Cpu::dispatch`]). The token types ([`Scalar`], `V3`, `V4`, `Neon`, `Simd128`) can
//! only be made where their instruction set is known to be available, which is what makes the
//! intrinsics inside them sound.

use crate::Isa;
use kernels_core::Element;

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
pub trait Simd: Copy + Send + Sync + 'static {
    /// The instruction set.
    const ISA: Isa;
    /// `f32` lanes of [`Self::F32`].
    const LANES: usize;
    /// A vector of `LANES` `f32`.
    type F32: Copy;

    /// All lanes zero.
    fn zero(self) -> Self::F32;
    /// All lanes `value`.
    fn splat(self, value: f32) -> Self::F32;
    /// Loads `LANES` elements, widened to `f32`. Panics unless `chunk.len() == LANES`.
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
    /// Classifies the magnitude keys (`|v|` as bits, see `kernels_core::ops::select::magnitude_key`)
    /// of the lanes against `lo <= hi <= 0x7F80_0000`: bit `j` of each mask is lane `j`'s.
    fn classify_keys(self, v: Self::F32, lo: u32, hi: u32) -> KeyMasks;
    /// Ternary lanes from 2-bit codes: lane `j` reads bits `2j, 2j + 1` of `codes` (the packed
    /// dense layout): `01` is `+1.0`, `10` is `-1.0`, `00` is `0.0` (`11` is never passed).
    fn ternary(self, codes: u32) -> Self::F32;
    /// `v` where bit `j` of `mask` is set, `+0.0` elsewhere.
    fn keep_lanes(self, mask: u32, v: Self::F32) -> Self::F32;
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
        let words = kernels_core::philox4x32_10_lanes::<16>(counters, key);
        let masks: [u32; 4] = core::array::from_fn(|w| {
            (0..16).fold(0, |m, b| {
                m | (u32::from(words[w][b] >> 8 >= threshold) << b)
            })
        });
        interleave4(masks)
    }
    /// Hints that the cache line holding `at` will be read soon (a no-op where the instruction set
    /// has no prefetch instruction). Never faults.
    #[inline(always)]
    fn prefetch<T>(self, at: &T) {
        let _ = at;
    }
}

/// Lane masks of [`Simd::classify_keys`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// Portable scalar code, one lane.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scalar;

impl Simd for Scalar {
    const ISA: Isa = Isa::Scalar;
    const LANES: usize = 1;
    type F32 = f32;

    #[inline(always)]
    fn zero(self) -> f32 {
        0.0
    }
    #[inline(always)]
    fn splat(self, value: f32) -> f32 {
        value
    }
    #[inline(always)]
    fn load<T: Element>(self, chunk: &[T]) -> f32 {
        assert_eq!(chunk.len(), 1);
        widen(chunk[0])
    }
    #[inline(always)]
    fn store(self, v: f32, out: &mut [f32]) {
        assert_eq!(out.len(), 1);
        out[0] = v;
    }
    #[inline(always)]
    fn mul_add(self, a: f32, b: f32, c: f32) -> f32 {
        // Unfused: without an FMA unit, `mul_add` would call into libm's software emulation.
        a * b + c
    }
    #[inline(always)]
    fn add(self, a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    fn mul(self, a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    fn reduce_sum(self, v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn classify_keys(self, v: f32, lo: u32, hi: u32) -> KeyMasks {
        let key = v.to_bits() & KEY_MAGNITUDE as u32;
        KeyMasks {
            below: u32::from(key < lo),
            within: u32::from(lo <= key && key <= hi),
            above: u32::from(key > hi),
            non_finite: u32::from(key > LARGEST_FINITE_KEY as u32),
            negative: v.to_bits() >> 31,
        }
    }
    #[inline(always)]
    fn ternary(self, codes: u32) -> f32 {
        (codes & 1) as f32 - ((codes >> 1) & 1) as f32
    }
    #[inline(always)]
    fn keep_lanes(self, mask: u32, v: f32) -> f32 {
        if mask & 1 == 1 { v } else { 0.0 }
    }
}

/// Reinterprets a chunk of 16-bit elements as their storage words.
#[cfg_attr(
    not(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "wasm32"
    )),
    allow(dead_code)
)]
#[inline(always)]
fn bits16<T: Element>(chunk: &[T]) -> &[u16] {
    bytemuck::cast_slice(chunk)
}

/// Reinterprets a chunk of 16-bit elements as their storage words, to write.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn bits16_mut<T: Element>(chunk: &mut [T]) -> &mut [u16] {
    bytemuck::cast_slice_mut(chunk)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[allow(clippy::wildcard_imports)]
    use core::arch::x86_64::*;

    use super::{
        Element, Isa, KEY_MAGNITUDE, KeyMasks, LARGEST_FINITE_KEY, Simd, bits16, bits16_mut,
    };
    use kernels_core::DType;

    /// AVX2 + FMA + F16C ("x86-64-v3"), 8 lanes.
    #[derive(Clone, Copy, Debug)]
    pub struct V3(());

    impl V3 {
        /// # Safety
        /// The CPU must support AVX2, FMA and F16C.
        #[inline(always)]
        pub(crate) unsafe fn new_unchecked() -> Self {
            Self(())
        }
    }

    impl Simd for V3 {
        const ISA: Isa = Isa::Avx2;
        const LANES: usize = 8;
        type F32 = __m256;

        #[inline(always)]
        fn zero(self) -> __m256 {
            // SAFETY (all methods): a V3 token exists only where AVX2, FMA and F16C do.
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        fn splat(self, value: f32) -> __m256 {
            unsafe { _mm256_set1_ps(value) }
        }
        #[inline(always)]
        fn load<T: Element>(self, chunk: &[T]) -> __m256 {
            assert_eq!(chunk.len(), 8);
            // SAFETY: the chunk holds 8 elements of T's width; loads are unaligned.
            unsafe {
                match T::DTYPE {
                    DType::F32 => _mm256_loadu_ps(chunk.as_ptr().cast()),
                    DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(bits16(chunk).as_ptr().cast())),
                    DType::BF16 => {
                        let wide =
                            _mm256_cvtepu16_epi32(_mm_loadu_si128(bits16(chunk).as_ptr().cast()));
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
                    }
                }
            }
        }
        #[inline(always)]
        fn store(self, v: __m256, out: &mut [f32]) {
            assert_eq!(out.len(), 8);
            // SAFETY: 8 writable f32.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn store_as<T: Element>(self, v: __m256, out: &mut [T]) {
            assert_eq!(out.len(), 8);
            // SAFETY: 8 writable elements of T's width.
            unsafe {
                match T::DTYPE {
                    DType::F32 => _mm256_storeu_ps(out.as_mut_ptr().cast(), v),
                    DType::F16 => _mm_storeu_si128(
                        bits16_mut(out).as_mut_ptr().cast(),
                        _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v),
                    ),
                    DType::BF16 => {
                        let words = bf16_words_v3(_mm256_castps_si256(v));
                        // Pack the 32-bit lanes' low halves: within 128-bit halves, then across.
                        let packed = _mm256_packus_epi32(words, words);
                        let ordered = _mm256_permute4x64_epi64::<0b1000>(packed);
                        _mm_storeu_si128(
                            bits16_mut(out).as_mut_ptr().cast(),
                            _mm256_castsi256_si128(ordered),
                        );
                    }
                }
            }
        }
        #[inline(always)]
        fn mul_add(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn mul_add_lane(self, a: f32, b: f32, c: f32) -> f32 {
            // Correctly rounded, as the hardware FMA is.
            libm::fmaf(a, b, c)
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn prefetch<T>(self, at: &T) {
            // SAFETY: prefetch is a hint; it never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(core::ptr::from_ref(at).cast()) }
        }
        #[inline(always)]
        fn reduce_sum(self, v: __m256) -> f32 {
            unsafe {
                let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
                _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<0b01>(pair, pair)))
            }
        }
        #[inline(always)]
        fn classify_keys(self, v: __m256, lo: u32, hi: u32) -> KeyMasks {
            unsafe {
                let key =
                    _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(KEY_MAGNITUDE));
                let bits = |m: __m256i| _mm256_movemask_ps(_mm256_castsi256_ps(m)) as u32;
                let below = bits(_mm256_cmpgt_epi32(_mm256_set1_epi32(lo as i32), key));
                let above = bits(_mm256_cmpgt_epi32(key, _mm256_set1_epi32(hi as i32)));
                KeyMasks {
                    below,
                    within: !(below | above) & 0xFF,
                    above,
                    non_finite: bits(_mm256_cmpgt_epi32(
                        key,
                        _mm256_set1_epi32(LARGEST_FINITE_KEY),
                    )),
                    negative: _mm256_movemask_ps(v) as u32,
                }
            }
        }
        #[inline(always)]
        fn ternary(self, codes: u32) -> __m256 {
            unsafe {
                let shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
                let code = _mm256_srlv_epi32(_mm256_set1_epi32(codes as i32), shifts);
                let one = _mm256_set1_epi32(1);
                let value = _mm256_sub_epi32(
                    _mm256_and_si256(code, one),
                    _mm256_and_si256(_mm256_srli_epi32::<1>(code), one),
                );
                _mm256_cvtepi32_ps(value)
            }
        }
        #[inline(always)]
        fn keep_lanes(self, mask: u32, v: __m256) -> __m256 {
            unsafe {
                let lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
                let bits = _mm256_and_si256(_mm256_set1_epi32(mask as i32), lane_bits);
                _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, lane_bits)), v)
            }
        }
        #[inline(always)]
        fn philox_u24_at_least(self, first_block: u64, key: [u32; 2], threshold: u32) -> u64 {
            use kernels_core::{PHILOX_MUL, PHILOX_ROUNDS, PHILOX_WEYL};
            // PERF: as the AVX-512 version, on two halves of 8 blocks.
            #[inline(always)]
            unsafe fn mul_hi_lo(a: __m256i, m: __m256i) -> (__m256i, __m256i) {
                unsafe {
                    let even = _mm256_mul_epu32(a, m);
                    let odd = _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), m);
                    let hi = _mm256_blend_epi32::<0b1010_1010>(_mm256_srli_epi64::<32>(even), odd);
                    let lo = _mm256_blend_epi32::<0b1010_1010>(even, _mm256_slli_epi64::<32>(odd));
                    (hi, lo)
                }
            }
            unsafe {
                let m0 = _mm256_set1_epi32(PHILOX_MUL[0] as i32);
                let m1 = _mm256_set1_epi32(PHILOX_MUL[1] as i32);
                let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let mut masks = [0u32; 4];
                for half in 0..2u64 {
                    let start = first_block.wrapping_add(8 * half);
                    let base = _mm256_set1_epi32(start as u32 as i32);
                    let mut c0 = _mm256_add_epi32(base, lanes);
                    // Unsigned `c0 < base`: the low word wrapped and carries into the high word.
                    let flip = _mm256_set1_epi32(i32::MIN);
                    let carry = _mm256_cmpgt_epi32(
                        _mm256_xor_si256(base, flip),
                        _mm256_xor_si256(c0, flip),
                    );
                    let high = _mm256_set1_epi32((start >> 32) as u32 as i32);
                    let mut c1 = _mm256_sub_epi32(high, carry);
                    let (mut c2, mut c3) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    let mut k = key;
                    for round in 0..PHILOX_ROUNDS {
                        if round > 0 {
                            k[0] = k[0].wrapping_add(PHILOX_WEYL[0]);
                            k[1] = k[1].wrapping_add(PHILOX_WEYL[1]);
                        }
                        let (hi0, lo0) = mul_hi_lo(c0, m0);
                        let (hi1, lo1) = mul_hi_lo(c2, m1);
                        c0 = _mm256_xor_si256(
                            _mm256_xor_si256(hi1, c1),
                            _mm256_set1_epi32(k[0] as i32),
                        );
                        c1 = lo1;
                        c2 = _mm256_xor_si256(
                            _mm256_xor_si256(hi0, c3),
                            _mm256_set1_epi32(k[1] as i32),
                        );
                        c3 = lo0;
                    }
                    // Draws and threshold are below 2^24 + 1: a signed compare is exact.
                    let below = _mm256_set1_epi32(threshold as i32 - 1);
                    for (mask, c) in masks.iter_mut().zip([c0, c1, c2, c3]) {
                        let keep = _mm256_cmpgt_epi32(_mm256_srli_epi32::<8>(c), below);
                        *mask |=
                            (_mm256_movemask_ps(_mm256_castsi256_ps(keep)) as u32) << (8 * half);
                    }
                }
                super::interleave4(masks)
            }
        }
    }

    /// The bf16 words (in the low halves of 32-bit lanes) of 8 `f32` bit patterns, rounded as
    /// `half::bf16::from_f32` rounds.
    #[inline(always)]
    unsafe fn bf16_words_v3(bits: __m256i) -> __m256i {
        // SAFETY: only called from V3 methods, where AVX2 exists.
        unsafe {
            let magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFF_FFFF));
            let nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7F80_0000));
            let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
            let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(
                bits,
                _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)),
            ));
            let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(0x0040));
            _mm256_blendv_epi8(rounded, quiet, nan)
        }
    }

    /// AVX-512F (with V3), 16 lanes.
    #[derive(Clone, Copy, Debug)]
    pub struct V4(());

    impl V4 {
        /// # Safety
        /// The CPU must support AVX-512F, AVX2, FMA and F16C.
        #[inline(always)]
        pub(crate) unsafe fn new_unchecked() -> Self {
            Self(())
        }
    }

    impl Simd for V4 {
        const ISA: Isa = Isa::Avx512;
        const LANES: usize = 16;
        type F32 = __m512;

        #[inline(always)]
        fn zero(self) -> __m512 {
            // SAFETY (all methods): a V4 token exists only where AVX-512F does.
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        fn splat(self, value: f32) -> __m512 {
            unsafe { _mm512_set1_ps(value) }
        }
        #[inline(always)]
        fn load<T: Element>(self, chunk: &[T]) -> __m512 {
            assert_eq!(chunk.len(), 16);
            // SAFETY: the chunk holds 16 elements of T's width; loads are unaligned.
            unsafe {
                match T::DTYPE {
                    DType::F32 => _mm512_loadu_ps(chunk.as_ptr().cast()),
                    DType::F16 => {
                        _mm512_cvtph_ps(_mm256_loadu_si256(bits16(chunk).as_ptr().cast()))
                    }
                    DType::BF16 => {
                        let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                            bits16(chunk).as_ptr().cast(),
                        ));
                        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
                    }
                }
            }
        }
        #[inline(always)]
        fn store(self, v: __m512, out: &mut [f32]) {
            assert_eq!(out.len(), 16);
            // SAFETY: 16 writable f32.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn store_as<T: Element>(self, v: __m512, out: &mut [T]) {
            assert_eq!(out.len(), 16);
            // SAFETY: 16 writable elements of T's width.
            unsafe {
                match T::DTYPE {
                    DType::F32 => _mm512_storeu_ps(out.as_mut_ptr().cast(), v),
                    DType::F16 => _mm256_storeu_si256(
                        bits16_mut(out).as_mut_ptr().cast(),
                        _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v),
                    ),
                    DType::BF16 => {
                        let bits = _mm512_castps_si512(v);
                        let magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFF_FFFF));
                        let nan =
                            _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x7F80_0000));
                        // Round to nearest even: add 0x7FFF plus the lowest kept bit.
                        let lsb =
                            _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
                        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
                            bits,
                            _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)),
                        ));
                        // NaN: the high half with the quiet bit set, as `half` does.
                        let quiet = _mm512_or_si512(
                            _mm512_srli_epi32::<16>(bits),
                            _mm512_set1_epi32(0x0040),
                        );
                        let words = _mm512_mask_mov_epi32(rounded, nan, quiet);
                        _mm256_storeu_si256(
                            bits16_mut(out).as_mut_ptr().cast(),
                            _mm512_cvtepi32_epi16(words),
                        );
                    }
                }
            }
        }
        #[inline(always)]
        fn mul_add(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn mul_add_lane(self, a: f32, b: f32, c: f32) -> f32 {
            // Correctly rounded, as the hardware FMA is.
            libm::fmaf(a, b, c)
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn prefetch<T>(self, at: &T) {
            // SAFETY: prefetch is a hint; it never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(core::ptr::from_ref(at).cast()) }
        }
        #[inline(always)]
        fn reduce_sum(self, v: __m512) -> f32 {
            unsafe { _mm512_reduce_add_ps(v) }
        }
        #[inline(always)]
        fn classify_keys(self, v: __m512, lo: u32, hi: u32) -> KeyMasks {
            unsafe {
                let key =
                    _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(KEY_MAGNITUDE));
                let below = u32::from(_mm512_cmplt_epi32_mask(key, _mm512_set1_epi32(lo as i32)));
                let above = u32::from(_mm512_cmpgt_epi32_mask(key, _mm512_set1_epi32(hi as i32)));
                KeyMasks {
                    below,
                    within: !(below | above) & 0xFFFF,
                    above,
                    non_finite: u32::from(_mm512_cmpgt_epi32_mask(
                        key,
                        _mm512_set1_epi32(LARGEST_FINITE_KEY),
                    )),
                    negative: u32::from(_mm512_cmplt_epi32_mask(
                        _mm512_castps_si512(v),
                        _mm512_setzero_si512(),
                    )),
                }
            }
        }
        #[inline(always)]
        fn ternary(self, codes: u32) -> __m512 {
            unsafe {
                let shifts =
                    _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                let code = _mm512_srlv_epi32(_mm512_set1_epi32(codes as i32), shifts);
                let one = _mm512_set1_epi32(1);
                let value = _mm512_sub_epi32(
                    _mm512_and_si512(code, one),
                    _mm512_and_si512(_mm512_srli_epi32::<1>(code), one),
                );
                _mm512_cvtepi32_ps(value)
            }
        }
        #[inline(always)]
        fn keep_lanes(self, mask: u32, v: __m512) -> __m512 {
            unsafe { _mm512_maskz_mov_ps(mask as u16, v) }
        }
        #[inline(always)]
        fn philox_u24_at_least(self, first_block: u64, key: [u32; 2], threshold: u32) -> u64 {
            use kernels_core::{PHILOX_MUL, PHILOX_ROUNDS, PHILOX_WEYL};
            // PERF: 32x32 -> 64-bit products of the even lanes and of the odd lanes (shifted
            // down), their halves blended back: no widening or narrowing of whole vectors.
            #[inline(always)]
            unsafe fn mul_hi_lo(a: __m512i, m: __m512i) -> (__m512i, __m512i) {
                unsafe {
                    let even = _mm512_mul_epu32(a, m);
                    let odd = _mm512_mul_epu32(_mm512_srli_epi64::<32>(a), m);
                    let hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64::<32>(even), odd);
                    let lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64::<32>(odd));
                    (hi, lo)
                }
            }
            unsafe {
                let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                let base = _mm512_set1_epi32(first_block as u32 as i32);
                let mut c0 = _mm512_add_epi32(base, lanes);
                // A block index whose low word wrapped carries into the high word.
                let carry = _mm512_cmplt_epu32_mask(c0, base);
                let high = _mm512_set1_epi32((first_block >> 32) as u32 as i32);
                let mut c1 = _mm512_mask_add_epi32(high, carry, high, _mm512_set1_epi32(1));
                let (mut c2, mut c3) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                let m0 = _mm512_set1_epi32(PHILOX_MUL[0] as i32);
                let m1 = _mm512_set1_epi32(PHILOX_MUL[1] as i32);
                let mut k = key;
                for round in 0..PHILOX_ROUNDS {
                    if round > 0 {
                        k[0] = k[0].wrapping_add(PHILOX_WEYL[0]);
                        k[1] = k[1].wrapping_add(PHILOX_WEYL[1]);
                    }
                    let (hi0, lo0) = mul_hi_lo(c0, m0);
                    let (hi1, lo1) = mul_hi_lo(c2, m1);
                    // 0x96: a ^ b ^ c.
                    c0 = _mm512_ternarylogic_epi32::<0x96>(hi1, c1, _mm512_set1_epi32(k[0] as i32));
                    c1 = lo1;
                    c2 = _mm512_ternarylogic_epi32::<0x96>(hi0, c3, _mm512_set1_epi32(k[1] as i32));
                    c3 = lo0;
                }
                let threshold = _mm512_set1_epi32(threshold as i32);
                let masks = [c0, c1, c2, c3].map(|c| {
                    u32::from(_mm512_cmpge_epu32_mask(
                        _mm512_srli_epi32::<8>(c),
                        threshold,
                    ))
                });
                super::interleave4(masks)
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{V3, V4};

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
mod arm {
    #[allow(clippy::wildcard_imports)]
    use core::arch::aarch64::*;

    use super::{Element, Isa, KEY_MAGNITUDE, KeyMasks, LARGEST_FINITE_KEY, Simd, bits16, widen};
    use kernels_core::DType;

    /// AArch64 Advanced SIMD, 4 lanes.
    #[derive(Clone, Copy, Debug)]
    pub struct Neon(());

    impl Neon {
        /// NEON is part of every AArch64 target this module is compiled for.
        #[inline(always)]
        pub(crate) fn new() -> Self {
            Self(())
        }
    }

    impl Simd for Neon {
        const ISA: Isa = Isa::Neon;
        const LANES: usize = 4;
        type F32 = float32x4_t;

        #[inline(always)]
        fn zero(self) -> float32x4_t {
            // SAFETY (all methods): NEON is enabled at compile time for this module.
            unsafe { vdupq_n_f32(0.0) }
        }
        #[inline(always)]
        fn splat(self, value: f32) -> float32x4_t {
            unsafe { vdupq_n_f32(value) }
        }
        #[inline(always)]
        fn load<T: Element>(self, chunk: &[T]) -> float32x4_t {
            assert_eq!(chunk.len(), 4);
            // SAFETY: the chunk holds 4 elements of T's width.
            unsafe {
                match T::DTYPE {
                    DType::F32 => vld1q_f32(chunk.as_ptr().cast()),
                    DType::BF16 => {
                        vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(bits16(chunk).as_ptr())))
                    }
                    DType::F16 => {
                        let lanes = [
                            widen(chunk[0]),
                            widen(chunk[1]),
                            widen(chunk[2]),
                            widen(chunk[3]),
                        ];
                        vld1q_f32(lanes.as_ptr())
                    }
                }
            }
        }
        #[inline(always)]
        fn store(self, v: float32x4_t, out: &mut [f32]) {
            assert_eq!(out.len(), 4);
            // SAFETY: 4 writable f32.
            unsafe { vst1q_f32(out.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn mul_add(self, a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
            unsafe { vfmaq_f32(c, a, b) }
        }
        #[inline(always)]
        fn add(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
            unsafe { vaddq_f32(a, b) }
        }
        #[inline(always)]
        fn mul_add_lane(self, a: f32, b: f32, c: f32) -> f32 {
            // Correctly rounded, as the hardware FMA is.
            libm::fmaf(a, b, c)
        }
        #[inline(always)]
        fn mul(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
            unsafe { vmulq_f32(a, b) }
        }
        #[inline(always)]
        fn reduce_sum(self, v: float32x4_t) -> f32 {
            unsafe { vaddvq_f32(v) }
        }
        #[inline(always)]
        fn classify_keys(self, v: float32x4_t, lo: u32, hi: u32) -> KeyMasks {
            unsafe {
                let key = vandq_s32(vreinterpretq_s32_f32(v), vdupq_n_s32(KEY_MAGNITUDE));
                let weights = vld1q_u32([1u32, 2, 4, 8].as_ptr());
                let bits = |m: uint32x4_t| vaddvq_u32(vandq_u32(m, weights));
                let below = bits(vcltq_s32(key, vdupq_n_s32(lo as i32)));
                let above = bits(vcgtq_s32(key, vdupq_n_s32(hi as i32)));
                KeyMasks {
                    below,
                    within: !(below | above) & 0xF,
                    above,
                    non_finite: bits(vcgtq_s32(key, vdupq_n_s32(LARGEST_FINITE_KEY))),
                    negative: bits(vcltq_s32(vreinterpretq_s32_f32(v), vdupq_n_s32(0))),
                }
            }
        }
        #[inline(always)]
        fn ternary(self, codes: u32) -> float32x4_t {
            unsafe {
                // Negative shift counts shift right.
                let shifts = vld1q_s32([0i32, -2, -4, -6].as_ptr());
                let code = vshlq_u32(vdupq_n_u32(codes), shifts);
                let one = vdupq_n_u32(1);
                let value = vsubq_s32(
                    vreinterpretq_s32_u32(vandq_u32(code, one)),
                    vreinterpretq_s32_u32(vandq_u32(vshrq_n_u32::<1>(code), one)),
                );
                vcvtq_f32_s32(value)
            }
        }
        #[inline(always)]
        fn keep_lanes(self, mask: u32, v: float32x4_t) -> float32x4_t {
            unsafe {
                let lane_bits = vld1q_u32([1u32, 2, 4, 8].as_ptr());
                let keep = vtstq_u32(vdupq_n_u32(mask), lane_bits);
                vreinterpretq_f32_u32(vandq_u32(keep, vreinterpretq_u32_f32(v)))
            }
        }
    }
}

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
pub use arm::Neon;

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm {
    #[allow(clippy::wildcard_imports)]
    use core::arch::wasm32::*;

    use super::{Element, Isa, KEY_MAGNITUDE, KeyMasks, LARGEST_FINITE_KEY, Simd, bits16, widen};
    use kernels_core::DType;

    /// WebAssembly SIMD, 4 lanes.
    #[derive(Clone, Copy, Debug)]
    pub struct Simd128(());

    impl Simd128 {
        /// simd128 is enabled at compile time for this module.
        #[inline(always)]
        pub(crate) fn new() -> Self {
            Self(())
        }
    }

    impl Simd for Simd128 {
        const ISA: Isa = Isa::Simd128;
        const LANES: usize = 4;
        type F32 = v128;

        #[inline(always)]
        fn zero(self) -> v128 {
            f32x4_splat(0.0)
        }
        #[inline(always)]
        fn splat(self, value: f32) -> v128 {
            f32x4_splat(value)
        }
        #[inline(always)]
        fn load<T: Element>(self, chunk: &[T]) -> v128 {
            assert_eq!(chunk.len(), 4);
            match T::DTYPE {
                // SAFETY: the chunk holds 4 f32; v128_load is unaligned.
                DType::F32 => unsafe { v128_load(chunk.as_ptr().cast()) },
                DType::BF16 => {
                    let b = bits16(chunk);
                    let wide = u32x4(
                        u32::from(b[0]),
                        u32::from(b[1]),
                        u32::from(b[2]),
                        u32::from(b[3]),
                    );
                    i32x4_shl(wide, 16)
                }
                DType::F16 => f32x4(
                    widen(chunk[0]),
                    widen(chunk[1]),
                    widen(chunk[2]),
                    widen(chunk[3]),
                ),
            }
        }
        #[inline(always)]
        fn store(self, v: v128, out: &mut [f32]) {
            assert_eq!(out.len(), 4);
            // SAFETY: 4 writable f32; v128_store is unaligned.
            unsafe { v128_store(out.as_mut_ptr().cast(), v) }
        }
        #[inline(always)]
        fn mul_add(self, a: v128, b: v128, c: v128) -> v128 {
            f32x4_add(f32x4_mul(a, b), c)
        }
        #[inline(always)]
        fn add(self, a: v128, b: v128) -> v128 {
            f32x4_add(a, b)
        }
        #[inline(always)]
        fn mul(self, a: v128, b: v128) -> v128 {
            f32x4_mul(a, b)
        }
        #[inline(always)]
        fn reduce_sum(self, v: v128) -> f32 {
            (f32x4_extract_lane::<0>(v) + f32x4_extract_lane::<1>(v))
                + (f32x4_extract_lane::<2>(v) + f32x4_extract_lane::<3>(v))
        }
        #[inline(always)]
        fn classify_keys(self, v: v128, lo: u32, hi: u32) -> KeyMasks {
            let key = v128_and(v, i32x4_splat(KEY_MAGNITUDE));
            let below = u32::from(i32x4_bitmask(i32x4_lt(key, i32x4_splat(lo as i32))));
            let above = u32::from(i32x4_bitmask(i32x4_gt(key, i32x4_splat(hi as i32))));
            KeyMasks {
                below,
                within: !(below | above) & 0xF,
                above,
                non_finite: u32::from(i32x4_bitmask(i32x4_gt(
                    key,
                    i32x4_splat(LARGEST_FINITE_KEY),
                ))),
                negative: u32::from(i32x4_bitmask(v)),
            }
        }
        #[inline(always)]
        fn ternary(self, codes: u32) -> v128 {
            let lane =
                |j: u32| ((codes >> (2 * j)) & 1) as f32 - ((codes >> (2 * j + 1)) & 1) as f32;
            f32x4(lane(0), lane(1), lane(2), lane(3))
        }
        #[inline(always)]
        fn keep_lanes(self, mask: u32, v: v128) -> v128 {
            let lane = |j: u32| if (mask >> j) & 1 == 1 { -1i32 } else { 0 };
            v128_and(i32x4(lane(0), lane(1), lane(2), lane(3)), v)
        }
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub use wasm::Simd128;

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
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_v3<Op: WithSimd>(op: Op) -> Op::Output {
    // SAFETY: this function only runs where its target features exist.
    op.with_simd(unsafe { V3::new_unchecked() })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
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
        for mask in [0u32, 0xFFFF, 0b1010_0110_0101_1001] {
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
