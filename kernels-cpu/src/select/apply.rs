//! Applying cuts: keep-bits of runs of 64 entries, in flat order within each part.

use alloc::vec::Vec;

use kernels_core::{Element, Result};

use super::parts::{Parts, Piece, STREAMS};
use super::rank::{Cut, PartCut};
use super::{GROUP, PREFETCH_BYTES};
use crate::parallel::for_each;
use crate::simd::{CACHE_LINE, WordBounds, bits16, bits16_mut, word_keys};
use crate::{Cpu, Scalar, Simd, WithSimd};

/// The keep-bits of a run of up to 64 elements under each cut (consuming ties in order), and
/// what else the pass learns of it; `sink` sees each vector as it is classified (`at` is the
/// run's start in the part). With `words` (the cuts' keys as [`WordBounds`], where the
/// instruction set classifies `T`'s words) whole `2 * LANES` runs of 16-bit entries are
/// classified without widening.
#[inline(always)]
fn keep_group<S: Simd, T: Element, K: PartSink<T, C>, const C: usize>(
    s: S,
    group: &[T],
    cuts: &mut [PartCut; C],
    words: Option<&[WordBounds; C]>,
    sink: &mut K,
    at: usize,
) -> Keep<C> {
    let mut keep = Keep {
        bits: [0; C],
        run: RunBits::default(),
    };
    let mut done = 0;
    if let Some(bounds) = words {
        let width = 2 * S::LANES;
        done = group.len() - group.len() % width;
        for (v, chunk) in group[..done].chunks_exact(width).enumerate() {
            let lanes = bits16(chunk);
            let mut kept = [0u32; C];
            // PERF: plain loops, not `array::from_fn` (see `classify_all`).
            for (((lane_bits, bits), cut), &b) in kept
                .iter_mut()
                .zip(&mut keep.bits)
                .zip(cuts.iter_mut())
                .zip(bounds)
            {
                *lane_bits = cut.keep_words(s, lanes, b, &mut keep.run, v * width);
                *bits |= u64::from(*lane_bits) << (v * width);
            }
            sink.words(s, at + v * width, chunk, kept);
        }
    }
    let main = done + (group.len() - done) / S::LANES * S::LANES;
    for (v, lanes) in group[done..main].chunks_exact(S::LANES).enumerate() {
        let first = done + v * S::LANES;
        let values = s.load(lanes);
        let mut kept = [0u32; C];
        // PERF: plain loops, not `array::from_fn`: a closure that is not inlined would run the
        // vector operations without the dispatched target features.
        for ((lane_bits, bits), cut) in kept.iter_mut().zip(&mut keep.bits).zip(cuts.iter_mut()) {
            *lane_bits = cut.keep(s, values, &mut keep.run, first);
            *bits |= u64::from(*lane_bits) << first;
        }
        sink.lanes(s, at + first, values, kept);
    }
    for (j, x) in group.iter().enumerate().skip(main) {
        let value = x.to_f32();
        let mut kept = [0u32; C];
        for ((lane_bits, bits), cut) in kept.iter_mut().zip(&mut keep.bits).zip(cuts.iter_mut()) {
            *lane_bits = cut.keep(Scalar, value, &mut keep.run, j);
            *bits |= u64::from(*lane_bits) << j;
        }
        sink.lanes(Scalar, at + j, value, kept);
    }
    keep
}

/// [`PartSink::words`] through [`PartSink::lanes`]: the entries widened, one vector at a time.
#[inline(always)]
fn words_as_lanes<S: Simd, T: Element, K: PartSink<T, C> + ?Sized, const C: usize>(
    sink: &mut K,
    s: S,
    at: usize,
    chunk: &[T],
    kept: [u32; C],
) {
    let lane_mask = u32::MAX >> (32 - S::LANES);
    for (h, half) in chunk.chunks_exact(S::LANES).enumerate() {
        let mut lanes = [0u32; C];
        for (l, &k) in lanes.iter_mut().zip(&kept) {
            *l = (k >> (h * S::LANES)) & lane_mask;
        }
        sink.lanes(s, at + h * S::LANES, s.load(half), lanes);
    }
}

/// What the final pass does with one part's entries, run by run in flat order.
pub(crate) trait PartSink<T: Element, const C: usize>: Send {
    /// Each vector (or tail element) as it is classified: `at` its first lane's index in the
    /// part, `values` its lanes widened, bit `j` of `kept[c]` set iff lane `j` is kept under cut
    /// `c`.
    #[inline(always)]
    fn lanes<S: Simd>(&mut self, s: S, at: usize, values: S::F32, kept: [u32; C]) {
        let _ = (s, at, values, kept);
    }
    /// [`PartSink::lanes`] for `2 * LANES` 16-bit entries classified from their words: `chunk`
    /// the entries, bit `j` of `kept[c]` set iff `chunk[j]` is kept under cut `c`. By default,
    /// widened and passed to [`PartSink::lanes`].
    #[inline(always)]
    fn words<S: Simd>(&mut self, s: S, at: usize, chunk: &[T], kept: [u32; C]) {
        words_as_lanes(self, s, at, chunk, kept);
    }
    /// Each run of up to [`GROUP`] entries once its vectors are done: `at` its start in the part.
    #[inline(always)]
    fn run(&mut self, at: usize, run: &[T], keep: Keep<C>) {
        let _ = (at, run, keep);
    }
}

/// A part's state and the closure [`apply_cuts`] calls on each of its runs.
struct RunFn<'f, W, F> {
    state: W,
    f: &'f F,
}

impl<T: Element, W: Send, F: Fn(&mut W, usize, &[T], Keep<C>) + Sync, const C: usize> PartSink<T, C>
    for RunFn<'_, W, F>
{
    #[inline(always)]
    fn run(&mut self, at: usize, run: &[T], keep: Keep<C>) {
        (self.f)(&mut self.state, at, run, keep);
    }
}

/// The masked copy of one part, vector by vector: `out = kept ? x : +0.0` as `O`, where
/// `select` picks the kept lanes from each cut's. Records the runs holding entries equal to the
/// (last) cut where asked, as `(word, bits)` with word `w` covering part entries `w * GROUP..`.
pub(crate) struct KeepValues<'a, O, M> {
    pub(crate) out: &'a mut [O],
    pub(crate) select: M,
    pub(crate) equal: Option<&'a mut Vec<(usize, u64)>>,
}

impl<T: Element, O: Element, M: Fn([u32; C]) -> u32 + Send, const C: usize> PartSink<T, C>
    for KeepValues<'_, O, M>
{
    #[inline(always)]
    fn lanes<S: Simd>(&mut self, s: S, at: usize, values: S::F32, kept: [u32; C]) {
        // PERF: a lane mask and one vector store; the element-by-element select it replaces
        // branched on every bit (2x slower than the rest of the pass on random masks).
        s.store_as(
            s.keep_lanes((self.select)(kept), values),
            &mut self.out[at..at + S::LANES],
        );
    }
    #[inline(always)]
    fn words<S: Simd>(&mut self, s: S, at: usize, chunk: &[T], kept: [u32; C]) {
        if O::DTYPE == T::DTYPE {
            // PERF: the kept entries' own words, masked: no widening and no rounding back.
            s.keep_words(
                (self.select)(kept),
                bits16(chunk),
                bits16_mut(&mut self.out[at..at + chunk.len()]),
            );
        } else {
            words_as_lanes(self, s, at, chunk, kept);
        }
    }
    #[inline(always)]
    fn run(&mut self, at: usize, _: &[T], keep: Keep<C>) {
        if let Some(equal) = &mut self.equal
            && keep.run.equal != 0
        {
            equal.push((at / GROUP, keep.run.equal));
        }
    }
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
    pub(super) non_finite: u32,
}

/// The keep-bits of a run under each cut, and its [`RunBits`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Keep<const C: usize> {
    /// Kept, under each cut.
    pub(crate) bits: [u64; C],
    pub(crate) run: RunBits,
}

/// The final pass over one group: each part's runs of up to 64 elements in flat order, the
/// group's parts interleaved, fed to the part's sink.
struct ApplyCuts<'a, 's, T, K, const C: usize> {
    group: &'a [Vec<Piece<'a, T>>],
    /// Where each part starts in the flat vector.
    starts: [usize; STREAMS],
    cuts: [[PartCut; C]; STREAMS],
    sinks: &'s mut [K],
}

impl<T: Element, K: PartSink<T, C>, const C: usize> WithSimd for ApplyCuts<'_, '_, T, K, C> {
    /// Whether any entry was non-finite.
    type Output = bool;

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> bool {
        let Self {
            group,
            starts,
            mut cuts,
            sinks,
        } = self;
        let ahead = PREFETCH_BYTES / core::mem::size_of::<T>();
        let words = word_keys::<S, T>()
            .then(|| cuts.map(|cuts| cuts.map(|cut| WordBounds::of::<T>(cut.key, cut.key))));
        // Per part: the piece being read and the offset in it.
        let mut cursors = [(0usize, 0usize); STREAMS];
        let mut non_finite = 0;
        loop {
            let mut busy = false;
            for (p, (pieces, sink)) in group.iter().zip(sinks.iter_mut()).enumerate() {
                let (piece_at, offset) = &mut cursors[p];
                let Some(piece) = pieces.get(*piece_at) else {
                    continue;
                };
                busy = true;
                let end = (*offset + GROUP).min(piece.data.len());
                for line in (0..GROUP).step_by(CACHE_LINE / core::mem::size_of::<T>()) {
                    if let Some(v) = piece.data.get(*offset + ahead + line) {
                        s.prefetch(v);
                    }
                }
                let at = piece.first as usize + *offset - starts[p];
                let run = &piece.data[*offset..end];
                let words = words.as_ref().map(|w| &w[p]);
                let keep = keep_group(s, run, &mut cuts[p], words, sink, at);
                non_finite |= keep.run.non_finite;
                sink.run(at, run, keep);
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
    states: Vec<W>,
    f: impl Fn(&mut W, usize, &[T], Keep<C>) + Sync,
) -> Result<()> {
    let sinks = states
        .into_iter()
        .map(|state| RunFn { state, f: &f })
        .collect();
    apply_cuts_to(cpu, parts, cuts, sinks)
}

/// [`apply_cuts`] into one [`PartSink`] per part.
pub(crate) fn apply_cuts_to<T: Element, K: PartSink<T, C>, const C: usize>(
    cpu: &Cpu,
    parts: &Parts<'_, T>,
    cuts: [&Cut; C],
    mut sinks: Vec<K>,
) -> Result<()> {
    let mut non_finite: Vec<bool> = alloc::vec![false; sinks.len().div_ceil(STREAMS)];
    let work: Vec<_> = sinks
        .chunks_mut(STREAMS)
        .enumerate()
        .map(|(g, sinks)| (g * STREAMS, sinks))
        .zip(non_finite.iter_mut())
        .collect();
    for_each(work, |((first, sinks), non_finite)| {
        *non_finite = cpu.dispatch(ApplyCuts {
            group: &parts.pieces[first..first + sinks.len()],
            starts: core::array::from_fn(|p| {
                parts.bounds.get(first + p).map_or(0, |range| range.start)
            }),
            cuts: core::array::from_fn(|p| {
                core::array::from_fn(|c| {
                    cuts[c]
                        .parts
                        .get(first + p)
                        .copied()
                        .unwrap_or(PartCut::NONE)
                })
            }),
            sinks,
        });
    });
    if non_finite.contains(&true) {
        return Err(parts.non_finite_error());
    }
    Ok(())
}
