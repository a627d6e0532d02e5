//! Selection over a vector streamed chunk by chunk: the exact top-k cut in a few passes, and
//! applying a cut chunk by chunk.

use alloc::vec::Vec;

use kernels_core::backend::{MagnitudeBracket, MagnitudeHistogram};
use kernels_core::ops::select::{KeepRule, Selection, TopKCut, magnitude_key};
use kernels_core::{Element, Error, MultiPass, Result};

use super::parts::Parts;
use super::rank::{
    Bracket, Collect, Cut, PartCut, SAMPLE_RUN, SAMPLED_MIN, count_into, refine_into,
};
use super::{
    GROUP, INFINITY_KEY, Keep, KeepValues, apply_cuts, apply_cuts_to, check_mask_len, map_parts,
    validate,
};
use crate::Cpu;

/// Entries between the starts of two sample runs of a streamed vector.
const STREAM_SAMPLE_STRIDE: u64 = 1 << 14;

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

/// Exact top-k of a vector too large for memory (a whole model), streamed chunk by chunk, in
/// the [`MultiPass`] protocol: memory is bounded by the sample and bracket (about 1 % of the
/// entries), not by `n`. The twin of [`kernels_core::ops::select::StreamingTopK`].
///
/// Usually two passes: a third and fourth only where the sampled bracket misses (vectors under
/// 65 536 entries, or data whose order fools the sample); one for a threshold rule. Apply the
/// cut with a [`TopKApplier`].
///
/// ```
/// use kernels_cpu::prelude::*;
/// let cpu = Cpu::detect();
/// let tensors: [&[f32]; 2] = [&[0.5, -3.0, 1.0], &[2.0, -0.25]];
/// let mut topk = StreamingTopK::new(KeepRule::Count(2))?;
/// loop {
///     for t in tensors { topk.feed(&cpu, t)?; }
///     if !topk.next_pass()? { break; }
/// }
/// assert_eq!(topk.finish()?, TopKCut { magnitude: 2.0, ties: 1 });
/// # Ok::<(), Error>(())
/// ```
pub struct StreamingTopK {
    keep: KeepRule,
    stage: Stage,
    /// Entries of pass 1.
    total: u64,
    /// Entries fed in the current pass.
    fed: u64,
    sample: Vec<u32>,
}

impl StreamingTopK {
    /// A selection keeping `keep` (a count is checked against the total after pass 1).
    pub fn new(keep: KeepRule) -> Result<Self> {
        keep.validate()?;
        Ok(Self {
            keep,
            stage: Stage::Observing,
            total: 0,
            fed: 0,
            sample: Vec::new(),
        })
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

    /// The next chunk of the current pass (the same chunks in every pass, in the same order). A
    /// non-finite entry is an error naming its flat index.
    pub fn feed<T: Element>(&mut self, cpu: &Cpu, chunk: &[T]) -> Result<()> {
        if matches!(self.stage, Stage::Observing) {
            let slices = [chunk];
            validate(cpu, &Parts::new(cpu, &slices, 1)).map_err(|e| self.shift_index(e))?;
            return self.feed_validated(chunk);
        }
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
                let capped = Bracket {
                    cap: if *overflow { 0 } else { bracket.cap },
                    ..bracket
                };
                let found = map_parts(&parts, |pieces| {
                    cpu.dispatch(Collect {
                        pieces,
                        brackets: [capped],
                    })
                });
                for [c] in found {
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
                return Err(Error::PassOrder {
                    what: "StreamingTopK::feed",
                    expected: "no more chunks once next_pass() has returned false",
                });
            }
        }
        self.fed += chunk.len() as u64;
        Ok(())
    }

    /// Pass 1's [`Self::feed`] of a chunk the caller has checked is finite.
    pub(crate) fn feed_validated<T: Element>(&mut self, chunk: &[T]) -> Result<()> {
        if !matches!(self.stage, Stage::Observing) {
            return Err(Error::PassOrder {
                what: "StreamingTopK::feed",
                expected: "the first pass",
            });
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

    /// Entries seen in pass 1.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.total
    }
}

impl MultiPass for StreamingTopK {
    type Output = TopKCut;

    fn next_pass(&mut self) -> Result<bool> {
        if !matches!(self.stage, Stage::Observing | Stage::Done(_)) && self.fed != self.total {
            return Err(Error::PassOrder {
                what: "StreamingTopK::next_pass",
                expected: "every chunk of the first pass fed again before the pass ends",
            });
        }
        let n = self.total;
        let next = match &self.stage {
            Stage::Observing => match self.keep.selection(n)? {
                Selection::Cut(cut) => Stage::Done(cut),
                Selection::Top(0) => Stage::Done(TopKCut::NONE),
                Selection::Top(k) if n < SAMPLED_MIN => Stage::Counting {
                    k,
                    histogram: MagnitudeHistogram::new(),
                },
                Selection::Top(k) => Stage::Collecting {
                    k,
                    bracket: Bracket::from_sample(&mut self.sample, n - k + 1, n),
                    below: 0,
                    within: 0,
                    keys: Vec::new(),
                    overflow: false,
                },
            },
            Stage::Collecting {
                k,
                below,
                within,
                keys,
                overflow,
                ..
            } => {
                let (k, below, within) = (*k, *below, *within);
                let rank = n - k + 1;
                if *overflow || rank <= below || rank > below + within {
                    Stage::Counting {
                        k,
                        histogram: MagnitudeHistogram::new(),
                    }
                } else {
                    let mut keys = keys.clone();
                    let key = *keys.select_nth_unstable((rank - below - 1) as usize).1;
                    let smaller = keys.iter().filter(|&&x| x < key).count() as u64;
                    let equal = keys.iter().filter(|&&x| x == key).count() as u64;
                    Stage::Done(TopKCut {
                        magnitude: f32::from_bits(key),
                        ties: k - (n - below - smaller - equal),
                    })
                }
            }
            Stage::Counting { k, histogram } => Stage::Refining(histogram.top_k(*k)?),
            Stage::Refining(bracket) => Stage::Done(bracket.cut()?),
            Stage::Done(_) => return Ok(false),
        };
        self.stage = next;
        self.sample = Vec::new();
        self.fed = 0;
        Ok(!matches!(self.stage, Stage::Done(_)))
    }

    fn finish(&self) -> Result<TopKCut> {
        match self.stage {
            Stage::Done(cut) => Ok(cut),
            _ => Err(Error::PassOrder {
                what: "StreamingTopK::finish",
                expected: "every pass fed, until next_pass() returns false",
            }),
        }
    }
}

/// Applies a [`TopKCut`] to a vector streamed chunk by chunk, in flat order (ties to the first):
/// the twin of [`kernels_core::ops::select::TopKApplier`].
///
/// ```
/// use kernels_cpu::prelude::*;
/// let cpu = Cpu::detect();
/// let tensors: [&[f32]; 2] = [&[0.5, -3.0, 1.0], &[2.0, -2.0]];
/// let cut = topk_cut(&cpu, &tensors, KeepRule::Count(2))?;
/// let mut applier = TopKApplier::new(&cut);
/// let (mut first, mut second) = ([0.0f32; 3], [0.0f32; 2]);
/// applier.keep(&cpu, tensors[0], &mut first)?;
/// applier.keep(&cpu, tensors[1], &mut second)?;
/// assert_eq!((first, second), ([0.0, -3.0, 0.0], [2.0, 0.0]));
/// # Ok::<(), Error>(())
/// ```
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
    ///
    /// ```
    /// use kernels_cpu::prelude::*;
    /// let cpu = Cpu::detect();
    /// let tensors: [&[f32]; 2] = [&[0.5, -3.0, 1.0], &[2.0, -2.0]];
    /// let mut applier = TopKApplier::new(&topk_cut(&cpu, &tensors, KeepRule::Count(2))?);
    /// let (mut first, mut second) = ([0u64; 1], [0u64; 1]);
    /// applier.mask(&cpu, tensors[0], &mut first)?;
    /// applier.mask(&cpu, tensors[1], &mut second)?;
    /// // The tie at 2.0 goes to the first in flat order.
    /// assert_eq!((first, second), ([0b010], [0b01]));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn mask<T: Element>(&mut self, cpu: &Cpu, chunk: &[T], mask: &mut [u64]) -> Result<()> {
        check_mask_len(chunk.len(), mask.len())?;
        self.apply_chunk(
            cpu,
            chunk,
            mask,
            GROUP,
            #[inline(always)]
            |words, at, _, keep| words[at / GROUP] = keep.bits[0],
            |mask, w, bits| mask[w] &= !bits,
        )
    }

    /// The next chunk with what the cut drops zeroed: `out = kept ? x : 0`, written as `O` (`T`
    /// itself or `f32`: exact).
    pub fn keep<T: Element, O: Element>(
        &mut self,
        cpu: &Cpu,
        chunk: &[T],
        out: &mut [O],
    ) -> Result<()> {
        super::check_out(chunk.len(), out.len())?;
        let slices = [chunk];
        let parts = Parts::new(cpu, &slices, GROUP);
        let cut = self.chunk_cut(&parts);
        let mut equal: Vec<Vec<(usize, u64)>> = parts.pieces.iter().map(|_| Vec::new()).collect();
        let sinks = parts
            .split(out, 1)
            .into_iter()
            .zip(equal.iter_mut())
            .map(|(out, equal)| KeepValues {
                out,
                select: |kept: [u32; 1]| kept[0],
                equal: Some(equal),
            })
            .collect();
        apply_cuts_to(cpu, &parts, [&cut], sinks)?;
        let zero = O::from_f32(0.0);
        self.settle_parts(&parts, &equal, |w, mut bits| {
            while bits != 0 {
                out[w * GROUP + bits.trailing_zeros() as usize] = zero;
                bits &= bits - 1;
            }
        });
        Ok(())
    }

    /// Applies the cut to the next chunk: `write(part_out, at, run, keep)` for every run of up to
    /// [`GROUP`] entries (each part writes its own slice of `out`, `per` entries to an item),
    /// keeping every entry equal to the cut; then `drop(out, word, bits)` gives back the ties
    /// beyond the cut's count, in flat order (word `w` covers entries `w * GROUP..`).
    fn apply_chunk<T: Element, O: Send>(
        &mut self,
        cpu: &Cpu,
        chunk: &[T],
        out: &mut [O],
        per: usize,
        write: impl Fn(&mut [O], usize, &[T], Keep<1>) + Sync,
        mut drop: impl FnMut(&mut [O], usize, u64),
    ) -> Result<()> {
        let slices = [chunk];
        let parts = Parts::new(cpu, &slices, GROUP);
        let cut = self.chunk_cut(&parts);
        let mut equal: Vec<Vec<(usize, u64)>> = parts.pieces.iter().map(|_| Vec::new()).collect();
        let states = parts
            .split(out, per)
            .into_iter()
            .zip(equal.iter_mut())
            .collect();
        apply_cuts(
            cpu,
            &parts,
            [&cut],
            states,
            #[inline(always)]
            |(part, equal), at, run, keep| {
                write(part, at, run, keep);
                if keep.run.equal != 0 {
                    equal.push((at / GROUP, keep.run.equal));
                }
            },
        )?;
        self.settle_parts(&parts, &equal, |w, bits| drop(out, w, bits));
        Ok(())
    }

    /// [`Self::settle`] of a chunk's parts, each with its own list of `(word, bits)` (words
    /// counted from the part's start).
    fn settle_parts<T>(
        &mut self,
        parts: &Parts<'_, T>,
        equal: &[Vec<(usize, u64)>],
        drop: impl FnMut(usize, u64),
    ) {
        let offsets = parts.bounds.iter().map(|r| r.start / GROUP);
        self.settle(
            equal
                .iter()
                .zip(offsets)
                .flat_map(|(list, offset)| list.iter().map(move |&(w, bits)| (w + offset, bits))),
            drop,
        );
    }
}
