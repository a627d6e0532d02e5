//! The packed ternary format: a scale, a shape and `{-1, 0, +1}` codes, in a dense 2-bit layout or
//! a sparse layout of Golomb-Rice coded gaps and sign bits.
//!
//! # Layout (all integers little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `b"KTRN"` |
//! | 4 | 1 | version: 2 (1 is still read, see below) |
//! | 5 | 1 | layout: 0 dense 2-bit, 1 sparse Rice |
//! | 6 | 1 | Rice parameter `k` (0..=31; 0 for dense) |
//! | 7 | 1 | `ndim`, 0..=8 |
//! | 8 | 4 | scale, `f32`, finite |
//! | 12 | 8 | `nnz`, non-zero codes |
//! | 20 | 8 x ndim | dims, `u64` (the element count is their product; 1 for `ndim = 0`) |
//! | .. | 8 | payload length in bytes |
//! | .. | .. | payload |
//!
//! *Dense:* code `i` in bits `2 (i % 4)` of byte `i / 4`: `00` = 0, `01` = +1, `10` = -1 (`11` is
//! invalid); unused high bits of the last byte are zero. Versions 1 and 2 are the same.
//!
//! *Sparse:* the elements are cut into blocks of [`RICE_BLOCK`] (65 536; the last one shorter),
//! and each block is coded on its own, so that decoders can start at any block. The payload is an
//! index of one 8-byte entry per block (`u32` byte length of the block's stream, `u32` non-zeros
//! in the block), then the blocks' streams one after another. A block's stream is a bit stream,
//! least significant bit first: for each non-zero of the block in ascending index order, the gap
//! `g` (index minus previous index minus 1; the block's first gap counts from the block's first
//! element minus 1) is coded as `g >> k` one-bits, a zero-bit, then the `k` low bits of `g`; then
//! one sign bit (1 = -1). The stream is padded with zero bits to a whole byte; a block without
//! non-zeros has no bytes. The encoder picks the `k` that minimises the size; all blocks share it.
//!
//! *Sparse, version 1* (read, and written by [`encode_version`] only): no index and no blocks; the
//! payload is one stream of the whole tensor's gaps, the first counting from -1.
//!
//! The decoder checks every field, every bound and the padding; no input makes it panic or read
//! out of bounds, and every input it accepts re-encodes to the same bytes.
//!
//! ```
//! use kernels_core::format::{self, TernaryHeader, TernaryLayout};
//! let codes = [0i8, 0, 1, 0, 0, 0, -1, 0];
//! let dense = format::encode(&codes, &[2, 4], 0.25, TernaryLayout::Dense2Bit)?;
//! let sparse = format::encode(&codes, &[2, 4], 0.25, TernaryLayout::SparseRice)?;
//! for bytes in [&dense, &sparse] {
//!     let header = TernaryHeader::parse(bytes)?;
//!     assert_eq!((header.shape(), header.scale, header.nnz), (&[2, 4][..], 0.25, 2));
//!     println!("{:?}: {:.1} bits per parameter", header.layout, header.bits_per_param());
//!     assert_eq!(format::decode(bytes, 1 << 20)?.1, codes);
//! }
//! // At density 1/4 the sparse layout's payload approaches H(d) + d bits per parameter.
//! assert!((format::entropy_bits_per_param(0.25) - 1.061).abs() < 1e-3);
//! # Ok::<(), kernels_core::Error>(())
//! ```

use core::ops::Range;

use crate::{Error, Result};

pub(crate) mod raw;

use crate::error::check_len;
use raw::FIXED_HEADER;
#[cfg(feature = "alloc")]
use raw::{GapStats, check_shape, header_len, write_header};

/// Magic bytes.
pub const MAGIC: [u8; 4] = *b"KTRN";
/// Format version written. Version 1, whose sparse payload has no blocks, is still read.
pub const VERSION: u8 = 2;
/// Elements per block of the sparse layout (version 2): blocks decode independently.
pub const RICE_BLOCK: u64 = 1 << 16;
/// Bytes of a block's entry in the sparse layout's index (version 2).
pub const RICE_INDEX_ENTRY: usize = 8;
/// Most dimensions a shape may have.
pub const MAX_DIMS: usize = 8;

/// The two payload layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TernaryLayout {
    /// Two bits per entry.
    Dense2Bit,
    /// Golomb-Rice coded gaps between non-zeros, with sign bits.
    SparseRice,
}

/// A parsed header.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TernaryHeader {
    /// The format version, 1 or 2.
    pub version: u8,
    /// The payload layout.
    pub layout: TernaryLayout,
    /// Rice parameter (sparse layout).
    pub rice_k: u8,
    /// The scale every code multiplies.
    pub scale: f32,
    /// Non-zero codes.
    pub nnz: u64,
    /// Number of dimensions.
    pub ndim: usize,
    /// The dimensions (the first `ndim` are meaningful).
    pub dims: [u64; MAX_DIMS],
    /// Element count.
    pub numel: u64,
    /// Offset of the payload.
    pub payload_offset: usize,
    /// Payload length in bytes.
    pub payload_len: usize,
}

impl TernaryHeader {
    /// The shape.
    #[must_use]
    pub fn shape(&self) -> &[u64] {
        &self.dims[..self.ndim]
    }

    /// Size of the whole encoding in bits per parameter.
    #[must_use]
    pub fn bits_per_param(&self) -> f64 {
        ((self.payload_offset + self.payload_len) * 8) as f64 / self.numel.max(1) as f64
    }

    /// Parses and validates a header (not the payload).
    ///
    /// ```
    /// use kernels_core::format::{self, TernaryHeader, TernaryLayout};
    /// let bytes = format::encode(&[1, -1, 0], &[3], 2.0, TernaryLayout::Dense2Bit)?;
    /// let header = TernaryHeader::parse(&bytes)?;
    /// assert_eq!((header.numel, header.nnz, header.scale), (3, 2, 2.0));
    /// assert!(TernaryHeader::parse(b"not a tensor").is_err());
    /// # Ok::<(), kernels_core::Error>(())
    /// ```
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let bad = |offset, reason| Err(Error::BadFormat { offset, reason });
        if bytes.len() < FIXED_HEADER {
            return bad(bytes.len(), "truncated header");
        }
        if bytes[0..4] != MAGIC {
            return bad(0, "not a packed ternary tensor (magic is not KTRN)");
        }
        let version = bytes[4];
        if !(1..=VERSION).contains(&version) {
            return bad(4, "unsupported version");
        }
        let layout = match bytes[5] {
            0 => TernaryLayout::Dense2Bit,
            1 => TernaryLayout::SparseRice,
            _ => return bad(5, "unknown layout"),
        };
        let rice_k = bytes[6];
        if rice_k > 31 || (layout == TernaryLayout::Dense2Bit && rice_k != 0) {
            return bad(6, "invalid Rice parameter");
        }
        let ndim = bytes[7] as usize;
        if ndim > MAX_DIMS {
            return bad(7, "more than 8 dimensions");
        }
        let scale = f32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if !scale.is_finite() {
            return bad(8, "scale is not finite");
        }
        let read_u64 = |at: usize| -> Result<u64> {
            match bytes.get(at..at + 8) {
                Some(b) => Ok(u64::from_le_bytes([
                    b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
                ])),
                None => Err(Error::BadFormat {
                    offset: bytes.len(),
                    reason: "truncated header",
                }),
            }
        };
        let nnz = read_u64(12)?;
        let mut dims = [0u64; MAX_DIMS];
        let mut numel = 1u64;
        for (d, dim) in dims.iter_mut().enumerate().take(ndim) {
            *dim = read_u64(FIXED_HEADER + 8 * d)?;
            numel = match numel.checked_mul(*dim) {
                Some(n) => n,
                None => return bad(FIXED_HEADER + 8 * d, "element count overflows u64"),
            };
        }
        let len_at = FIXED_HEADER + 8 * ndim;
        let payload_len = read_u64(len_at)?;
        let payload_offset = len_at + 8;
        if nnz > numel {
            return bad(12, "more non-zeros than elements");
        }
        let expected_dense = numel.div_ceil(4);
        if layout == TernaryLayout::Dense2Bit && payload_len != expected_dense {
            return bad(len_at, "dense payload length is not ceil(numel / 4)");
        }
        let remaining = (bytes.len() - payload_offset) as u64;
        if payload_len != remaining {
            return bad(len_at, "payload length does not match the bytes given");
        }
        Ok(Self {
            version,
            layout,
            rice_k,
            scale,
            nnz,
            ndim,
            dims,
            numel,
            payload_offset,
            payload_len: payload_len as usize,
        })
    }
}

/// Least-significant-bit-first reader over a payload.
struct BitReader<'a> {
    bytes: &'a [u8],
    base: usize,
    pos: u64,
}

impl BitReader<'_> {
    fn bit(&mut self) -> Result<bool> {
        let byte = (self.pos / 8) as usize;
        let Some(&b) = self.bytes.get(byte) else {
            return Err(Error::BadFormat {
                offset: self.base + byte,
                reason: "sparse payload ends early",
            });
        };
        let bit = (b >> (self.pos % 8)) & 1 == 1;
        self.pos += 1;
        Ok(bit)
    }

    fn bits(&mut self, count: u8) -> Result<u64> {
        let mut v = 0u64;
        for i in 0..count {
            v |= u64::from(self.bit()?) << i;
        }
        Ok(v)
    }
}

/// One block of a sparse payload: the elements it codes, its stream and its non-zeros.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RiceBlock {
    /// Flat index of the block's first element; its first gap counts from the one before.
    pub first: u64,
    /// One past the flat index of the block's last element.
    pub end: u64,
    /// The block's stream: a range of the payload.
    pub bytes: Range<usize>,
    /// Non-zero codes in the block.
    pub nnz: u64,
}

/// The blocks of a sparse payload in order, from [`rice_blocks`]: a version-1 payload is one
/// block of the whole tensor.
#[derive(Clone, Debug)]
pub struct RiceBlocks<'a> {
    index: &'a [u8],
    numel: u64,
    /// The next block's number, and where its stream starts.
    next: (u64, usize),
    /// The version-1 payload's single block, until taken.
    whole: Option<RiceBlock>,
}

impl Iterator for RiceBlocks<'_> {
    type Item = RiceBlock;

    fn next(&mut self) -> Option<RiceBlock> {
        if let Some(whole) = self.whole.take() {
            return Some(whole);
        }
        let (block, start) = self.next;
        let at = block as usize * RICE_INDEX_ENTRY;
        let entry = self.index.get(at..at + RICE_INDEX_ENTRY)?;
        let (len, nnz) = index_entry(entry);
        let first = block * RICE_BLOCK;
        self.next = (block + 1, start + len as usize);
        Some(RiceBlock {
            first,
            end: (first + RICE_BLOCK).min(self.numel),
            bytes: start..start + len as usize,
            nnz: u64::from(nnz),
        })
    }
}

/// A block's byte length and non-zero count from the front of its index entry.
fn index_entry(entry: &[u8]) -> (u32, u32) {
    let word =
        |at: usize| u32::from_le_bytes([entry[at], entry[at + 1], entry[at + 2], entry[at + 3]]);
    (word(0), word(4))
}

/// The blocks of the sparse `payload` (the bytes after the header) that `header` describes, after
/// checking the index: it fits the payload, the blocks' lengths add up to the rest of it, their
/// non-zeros to the header's, and no block has more non-zeros than elements. The blocks' streams
/// are not checked here; every block decodes on its own ([`decode_into`] checks them in order).
///
/// ```
/// use kernels_core::format::{self, TernaryHeader, TernaryLayout, RICE_BLOCK};
/// let mut codes = vec![0i8; 3 * RICE_BLOCK as usize];
/// codes[5] = 1;
/// codes[2 * RICE_BLOCK as usize] = -1;
/// let bytes = format::encode(&codes, &[codes.len() as u64], 1.0, TernaryLayout::SparseRice)?;
/// let header = TernaryHeader::parse(&bytes)?;
/// let blocks: Vec<_> = format::rice_blocks(&header, &bytes[header.payload_offset..])?.collect();
/// assert_eq!(blocks.iter().map(|b| b.nnz).collect::<Vec<_>>(), [1, 0, 1]);
/// assert_eq!((blocks[2].first, blocks[2].end), (2 * RICE_BLOCK, 3 * RICE_BLOCK));
/// assert!(blocks[1].bytes.is_empty());
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn rice_blocks<'a>(header: &TernaryHeader, payload: &'a [u8]) -> Result<RiceBlocks<'a>> {
    let base = header.payload_offset;
    if header.layout != TernaryLayout::SparseRice {
        return Err(Error::InvalidParam {
            name: "header.layout",
            value: 0.0,
            expected: "the sparse layout",
        });
    }
    check_len("payload", header.payload_len, payload.len())?;
    if header.version == 1 {
        return Ok(RiceBlocks {
            index: &[],
            numel: header.numel,
            next: (0, 0),
            whole: Some(RiceBlock {
                first: 0,
                end: header.numel,
                bytes: 0..payload.len(),
                nnz: header.nnz,
            }),
        });
    }
    let blocks = header.numel.div_ceil(RICE_BLOCK);
    // At most 2^48 blocks: the product fits.
    let index_len = blocks * RICE_INDEX_ENTRY as u64;
    if index_len > payload.len() as u64 {
        return Err(Error::BadFormat {
            offset: base + payload.len(),
            reason: "sparse index ends early",
        });
    }
    let index = &payload[..index_len as usize];
    let (mut bytes, mut nnz) = (0u64, 0u64);
    for (block, entry) in index.chunks_exact(RICE_INDEX_ENTRY).enumerate() {
        let (len, count) = index_entry(entry);
        let elements = (header.numel - block as u64 * RICE_BLOCK).min(RICE_BLOCK);
        if u64::from(count) > elements {
            return Err(Error::BadFormat {
                offset: base + block * RICE_INDEX_ENTRY + 4,
                reason: "block has more non-zeros than elements",
            });
        }
        bytes += u64::from(len);
        nnz += u64::from(count);
    }
    if index_len + bytes != payload.len() as u64 {
        return Err(Error::BadFormat {
            offset: base,
            reason: "block lengths do not add up to the payload",
        });
    }
    if nnz != header.nnz {
        return Err(Error::BadFormat {
            offset: 12,
            reason: "non-zero count does not match the payload",
        });
    }
    Ok(RiceBlocks {
        index,
        numel: header.numel,
        next: (0, index.len()),
        whole: None,
    })
}

/// Decodes one block of a sparse payload into `codes` (the whole tensor's), checking its stream:
/// every gap inside the block, no bits missing, none left over, zero padding.
fn decode_block(
    block: &RiceBlock,
    payload: &[u8],
    base: usize,
    k: u8,
    codes: &mut [i8],
) -> Result<()> {
    let bytes = &payload[block.bytes.clone()];
    let base = base + block.bytes.start;
    let mut reader = BitReader {
        bytes,
        base,
        pos: 0,
    };
    let past_end = |reader: &BitReader<'_>| Error::BadFormat {
        offset: base + (reader.pos / 8) as usize,
        reason: "gap runs past the end",
    };
    let span = block.end - block.first;
    let mut next = block.first; // the first index the next gap counts from
    for _ in 0..block.nnz {
        let mut quotient = 0u64;
        while reader.bit()? {
            quotient += 1;
            if quotient << k >= span {
                return Err(past_end(&reader));
            }
        }
        let gap = (quotient << k) | reader.bits(k)?;
        let index = next
            .checked_add(gap)
            .filter(|&i| i < block.end)
            .ok_or_else(|| past_end(&reader))?;
        codes[index as usize] = if reader.bit()? { -1 } else { 1 };
        next = index + 1;
    }
    let used_bytes = reader.pos.div_ceil(8) as usize;
    if used_bytes != bytes.len() {
        return Err(Error::BadFormat {
            offset: base + used_bytes,
            reason: "bytes after the last code",
        });
    }
    if !reader.pos.is_multiple_of(8) && bytes[used_bytes - 1] >> (reader.pos % 8) != 0 {
        return Err(Error::BadFormat {
            offset: base + used_bytes - 1,
            reason: "padding bits are not zero",
        });
    }
    Ok(())
}

/// Decodes into `codes` (length = the header's element count) and returns the header.
/// Needs no allocator.
///
/// ```
/// use kernels_core::format::{self, TernaryLayout};
/// let bytes = format::encode(&[1, 0, -1], &[3], 0.5, TernaryLayout::SparseRice)?;
/// let mut codes = [0i8; 3];
/// let header = format::decode_into(&bytes, &mut codes)?;
/// assert_eq!((codes, header.scale), ([1, 0, -1], 0.5));
/// // A buffer of the wrong length, or truncated bytes, is an error.
/// assert!(format::decode_into(&bytes, &mut [0i8; 2]).is_err());
/// assert!(format::decode_into(&bytes[..bytes.len() - 1], &mut codes).is_err());
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub fn decode_into(bytes: &[u8], codes: &mut [i8]) -> Result<TernaryHeader> {
    let header = TernaryHeader::parse(bytes)?;
    check_len(
        "codes",
        usize::try_from(header.numel).unwrap_or(usize::MAX),
        codes.len(),
    )?;
    let payload = &bytes[header.payload_offset..];
    let base = header.payload_offset;
    match header.layout {
        TernaryLayout::Dense2Bit => {
            let mut nnz = 0u64;
            for (i, c) in codes.iter_mut().enumerate() {
                *c = match (payload[i / 4] >> (2 * (i % 4))) & 3 {
                    0 => 0,
                    1 => 1,
                    2 => -1,
                    _ => {
                        return Err(Error::BadFormat {
                            offset: base + i / 4,
                            reason: "dense code 0b11 is invalid",
                        });
                    }
                };
                nnz += u64::from(*c != 0);
            }
            if !codes.len().is_multiple_of(4)
                && payload[codes.len() / 4] >> (2 * (codes.len() % 4)) != 0
            {
                return Err(Error::BadFormat {
                    offset: base + codes.len() / 4,
                    reason: "padding bits are not zero",
                });
            }
            if nnz != header.nnz {
                return Err(Error::BadFormat {
                    offset: 12,
                    reason: "non-zero count does not match the payload",
                });
            }
        }
        TernaryLayout::SparseRice => {
            codes.fill(0);
            for block in rice_blocks(&header, payload)? {
                decode_block(&block, payload, base, header.rice_k, codes)?;
            }
        }
    }
    Ok(header)
}

/// Decodes into a new vector of at most `max_elements` codes.
///
/// A sparse encoding of a huge all-zero tensor is a few bytes, so the element count in a header
/// is not bounded by the input size: `max_elements` keeps a hostile header from allocating
/// gigabytes. Above it the result is [`Error::BadFormat`].
///
/// ```
/// use kernels_core::format::{self, TernaryLayout};
/// let bytes = format::encode(&[0, 0, 0, 1], &[4], 1.0, TernaryLayout::SparseRice)?;
/// assert_eq!(format::decode(&bytes, 4)?.1, [0, 0, 0, 1]);
/// assert!(format::decode(&bytes, 3).is_err()); // more elements than the caller allows
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn decode(bytes: &[u8], max_elements: usize) -> Result<(TernaryHeader, alloc::vec::Vec<i8>)> {
    let header = TernaryHeader::parse(bytes)?;
    let n = usize::try_from(header.numel)
        .ok()
        .filter(|&n| n <= max_elements)
        .ok_or(Error::BadFormat {
            offset: FIXED_HEADER,
            reason: "element count exceeds the caller's limit",
        })?;
    let mut codes = crate::backend::try_vec("decoded codes", n)?;
    codes.resize(n, 0);
    let header = decode_into(bytes, &mut codes)?;
    Ok((header, codes))
}

/// Bits per parameter of the entropy bound at density `d`: `H(d) + d` (where the non-zeros are,
/// plus one sign bit each), the size a sparse layout approaches.
///
/// ```
/// use kernels_core::format::entropy_bits_per_param;
/// assert_eq!(entropy_bits_per_param(0.0), 0.0);
/// assert!((entropy_bits_per_param(0.5) - 1.5).abs() < 1e-12);
/// ```
#[must_use]
pub fn entropy_bits_per_param(d: f64) -> f64 {
    if d <= 0.0 || d >= 1.0 {
        return d.clamp(0.0, 1.0);
    }
    -(d * libm::log2(d) + (1.0 - d) * libm::log2(1.0 - d)) + d
}

#[cfg(feature = "alloc")]
struct BitWriter {
    bytes: alloc::vec::Vec<u8>,
    pos: u64,
}

#[cfg(feature = "alloc")]
impl BitWriter {
    fn bit(&mut self, b: bool) {
        if self.pos.is_multiple_of(8) {
            self.bytes.push(0);
        }
        if b {
            // Unreachable: a byte is pushed whenever `pos` starts one, so one exists.
            *self.bytes.last_mut().expect("pushed above") |= 1 << (self.pos % 8);
        }
        self.pos += 1;
    }
}

/// Encodes codes with the given shape and layout, in the current [`VERSION`].
///
/// ```
/// use kernels_core::format::{self, TernaryLayout};
/// let bytes = format::encode(&[1, 0, 0, -1], &[2, 2], 0.5, TernaryLayout::Dense2Bit)?;
/// assert_eq!(&bytes[..4], b"KTRN");
/// // A code outside {-1, 0, 1}, or a shape that does not match, is an error.
/// assert!(format::encode(&[2], &[1], 0.5, TernaryLayout::Dense2Bit).is_err());
/// assert!(format::encode(&[1, 0], &[3], 0.5, TernaryLayout::Dense2Bit).is_err());
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn encode(
    codes: &[i8],
    shape: &[u64],
    scale: f32,
    layout: TernaryLayout,
) -> Result<alloc::vec::Vec<u8>> {
    encode_version(codes, shape, scale, layout, VERSION)
}

/// Encodes codes in the given format version: 1 for readers that predate version 2 (its sparse
/// payload is one stream, which only decodes from the start), or [`VERSION`].
///
/// ```
/// use kernels_core::format::{self, TernaryHeader, TernaryLayout};
/// let codes = [0i8, 1, 0, 0, -1];
/// let old = format::encode_version(&codes, &[5], 1.0, TernaryLayout::SparseRice, 1)?;
/// assert_eq!(TernaryHeader::parse(&old)?.version, 1);
/// assert_eq!(format::decode(&old, 5)?.1, codes); // both versions are read
/// assert!(format::encode_version(&codes, &[5], 1.0, TernaryLayout::SparseRice, 3).is_err());
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn encode_version(
    codes: &[i8],
    shape: &[u64],
    scale: f32,
    layout: TernaryLayout,
    version: u8,
) -> Result<alloc::vec::Vec<u8>> {
    check_shape(shape, codes.len())?;
    crate::error::check_param("scale", f64::from(scale), "finite", scale.is_finite())?;
    crate::backend::check_codes(codes)?;
    let nnz = codes.iter().filter(|&&c| c != 0).count() as u64;
    let (rice_k, payload) = match layout {
        TernaryLayout::Dense2Bit => {
            let mut payload = alloc::vec![0u8; codes.len().div_ceil(4)];
            for (i, &c) in codes.iter().enumerate() {
                let bits = match c {
                    1 => 1u8,
                    -1 => 2,
                    _ => 0,
                };
                payload[i / 4] |= bits << (2 * (i % 4));
            }
            (0, payload)
        }
        TernaryLayout::SparseRice if version == 1 => encode_sparse(codes, codes.len(), false),
        TernaryLayout::SparseRice => encode_sparse(codes, RICE_BLOCK as usize, true),
    };
    let mut out = alloc::vec::Vec::with_capacity(header_len(shape.len()) + payload.len());
    write_header(
        &mut out,
        version,
        layout,
        rice_k,
        scale,
        nnz,
        shape,
        payload.len(),
    )?;
    out.extend_from_slice(&payload);
    Ok(out)
}

/// The Rice parameter and payload of the sparse layout, `codes` cut into blocks of `block`
/// elements (with an index when `indexed`; version 1 is one block without).
#[cfg(feature = "alloc")]
fn encode_sparse(codes: &[i8], block: usize, indexed: bool) -> (u8, alloc::vec::Vec<u8>) {
    let blocks = || codes.chunks(block.max(1));
    let mut stats = GapStats::default();
    blocks().flat_map(gaps).for_each(|(g, _)| stats.add(g));
    let best_k = stats.best_rice_k();
    let mut index = alloc::vec::Vec::new();
    let mut streams = alloc::vec::Vec::new();
    for codes in blocks() {
        let mut w = BitWriter {
            bytes: alloc::vec::Vec::new(),
            pos: 0,
        };
        for (gap, negative) in gaps(codes) {
            for _ in 0..(gap >> best_k) {
                w.bit(true);
            }
            w.bit(false);
            for i in 0..best_k {
                w.bit((gap >> i) & 1 == 1);
            }
            w.bit(negative);
        }
        let nnz = codes.iter().filter(|c| **c != 0).count() as u32;
        // A block's stream is at most 65 536 codes of 33 bits and its gaps' unary parts.
        index.extend_from_slice(&(w.bytes.len() as u32).to_le_bytes());
        index.extend_from_slice(&nnz.to_le_bytes());
        streams.extend_from_slice(&w.bytes);
    }
    if indexed {
        index.extend_from_slice(&streams);
        (best_k, index)
    } else {
        (best_k, streams)
    }
}

/// The gaps and signs of a block's non-zeros, the first gap counting from the block's start.
#[cfg(feature = "alloc")]
fn gaps(codes: &[i8]) -> impl Iterator<Item = (u64, bool)> + '_ {
    let mut next = 0usize;
    codes
        .iter()
        .enumerate()
        .filter(|(_, c)| **c != 0)
        .map(move |(i, &c)| {
            let gap = (i - next) as u64;
            next = i + 1;
            (gap, c < 0)
        })
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    fn decode_all(bytes: &[u8]) -> Result<(TernaryHeader, Vec<i8>)> {
        decode(bytes, 1 << 20)
    }

    fn codes_at_density(n: usize, d: f64, seed: u64) -> Vec<i8> {
        let rng = crate::CounterRng::new(seed);
        (0..n as u64)
            .map(|i| {
                let u = f64::from(rng.uniform_at(i));
                if u < d / 2.0 { -1 } else { i8::from(u < d) }
            })
            .collect()
    }

    #[test]
    fn round_trips_both_layouts() {
        for layout in [TernaryLayout::Dense2Bit, TernaryLayout::SparseRice] {
            for n in [0usize, 1, 3, 4, 5, 97] {
                let codes = codes_at_density(n, 0.3, n as u64);
                let bytes = encode(&codes, &[n as u64], 0.25, layout).unwrap();
                let (h, back) = decode_all(&bytes).unwrap();
                assert_eq!(back, codes, "{layout:?} n={n}");
                assert_eq!(
                    (h.scale, h.shape(), h.layout),
                    (0.25, &[n as u64][..], layout)
                );
            }
        }
        let codes = codes_at_density(12, 0.5, 1);
        let bytes = encode(&codes, &[3, 4], -1.5, TernaryLayout::SparseRice).unwrap();
        assert_eq!(decode_all(&bytes).unwrap().0.shape(), [3, 4]);
    }

    #[test]
    fn sparse_layout_is_near_the_entropy_bound_at_density_0_1() {
        let n = 1_000_000;
        let codes = codes_at_density(n, 0.1, 9);
        let bytes = encode(&codes, &[n as u64], 1.0, TernaryLayout::SparseRice).unwrap();
        let header = TernaryHeader::parse(&bytes).unwrap();
        let achieved = header.bits_per_param();
        let bound = entropy_bits_per_param(header.nnz as f64 / n as f64);
        assert!(
            achieved < 1.10 * bound,
            "{achieved} bits/param vs bound {bound}"
        );
        assert!(
            achieved > bound * 0.99,
            "below the entropy bound is impossible: {achieved} vs {bound}"
        );
        let dense = encode(&codes, &[n as u64], 1.0, TernaryLayout::Dense2Bit).unwrap();
        assert!((TernaryHeader::parse(&dense).unwrap().bits_per_param() - 2.0).abs() < 0.01);
    }

    #[test]
    fn decoder_rejects_garbage() {
        let codes = codes_at_density(50, 0.2, 4);
        for layout in [TernaryLayout::Dense2Bit, TernaryLayout::SparseRice] {
            let good = encode(&codes, &[5, 10], 2.0, layout).unwrap();
            for cut in 0..good.len() {
                assert!(
                    decode_all(&good[..cut]).is_err(),
                    "truncated at {cut} accepted"
                );
            }
            let mut extra = good.clone();
            extra.push(0);
            assert!(decode_all(&extra).is_err());
            let mut bad_magic = good.clone();
            bad_magic[0] = b'X';
            assert!(matches!(
                decode_all(&bad_magic),
                Err(Error::BadFormat { offset: 0, .. })
            ));
            let mut bad_scale = good.clone();
            bad_scale[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
            assert!(decode_all(&bad_scale).is_err());
            let mut bad_nnz = good.clone();
            bad_nnz[12] ^= 1;
            assert!(decode_all(&bad_nnz).is_err());
        }
        // A dense 0b11 code.
        let mut dense = encode(&[0, 0, 0, 0], &[4], 1.0, TernaryLayout::Dense2Bit).unwrap();
        *dense.last_mut().unwrap() = 0b11;
        assert!(decode_all(&dense).is_err());
        // Dims whose product overflows.
        let mut zeros = encode(&[0; 8], &[8], 1.0, TernaryLayout::SparseRice).unwrap();
        zeros[20..28].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(
            TernaryHeader::parse(&zeros).is_ok(),
            "2^40 zeros is a valid header"
        );
        assert!(
            decode_all(&zeros).is_err(),
            "but it exceeds the caller's limit"
        );
        let mut huge = encode(&[], &[0, 0], 1.0, TernaryLayout::Dense2Bit).unwrap();
        huge[20..28].copy_from_slice(&u64::MAX.to_le_bytes());
        huge[28..36].copy_from_slice(&3u64.to_le_bytes());
        assert!(decode_all(&huge).is_err());
        assert!(encode(&[2], &[1], 1.0, TernaryLayout::Dense2Bit).is_err());
        assert!(encode(&[1], &[2], 1.0, TernaryLayout::Dense2Bit).is_err());
    }

    proptest! {
        #[test]
        fn gap_stats_count_payload_bits_exactly(gaps in prop::collection::vec(0u64..1 << 40, 0..50)) {
            let mut stats = GapStats::default();
            for &g in &gaps {
                stats.add(g);
            }
            for k in 0u8..=31 {
                let brute: u128 = gaps.iter().map(|&g| u128::from((g >> k) + 2 + u64::from(k))).sum();
                prop_assert_eq!(stats.payload_bits(k), brute);
            }
        }
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..80)) {
            if let Ok((header, codes)) = decode_all(&bytes) {
                // Whatever decodes re-encodes to the same bytes in its version (encodings are
                // canonical) when the encoder would have picked the same Rice parameter.
                let again = encode_version(
                    &codes, header.shape(), header.scale, header.layout, header.version,
                ).unwrap();
                if again[6] == bytes[6] {
                    prop_assert_eq!(again, bytes);
                }
            }
        }

        #[test]
        fn mutated_encodings_never_panic(
            seed in any::<u64>(), at in 0usize..200, flip in 1u8..=255, version in 1u8..=2,
        ) {
            let codes = codes_at_density(40, 0.25, seed);
            let mut bytes =
                encode_version(&codes, &[40], 1.0, TernaryLayout::SparseRice, version).unwrap();
            let at = at % bytes.len();
            bytes[at] ^= flip;
            let _ = decode_all(&bytes);
        }
    }
}
