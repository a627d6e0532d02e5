//! WebAssembly SIMD, 128-bit vectors.

#[allow(clippy::wildcard_imports)]
use core::arch::wasm32::*;

use super::{
    Element, Isa, KEY_MAGNITUDE, KeyMasks, LARGEST_FINITE_KEY, Simd, SimdKernels, bits16, widen,
};
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
}

impl SimdKernels for Simd128 {
    type F32 = v128;
    const REGISTERS: usize = 16;

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
        let lane = |j: u32| ((codes >> (2 * j)) & 1) as f32 - ((codes >> (2 * j + 1)) & 1) as f32;
        f32x4(lane(0), lane(1), lane(2), lane(3))
    }
    #[inline(always)]
    fn keep_lanes(self, mask: u32, v: v128) -> v128 {
        let lane = |j: u32| if (mask >> j) & 1 == 1 { -1i32 } else { 0 };
        v128_and(i32x4(lane(0), lane(1), lane(2), lane(3)), v)
    }
    #[inline(always)]
    fn clamp(self, v: v128, lo: f32, hi: f32) -> v128 {
        // WebAssembly's min and max return NaN when either operand is.
        f32x4_max(f32x4_splat(lo), f32x4_min(f32x4_splat(hi), v))
    }
    #[inline(always)]
    fn pow2i(self, n: v128) -> v128 {
        let biased = i32x4_add(i32x4_trunc_sat_f32x4(n), i32x4_splat(127));
        i32x4_shl(biased, 23)
    }
    #[inline(always)]
    fn div(self, a: v128, b: v128) -> v128 {
        f32x4_div(a, b)
    }
    #[inline(always)]
    fn mul_f64_rounded(self, v: v128, scale: f64) -> v128 {
        let scale = f64x2_splat(scale);
        let low = f64x2_mul(f64x2_promote_low_f32x4(v), scale);
        let high = f64x2_mul(f64x2_promote_low_f32x4(i64x2_shuffle::<1, 1>(v, v)), scale);
        i64x2_shuffle::<0, 2>(f32x4_demote_f64x2_zero(low), f32x4_demote_f64x2_zero(high))
    }
    #[inline(always)]
    fn store_streaming(self, v: v128, out: &mut [f32]) {
        self.store(v, out);
    }
}
