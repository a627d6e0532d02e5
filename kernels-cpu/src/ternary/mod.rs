//! Kernels on packed ternary tensors ([`kernels_core::format`]), straight from the bytes: decode,
//! ternary GEMV and decompress-and-add.
//!
//! # Contracts
//!
//! * A [`PackedTernary`] is validated once, when it is made, as
//!   [`kernels_core::format::decode_into`] validates it (header, every code, padding, trailing
//!   bytes): garbled bytes are an [`Error::BadFormat`], and no input makes a kernel panic or read
//!   out of bounds. The ops then read it without checking it again.
//! * [`ternary_codes`] gives the reference's codes; [`ternary_decode`] `scale * code` exactly
//!   (`+0.0` for a zero code); [`ternary_add`] the reference's bits
//!   ([`kernels_core::ops::ternary::ternary_add_ref`]: each changed entry computed in `f64` and
//!   rounded once to `f32`, then to `T`); [`ternary_gemv`] is within
//!   [`crate::gemv::gemv_tolerance`] of [`kernels_core::ops::ternary::ternary_gemv_ref`] (sums in
//!   `f32`, then one multiply by the scale).

use core::ops::Range;

use kernels_core::format::{TernaryHeader, TernaryLayout};
use kernels_core::{Element, Error, Real, Result};

use crate::parallel::split_outputs;
use crate::{Cpu, Simd, WithSimd};

mod rice;
use kernels_core::format::RICE_BLOCK;
use rice::{Blocks, LANES, NonZeros, lane_ranges};

/// Parts of a split start on multiples of this many codes (whole payload words).
const CODE_ALIGN: usize = 64;

/// Even bits of a 64-bit word (the low bit of each 2-bit code).
const LOW_BITS: u64 = 0x5555_5555_5555_5555;

fn bad(offset: usize, reason: &'static str) -> Error {
    Error::BadFormat { offset, reason }
}

/// Reads up to 8 bytes at `at` as a little-endian word (zeros past the end).
#[inline(always)]
fn word_at(bytes: &[u8], at: usize) -> u64 {
    if let Some(b) = bytes.get(at..at + 8) {
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    } else {
        let mut b = [0u8; 8];
        let rest = bytes.get(at..).unwrap_or(&[]);
        b[..rest.len()].copy_from_slice(rest);
        u64::from_le_bytes(b)
    }
}

/// Non-zero count of a dense payload, after checking every code and the padding (threaded).
fn check_dense(cpu: &Cpu, header: &TernaryHeader, payload: &[u8]) -> Result<u64> {
    let base = header.payload_offset;
    let words = payload.len().div_ceil(8);
    let mut found = alloc::vec![(0u64, 0u64); words.div_ceil(CHECK_WORDS)];
    split_outputs(cpu, &mut found, CHECK_WORDS * 8, 1, |range, out| {
        for (chunk, slot) in range.zip(out) {
            let (mut invalid, mut nnz) = (0u64, 0u64);
            for w in chunk * CHECK_WORDS..((chunk + 1) * CHECK_WORDS).min(words) {
                let w = word_at(payload, 8 * w);
                invalid |= w & (w >> 1) & LOW_BITS;
                nnz += u64::from(((w | (w >> 1)) & LOW_BITS).count_ones());
            }
            *slot = (invalid, nnz);
        }
    });
    let n = header.numel as usize;
    if found.iter().any(|&(invalid, _)| invalid != 0) {
        let code = (0..payload.len() * 4)
            .find(|&i| (payload[i / 4] >> (2 * (i % 4))) & 3 == 3)
            .unwrap_or(0);
        // Past the last code an invalid pattern is non-zero padding.
        return Err(if code < n {
            bad(base + code / 4, "dense code 0b11 is invalid")
        } else {
            bad(base + code / 4, "padding bits are not zero")
        });
    }
    if !n.is_multiple_of(4) && payload[n / 4] >> (2 * (n % 4)) != 0 {
        return Err(bad(base + n / 4, "padding bits are not zero"));
    }
    let nnz = found.iter().map(|&(_, nnz)| nnz).sum();
    if nnz != header.nnz {
        return Err(bad(12, "non-zero count does not match the payload"));
    }
    Ok(nnz)
}

/// Payload words checked per unit of [`check_dense`]'s split.
const CHECK_WORDS: usize = 1024;

/// Checks a sparse payload: its index, then every block's stream (threads take disjoint blocks,
/// each walks several at once). Where a block is inconsistent, the blocks are walked again in
/// order by the checked walk, which reports the first error as the reference decoder does.
fn check_sparse(cpu: &Cpu, header: &TernaryHeader, payload: &[u8]) -> Result<()> {
    let blocks = Blocks::new(header, payload)?;
    let mut bad = alloc::vec![false; blocks.list.len()];
    let per_block = payload.len() / blocks.list.len().max(1) + 1;
    split_outputs(cpu, &mut bad, per_block, 1, |range, bad| {
        let elements = blocks.elements(range.clone());
        let lanes = lane_ranges(elements, blocks.unit);
        if let ((), Some(block)) = rice::walk::<_, true, false>(cpu, &blocks, lanes, ()) {
            bad[block - range.start] = true;
        }
    });
    if bad.contains(&true) {
        for block in &blocks.list {
            rice::check_block(&blocks, block, header.payload_offset)?;
        }
    }
    Ok(())
}

/// Reports nothing: the walk that only checks.
impl NonZeros for () {
    #[inline(always)]
    fn code<S: Simd>(&mut self, _: S, _: usize, _: u64, _: bool) {}
}

/// Element `index - start` of `part` (a thread's part of a tensor-long output) for each non-zero:
/// `write(entry, negative)`; with `ZERO`, the elements entered are set to zero first.
struct PartWriter<'a, X, W, const ZERO: bool> {
    part: &'a mut [X],
    start: u64,
    write: W,
}

impl<X: Default + Copy, W: FnMut(&mut X, bool), const ZERO: bool> NonZeros
    for PartWriter<'_, X, W, ZERO>
{
    #[inline(always)]
    fn enter(&mut self, _: usize, elements: Range<u64>) {
        if ZERO {
            let at = (elements.start - self.start) as usize..(elements.end - self.start) as usize;
            self.part[at].fill(X::default());
        }
    }

    #[inline(always)]
    fn code<S: Simd>(&mut self, s: S, _: usize, index: u64, negative: bool) {
        let at = (index - self.start) as usize;
        if !ZERO && let Some(ahead) = self.part.get(at + PREFETCH_ELEMENTS) {
            // PERF: entries are read where the codes are, far apart: the hardware prefetcher
            // alone left every cache line waiting on DRAM.
            s.prefetch(ahead);
        }
        // Validated: every index is inside the part.
        if let Some(entry) = self.part.get_mut(at) {
            (self.write)(entry, negative);
        }
    }
}

/// How far ahead of a code [`PartWriter`] prefetches the entries it updates.
const PREFETCH_ELEMENTS: usize = 512;

/// Runs `write(entry, negative)` on the entry of `out` (tensor-long) of each non-zero of a
/// validated sparse payload, threaded over blocks; with `ZERO`, `out` is zeroed block by block
/// first (while the block is in cache).
fn write_sparse<X: Default + Copy + Send, const ZERO: bool>(
    cpu: &Cpu,
    packed: &PackedTernary<'_>,
    out: &mut [X],
    write: impl Fn(&mut X, bool) + Sync,
) {
    // Validated when made: the index is consistent.
    let Ok(blocks) = Blocks::new(&packed.header, packed.payload) else {
        return;
    };
    let unit = blocks.unit as usize;
    let per_element = core::mem::size_of::<X>() + 1;
    split_outputs(cpu, out, per_element, unit, |range, part| {
        let elements = range.start as u64..range.end as u64;
        let sink = PartWriter::<_, _, ZERO> {
            part,
            start: elements.start,
            write: &write,
        };
        rice::walk::<_, false, false>(cpu, &blocks, lane_ranges(elements, blocks.unit), sink);
    });
}

/// A packed ternary tensor ([`kernels_core::format`]), parsed and validated once: what the ops of
/// this module read, straight from its bytes.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let cpu = Cpu::detect();
/// let bytes = kernels_cpu::format::encode(&[1, 0, -1, 1], &[2, 2], 0.5, TernaryLayout::Dense2Bit)?;
/// let packed = PackedTernary::new(&cpu, &bytes)?;
/// assert_eq!(packed.header().shape(), [2, 2]);
/// let mut y = [0.0f32; 2];
/// ternary_gemv(&cpu, &packed, &[1.0, 2.0], &mut y)?;
/// assert_eq!(y, [0.5, 0.5]); // 0.5 * [1 * 1 + 0 * 2, -1 * 1 + 1 * 2]
/// assert!(PackedTernary::new(&cpu, &bytes[..bytes.len() - 1]).is_err());
/// # Ok::<(), Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct PackedTernary<'a> {
    header: TernaryHeader,
    payload: &'a [u8],
    len: usize,
}

impl<'a> PackedTernary<'a> {
    /// Parses `bytes` and validates every one of them (dense payloads threaded).
    pub fn new(cpu: &Cpu, bytes: &'a [u8]) -> Result<Self> {
        let header = TernaryHeader::parse(bytes)?;
        let len = usize::try_from(header.numel).map_err(|_| Error::InvalidParam {
            name: "packed element count",
            value: header.numel as f64,
            expected: "addressable on this target (at most usize::MAX)",
        })?;
        let payload = &bytes[header.payload_offset..];
        match header.layout {
            TernaryLayout::Dense2Bit => {
                check_dense(cpu, &header, payload)?;
            }
            TernaryLayout::SparseRice => check_sparse(cpu, &header, payload)?,
        }
        Ok(Self {
            header,
            payload,
            len,
        })
    }

    /// The header: shape, scale, non-zero count, layout.
    #[must_use]
    pub fn header(&self) -> &TernaryHeader {
        &self.header
    }

    /// Elements of the tensor.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the tensor has no element.
    ///
    /// ```
    /// use kernels_cpu::prelude::*;
    /// let empty = kernels_cpu::format::encode(&[], &[0], 1.0, TernaryLayout::Dense2Bit)?;
    /// assert!(PackedTernary::new(&Cpu::detect(), &empty)?.is_empty());
    /// # Ok::<(), Error>(())
    /// ```
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn expect_len(&self, what: &'static str, found: usize) -> Result<()> {
        if found == self.len {
            Ok(())
        } else {
            Err(Error::LengthMismatch {
                what,
                expected: self.len,
                found,
            })
        }
    }
}

/// The four codes of each payload byte (`i8` bytes in a little-endian `u32`).
const DECODE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut b = 0;
    while b < 256 {
        let mut word = 0u32;
        let mut j = 0;
        while j < 4 {
            let code: u8 = match (b >> (2 * j)) & 3 {
                1 => 1,
                2 => 0xFF, // -1
                _ => 0,
            };
            word |= (code as u32) << (8 * j);
            j += 1;
        }
        table[b] = word;
        b += 1;
    }
    table
};

/// The codes of a packed tensor, `{-1, 0, 1}`, into `codes` (as long as the tensor): the codes
/// [`kernels_core::format::decode_into`] gives. Dense payloads decode threaded, sparse ones
/// sequentially.
///
/// ```
/// use kernels_cpu::prelude::*;
/// let cpu = Cpu::detect();
/// let bytes = kernels_cpu::format::encode(&[1, 0, -1], &[3], 2.0, TernaryLayout::SparseRice)?;
/// let mut codes = [0i8; 3];
/// ternary_codes(&cpu, &PackedTernary::new(&cpu, &bytes)?, &mut codes)?;
/// assert_eq!(codes, [1, 0, -1]);
/// # Ok::<(), Error>(())
/// ```
pub fn ternary_codes(cpu: &Cpu, packed: &PackedTernary<'_>, codes: &mut [i8]) -> Result<()> {
    packed.expect_len("codes", codes.len())?;
    let payload = packed.payload;
    match packed.header.layout {
        TernaryLayout::Dense2Bit => {
            split_outputs(cpu, codes, 1, CODE_ALIGN, |range, out| {
                let payload = &payload[range.start / 4..];
                let whole = out.len() / 4;
                let mut chunks = out.chunks_exact_mut(4);
                for (chunk, &b) in (&mut chunks).zip(payload) {
                    // Unreachable: `chunks_exact_mut(4)`.
                    let four: &mut [i8; 4] = chunk.try_into().expect("4 codes");
                    *four = bytemuck::cast(DECODE[usize::from(b)]);
                }
                let tail = chunks.into_remainder();
                if let Some(&b) = payload.get(whole) {
                    let four: [i8; 4] = bytemuck::cast(DECODE[usize::from(b)]);
                    tail.copy_from_slice(&four[..tail.len()]);
                }
            });
        }
        TernaryLayout::SparseRice => {
            write_sparse::<_, true>(cpu, packed, codes, |c, negative| {
                *c = if negative { -1 } else { 1 };
            });
        }
    }
    Ok(())
}

/// The values of a packed tensor, `out = scale * code` (exact; `+0.0` for a zero code whatever
/// the scale's sign).
///
/// ```
/// use kernels_cpu::prelude::*;
/// let cpu = Cpu::detect();
/// let bytes = kernels_cpu::format::encode(&[1, 0, -1], &[3], 0.25, TernaryLayout::Dense2Bit)?;
/// let mut values = [1.0f32; 3];
/// ternary_decode(&cpu, &PackedTernary::new(&cpu, &bytes)?, &mut values)?;
/// assert_eq!(values, [0.25, 0.0, -0.25]);
/// # Ok::<(), Error>(())
/// ```
pub fn ternary_decode(cpu: &Cpu, packed: &PackedTernary<'_>, out: &mut [f32]) -> Result<()> {
    packed.expect_len("out", out.len())?;
    let scale = packed.header.scale;
    let value = |code: i8| match code {
        1 => scale,
        -1 => -scale,
        _ => 0.0,
    };
    let payload = packed.payload;
    match packed.header.layout {
        TernaryLayout::Dense2Bit => {
            split_outputs(cpu, out, 1, CODE_ALIGN, |range, out| {
                for (four, &b) in out.chunks_mut(4).zip(&payload[range.start / 4..]) {
                    let codes: [i8; 4] = bytemuck::cast(DECODE[usize::from(b)]);
                    for (o, c) in four.iter_mut().zip(codes) {
                        *o = value(c);
                    }
                }
            });
        }
        TernaryLayout::SparseRice => {
            write_sparse::<_, true>(cpu, packed, out, |v, negative| {
                *v = if negative { -scale } else { scale };
            });
        }
    }
    Ok(())
}

/// Decompress and add, `theta_i += lambda * scale * code_i` from packed codes, bit-identical to
/// [`kernels_core::ops::ternary::ternary_add_ref`] on the decoded codes (each changed entry
/// computed in `f64`, rounded once to `f32`, then to `T`; a zero code leaves its entry's bits
/// alone).
///
/// ```
/// use kernels_cpu::prelude::*;
/// let cpu = Cpu::detect();
/// let bytes = kernels_cpu::format::encode(&[1, 0, -1], &[3], 0.5, TernaryLayout::Dense2Bit)?;
/// let mut theta = [bf16::from_f32(1.0); 3];
/// ternary_add(&cpu, &mut theta, &PackedTernary::new(&cpu, &bytes)?, 2.0)?;
/// assert_eq!(theta.map(bf16::to_f32), [2.0, 1.0, 0.0]);
/// # Ok::<(), Error>(())
/// ```
pub fn ternary_add<T: Element>(
    cpu: &Cpu,
    theta: &mut [T],
    packed: &PackedTernary<'_>,
    lambda: f32,
) -> Result<()> {
    packed.expect_len("theta", theta.len())?;
    if !lambda.is_finite() {
        return Err(Error::InvalidParam {
            name: "lambda",
            value: f64::from(lambda),
            expected: "finite",
        });
    }
    let step = f64::from(lambda) * f64::from(packed.header.scale);
    let add = |t: &mut T, negative: bool| {
        let delta = if negative { -step } else { step };
        *t = T::from_f32((t.to_f64() + delta) as f32);
    };
    let payload = packed.payload;
    match packed.header.layout {
        TernaryLayout::Dense2Bit => {
            split_outputs(
                cpu,
                theta,
                2 * core::mem::size_of::<T>(),
                CODE_ALIGN,
                |range, part| {
                    // 32 codes per payload word; parts start on multiples of 64 codes.
                    for (w, chunk) in part.chunks_mut(32).enumerate() {
                        let word = word_at(payload, range.start / 4 + 8 * w);
                        let mut nonzero = (word | (word >> 1)) & LOW_BITS;
                        while nonzero != 0 {
                            let bit = nonzero.trailing_zeros();
                            add(&mut chunk[(bit / 2) as usize], (word >> (bit + 1)) & 1 == 1);
                            nonzero &= nonzero - 1;
                        }
                    }
                },
            );
        }
        TernaryLayout::SparseRice => write_sparse::<_, false>(cpu, packed, theta, add),
    }
    Ok(())
}

/// Rows `rows` of a dense ternary GEMV: `y_r = sum_c code(r, c) x_c` (scale applied by the
/// caller).
struct DenseRows<'a> {
    payload: &'a [u8],
    cols: usize,
    rows: Range<usize>,
    x: &'a [f32],
    y: &'a mut [f32],
}

impl WithSimd for DenseRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let Self {
            payload,
            cols,
            rows,
            x,
            y,
        } = self;
        let lanes = S::LANES;
        let main = cols - cols % lanes;
        // At most 16 lanes: their codes fit a 32-bit window.
        let lane_mask = (1u64 << (2 * lanes)) - 1;
        for (r, out) in rows.zip(y.iter_mut()) {
            let mut acc = [s.zero(), s.zero()];
            let mut c = 0;
            while c < main {
                let bit = 2 * (r * cols + c);
                let bits = (word_at(payload, bit / 8) >> (bit % 8)) & lane_mask;
                let a = &mut acc[(c / lanes) % 2];
                *a = s.mul_add(s.ternary(bits as u32), s.load(&x[c..c + lanes]), *a);
                c += lanes;
            }
            let mut tail = 0.0f32;
            for (j, &xj) in x.iter().enumerate().skip(main) {
                let bit = 2 * (r * cols + j);
                match (payload[bit / 8] >> (bit % 8)) & 3 {
                    1 => tail += xj,
                    2 => tail -= xj,
                    _ => {}
                }
            }
            *out = s.reduce_sum(s.add(acc[0], acc[1])) + tail;
        }
    }
}

/// Row sums of a part of a sparse GEMV: each cursor owns whole rows and adds its row's entries in
/// index order (the order of one sequential walk, so the sums do not depend on the split).
struct RowSums<'a> {
    x: &'a [f32],
    y: &'a mut [f32],
    cols: u64,
    first_row: u64,
    /// Per cursor: its current row, where the row ends (flat index), and its sum so far.
    rows: [(u64, u64, f32); LANES],
}

impl RowSums<'_> {
    /// Stores cursor `lane`'s finished row.
    #[inline(always)]
    fn flush(&mut self, lane: usize) {
        let (row, end, sum) = self.rows[lane];
        if end > 0
            && let Some(out) = self.y.get_mut((row - self.first_row) as usize)
        {
            *out = sum;
        }
    }
}

impl NonZeros for RowSums<'_> {
    #[inline(always)]
    fn code<S: Simd>(&mut self, _: S, lane: usize, index: u64, negative: bool) {
        if index >= self.rows[lane].1 {
            self.flush(lane);
            let row = index / self.cols;
            self.rows[lane] = (row, (row + 1) * self.cols, 0.0);
        }
        let (row, _, sum) = &mut self.rows[lane];
        // Validated: the column is inside `x`.
        let xc = self
            .x
            .get((index - *row * self.cols) as usize)
            .copied()
            .unwrap_or(0.0);
        *sum += if negative { -xc } else { xc };
    }
}

/// `y = codes x` (unscaled) from a validated sparse payload: threads take rows, and each thread
/// splits its rows over the cursors; a cursor starting inside a block walks that block from its
/// start. A version-1 payload (one block) is walked by one cursor.
fn sparse_gemv(cpu: &Cpu, packed: &PackedTernary<'_>, cols: usize, x: &[f32], y: &mut [f32]) {
    y.fill(0.0);
    let Ok(blocks) = Blocks::new(&packed.header, packed.payload) else {
        return;
    };
    let cols = cols as u64;
    let walk_rows = |rows: Range<usize>, y: &mut [f32], lanes: [Range<u64>; LANES]| {
        let sums = RowSums {
            x,
            y,
            cols,
            first_row: rows.start as u64,
            rows: [(0, 0, 0.0); LANES],
        };
        let (mut sums, _) = rice::walk::<_, false, true>(cpu, &blocks, lanes, sums);
        (0..LANES).for_each(|lane| sums.flush(lane));
    };
    if blocks.list.len() <= 1 || cols == 0 {
        let all = 0..packed.header.numel;
        walk_rows(
            0..y.len(),
            y,
            core::array::from_fn(|l| if l == 0 { all.clone() } else { 0..0 }),
        );
        return;
    }
    // Rows per part: enough blocks' worth that a part's partial blocks are a small share.
    let rows_per_block = (RICE_BLOCK / cols).max(1) as usize;
    split_outputs(cpu, y, cols as usize / 4 + 1, rows_per_block, |rows, y| {
        let elements = rows.start as u64 * cols..rows.end as u64 * cols;
        walk_rows(rows, y, lane_ranges(elements, cols));
    });
}

/// Ternary GEMV straight from a packed `[out, in]` tensor: `y = scale * codes x` (the twin of
/// [`kernels_core::ops::ternary::ternary_gemv_ref`]). Dense payloads are read in place (rows
/// threaded); sparse ones are walked once. See [`PackedTernary`] for an example.
pub fn ternary_gemv(cpu: &Cpu, packed: &PackedTernary<'_>, x: &[f32], y: &mut [f32]) -> Result<()> {
    let header = &packed.header;
    let &[rows, cols] = header.shape() else {
        return Err(Error::InvalidParam {
            name: "packed shape",
            value: header.ndim as f64,
            expected: "two dimensions [out, in]",
        });
    };
    // A dimension of an empty tensor need not fit usize (a [2^32 + 1, 0] shape on wasm32).
    let too_large = |_| Error::TooLarge {
        what: "packed shape",
        limit: usize::MAX as u64,
        unit: "rows or columns",
    };
    let (rows, cols) = (
        usize::try_from(rows).map_err(too_large)?,
        usize::try_from(cols).map_err(too_large)?,
    );
    kernels_core::backend::validate_gemv([rows, cols], x.len(), y.len())?;
    let payload = packed.payload;
    match header.layout {
        TernaryLayout::Dense2Bit => {
            split_outputs(cpu, y, cols / 4, 1, |rows, y| {
                cpu.dispatch(DenseRows {
                    payload,
                    cols,
                    rows,
                    x,
                    y,
                });
            });
        }
        TernaryLayout::SparseRice => sparse_gemv(cpu, packed, cols, x, y),
    }
    for v in y.iter_mut() {
        *v *= header.scale;
    }
    Ok(())
}
