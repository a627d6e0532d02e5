//! AArch64 Advanced SIMD, 128-bit vectors.

#[allow(clippy::wildcard_imports)]
use core::arch::aarch64::*;

use super::{
    Element, Isa, KEY_MAGNITUDE, KeyMasks, LARGEST_FINITE_KEY, Simd, SimdKernels, bits16, widen,
};
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
}

impl SimdKernels for Neon {
    type F32 = float32x4_t;
    const REGISTERS: usize = 32;

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
    #[inline(always)]
    fn clamp(self, v: float32x4_t, lo: f32, hi: f32) -> float32x4_t {
        // NEON's min and max return NaN when either operand is.
        unsafe { vmaxq_f32(vdupq_n_f32(lo), vminq_f32(vdupq_n_f32(hi), v)) }
    }
    #[inline(always)]
    fn pow2i(self, n: float32x4_t) -> float32x4_t {
        unsafe {
            let biased = vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127));
            vreinterpretq_f32_s32(vshlq_n_s32::<23>(biased))
        }
    }
    #[inline(always)]
    fn div(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        unsafe { vdivq_f32(a, b) }
    }
    #[inline(always)]
    fn mul_f64_rounded(self, v: float32x4_t, scale: f64) -> float32x4_t {
        unsafe {
            let scale = vdupq_n_f64(scale);
            let low = vmulq_f64(vcvt_f64_f32(vget_low_f32(v)), scale);
            let high = vmulq_f64(vcvt_high_f64_f32(v), scale);
            vcvt_high_f32_f64(vcvt_f32_f64(low), high)
        }
    }
    #[inline(always)]
    fn store_streaming(self, v: float32x4_t, out: &mut [f32]) {
        self.store(v, out);
    }
}
