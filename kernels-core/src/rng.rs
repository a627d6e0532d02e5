//! The counter-based random generator shared by every backend (Philox4x32-10).
//!
//! Element `i` of a tensor draws word `i % 4` of the Philox block `i / 4` under a key made from
//! the seed. The draw depends on `(seed, i)` alone, so the CPU, the GPU and any chunking or
//! threading of a tensor draw the same numbers: a DARE mask is a pure function of its seed.
//! Philox uses only 32-bit multiplies, adds and xors, so WGSL (which has no 64-bit integers)
//! computes it bit for bit.

/// Philox4x32's round multipliers (for backends that write the rounds themselves: SIMD, WGSL).
pub const PHILOX_MUL: [u32; 2] = [0xD251_1F53, 0xCD9E_8D57];
/// Philox4x32's key increments per round (the Weyl sequence).
pub const PHILOX_WEYL: [u32; 2] = [0x9E37_79B9, 0xBB67_AE85];
/// Rounds of Philox4x32-10.
pub const PHILOX_ROUNDS: usize = 10;
const MUL_0: u32 = PHILOX_MUL[0];
const MUL_1: u32 = PHILOX_MUL[1];
const WEYL_0: u32 = PHILOX_WEYL[0];
const WEYL_1: u32 = PHILOX_WEYL[1];
const ROUNDS: usize = PHILOX_ROUNDS;

/// Number of random words one Philox block yields.
pub const WORDS_PER_BLOCK: u64 = 4;

/// Philox4x32-10 keyed by a 64-bit seed.
///
/// ```
/// use kernels_core::CounterRng;
/// let rng = CounterRng::new(42);
/// assert_eq!(rng.key(), [42, 0]);
/// // Element i reads word i % 4 of block i / 4, whatever order or chunking asks for it.
/// assert_eq!(rng.u32_at(6), rng.block(1)[2]);
/// let mut words = [0u32; 3];
/// rng.fill_u32(5, &mut words);
/// assert_eq!(words, [rng.u32_at(5), rng.u32_at(6), rng.u32_at(7)]);
/// assert_eq!(rng.u24_at(6), rng.u32_at(6) >> 8);
/// assert!((0.0..1.0).contains(&rng.uniform_at(6)));
/// assert!(rng.normal_at(6).is_finite());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterRng {
    key: [u32; 2],
}

#[inline(always)]
fn mul_hi_lo(a: u32, b: u32) -> (u32, u32) {
    let product = u64::from(a) * u64::from(b);
    ((product >> 32) as u32, product as u32)
}

/// The raw Philox4x32-10 bijection of `counter` under `key` (Salmon et al., SC'11).
///
/// ```
/// use kernels_core::philox4x32_10;
/// // Random123's known answer for a zero counter and key.
/// assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]);
/// ```
#[must_use]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    philox4x32_10_lanes(counter.map(|c| [c]), key).map(|[c]| c)
}

/// [`philox4x32_10`] of `L` counters at once: `counters[w][l]` is word `w` of counter `l`. Written
/// lane by lane so that a compiler vectorises it (fast backends call it inside their SIMD code).
#[inline(always)]
#[must_use]
pub fn philox4x32_10_lanes<const L: usize>(
    mut counters: [[u32; L]; 4],
    mut key: [u32; 2],
) -> [[u32; L]; 4] {
    for round in 0..ROUNDS {
        if round > 0 {
            key[0] = key[0].wrapping_add(WEYL_0);
            key[1] = key[1].wrapping_add(WEYL_1);
        }
        let [c0, c1, c2, c3] = counters;
        for l in 0..L {
            let (hi0, lo0) = mul_hi_lo(MUL_0, c0[l]);
            let (hi1, lo1) = mul_hi_lo(MUL_1, c2[l]);
            counters[0][l] = hi1 ^ c1[l] ^ key[0];
            counters[1][l] = lo1;
            counters[2][l] = hi0 ^ c3[l] ^ key[1];
            counters[3][l] = lo0;
        }
    }
    counters
}

impl CounterRng {
    /// The key the seed makes.
    #[must_use]
    pub const fn key(&self) -> [u32; 2] {
        self.key
    }

    /// The generator for `seed`.
    #[must_use]
    pub const fn new(seed: u64) -> Self {
        Self {
            key: [seed as u32, (seed >> 32) as u32],
        }
    }

    /// The four words of block `block`.
    #[must_use]
    pub fn block(&self, block: u64) -> [u32; 4] {
        philox4x32_10([block as u32, (block >> 32) as u32, 0, 0], self.key)
    }

    /// The random word of element `index`.
    #[must_use]
    pub fn u32_at(&self, index: u64) -> u32 {
        self.block(index / WORDS_PER_BLOCK)[(index % WORDS_PER_BLOCK) as usize]
    }

    /// The top 24 bits of the word of element `index`: a uniform integer in `[0, 2^24)`.
    /// Masks compare this integer against an integer threshold, so every backend agrees exactly.
    #[must_use]
    pub fn u24_at(&self, index: u64) -> u32 {
        self.u32_at(index) >> 8
    }

    /// A uniform `f32` in `[0, 1)` for element `index` (a multiple of 2^-24, exact in `f32`).
    #[must_use]
    pub fn uniform_at(&self, index: u64) -> f32 {
        self.u24_at(index) as f32 * (1.0 / 16_777_216.0)
    }

    /// Fills `out` with the words of elements `first, first + 1, ...`.
    pub fn fill_u32(&self, first: u64, out: &mut [u32]) {
        for (offset, word) in out.iter_mut().enumerate() {
            *word = self.u32_at(first + offset as u64);
        }
    }

    /// A standard normal `f64` for element `index`, by Box-Muller over the element's block.
    ///
    /// Used to draw sketch matrices; not bit-identical across backends (it goes through `ln`, `cos`).
    #[must_use]
    pub fn normal_at(&self, index: u64) -> f64 {
        let [a, b, c, d] = self.block(index);
        // Two 53-bit uniforms per block; u1 in (0, 1] keeps ln finite.
        let u1 = ((u64::from(a) << 21) ^ u64::from(b)) & ((1 << 53) - 1);
        let u2 = ((u64::from(c) << 21) ^ u64::from(d)) & ((1 << 53) - 1);
        let u1 = (u1 as f64 + 1.0) / 9_007_199_254_740_992.0;
        let u2 = u2 as f64 / 9_007_199_254_740_992.0;
        libm::sqrt(-2.0 * libm::log(u1)) * libm::cos(core::f64::consts::TAU * u2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known-answer vectors of Random123 (kat_vectors, philox4x32_10).
    #[test]
    fn philox_matches_random123_known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn draws_do_not_depend_on_chunking() {
        let rng = CounterRng::new(0xDEAD_BEEF_1234);
        let mut whole = [0u32; 37];
        rng.fill_u32(100, &mut whole);
        let mut pieces = [0u32; 37];
        let (a, b) = pieces.split_at_mut(5);
        rng.fill_u32(100, a);
        rng.fill_u32(105, b);
        assert_eq!(whole, pieces);
        assert_ne!(CounterRng::new(1).u32_at(7), CounterRng::new(2).u32_at(7));
    }

    #[test]
    fn uniforms_are_uniform_enough() {
        let rng = CounterRng::new(42);
        let n = 100_000u64;
        let mean = (0..n).map(|i| f64::from(rng.uniform_at(i))).sum::<f64>() / n as f64;
        // Standard error of the mean of U(0,1) is 1/sqrt(12 n) ~ 0.0009; allow 5 sigma.
        assert!((mean - 0.5).abs() < 0.0046, "mean {mean}");
        let normals: f64 = (0..n).map(|i| rng.normal_at(i).powi(2)).sum::<f64>() / n as f64;
        assert!((normals - 1.0).abs() < 0.03, "second moment {normals}");
    }
}
