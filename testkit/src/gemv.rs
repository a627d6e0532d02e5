//! The GEMV test bodies every backend runs: dense, gathered, transposed and sparse-input GEMV
//! over the edge shapes, real layer sizes, special values and bad inputs, against the reference
//! and within the backend's tolerance.

use half::{bf16, f16};
use kernels_core::ops::sparse::{
    count_active, gathered_gemv_ref, gemv_ref, gemv_t_ref, is_active, sparse_input_gemv_ref,
};
use kernels_core::{Element, Error, MatRef, Result};

use crate::{EDGE_DIMS, abs_sums, assert_close, bits, normal};

/// A backend's GEMVs on host slices, and its tolerance.
pub trait GemvBackend<T>: Sized {
    /// For failure messages.
    fn name(&self) -> String;
    /// `y = W x`.
    fn gemv(&self, w: MatRef<'_, T>, x: &[f32], y: &mut [f32]) -> Result<()>;
    /// `out[k] = W[rows[k], :] . x`.
    fn gathered(&self, w: MatRef<'_, T>, x: &[f32], rows: &[u32], out: &mut [f32]) -> Result<()>;
    /// The sparse-input GEMV.
    fn sparse_input(
        &self,
        w_t: MatRef<'_, T>,
        x: &[f32],
        threshold: f32,
        y: &mut [f32],
    ) -> Result<()>;
    /// `y = W_t^T x`.
    fn gemv_t(&self, w_t: MatRef<'_, T>, x: &[f32], y: &mut [f32]) -> Result<()>;
    /// The bound on an output summing `n` products of absolute sum `abs_sum`.
    fn tolerance(&self, n: usize, abs_sum: f64) -> f64;
    /// Another configuration that must give the same bits (the CPU on one thread), if any.
    fn alternate(&self) -> Option<Self>;
}

/// Dense and gathered GEMV of a random `rows x cols` matrix against the reference.
pub fn check_gemv<T: Element, B: GemvBackend<T>>(backend: &B, rows: usize, cols: usize, seed: u64) {
    let w = normal::<T>(rows * cols, seed);
    let x = normal::<f32>(cols, seed + 1);
    let w = MatRef::from_slice(&w, rows, cols).unwrap();
    let mut expect = vec![0.0; rows];
    gemv_ref(w, &x, &mut expect).unwrap();
    let mut got = vec![f32::NAN; rows];
    backend.gemv(w, &x, &mut got).unwrap();
    let scale = abs_sums(w, &x);
    let what = format!("gemv {:?} {rows}x{cols} {}", T::DTYPE, backend.name());
    assert_close(&what, &got, &expect, |i| backend.tolerance(cols, scale[i]));
    // Gathered rows: every row in reverse, and some twice.
    let picks: Vec<u32> = (0..rows as u32)
        .rev()
        .chain((0..rows as u32).step_by(3))
        .collect();
    let mut gathered = vec![f32::NAN; picks.len()];
    backend.gathered(w, &x, &picks, &mut gathered).unwrap();
    let mut gathered_ref = vec![0.0; picks.len()];
    gathered_gemv_ref(w, &x, &picks, &mut gathered_ref).unwrap();
    assert_close(&format!("gathered {what}"), &gathered, &gathered_ref, |k| {
        backend.tolerance(cols, scale[picks[k] as usize])
    });
    if let Some(alternate) = backend.alternate() {
        let mut again = vec![0.0; rows];
        alternate.gemv(w, &x, &mut again).unwrap();
        assert_eq!(
            bits(&got),
            bits(&again),
            "{what}: the configuration changed the result"
        );
    }
}

/// The sparse-input GEMV of a random `w_t` `rows x cols` against the reference.
pub fn check_sparse<T: Element, B: GemvBackend<T>>(
    backend: &B,
    rows: usize,
    cols: usize,
    threshold: f32,
    seed: u64,
) {
    let w_t = normal::<T>(rows * cols, seed);
    let x = normal::<f32>(rows, seed + 1);
    let w_t = MatRef::from_slice(&w_t, rows, cols).unwrap();
    let mut expect = vec![0.0; cols];
    sparse_input_gemv_ref(w_t, &x, threshold, &mut expect).unwrap();
    let read_ref = count_active(&x, threshold);
    let mut got = vec![f32::NAN; cols];
    backend.sparse_input(w_t, &x, threshold, &mut got).unwrap();
    let what = format!(
        "sparse {:?} {rows}x{cols} t={threshold} {}",
        T::DTYPE,
        backend.name()
    );
    // Scale per output column: sum over active rows of |x_i w_t[i, j]|.
    let scale: Vec<f64> = (0..cols)
        .map(|j| {
            (0..rows)
                .filter(|&i| is_active(x[i], threshold))
                .map(|i| (f64::from(x[i]) * f64::from(w_t.at(i, j).to_f32())).abs())
                .sum()
        })
        .collect();
    assert_close(&what, &got, &expect, |j| {
        backend.tolerance(read_ref, scale[j])
    });
    if let Some(alternate) = backend.alternate() {
        let mut again = vec![0.0; cols];
        alternate
            .sparse_input(w_t, &x, threshold, &mut again)
            .unwrap();
        assert_eq!(
            bits(&got),
            bits(&again),
            "{what}: the configuration changed the result"
        );
    }
}

/// Every pair of [`EDGE_DIMS`], every element type, four thresholds.
pub fn edge_shapes<B>(backend: &B)
where
    B: GemvBackend<f32> + GemvBackend<f16> + GemvBackend<bf16>,
{
    for (k, &rows) in EDGE_DIMS.iter().enumerate() {
        for &cols in &EDGE_DIMS {
            let seed = (k * 1000 + cols) as u64;
            check_gemv::<f32, B>(backend, rows, cols, seed);
            check_gemv::<f16, B>(backend, rows, cols, seed);
            check_gemv::<bf16, B>(backend, rows, cols, seed);
            for t in [-1.0, 0.0, 0.7, f32::INFINITY] {
                check_sparse::<f32, B>(backend, rows, cols, t, seed);
                check_sparse::<bf16, B>(backend, rows, cols, t, seed);
                check_sparse::<f16, B>(backend, rows, cols, t, seed);
            }
        }
    }
}

/// SmolLM2-135M's gate (576 -> 1536), down (1536 -> 576) and q/k/v (576 -> 960), Llama-2-7B
/// row blocks, and widths on both sides of 1024 (where the CPU's sparse-input GEMV turns from
/// panels of rows to a split of columns).
pub fn real_model_sizes<B>(backend: &B)
where
    B: GemvBackend<f32> + GemvBackend<f16> + GemvBackend<bf16>,
{
    check_gemv::<bf16, B>(backend, 1536, 576, 1);
    check_sparse::<bf16, B>(backend, 1536, 576, 0.67, 2);
    check_sparse::<bf16, B>(backend, 576, 960, 0.67, 6);
    check_gemv::<f32, B>(backend, 64, 11008, 3);
    check_sparse::<f16, B>(backend, 11008, 96, 0.5, 4);
    check_sparse::<bf16, B>(backend, 96, 4096, 0.5, 5);
    for cols in [1024, 1025] {
        check_sparse::<f32, B>(backend, 37, cols, 0.5, 7);
    }
}

/// The transposed dense GEMV reads zero inputs' rows too.
pub fn transposed_dense<B: GemvBackend<f32>>(backend: &B) {
    let w_t = normal::<f32>(37 * 29, 5);
    let w_t = MatRef::from_slice(&w_t, 37, 29).unwrap();
    let mut x = normal::<f32>(37, 6);
    x[3] = 0.0; // a zero input is still a row of the dense product
    let (mut dense, mut expect) = (vec![0.0; 29], vec![0.0; 29]);
    backend.gemv_t(w_t, &x, &mut dense).unwrap();
    gemv_t_ref(w_t, &x, &mut expect).unwrap();
    let scale = vec![40.0; 29];
    assert_close("gemv_t", &dense, &expect, |j| {
        backend.tolerance(37, scale[j])
    });
}

/// Zero inputs, infinite thresholds, NaN and infinite activations.
pub fn special_values<B: GemvBackend<f32>>(backend: &B) {
    let w = normal::<f32>(8 * 40, 7);
    let w_t = MatRef::from_slice(&w, 8, 40).unwrap();
    let mut y = vec![1.0; 40];
    // All-zero input and an infinite threshold give exact zeros.
    backend.sparse_input(w_t, &[0.0; 8], 0.0, &mut y).unwrap();
    assert!(y.iter().all(|&v| v == 0.0));
    y.fill(1.0);
    backend
        .sparse_input(w_t, &normal::<f32>(8, 8), f32::INFINITY, &mut y)
        .unwrap();
    assert!(y.iter().all(|&v| v == 0.0));
    // NaN activations are active and propagate, even under an infinite threshold.
    let mut x = vec![0.0; 8];
    x[2] = f32::NAN;
    backend
        .sparse_input(w_t, &x, f32::INFINITY, &mut y)
        .unwrap();
    assert!(y.iter().all(|v| v.is_nan()));
    let mut yd = vec![0.0; 8];
    let mut xd = normal::<f32>(40, 9);
    xd[39] = f32::INFINITY;
    backend
        .gemv(MatRef::from_slice(&w, 8, 40).unwrap(), &xd, &mut yd)
        .unwrap();
    assert!(yd.iter().all(|v| v.is_infinite() || v.is_nan()));
}

/// Wrong lengths, a NaN threshold, row indices out of range.
pub fn bad_inputs<B: GemvBackend<f32>>(backend: &B) {
    let w = [0.0f32; 12];
    let m = MatRef::from_slice(&w, 3, 4).unwrap();
    let mut y3 = [0.0; 3];
    let mut y4 = [0.0; 4];
    assert!(matches!(
        backend.gemv(m, &[0.0; 3], &mut y3),
        Err(Error::LengthMismatch {
            what: "x",
            expected: 4,
            found: 3
        })
    ));
    assert!(matches!(
        backend.gemv(m, &[0.0; 4], &mut y4),
        Err(Error::LengthMismatch { what: "y", .. })
    ));
    assert!(matches!(
        backend.sparse_input(m, &[0.0; 3], f32::NAN, &mut y4),
        Err(Error::InvalidParam {
            name: "threshold",
            ..
        })
    ));
    assert!(backend.sparse_input(m, &[0.0; 4], 0.0, &mut y4).is_err());
    assert!(matches!(
        backend.gathered(m, &[0.0; 4], &[3], &mut y3[..1]),
        Err(Error::InvalidParam { name: "rows", .. })
    ));
    assert!(backend.gathered(m, &[0.0; 4], &[0, 1], &mut y3).is_err());
}
