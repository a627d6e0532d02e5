//! ComPEFT compression at memory speed: global statistics and global top-k over a model streamed
//! tensor by tensor, then each tensor coded straight into the packed ternary format.
//!
//! # Contracts
//!
//! Those of [`kernels_core::ops::ternary`] and [`kernels_core::format`]:
//!
//! * the codes, and so the packed bytes, are **bit-identical** to the reference
//!   ([`kernels_core::ops::ternary::compeft_ref`] coded by [`kernels_core::format::encode`]): the
//!   selection is exact, ties go to the lower flat index, the Rice parameter is the one the
//!   reference picks;
//! * the scale `alpha * std` is within [`SCALE_RELATIVE_TOLERANCE`] of the reference's (block
//!   sums in `f32` lanes, blocks combined in `f64`, in the same order for every thread count);
//! * memory beyond the tensor being coded: the selection's sample and bracket (about 1 % of the
//!   entries) and the per-block statistics of one tensor.
//!
//! ```
//! use kernels_cpu::prelude::*;
//! let cpu = Cpu::detect();
//! let tensors: [&[f32]; 2] = [&[0.5, -3.0, 1.0, 0.0], &[2.0, -0.25]];
//! let params = CompeftParams::default().with_keep(KeepRule::Density(0.5));
//! let decided = Compeft::new(params)?.run(|| tensors, |c, t| c.feed(&cpu, t))?;
//! let mut encoder = CompeftEncoder::new(&decided);
//! let first = encoder.encode(&cpu, tensors[0], &[2, 2], TernaryLayout::Dense2Bit)?;
//! let (_, codes) = kernels_cpu::format::decode(&first, 4)?;
//! assert_eq!(codes, [0, -1, 1, 0]);
//! # Ok::<(), Error>(())
//! ```

use alloc::vec::Vec;

use kernels_core::backend::{
    GapStats, NNZ_OFFSET, SQUARES_IN_F64_BELOW, check_shape, header_len, write_header,
};
use kernels_core::format::{RICE_BLOCK, TernaryLayout, VERSION};
use kernels_core::ops::select::TopKCut;
pub use kernels_core::ops::ternary::{CompeftCut, CompeftParams, Moments};
use kernels_core::{Element, Error, MultiPass, Real, Result};

use crate::parallel::for_each;
use crate::select::{GROUP, Keep, Parts, StreamingTopK, TopKApplier, apply_cuts, map_parts};
use crate::{Cpu, Simd, WithSimd};

/// Entries per block of the moment sums: `f32` lanes within a block, `f64` across blocks.
const MOMENT_BLOCK: usize = 1024;

/// Relative bound on `|scale - scale_ref| / scale_ref`.
///
/// A block's squared deviations are non-negative terms summed in `f32` by at most
/// `MOMENT_BLOCK / 4` additions per accumulator plus the reductions, so each block's `m2`
/// is within `(MOMENT_BLOCK / 4 + 8) u` relative (`u = 2^-24`); blocks combine in `f64`. The standard
/// deviation halves the relative error of the variance; the shift correction and the final
/// `f32` rounding stay below one more `u`.
pub const SCALE_RELATIVE_TOLERANCE: f64 =
    (MOMENT_BLOCK / ACCUMULATORS + 16) as f64 * (f32::EPSILON as f64 / 2.0);

/// Independent accumulators per sum.
const ACCUMULATORS: usize = 4;

/// Per-block `(count, mean, m2)` of a run of a tensor, blocks aligned to its start.
struct BlockMoments<'a, T> {
    data: &'a [T],
}

impl<T: Element> WithSimd for BlockMoments<'_, T> {
    type Output = Vec<Moments>;

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> Vec<Moments> {
        // PERF: blocks in order, no software prefetch: on the Zen 4 VM, four interleaved runs
        // with the next block prefetched line by line read at 7.7 GB/s on one thread, the plain
        // sequential walk at the hardware prefetcher's 15-20 GB/s.
        self.data
            .chunks(MOMENT_BLOCK)
            .map(|block| block_moments(s, block))
            .collect()
    }
}

/// One block's moments: sums in `f32` lanes around the block's own mean; `f64` where `f32`
/// overflows. Non-finite data gives non-finite moments.
#[inline(always)]
fn block_moments<S: Simd, T: Element>(s: S, block: &[T]) -> Moments {
    let one = s.splat(1.0);
    let step = ACCUMULATORS * S::LANES;
    let main = block.len() - block.len() % step;
    let groups = block[..main].chunks_exact(step);
    // PERF: independent accumulators hide the add latency (one chain would bound the loop).
    let mut sums = [s.zero(); ACCUMULATORS];
    for g in groups.clone() {
        for (acc, c) in sums.iter_mut().zip(g.chunks_exact(S::LANES)) {
            *acc = s.add(*acc, s.load(c));
        }
    }
    let sum = s.add(s.add(sums[0], sums[1]), s.add(sums[2], sums[3]));
    let tail: f64 = block[main..].iter().map(|v| v.to_f64()).sum();
    // The block mean in f32 as the shift: the deviations stay small, and the residual mean is
    // corrected for below.
    let count = block.len() as f64;
    let shift = ((f64::from(s.reduce_sum(sum)) + tail) / count) as f32;
    let minus_shift = s.splat(-shift);
    let mut devs = [s.zero(); ACCUMULATORS];
    let mut sqs = [s.zero(); ACCUMULATORS];
    for g in groups {
        for ((dev, sq), c) in devs.iter_mut().zip(&mut sqs).zip(g.chunks_exact(S::LANES)) {
            let d = s.mul_add(s.load(c), one, minus_shift);
            *dev = s.add(*dev, d);
            *sq = s.mul_add(d, d, *sq);
        }
    }
    let dev = s.add(s.add(devs[0], devs[1]), s.add(devs[2], devs[3]));
    let sq = s.add(s.add(sqs[0], sqs[1]), s.add(sqs[2], sqs[3]));
    let (mut dev_tail, mut sq_tail) = (0.0f64, 0.0f64);
    for v in &block[main..] {
        let d = v.to_f64() - f64::from(shift);
        dev_tail += d;
        sq_tail += d * d;
    }
    let dev = f64::from(s.reduce_sum(dev)) + dev_tail;
    let sq = f64::from(s.reduce_sum(sq)) + sq_tail;
    // An `f32` square overflows above |d| ~ 1.8e19 and is lost below ~ 1e-22 (the `compeft_passes`
    // fuzz target found std 0 for a block of 1e-40s): such a block (or a non-finite one, which
    // stays non-finite) is summed exactly, unless all its values are equal (its `m2` is 0).
    let first = block.first().map_or(0.0, |v| v.to_f32());
    let in_range = sq.is_finite()
        && shift.is_finite()
        && (sq >= f64::from(SQUARES_IN_F64_BELOW)
            || block
                .iter()
                .fold(true, |same, v| same & (v.to_f32() == first)));
    if !in_range {
        let mut exact = Moments::default();
        exact.observe(block);
        return exact;
    }
    Moments::from_stats(
        block.len() as u64,
        f64::from(shift) + dev / count,
        (sq - dev * dev / count).max(0.0),
    )
}

/// The moments of `x` (mean, and std with Bessel's correction), threaded, identical for every
/// thread count; a non-finite entry is an error naming it.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let m = moments(&Cpu::detect(), &[1.0f32, 2.0, 3.0])?;
/// assert_eq!((m.count(), m.mean(), m.std()), (3, 2.0, 1.0));
/// # Ok::<(), Error>(())
/// ```
pub fn moments<T: Element>(cpu: &Cpu, x: &[T]) -> Result<Moments> {
    let slices = [x];
    let parts = Parts::new(cpu, &slices, MOMENT_BLOCK);
    let mut total = Moments::default();
    let per_part = map_parts(&parts, |pieces| {
        pieces
            .iter()
            .flat_map(|p| cpu.dispatch(BlockMoments { data: p.data }))
            .collect::<Vec<_>>()
    });
    for (b, block) in per_part.iter().flatten().enumerate() {
        if !(block.mean().is_finite() && block.std().is_finite()) {
            let start = b * MOMENT_BLOCK;
            let end = (start + MOMENT_BLOCK).min(x.len());
            if let Some(i) = x[start..end].iter().position(|v| !v.to_f32().is_finite()) {
                return Err(Error::NonFinite {
                    what: "tau",
                    index: start + i,
                });
            }
        }
        total.combine(block);
    }
    Ok(total)
}

/// Streaming ComPEFT over a model read tensor by tensor, in the [`MultiPass`] protocol (the fast
/// twin of [`kernels_core::ops::ternary::Compeft`]): every tensor to [`Self::feed`] until
/// [`MultiPass::next_pass`] returns `false` (usually two passes), then [`MultiPass::finish`], then
/// code each tensor in the same order with a [`CompeftEncoder`]. See the module docs for an
/// example.
pub struct Compeft {
    params: CompeftParams,
    moments: Moments,
    topk: StreamingTopK,
    first_pass: bool,
}

impl Compeft {
    /// A plan; validates `params`.
    pub fn new(params: CompeftParams) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            params,
            moments: Moments::default(),
            topk: StreamingTopK::new(params.keep)?,
            first_pass: true,
        })
    }

    /// The next tensor of the current pass. In pass 1 a non-finite entry is an error naming its
    /// flat index.
    pub fn feed<T: Element>(&mut self, cpu: &Cpu, tau: &[T]) -> Result<()> {
        if !self.first_pass {
            return self.topk.feed(cpu, tau);
        }
        let m = moments(cpu, tau).map_err(|e| match e {
            Error::NonFinite { what, index } => Error::NonFinite {
                what,
                index: index + self.topk.total() as usize,
            },
            other => other,
        })?;
        self.topk.feed_validated(tau)?;
        self.moments.combine(&m);
        Ok(())
    }
}

impl MultiPass for Compeft {
    type Output = CompeftCut;

    fn next_pass(&mut self) -> Result<bool> {
        let again = self.topk.next_pass()?;
        self.first_pass = false;
        Ok(again)
    }

    fn finish(&self) -> Result<CompeftCut> {
        Ok(CompeftCut {
            scale: self.params.scale(&self.moments)?,
            cut: self.topk.finish()?,
            total: self.topk.total(),
        })
    }
}

/// Codes tensors, in flat order, under a [`CompeftCut`]: straight into the packed format
/// ([`Self::encode`]), or as codes ([`Self::code`]).
#[derive(Clone, Debug)]
pub struct CompeftEncoder {
    applier: TopKApplier,
    scale: f32,
    /// A kept entry may be an exact zero (then its code is 0, whatever the ties).
    zero_kept: bool,
}

/// The `+1` and `-1` codes of a run of 64 entries as bit masks.
#[derive(Clone, Copy, Default)]
struct CodeBits {
    plus: u64,
    minus: u64,
}

impl CodeBits {
    fn of<T: Element>(run: &[T], keep: &Keep<1>, zero_kept: bool) -> Self {
        let mut kept = keep.bits[0];
        if zero_kept {
            kept &= !zero_bits(run);
        }
        Self {
            plus: kept & !keep.run.negative,
            minus: kept & keep.run.negative,
        }
    }

    fn nnz(self) -> u64 {
        u64::from((self.plus | self.minus).count_ones())
    }
}

/// What one part of a tensor records while it is coded.
struct PartCodes<'a, W> {
    /// Its share of the output: packed bytes or code bits.
    out: &'a mut [W],
    /// `(word, bits)` of its entries equal to the cut (for [`TopKApplier::settle`]).
    equal: Vec<(usize, u64)>,
    nnz: u64,
}

impl CompeftEncoder {
    /// An encoder starting at flat index 0.
    #[must_use]
    pub fn new(decided: &CompeftCut) -> Self {
        Self {
            applier: TopKApplier::new(&decided.cut),
            scale: decided.scale,
            zero_kept: decided.cut.magnitude == 0.0 && decided.cut != TopKCut::NONE,
        }
    }

    /// Codes the next tensor into `out` (one output item per `PER` entries), threaded:
    /// `write(out, run, code_bits)`; then un-keeps surplus ties with `drop(out, word, bits)`.
    /// Returns the non-zero count.
    fn code_into<T: Element, W: Send, const PER: usize>(
        &mut self,
        cpu: &Cpu,
        tau: &[T],
        out: &mut [W],
        write: impl Fn(&mut [W], CodeBits) + Sync,
        mut drop: impl FnMut(&mut [W], usize, u64),
    ) -> Result<u64> {
        let slices = [tau];
        let parts = Parts::new(cpu, &slices, GROUP);
        let cut = self.applier.chunk_cut(&parts);
        let zero_kept = self.zero_kept;
        let mut states: Vec<PartCodes<'_, W>> = parts
            .split(out, PER)
            .into_iter()
            .map(|out| PartCodes {
                out,
                equal: Vec::new(),
                nnz: 0,
            })
            .collect();
        apply_cuts(
            cpu,
            &parts,
            [&cut],
            states.iter_mut().collect(),
            #[inline(always)]
            |part, at, run, keep| {
                let bits = CodeBits::of(run, &keep, zero_kept);
                part.nnz += bits.nnz();
                if keep.run.equal != 0 {
                    part.equal.push((at / GROUP, keep.run.equal));
                }
                let first = at / PER;
                let end = (first + GROUP / PER).min(part.out.len());
                write(&mut part.out[first..end], bits);
            },
        )?;
        let mut nnz: u64 = states.iter().map(|p| p.nnz).sum();
        if zero_kept {
            // Equal entries are exact zeros: coded 0 whether kept or not.
            return Ok(nnz);
        }
        let offsets: Vec<usize> = parts.bounds.iter().map(|r| r.start / GROUP).collect();
        let equal = states
            .iter()
            .zip(&offsets)
            .flat_map(|(p, &offset)| p.equal.iter().map(move |&(w, bits)| (w + offset, bits)));
        let mut dropped = Vec::new();
        self.applier
            .settle(equal, |w, bits| dropped.push((w, bits)));
        for (w, bits) in dropped {
            nnz -= u64::from(bits.count_ones());
            drop(out, w, bits);
        }
        Ok(nnz)
    }

    /// Codes the next tensor: `codes[i] = sign(tau_i)` where the cut keeps entry `i` (a kept
    /// exact zero stays 0), else 0. The codes [`Self::encode`] packs.
    ///
    /// ```
    /// use kernels_cpu::prelude::*;
    /// let cpu = Cpu::detect();
    /// let tau = [0.5f32, -3.0, 1.0, 2.0];
    /// let params = CompeftParams::default().with_keep(KeepRule::Count(2));
    /// let (cut, _) = compeft_codes(&cpu, &[&tau], params)?;
    /// let mut codes = [0i8; 4];
    /// CompeftEncoder::new(&cut).code(&cpu, &tau, &mut codes)?;
    /// assert_eq!(codes, [0, -1, 0, 1]);
    /// # Ok::<(), Error>(())
    /// ```
    pub fn code<T: Element>(&mut self, cpu: &Cpu, tau: &[T], codes: &mut [i8]) -> Result<()> {
        crate::select::check_out(tau.len(), codes.len())?;
        self.code_into::<_, _, 1>(
            cpu,
            tau,
            codes,
            #[inline(always)]
            |codes, bits| {
                for (j, c) in codes.iter_mut().enumerate() {
                    *c = ((bits.plus >> j) & 1) as i8 - ((bits.minus >> j) & 1) as i8;
                }
            },
            |codes, w, mut bits| {
                while bits != 0 {
                    codes[w * GROUP + bits.trailing_zeros() as usize] = 0;
                    bits &= bits - 1;
                }
            },
        )
        .map(|_| ())
    }

    /// Codes and packs the next tensor with the given shape and layout: the bytes
    /// [`kernels_core::format::encode`] writes for the reference codes.
    pub fn encode<T: Element>(
        &mut self,
        cpu: &Cpu,
        tau: &[T],
        shape: &[u64],
        layout: TernaryLayout,
    ) -> Result<Vec<u8>> {
        check_shape(shape, tau.len())?;
        let header = header_len(shape.len());
        match layout {
            TernaryLayout::Dense2Bit => {
                let payload_len = tau.len().div_ceil(4);
                let mut out = Vec::with_capacity(header + payload_len);
                // The header's non-zero count is written once known.
                write_header(
                    &mut out,
                    VERSION,
                    layout,
                    0,
                    self.scale,
                    0,
                    shape,
                    payload_len,
                )?;
                out.resize(header + payload_len, 0);
                let nnz = self.code_into::<_, _, 4>(
                    cpu,
                    tau,
                    &mut out[header..],
                    #[inline(always)]
                    |bytes, bits| {
                        let packed = pack_dense(bits).to_le_bytes();
                        match <&mut [u8; 16]>::try_from(&mut *bytes) {
                            Ok(whole) => *whole = packed,
                            Err(_) => bytes.copy_from_slice(&packed[..bytes.len()]),
                        }
                    },
                    |payload, w, bits| {
                        let cleared = (!pack_dense(CodeBits {
                            plus: bits,
                            minus: bits,
                        }))
                        .to_le_bytes();
                        for (b, c) in payload[w * 16..].iter_mut().zip(cleared) {
                            *b &= c;
                        }
                    },
                )?;
                out[NNZ_OFFSET..NNZ_OFFSET + 8].copy_from_slice(&nnz.to_le_bytes());
                Ok(out)
            }
            TernaryLayout::SparseRice => {
                let mut words = alloc::vec![CodeBits::default(); tau.len().div_ceil(GROUP)];
                let nnz = self.code_into::<_, _, GROUP>(
                    cpu,
                    tau,
                    &mut words,
                    #[inline(always)]
                    |word, bits| word[0] = bits,
                    |words, w, bits| {
                        words[w].plus &= !bits;
                        words[w].minus &= !bits;
                    },
                )?;
                let (rice_k, payload) = sparse_payload(cpu, &words);
                let mut out = Vec::with_capacity(header + payload.len());
                write_header(
                    &mut out,
                    VERSION,
                    layout,
                    rice_k,
                    self.scale,
                    nnz,
                    shape,
                    payload.len(),
                )?;
                out.extend_from_slice(&payload);
                Ok(out)
            }
        }
    }
}

/// Bits of the exact zeros of a run of up to 64 entries.
fn zero_bits<T: Element>(run: &[T]) -> u64 {
    run.iter()
        .enumerate()
        .fold(0, |bits, (j, v)| bits | (u64::from(v.to_f32() == 0.0) << j))
}

/// Spreads the 32 bits of `x` to the even bits of a `u64`.
#[inline(always)]
fn spread(x: u32) -> u64 {
    let mut v = u64::from(x);
    v = (v | (v << 16)) & 0x0000_FFFF_0000_FFFF;
    v = (v | (v << 8)) & 0x00FF_00FF_00FF_00FF;
    v = (v | (v << 4)) & 0x0F0F_0F0F_0F0F_0F0F;
    v = (v | (v << 2)) & 0x3333_3333_3333_3333;
    (v | (v << 1)) & 0x5555_5555_5555_5555
}

/// 64 codes in the dense 2-bit layout: entry `j`'s code in bits `2 j` (`01` = +1, `10` = -1).
#[inline(always)]
fn pack_dense(bits: CodeBits) -> u128 {
    let lo = spread(bits.plus as u32) | (spread(bits.minus as u32) << 1);
    let hi = spread((bits.plus >> 32) as u32) | (spread((bits.minus >> 32) as u32) << 1);
    u128::from(lo) | (u128::from(hi) << 64)
}

/// Least-significant-bit-first writer with a 64-bit accumulator.
struct BitSink {
    bytes: Vec<u8>,
    acc: u128,
    used: u32,
}

impl BitSink {
    /// Appends the low `count <= 64` bits of `bits` (higher bits clear).
    #[inline(always)]
    fn put(&mut self, bits: u64, count: u32) {
        self.acc |= u128::from(bits) << self.used;
        self.used += count;
        if self.used >= 64 {
            self.bytes
                .extend_from_slice(&(self.acc as u64).to_le_bytes());
            self.acc >>= 64;
            self.used -= 64;
        }
    }

    /// Pads the bits written with zeros to a whole byte and stores them.
    fn align(&mut self) {
        while self.used > 0 {
            self.bytes.push(self.acc as u8);
            self.acc >>= 8;
            self.used = self.used.saturating_sub(8);
        }
    }
}

/// Gaps shorter than this are counted per length.
const SHORT_GAPS: usize = 1024;

/// Code words per block of the sparse layout.
const BLOCK_WORDS: usize = RICE_BLOCK as usize / GROUP;

/// The sparse Rice payload and its parameter (the reference's choice, see [`GapStats`]).
///
/// Threaded: pieces of whole blocks gather their gap statistics, then write their blocks'
/// index entries and streams; the index and the streams are joined in order.
fn sparse_payload(cpu: &Cpu, words: &[CodeBits]) -> (u8, Vec<u8>) {
    let blocks = words.len().div_ceil(BLOCK_WORDS);
    let pieces = (cpu.threads() * 4).min(blocks).max(1);
    let per_piece = blocks.div_ceil(pieces).max(1) * BLOCK_WORDS;
    let pieces: Vec<(usize, &[CodeBits])> = words
        .chunks(per_piece)
        .enumerate()
        .map(|(p, chunk)| (p * per_piece, chunk))
        .collect();
    let mut stats: Vec<GapStats> = pieces.iter().map(|_| GapStats::default()).collect();
    for_each(
        pieces.iter().zip(stats.iter_mut()).collect(),
        |(&(first, chunk), stats)| {
            // PERF: most gaps are short; counting them per length and adding each length's
            // bits once is cheaper than adding every gap's bits.
            let mut short = [0u64; SHORT_GAPS];
            for_each_block_gap(
                chunk,
                first,
                #[inline(always)]
                |_, gap, _| match short.get_mut(gap as usize) {
                    Some(count) => *count += 1,
                    None => stats.add(gap),
                },
            );
            for (gap, &count) in short.iter().enumerate() {
                stats.add_many(gap as u64, count);
            }
        },
    );
    let mut total = GapStats::default();
    for st in &stats {
        total.merge(st);
    }
    let k = total.best_rice_k();
    let mut streams: Vec<(Vec<u8>, Vec<u8>)> = stats.iter().map(|_| Default::default()).collect();
    for_each(
        pieces.iter().zip(&stats).zip(streams.iter_mut()).collect(),
        |((&(first, chunk), stats), (index, bytes))| {
            // Each block pads to a whole byte.
            let capacity = stream_bytes(stats, k) + chunk.len().div_ceil(BLOCK_WORDS) + 8;
            *bytes = rice_streams(chunk, first, k, capacity, index);
        },
    );
    let index_len: usize = streams.iter().map(|(index, _)| index.len()).sum();
    let mut out = Vec::with_capacity(index_len + stream_bytes(&total, k));
    for (index, _) in &streams {
        out.extend_from_slice(index);
    }
    for (_, bytes) in &streams {
        out.extend_from_slice(bytes);
    }
    (k, out)
}

/// About the bytes of the streams whose gap statistics are `stats` (each block adds its padding).
fn stream_bytes(stats: &GapStats, k: u8) -> usize {
    usize::try_from(stats.payload_bits(k).div_ceil(8)).unwrap_or(0)
}

/// Calls `f(block, gap, negative)` for each non-zero code of `words` in flat order, each
/// block's first gap counting from the block's start; `first_word` (a block's first) is the flat
/// word index of `words[0]`, `block` counts from it.
#[inline(always)]
fn for_each_block_gap(words: &[CodeBits], first_word: usize, mut f: impl FnMut(usize, u64, bool)) {
    for (b, block) in words.chunks(BLOCK_WORDS).enumerate() {
        let first = first_word + b * BLOCK_WORDS;
        let mut next = (first * GROUP) as u64;
        for (w, bits) in block.iter().enumerate() {
            let mut nonzero = bits.plus | bits.minus;
            while nonzero != 0 {
                let j = nonzero.trailing_zeros();
                let index = ((first + w) * GROUP) as u64 + u64::from(j);
                f(b, index - next, bits.minus >> j & 1 == 1);
                next = index + 1;
                nonzero &= nonzero - 1;
            }
        }
    }
}

/// The index entries and streams of a piece's blocks (each stream padded to a whole byte).
fn rice_streams(
    chunk: &[CodeBits],
    first: usize,
    k: u8,
    capacity: usize,
    index: &mut Vec<u8>,
) -> Vec<u8> {
    let mut sink = BitSink {
        bytes: Vec::with_capacity(capacity),
        acc: 0,
        used: 0,
    };
    let low_mask = (1u64 << k) - 1;
    let k = u32::from(k);
    let mut start = 0;
    for (b, block) in chunk.chunks(BLOCK_WORDS).enumerate() {
        let mut nnz = 0u32;
        // PERF: inlined by hand; left to the compiler, the loop ran at two thirds of the speed.
        for_each_block_gap(
            block,
            first + b * BLOCK_WORDS,
            #[inline(always)]
            |_, gap, negative| {
                nnz += 1;
                let mut ones = gap >> k;
                while ones >= 32 {
                    sink.put(u64::from(u32::MAX), 32);
                    ones -= 32;
                }
                // `ones` one-bits, a zero-bit, the k low bits, the sign: at most 31 + 1 + 31 + 1 bits.
                let tail = (gap & low_mask) | (u64::from(negative) << k);
                let ones = ones as u32;
                sink.put(((1u64 << ones) - 1) | (tail << (ones + 1)), ones + k + 2);
            },
        );
        sink.align();
        // A block's stream is at most 65 536 codes of 33 bits and its gaps' unary parts.
        index.extend_from_slice(&((sink.bytes.len() - start) as u32).to_le_bytes());
        index.extend_from_slice(&nnz.to_le_bytes());
        start = sink.bytes.len();
    }
    sink.bytes
}

/// ComPEFT of a whole model held in memory: the decision and each tensor packed with its shape
/// (the twin of `compeft_ref` followed by `format::encode`, byte for byte).
///
/// ```
/// use kernels_cpu::prelude::*;
/// let model: [(&[f32], &[u64]); 2] = [(&[0.5, -3.0, 1.0, 0.0], &[2, 2]), (&[2.0, -0.25], &[2])];
/// let params = CompeftParams::default().with_keep(KeepRule::Density(0.5));
/// let (decided, packed) = compeft(&Cpu::detect(), &model, params, TernaryLayout::SparseRice)?;
/// assert_eq!((decided.total, packed.len()), (6, 2));
/// # Ok::<(), Error>(())
/// ```
pub fn compeft<T: Element>(
    cpu: &Cpu,
    tensors: &[(&[T], &[u64])],
    params: CompeftParams,
    layout: TernaryLayout,
) -> Result<(CompeftCut, Vec<Vec<u8>>)> {
    for (tau, shape) in tensors {
        check_shape(shape, tau.len())?;
    }
    let taus: Vec<&[T]> = tensors.iter().map(|(tau, _)| *tau).collect();
    let decided = decide(cpu, &taus, params)?;
    let mut encoder = CompeftEncoder::new(&decided);
    let packed = tensors
        .iter()
        .map(|(tau, shape)| encoder.encode(cpu, tau, shape, layout))
        .collect::<Result<Vec<_>>>()?;
    Ok((decided, packed))
}

/// ComPEFT of a whole model held in memory, as codes: the decision and each tensor's codes in
/// `{-1, 0, 1}` (the twin of `compeft_ref`, code for code).
///
/// ```
/// use kernels_cpu::prelude::*;
/// let model: [&[f32]; 2] = [&[0.5, -3.0, 1.0, 0.0], &[2.0, -0.25]];
/// let params = CompeftParams::default().with_keep(KeepRule::Count(2));
/// let (_, codes) = compeft_codes(&Cpu::detect(), &model, params)?;
/// assert_eq!(codes, [vec![0, -1, 0, 0], vec![1, 0]]);
/// # Ok::<(), Error>(())
/// ```
pub fn compeft_codes<T: Element>(
    cpu: &Cpu,
    taus: &[&[T]],
    params: CompeftParams,
) -> Result<(CompeftCut, Vec<Vec<i8>>)> {
    let decided = decide(cpu, taus, params)?;
    let mut encoder = CompeftEncoder::new(&decided);
    let codes = taus
        .iter()
        .map(|tau| {
            let mut codes = alloc::vec![0i8; tau.len()];
            encoder.code(cpu, tau, &mut codes).map(|()| codes)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((decided, codes))
}

/// Every pass of [`Compeft`] over tensors in memory.
fn decide<T: Element>(cpu: &Cpu, taus: &[&[T]], params: CompeftParams) -> Result<CompeftCut> {
    Compeft::new(params)?.run(|| taus.iter(), |plan, tau| plan.feed(cpu, tau))
}
