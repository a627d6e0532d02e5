//! What the fuzz targets share: shapes, strided views and values built from the fuzzer's bytes
//! the way a hostile caller would pick them, and the differential checks.
//!
//! Shapes come from a list of edge sizes (0, 1, lane counts +/- 1, primes, a few larger ones);
//! strides add padding; values mix small finite numbers with NaN, infinities, signed zeros,
//! subnormals and extreme magnitudes. Every target asserts: no panic, and the CPU kernel agrees
//! with its `kernels-core` reference, error for error (same variant) and value for value within
//! the kernel's named tolerance.

use arbitrary::{Result, Unstructured};
use kernels_cpu::prelude::*;

/// Sizes that sit on the kernels' edges: empty, one, around every lane count, primes.
pub const EDGE_SIZES: [usize; 20] = [
    0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 97, 131,
];

/// One of [`EDGE_SIZES`], or any size up to `max`.
pub fn size(u: &mut Unstructured<'_>, max: usize) -> Result<usize> {
    if u.ratio(3, 4)? {
        Ok(*u.choose(&EDGE_SIZES)?.min(&max))
    } else {
        u.int_in_range(0..=max)
    }
}

/// Values that break careless arithmetic.
pub const SPECIALS: [f32; 16] = [
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    0.0,
    -0.0,
    1.0e-45,
    -1.0e-45,
    1.0e-40,
    f32::MIN_POSITIVE,
    1.0e-23,
    1.0e20,
    3.0e38,
    -3.0e38,
    f32::MAX,
    1.0,
    -1.0,
];

/// A value: mostly a small finite number (on a grid, so ties are frequent), sometimes a
/// special, sometimes any bit pattern; never non-finite unless `specials`.
pub fn value(u: &mut Unstructured<'_>, specials: bool) -> Result<f32> {
    let v = match u.int_in_range(0..=9)? {
        0 => *u.choose(&SPECIALS)?,
        1 => f32::from_bits(u.arbitrary()?),
        _ => f32::from(u.arbitrary::<i8>()?) / 16.0,
    };
    Ok(if specials || v.is_finite() { v } else { 1.5 })
}

/// `n` values (see [`value`]).
pub fn values(u: &mut Unstructured<'_>, n: usize, specials: bool) -> Result<Vec<f32>> {
    (0..n).map(|_| value(u, specials)).collect()
}

/// A strided matrix: its buffer and the view's shape and stride.
#[derive(Debug)]
pub struct Matrix {
    /// The buffer, with padding between rows and slack after the last.
    pub data: Vec<f32>,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row stride (>= cols where there are rows and columns; anything for an empty view).
    pub stride: usize,
}

impl Matrix {
    /// A `rows x cols` matrix with a random stride and values.
    pub fn new(u: &mut Unstructured<'_>, rows: usize, cols: usize, specials: bool) -> Result<Self> {
        let empty = rows == 0 || cols == 0;
        let stride = if empty {
            // Any stride is accepted for an empty view; a large one once found UB.
            *u.choose(&[0, cols, cols + 1, 1000, usize::MAX / 2])?
        } else {
            cols + u.int_in_range(0..=3)?
        };
        let needed = if empty { 0 } else { (rows - 1) * stride + cols };
        let len = needed + u.int_in_range(0..=2)?;
        Ok(Self {
            data: values(u, len, specials)?,
            rows,
            cols,
            stride,
        })
    }

    /// The view.
    pub fn view(&self) -> MatRef<'_, f32> {
        MatRef::new(&self.data, self.rows, self.cols, self.stride).expect("built to fit")
    }
}

/// Whether two results agree: both `Ok`, or both `Err` of the same variant.
pub fn same_outcome<A, B>(got: &kernels_core::Result<A>, expect: &kernels_core::Result<B>) -> bool {
    match (got, expect) {
        (Ok(_), Ok(_)) => true,
        (Err(a), Err(b)) => core::mem::discriminant(a) == core::mem::discriminant(b),
        _ => false,
    }
}

/// Asserts [`same_outcome`], naming the op.
pub fn assert_same_outcome<A: core::fmt::Debug, B: core::fmt::Debug>(
    op: &str,
    got: &kernels_core::Result<A>,
    expect: &kernels_core::Result<B>,
) {
    assert!(
        same_outcome(got, expect),
        "{op}: the kernel gave {got:?}, the reference {expect:?}"
    );
}

/// Asserts `got` is within `tolerance(i)` of `expect`: NaN where the reference has NaN, the
/// same infinity where it has one. `tolerance(i)` is `None` where element `i`'s terms overflow
/// `f32` (their absolute sum does): there the kernel's order of additions decides between a
/// finite result, an infinity and NaN, as IEEE arithmetic does, and nothing is asserted.
pub fn assert_close(
    op: &str,
    got: &[f32],
    expect: &[f32],
    tolerance: impl Fn(usize) -> Option<f64>,
) {
    assert_eq!(got.len(), expect.len(), "{op}: lengths");
    for (i, (&g, &e)) in got.iter().zip(expect).enumerate() {
        let Some(tolerance) = tolerance(i) else {
            continue;
        };
        let ok = if e.is_nan() {
            g.is_nan()
        } else if e.is_infinite() {
            g == e
        } else {
            (f64::from(g) - f64::from(e)).abs() <= tolerance
        };
        assert!(
            ok,
            "{op}: element {i}: kernel {g:e}, reference {e:e} (tolerance {tolerance:e})"
        );
    }
}

/// A tolerance that holds where `abs_sum` (of an element's terms) stays within `f32`.
pub fn within_f32(abs_sum: f64, tolerance: f64) -> Option<f64> {
    (abs_sum.is_nan() || abs_sum < f64::from(f32::MAX) / 2.0).then_some(tolerance)
}

/// The backends a case runs on: every instruction set of this CPU, one thread, and the best
/// with two threads splitting even tiny problems, on rayon and on the spinning team.
pub fn backends() -> Vec<Cpu> {
    let mut all: Vec<Cpu> = Cpu::all_available().collect();
    if let Ok(two) = Cpu::detect().with_threads(2) {
        all.push(two.with_min_bytes_per_thread(1));
        all.push(two.with_spinning_team().with_min_bytes_per_thread(1));
    }
    all
}

/// A keep rule with parameters of every kind, valid or not.
pub fn keep_rule(u: &mut Unstructured<'_>, n: usize) -> Result<KeepRule> {
    Ok(match u.int_in_range(0..=2)? {
        0 => KeepRule::Count(if u.ratio(7, 8)? {
            u.int_in_range(0..=n as u64 + 1)?
        } else {
            u.arbitrary()?
        }),
        1 => KeepRule::Density(*u.choose(&[
            0.0,
            1e-9,
            0.1,
            0.5,
            0.99,
            1.0,
            1.5,
            -0.1,
            f64::NAN,
            f64::INFINITY,
        ])?),
        _ => KeepRule::Threshold(value(u, true)?.abs() * if u.ratio(1, 8)? { -1.0 } else { 1.0 }),
    })
}

/// Slices of one model, as the streaming types see it: `count` chunks of any lengths.
pub fn chunks(u: &mut Unstructured<'_>, specials: bool) -> Result<Vec<Vec<f32>>> {
    let count = u.int_in_range(0..=5)?;
    (0..count)
        .map(|_| {
            let n = size(u, 200)?;
            values(u, n, specials)
        })
        .collect()
}

/// What a streaming type driven by the protocol must return, from what the in-memory reference
/// returns: a streaming type checks its parameters when made, each chunk's values as it is fed,
/// and a count against the length only once every chunk is seen, so a non-finite value is
/// reported before a count past the end (the in-memory references check the count first).
pub fn streaming_outcome<T>(
    params: kernels_core::Result<()>,
    chunks: &[&[f32]],
    in_memory: kernels_core::Result<T>,
) -> kernels_core::Result<T> {
    params?;
    if let Some(index) = chunks.concat().iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite { what: "x", index });
    }
    in_memory
}

/// A protocol call of a [`MultiPass`] streaming type, in whatever order the fuzzer picks.
#[derive(arbitrary::Arbitrary, Debug, Clone, Copy)]
pub enum PassCall {
    /// Feed chunk `index % chunks` of the current pass.
    Feed(u8),
    /// Switch pass.
    NextPass,
    /// Ask for the result.
    Finish,
}

/// A merge problem built as a hostile caller would: up to 6 models and Fisher diagonals of `n`
/// values (with specials a quarter of the time), weights of every kind (sometimes one too many),
/// a base, `lambda`, a Fisher floor, a DARE drop rate and first index, each valid or not.
#[derive(Debug)]
pub struct MergeCase {
    /// Elements per tensor.
    pub n: usize,
    /// The models (task vectors).
    pub models: Vec<Vec<f32>>,
    /// A Fisher diagonal per model.
    pub fishers: Vec<Vec<f32>>,
    /// One weight per model, or one too many.
    pub weights: Vec<f32>,
    /// The base model.
    pub base: Vec<f32>,
    /// Task arithmetic's and TIES's scale.
    pub lambda: f32,
    /// The Fisher floor.
    pub floor: f32,
    /// DARE's drop rate.
    pub drop: f64,
    /// DARE's first flat index.
    pub first_index: u64,
}

impl MergeCase {
    /// Builds a case from the fuzzer's bytes.
    pub fn new(u: &mut Unstructured<'_>) -> Result<Self> {
        let specials = u.ratio(1, 4)?;
        let n = size(u, 200)?;
        let count = u.int_in_range(0..=6)?;
        let models: Vec<Vec<f32>> = (0..count)
            .map(|_| values(u, n, specials))
            .collect::<arbitrary::Result<_>>()?;
        let fishers: Vec<Vec<f32>> = (0..count)
            .map(|_| values(u, n, specials))
            .collect::<arbitrary::Result<_>>()?;
        let weights: Vec<f32> = (0..count + usize::from(u.ratio(1, 16)?))
            .map(|_| {
                if u.ratio(3, 4)? {
                    Ok(f32::from(u.int_in_range(0u8..=8)?) / 4.0)
                } else {
                    value(u, true)
                }
            })
            .collect::<arbitrary::Result<_>>()?;
        let base = values(u, n, specials)?;
        let lambda = if u.ratio(3, 4)? { 0.5 } else { value(u, true)? };
        let floor = if u.ratio(3, 4)? {
            1e-3
        } else {
            value(u, true)?
        };
        let drop = *u.choose(&[0.0, 0.1, 0.5, 0.9, 1.0, -0.1, f64::NAN])?;
        let first_index: u64 = if u.ratio(3, 4)? {
            u.int_in_range(0..=1000)?
        } else {
            u.arbitrary()?
        };
        Ok(Self {
            n,
            models,
            fishers,
            weights,
            base,
            lambda,
            floor,
            drop,
            first_index,
        })
    }
}
