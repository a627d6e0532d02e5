//! Element types: what weights and vectors are stored as.

use half::{bf16, f16};

/// A storage element: `f32`, [`half::f16`] or [`half::bf16`].
///
/// Arithmetic always happens in `f32` (references: `f64`): an element is widened losslessly on
/// load with [`Element::to_f32`] and narrowed with round-to-nearest-even on store with
/// [`Element::from_f32`]. Every element is [`bytemuck::Pod`], so a slice of them casts to bytes
/// for a GPU upload or a file without copying.
///
/// The trait is sealed: backends rely on `DTYPE` naming the actual layout of the type.
pub trait Element:
    sealed::Sealed
    + Copy
    + Default
    + PartialEq
    + core::fmt::Debug
    + bytemuck::Pod
    + Send
    + Sync
    + 'static
{
    /// The tag of this type, for headers, pipeline keys and messages.
    const DTYPE: DType;
    /// Lossless widening.
    fn to_f32(self) -> f32;
    /// Narrowing with round-to-nearest-even (overflow goes to infinity, as IEEE 754 says).
    fn from_f32(value: f32) -> Self;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A real number the references can widen to `f64`: every [`Element`], and `f64` itself (so the
/// linear-algebra references also take exact `f64` test matrices).
pub trait Real: Copy + Default + core::fmt::Debug + Send + Sync + 'static {
    /// Widening to `f64` (exact for every implementor).
    fn to_f64(self) -> f64;
}

impl<T: Element> Real for T {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self.to_f32())
    }
}

impl Real for f64 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
}

/// The element types of the family, as a runtime tag.
///
/// ```
/// use kernels_core::{DType, Element, bf16};
/// assert_eq!(bf16::DTYPE, DType::BF16);
/// assert_eq!((DType::BF16.name(), DType::BF16.size_bytes()), ("bf16", 2));
/// // One rounding to bf16 errs by at most its unit roundoff, relatively.
/// let x = 1.0f32 / 3.0;
/// let rounded = bf16::from_f32(x).to_f32();
/// assert!((rounded - x).abs() <= DType::BF16.unit_roundoff() * x);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16: the top half of a binary32.
    BF16,
}

impl DType {
    /// Size of one element in bytes.
    #[must_use]
    pub const fn size_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    /// Unit roundoff of the type (half its machine epsilon): the relative error of one rounding.
    #[must_use]
    pub const fn unit_roundoff(self) -> f32 {
        match self {
            Self::F32 => f32::EPSILON / 2.0,
            Self::F16 => 4.882_812_5e-4,
            Self::BF16 => 3.90625e-3,
        }
    }

    /// Lower-case name, as in safetensors headers (`"f32"`, `"f16"`, `"bf16"`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        }
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        value
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        f16::from_f32(value)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        bf16::from_f32(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip_is_lossless<T: Element>(bits: impl Iterator<Item = T>) {
        for x in bits {
            let back = T::from_f32(x.to_f32());
            // NaN payloads need not survive; every other value must.
            if x.to_f32().is_nan() {
                assert!(back.to_f32().is_nan());
            } else {
                assert_eq!(back, x, "{x:?} did not survive widening and narrowing");
            }
        }
    }

    #[test]
    fn widening_is_lossless_for_every_half_value() {
        round_trip_is_lossless((0..=u16::MAX).map(f16::from_bits));
        round_trip_is_lossless((0..=u16::MAX).map(bf16::from_bits));
    }

    #[test]
    fn narrowing_rounds_to_nearest_even() {
        // 1 + 2^-11 is halfway between two f16 neighbours of 1; ties go to the even one (1.0).
        assert_eq!(f16::from_f32(1.0 + 2f32.powi(-11)).to_f32(), 1.0);
        assert_eq!(
            f16::from_f32(1.0 + 3.0 * 2f32.powi(-11)).to_f32(),
            1.0 + 2f32.powi(-9)
        );
        assert_eq!(bf16::from_f32(1.0 + 2f32.powi(-8)).to_f32(), 1.0);
        assert_eq!(<f16 as Element>::from_f32(1e6).to_f32(), f32::INFINITY);
    }

    #[test]
    fn unit_roundoff_bounds_one_rounding() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let u = dtype.unit_roundoff();
            let x = 1.337_f32;
            let rounded = match dtype {
                DType::F32 => x,
                DType::F16 => f16::from_f32(x).to_f32(),
                DType::BF16 => bf16::from_f32(x).to_f32(),
            };
            assert!(((rounded - x) / x).abs() <= u, "{dtype:?}");
        }
    }
}
