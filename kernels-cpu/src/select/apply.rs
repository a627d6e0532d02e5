//! Applying cuts: keep-bits of runs of 64 entries, in flat order within each part.

use alloc::vec::Vec;

use kernels_core::{Element, Result};

use super::parts::{Parts, Piece, STREAMS};
use super::rank::{Cut, PartCut};
use super::{GROUP, PREFETCH_BYTES, identity};
use crate::parallel::for_each;
use crate::simd::CACHE_LINE;
use crate::{Cpu, Scalar, Simd, WithSimd};

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
    pub(super) non_finite: u32,
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
                for line in (0..GROUP).step_by(CACHE_LINE / core::mem::size_of::<T>()) {
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
