//! Instruction sets, detected once.

use core::sync::atomic::{AtomicU8, Ordering};

/// An instruction set a kernel can run on, best first in [`Isa::ALL`].
///
/// ```
/// use kernels_cpu::Isa;
/// // Scalar code runs everywhere, and is the last available set.
/// assert!(Isa::Scalar.is_available());
/// assert_eq!(Isa::available().last(), Some(Isa::Scalar));
/// let best = Isa::best();
/// assert!(Isa::ALL.contains(&best) && best.is_available());
/// println!("{} ({} f32 lanes)", best.name(), best.f32_lanes());
/// assert_eq!(Isa::Avx2.f32_lanes(), 8);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Isa {
    /// x86-64 AVX-512F and AVX-512BW, with the x86-64-v3 features below (512-bit vectors).
    Avx512,
    /// x86-64 AVX2 with FMA, F16C, POPCNT, BMI1/2 and LZCNT (256-bit vectors; "x86-64-v3").
    Avx2,
    /// AArch64 Advanced SIMD (128-bit vectors).
    Neon,
    /// WebAssembly SIMD (128-bit vectors), chosen at compile time with `-C target-feature=+simd128`.
    Simd128,
    /// Portable scalar code: runs everywhere.
    Scalar,
}

impl Isa {
    /// Every instruction set, best first (a slice: the enum may grow).
    pub const ALL: &'static [Self] = &[
        Self::Avx512,
        Self::Avx2,
        Self::Neon,
        Self::Simd128,
        Self::Scalar,
    ];

    /// Short lower-case name (`"avx512"`, `"avx2"`, `"neon"`, `"simd128"`, `"scalar"`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "avx512",
            Self::Avx2 => "avx2",
            Self::Neon => "neon",
            Self::Simd128 => "simd128",
            Self::Scalar => "scalar",
        }
    }

    /// `f32` lanes of one vector.
    #[must_use]
    pub const fn f32_lanes(self) -> usize {
        match self {
            Self::Avx512 => 16,
            Self::Avx2 => 8,
            Self::Neon | Self::Simd128 => 4,
            Self::Scalar => 1,
        }
    }

    /// Whether this CPU (or, for wasm, this build) can run it. Detected once, then cached.
    #[must_use]
    pub fn is_available(self) -> bool {
        available_mask() & (1 << self as u8) != 0
    }

    /// The best available instruction set.
    #[must_use]
    pub fn best() -> Self {
        Self::available().next().unwrap_or(Self::Scalar)
    }

    /// Every available instruction set, best first (always ends with [`Isa::Scalar`]).
    pub fn available() -> impl Iterator<Item = Self> {
        Self::ALL.iter().copied().filter(|isa| isa.is_available())
    }
}

impl core::fmt::Display for Isa {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

const UNDETECTED: u8 = 0;

static AVAILABLE: AtomicU8 = AtomicU8::new(UNDETECTED);

fn available_mask() -> u8 {
    match AVAILABLE.load(Ordering::Relaxed) {
        UNDETECTED => {
            // Scalar's bit is always set, so a detected mask is never UNDETECTED. Racing threads
            // compute the same value.
            let mask = detect();
            AVAILABLE.store(mask, Ordering::Relaxed);
            mask
        }
        mask => mask,
    }
}

fn detect() -> u8 {
    // Miri cannot run CPUID (inline assembly) nor the SIMD intrinsics: it sees the scalar path.
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    let x86 = x86::detect();
    #[cfg(any(not(target_arch = "x86_64"), miri))]
    let x86 = x86_absent();
    let bit = |isa: Isa, present: bool| u8::from(present) << isa as u8;
    bit(Isa::Scalar, true)
        | bit(Isa::Avx2, x86.avx2)
        | bit(Isa::Avx512, x86.avx512)
        | bit(
            Isa::Neon,
            cfg!(all(target_arch = "aarch64", target_feature = "neon")),
        )
        | bit(
            Isa::Simd128,
            cfg!(all(target_arch = "wasm32", target_feature = "simd128")),
        )
}

#[cfg(any(not(target_arch = "x86_64"), miri))]
struct X86Absent {
    avx2: bool,
    avx512: bool,
}

#[cfg(any(not(target_arch = "x86_64"), miri))]
const fn x86_absent() -> X86Absent {
    X86Absent {
        avx2: false,
        avx512: false,
    }
}

/// CPUID-based detection that needs no `std` (and so runs on bare metal and in kernels too).
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use core::arch::x86_64::{__cpuid_count, CpuidResult};

    /// CPUID leaf `leaf`, sub-leaf `sub`.
    // `__cpuid_count` is a safe function since Rust 1.94 and unsafe before it; the block keeps
    // the MSRV (1.89) building.
    #[allow(unused_unsafe)]
    fn cpuid(leaf: u32, sub: u32) -> CpuidResult {
        // SAFETY: every x86-64 CPU has CPUID; an unsupported leaf reads zeros or the highest one.
        unsafe { __cpuid_count(leaf, sub) }
    }

    /// What the kernels need, as detected.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) struct Features {
        /// AVX, AVX2, FMA, F16C, POPCNT, BMI1, BMI2 and LZCNT (x86-64-v3), with the OS saving
        /// YMM state.
        pub(crate) avx2: bool,
        /// All of the above plus AVX-512F and AVX-512BW, with the OS saving ZMM and opmask state.
        pub(crate) avx512: bool,
    }

    fn xgetbv0() -> u64 {
        let (lo, hi): (u32, u32);
        // SAFETY: only called after CPUID reported OSXSAVE, so XGETBV exists and is enabled.
        unsafe {
            core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
        }
        (u64::from(hi) << 32) | u64::from(lo)
    }

    pub(crate) fn detect() -> Features {
        let none = Features {
            avx2: false,
            avx512: false,
        };
        let (max_leaf, leaf1) = (cpuid(0, 0).eax, cpuid(1, 0));
        let bit = |reg: u32, n: u32| reg & (1 << n) != 0;
        let (osxsave, avx, fma, f16c) = (
            bit(leaf1.ecx, 27),
            bit(leaf1.ecx, 28),
            bit(leaf1.ecx, 12),
            bit(leaf1.ecx, 29),
        );
        if max_leaf < 7 || !osxsave {
            return none;
        }
        let xcr0 = xgetbv0();
        let ymm_state = xcr0 & 0b110 == 0b110;
        let zmm_state = xcr0 & 0b1110_0110 == 0b1110_0110;
        let leaf7 = cpuid(7, 0);
        let (avx2, avx512f, avx512bw) = (bit(leaf7.ebx, 5), bit(leaf7.ebx, 16), bit(leaf7.ebx, 30));
        // The scalar side of x86-64-v3: bit counts and scans in one instruction each.
        let (popcnt, bmi1, bmi2) = (bit(leaf1.ecx, 23), bit(leaf7.ebx, 3), bit(leaf7.ebx, 8));
        let lzcnt = cpuid(0x8000_0000, 0).eax >= 0x8000_0001 && bit(cpuid(0x8000_0001, 0).ecx, 5);
        let v3 = ymm_state && avx && avx2 && fma && f16c && popcnt && bmi1 && bmi2 && lzcnt;
        Features {
            avx2: v3,
            avx512: v3 && zmm_state && avx512f && avx512bw,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_is_always_available_and_best_is_available() {
        assert!(Isa::Scalar.is_available());
        assert!(Isa::best().is_available());
        assert_eq!(Isa::available().last(), Some(Isa::Scalar));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn cpuid_detection_agrees_with_std() {
        extern crate std;
        let f = x86::detect();
        let std_v3 = std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
            && std::is_x86_feature_detected!("popcnt")
            && std::is_x86_feature_detected!("bmi1")
            && std::is_x86_feature_detected!("bmi2")
            && std::is_x86_feature_detected!("lzcnt");
        assert_eq!(f.avx2, std_v3);
        assert_eq!(
            f.avx512,
            std_v3
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
        );
    }
}
