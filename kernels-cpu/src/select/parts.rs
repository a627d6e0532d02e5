//! The flat vector of many slices, cut into parts that threads read.

use alloc::vec::Vec;
use core::ops::Range;

use kernels_core::{Element, Error};

use crate::Cpu;
use crate::parallel::{for_each, parts_for, ranges};

/// Most elements one group of parts may hold, so its per-bin counts fit `u32`.
const MAX_GROUP: usize = 1 << 31;

/// Sub-ranges a thread reads at once where order does not matter. PERF: one sequential stream
/// per core reaches about 60 % of DRAM bandwidth here; four reach the STREAM figure.
pub(crate) const STREAMS: usize = 4;

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
    pub(super) fn run_at(&self, flat: usize, len: usize) -> &'a [T] {
        let slice = self.starts.partition_point(|&s| s <= flat) - 1;
        let offset = flat - self.starts[slice];
        let data = self.slices[slice];
        &data[offset..(offset + len).min(data.len())]
    }

    /// The flat index of the first non-finite entry.
    pub(super) fn first_non_finite(&self) -> Option<usize> {
        self.slices
            .iter()
            .zip(&self.starts)
            .find_map(|(s, &start)| {
                s.iter()
                    .position(|v| !v.to_f32().is_finite())
                    .map(|i| start + i)
            })
    }

    pub(super) fn non_finite_error(&self) -> Error {
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
