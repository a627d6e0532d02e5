//! Typed tensors on the GPU: upload, download, and the paging that splits a tensor larger than
//! one storage binding into pages of whole rows.

use core::marker::PhantomData;

use half::{bf16, f16};
use kernels_core::{Element, Error, MatRef, Result};

use crate::context::Context;

/// An element type a GPU tensor holds: `f32`, `f16` or `bf16`.
pub trait GpuElement: Element + bytemuck::Pod {
    /// The value of the shaders' `ELEMENT` override constant for this type.
    const ENCODING: u32;
}

impl GpuElement for f32 {
    const ENCODING: u32 = kernels_wgsl::element::F32;
}

impl GpuElement for f16 {
    const ENCODING: u32 = kernels_wgsl::element::F16;
}

impl GpuElement for bf16 {
    const ENCODING: u32 = kernels_wgsl::element::BF16;
}

/// A row-major `[rows, cols]` tensor in device memory: weights and data of a [`GpuElement`]
/// type, or `u32` indices.
///
/// Its rows are split into pages of `rows_per_page` rows, each page its own buffer of at most
/// [`Context::page_bytes`] (a vector, `[len, 1]`, at most [`Context::binding_bytes`]). The page
/// size counts 4 bytes per element whatever the type, so tensors of one shape page alike whether
/// they hold `f32`, `f16` or `bf16`, and element-wise ops pair their pages one to one.
pub struct GpuTensor<T: bytemuck::Pod> {
    rows: usize,
    cols: usize,
    rows_per_page: usize,
    pages: Vec<wgpu::Buffer>,
    element: PhantomData<T>,
}

impl<T: bytemuck::Pod> core::fmt::Debug for GpuTensor<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GpuTensor")
            .field("shape", &[self.rows, self.cols])
            .field("pages", &self.pages.len())
            .finish_non_exhaustive()
    }
}

/// Bytes a buffer needs for `bytes` of data: whole words, at least one.
fn bytes_len(bytes: usize) -> usize {
    (bytes.div_ceil(4) * 4).max(4)
}

/// Bytes a buffer needs for `elements` of `T`.
fn padded_bytes<T>(elements: usize) -> u64 {
    bytes_len(elements * size_of::<T>()) as u64
}

/// Copies rows `first .. first + rows` of `m` into the page `dst` (its whole length: the rows,
/// then zeros up to the buffer's padding): one copy, in one piece where `m` is contiguous.
fn copy_rows<T: bytemuck::Pod>(
    dst: &mut wgpu::WriteOnly<'_, [u8]>,
    m: MatRef<'_, T>,
    first: usize,
    rows: usize,
) {
    let row_bytes = m.cols() * size_of::<T>();
    let used = rows * row_bytes;
    if m.row_stride() == m.cols() && rows > 0 {
        let start = first * m.cols();
        let block = &m.as_slice()[start..start + rows * m.cols()];
        dst.slice(..used)
            .copy_from_slice(bytemuck::cast_slice(block));
    } else {
        for r in 0..rows {
            dst.slice(r * row_bytes..(r + 1) * row_bytes)
                .copy_from_slice(bytemuck::cast_slice(m.row(first + r)));
        }
    }
    dst.slice(used..).fill(0);
}

impl<T: bytemuck::Pod> GpuTensor<T> {
    fn page_rows_for(ctx: &Context, rows: usize, cols: usize) -> Result<usize> {
        // Shaders index rows, columns and elements with u32, also of an empty tensor's other
        // dimension.
        let fits_u32 = |n: Option<usize>| n.is_some_and(|n| u32::try_from(n).is_ok());
        if !(fits_u32(Some(rows)) && fits_u32(Some(cols)) && fits_u32(rows.checked_mul(cols))) {
            return Err(Error::TooLarge {
                what: "tensor (rows, columns or rows * cols)",
                limit: u64::from(u32::MAX),
                unit: "elements (shaders index with u32)",
            });
        }
        if cols == 0 {
            // No bytes at all: every row on one (empty) page.
            return Ok(rows.max(1));
        }
        let row_bytes = cols as u64 * 4;
        // Vectors are bound whole by the ops that take them (GEMV's x and y), so they page at
        // the device's limit, not at a smaller page cap.
        let page_bytes = if cols == 1 {
            ctx.binding_bytes()
        } else {
            ctx.page_bytes()
        };
        if row_bytes > page_bytes {
            return Err(Error::InvalidParam {
                name: "cols",
                value: cols as f64,
                expected: "few enough that one row (4 bytes per element) fits one storage binding \
                           of the device",
            });
        }
        Ok(((page_bytes / row_bytes.max(4)) as usize).max(1))
    }

    /// A tensor of `rows x cols` whose pages are filled from `source` (zeros without one: wgpu
    /// zero-initialises every buffer).
    fn with_pages(
        ctx: &Context,
        rows: usize,
        cols: usize,
        source: Option<MatRef<'_, T>>,
    ) -> Result<Self> {
        let rows_per_page = Self::page_rows_for(ctx, rows, cols)?;
        let mut pages = Vec::with_capacity(rows.div_ceil(rows_per_page));
        let mut first = 0;
        while first < rows {
            let page_rows = rows_per_page.min(rows - first);
            let bytes = padded_bytes::<T>(page_rows * cols);
            let buffer = ctx.allocating("tensor page", bytes, || {
                ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("tensor page"),
                    size: bytes,
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_SRC
                        | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: source.is_some(),
                })
            })?;
            if let Some(m) = source {
                {
                    let mut mapped = buffer.slice(..).get_mapped_range_mut().map_err(|_| {
                        Error::DeviceFailure {
                            reason: "a new buffer could not be mapped for upload",
                        }
                    })?;
                    copy_rows(&mut mapped.slice(..), m, first, page_rows);
                }
                buffer.unmap();
            }
            pages.push(buffer);
            first += page_rows;
        }
        Ok(Self {
            rows,
            cols,
            rows_per_page,
            pages,
            element: PhantomData,
        })
    }

    /// Uploads a vector (a `[len, 1]` tensor), copying it once, straight into device-visible
    /// memory.
    ///
    /// ```
    /// # use kernels_wgpu::prelude::*;
    /// # let ctx = Context::new_blocking(ContextOptions::default())?;
    /// let x = GpuTensor::from_slice(&ctx, &[1.0f32, 2.0, 3.0])?;
    /// assert_eq!((x.shape(), x.to_vec_blocking(&ctx)?), ([3, 1], vec![1.0, 2.0, 3.0]));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn from_slice(ctx: &Context, data: &[T]) -> Result<Self> {
        Self::with_pages(
            ctx,
            data.len(),
            1,
            Some(MatRef::from_slice(data, data.len(), 1)?),
        )
    }

    /// Uploads a matrix (any row stride; the device copy is contiguous), copying it once.
    ///
    /// ```
    /// # use kernels_wgpu::prelude::*;
    /// # let ctx = Context::new_blocking(ContextOptions::default())?;
    /// let buffer = [1.0f32, 2.0, 0.0, 3.0, 4.0];
    /// let w = GpuTensor::from_matrix(&ctx, MatRef::new(&buffer, 2, 2, 3)?)?;
    /// assert_eq!(w.to_vec_blocking(&ctx)?, [1.0, 2.0, 3.0, 4.0]);
    /// # Ok::<(), Error>(())
    /// ```
    pub fn from_matrix(ctx: &Context, m: MatRef<'_, T>) -> Result<Self> {
        Self::with_pages(ctx, m.rows(), m.cols(), Some(m))
    }

    /// A `[rows, cols]` tensor of zeros (no host copy at all).
    ///
    /// ```
    /// # use kernels_wgpu::prelude::*;
    /// # let ctx = Context::new_blocking(ContextOptions::default())?;
    /// let y = GpuTensor::<f32>::zeros(&ctx, 2, 3)?;
    /// assert_eq!(y.to_vec_blocking(&ctx)?, [0.0; 6]);
    /// # Ok::<(), Error>(())
    /// ```
    pub fn zeros(ctx: &Context, rows: usize, cols: usize) -> Result<Self> {
        Self::with_pages(ctx, rows, cols, None)
    }

    /// Overwrites the tensor in place with `data` (row-major, exactly [`Self::len`] elements),
    /// copying it once into the queue's staging memory; the write lands before the next
    /// submission. What a decode loop does with each token's input.
    ///
    /// ```
    /// # use kernels_wgpu::prelude::*;
    /// # let ctx = Context::new_blocking(ContextOptions::default())?;
    /// let mut x = GpuTensor::<f32>::zeros(&ctx, 3, 1)?;
    /// x.write(&ctx, &[4.0, 5.0, 6.0])?;
    /// assert_eq!(x.to_vec_blocking(&ctx)?, [4.0, 5.0, 6.0]);
    /// assert!(x.write(&ctx, &[1.0]).is_err());
    /// # Ok::<(), Error>(())
    /// ```
    pub fn write(&mut self, ctx: &Context, data: &[T]) -> Result<()> {
        self.expect_len("data", data.len())?;
        self.write_matrix(ctx, MatRef::from_slice(data, self.rows, self.cols)?)
    }

    /// Overwrites the tensor in place with `m` (its shape; any row stride), copying it once.
    ///
    /// ```
    /// # use kernels_wgpu::prelude::*;
    /// # let ctx = Context::new_blocking(ContextOptions::default())?;
    /// let mut w = GpuTensor::<f32>::zeros(&ctx, 2, 2)?;
    /// let buffer = [1.0f32, 2.0, 0.0, 3.0, 4.0]; // row stride 3
    /// w.write_matrix(&ctx, MatRef::new(&buffer, 2, 2, 3)?)?;
    /// assert_eq!(w.to_vec_blocking(&ctx)?, [1.0, 2.0, 3.0, 4.0]);
    /// # Ok::<(), Error>(())
    /// ```
    pub fn write_matrix(&mut self, ctx: &Context, m: MatRef<'_, T>) -> Result<()> {
        self.expect_shape("m", m.shape())?;
        ctx.check()?;
        for (buffer, first, page_rows) in self.pages() {
            let Some(size) = wgpu::BufferSize::new(buffer.size()) else {
                continue;
            };
            let mut staging =
                ctx.queue
                    .write_buffer_with(buffer, 0, size)
                    .ok_or(Error::DeviceFailure {
                        reason: "the queue refused a write into a tensor page",
                    })?;
            copy_rows(&mut staging.slice(..), m, first, page_rows);
        }
        ctx.check()
    }

    /// `[rows, cols]`.
    ///
    /// ```
    /// # use kernels_wgpu::prelude::*;
    /// let ctx = Context::new_blocking(ContextOptions { max_page_bytes: Some(64), ..ContextOptions::default() })?;
    /// let w = GpuTensor::<f32>::zeros(&ctx, 8, 3)?; // 12 bytes a row: 5 rows to a 64-byte page
    /// assert_eq!((w.shape(), w.rows(), w.cols(), w.len()), ([8, 3], 8, 3, 24));
    /// assert_eq!(w.rows_per_page(), 5); // two pages, of 5 and 3 rows
    /// assert!(!w.is_empty() && GpuTensor::<f32>::zeros(&ctx, 0, 3)?.is_empty());
    /// # Ok::<(), Error>(())
    /// ```
    #[must_use]
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Rows.
    #[must_use]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    #[must_use]
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Elements held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Whether the tensor holds no element.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows per page (the last page may hold fewer).
    #[must_use]
    pub fn rows_per_page(&self) -> usize {
        self.rows_per_page
    }

    /// The pages: each buffer, its first row and its row count.
    pub(crate) fn pages(&self) -> impl Iterator<Item = (&wgpu::Buffer, usize, usize)> {
        self.pages.iter().enumerate().map(|(p, buffer)| {
            let first = p * self.rows_per_page;
            (buffer, first, self.rows_per_page.min(self.rows - first))
        })
    }

    /// Number of pages.
    pub(crate) fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// Page `p`'s buffer and its element count.
    pub(crate) fn page(&self, p: usize) -> (&wgpu::Buffer, usize) {
        let first = p * self.rows_per_page;
        (
            &self.pages[p],
            self.rows_per_page.min(self.rows - first) * self.cols,
        )
    }

    /// The single buffer of a tensor that fits one page (vectors an op binds whole).
    pub(crate) fn single_page(&self, what: &'static str) -> Result<Option<&wgpu::Buffer>> {
        if self.pages.len() > 1 {
            return Err(Error::InvalidParam {
                name: what,
                value: self.len() as f64,
                expected: "a vector that fits one storage binding of the device",
            });
        }
        Ok(self.pages.first())
    }

    /// Fails unless the tensor has `len` elements.
    pub(crate) fn expect_len(&self, what: &'static str, len: usize) -> Result<()> {
        if self.len() == len {
            Ok(())
        } else {
            Err(Error::LengthMismatch {
                what,
                expected: len,
                found: self.len(),
            })
        }
    }

    /// Fails unless the tensor has this shape.
    pub(crate) fn expect_shape(&self, what: &'static str, shape: [usize; 2]) -> Result<()> {
        if self.shape() == shape {
            Ok(())
        } else {
            Err(Error::ShapeMismatch {
                what,
                expected: shape,
                found: self.shape(),
            })
        }
    }

    /// Copies `other` (same shape and type) into this tensor, on the device.
    ///
    /// ```
    /// # use kernels_wgpu::prelude::*;
    /// # let ctx = Context::new_blocking(ContextOptions::default())?;
    /// let base = GpuTensor::from_slice(&ctx, &[1.0f32, 2.0])?;
    /// let mut merged = GpuTensor::<f32>::zeros(&ctx, 2, 1)?;
    /// merged.copy_from(&ctx, &base)?;
    /// assert_eq!(merged.to_vec_blocking(&ctx)?, [1.0, 2.0]);
    /// # Ok::<(), Error>(())
    /// ```
    pub fn copy_from(&mut self, ctx: &Context, other: &Self) -> Result<()> {
        other.expect_shape("other", self.shape())?;
        let mut batch = ctx.batch()?;
        for (to, from) in self.pages.iter().zip(&other.pages) {
            batch.copy(from, to);
        }
        batch.submit()
    }

    /// Downloads the tensor, row-major.
    ///
    /// ```
    /// # use kernels_wgpu::prelude::*;
    /// # let ctx = Context::new_blocking(ContextOptions::default())?;
    /// let x = GpuTensor::from_slice(&ctx, &[f16::from_f32(0.5), f16::from_f32(-1.0)])?;
    /// // In the browser, `.await` it; on native, block on it.
    /// let values: Vec<f16> = block_on(x.to_vec(&ctx))?;
    /// assert_eq!(values, [f16::from_f32(0.5), f16::from_f32(-1.0)]);
    /// # Ok::<(), Error>(())
    /// ```
    pub async fn to_vec(&self, ctx: &Context) -> Result<Vec<T>> {
        let mut out = Vec::with_capacity(self.len());
        for (buffer, _, rows) in self.pages() {
            out.extend(ctx.read_buffer::<T>(buffer, rows * self.cols).await?);
        }
        ctx.check()?;
        Ok(out)
    }

    /// [`GpuTensor::to_vec`], blocking until the data is back (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn to_vec_blocking(&self, ctx: &Context) -> Result<Vec<T>> {
        pollster::block_on(self.to_vec(ctx))
    }
}
