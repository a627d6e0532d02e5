//! Every GEMV kernel, on every kernel variant and element type, against the reference, with the
//! CPU suite's shapes and data.

mod common;

use common::cpu::{EDGE_DIMS, abs_sums, assert_close, bits, normal};
use half::{bf16, f16};
use kernels_core::ops::sparse::{gathered_gemv_ref, gemv_ref, gemv_t_ref, sparse_input_gemv_ref};
use kernels_core::{Error, MatRef};
use kernels_wgpu::gemv::{gathered_gemv, gemv, gemv_t, gemv_tolerance, sparse_input_gemv};
use kernels_wgpu::{Context, GpuElement, GpuTensor};

fn upload<T: GpuElement>(ctx: &Context, data: &[T], rows: usize, cols: usize) -> GpuTensor<T> {
    GpuTensor::from_matrix(ctx, MatRef::from_slice(data, rows, cols).unwrap()).unwrap()
}

fn check_gemv<T: GpuElement>(ctx: &Context, rows: usize, cols: usize, seed: u64) {
    let w_host = normal::<T>(rows * cols, seed);
    let x_host = normal::<f32>(cols, seed + 1);
    let w_ref = MatRef::from_slice(&w_host, rows, cols).unwrap();
    let mut expect = vec![0.0; rows];
    gemv_ref(w_ref, &x_host, &mut expect).unwrap();
    let w = upload(ctx, &w_host, rows, cols);
    let x = GpuTensor::from_slice(ctx, &x_host).unwrap();
    let mut y = GpuTensor::from_slice(ctx, &vec![f32::NAN; rows]).unwrap();
    gemv(ctx, &w, &x, &mut y).unwrap();
    let got = y.to_vec_blocking(ctx).unwrap();
    let scale = abs_sums(w_ref, &x_host);
    let what = format!("gemv {:?} {rows}x{cols}", T::DTYPE);
    assert_close(&what, &got, &expect, |i| gemv_tolerance(cols, scale[i]));
    // Same inputs, same bits.
    gemv(ctx, &w, &x, &mut y).unwrap();
    assert_eq!(
        bits(&y.to_vec_blocking(ctx).unwrap()),
        bits(&got),
        "{what}: repeat"
    );
    // Gathered rows: every row in reverse, and some twice.
    let picks: Vec<u32> = (0..rows as u32)
        .rev()
        .chain((0..rows as u32).step_by(3))
        .collect();
    let mut gathered = GpuTensor::from_slice(ctx, &vec![f32::NAN; picks.len()]).unwrap();
    gathered_gemv(ctx, &w, &x, &picks, &mut gathered).unwrap();
    let mut gathered_ref = vec![0.0; picks.len()];
    gathered_gemv_ref(w_ref, &x_host, &picks, &mut gathered_ref).unwrap();
    assert_close(
        &format!("gathered {what}"),
        &gathered.to_vec_blocking(ctx).unwrap(),
        &gathered_ref,
        |k| gemv_tolerance(cols, scale[picks[k] as usize]),
    );
}

fn check_sparse<T: GpuElement>(ctx: &Context, rows: usize, cols: usize, threshold: f32, seed: u64) {
    let w_host = normal::<T>(rows * cols, seed);
    let x_host = normal::<f32>(rows, seed + 1);
    let w_ref = MatRef::from_slice(&w_host, rows, cols).unwrap();
    let mut expect = vec![0.0; cols];
    sparse_input_gemv_ref(w_ref, &x_host, threshold, &mut expect).unwrap();
    let w_t = upload(ctx, &w_host, rows, cols);
    let x = GpuTensor::from_slice(ctx, &x_host).unwrap();
    let mut y = GpuTensor::from_slice(ctx, &vec![f32::NAN; cols]).unwrap();
    sparse_input_gemv(ctx, &w_t, &x, threshold, &mut y).unwrap();
    // The scale of column j's rounding: sum over active i of |x_i w_t[i, j]|.
    let mut scale = vec![0.0f64; cols];
    for (i, &xi) in x_host.iter().enumerate() {
        if !(xi.abs() <= threshold) {
            for (s, w) in scale.iter_mut().zip(w_ref.row(i)) {
                *s += (f64::from(xi) * f64::from(kernels_core::Element::to_f32(*w))).abs();
            }
        }
    }
    assert_close(
        &format!("sparse {:?} {rows}x{cols} t={threshold}", T::DTYPE),
        &y.to_vec_blocking(ctx).unwrap(),
        &expect,
        |j| gemv_tolerance(rows, scale[j]),
    );
}

fn edge_shapes(ctx: &Context) {
    for (k, &rows) in EDGE_DIMS.iter().enumerate() {
        for &cols in &EDGE_DIMS {
            let seed = (k * 1000 + cols) as u64;
            check_gemv::<f32>(ctx, rows, cols, seed);
            check_gemv::<f16>(ctx, rows, cols, seed);
            check_gemv::<bf16>(ctx, rows, cols, seed);
            check_sparse::<f32>(ctx, rows, cols, 0.7, seed);
            check_sparse::<f16>(ctx, rows, cols, -1.0, seed);
            check_sparse::<bf16>(ctx, rows, cols, f32::INFINITY, seed);
        }
    }
}

fn thresholds_and_splits(ctx: &Context) {
    // Rows past one split (256) and a prime count of columns past one workgroup.
    for t in [-1.0, 0.0, 0.3, 1.5] {
        check_sparse::<f16>(ctx, 700, 263, t, 11);
        check_sparse::<f32>(ctx, 513, 257, t, 12);
    }
}

fn real_model_sizes(ctx: &Context) {
    // SmolLM2-135M's gate (576 -> 1536) and down (1536 -> 576).
    check_gemv::<bf16>(ctx, 1536, 576, 1);
    check_sparse::<bf16>(ctx, 1536, 576, 0.67, 2);
    check_sparse::<f16>(ctx, 1536, 576, 0.5, 4);
}

fn transposed_dense_equals_reference(ctx: &Context) {
    let w_host = normal::<f32>(37 * 29, 5);
    let w_ref = MatRef::from_slice(&w_host, 37, 29).unwrap();
    let mut x_host = normal::<f32>(37, 6);
    x_host[3] = 0.0; // a zero input is still a row of the dense product
    let mut expect = vec![0.0; 29];
    gemv_t_ref(w_ref, &x_host, &mut expect).unwrap();
    let w_t = upload(ctx, &w_host, 37, 29);
    let x = GpuTensor::from_slice(ctx, &x_host).unwrap();
    let mut y = GpuTensor::<f32>::zeros(ctx, 29, 1).unwrap();
    gemv_t(ctx, &w_t, &x, &mut y).unwrap();
    assert_close("gemv_t", &y.to_vec_blocking(ctx).unwrap(), &expect, |_| {
        gemv_tolerance(37, 40.0)
    });
}

fn special_values(ctx: &Context) {
    let w_host = normal::<f32>(8 * 40, 7);
    let w_t = upload(ctx, &w_host, 8, 40);
    let mut y = GpuTensor::from_slice(ctx, &[1.0f32; 40]).unwrap();
    let zeros = GpuTensor::from_slice(ctx, &[0.0f32; 8]).unwrap();
    // All-zero input and an infinite threshold give exact zeros.
    sparse_input_gemv(ctx, &w_t, &zeros, 0.0, &mut y).unwrap();
    assert!(y.to_vec_blocking(ctx).unwrap().iter().all(|&v| v == 0.0));
    let x = GpuTensor::from_slice(ctx, &normal::<f32>(8, 8)).unwrap();
    sparse_input_gemv(ctx, &w_t, &x, f32::INFINITY, &mut y).unwrap();
    assert!(y.to_vec_blocking(ctx).unwrap().iter().all(|&v| v == 0.0));
    // NaN activations are active and propagate, even under an infinite threshold.
    let mut nan_x = vec![0.0f32; 8];
    nan_x[2] = f32::NAN;
    let nan_x = GpuTensor::from_slice(ctx, &nan_x).unwrap();
    sparse_input_gemv(ctx, &w_t, &nan_x, f32::INFINITY, &mut y).unwrap();
    assert!(y.to_vec_blocking(ctx).unwrap().iter().all(|v| v.is_nan()));
    let w = upload(ctx, &w_host, 8, 40);
    let mut xd = normal::<f32>(40, 9);
    xd[39] = f32::INFINITY;
    let xd = GpuTensor::from_slice(ctx, &xd).unwrap();
    let mut yd = GpuTensor::<f32>::zeros(ctx, 8, 1).unwrap();
    gemv(ctx, &w, &xd, &mut yd).unwrap();
    assert!(
        yd.to_vec_blocking(ctx)
            .unwrap()
            .iter()
            .all(|v| v.is_infinite() || v.is_nan())
    );
}

fn variants_agree_bit_for_bit(ctx: &Context) {
    // The ballot sweep and the `array<f16>` loads add the same products in the same order as the
    // portable kernels: run the same problem on a portable context with the same page size (the
    // sweep's partial sums follow the pages) and compare bits.
    let portable = Context::new_blocking(kernels_wgpu::ContextOptions {
        shader_f16: kernels_wgpu::FeatureUse::Off,
        subgroups: kernels_wgpu::FeatureUse::Off,
        max_page_bytes: Some(ctx.page_bytes()),
        ..kernels_wgpu::ContextOptions::default()
    })
    .unwrap();
    let (rows, cols) = (300, 70);
    let w_host = normal::<f16>(rows * cols, 21);
    let x_host = normal::<f32>(rows, 22);
    let run = |ctx: &Context| {
        let w = upload(ctx, &w_host, rows, cols);
        let x = GpuTensor::from_slice(ctx, &x_host).unwrap();
        let mut y = GpuTensor::<f32>::zeros(ctx, cols, 1).unwrap();
        sparse_input_gemv(ctx, &w, &x, 0.5, &mut y).unwrap();
        let x_cols = GpuTensor::from_slice(ctx, &x_host[..cols]).unwrap();
        let mut y_rows = GpuTensor::<f32>::zeros(ctx, rows, 1).unwrap();
        gemv(ctx, &w, &x_cols, &mut y_rows).unwrap();
        [y, y_rows].map(|t| bits(&t.to_vec_blocking(ctx).unwrap()))
    };
    assert_eq!(run(ctx), run(&portable));
}

fn bad_inputs(ctx: &Context) {
    let w = upload(ctx, &[0.0f32; 12], 3, 4);
    let x3 = GpuTensor::from_slice(ctx, &[0.0f32; 3]).unwrap();
    let x4 = GpuTensor::from_slice(ctx, &[0.0f32; 4]).unwrap();
    let mut y3 = GpuTensor::<f32>::zeros(ctx, 3, 1).unwrap();
    let mut y4 = GpuTensor::<f32>::zeros(ctx, 4, 1).unwrap();
    assert!(matches!(
        gemv(ctx, &w, &x3, &mut y3),
        Err(Error::LengthMismatch {
            what: "x",
            expected: 4,
            found: 3
        })
    ));
    assert!(matches!(
        gemv(ctx, &w, &x4, &mut y4),
        Err(Error::LengthMismatch { what: "y", .. })
    ));
    assert!(matches!(
        sparse_input_gemv(ctx, &w, &x3, f32::NAN, &mut y4),
        Err(Error::InvalidParam {
            name: "threshold",
            ..
        })
    ));
    assert!(sparse_input_gemv(ctx, &w, &x4, 0.0, &mut y4).is_err());
    let mut one = GpuTensor::<f32>::zeros(ctx, 1, 1).unwrap();
    assert!(matches!(
        gathered_gemv(ctx, &w, &x4, &[3], &mut one),
        Err(Error::InvalidParam { name: "rows", .. })
    ));
    assert!(gathered_gemv(ctx, &w, &x4, &[0, 1], &mut y3).is_err());
    // A row too wide for one storage binding is refused up front, not split mid-row.
    let too_wide = (ctx.page_bytes() / 4 + 1) as usize;
    if too_wide <= 1 << 20 {
        assert!(matches!(
            GpuTensor::<f32>::zeros(ctx, 1, too_wide),
            Err(Error::InvalidParam { name: "cols", .. })
        ));
    }
    // The device is still healthy after all of that.
    ctx.check().unwrap();
}

gpu_tests!(
    edge_shapes,
    thresholds_and_splits,
    real_model_sizes,
    transposed_dense_equals_reference,
    special_values,
    variants_agree_bit_for_bit,
    bad_inputs
);
