//! Borrowed matrix views (and, with `alloc`, an owned matrix).
//!
//! Matrices are row-major with contiguous rows and an explicit row stride (in elements), so a view
//! can cover a block of a larger buffer. Vectors are plain slices: every op checks their lengths.

use crate::{Error, Result};

/// Checks that a `rows x cols` matrix with `row_stride` fits in `len` elements.
fn check_view(
    what: &'static str,
    len: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
) -> Result<()> {
    let invalid = Error::InvalidView {
        what,
        rows,
        cols,
        row_stride,
        len,
    };
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    if row_stride < cols {
        return Err(invalid);
    }
    // The last row needs `cols` elements, not a whole stride.
    let needed = (rows - 1)
        .checked_mul(row_stride)
        .and_then(|n| n.checked_add(cols));
    match needed {
        Some(needed) if needed <= len => Ok(()),
        _ => Err(invalid),
    }
}

/// Checks that a contiguous `rows x cols` matrix has exactly `len` elements.
fn check_contiguous(what: &'static str, len: usize, rows: usize, cols: usize) -> Result<()> {
    if rows.checked_mul(cols) == Some(len) {
        Ok(())
    } else {
        Err(Error::InvalidView {
            what,
            rows,
            cols,
            row_stride: cols,
            len,
        })
    }
}

/// A read-only `rows x cols` matrix view over a slice.
///
/// ```
/// use kernels_core::MatRef;
/// // The right 2 x 2 block of a 2 x 3 buffer: rows start 3 elements apart.
/// let buffer = [9.0f32, 1.0, 2.0, 9.0, 3.0, 4.0];
/// let m = MatRef::new(&buffer[1..], 2, 2, 3)?;
/// assert_eq!((m.rows(), m.cols(), m.shape(), m.row_stride()), (2, 2, [2, 2], 3));
/// assert_eq!((m.at(1, 0), m.row(1)), (3.0, &[3.0, 4.0][..]));
/// assert_eq!(m.row_iter().map(|r| r[0]).collect::<Vec<_>>(), [1.0, 3.0]);
/// assert_eq!(m.as_slice(), &[1.0, 2.0, 9.0, 3.0, 4.0]); // from row 0 on, gaps included
/// m.expect_shape("w", [2, 2])?;
/// assert!(m.expect_shape("w", [2, 3]).is_err());
/// assert_eq!(MatRef::from_slice(&buffer, 3, 2)?.shape(), [3, 2]);
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A view of `rows x cols` elements whose rows start `row_stride` elements apart.
    ///
    /// ```
    /// # use kernels_core::MatRef;
    /// let buffer = [1.0f32, 2.0, 0.0, 3.0, 4.0];
    /// let m = MatRef::new(&buffer, 2, 2, 3)?;
    /// assert_eq!(m.row(1), &[3.0, 4.0]);
    /// assert!(MatRef::new(&buffer, 2, 3, 3).is_err()); // the last row runs off the end
    /// # Ok::<(), kernels_core::Error>(())
    /// ```
    pub fn new(data: &'a [T], rows: usize, cols: usize, row_stride: usize) -> Result<Self> {
        check_view("matrix", data.len(), rows, cols, row_stride)?;
        Ok(Self::from_parts(data, rows, cols, row_stride))
    }

    /// The one place a view is assembled: an empty view (no rows or no columns) is normalised to
    /// an empty buffer and a stride of `cols`, so no row address of it ever lies past its
    /// buffer, whatever stride the caller gave (a `3 x 0` view with stride 1000 holds nothing).
    fn from_parts(data: &'a [T], rows: usize, cols: usize, row_stride: usize) -> Self {
        if rows == 0 || cols == 0 {
            return Self {
                data: &data[..0],
                rows,
                cols,
                row_stride: cols,
            };
        }
        Self {
            data,
            rows,
            cols,
            row_stride,
        }
    }

    /// A view of a contiguous buffer holding exactly `rows * cols` elements.
    pub fn from_slice(data: &'a [T], rows: usize, cols: usize) -> Result<Self> {
        check_contiguous("matrix", data.len(), rows, cols)?;
        Ok(Self::from_parts(data, rows, cols, cols))
    }

    /// Number of rows.
    #[must_use]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    #[must_use]
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `[rows, cols]`.
    #[must_use]
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Distance in elements between the starts of consecutive rows.
    #[must_use]
    pub fn row_stride(&self) -> usize {
        self.row_stride
    }

    /// The underlying buffer, from the first element of row 0.
    #[must_use]
    pub fn as_slice(&self) -> &'a [T] {
        self.data
    }

    /// Row `i`. Panics if `i >= rows`, as indexing a slice out of range does: a caller's
    /// index, not data (the ops index only rows their validated shapes hold).
    #[inline]
    #[must_use]
    pub fn row(&self, i: usize) -> &'a [T] {
        // The indexing contract of the docs above; never reached from an op's arguments.
        assert!(i < self.rows, "row {i} out of {} rows", self.rows);
        &self.data[i * self.row_stride..][..self.cols]
    }

    /// Iterator over the rows.
    #[must_use]
    pub fn row_iter(&self) -> impl ExactSizeIterator<Item = &'a [T]> + '_ {
        (0..self.rows).map(|i| self.row(i))
    }

    /// Checks this view has shape `expected`, naming it `what` in the error.
    pub fn expect_shape(&self, what: &'static str, expected: [usize; 2]) -> Result<()> {
        if self.shape() == expected {
            Ok(())
        } else {
            Err(Error::ShapeMismatch {
                what,
                expected,
                found: self.shape(),
            })
        }
    }

    /// The `rows x cols` block whose top-left element is `(row, col)`.
    ///
    /// ```
    /// # use kernels_core::MatRef;
    /// let m = MatRef::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3)?;
    /// assert_eq!(m.submatrix(0, 1, 2, 2)?.row(1), &[5.0, 6.0]);
    /// assert!(m.submatrix(1, 1, 2, 2).is_err()); // runs past the last row
    /// # Ok::<(), kernels_core::Error>(())
    /// ```
    pub fn submatrix(&self, row: usize, col: usize, rows: usize, cols: usize) -> Result<Self> {
        let start = block_start(self.shape(), self.row_stride, [row, col], [rows, cols])?;
        Ok(Self::from_parts(
            &self.data[start.min(self.data.len())..],
            rows,
            cols,
            self.row_stride,
        ))
    }
}

/// Where the `size` block at `corner` of a `shape` matrix starts, or why it does not fit.
fn block_start(
    shape: [usize; 2],
    row_stride: usize,
    corner: [usize; 2],
    size: [usize; 2],
) -> Result<usize> {
    let fits = |d: usize| {
        corner[d]
            .checked_add(size[d])
            .is_some_and(|end| end <= shape[d])
    };
    if !(fits(0) && fits(1)) {
        return Err(Error::ShapeMismatch {
            what: "submatrix (corner + size must fit the matrix)",
            expected: shape,
            found: [
                corner[0].saturating_add(size[0]),
                corner[1].saturating_add(size[1]),
            ],
        });
    }
    // An empty block needs no storage; its start is clamped by the caller.
    if size[0] == 0 || size[1] == 0 {
        return Ok(usize::MAX);
    }
    Ok(corner[0] * row_stride + corner[1])
}

impl<T: Copy> MatRef<'_, T> {
    /// Element `(i, j)`.
    #[inline]
    #[must_use]
    pub fn at(&self, i: usize, j: usize) -> T {
        self.row(i)[j]
    }
}

/// A mutable `rows x cols` matrix view over a slice.
///
/// ```
/// use kernels_core::MatMut;
/// let mut buffer = [0.0f32; 6];
/// let mut m = MatMut::from_slice(&mut buffer, 3, 2)?;
/// assert_eq!((m.rows(), m.cols(), m.shape(), m.row_stride()), (3, 2, [3, 2], 2));
/// m.row_mut(0).copy_from_slice(&[1.0, 2.0]);
/// for (i, row) in m.rows_mut().enumerate().skip(1) {
///     row.fill(i as f32);
/// }
/// m.expect_shape("y", [3, 2])?;
/// assert_eq!(m.as_ref().at(2, 1), 2.0);
/// m.rb_mut().submatrix_mut(1, 1, 2, 1)?.as_mut_slice()[0] = 7.0; // element (1, 1)
/// let (top, bottom) = m.split_rows_at(1)?;
/// assert_eq!((top.shape(), bottom.as_ref().row(0)), ([1, 2], &[1.0, 7.0][..]));
/// let mut other = [0.0f32; 4];
/// assert!(MatMut::new(&mut other, 2, 2, 3).is_err()); // the last row runs off the end
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[derive(Debug)]
pub struct MatMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a, T> MatMut<'a, T> {
    /// A mutable view of `rows x cols` elements whose rows start `row_stride` elements apart.
    pub fn new(data: &'a mut [T], rows: usize, cols: usize, row_stride: usize) -> Result<Self> {
        check_view("output matrix", data.len(), rows, cols, row_stride)?;
        Ok(Self::from_parts(data, rows, cols, row_stride))
    }

    /// As [`MatRef`]'s: the one place a mutable view is assembled, empty views normalised.
    fn from_parts(data: &'a mut [T], rows: usize, cols: usize, row_stride: usize) -> Self {
        if rows == 0 || cols == 0 {
            return Self {
                data: &mut data[..0],
                rows,
                cols,
                row_stride: cols,
            };
        }
        Self {
            data,
            rows,
            cols,
            row_stride,
        }
    }

    /// A mutable view of a contiguous buffer holding exactly `rows * cols` elements.
    pub fn from_slice(data: &'a mut [T], rows: usize, cols: usize) -> Result<Self> {
        check_contiguous("output matrix", data.len(), rows, cols)?;
        Ok(Self::from_parts(data, rows, cols, cols))
    }

    /// Number of rows.
    #[must_use]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    #[must_use]
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `[rows, cols]`.
    #[must_use]
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Row `i`, mutably. Panics if `i >= rows`.
    #[inline]
    pub fn row_mut(&mut self, i: usize) -> &mut [T] {
        // As `MatRef::row`: the indexing contract, never reached from an op's arguments.
        assert!(i < self.rows, "row {i} out of {} rows", self.rows);
        &mut self.data[i * self.row_stride..][..self.cols]
    }

    /// Every row, as disjoint mutable slices (for handing rows to different threads).
    pub fn rows_mut(&mut self) -> impl Iterator<Item = &mut [T]> {
        let cols = self.cols;
        self.data
            .chunks_mut(self.row_stride.max(1))
            .take(self.rows)
            .map(move |row| &mut row[..cols])
    }

    /// A read-only view of the same matrix.
    #[must_use]
    pub fn as_ref(&self) -> MatRef<'_, T> {
        MatRef {
            data: self.data,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
        }
    }

    /// Checks this view has shape `expected`, naming it `what` in the error.
    pub fn expect_shape(&self, what: &'static str, expected: [usize; 2]) -> Result<()> {
        self.as_ref().expect_shape(what, expected)
    }
    /// Distance in elements between the starts of consecutive rows.
    #[must_use]
    pub fn row_stride(&self) -> usize {
        self.row_stride
    }

    /// The underlying buffer, from the first element of row 0.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        self.data
    }

    /// A shorter-lived mutable view of the same matrix.
    pub fn rb_mut(&mut self) -> MatMut<'_, T> {
        MatMut {
            data: self.data,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
        }
    }

    /// The `rows x cols` block whose top-left element is `(row, col)`, mutably (call it on
    /// [`MatMut::rb_mut`] to keep the whole view).
    pub fn submatrix_mut(
        self,
        row: usize,
        col: usize,
        rows: usize,
        cols: usize,
    ) -> Result<MatMut<'a, T>> {
        let start = block_start(self.shape(), self.row_stride, [row, col], [rows, cols])?;
        let len = self.data.len();
        Ok(MatMut::from_parts(
            &mut self.data[start.min(len)..],
            rows,
            cols,
            self.row_stride,
        ))
    }

    /// Rows `..at` and rows `at..` as two disjoint views (`at <= rows`).
    pub fn split_rows_at(self, at: usize) -> Result<(MatMut<'a, T>, MatMut<'a, T>)> {
        if at > self.rows {
            return Err(Error::ShapeMismatch {
                what: "split row (at most the row count)",
                expected: [self.rows, self.cols],
                found: [at, self.cols],
            });
        }
        let split = (at * self.row_stride).min(self.data.len());
        let (top, bottom) = self.data.split_at_mut(split);
        Ok((
            MatMut::from_parts(top, at, self.cols, self.row_stride),
            MatMut::from_parts(bottom, self.rows - at, self.cols, self.row_stride),
        ))
    }
}

/// An empty buffer with room for `rows * cols` elements, or why there is none.
#[cfg(feature = "alloc")]
fn matrix_buffer<T>(rows: usize, cols: usize) -> Result<alloc::vec::Vec<T>> {
    let len = rows.checked_mul(cols).ok_or(Error::TooLarge {
        what: "matrix",
        limit: usize::MAX as u64,
        unit: "elements",
    })?;
    crate::backend::try_vec("matrix", len)
}

#[cfg(feature = "alloc")]
fn fill_row_major<T>(
    data: &mut alloc::vec::Vec<T>,
    rows: usize,
    cols: usize,
    mut f: impl FnMut(usize, usize) -> T,
) {
    for i in 0..rows {
        for j in 0..cols {
            data.push(f(i, j));
        }
    }
}

/// An owned, contiguous, row-major matrix: what factorisations return.
///
/// ```
/// use kernels_core::{Mat, MatRef};
/// let mut m = Mat::from_fn(2, 3, |i, j| (i * 3 + j) as f32)?;
/// assert_eq!((m.rows(), m.cols(), m.shape(), m.at(1, 2)), (2, 3, [2, 3], 5.0));
/// *m.at_mut(0, 0) = -1.0;
/// m.row_mut(1)[0] = 30.0;
/// assert_eq!((m.row(0), m.row(1)), (&[-1.0, 1.0, 2.0][..], &[30.0, 4.0, 5.0][..]));
/// m.as_mut_slice()[1] = 10.0;
/// assert_eq!(m.as_slice()[..3], [-1.0, 10.0, 2.0]);
/// m.as_mut().row_mut(0)[2] = 20.0;
/// assert_eq!(m.as_ref().row(0), &[-1.0, 10.0, 20.0]);
/// assert_eq!(m.transpose().shape(), [3, 2]);
/// assert_eq!(m.leading_cols(1).as_slice(), [-1.0, 30.0]);
/// assert_eq!(m.leading_rows(1).into_vec(), [-1.0, 10.0, 20.0]);
/// assert_eq!(Mat::<f32>::zeros(2, 2)?.as_slice(), [0.0; 4]);
/// assert!(Mat::<f32>::zeros(usize::MAX, 2).is_err()); // more elements than `usize` counts
/// assert!(Mat::from_vec(vec![1.0f32; 5], 2, 3).is_err());
/// // Column signs: each column's largest-magnitude entry made positive.
/// let mut signs = Mat::from_vec(vec![1.0f32, 3.0, -2.0, 1.0], 2, 2)?;
/// assert_eq!(signs.normalise_column_signs(), [true, false]);
/// assert_eq!(signs.as_slice(), [-1.0, 3.0, 2.0, 1.0]);
///
/// // In `f64`, the products and norms the references and tests use.
/// let a = Mat::widen(MatRef::from_slice(&[3.0f32, 0.0, 4.0, 5.0], 2, 2)?);
/// let q = Mat::identity(2)?;
/// assert_eq!(q.matmul(&a)?, a);
/// assert_eq!(q.t_matmul(&a)?, a);
/// assert_eq!((a.frobenius_norm(), a.distance(&q)?), (50f64.sqrt(), 6.0));
/// assert_eq!(q.orthogonality_error()?, 0.0);
/// assert!(a.distance(&Mat::identity(3)?).is_err()); // shapes differ
/// assert_eq!(a.to_f32().at(1, 1), 5.0f32);
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq)]
pub struct Mat<T> {
    data: alloc::vec::Vec<T>,
    rows: usize,
    cols: usize,
}

#[cfg(feature = "alloc")]
impl<T: Copy + Default + PartialOrd + core::ops::Neg<Output = T>> Mat<T> {
    /// Flips the sign of every column whose entry of largest magnitude (the first on ties) is
    /// negative, and returns which columns it flipped: the sign convention of the SVD and
    /// eigenvector factors, whose callers flip the partner factor to match.
    pub fn normalise_column_signs(&mut self) -> alloc::vec::Vec<bool> {
        let magnitude = |v: T| if v < T::default() { -v } else { v };
        (0..self.cols)
            .map(|j| {
                let mut best = 0;
                for i in 1..self.rows {
                    if magnitude(self.at(i, j)) > magnitude(self.at(best, j)) {
                        best = i;
                    }
                }
                let flip = self.rows > 0 && self.at(best, j) < T::default();
                if flip {
                    for i in 0..self.rows {
                        *self.at_mut(i, j) = -self.at(i, j);
                    }
                }
                flip
            })
            .collect()
    }
}

#[cfg(feature = "alloc")]
impl<T: Copy + Default> Mat<T> {
    /// A `rows x cols` matrix of `T::default()` (zeros); [`Error::TooLarge`] if `rows * cols`
    /// overflows `usize`, [`Error::OutOfMemory`] if the allocation fails.
    pub fn zeros(rows: usize, cols: usize) -> Result<Self> {
        let mut data = matrix_buffer(rows, cols)?;
        data.resize(rows * cols, T::default());
        Ok(Self { data, rows, cols })
    }

    /// A matrix from a row-major buffer of exactly `rows * cols` elements.
    pub fn from_vec(data: alloc::vec::Vec<T>, rows: usize, cols: usize) -> Result<Self> {
        MatRef::from_slice(&data, rows, cols)?;
        Ok(Self { data, rows, cols })
    }

    /// A matrix whose element `(i, j)` is `f(i, j)`; fails as [`Mat::zeros`] does.
    pub fn from_fn(rows: usize, cols: usize, f: impl FnMut(usize, usize) -> T) -> Result<Self> {
        let mut data = matrix_buffer(rows, cols)?;
        fill_row_major(&mut data, rows, cols, f);
        Ok(Self { data, rows, cols })
    }

    /// [`Mat::from_fn`] for a shape no larger than a matrix that already exists, whose element
    /// count therefore fits (an allocation failure aborts, as any `Vec` of that size would).
    fn derived(rows: usize, cols: usize, f: impl FnMut(usize, usize) -> T) -> Self {
        let mut data = alloc::vec::Vec::with_capacity(rows * cols);
        fill_row_major(&mut data, rows, cols, f);
        Self { data, rows, cols }
    }

    /// Number of rows.
    #[must_use]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    #[must_use]
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `[rows, cols]`.
    #[must_use]
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Element `(i, j)`.
    #[inline]
    #[must_use]
    pub fn at(&self, i: usize, j: usize) -> T {
        self.data[i * self.cols + j]
    }

    /// Element `(i, j)`, mutably.
    #[inline]
    pub fn at_mut(&mut self, i: usize, j: usize) -> &mut T {
        &mut self.data[i * self.cols + j]
    }

    /// Row `i`.
    #[must_use]
    pub fn row(&self, i: usize) -> &[T] {
        &self.data[i * self.cols..][..self.cols]
    }

    /// Row `i`, mutably.
    pub fn row_mut(&mut self, i: usize) -> &mut [T] {
        &mut self.data[i * self.cols..][..self.cols]
    }

    /// The row-major buffer.
    #[must_use]
    pub fn as_slice(&self) -> &[T] {
        &self.data
    }

    /// The row-major buffer, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.data
    }

    /// The buffer, consuming the matrix.
    #[must_use]
    pub fn into_vec(self) -> alloc::vec::Vec<T> {
        self.data
    }

    /// A borrowed view.
    #[must_use]
    pub fn as_ref(&self) -> MatRef<'_, T> {
        MatRef {
            data: &self.data,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.cols,
        }
    }

    /// A mutable borrowed view.
    pub fn as_mut(&mut self) -> MatMut<'_, T> {
        MatMut {
            data: &mut self.data,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.cols,
        }
    }

    /// The transpose, as a new matrix.
    #[must_use]
    pub fn transpose(&self) -> Self {
        Self::derived(self.cols, self.rows, |i, j| self.at(j, i))
    }

    /// The first `cols` columns, as a new matrix.
    #[must_use]
    pub fn leading_cols(&self, cols: usize) -> Self {
        Self::derived(self.rows, cols.min(self.cols), |i, j| self.at(i, j))
    }

    /// The first `rows` rows, as a new matrix.
    #[must_use]
    pub fn leading_rows(&self, rows: usize) -> Self {
        Self::derived(rows.min(self.rows), self.cols, |i, j| self.at(i, j))
    }
}

#[cfg(feature = "alloc")]
impl Mat<f64> {
    /// The `f64` image of a view of any element type.
    #[must_use]
    pub fn widen<T: crate::Real>(m: MatRef<'_, T>) -> Self {
        // A valid view holds `rows * cols` elements, so the count fits.
        Self::derived(m.rows(), m.cols(), |i, j| m.at(i, j).to_f64())
    }

    /// The identity of size `n`; fails as [`Mat::zeros`] does.
    pub fn identity(n: usize) -> Result<Self> {
        Self::from_fn(n, n, |i, j| if i == j { 1.0 } else { 0.0 })
    }

    /// `self * other`, accumulated in `f64`.
    pub fn matmul(&self, other: &Self) -> Result<Self> {
        if self.cols != other.rows {
            return Err(Error::ShapeMismatch {
                what: "matmul's right operand (its rows must equal the left's columns)",
                expected: [self.cols, other.cols],
                found: other.shape(),
            });
        }
        let mut out = Self::zeros(self.rows, other.cols)?;
        for i in 0..self.rows {
            let out_row = &mut out.data[i * other.cols..][..other.cols];
            for (k, &a) in self.row(i).iter().enumerate() {
                if a != 0.0 {
                    for (o, &b) in out_row.iter_mut().zip(other.row(k)) {
                        *o += a * b;
                    }
                }
            }
        }
        Ok(out)
    }

    /// `self^T * other`.
    pub fn t_matmul(&self, other: &Self) -> Result<Self> {
        self.transpose().matmul(other)
    }

    /// Frobenius norm.
    #[must_use]
    pub fn frobenius_norm(&self) -> f64 {
        libm::sqrt(self.data.iter().map(|v| v * v).sum())
    }

    /// Frobenius norm of `self - other` (same shapes).
    pub fn distance(&self, other: &Self) -> Result<f64> {
        other
            .as_ref()
            .expect_shape("distance's other operand", self.shape())?;
        Ok(libm::sqrt(
            self.data
                .iter()
                .zip(&other.data)
                .map(|(a, b)| (a - b) * (a - b))
                .sum(),
        ))
    }

    /// `||self^T self - I||_F`: how far the columns are from orthonormal.
    pub fn orthogonality_error(&self) -> Result<f64> {
        self.t_matmul(self)?.distance(&Self::identity(self.cols)?)
    }

    /// The matrix rounded to `f32`.
    #[must_use]
    pub fn to_f32(&self) -> Mat<f32> {
        Mat {
            data: self.data.iter().map(|&v| v as f32).collect(),
            rows: self.rows,
            cols: self.cols,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_reject_buffers_they_do_not_fit() {
        let buf = [0.0f32; 10];
        assert!(MatRef::new(&buf, 2, 5, 5).is_ok());
        assert!(MatRef::new(&buf, 3, 4, 3).is_err(), "stride below cols");
        assert!(MatRef::new(&buf, 3, 4, 4).is_err(), "last row past the end");
        assert!(
            MatRef::new(&buf, 2, 4, 6).is_ok(),
            "last row needs only cols"
        );
        assert!(
            MatRef::new(&buf, usize::MAX, 2, usize::MAX).is_err(),
            "overflow"
        );
        assert!(
            MatRef::new(&buf, 0, 100, 0).is_ok(),
            "empty views fit anywhere"
        );
        assert!(MatRef::from_slice(&buf, 3, 3).is_err());
        assert!(MatRef::from_slice(&buf, usize::MAX, 2).is_err());
        let mut out = [0.0f32; 6];
        assert!(MatMut::from_slice(&mut out, 2, 4).is_err());
        assert!(matches!(
            MatMut::new(&mut out, 2, 4, 4),
            Err(Error::InvalidView {
                rows: 2,
                cols: 4,
                row_stride: 4,
                len: 6,
                ..
            })
        ));
    }

    #[test]
    fn strided_rows_skip_the_padding() {
        let buf = [1, 2, 9, 3, 4, 9, 5, 6];
        let m = MatRef::new(&buf, 3, 2, 3).unwrap();
        let mut rows = m.row_iter();
        assert_eq!(rows.len(), 3);
        assert!(rows.next() == Some(&[1, 2][..]) && rows.next() == Some(&[3, 4][..]));
        assert_eq!(rows.next(), Some(&[5, 6][..]));
        assert_eq!(m.at(2, 1), 6);
    }
}

/// Whether an operand of a GEMM enters the product as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transpose {
    /// `op(A) = A`.
    No,
    /// `op(A) = A^T`.
    Yes,
}
