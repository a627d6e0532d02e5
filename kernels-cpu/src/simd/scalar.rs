//! Portable scalar code: one lane, runs everywhere.

use super::{Element, Isa, KEY_MAGNITUDE, KeyMasks, LARGEST_FINITE_KEY, Simd, SimdKernels, widen};

/// Portable scalar code, one lane.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scalar;

impl Simd for Scalar {
    const ISA: Isa = Isa::Scalar;
    const LANES: usize = 1;

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
}

impl SimdKernels for Scalar {
    type F32 = f32;
    const REGISTERS: usize = 16;

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
    #[inline(always)]
    fn clamp(self, v: f32, lo: f32, hi: f32) -> f32 {
        if v < lo {
            lo
        } else if v > hi {
            hi
        } else {
            v
        }
    }
    #[inline(always)]
    fn pow2i(self, n: f32) -> f32 {
        f32::from_bits(((n as i32 + 127) as u32) << 23)
    }
    #[inline(always)]
    fn div(self, a: f32, b: f32) -> f32 {
        a / b
    }
    #[inline(always)]
    fn mul_f64_rounded(self, v: f32, scale: f64) -> f32 {
        (f64::from(v) * scale) as f32
    }
    #[inline(always)]
    fn store_streaming(self, v: f32, out: &mut [f32]) {
        self.store(v, out);
    }
}
