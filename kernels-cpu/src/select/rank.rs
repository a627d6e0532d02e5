//! Finding the key of a rank: the sampled bracket, then the exact radix fallback; the cuts
//! that follow from it.

use alloc::vec::Vec;

use kernels_core::backend::{
    FIRST_NON_FINITE_BIN, HIGH_BINS, LOW_BINS, MagnitudeBracket, MagnitudeHistogram, high_bin,
    low_bin,
};
use kernels_core::ops::select::{TopKCut, magnitude_key};
use kernels_core::{Element, Error, Result};

use super::apply::RunBits;
use super::parts::{Parts, Piece, STREAMS, map_parts};
use super::{GROUP, INFINITY_KEY, PREFETCH_BYTES};
use crate::parallel::for_each;
use crate::simd::{KeyMasks, WordBounds, bits16, widened, word_keys};
use crate::{Cpu, Scalar, Simd, WithSimd};

/// Vectors shorter than this skip the sampled bracket (the exact radix select is as fast there).
pub(super) const SAMPLED_MIN: u64 = 1 << 16;
/// Runs of consecutive entries in the sample.
const MAX_SAMPLE_RUNS: usize = 4096;

/// Runs in the sample of a vector of `n` entries: about one entry in 16 up to
/// [`MAX_SAMPLE_RUNS`] runs (a quarter of a million keys), whose selection costs little next to
/// the pass over the data.
#[must_use]
fn sample_runs(n: u64) -> usize {
    usize::try_from(n / 1024).map_or(MAX_SAMPLE_RUNS, |r| r.clamp(64, MAX_SAMPLE_RUNS))
}
/// Entries per sample run: whole cache lines, so the sample costs few memory round trips.
pub(super) const SAMPLE_RUN: usize = 64;
/// Half-width of the bracket in standard deviations of the sample rank: the bracket misses (and
/// the exact fallback runs) with probability below 1e-3 on data in random order.
const BRACKET_SIGMAS: f64 = 3.5;

/// Independent pass-1 tables per thread. PERF: consecutive equal bins (common: task vectors
/// concentrate in a few hundred bins) would otherwise chain every increment through a
/// store-to-load forward; four tables of 128 KiB stay in L2.
const TABLES: usize = 4;

/// The keys of `v`'s lanes classified against each of `brackets` (`lo <= hi`).
#[inline(always)]
fn classify_all<S: Simd, const C: usize>(
    s: S,
    v: S::F32,
    brackets: &[(u32, u32); C],
) -> [KeyMasks; C] {
    let mut masks = [KeyMasks::default(); C];
    // PERF: a plain loop, not `array::from_fn`: a closure that is not inlined would run the
    // vector operations without the dispatched target features.
    for (m, &(lo, hi)) in masks.iter_mut().zip(brackets) {
        *m = s.classify_keys(v, lo, hi);
    }
    masks
}

/// The keys of `words` (`2 * LANES` 16-bit entries) classified against each of `bounds`.
#[inline(always)]
fn classify_words_all<S: Simd, const C: usize>(
    s: S,
    words: &[u16],
    bounds: &[WordBounds; C],
) -> [KeyMasks; C] {
    let mut masks = [KeyMasks::default(); C];
    // PERF: a plain loop, as in `classify_all`.
    for (m, &b) in masks.iter_mut().zip(bounds) {
        *m = s.classify_words(words, b);
    }
    masks
}

/// Calls `f(chunk, masks)` for each vector `chunk` of `data` (then each tail element) with its
/// keys classified against each of `brackets`.
#[inline(always)]
fn classify_each<S: Simd, T: Element, const C: usize>(
    s: S,
    data: &[T],
    brackets: &[(u32, u32); C],
    mut f: impl FnMut(&[T], &[KeyMasks; C]),
) {
    let main = data.len() - data.len() % S::LANES;
    let ahead = PREFETCH_BYTES / core::mem::size_of::<T>();
    let mut at = 0;
    while at < main {
        if let Some(v) = data.get(at + ahead) {
            s.prefetch(v);
        }
        let chunk = &data[at..at + S::LANES];
        f(chunk, &classify_all(s, s.load(chunk), brackets));
        at += S::LANES;
    }
    for (j, x) in data[main..].iter().enumerate() {
        let at = main + j;
        f(&data[at..=at], &classify_all(Scalar, x.to_f32(), brackets));
    }
}

/// [`classify_each`] in any order: `STREAMS` interleaved sub-ranges of `data` at once. A 16-bit
/// type whose words the instruction set classifies ([`word_keys`]) is classified `2 * LANES`
/// entries at a time without widening: `f` then sees masks of that many lanes.
#[inline(always)]
fn classify_unordered<S: Simd, T: Element, const C: usize>(
    s: S,
    data: &[T],
    brackets: &[(u32, u32); C],
    mut f: impl FnMut(&[T], &[KeyMasks; C]),
) {
    let words = word_keys::<S, T>().then(|| brackets.map(|(lo, hi)| WordBounds::of::<T>(lo, hi)));
    let width = if words.is_some() { 2 } else { 1 } * S::LANES;
    let len = data.len() / STREAMS / width * width;
    let ahead = PREFETCH_BYTES / core::mem::size_of::<T>();
    let mut at = 0;
    while at < len {
        for k in 0..STREAMS {
            let start = k * len + at;
            if let Some(v) = data.get(start + ahead) {
                s.prefetch(v);
            }
            let chunk = &data[start..start + width];
            let masks = match &words {
                Some(bounds) => classify_words_all(s, bits16(chunk), bounds),
                None => classify_all(s, s.load(chunk), brackets),
            };
            f(chunk, &masks);
        }
        at += width;
    }
    classify_each(s, &data[STREAMS * len..], brackets, f);
}

/// The key of rank `r` (1-based, ascending) and where its copies are.
pub(crate) struct RankKey {
    pub(crate) key: u32,
    /// Entries with a smaller key.
    below: u64,
    /// Entries equal to the key, per part.
    equal: Vec<u64>,
}

/// Pass 2 of the sampled select over one part, for one rank or several at once: counts below
/// each bracket's `lo`, copies the keys inside it (up to its `cap`).
pub(super) struct Collect<'a, T, const C: usize> {
    pub(super) pieces: &'a [Piece<'a, T>],
    pub(super) brackets: [Bracket; C],
}

/// What [`Collect`] found in one part for one bracket.
#[derive(Default)]
pub(super) struct Collected {
    pub(super) below: u64,
    pub(super) within: u64,
    /// The keys in `[lo, hi]`, unless more than the cap (then `overflow`).
    pub(super) keys: Vec<u32>,
    pub(super) non_finite: bool,
    pub(super) overflow: bool,
}

impl<T: Element, const C: usize> WithSimd for Collect<'_, T, C> {
    type Output = [Collected; C];

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> [Collected; C] {
        let mut found: [Collected; C] = core::array::from_fn(|_| Collected::default());
        let bounds = self.brackets.map(|b| (b.lo, b.hi));
        // PERF: the keys written into buffers reserved once, not zeroed (pages never written are
        // never touched), their counts and the other counts apart from `found` (whose buffers
        // the writes reach through a pointer). Pushed one by one onto a `Vec` with its length and
        // overflow flag in `found`, the cut of 1e8 f32 entries took 1.5x as long (24 against 16.5
        // ms on 2 threads); a growth check in this loop cost as much again. The reservation is
        // bounded by the part's own entries: a streamed chunk's cap is the whole model's.
        let entries: usize = self.pieces.iter().map(|p| p.data.len()).sum();
        for (out, bracket) in found.iter_mut().zip(&self.brackets) {
            out.keys = Vec::with_capacity(bracket.cap.min(entries) + GROUP);
        }
        let (mut below, mut within_total, mut filled) = ([0u64; C], [0u64; C], [0usize; C]);
        let mut non_finite = 0u32;
        for piece in self.pieces {
            classify_unordered(
                s,
                piece.data,
                &bounds,
                #[inline(always)]
                |chunk, masks| {
                    non_finite |= masks[0].non_finite;
                    for (c, m) in masks.iter().enumerate() {
                        below[c] += u64::from(m.below.count_ones());
                        within_total[c] += u64::from(m.within.count_ones());
                        // PERF: the bracket holds about 1 % of the entries; most vectors skip
                        // this.
                        // `filled <= min(cap, entries)`: a vector's keys fit the reservation.
                        if m.within != 0 && filled[c] <= self.brackets[c].cap {
                            let mut within = m.within;
                            while within != 0 {
                                let lane = within.trailing_zeros() as usize;
                                found[c].keys.spare_capacity_mut()[filled[c]]
                                    .write(magnitude_key(chunk[lane].to_f32()));
                                filled[c] += 1;
                                within &= within - 1;
                            }
                        }
                    }
                },
            );
        }
        for (c, out) in found.iter_mut().enumerate() {
            out.overflow = filled[c] > self.brackets[c].cap;
            // SAFETY: the first `filled[c]` entries of the reservation were written above (and
            // `filled[c]` is within it: the index checks passed).
            unsafe { out.keys.set_len(filled[c]) };
            (out.below, out.within, out.non_finite) = (below[c], within_total[c], non_finite != 0);
        }
        found
    }
}

/// A key interval expected to hold a rank, from a sample (step 1).
#[derive(Clone, Copy, Debug)]
pub(super) struct Bracket {
    pub(super) lo: u32,
    pub(super) hi: u32,
    /// Keys worth copying out: beyond this, the copy costs more than the exact fallback.
    pub(super) cap: usize,
}

impl Bracket {
    /// The bracket of `rank` (1-based, ascending) among `n` entries, from a sample of their keys.
    pub(super) fn from_sample(sample: &mut [u32], rank: u64, n: u64) -> Self {
        let s = sample.len() as f64;
        let q = rank as f64 / n as f64;
        let margin = BRACKET_SIGMAS * libm::sqrt(s * q * (1.0 - q)) + 2.0;
        let lo_at = libm::floor(q * s - margin);
        let hi_at = libm::ceil(q * s + margin);
        let lo = if lo_at < 0.0 {
            0
        } else {
            *sample.select_nth_unstable(lo_at as usize).1
        };
        let hi = if hi_at >= s {
            INFINITY_KEY
        } else {
            *sample.select_nth_unstable(hi_at as usize).1
        };
        // Twice the expected share of the entries, plus room; tied keys (16-bit types hold many
        // equal ones) can put more of the sample inside than the positions between the bounds.
        let inside = sample.iter().filter(|&&k| (lo..=hi).contains(&k)).count() as f64;
        let cap = (n as f64 * 2.0 * inside.max(hi_at - lo_at).max(1.0) / s) as usize + 4096;
        Self { lo, hi, cap }
    }
}

/// Steps 1 and 2 for several ranks at once (one pass over the data): for each, `None` if its
/// bracket missed (or held too much); the exact fallback follows.
fn sampled_ranks<T: Element, const C: usize>(
    cpu: &Cpu,
    parts: &Parts<'_, T>,
    ranks: [u64; C],
) -> Result<[Option<RankKey>; C]> {
    let n = parts.total;
    let runs = sample_runs(n) as u64;
    let mut sample: Vec<u32> = Vec::with_capacity(runs as usize * SAMPLE_RUN);
    for r in 0..runs {
        let flat = (u128::from(r) * u128::from(n) / u128::from(runs)) as usize;
        sample.extend(
            parts
                .run_at(flat, SAMPLE_RUN)
                .iter()
                .map(|v| magnitude_key(v.to_f32()).min(INFINITY_KEY)),
        );
    }
    let brackets = ranks.map(|rank| {
        let bracket = Bracket::from_sample(&mut sample, rank, n);
        Bracket {
            cap: bracket.cap / parts.pieces.len().max(1) + 4096,
            ..bracket
        }
    });
    let found: Vec<[Collected; C]> =
        map_parts(parts, |pieces| cpu.dispatch(Collect { pieces, brackets }));
    if found.iter().any(|c| c[0].non_finite) {
        return Err(parts.non_finite_error());
    }
    let mut keys: Vec<u32> = Vec::new();
    let mut out: [Option<RankKey>; C] = core::array::from_fn(|_| None);
    for (c, (rank, slot)) in ranks.into_iter().zip(&mut out).enumerate() {
        let below: u64 = found.iter().map(|f| f[c].below).sum();
        let within: u64 = found.iter().map(|f| f[c].within).sum();
        if found.iter().any(|f| f[c].overflow) || rank <= below || rank > below + within {
            continue;
        }
        keys.clear();
        for f in &found {
            keys.extend_from_slice(&f[c].keys);
        }
        let key = *keys.select_nth_unstable((rank - below - 1) as usize).1;
        let smaller = keys.iter().filter(|&&k| k < key).count() as u64;
        *slot = Some(RankKey {
            key,
            below: below + smaller,
            equal: found
                .iter()
                .map(|f| f[c].keys.iter().filter(|&&k| k == key).count() as u64)
                .collect(),
        });
    }
    Ok(out)
}

/// Checks every entry is finite, at memory speed.
pub(crate) fn validate<T: Element>(cpu: &Cpu, parts: &Parts<'_, T>) -> Result<()> {
    let nothing = Bracket {
        lo: INFINITY_KEY,
        hi: INFINITY_KEY,
        cap: 0,
    };
    let found = map_parts(parts, |pieces| {
        cpu.dispatch(Collect {
            pieces,
            brackets: [nothing],
        })
    });
    if found.iter().any(|[c]| c.non_finite) {
        return Err(parts.non_finite_error());
    }
    Ok(())
}

/// Fallback pass 1 over one group: `TABLES` interleaved count tables of [`HIGH_BINS`].
struct CountHigh<'a, T> {
    group: &'a [Vec<Piece<'a, T>>],
    /// `TABLES` tables of `HIGH_BINS` counts, one after the other.
    tables: &'a mut [u32],
}

impl<T: Element> WithSimd for CountHigh<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        // Unreachable: `tables` holds exactly `TABLES` (4) whole tables.
        let mut split = self
            .tables
            .chunks_exact_mut(HIGH_BINS)
            .map(|t| <&mut [u32; HIGH_BINS]>::try_from(t).expect("whole tables"));
        let (Some(t0), Some(t1), Some(t2), Some(t3)) =
            (split.next(), split.next(), split.next(), split.next())
        else {
            unreachable!("TABLES tables")
        };
        let mut buffer = [0.0f32; GROUP];
        for piece in self.group.iter().flatten() {
            for group in piece.data.chunks(GROUP) {
                let values = widened(s, group, &mut buffer);
                let bits: &[u32] = bytemuck::cast_slice(&values[..group.len()]);
                let mut quads = bits.chunks_exact(4);
                for q in &mut quads {
                    t0[high_bin(q[0] & 0x7FFF_FFFF)] += 1;
                    t1[high_bin(q[1] & 0x7FFF_FFFF)] += 1;
                    t2[high_bin(q[2] & 0x7FFF_FFFF)] += 1;
                    t3[high_bin(q[3] & 0x7FFF_FFFF)] += 1;
                }
                for &b in quads.remainder() {
                    t0[high_bin(b & 0x7FFF_FFFF)] += 1;
                }
            }
        }
    }
}

/// Fallback pass 2 over one part: counts per [`low_bin`] of the keys of one [`high_bin`].
struct CountLow<'a, T> {
    pieces: &'a [Piece<'a, T>],
    bin: usize,
}

impl<T: Element> WithSimd for CountLow<'_, T> {
    type Output = Vec<u32>;

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> Vec<u32> {
        let mut table = alloc::vec![0u32; LOW_BINS];
        let lo = (self.bin as u32) << 16;
        for piece in self.pieces {
            classify_each(
                s,
                piece.data,
                &[(lo, lo | 0xFFFF)],
                #[inline(always)]
                |chunk, [m]| {
                    let mut within = m.within;
                    while within != 0 {
                        let lane = within.trailing_zeros() as usize;
                        table[low_bin(magnitude_key(chunk[lane].to_f32()))] += 1;
                        within &= within - 1;
                    }
                },
            );
        }
        table
    }
}

/// Fallback pass 1: counts per [`high_bin`] of each group (threaded), and whether any entry is
/// non-finite.
fn high_counts<T: Element>(cpu: &Cpu, parts: &Parts<'_, T>) -> (Vec<Vec<u32>>, bool) {
    let mut tables: Vec<Vec<u32>> = parts
        .pieces
        .chunks(STREAMS)
        .map(|_| alloc::vec![0; TABLES * HIGH_BINS])
        .collect();
    for_each(
        tables
            .iter_mut()
            .zip(parts.pieces.chunks(STREAMS))
            .collect(),
        |(tables, group)| {
            cpu.dispatch(CountHigh { group, tables });
            // A group holds at most 2^31 entries, so its tables sum within u32.
            let (first, rest) = tables.split_at_mut(HIGH_BINS);
            for other in rest.chunks_exact(HIGH_BINS) {
                for (a, b) in first.iter_mut().zip(other) {
                    *a += b;
                }
            }
            tables.truncate(HIGH_BINS);
        },
    );
    let non_finite = tables
        .iter()
        .any(|t| t[FIRST_NON_FINITE_BIN..].iter().any(|&c| c > 0));
    (tables, non_finite)
}

/// Adds `parts` to a pass-1 histogram (threaded); a non-finite entry is an error.
pub(super) fn count_into<T: Element>(
    cpu: &Cpu,
    parts: &Parts<'_, T>,
    histogram: &mut MagnitudeHistogram,
) -> Result<()> {
    let (counts, non_finite) = high_counts(cpu, parts);
    if non_finite {
        return Err(parts.non_finite_error());
    }
    for c in &counts {
        histogram.add_counts(c)?;
    }
    Ok(())
}

/// Adds `parts` to a pass-2 bracket (threaded).
pub(super) fn refine_into<T: Element>(
    cpu: &Cpu,
    parts: &Parts<'_, T>,
    bracket: &mut MagnitudeBracket,
) -> Result<()> {
    if let Some(bin) = bracket.bin() {
        for table in map_parts(parts, |pieces| cpu.dispatch(CountLow { pieces, bin })) {
            bracket.add_counts(&table)?;
        }
    }
    Ok(())
}

/// [`MagnitudeHistogram::observe`] at memory speed: a chunk into a pass-1 histogram.
pub(crate) fn observe_chunk(
    cpu: &Cpu,
    histogram: &mut MagnitudeHistogram,
    chunk: &[f32],
) -> Result<()> {
    let slices = [chunk];
    count_into(cpu, &Parts::new(cpu, &slices, 1), histogram)
}

/// [`MagnitudeBracket::observe`] at memory speed: a chunk into a pass-2 bracket.
pub(crate) fn refine_chunk(cpu: &Cpu, bracket: &mut MagnitudeBracket, chunk: &[f32]) -> Result<()> {
    let slices = [chunk];
    refine_into(cpu, &Parts::new(cpu, &slices, 1), bracket)
}

/// Step 3: the exact two-pass radix select.
fn radix_rank<T: Element>(cpu: &Cpu, parts: &Parts<'_, T>, rank: u64) -> Result<RankKey> {
    let mut histogram = MagnitudeHistogram::new();
    count_into(cpu, parts, &mut histogram)?;
    let mut bracket = histogram.kth_smallest(rank)?;
    let bin = bracket.bin().unwrap_or(0);
    let low: Vec<Vec<u32>> = map_parts(parts, |pieces| cpu.dispatch(CountLow { pieces, bin }));
    for table in &low {
        bracket.add_counts(table)?;
    }
    // The bracket's cut is a top-(n - rank + 1) cut: its ties are the equal keys at or above rank.
    let cut = bracket.cut()?;
    let key = magnitude_key(cut.magnitude);
    let equal: Vec<u64> = low.iter().map(|t| u64::from(t[low_bin(key)])).collect();
    let equal_total: u64 = equal.iter().sum();
    let below = rank - 1 - (equal_total - cut.ties);
    Ok(RankKey { key, below, equal })
}

/// The keys of `ranks` (1-based, ascending; `1 <= rank <= n`), validating every entry: one
/// sampled pass for all of them, the exact fallback for each that it misses.
pub(crate) fn rank_keys<T: Element, const C: usize>(
    cpu: &Cpu,
    parts: &Parts<'_, T>,
    ranks: [u64; C],
) -> Result<[RankKey; C]> {
    let mut sampled: [Option<RankKey>; C] = core::array::from_fn(|_| None);
    if parts.total >= SAMPLED_MIN {
        sampled = sampled_ranks(cpu, parts, ranks)?;
    }
    let mut keys = Vec::with_capacity(C);
    for (rank, found) in ranks.into_iter().zip(sampled) {
        keys.push(match found {
            Some(found) => found,
            None => radix_rank(cpu, parts, rank)?,
        });
    }
    Ok(keys
        .try_into()
        .unwrap_or_else(|_| unreachable!("one key per rank")))
}

/// A cut as one part applies it: keep `key > key`, and entries equal to it while `ties` last.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PartCut {
    pub(super) key: u32,
    pub(super) ties: u64,
}

impl PartCut {
    pub(super) const NONE: Self = Self {
        key: INFINITY_KEY,
        ties: 0,
    };

    /// The lanes of one vector it keeps (bit `j` for lane `j`, consuming ties in order), with
    /// their sign, equality and finiteness bits added to `run` shifted to `at`.
    #[inline(always)]
    pub(super) fn keep<S: Simd>(&mut self, s: S, v: S::F32, run: &mut RunBits, at: usize) -> u32 {
        self.keep_classified(s.classify_keys(v, self.key, self.key), run, at)
    }

    /// [`PartCut::keep`] on `2 * LANES` 16-bit entries' words, `bounds` the cut's key in their
    /// key space (`WordBounds::of(key, key)`).
    #[inline(always)]
    pub(super) fn keep_words<S: Simd>(
        &mut self,
        s: S,
        words: &[u16],
        bounds: WordBounds,
        run: &mut RunBits,
        at: usize,
    ) -> u32 {
        self.keep_classified(s.classify_words(words, bounds), run, at)
    }

    /// [`PartCut::keep`] from the classified keys.
    #[inline(always)]
    fn keep_classified(&mut self, m: KeyMasks, run: &mut RunBits, at: usize) -> u32 {
        run.negative |= u64::from(m.negative) << at;
        run.equal |= u64::from(m.within) << at;
        run.non_finite |= m.non_finite;
        let (mut kept, mut equal) = (m.above, m.within);
        while self.ties > 0 && equal != 0 {
            kept |= equal & equal.wrapping_neg();
            equal &= equal - 1;
            self.ties -= 1;
        }
        kept
    }
}

/// A whole-vector top-k cut and each part's share of it.
pub(crate) struct Cut {
    pub(crate) cut: TopKCut,
    pub(super) parts: Vec<PartCut>,
}

impl Cut {
    /// A cut that every part applies alike: one that keeps no entry equal to its magnitude (a
    /// threshold rule's), so no part needs a share of ties.
    pub(super) fn uniform<T>(cut: TopKCut, parts: &Parts<'_, T>) -> Self {
        debug_assert_eq!(cut.ties, 0, "a uniform cut keeps no ties");
        let part = PartCut {
            key: magnitude_key(cut.magnitude).min(INFINITY_KEY),
            ties: 0,
        };
        Self {
            cut,
            parts: alloc::vec![part; parts.pieces.len()],
        }
    }
}

/// The top-k cut of `parts` (`0 <= k <= n`), validating every entry.
pub(crate) fn top_k<T: Element>(cpu: &Cpu, parts: &Parts<'_, T>, k: u64) -> Result<Cut> {
    let [cut] = top_ks(cpu, parts, [k])?;
    Ok(cut)
}

/// The top-k cuts of `parts` for each of `ks` (`0 <= k <= n`), validating every entry: the
/// selections share their passes over the data.
pub(crate) fn top_ks<T: Element, const C: usize>(
    cpu: &Cpu,
    parts: &Parts<'_, T>,
    ks: [u64; C],
) -> Result<[Cut; C]> {
    let n = parts.total;
    if let Some(&k) = ks.iter().find(|&&k| k > n) {
        return Err(Error::InvalidParam {
            name: "k",
            value: k as f64,
            expected: "at most the number of entries",
        });
    }
    let none = || Cut {
        cut: TopKCut::NONE,
        parts: alloc::vec![PartCut::NONE; parts.pieces.len()],
    };
    let mut cuts: [Cut; C] = core::array::from_fn(|_| none());
    // The ranks of the non-zero counts, selected together; a zero count keeps nothing.
    let selected: Vec<usize> = (0..C).filter(|&c| ks[c] > 0).collect();
    match selected.len() {
        0 => validate(cpu, parts)?,
        1 => {
            let c = selected[0];
            let [found] = rank_keys(cpu, parts, [n - ks[c] + 1])?;
            cuts[c] = cut_of(&found, ks[c], n);
        }
        _ => {
            let found = rank_keys(cpu, parts, ks.map(|k| n - k.max(1) + 1))?;
            for (c, found) in found.into_iter().enumerate() {
                if ks[c] > 0 {
                    cuts[c] = cut_of(&found, ks[c], n);
                }
            }
        }
    }
    Ok(cuts)
}

/// The top-`k` cut from the key of rank `n - k + 1`: entries above the key are all kept, the
/// rest of `k` comes from the equal ones, first first.
fn cut_of(found: &RankKey, k: u64, n: u64) -> Cut {
    let equal_total: u64 = found.equal.iter().sum();
    let ties = k - (n - found.below - equal_total);
    let mut ties_left = ties;
    let parts = found
        .equal
        .iter()
        .map(|&equal| {
            let share = ties_left.min(equal);
            ties_left -= share;
            PartCut {
                key: found.key,
                ties: share,
            }
        })
        .collect();
    Cut {
        cut: TopKCut {
            magnitude: f32::from_bits(found.key),
            ties,
        },
        parts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels_core::CounterRng;

    #[test]
    fn the_sample_brackets_shuffled_data_and_misses_adversarial_data() {
        let cpu = Cpu::detect();
        let n = SAMPLED_MIN as usize + 5;
        let rng = CounterRng::new(1);
        let mut x: Vec<f32> = (0..n as u64).map(|i| rng.normal_at(i) as f32).collect();
        let ranks = [1, n as u64 / 100, n as u64 / 2, n as u64];
        let slices = [&x[..]];
        let parts = Parts::new(&cpu, &slices, 1);
        // One rank at a time, and all of them in one pass.
        let together = sampled_ranks(&cpu, &parts, ranks).unwrap();
        for (rank, together) in ranks.into_iter().zip(together) {
            let [alone] = sampled_ranks(&cpu, &parts, [rank]).unwrap();
            let exact = radix_rank(&cpu, &parts, rank).unwrap();
            for sampled in [alone, together] {
                let sampled = sampled.expect("bracket holds");
                assert_eq!((sampled.key, sampled.below), (exact.key, exact.below));
                assert_eq!(sampled.equal, exact.equal);
            }
        }
        // Zeros exactly where the sample looks: it sees nothing of the rest.
        let runs = sample_runs(n as u64);
        for r in 0..runs {
            let start = (r as u128 * n as u128 / runs as u128) as usize;
            x[start..start + SAMPLE_RUN].fill(0.0);
        }
        let slices = [&x[..]];
        let parts = Parts::new(&cpu, &slices, 1);
        assert!(sampled_ranks(&cpu, &parts, [n as u64 * 3 / 4]).unwrap()[0].is_none());
    }
}
