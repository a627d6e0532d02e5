//! AVX2 + FMA + F16C with POPCNT, BMI1/2 and LZCNT ("x86-64-v3"), 256-bit vectors.

#[allow(clippy::wildcard_imports)]
use core::arch::x86_64::*;

use super::{
    Element, Isa, KEY_MAGNITUDE, KeyMasks, LARGEST_FINITE_KEY, Simd, SimdKernels, WordBounds,
    bits16, bits16_mut,
};
use kernels_core::DType;

/// AVX2 + FMA + F16C with POPCNT, BMI1/2 and LZCNT ("x86-64-v3"), 8 lanes.
#[derive(Clone, Copy, Debug)]
pub struct V3(());

impl V3 {
    /// # Safety
    /// The CPU must support AVX2, FMA, F16C, POPCNT, BMI1, BMI2 and LZCNT (x86-64-v3).
    #[inline(always)]
    pub(crate) unsafe fn new_unchecked() -> Self {
        Self(())
    }
}

impl Simd for V3 {
    const ISA: Isa = Isa::Avx2;
    const LANES: usize = 8;

    #[inline(always)]
    fn zero(self) -> __m256 {
        // SAFETY (all methods): a V3 token exists only where those features do.
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
}

impl SimdKernels for V3 {
    type F32 = __m256;
    const REGISTERS: usize = 16;

    #[inline(always)]
    fn classify_keys(self, v: __m256, lo: u32, hi: u32) -> KeyMasks {
        unsafe {
            let key = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(KEY_MAGNITUDE));
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
    const WORD_KEYS: bool = true;
    #[inline(always)]
    fn classify_words(self, words: &[u16], bounds: WordBounds) -> KeyMasks {
        assert_eq!(words.len(), 16);
        // SAFETY: 16 readable words.
        unsafe {
            let w = _mm256_loadu_si256(words.as_ptr().cast());
            // Keys fit 15 bits, so signed 16-bit order is key order.
            let key = _mm256_and_si256(w, _mm256_set1_epi16(0x7FFF));
            let bound = |b: u16| _mm256_set1_epi16(b as i16);
            let below = _mm256_cmpgt_epi16(bound(bounds.lo), key);
            let above = _mm256_cmpgt_epi16(key, bound(bounds.hi));
            let finite = _mm256_cmpgt_epi16(bound(bounds.non_finite), key);
            // Two lane masks from one pack of their compares to bytes (in lane order once the
            // pack's 64-bit quarters are put back in order) and one byte movemask.
            let pair = |a: __m256i, b: __m256i| {
                let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi16(a, b));
                let m = _mm256_movemask_epi8(packed) as u32;
                (m & 0xFFFF, m >> 16)
            };
            let (below, above) = pair(below, above);
            let (finite, negative) = pair(finite, w);
            KeyMasks {
                below,
                within: !(below | above) & 0xFFFF,
                above,
                non_finite: !finite & 0xFFFF,
                negative,
            }
        }
    }
    #[inline(always)]
    fn keep_words(self, mask: u32, words: &[u16], out: &mut [u16]) {
        assert!(words.len() == 16 && out.len() == 16);
        // SAFETY: 16 readable and 16 writable words.
        unsafe {
            let lane_bits = _mm256_setr_epi16(
                1,
                2,
                4,
                8,
                16,
                32,
                64,
                128,
                256,
                512,
                1024,
                2048,
                4096,
                8192,
                16384,
                i16::MIN,
            );
            let bits = _mm256_and_si256(_mm256_set1_epi16(mask as u16 as i16), lane_bits);
            let keep = _mm256_cmpeq_epi16(bits, lane_bits);
            let w = _mm256_loadu_si256(words.as_ptr().cast());
            _mm256_storeu_si256(out.as_mut_ptr().cast(), _mm256_and_si256(keep, w));
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
        // PERF: one load from an 8 KiB table instead of a broadcast, an and and a compare.
        unsafe {
            let keep = LANE_MASKS[(mask & 0xFF) as usize];
            _mm256_and_ps(_mm256_loadu_ps(keep.as_ptr().cast()), v)
        }
    }
    #[inline(always)]
    fn fisher_quotients(
        self,
        num: &[f64; 16],
        den: &[f64; 16],
        plain: &[f64; 16],
        weight_sum: f64,
    ) -> [f32; 16] {
        // PERF: one division per lane, its operands selected first (V4's form, 4 lanes at a
        // time).
        let mut out = [0.0f32; 16];
        unsafe {
            let weight_sum = _mm256_set1_pd(weight_sum);
            for quarter in 0..4 {
                let at = quarter * 4;
                let den_v = _mm256_loadu_pd(den[at..].as_ptr());
                // `den <= 0`, ordered: false for NaN, which keeps the weighted quotient.
                let unweighted = _mm256_cmp_pd::<_CMP_LE_OQ>(den_v, _mm256_setzero_pd());
                let dividend = _mm256_blendv_pd(
                    _mm256_loadu_pd(num[at..].as_ptr()),
                    _mm256_loadu_pd(plain[at..].as_ptr()),
                    unweighted,
                );
                let divisor = _mm256_blendv_pd(den_v, weight_sum, unweighted);
                let quotient = _mm256_cvtpd_ps(_mm256_div_pd(dividend, divisor));
                _mm_storeu_ps(out[at..].as_mut_ptr(), quotient);
            }
        }
        out
    }
    #[inline(always)]
    fn philox_u24_at_least(self, first_block: u64, key: [u32; 2], threshold: u32) -> u64 {
        use kernels_core::backend::{PHILOX_MUL, PHILOX_ROUNDS, PHILOX_WEYL};
        // PERF: a block's four words live in two 64-bit lanes, `(c0, c1)` in `a` and `(c2, c3)`
        // in `b`, so `vpmuludq` multiplies each lane's low word and leaves the product's low word
        // where the next round wants it in the high half; one in-lane swap then puts the high word
        // low. Two registers per 4 blocks let all 16 blocks run interleaved without spills (the
        // multiplies' latency is the bound otherwise), and the words come out in element order.
        const SETS: usize = 4;
        unsafe {
            // Lanes hold blocks 0, 2, 1, 3 of each set: unpacking then gives element order.
            let first = _mm256_add_epi64(
                _mm256_set1_epi64x(first_block as i64),
                _mm256_setr_epi64x(0, 2, 1, 3),
            );
            let mut a = [first; SETS];
            for (set, a) in a.iter_mut().enumerate() {
                *a = _mm256_add_epi64(first, _mm256_set1_epi64x(4 * set as i64));
            }
            let m0 = _mm256_set1_epi64x(i64::from(PHILOX_MUL[0]));
            let m1 = _mm256_set1_epi64x(i64::from(PHILOX_MUL[1]));
            let mut k0 = _mm256_set1_epi64x(i64::from(key[0]));
            let mut k1 = _mm256_set1_epi64x(i64::from(key[1]));
            // Round 0 multiplies `c2 = 0`: (c1 ^ k0, 0) and (hi0 ^ k1, lo0).
            let mut b = [first; SETS];
            for set in 0..SETS {
                let product0 = _mm256_mul_epu32(a[set], m0);
                a[set] = _mm256_xor_si256(_mm256_srli_epi64::<32>(a[set]), k0);
                b[set] = _mm256_xor_si256(_mm256_shuffle_epi32::<0b1011_0001>(product0), k1);
            }
            for _ in 1..PHILOX_ROUNDS {
                // The key's high halves stay zero: the Weyl increments wrap in the low words.
                k0 = _mm256_add_epi32(k0, _mm256_set1_epi64x(i64::from(PHILOX_WEYL[0])));
                k1 = _mm256_add_epi32(k1, _mm256_set1_epi64x(i64::from(PHILOX_WEYL[1])));
                for set in 0..SETS {
                    let product0 = _mm256_mul_epu32(a[set], m0);
                    let product1 = _mm256_mul_epu32(b[set], m1);
                    // (hi1 ^ c1 ^ k0, lo1) and (hi0 ^ c3 ^ k1, lo0).
                    a[set] = _mm256_xor_si256(
                        _mm256_shuffle_epi32::<0b1011_0001>(product1),
                        _mm256_xor_si256(_mm256_srli_epi64::<32>(a[set]), k0),
                    );
                    b[set] = _mm256_xor_si256(
                        _mm256_shuffle_epi32::<0b1011_0001>(product0),
                        _mm256_xor_si256(_mm256_srli_epi64::<32>(b[set]), k1),
                    );
                }
            }
            // Draws and threshold are below 2^24 + 1: a signed compare is exact.
            let below = _mm256_set1_epi32(threshold as i32 - 1);
            let mut bits = 0;
            for set in 0..SETS {
                // Elements 16 set .. 16 set + 8, then the next 8.
                let words = [
                    _mm256_unpacklo_epi64(a[set], b[set]),
                    _mm256_unpackhi_epi64(a[set], b[set]),
                ];
                for (half, words) in words.into_iter().enumerate() {
                    let keep = _mm256_cmpgt_epi32(_mm256_srli_epi32::<8>(words), below);
                    let keep = _mm256_movemask_ps(_mm256_castsi256_ps(keep)) as u8;
                    bits |= u64::from(keep) << (16 * set + 8 * half);
                }
            }
            bits
        }
    }
    #[inline(always)]
    fn clamp(self, v: __m256, lo: f32, hi: f32) -> __m256 {
        // min and max return their second operand when either is NaN.
        unsafe { _mm256_max_ps(_mm256_set1_ps(lo), _mm256_min_ps(_mm256_set1_ps(hi), v)) }
    }
    #[inline(always)]
    fn pow2i(self, n: __m256) -> __m256 {
        unsafe {
            let biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased))
        }
    }
    #[inline(always)]
    fn div(self, a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_div_ps(a, b) }
    }
    #[inline(always)]
    fn mul_f64_rounded(self, v: __m256, scale: f64) -> __m256 {
        // PERF: in registers; through an array, the halves' 16-byte stores could not be
        // forwarded to the 32-byte load that follows.
        unsafe {
            let scale = _mm256_set1_pd(scale);
            let low = _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), scale);
            let high = _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)), scale);
            _mm256_set_m128(_mm256_cvtpd_ps(high), _mm256_cvtpd_ps(low))
        }
    }
    #[inline(always)]
    fn prefetch_l2<T>(self, at: &T) {
        // SAFETY: prefetch is a hint; it never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(core::ptr::from_ref(at).cast()) }
    }
    #[inline(always)]
    fn store_streaming(self, v: __m256, out: &mut [f32]) {
        assert_eq!(out.len(), 8);
        // PERF: both halves of a line stream (a line written half non-temporally and half through
        // the cache ran 28x slower than plain stores on Zen 4): every 32-byte boundary, not 64.
        if out.as_ptr().addr().is_multiple_of(32) {
            // SAFETY: 8 writable f32 on a 32-byte boundary (`vmovntps` faults off one).
            unsafe { _mm256_stream_ps(out.as_mut_ptr(), v) }
        } else {
            self.store(v, out);
        }
    }
    #[inline(always)]
    fn stream_fence(self) {
        // SAFETY: a fence has no operands.
        unsafe { _mm_sfence() }
    }
}

/// `LANE_MASKS[m]` has all bits set in lane `j` iff bit `j` of `m` is set.
static LANE_MASKS: [[u32; 8]; 256] = {
    let mut table = [[0; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let mut j = 0;
        while j < 8 {
            if m >> j & 1 == 1 {
                table[m][j] = u32::MAX;
            }
            j += 1;
        }
        m += 1;
    }
    table
};

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
