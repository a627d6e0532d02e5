//! GGUF (llama.cpp's model file, versions 2 and 3) read from a byte slice: the metadata, the
//! tensor table, and tensors dequantised to `f32` (`F32`, `F16`, `BF16`, `Q8_0`, `Q4_0`, `Q4_1`).
//!
//! # Contract
//!
//! * [`Gguf::parse`] borrows the bytes (memory-map a file, or read it whole) and checks all of
//!   them that it indexes: every length and count against the bytes left before allocating for
//!   it (a header cannot make it reserve more than a small multiple of the file's own size),
//!   strings as UTF-8, nested arrays at most [`MAX_ARRAY_DEPTH`] deep, each tensor's shape
//!   against overflow and its data within the data section, aligned as the file says. Bad bytes
//!   are [`Error::BadFormat`] with the offset, never a panic.
//! * Tensors of any ggml type are listed; those this reader cannot dequantise (the K-quants,
//!   the i-quants) are an [`Error::Unsupported`] when read, naming the type.
//! * Dequantisation follows ggml's reference (`dequantize_row_*`): the block scale (and minimum)
//!   widened from `f16` exactly, `x = d q` (`Q8_0`, `Q4_0` with `q - 8`) or `x = d q + m`
//!   (`Q4_1`) rounded once in `f32`, as ggml computes it.
//! * Shapes are ggml's: `dims[0]` is the fastest-varying (a matrix of `rows x cols` is stored as
//!   `dims = [cols, rows]`, row by row).

use alloc::vec::Vec;

use half::{bf16, f16};
use kernels_core::{Error, Result};

/// The file's first four bytes.
pub const MAGIC: [u8; 4] = *b"GGUF";

/// Arrays of arrays are accepted this deep (the format allows any depth; models use 1).
pub const MAX_ARRAY_DEPTH: usize = 2;

/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;

/// A ggml tensor type: its id and, where this reader knows it, its block geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType(pub u32);

impl GgmlType {
    /// `f32`.
    pub const F32: Self = Self(0);
    /// `f16`.
    pub const F16: Self = Self(1);
    /// Blocks of 32: an `f16` scale and 32 4-bit values, `x = d (q - 8)`.
    pub const Q4_0: Self = Self(2);
    /// Blocks of 32: `f16` scale and minimum and 32 4-bit values, `x = d q + m`.
    pub const Q4_1: Self = Self(3);
    /// Blocks of 32: an `f16` scale and 32 `i8` values, `x = d q`.
    pub const Q8_0: Self = Self(8);
    /// `bf16`.
    pub const BF16: Self = Self(30);

    /// The type's name as ggml spells it.
    #[must_use]
    pub fn name(self) -> &'static str {
        self.geometry().map_or("unknown", |g| g.0)
    }

    /// `(name, elements per block, bytes per block)` for the types ggml defines.
    fn geometry(self) -> Option<(&'static str, u64, u64)> {
        Some(match self.0 {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            9 => ("Q8_1", 32, 36),
            10 => ("Q2_K", 256, 84),
            11 => ("Q3_K", 256, 110),
            12 => ("Q4_K", 256, 144),
            13 => ("Q5_K", 256, 176),
            14 => ("Q6_K", 256, 210),
            15 => ("Q8_K", 256, 292),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            30 => ("BF16", 1, 2),
            _ => return None,
        })
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value<'a> {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float32`.
    F32(f32),
    /// `float64`.
    F64(f64),
    /// `bool`.
    Bool(bool),
    /// A UTF-8 string, borrowed from the file.
    Str(&'a str),
    /// An array (all elements of one type).
    Array(Vec<Value<'a>>),
}

impl Value<'_> {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    #[must_use]
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    #[must_use]
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The string, if the value is one.
    #[must_use]
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    #[must_use]
    pub fn as_array(&self) -> Option<&[Self]> {
        match self {
            Self::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo<'a> {
    /// Name, e.g. `blk.0.attn_q.weight`.
    pub name: &'a str,
    /// ggml's dimensions, fastest-varying first.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Where the data starts, from the start of the data section.
    pub offset: u64,
    /// Elements (the product of `dims`).
    pub elements: u64,
    /// Bytes of data, where the type's geometry is known.
    pub bytes: Option<u64>,
}

/// A parsed GGUF file, borrowing its bytes.
///
/// ```
/// use kernels_llm::gguf::{Gguf, GgmlType, Writer};
/// // A file with one key and one 2 x 2 f32 tensor, written by the test writer.
/// let mut w = Writer::new();
/// w.metadata_u32("llama.block_count", 1);
/// w.tensor_f32("t", &[2, 2], &[1.0, 2.0, 3.0, 4.0]);
/// let bytes = w.finish();
/// let file = Gguf::parse(&bytes)?;
/// assert_eq!(file.u64("llama.block_count"), Some(1));
/// assert_eq!(file.tensor("t").unwrap().ggml_type, GgmlType::F32);
/// assert_eq!(file.dequantize("t")?, [1.0, 2.0, 3.0, 4.0]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Gguf<'a> {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata, in file order.
    pub metadata: Vec<(&'a str, Value<'a>)>,
    /// The tensor table, in file order.
    pub tensors: Vec<TensorInfo<'a>>,
    /// Alignment of the data section and its tensors.
    pub alignment: u64,
    /// The data section.
    data: &'a [u8],
    /// Where the data section starts in the file.
    pub data_offset: usize,
}

/// A cursor over the file's bytes; every read checks its bounds.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

fn bad(offset: usize, reason: &'static str) -> Error {
    Error::BadFormat { offset, reason }
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(bad(self.at, what));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_bytes` long, checked against the bytes left.
    fn count(&mut self, min_bytes: usize, what: &'static str) -> Result<usize> {
        let at = self.at;
        let n = self.u64(what)?;
        match usize::try_from(n) {
            Ok(n) if n.checked_mul(min_bytes).is_some_and(|b| b <= self.left()) => Ok(n),
            _ => Err(bad(at, what)),
        }
    }

    fn string(&mut self, what: &'static str) -> Result<&'a str> {
        let n = self.count(1, what)?;
        let at = self.at;
        core::str::from_utf8(self.take(n, what)?).map_err(|_| bad(at, "a string that is not UTF-8"))
    }

    fn value(&mut self, kind: u32, depth: usize) -> Result<Value<'a>> {
        let at = self.at;
        Ok(match kind {
            0 => Value::U8(self.array::<1>("a uint8 past the end")?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array("an int8 past the end")?)),
            2 => Value::U16(u16::from_le_bytes(self.array("a uint16 past the end")?)),
            3 => Value::I16(i16::from_le_bytes(self.array("an int16 past the end")?)),
            4 => Value::U32(self.u32("a uint32 past the end")?),
            5 => Value::I32(i32::from_le_bytes(self.array("an int32 past the end")?)),
            6 => Value::F32(f32::from_le_bytes(self.array("a float32 past the end")?)),
            7 => match self.array::<1>("a bool past the end")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                _ => return Err(bad(at, "a bool that is neither 0 nor 1")),
            },
            8 => Value::Str(self.string("a string longer than the file")?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(bad(at, "arrays nested too deep"));
                }
                let element = self.u32("an array's type past the end")?;
                let n = self.count(min_value_bytes(element), "an array longer than the file")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(element, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64("a uint64 past the end")?),
            11 => Value::I64(i64::from_le_bytes(self.array("an int64 past the end")?)),
            12 => Value::F64(f64::from_le_bytes(self.array("a float64 past the end")?)),
            _ => return Err(bad(at, "an unknown metadata value type")),
        })
    }
}

/// The fewest bytes a value of metadata type `kind` takes (so an array's count can be checked
/// against the bytes left before anything is allocated for it).
fn min_value_bytes(kind: u32) -> usize {
    match kind {
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        // u8, i8, bool; an unknown type fails on its first element.
        _ => 1,
    }
}

impl<'a> Gguf<'a> {
    /// Parses a whole GGUF file.
    ///
    /// # Errors
    ///
    /// [`Error::BadFormat`] (with the offset) for anything that is not a well-formed GGUF v2 or
    /// v3 file: a wrong magic or version, a length or count past the end, a string that is not
    /// UTF-8, an unknown value type, a tensor with more than [`MAX_DIMS`] dimensions or an
    /// overflowing shape, a duplicate tensor name, data outside the file or misaligned.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let mut r = Reader { bytes, at: 0 };
        if r.array::<4>("a file shorter than GGUF's magic")? != MAGIC {
            return Err(bad(0, "not a GGUF file (wrong magic)"));
        }
        let version = r.u32("a header past the end")?;
        if !(2..=3).contains(&version) {
            return Err(bad(4, "a GGUF version other than 2 or 3"));
        }
        // A tensor entry takes at least 8 (name) + 4 (dims) + 4 (type) + 8 (offset) bytes; a
        // key-value pair at least 8 (key) + 4 (type) + 1.
        let tensor_count = r.count(24, "more tensors than the file has room for")?;
        let kv_count = r.count(13, "more metadata than the file has room for")?;
        let mut metadata = Vec::with_capacity(kv_count);
        for _ in 0..kv_count {
            let key = r.string("a metadata key past the end")?;
            let kind = r.u32("a metadata type past the end")?;
            metadata.push((key, r.value(kind, 0)?));
        }
        let alignment = match metadata.iter().find(|(k, _)| *k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 20 => a,
                _ => return Err(bad(r.at, "general.alignment is not a power of two")),
            },
        };
        let mut tensors: Vec<TensorInfo<'a>> = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let at = r.at;
            let name = r.string("a tensor name past the end")?;
            let n_dims = r.u32("a tensor's dimension count past the end")? as usize;
            if n_dims > MAX_DIMS {
                return Err(bad(at, "a tensor with more than 4 dimensions"));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(r.u64("a tensor dimension past the end")?);
            }
            let ggml_type = GgmlType(r.u32("a tensor type past the end")?);
            let offset = r.u64("a tensor offset past the end")?;
            let elements = dims
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .ok_or_else(|| bad(at, "a tensor shape whose size overflows"))?;
            let bytes = match ggml_type.geometry() {
                Some((_, block, block_bytes)) => {
                    if dims.first().is_some_and(|d| d % block != 0) {
                        return Err(bad(at, "a quantised row that is not whole blocks"));
                    }
                    Some(
                        (elements / block)
                            .checked_mul(block_bytes)
                            .ok_or_else(|| bad(at, "a tensor shape whose size overflows"))?,
                    )
                }
                None => None,
            };
            if offset % alignment != 0 {
                return Err(bad(at, "a tensor offset that is not aligned"));
            }
            if tensors.iter().any(|t| t.name == name) {
                return Err(bad(at, "a tensor name given twice"));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                elements,
                bytes,
            });
        }
        let data_offset = usize::try_from(
            (r.at as u64)
                .checked_next_multiple_of(alignment)
                .ok_or_else(|| bad(r.at, "a data section past the end"))?,
        )
        .map_err(|_| bad(r.at, "a data section past the end"))?;
        let data = bytes.get(data_offset..).unwrap_or(&[]);
        for t in &tensors {
            if let Some(n) = t.bytes
                && t.offset
                    .checked_add(n)
                    .is_none_or(|end| end > data.len() as u64)
            {
                return Err(bad(data_offset, "tensor data past the end of the file"));
            }
        }
        Ok(Self {
            version,
            metadata,
            tensors,
            alignment,
            data,
            data_offset,
        })
    }

    /// The value of metadata key `key`.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        self.metadata
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// `key` as a non-negative integer.
    #[must_use]
    pub fn u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    /// `key` as a number.
    #[must_use]
    pub fn f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    /// `key` as a string.
    #[must_use]
    pub fn str(&self, key: &str) -> Option<&'a str> {
        match self.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// The tensor named `name`.
    #[must_use]
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo<'a>> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of tensor `t` (as stored: blocks for the quantised types).
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] for a type whose size this reader does not know.
    pub fn raw(&self, t: &TensorInfo<'_>) -> Result<&'a [u8]> {
        let n = t.bytes.ok_or(Error::Unsupported {
            feature: "a ggml tensor type this reader does not know",
            hint: "convert the model to F32, F16, BF16, Q8_0, Q4_0 or Q4_1",
        })?;
        // In range: checked by `parse`.
        Ok(&self.data[t.offset as usize..(t.offset + n) as usize])
    }

    /// Tensor `name` dequantised to `f32`, in storage order (`dims[0]` fastest).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParam`] for a name the file does not have, [`Error::Unsupported`] for a
    /// type this reader cannot dequantise, [`Error::TooLarge`] for a tensor past the address
    /// space.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name).ok_or(Error::InvalidParam {
            name: "tensor name",
            value: f64::NAN,
            expected: "a tensor the file has",
        })?;
        // The raw bytes first: their length, within the file, bounds the allocation.
        let raw = self.raw(t)?;
        let n = usize::try_from(t.elements).map_err(|_| Error::TooLarge {
            what: "tensor",
            limit: usize::MAX as u64,
            unit: "elements",
        })?;
        let mut out = alloc::vec![0.0f32; n];
        dequantize_into(t.ggml_type, raw, &mut out)?;
        Ok(out)
    }
}

/// Dequantises `raw` bytes of type `ggml_type` into `out` (one value per element), as ggml's
/// `dequantize_row_*` does.
///
/// ```
/// use half::f16;
/// use kernels_llm::gguf::{GgmlType, dequantize_into};
/// // One Q4_1 block: d = 0.5, m = -1, values 0..15 then 15..0 in nibbles.
/// let mut block = Vec::new();
/// block.extend(f16::from_f32(0.5).to_le_bytes());
/// block.extend(f16::from_f32(-1.0).to_le_bytes());
/// block.extend((0..16u8).map(|j| j | (15 - j) << 4));
/// let mut out = [0.0f32; 32];
/// dequantize_into(GgmlType::Q4_1, &block, &mut out)?;
/// assert_eq!((out[0], out[15], out[16], out[31]), (-1.0, 6.5, 6.5, -1.0));
/// # Ok::<(), kernels_core::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::Unsupported`] for another type; [`Error::LengthMismatch`] where `raw` is not
/// exactly `out.len()` elements of the type.
pub fn dequantize_into(ggml_type: GgmlType, raw: &[u8], out: &mut [f32]) -> Result<()> {
    let (_, block, block_bytes) = ggml_type.geometry().ok_or(Error::Unsupported {
        feature: "a ggml tensor type this reader does not know",
        hint: "convert the model to F32, F16, BF16, Q8_0, Q4_0 or Q4_1",
    })?;
    let (block, block_bytes) = (block as usize, block_bytes as usize);
    let expected = out.len().div_ceil(block) * block_bytes;
    if !out.len().is_multiple_of(block) || raw.len() != expected {
        return Err(Error::LengthMismatch {
            what: "raw tensor bytes",
            expected,
            found: raw.len(),
        });
    }
    let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    let blocks = raw
        .chunks_exact(block_bytes)
        .zip(out.chunks_exact_mut(block));
    match ggml_type {
        GgmlType::F32 => {
            blocks.for_each(|(b, o)| o[0] = f32::from_le_bytes(b.try_into().expect("4")));
        }
        GgmlType::F16 => blocks.for_each(|(b, o)| o[0] = half(b)),
        GgmlType::BF16 => {
            blocks.for_each(|(b, o)| o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32());
        }
        GgmlType::Q8_0 => blocks.for_each(|(b, o)| {
            let d = half(b);
            for (o, &q) in o.iter_mut().zip(&b[2..]) {
                *o = f32::from(q as i8) * d;
            }
        }),
        GgmlType::Q4_0 => blocks.for_each(|(b, o)| {
            let d = half(b);
            let (lo, hi) = o.split_at_mut(16);
            for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[2..]) {
                *l = (f32::from(q & 15) - 8.0) * d;
                *h = (f32::from(q >> 4) - 8.0) * d;
            }
        }),
        GgmlType::Q4_1 => blocks.for_each(|(b, o)| {
            let (d, m) = (half(b), half(&b[2..]));
            let (lo, hi) = o.split_at_mut(16);
            for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[4..]) {
                *l = f32::from(q & 15) * d + m;
                *h = f32::from(q >> 4) * d + m;
            }
        }),
        other => {
            return Err(Error::Unsupported {
                feature: match other.name() {
                    "Q5_0" | "Q5_1" | "Q8_1" => "dequantising Q5_0, Q5_1 or Q8_1",
                    "Q2_K" | "Q3_K" | "Q4_K" | "Q5_K" | "Q6_K" | "Q8_K" => {
                        "dequantising the K-quants"
                    }
                    _ => "dequantising this ggml tensor type",
                },
                hint: "convert the model to F32, F16, BF16, Q8_0, Q4_0 or Q4_1",
            });
        }
    }
    Ok(())
}

/// Writes GGUF v3 files: for tests, fuzz seeds and examples (tiny models the tests make), not a
/// converter. Tensors are laid out in the order added, each aligned to [`DEFAULT_ALIGNMENT`].
#[derive(Debug, Default)]
pub struct Writer {
    metadata: Vec<u8>,
    kv_count: u64,
    table: Vec<u8>,
    data: Vec<u8>,
    tensor_count: u64,
}

impl Writer {
    /// An empty file.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn key(&mut self, key: &str, kind: u32) {
        put_string(&mut self.metadata, key);
        self.metadata.extend(kind.to_le_bytes());
        self.kv_count += 1;
    }

    /// Adds a `uint32` metadata value.
    pub fn metadata_u32(&mut self, key: &str, value: u32) {
        self.key(key, 4);
        self.metadata.extend(value.to_le_bytes());
    }

    /// Adds a `float32` metadata value.
    pub fn metadata_f32(&mut self, key: &str, value: f32) {
        self.key(key, 6);
        self.metadata.extend(value.to_le_bytes());
    }

    /// Adds a `bool` metadata value.
    pub fn metadata_bool(&mut self, key: &str, value: bool) {
        self.key(key, 7);
        self.metadata.push(u8::from(value));
    }

    /// Adds a string metadata value.
    pub fn metadata_str(&mut self, key: &str, value: &str) {
        self.key(key, 8);
        put_string(&mut self.metadata, value);
    }

    /// Adds an array of strings.
    pub fn metadata_strs(&mut self, key: &str, values: &[&str]) {
        self.key(key, 9);
        self.metadata.extend(8u32.to_le_bytes());
        self.metadata.extend((values.len() as u64).to_le_bytes());
        for v in values {
            put_string(&mut self.metadata, v);
        }
    }

    /// Adds an array of `int32`.
    pub fn metadata_i32s(&mut self, key: &str, values: &[i32]) {
        self.key(key, 9);
        self.metadata.extend(5u32.to_le_bytes());
        self.metadata.extend((values.len() as u64).to_le_bytes());
        for v in values {
            self.metadata.extend(v.to_le_bytes());
        }
    }

    /// Adds a tensor of type `ggml_type` whose stored bytes are `raw`, ggml dimensions `dims`.
    pub fn tensor_raw(&mut self, name: &str, dims: &[u64], ggml_type: GgmlType, raw: &[u8]) {
        let padded = (self.data.len() as u64).next_multiple_of(DEFAULT_ALIGNMENT);
        self.data.resize(padded as usize, 0);
        put_string(&mut self.table, name);
        self.table.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.table.extend(d.to_le_bytes());
        }
        self.table.extend(ggml_type.0.to_le_bytes());
        self.table.extend(padded.to_le_bytes());
        self.data.extend_from_slice(raw);
        self.tensor_count += 1;
    }

    /// Adds an `f32` tensor.
    pub fn tensor_f32(&mut self, name: &str, dims: &[u64], values: &[f32]) {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor_raw(name, dims, GgmlType::F32, &raw);
    }

    /// The file's bytes.
    #[must_use]
    pub fn finish(self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.tensor_count.to_le_bytes());
        out.extend(self.kv_count.to_le_bytes());
        out.extend(self.metadata);
        out.extend(self.table);
        let padded = (out.len() as u64).next_multiple_of(DEFAULT_ALIGNMENT);
        out.resize(padded as usize, 0);
        out.extend(self.data);
        out
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}
