//! AVX-512F and BW ("x86-64-v4" without the extensions we do not need), 512-bit vectors.

#[allow(clippy::wildcard_imports)]
use core::arch::x86_64::*;

use super::{
    Element, Isa, KEY_MAGNITUDE, KeyMasks, LARGEST_FINITE_KEY, Simd, SimdKernels, WordBounds,
    bits16, bits16_mut,
};
use kernels_core::DType;

/// AVX-512F and BW (with V3), 16 lanes.
#[derive(Clone, Copy, Debug)]
pub struct V4(());

impl V4 {
    /// # Safety
    /// The CPU must support AVX-512F, AVX-512BW and the x86-64-v3 features ([`super::V3`]).
    #[inline(always)]
    pub(crate) unsafe fn new_unchecked() -> Self {
        Self(())
    }
}

impl Simd for V4 {
    const ISA: Isa = Isa::Avx512;
    const LANES: usize = 16;

    #[inline(always)]
    fn zero(self) -> __m512 {
        // SAFETY (all methods): a V4 token exists only where AVX-512F and BW do.
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
                DType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(bits16(chunk).as_ptr().cast())),
                DType::BF16 => {
                    let wide =
                        _mm512_cvtepu16_epi32(_mm256_loadu_si256(bits16(chunk).as_ptr().cast()));
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
                    let nan = _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x7F80_0000));
                    // Round to nearest even: add 0x7FFF plus the lowest kept bit.
                    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
                    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
                        bits,
                        _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)),
                    ));
                    // NaN: the high half with the quiet bit set, as `half` does.
                    let quiet =
                        _mm512_or_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x0040));
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
}

impl SimdKernels for V4 {
    type F32 = __m512;
    const REGISTERS: usize = 32;

    #[inline(always)]
    fn classify_keys(self, v: __m512, lo: u32, hi: u32) -> KeyMasks {
        unsafe {
            let key = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(KEY_MAGNITUDE));
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
    const WORD_KEYS: bool = true;
    #[inline(always)]
    fn classify_words(self, words: &[u16], bounds: WordBounds) -> KeyMasks {
        assert_eq!(words.len(), 32);
        // SAFETY: 32 readable words.
        unsafe {
            let w = _mm512_loadu_si512(words.as_ptr().cast());
            // Keys fit 15 bits, so signed 16-bit order is key order.
            let key = _mm512_and_si512(w, _mm512_set1_epi16(0x7FFF));
            let bound = |b: u16| _mm512_set1_epi16(b as i16);
            let below = _mm512_cmplt_epi16_mask(key, bound(bounds.lo));
            let above = _mm512_cmpgt_epi16_mask(key, bound(bounds.hi));
            KeyMasks {
                below,
                within: !(below | above),
                above,
                non_finite: _mm512_cmpge_epi16_mask(key, bound(bounds.non_finite)),
                negative: _mm512_movepi16_mask(w),
            }
        }
    }
    #[inline(always)]
    fn keep_words(self, mask: u32, words: &[u16], out: &mut [u16]) {
        assert!(words.len() == 32 && out.len() == 32);
        // SAFETY: 32 readable and 32 writable words.
        unsafe {
            let w = _mm512_loadu_si512(words.as_ptr().cast());
            _mm512_storeu_si512(out.as_mut_ptr().cast(), _mm512_maskz_mov_epi16(mask, w));
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
    fn fisher_quotients(
        self,
        num: &[f64; 16],
        den: &[f64; 16],
        plain: &[f64; 16],
        weight_sum: f64,
    ) -> [f32; 16] {
        // PERF: one division per lane, its operands selected first: `vdivpd` on 8 lanes issues
        // every 16 cycles on Intel, and the compiler's own form of the twin divided both ways
        // and spilled the sums to the stack.
        let mut out = [0.0f32; 16];
        unsafe {
            let weight_sum = _mm512_set1_pd(weight_sum);
            for half in 0..2 {
                let at = half * 8;
                let den_v = _mm512_loadu_pd(den[at..].as_ptr());
                // `den <= 0`, ordered: false for NaN, which keeps the weighted quotient.
                let unweighted = _mm512_cmp_pd_mask::<_CMP_LE_OQ>(den_v, _mm512_setzero_pd());
                let dividend = _mm512_mask_blend_pd(
                    unweighted,
                    _mm512_loadu_pd(num[at..].as_ptr()),
                    _mm512_loadu_pd(plain[at..].as_ptr()),
                );
                let divisor = _mm512_mask_blend_pd(unweighted, den_v, weight_sum);
                let quotient = _mm512_cvtpd_ps(_mm512_div_pd(dividend, divisor));
                _mm256_storeu_ps(out[at..].as_mut_ptr(), quotient);
            }
        }
        out
    }
    #[inline(always)]
    fn philox_u24_at_least(self, first_block: u64, key: [u32; 2], threshold: u32) -> u64 {
        use kernels_core::backend::{PHILOX_MUL, PHILOX_ROUNDS, PHILOX_WEYL};
        // PERF: V3's layout (a block's words `(c0, c1)` in one 64-bit lane of `a`, `(c2, c3)` in
        // `b`; `vpmuludq` multiplies the low words), with one masked `vpternlogd` per register
        // and round: it xors the old high word and the key into the product's high word only,
        // so one rotate by 32 finishes the round (V3 needs a shift, a swap and two xors). A
        // rotate, not `vpshufd`: LLVM merges that shuffle and the masked `vpternlogd` into a
        // slower `vpermt2d`. Eight registers for the 16 blocks, all in flight to hide the
        // multiplies' latency.
        const SETS: usize = 2;
        const HIGH_WORDS: __mmask16 = 0xAAAA;
        const SWAP: _MM_PERM_ENUM = 0b1011_0001;
        unsafe {
            // Lanes hold blocks 0, 4, 1, 5, 2, 6, 3, 7 of each set: each 128-bit lane of the
            // unpacks then holds one block, in element order.
            let first = _mm512_add_epi64(
                _mm512_set1_epi64(first_block as i64),
                _mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7),
            );
            let mut a = [first; SETS];
            for (set, a) in a.iter_mut().enumerate() {
                *a = _mm512_add_epi64(first, _mm512_set1_epi64(8 * set as i64));
            }
            let m0 = _mm512_set1_epi64(i64::from(PHILOX_MUL[0]));
            let m1 = _mm512_set1_epi64(i64::from(PHILOX_MUL[1]));
            // PERF: each round's key broadcast from a table (a load), no vector adds in the rounds.
            let keys: [[u32; 2]; PHILOX_ROUNDS] = core::array::from_fn(|round| {
                core::array::from_fn(|word| {
                    key[word].wrapping_add((round as u32).wrapping_mul(PHILOX_WEYL[word]))
                })
            });
            let (k0, k1) = (
                _mm512_set1_epi32(keys[0][0] as i32),
                _mm512_set1_epi32(keys[0][1] as i32),
            );
            // Round 0 multiplies `c2 = 0`: (c1 ^ k0, 0) and (hi0 ^ k1, lo0).
            let mut b = [first; SETS];
            for set in 0..SETS {
                let product0 = _mm512_mul_epu32(a[set], m0);
                a[set] = _mm512_maskz_xor_epi32(!HIGH_WORDS, _mm512_srli_epi64::<32>(a[set]), k0);
                b[set] = _mm512_shuffle_epi32::<SWAP>(_mm512_mask_xor_epi32(
                    product0, HIGH_WORDS, product0, k1,
                ));
            }
            for key in &keys[1..] {
                let (k0, k1) = (
                    _mm512_set1_epi32(key[0] as i32),
                    _mm512_set1_epi32(key[1] as i32),
                );
                for set in 0..SETS {
                    let product0 = _mm512_mul_epu32(a[set], m0);
                    let product1 = _mm512_mul_epu32(b[set], m1);
                    // 0x96: a ^ b ^ c. High words (hi1 ^ c1 ^ k0, hi0 ^ c3 ^ k1), low words the
                    // products' (lo1, lo0); swapped, the new (c0, c1) and (c2, c3).
                    a[set] = _mm512_ror_epi64::<32>(_mm512_mask_ternarylogic_epi32::<0x96>(
                        product1, HIGH_WORDS, a[set], k0,
                    ));
                    b[set] = _mm512_ror_epi64::<32>(_mm512_mask_ternarylogic_epi32::<0x96>(
                        product0, HIGH_WORDS, b[set], k1,
                    ));
                }
            }
            let threshold = _mm512_set1_epi32(threshold as i32);
            let mut bits = 0;
            for set in 0..SETS {
                // Elements 32 set .. 32 set + 16, then the next 16.
                let words = [
                    _mm512_unpacklo_epi64(a[set], b[set]),
                    _mm512_unpackhi_epi64(a[set], b[set]),
                ];
                for (half, words) in words.into_iter().enumerate() {
                    let keep = _mm512_cmpge_epu32_mask(_mm512_srli_epi32::<8>(words), threshold);
                    bits |= u64::from(keep) << (32 * set + 16 * half);
                }
            }
            bits
        }
    }
    #[inline(always)]
    fn clamp(self, v: __m512, lo: f32, hi: f32) -> __m512 {
        // min and max return their second operand when either is NaN.
        unsafe { _mm512_max_ps(_mm512_set1_ps(lo), _mm512_min_ps(_mm512_set1_ps(hi), v)) }
    }
    #[inline(always)]
    fn pow2i(self, n: __m512) -> __m512 {
        unsafe {
            let biased = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(biased))
        }
    }
    #[inline(always)]
    fn div(self, a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_div_ps(a, b) }
    }
    #[inline(always)]
    fn mul_f64_rounded(self, v: __m512, scale: f64) -> __m512 {
        unsafe {
            let low = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
            let high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(v),
            )));
            let scale = _mm512_set1_pd(scale);
            let low = _mm512_cvtpd_ps(_mm512_mul_pd(low, scale));
            let high = _mm512_cvtpd_ps(_mm512_mul_pd(high, scale));
            _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                _mm512_castpd256_pd512(_mm256_castps_pd(low)),
                _mm256_castps_pd(high),
            ))
        }
    }
    #[inline(always)]
    fn prefetch_l2<T>(self, at: &T) {
        // SAFETY: prefetch is a hint; it never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(core::ptr::from_ref(at).cast()) }
    }
    #[inline(always)]
    fn store_streaming(self, v: __m512, out: &mut [f32]) {
        assert_eq!(out.len(), 16);
        if out.as_ptr().addr().is_multiple_of(super::STREAM_ALIGN) {
            // SAFETY: 16 writable f32 on a 64-byte boundary (`vmovntps` faults off one).
            unsafe { _mm512_stream_ps(out.as_mut_ptr(), v) }
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
