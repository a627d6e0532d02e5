//! Walking the non-zeros of a sparse (Golomb-Rice) payload: a checked walk of one block, which
//! reports exactly where it fails, and the fast walk of several blocks at once.
//!
//! Decoding a Rice stream is a chain: where a code starts depends on the length of the one
//! before it (a load, a count of trailing ones and a shift, about 15 cycles). Blocks of the
//! version-2 layout start at known bytes, so the fast walk advances [`LANES`] cursors over
//! different blocks in turn, and the core overlaps their chains; threads take disjoint blocks.

use core::ops::Range;

use kernels_core::Result;
use kernels_core::format::{RICE_BLOCK, RiceBlock, TernaryHeader};

use super::{bad, word_at};
use crate::{Cpu, Simd, WithSimd};

/// Cursors a thread advances in turn (independent decoding chains in flight).
pub(super) const LANES: usize = 4;

/// A validated sparse payload: its blocks, each with its own stream.
pub(super) struct Blocks<'a> {
    pub(super) payload: &'a [u8],
    pub(super) list: alloc::vec::Vec<RiceBlock>,
    pub(super) k: u32,
    /// Elements per block: [`RICE_BLOCK`], or the whole tensor for a version-1 payload (one block).
    pub(super) unit: u64,
}

impl<'a> Blocks<'a> {
    /// The blocks of `payload`, after checking its index (not its streams).
    pub(super) fn new(header: &TernaryHeader, payload: &'a [u8]) -> Result<Self> {
        Ok(Self {
            payload,
            list: kernels_core::format::rice_blocks(header, payload)?.collect(),
            k: u32::from(header.rice_k),
            unit: if header.version == 1 {
                header.numel.max(1)
            } else {
                RICE_BLOCK
            },
        })
    }
}

impl Blocks<'_> {
    /// The elements of blocks `blocks`.
    pub(super) fn elements(&self, blocks: Range<usize>) -> Range<u64> {
        let at = |b: usize| self.list.get(b).map_or(u64::MAX, |b| b.first);
        let end = self.list.last().map_or(0, |b| b.end);
        at(blocks.start).min(end)..at(blocks.end).min(end)
    }
}

/// What a walk reports: the elements a cursor enters (a block's part of its range, in order, empty
/// blocks too) and every non-zero in them.
pub(super) trait NonZeros {
    /// Cursor `lane` enters `elements` (before any of their non-zeros).
    #[inline(always)]
    fn enter(&mut self, lane: usize, elements: Range<u64>) {
        let _ = (lane, elements);
    }
    /// Cursor `lane` found a non-zero at flat index `index` (`s`: the walk's vector operations).
    fn code<S: Simd>(&mut self, s: S, lane: usize, index: u64, negative: bool);
}

/// One code at bit `pos` of `stream`: its gap and sign, `pos` moved past it. The stream is read
/// as zeros past its end, so a hostile one cannot read out of bounds; the caller checks `pos`.
#[inline(always)]
fn next_code(stream: &[u8], k: u32, low_mask: u64, pos: &mut u64) -> (u64, bool) {
    let window = word_at(stream, (*pos / 8) as usize) >> (*pos % 8);
    let ones = window.trailing_ones();
    // PERF: one window (at least 57 valid bits) usually holds the whole code.
    if ones + k + 2 <= 57 {
        let rest = window >> (ones + 1);
        *pos += u64::from(ones + k + 2);
        return (
            (u64::from(ones) << k) | (rest & low_mask),
            (rest >> k) & 1 == 1,
        );
    }
    long_code(stream, k, pos)
}

/// [`next_code`] for a code longer than one window.
#[cold]
#[inline(never)]
fn long_code(stream: &[u8], k: u32, pos: &mut u64) -> (u64, bool) {
    let mut quotient = 0u64;
    loop {
        let window = word_at(stream, (*pos / 8) as usize) >> (*pos % 8);
        let valid = 64 - (*pos % 8) as u32;
        let ones = window.trailing_ones().min(valid);
        quotient += u64::from(ones);
        *pos += u64::from(ones);
        if ones < valid {
            break;
        }
    }
    *pos += 1; // the terminating zero
    let window = word_at(stream, (*pos / 8) as usize) >> (*pos % 8);
    *pos += u64::from(k) + 1;
    // A gap past u64 only comes from a hostile stream: saturated, it stays past the end.
    let gap = if quotient.leading_zeros() < k {
        u64::MAX
    } else {
        (quotient << k) | (window & ((1u64 << k) - 1))
    };
    (gap, (window >> k) & 1 == 1)
}

/// One cursor: the elements it covers, the block it is in and where it is in that block.
struct Lane {
    /// The lane's number, as reported to the sink.
    id: usize,
    elements: Range<u64>,
    /// The next block to enter, and one past the lane's last.
    block: usize,
    last_block: usize,
    /// Bit position in the payload, the flat index the next gap counts from, codes left in the
    /// block.
    pos: u64,
    next: u64,
    left: u64,
    /// The part of the block inside `elements`: its first index and its length.
    window: (u64, u64),
    /// Whether the lane has walked a block it has not checked yet.
    walked: bool,
}

impl Lane {
    fn new(blocks: &Blocks<'_>, id: usize, elements: Range<u64>) -> Self {
        let (block, last_block) = if elements.is_empty() {
            (0, 0)
        } else {
            (
                (elements.start / blocks.unit) as usize,
                (elements.end.div_ceil(blocks.unit) as usize).min(blocks.list.len()),
            )
        };
        Self {
            id,
            elements,
            block,
            last_block,
            pos: 0,
            next: 0,
            left: 0,
            window: (0, 0),
            walked: false,
        }
    }

    /// Whether the block just walked is inconsistent: bits missing, left over, or non-zero
    /// padding.
    fn ended_badly(&self, blocks: &Blocks<'_>) -> bool {
        let b = &blocks.list[self.block - 1];
        let bits = self.pos - 8 * b.bytes.start as u64;
        let used = bits.div_ceil(8);
        used != b.bytes.len() as u64
            || (!bits.is_multiple_of(8)
                && blocks.payload[b.bytes.start + used as usize - 1] >> (bits % 8) != 0)
    }

    /// Enters the lane's next block with codes (telling `sink` of every block entered); `left`
    /// stays 0 once the lane is done. With `CHECK`, the block left behind is checked first.
    fn enter<const CHECK: bool>(
        &mut self,
        blocks: &Blocks<'_>,
        sink: &mut impl NonZeros,
        bad: &mut Option<usize>,
    ) {
        while self.left == 0 {
            if CHECK && self.walked && self.ended_badly(blocks) {
                let block = self.block - 1;
                *bad = Some(bad.map_or(block, |b| b.min(block)));
            }
            self.walked = false;
            let Some(b) = blocks
                .list
                .get(self.block)
                .filter(|_| self.block < self.last_block)
            else {
                return;
            };
            self.block += 1;
            self.walked = true;
            self.pos = 8 * b.bytes.start as u64;
            self.next = b.first;
            self.left = b.nnz;
            let first = b.first.max(self.elements.start);
            let end = b.end.min(self.elements.end);
            self.window = (first, end - first);
            sink.enter(self.id, first..end);
        }
    }
}

/// Calls `f(0)` to `f(N - 1)` (at most 4), unrolled.
///
/// PERF: a loop over the lanes was not unrolled, which kept the positions in an array on the
/// stack indexed at run time: a store and a load on every code's dependency chain.
#[inline(always)]
fn each_lane<const N: usize>(mut f: impl FnMut(usize)) {
    const { assert!(N >= 1 && N <= 4) };
    f(0);
    if N > 1 {
        f(1);
    }
    if N > 2 {
        f(2);
    }
    if N > 3 {
        f(3);
    }
}

/// Walks `count` codes of every lane of `lanes` (each has that many left in its block), one code
/// of each in turn. With `FILTER` only the codes inside a lane's window are reported; with `CHECK`
/// a code outside it marks the block bad.
#[inline(always)]
fn run<S: Simd, const CHECK: bool, const FILTER: bool, const N: usize>(
    s: S,
    blocks: &Blocks<'_>,
    lanes: &mut [Lane; N],
    count: u64,
    sink: &mut impl NonZeros,
    bad: &mut Option<usize>,
) {
    let mut pos: [u64; N] = core::array::from_fn(|l| lanes[l].pos);
    let mut next: [u64; N] = core::array::from_fn(|l| lanes[l].next);
    let (payload, k) = (blocks.payload, blocks.k);
    let low_mask = (1u64 << k) - 1;
    for _ in 0..count {
        each_lane::<N>(
            #[inline(always)]
            |l| {
                let (gap, negative) = next_code(payload, k, low_mask, &mut pos[l]);
                // Validated payloads never saturate; a hostile gap stays past the block's end.
                let index = if CHECK {
                    next[l].saturating_add(gap)
                } else {
                    next[l] + gap
                };
                next[l] = index.wrapping_add(1);
                let lane = &lanes[l];
                if (CHECK || FILTER) && index.wrapping_sub(lane.window.0) >= lane.window.1 {
                    if CHECK {
                        let block = lane.block - 1;
                        *bad = Some(bad.map_or(block, |b| b.min(block)));
                    }
                    return;
                }
                // PERF: with every lane in turn, their numbers are constants, so a sink's per-lane
                // state can stay in registers.
                sink.code(s, if N == LANES { l } else { lane.id }, index, negative);
            },
        );
    }
    for (l, lane) in lanes.iter_mut().enumerate() {
        (lane.pos, lane.next) = (pos[l], next[l]);
        lane.left -= count;
    }
}

/// Walks the non-zeros of elements `ranges[lane]` for each lane, on one cursor each, advanced in
/// turn, and the cursors left at the end one at a time. `FILTER` is needed where a range does not
/// start and end on block boundaries. Without `CHECK` the payload must have been validated; with
/// it, returns the lowest block found inconsistent (its codes may have been reported), to be
/// walked by [`check_block`].
///
/// Runs through [`Cpu::dispatch`] although the walk is scalar: x86-64-v3's BMI1/BMI2 shifts and
/// bit counts save instructions on every code, and the prefetches of [`NonZeros::code`] need it.
pub(super) fn walk<Z: NonZeros, const CHECK: bool, const FILTER: bool>(
    cpu: &Cpu,
    blocks: &Blocks<'_>,
    ranges: [Range<u64>; LANES],
    sink: Z,
) -> (Z, Option<usize>) {
    cpu.dispatch(Walk::<Z, CHECK, FILTER> {
        blocks,
        ranges,
        sink,
    })
}

/// [`walk`]'s arguments.
///
/// PERF: the sink moves in and out by value, so that its per-lane state can live in registers
/// (behind a reference, a GEMV's row sums went through memory on every code).
struct Walk<'a, 'b, Z, const CHECK: bool, const FILTER: bool> {
    blocks: &'a Blocks<'b>,
    ranges: [Range<u64>; LANES],
    sink: Z,
}

impl<Z: NonZeros, const CHECK: bool, const FILTER: bool> WithSimd
    for Walk<'_, '_, Z, CHECK, FILTER>
{
    type Output = (Z, Option<usize>);

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> (Z, Option<usize>) {
        let mut sink = self.sink;
        let bad = walk_lanes::<S, CHECK, FILTER>(s, self.blocks, self.ranges, &mut sink);
        (sink, bad)
    }
}

#[inline(always)]
fn walk_lanes<S: Simd, const CHECK: bool, const FILTER: bool>(
    s: S,
    blocks: &Blocks<'_>,
    ranges: [Range<u64>; LANES],
    sink: &mut impl NonZeros,
) -> Option<usize> {
    let mut ranges = ranges.into_iter().enumerate();
    let mut lanes: [Lane; LANES] = core::array::from_fn(|_| {
        let (id, range) = ranges.next().unwrap_or((0, 0..0));
        Lane::new(blocks, id, range)
    });
    let mut bad = None;
    loop {
        for lane in &mut lanes {
            lane.enter::<CHECK>(blocks, sink, &mut bad);
        }
        let Some(count) = lanes.iter().map(|lane| lane.left).min().filter(|&c| c > 0) else {
            break;
        };
        run::<S, CHECK, FILTER, LANES>(s, blocks, &mut lanes, count, sink, &mut bad);
    }
    for lane in &mut lanes {
        loop {
            lane.enter::<CHECK>(blocks, sink, &mut bad);
            if lane.left == 0 {
                break;
            }
            let count = lane.left;
            run::<S, CHECK, FILTER, 1>(
                s,
                blocks,
                core::array::from_mut(lane),
                count,
                sink,
                &mut bad,
            );
        }
    }
    bad
}

/// Splits `elements` into [`LANES`] ranges on multiples of `align` (some possibly empty).
pub(super) fn lane_ranges(elements: Range<u64>, align: u64) -> [Range<u64>; LANES] {
    let len = elements.end - elements.start;
    let step = len.div_ceil(LANES as u64).div_ceil(align.max(1)) * align.max(1);
    core::array::from_fn(|lane| {
        let start = (elements.start + lane as u64 * step).min(elements.end);
        start..(start + step).min(elements.end)
    })
}

/// Checks one block of a sparse payload as the reference decoder does
/// ([`kernels_core::format::decode_into`]), reporting where it fails; `base` is the payload's
/// offset in the encoding.
pub(super) fn check_block(blocks: &Blocks<'_>, block: &RiceBlock, base: usize) -> Result<()> {
    let payload = &blocks.payload[block.bytes.clone()];
    let base = base + block.bytes.start;
    let total_bits = payload.len() as u64 * 8;
    let k = blocks.k;
    // The largest quotient whose gap can still land inside the block.
    let max_quotient = (block.end - block.first).saturating_sub(1) >> k;
    let mut pos = 0u64;
    let mut next = block.first;
    let ends_early = |pos: u64| bad(base + (pos / 8) as usize, "sparse payload ends early");
    let past_end = |pos: u64| bad(base + (pos / 8) as usize, "gap runs past the end");
    for _ in 0..block.nnz {
        let mut quotient = 0u64;
        loop {
            if pos >= total_bits {
                return Err(ends_early(pos));
            }
            let window = word_at(payload, (pos / 8) as usize) >> (pos % 8);
            let valid = (64 - pos % 8).min(total_bits - pos);
            let ones = u64::from(window.trailing_ones()).min(valid);
            quotient += ones;
            pos += ones;
            if quotient > max_quotient {
                return Err(past_end(pos));
            }
            if ones < valid {
                pos += 1; // the terminating zero
                break;
            }
        }
        if pos + u64::from(k) + 1 > total_bits {
            return Err(ends_early(total_bits));
        }
        let window = word_at(payload, (pos / 8) as usize) >> (pos % 8);
        // k <= 31 and pos % 8 <= 7: the remainder and sign fit in the window.
        let remainder = window & ((1u64 << k) - 1);
        pos += u64::from(k) + 1;
        let index = next + ((quotient << k) | remainder);
        if index >= block.end {
            return Err(past_end(pos));
        }
        next = index + 1;
    }
    let used = pos.div_ceil(8) as usize;
    if used != payload.len() {
        return Err(bad(base + used, "bytes after the last code"));
    }
    if !pos.is_multiple_of(8) && payload[used - 1] >> (pos % 8) != 0 {
        return Err(bad(base + used - 1, "padding bits are not zero"));
    }
    Ok(())
}
