//! Exact magnitude selection in O(n): the k-th largest magnitude, the top-k cut, mask and
//! indices, over one slice or many slices taken as one flat vector (a whole model).
//!
//! # Contracts
//!
//! Those of [`kernels_core::ops::select`], bit for bit: order by `|x|` through the integer image
//! [`magnitude_key`], exactly `k` kept, ties by lower flat index, `0 <= k <= n`, any non-finite
//! entry an [`Error::NonFinite`] naming its flat index.
//!
//! # Algorithm
//!
//! A select on the key, no sort and no copy of the data. To find the key of rank `r`:
//!
//! 1. **Bracket** (vectors of more than [`SAMPLED_MIN`] entries): the keys of an evenly spread
//!    sample of [`sample_runs`] runs of [`SAMPLE_RUN`] entries give a key interval `[lo, hi]`
//!    that holds rank `r` with high probability ([`BRACKET_SIGMAS`] standard deviations of the
//!    sample rank on each side).
//! 2. **One pass**, vectorised and threaded: count the keys below `lo` and copy out the few keys
//!    inside `[lo, hi]`. If the rank falls inside, a select over the copied keys gives the exact
//!    key, and how many entries equal to it each thread's part holds.
//! 3. **Fallback** (small vectors, or a bracket that missed): an exact two-pass radix select,
//!    counts per [`high_bin`] (the top 15 bits of the key), then per [`low_bin`] within the bin
//!    holding the rank, through [`MagnitudeHistogram`] and [`MagnitudeBracket`].
//!
//! Masks, indices and masked copies then apply the cut in one more pass: keep `key > cut`, and
//! entries equal to it while the part's share of the ties lasts. Each part knows how many equal
//! entries the parts before it hold, so threading never changes which ties are kept, and the
//! sample only decides the speed, never the result.

use alloc::vec::Vec;
use core::ops::Range;

use kernels_core::ops::select::{
    FIRST_NON_FINITE_BIN, HIGH_BINS, LOW_BINS, MagnitudeBracket, MagnitudeHistogram, TopKCut,
    high_bin, low_bin, magnitude_key,
};
use kernels_core::{Element, Error, Result};

use crate::parallel::{for_each, parts_for, ranges};
use crate::simd::widened;
use crate::{Cpu, KeyMasks, Scalar, Simd, WithSimd};

/// Vectors shorter than this skip the sampled bracket (the exact radix select is as fast there).
pub const SAMPLED_MIN: u64 = 1 << 16;
/// Runs of consecutive entries in the sample.
pub const MAX_SAMPLE_RUNS: usize = 4096;

/// Runs in the sample of a vector of `n` entries: about one entry in 16 up to
/// [`MAX_SAMPLE_RUNS`] runs (a quarter of a million keys), whose selection costs little next to
/// the pass over the data.
#[must_use]
pub fn sample_runs(n: u64) -> usize {
    usize::try_from(n / 1024).map_or(MAX_SAMPLE_RUNS, |r| r.clamp(64, MAX_SAMPLE_RUNS))
}
/// Entries per sample run: whole cache lines, so the sample costs few memory round trips.
pub const SAMPLE_RUN: usize = 64;
/// Half-width of the bracket in standard deviations of the sample rank: the bracket misses (and
/// the exact fallback runs) with probability below 1e-3 on data in random order.
pub const BRACKET_SIGMAS: f64 = 3.5;

/// How far ahead the passes prefetch. PERF: one sequential stream per thread leaves the
/// hardware prefetcher short of DRAM bandwidth.
const PREFETCH_BYTES: usize = 2048;

/// Returns its argument: lets a closure in a struct field carry `#[inline(always)]` (attributes
/// are only accepted on closures in argument position).
fn identity<F>(f: F) -> F {
    f
}

/// Cache line bytes.
const LINE: usize = 64;

/// The key of infinity: the largest a cut may take (`key > it` never holds for finite data).
const INFINITY_KEY: u32 = 0x7F80_0000;

/// Keep-bits are made for this many elements at a time (one `u64` word).
pub(crate) const GROUP: usize = 64;

/// Most elements one group of parts may hold, so its per-bin counts fit `u32`.
const MAX_GROUP: usize = 1 << 31;

/// Independent pass-1 tables per thread. PERF: consecutive equal bins (common: task vectors
/// concentrate in a few hundred bins) would otherwise chain every increment through a
/// store-to-load forward; four tables of 128 KiB stay in L2.
const TABLES: usize = 4;

/// A run of one input slice and the flat index of its first element.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Piece<'a, T> {
    pub(crate) data: &'a [T],
    pub(crate) first: u64,
}

/// The flat vector `slices` split into parts on multiples of `align`. Each thread reads
/// [`STREAMS`] consecutive parts (a *group*), interleaved where order matters.
pub(crate) struct Parts<'a, T> {
    slices: &'a [&'a [T]],
    starts: Vec<usize>,
    pub(crate) pieces: Vec<Vec<Piece<'a, T>>>,
    pub(crate) bounds: Vec<Range<usize>>,
    pub(crate) total: u64,
}

impl<'a, T: Element> Parts<'a, T> {
    pub(crate) fn new(cpu: &Cpu, slices: &'a [&'a [T]], align: usize) -> Self {
        let total: usize = slices.iter().map(|s| s.len()).sum();
        let threads = parts_for(
            cpu.threads(),
            total * core::mem::size_of::<T>(),
            cpu.min_bytes_per_thread(),
        );
        let count = threads.max(total.div_ceil(MAX_GROUP)) * STREAMS;
        let mut starts = Vec::with_capacity(slices.len());
        let mut at = 0usize;
        for s in slices {
            starts.push(at);
            at += s.len();
        }
        let bounds: Vec<Range<usize>> = ranges(total, count, align).collect();
        let pieces = bounds
            .iter()
            .map(|range| pieces_of(slices, &starts, range.clone()))
            .collect();
        Self {
            slices,
            starts,
            pieces,
            bounds,
            total: total as u64,
        }
    }

    /// `out` (one entry per `per` elements) split into each part's entries.
    pub(crate) fn split<'o, X>(&self, mut out: &'o mut [X], per: usize) -> Vec<&'o mut [X]> {
        let mut split = Vec::with_capacity(self.bounds.len());
        for range in &self.bounds {
            let (head, tail) = out.split_at_mut(range.len().div_ceil(per));
            split.push(head);
            out = tail;
        }
        split
    }

    /// Entries `flat..flat + len` (within one slice, `len` clipped to its end).
    fn run_at(&self, flat: usize, len: usize) -> &'a [T] {
        let slice = self.starts.partition_point(|&s| s <= flat) - 1;
        let offset = flat - self.starts[slice];
        let data = self.slices[slice];
        &data[offset..(offset + len).min(data.len())]
    }

    /// The flat index of the first non-finite entry.
    fn first_non_finite(&self) -> Option<usize> {
        self.slices
            .iter()
            .zip(&self.starts)
            .find_map(|(s, &start)| {
                s.iter()
                    .position(|v| !v.to_f32().is_finite())
                    .map(|i| start + i)
            })
    }

    fn non_finite_error(&self) -> Error {
        Error::NonFinite {
            what: "x",
            index: self.first_non_finite().unwrap_or(0),
        }
    }
}

fn pieces_of<'a, T>(
    slices: &[&'a [T]],
    starts: &[usize],
    range: Range<usize>,
) -> Vec<Piece<'a, T>> {
    slices
        .iter()
        .zip(starts)
        .filter_map(|(s, &start)| {
            let from = range.start.max(start);
            let to = range.end.min(start + s.len());
            (from < to).then(|| Piece {
                data: &s[from - start..to - start],
                first: from as u64,
            })
        })
        .collect()
}

/// Calls `f(offset, masks)` for each vector of `data` (then each tail element) with its keys
/// classified against `[lo, hi]`; `offset` is the first lane's index in `data`.
#[inline(always)]
fn classify_each<S: Simd, T: Element>(
    s: S,
    data: &[T],
    lo: u32,
    hi: u32,
    mut f: impl FnMut(usize, KeyMasks),
) {
    let main = data.len() - data.len() % S::LANES;
    let ahead = PREFETCH_BYTES / core::mem::size_of::<T>();
    let mut at = 0;
    while at < main {
        if let Some(v) = data.get(at + ahead) {
            s.prefetch(v);
        }
        f(
            at,
            s.classify_keys(s.load(&data[at..at + S::LANES]), lo, hi),
        );
        at += S::LANES;
    }
    for (j, x) in data[main..].iter().enumerate() {
        f(main + j, Scalar.classify_keys(x.to_f32(), lo, hi));
    }
}

/// [`classify_each`] in any order: `STREAMS` interleaved sub-ranges of `data` at once.
#[inline(always)]
fn classify_unordered<S: Simd, T: Element>(
    s: S,
    data: &[T],
    lo: u32,
    hi: u32,
    mut f: impl FnMut(usize, KeyMasks),
) {
    let len = data.len() / STREAMS / S::LANES * S::LANES;
    let ahead = PREFETCH_BYTES / core::mem::size_of::<T>();
    let mut at = 0;
    while at < len {
        for k in 0..STREAMS {
            let start = k * len + at;
            if let Some(v) = data.get(start + ahead) {
                s.prefetch(v);
            }
            f(
                start,
                s.classify_keys(s.load(&data[start..start + S::LANES]), lo, hi),
            );
        }
        at += S::LANES;
    }
    let rest = STREAMS * len;
    classify_each(
        s,
        &data[rest..],
        lo,
        hi,
        #[inline(always)]
        |at, m| f(rest + at, m),
    );
}

/// Sub-ranges a thread reads at once where order does not matter. PERF: one sequential stream
/// per core reaches about 60 % of DRAM bandwidth here; four reach the STREAM figure.
pub(crate) const STREAMS: usize = 4;

/// The key of rank `r` (1-based, ascending) and where its copies are.
pub(crate) struct RankKey {
    pub(crate) key: u32,
    /// Entries with a smaller key.
    below: u64,
    /// Entries equal to the key, per part.
    equal: Vec<u64>,
}

/// Pass 2 of the sampled select over one part: counts below `lo`, copies keys in `[lo, hi]`.
struct Collect<'a, T> {
    pieces: &'a [Piece<'a, T>],
    lo: u32,
    hi: u32,
    cap: usize,
}

/// What [`Collect`] found in one part.
#[derive(Default)]
struct Collected {
    below: u64,
    within: u64,
    /// The keys in `[lo, hi]`, unless more than the cap (then `overflow`).
    keys: Vec<u32>,
    non_finite: bool,
    overflow: bool,
}

impl<T: Element> WithSimd for Collect<'_, T> {
    type Output = Collected;

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> Collected {
        let mut out = Collected::default();
        let mut non_finite = 0u32;
        for piece in self.pieces {
            classify_unordered(
                s,
                piece.data,
                self.lo,
                self.hi,
                #[inline(always)]
                |at, m| {
                    out.below += u64::from(m.below.count_ones());
                    out.within += u64::from(m.within.count_ones());
                    non_finite |= m.non_finite;
                    let mut within = m.within;
                    // PERF: the bracket holds about 1 % of the entries; most vectors skip this.
                    if within != 0 && !out.overflow {
                        while within != 0 {
                            let lane = within.trailing_zeros() as usize;
                            out.keys.push(magnitude_key(piece.data[at + lane].to_f32()));
                            within &= within - 1;
                        }
                        out.overflow = out.keys.len() > self.cap;
                    }
                },
            );
        }
        out.non_finite = non_finite != 0;
        out
    }
}

/// A key interval expected to hold a rank, from a sample (step 1).
#[derive(Clone, Copy, Debug)]
struct Bracket {
    lo: u32,
    hi: u32,
    /// Keys worth copying out: beyond this, the copy costs more than the exact fallback.
    cap: usize,
}

impl Bracket {
    /// The bracket of `rank` (1-based, ascending) among `n` entries, from a sample of their keys.
    fn from_sample(sample: &mut [u32], rank: u64, n: u64) -> Self {
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
        // Twice the expected share of the entries, plus room.
        let cap = (n as f64 * 2.0 * (hi_at - lo_at).max(1.0) / s) as usize + 4096;
        Self { lo, hi, cap }
    }
}

/// Steps 1 and 2: `None` if the bracket missed (or held too much); the exact fallback follows.
fn sampled_rank<T: Element>(cpu: &Cpu, parts: &Parts<'_, T>, rank: u64) -> Result<Option<RankKey>> {
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
    let bracket = Bracket::from_sample(&mut sample, rank, n);
    let found: Vec<Collected> = map_parts(parts, |pieces| {
        cpu.dispatch(Collect {
            pieces,
            lo: bracket.lo,
            hi: bracket.hi,
            cap: bracket.cap / parts.pieces.len().max(1) + 4096,
        })
    });
    if found.iter().any(|c| c.non_finite) {
        return Err(parts.non_finite_error());
    }
    let below: u64 = found.iter().map(|c| c.below).sum();
    let within: u64 = found.iter().map(|c| c.within).sum();
    if found.iter().any(|c| c.overflow) || rank <= below || rank > below + within {
        return Ok(None);
    }
    let mut keys: Vec<u32> = Vec::with_capacity(within as usize);
    for c in &found {
        keys.extend_from_slice(&c.keys);
    }
    let key = *keys.select_nth_unstable((rank - below - 1) as usize).1;
    let smaller = keys.iter().filter(|&&k| k < key).count() as u64;
    Ok(Some(RankKey {
        key,
        below: below + smaller,
        equal: found
            .iter()
            .map(|c| c.keys.iter().filter(|&&k| k == key).count() as u64)
            .collect(),
    }))
}

/// Checks every entry is finite, at memory speed.
pub(crate) fn validate<T: Element>(cpu: &Cpu, parts: &Parts<'_, T>) -> Result<()> {
    let found = map_parts(parts, |pieces| {
        cpu.dispatch(Collect {
            pieces,
            lo: INFINITY_KEY,
            hi: INFINITY_KEY,
            cap: 0,
        })
    });
    if found.iter().any(|c| c.non_finite) {
        return Err(parts.non_finite_error());
    }
    Ok(())
}

/// Runs `f` on every part's pieces (one thread per group), results in part order.
pub(crate) fn map_parts<'a, T: Sync, R: Send>(
    parts: &'a Parts<'a, T>,
    f: impl Fn(&'a [Piece<'a, T>]) -> R + Sync,
) -> Vec<R> {
    let mut results: Vec<Option<R>> = parts.pieces.iter().map(|_| None).collect();
    for_each(
        results
            .chunks_mut(STREAMS)
            .zip(parts.pieces.chunks(STREAMS))
            .collect(),
        |(slots, group)| {
            for (slot, pieces) in slots.iter_mut().zip(group) {
                *slot = Some(f(pieces));
            }
        },
    );
    results.into_iter().flatten().collect()
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
                lo,
                lo | 0xFFFF,
                #[inline(always)]
                |at, m| {
                    let mut within = m.within;
                    while within != 0 {
                        let lane = within.trailing_zeros() as usize;
                        table[low_bin(magnitude_key(piece.data[at + lane].to_f32()))] += 1;
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
fn count_into<T: Element>(
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
fn refine_into<T: Element>(
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

/// The key of rank `rank` (1-based, ascending; `1 <= rank <= n`), validating every entry.
pub(crate) fn rank_key<T: Element>(cpu: &Cpu, parts: &Parts<'_, T>, rank: u64) -> Result<RankKey> {
    if parts.total >= SAMPLED_MIN
        && let Some(found) = sampled_rank(cpu, parts, rank)?
    {
        return Ok(found);
    }
    radix_rank(cpu, parts, rank)
}

/// A cut as one part applies it: keep `key > key`, and entries equal to it while `ties` last.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PartCut {
    key: u32,
    ties: u64,
}

impl PartCut {
    const NONE: Self = Self {
        key: INFINITY_KEY,
        ties: 0,
    };

    /// Adds one vector's lanes, shifted to `at`, to `keep` (consuming ties in order) and its
    /// sign, equality and finiteness bits to `run`.
    #[inline(always)]
    fn keep<S: Simd>(&mut self, s: S, v: S::F32, keep: &mut u64, run: &mut RunBits, at: usize) {
        let m = s.classify_keys(v, self.key, self.key);
        run.negative |= u64::from(m.negative) << at;
        run.equal |= u64::from(m.within) << at;
        run.non_finite |= m.non_finite;
        let (mut kept, mut equal) = (m.above, m.within);
        while self.ties > 0 && equal != 0 {
            kept |= equal & equal.wrapping_neg();
            equal &= equal - 1;
            self.ties -= 1;
        }
        *keep |= u64::from(kept) << at;
    }
}

/// A whole-vector top-k cut and each part's share of it.
pub(crate) struct Cut {
    pub(crate) cut: TopKCut,
    parts: Vec<PartCut>,
}

/// The top-k cut of `parts` (`0 <= k <= n`), validating every entry.
pub(crate) fn top_k<T: Element>(cpu: &Cpu, parts: &Parts<'_, T>, k: u64) -> Result<Cut> {
    let n = parts.total;
    if k > n {
        return Err(Error::InvalidParam {
            name: "k",
            value: k as f64,
            expected: "at most the number of entries",
        });
    }
    if k == 0 {
        validate(cpu, parts)?;
        return Ok(Cut {
            cut: TopKCut::NONE,
            parts: alloc::vec![PartCut::NONE; parts.pieces.len()],
        });
    }
    let found = rank_key(cpu, parts, n - k + 1)?;
    // Entries above the key are all kept; the rest of k comes from the equal ones, first first.
    let equal_total: u64 = found.equal.iter().sum();
    let ties = k - (n - found.below - equal_total);
    let mut ties_left = ties;
    let per_part = found
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
    Ok(Cut {
        cut: TopKCut {
            magnitude: f32::from_bits(found.key),
            ties,
        },
        parts: per_part,
    })
}

/// The top-k cut of `slices` taken as one vector (the twin of
/// [`kernels_core::ops::select::topk_cut_ref`]): one pass over the data, no copy.
pub fn topk_cut<T: Element>(cpu: &Cpu, slices: &[&[T]], k: u64) -> Result<TopKCut> {
    Ok(top_k(cpu, &Parts::new(cpu, slices, 1), k)?.cut)
}

/// The k-th largest magnitude of `slices` taken as one vector, `1 <= k <= n` (the twin of
/// [`kernels_core::ops::select::kth_largest_magnitude_ref`]).
pub fn kth_largest_magnitude<T: Element>(cpu: &Cpu, slices: &[&[T]], k: u64) -> Result<f32> {
    if k == 0 {
        return Err(Error::InvalidParam {
            name: "k",
            value: 0.0,
            expected: "at least 1",
        });
    }
    topk_cut(cpu, slices, k).map(|cut| cut.magnitude)
}

/// The keep-bits of a run of up to 64 elements under each cut (consuming ties in order), and
/// what else the pass learns of it.
#[inline(always)]
fn keep_group<S: Simd, T: Element, const C: usize>(
    s: S,
    group: &[T],
    cuts: &mut [PartCut; C],
) -> Keep<C> {
    let mut keep = Keep {
        bits: [0; C],
        run: RunBits::default(),
    };
    let main = group.len() - group.len() % S::LANES;
    for (v, lanes) in group[..main].chunks_exact(S::LANES).enumerate() {
        let v_bits = s.load(lanes);
        for (k, cut) in keep.bits.iter_mut().zip(cuts.iter_mut()) {
            cut.keep(s, v_bits, k, &mut keep.run, v * S::LANES);
        }
    }
    for (j, x) in group.iter().enumerate().skip(main) {
        for (k, cut) in keep.bits.iter_mut().zip(cuts.iter_mut()) {
            cut.keep(Scalar, x.to_f32(), k, &mut keep.run, j);
        }
    }
    keep
}

/// What the final pass learns of a run of up to 64 elements besides the cut: bit `j` is element
/// `j`'s.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RunBits {
    /// Sign bit set.
    pub(crate) negative: u64,
    /// Magnitude equal to the (last) cut's.
    pub(crate) equal: u64,
    /// Any lane infinite or NaN.
    non_finite: u32,
}

/// The keep-bits of a run under each cut, and its [`RunBits`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Keep<const C: usize> {
    /// Kept, under each cut.
    pub(crate) bits: [u64; C],
    pub(crate) run: RunBits,
}

/// The final pass over one group: calls `f(part, offset, piece, keep)` for each run of up to 64
/// elements (`offset` its start in the piece), in flat order within each part, the group's parts
/// interleaved.
struct ApplyCuts<'a, T, F, const C: usize> {
    group: &'a [Vec<Piece<'a, T>>],
    cuts: [[PartCut; C]; STREAMS],
    f: F,
}

impl<T: Element, F: FnMut(usize, usize, &Piece<'_, T>, Keep<C>), const C: usize> WithSimd
    for ApplyCuts<'_, T, F, C>
{
    /// Whether any entry was non-finite.
    type Output = bool;

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> bool {
        let Self {
            group,
            mut cuts,
            mut f,
        } = self;
        let ahead = PREFETCH_BYTES / core::mem::size_of::<T>();
        // Per part: the piece being read and the offset in it.
        let mut cursors = [(0usize, 0usize); STREAMS];
        let mut non_finite = 0;
        loop {
            let mut busy = false;
            for (p, pieces) in group.iter().enumerate() {
                let (piece_at, offset) = &mut cursors[p];
                let Some(piece) = pieces.get(*piece_at) else {
                    continue;
                };
                busy = true;
                let end = (*offset + GROUP).min(piece.data.len());
                for line in (0..GROUP).step_by(LINE / core::mem::size_of::<T>()) {
                    if let Some(v) = piece.data.get(*offset + ahead + line) {
                        s.prefetch(v);
                    }
                }
                let keep = keep_group(s, &piece.data[*offset..end], &mut cuts[p]);
                non_finite |= keep.run.non_finite;
                f(p, *offset, piece, keep);
                *offset = end;
                if end == piece.data.len() {
                    (*piece_at, *offset) = (*piece_at + 1, 0);
                }
            }
            if !busy {
                break;
            }
        }
        non_finite != 0
    }
}

/// Runs the final pass (one thread per group): `f(state, at, run, keep)` with each part's own
/// `state`, `at` the run's start relative to the part and `run` its elements. A non-finite entry
/// is an error (and the states hold partial results).
pub(crate) fn apply_cuts<T: Element, W: Send, const C: usize>(
    cpu: &Cpu,
    parts: &Parts<'_, T>,
    cuts: [&Cut; C],
    mut states: Vec<W>,
    f: impl Fn(&mut W, usize, &[T], Keep<C>) + Sync,
) -> Result<()> {
    let work: Vec<(usize, &mut [W])> = states
        .chunks_mut(STREAMS)
        .enumerate()
        .map(|(g, w)| (g * STREAMS, w))
        .collect();
    let mut non_finite: Vec<bool> = alloc::vec![false; work.len()];
    let work: Vec<_> = work.into_iter().zip(non_finite.iter_mut()).collect();
    for_each(work, |((first, states), non_finite)| {
        let group = &parts.pieces[first..first + states.len()];
        *non_finite = cpu.dispatch(ApplyCuts {
            group,
            cuts: core::array::from_fn(|p| {
                core::array::from_fn(|c| {
                    cuts[c]
                        .parts
                        .get(first + p)
                        .copied()
                        .unwrap_or(PartCut::NONE)
                })
            }),
            f: identity(
                #[inline(always)]
                |p: usize, offset: usize, piece: &Piece<'_, T>, keep| {
                    let at = piece.first as usize + offset - parts.bounds[first + p].start;
                    let run = &piece.data[offset..(offset + GROUP).min(piece.data.len())];
                    f(&mut states[p], at, run, keep);
                },
            ),
        });
    });
    if non_finite.contains(&true) {
        return Err(parts.non_finite_error());
    }
    Ok(())
}

/// The top-k of `x` as a bitmask: bit `i % 64` of `mask[i / 64]` is set iff entry `i` is kept
/// (`mask.len() == ceil(n / 64)`; unused bits of the last word are cleared). The twin of
/// [`kernels_core::ops::select::topk_mask_ref`].
pub fn topk_mask<T: Element>(cpu: &Cpu, x: &[T], k: usize, mask: &mut [u64]) -> Result<()> {
    check_mask_len(x.len(), mask.len())?;
    let slices = [x];
    let parts = Parts::new(cpu, &slices, GROUP);
    let cut = top_k(cpu, &parts, k as u64)?;
    // Parts start on multiples of 64: each owns whole words.
    let words = parts.split(mask, GROUP);
    apply_cuts(
        cpu,
        &parts,
        [&cut],
        words,
        #[inline(always)]
        |words, at, _, keep| {
            words[at / GROUP] = keep.bits[0];
        },
    )
}

/// Flat indices of the top-k of `slices` taken as one vector, ascending (the twin of
/// [`kernels_core::ops::select::topk_global_ref`]).
pub fn topk_indices<T: Element>(cpu: &Cpu, slices: &[&[T]], k: u64) -> Result<Vec<u64>> {
    let parts = Parts::new(cpu, slices, GROUP);
    let cut = top_k(cpu, &parts, k)?;
    let mut per_part: Vec<Vec<u64>> = parts.pieces.iter().map(|_| Vec::new()).collect();
    let lists: Vec<&mut Vec<u64>> = per_part.iter_mut().collect();
    apply_cuts(
        cpu,
        &parts,
        [&cut],
        lists,
        #[inline(always)]
        |list, at, _, keep| {
            let mut keep = keep.bits[0];
            while keep != 0 {
                list.push(at as u64 + u64::from(keep.trailing_zeros()));
                keep &= keep - 1;
            }
        },
    )?;
    let mut all = Vec::with_capacity(usize::try_from(k).unwrap_or(0));
    for (list, range) in per_part.into_iter().zip(&parts.bounds) {
        all.extend(list.into_iter().map(|i| i + range.start as u64));
    }
    Ok(all)
}

/// How many entries a top-k keeps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KeepRule {
    /// Exactly this many (`<= n`).
    Count(u64),
    /// `floor(density n)`, density in `(0, 1]` ([`kernels_core::ops::select::keep_count`]).
    Density(f64),
}

impl KeepRule {
    fn count(self, n: u64) -> Result<u64> {
        let k = match self {
            Self::Count(k) => k,
            Self::Density(d) => kernels_core::ops::select::keep_count(d, n)?,
        };
        if k > n {
            return Err(Error::InvalidParam {
                name: "k",
                value: k as f64,
                expected: "at most the number of entries",
            });
        }
        Ok(k)
    }
}

/// Entries between the starts of two sample runs of a streamed vector.
pub const STREAM_SAMPLE_STRIDE: u64 = 1 << 14;

enum Stage {
    /// Pass 1: validating, counting and sampling.
    Observing,
    /// Pass 2: counting below a sampled bracket and copying the keys inside it.
    Collecting {
        k: u64,
        bracket: Bracket,
        below: u64,
        within: u64,
        keys: Vec<u32>,
        overflow: bool,
    },
    /// Fallback pass: the radix histogram.
    Counting {
        k: u64,
        histogram: MagnitudeHistogram,
    },
    /// Fallback pass: the low bits inside the bin holding the rank.
    Refining(MagnitudeBracket),
    Done(TopKCut),
}

/// Exact top-k of a vector too large for memory (a whole model), streamed chunk by chunk:
/// memory is bounded by the sample and bracket (about 1 % of the entries), not by `n`.
///
/// Feed every chunk to [`Self::observe`], then while [`Self::next_pass`] says so, feed the same
/// chunks again in the same order to [`Self::refine`]; then read [`Self::cut`] and apply it with
/// [`TopKApplier`]. Usually two passes: a third and fourth only where the sampled bracket misses
/// (vectors under [`SAMPLED_MIN`] entries, or data whose order fools the sample).
///
/// ```
/// use kernels_cpu::{Cpu, select::{KeepRule, StreamingTopK}};
/// let cpu = Cpu::detect();
/// let tensors: [&[f32]; 2] = [&[0.5, -3.0, 1.0], &[2.0, -0.25]];
/// let mut topk = StreamingTopK::new(KeepRule::Count(2));
/// for t in tensors { topk.observe(&cpu, t)?; }
/// while topk.next_pass()? {
///     for t in tensors { topk.refine(&cpu, t)?; }
/// }
/// let cut = topk.cut()?;
/// assert_eq!((cut.magnitude, cut.ties), (2.0, 1));
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub struct StreamingTopK {
    rule: KeepRule,
    stage: Stage,
    /// Entries of pass 1.
    total: u64,
    /// Entries fed in the current pass.
    fed: u64,
    sample: Vec<u32>,
}

impl StreamingTopK {
    /// A selection keeping `rule` entries (validated once the total is known).
    #[must_use]
    pub fn new(rule: KeepRule) -> Self {
        Self {
            rule,
            stage: Stage::Observing,
            total: 0,
            fed: 0,
            sample: Vec::new(),
        }
    }

    fn wrong_pass(expected: &'static str) -> Error {
        Error::InvalidParam {
            name: "streaming top-k pass",
            value: 0.0,
            expected,
        }
    }

    fn shift_index(&self, e: Error) -> Error {
        match e {
            Error::NonFinite { what, index } => Error::NonFinite {
                what,
                index: index + self.fed as usize,
            },
            other => other,
        }
    }

    /// Pass 1: the next chunk. Non-finite entries are an error naming their flat index.
    pub fn observe<T: Element>(&mut self, cpu: &Cpu, chunk: &[T]) -> Result<()> {
        if !matches!(self.stage, Stage::Observing) {
            return Err(Self::wrong_pass("observe() before next_pass()"));
        }
        let slices = [chunk];
        validate(cpu, &Parts::new(cpu, &slices, 1)).map_err(|e| self.shift_index(e))?;
        self.observe_validated(chunk)
    }

    /// [`Self::observe`] of a chunk the caller has checked is finite.
    pub(crate) fn observe_validated<T: Element>(&mut self, chunk: &[T]) -> Result<()> {
        if !matches!(self.stage, Stage::Observing) {
            return Err(Self::wrong_pass("observe() before next_pass()"));
        }
        // Runs of SAMPLE_RUN entries starting at multiples of the stride, cut by chunk ends.
        let (from, to) = (self.fed, self.fed + chunk.len() as u64);
        let mut run = from
            .saturating_sub(SAMPLE_RUN as u64 - 1)
            .div_ceil(STREAM_SAMPLE_STRIDE)
            * STREAM_SAMPLE_STRIDE;
        while run < to {
            let start = run.max(from);
            let end = (run + SAMPLE_RUN as u64).min(to);
            if start < end {
                self.sample.extend(
                    chunk[(start - from) as usize..(end - from) as usize]
                        .iter()
                        .map(|v| magnitude_key(v.to_f32())),
                );
            }
            run += STREAM_SAMPLE_STRIDE;
        }
        self.fed = to;
        self.total = to;
        Ok(())
    }

    /// Ends the current pass. `true`: feed every chunk again to [`Self::refine`].
    pub fn next_pass(&mut self) -> Result<bool> {
        if !matches!(self.stage, Stage::Observing | Stage::Done(_)) && self.fed != self.total {
            return Err(Error::InvalidParam {
                name: "entries in this pass",
                value: self.fed as f64,
                expected: "the same entries as pass 1",
            });
        }
        let n = self.total;
        self.fed = 0;
        self.stage = match core::mem::replace(&mut self.stage, Stage::Done(TopKCut::NONE)) {
            Stage::Observing => {
                let k = self.rule.count(n)?;
                let sample = core::mem::take(&mut self.sample);
                if k == 0 {
                    Stage::Done(TopKCut::NONE)
                } else if n < SAMPLED_MIN {
                    Stage::Counting {
                        k,
                        histogram: MagnitudeHistogram::new(),
                    }
                } else {
                    let mut sample = sample;
                    Stage::Collecting {
                        k,
                        bracket: Bracket::from_sample(&mut sample, n - k + 1, n),
                        below: 0,
                        within: 0,
                        keys: Vec::new(),
                        overflow: false,
                    }
                }
            }
            Stage::Collecting {
                k,
                below,
                within,
                mut keys,
                overflow,
                ..
            } => {
                let rank = n - k + 1;
                if overflow || rank <= below || rank > below + within {
                    Stage::Counting {
                        k,
                        histogram: MagnitudeHistogram::new(),
                    }
                } else {
                    let key = *keys.select_nth_unstable((rank - below - 1) as usize).1;
                    let smaller = keys.iter().filter(|&&x| x < key).count() as u64;
                    let equal = keys.iter().filter(|&&x| x == key).count() as u64;
                    Stage::Done(TopKCut {
                        magnitude: f32::from_bits(key),
                        ties: k - (n - below - smaller - equal),
                    })
                }
            }
            Stage::Counting { k, histogram } => Stage::Refining(histogram.top_k(k)?),
            Stage::Refining(bracket) => Stage::Done(bracket.cut()?),
            done @ Stage::Done(_) => done,
        };
        Ok(!matches!(self.stage, Stage::Done(_)))
    }

    /// Passes 2 and on: the next chunk, the same chunks as pass 1 in the same order.
    pub fn refine<T: Element>(&mut self, cpu: &Cpu, chunk: &[T]) -> Result<()> {
        let slices = [chunk];
        let parts = Parts::new(cpu, &slices, 1);
        match &mut self.stage {
            Stage::Collecting {
                bracket,
                below,
                within,
                keys,
                overflow,
                ..
            } => {
                let bracket = *bracket;
                let found = map_parts(&parts, |pieces| {
                    cpu.dispatch(Collect {
                        pieces,
                        lo: bracket.lo,
                        hi: bracket.hi,
                        cap: if *overflow { 0 } else { bracket.cap },
                    })
                });
                for c in found {
                    *below += c.below;
                    *within += c.within;
                    *overflow |= c.overflow;
                    if !*overflow {
                        keys.extend_from_slice(&c.keys);
                    }
                }
                *overflow |= keys.len() > bracket.cap;
                if *overflow {
                    *keys = Vec::new();
                }
            }
            Stage::Counting { histogram, .. } => {
                count_into(cpu, &parts, histogram).map_err(|e| self.shift_index(e))?;
            }
            Stage::Refining(bracket) => refine_into(cpu, &parts, bracket)?,
            Stage::Observing | Stage::Done(_) => {
                return Err(Self::wrong_pass("refine() only while next_pass() says so"));
            }
        }
        self.fed += chunk.len() as u64;
        Ok(())
    }

    /// The cut, once [`Self::next_pass`] has returned `false`.
    pub fn cut(&self) -> Result<TopKCut> {
        match self.stage {
            Stage::Done(cut) => Ok(cut),
            _ => Err(Self::wrong_pass("cut() after next_pass() returned false")),
        }
    }

    /// Entries seen in pass 1.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// Applies a [`TopKCut`] to a vector streamed chunk by chunk, in flat order (ties to the first).
#[derive(Clone, Debug)]
pub struct TopKApplier {
    key: u32,
    ties_left: u64,
}

impl TopKApplier {
    /// An applier starting at flat index 0.
    #[must_use]
    pub fn new(cut: &TopKCut) -> Self {
        Self {
            key: magnitude_key(cut.magnitude).min(INFINITY_KEY),
            ties_left: cut.ties,
        }
    }

    /// The next chunk's cut for every part: keep every entry equal to the key for now; the caller
    /// then gives back the surplus ([`Self::settle`]) in flat order.
    pub(crate) fn chunk_cut<T: Element>(&self, parts: &Parts<'_, T>) -> Cut {
        let ties = if self.ties_left > 0 { u64::MAX } else { 0 };
        Cut {
            cut: TopKCut {
                magnitude: f32::from_bits(self.key),
                ties,
            },
            parts: alloc::vec![
                PartCut {
                    key: self.key,
                    ties
                };
                parts.pieces.len()
            ],
        }
    }

    /// Keeps the first of the equal entries of a chunk coded under [`Self::chunk_cut`] while
    /// ties last. `equal` lists, in flat order, `(word, bits)`: the entries of 64-entry word
    /// `word` equal to the key (words without any may be left out); `drop(word, bits)` must
    /// un-keep `bits` of `word`.
    pub(crate) fn settle(
        &mut self,
        equal: impl IntoIterator<Item = (usize, u64)>,
        mut drop: impl FnMut(usize, u64),
    ) {
        if self.ties_left == 0 {
            // `chunk_cut` kept none of them.
            return;
        }
        for (w, mut bits) in equal {
            let count = u64::from(bits.count_ones());
            if count <= self.ties_left {
                self.ties_left -= count;
                continue;
            }
            for _ in 0..self.ties_left {
                bits &= bits - 1;
            }
            self.ties_left = 0;
            drop(w, bits);
        }
    }

    /// The keep-mask of the next chunk (`mask.len() == ceil(chunk.len() / 64)`, bit `i % 64` of
    /// word `i / 64` for entry `i` of the chunk).
    pub fn mask<T: Element>(&mut self, cpu: &Cpu, chunk: &[T], mask: &mut [u64]) -> Result<()> {
        check_mask_len(chunk.len(), mask.len())?;
        let slices = [chunk];
        let parts = Parts::new(cpu, &slices, GROUP);
        let cut = self.chunk_cut(&parts);
        let mut equal: Vec<Vec<(usize, u64)>> = parts.pieces.iter().map(|_| Vec::new()).collect();
        let states = parts
            .split(mask, GROUP)
            .into_iter()
            .zip(equal.iter_mut())
            .collect();
        apply_cuts(
            cpu,
            &parts,
            [&cut],
            states,
            #[inline(always)]
            |(words, equal), at, _, keep| {
                words[at / GROUP] = keep.bits[0];
                if keep.run.equal != 0 {
                    equal.push((at / GROUP, keep.run.equal));
                }
            },
        )?;
        let offsets = parts.bounds.iter().map(|r| r.start / GROUP);
        self.settle(
            equal
                .iter()
                .zip(offsets)
                .flat_map(|(list, offset)| list.iter().map(move |&(w, bits)| (w + offset, bits))),
            |w, bits| mask[w] &= !bits,
        );
        Ok(())
    }
}

fn check_mask_len(n: usize, words: usize) -> Result<()> {
    if words == n.div_ceil(GROUP) {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            what: "mask (words)",
            expected: n.div_ceil(GROUP),
            found: words,
        })
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
        for rank in [1, n as u64 / 100, n as u64 / 2, n as u64] {
            let slices = [&x[..]];
            let parts = Parts::new(&cpu, &slices, 1);
            let sampled = sampled_rank(&cpu, &parts, rank)
                .unwrap()
                .expect("bracket holds");
            let exact = radix_rank(&cpu, &parts, rank).unwrap();
            assert_eq!((sampled.key, sampled.below), (exact.key, exact.below));
            assert_eq!(sampled.equal, exact.equal);
        }
        // Zeros exactly where the sample looks: it sees nothing of the rest.
        let runs = sample_runs(n as u64);
        for r in 0..runs {
            let start = (r as u128 * n as u128 / runs as u128) as usize;
            x[start..start + SAMPLE_RUN].fill(0.0);
        }
        let slices = [&x[..]];
        let parts = Parts::new(&cpu, &slices, 1);
        assert!(
            sampled_rank(&cpu, &parts, n as u64 * 3 / 4)
                .unwrap()
                .is_none()
        );
    }
}
