//! The GEMV family on every instruction set against the references: shapes with zero extents and
//! strides, thresholds and values of every kind, row lists in and out of range.
#![no_main]

use arbitrary::Unstructured;
use kernels_core::ops::sparse::{gathered_gemv_ref, gemv_ref, gemv_t_ref, sparse_input_gemv_ref};
use kernels_cpu::gemv::gemv_tolerance;
use kernels_cpu::prelude::*;
use kernels_fuzz::{
    Matrix, assert_close, assert_same_outcome, backends, size, value, values, within_f32,
};
use libfuzzer_sys::fuzz_target;

/// `sum_j |w_ij x_j|` per output (`transposed`: per column of `w`, over active rows).
fn abs_sums(
    w: MatRef<'_, f32>,
    x: &[f32],
    transposed: bool,
    active: impl Fn(f32) -> bool,
) -> Vec<f64> {
    let mut sums = vec![0.0f64; if transposed { w.cols() } else { w.rows() }];
    for (i, row) in w.row_iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let (out, input) = if transposed { (j, i) } else { (i, j) };
            if let Some(&xv) = x.get(input) {
                if active(xv) {
                    sums[out] += (f64::from(v) * f64::from(xv)).abs();
                }
            }
        }
    }
    sums
}

fn run(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let specials = u.arbitrary()?;
    let (rows, cols) = (size(u, 140)?, size(u, 140)?);
    let w = Matrix::new(u, rows, cols, specials)?;
    let w = w.view();
    // Lengths that match, mostly; otherwise the error must too.
    let x_len = if u.ratio(7, 8)? { cols } else { size(u, 140)? };
    let xt_len = if u.ratio(7, 8)? { rows } else { size(u, 140)? };
    let x = values(u, x_len, specials)?;
    let x_t = values(u, xt_len, specials)?;
    let threshold = value(u, true)?;
    let gathered: Vec<u32> = (0..size(u, 40)?)
        .map(|_| {
            let past_end = u32::from(u.ratio(1, 16)?);
            u.int_in_range(0..=rows as u32 + past_end)
        })
        .collect::<arbitrary::Result<_>>()?;

    let sums = abs_sums(w, &x, false, |_| true);
    let tol = |n: usize, sums: &[f64]| {
        let sums = sums.to_vec();
        move |i: usize| within_f32(sums[i], gemv_tolerance(n, sums[i]))
    };
    let mut expect = vec![0.0f32; rows];
    let expect_r = gemv_ref(w, &x, &mut expect);
    let mut expect_t = vec![0.0f32; cols];
    let expect_t_r = gemv_t_ref(w, &x_t, &mut expect_t);
    let mut expect_s = vec![0.0f32; cols];
    let expect_s_r = sparse_input_gemv_ref(w, &x_t, threshold, &mut expect_s);
    let mut expect_g = vec![0.0f32; gathered.len()];
    let expect_g_r = gathered_gemv_ref(w, &x, &gathered, &mut expect_g);
    let sums_t = abs_sums(w, &x_t, true, |_| true);
    let sums_s = abs_sums(w, &x_t, true, |v| !(v.abs() <= threshold));
    for cpu in backends() {
        let mut y = vec![f32::NAN; rows];
        let got = gemv(&cpu, w, &x, &mut y);
        assert_same_outcome("gemv", &got, &expect_r);
        if got.is_ok() {
            assert_close("gemv", &y, &expect, tol(cols, &sums));
        }
        let mut y = vec![f32::NAN; cols];
        let got = gemv_t(&cpu, w, &x_t, &mut y);
        assert_same_outcome("gemv_t", &got, &expect_t_r);
        if got.is_ok() {
            assert_close("gemv_t", &y, &expect_t, tol(rows, &sums_t));
        }
        let got = sparse_input_gemv(&cpu, w, &x_t, threshold, &mut y);
        assert_same_outcome("sparse_input_gemv", &got, &expect_s_r);
        if got.is_ok() {
            assert_close("sparse_input_gemv", &y, &expect_s, tol(rows, &sums_s));
        }
        let mut y = vec![f32::NAN; gathered.len()];
        let got = gathered_gemv(&cpu, w, &x, &gathered, &mut y);
        assert_same_outcome("gathered_gemv", &got, &expect_g_r);
        if got.is_ok() {
            let sums: Vec<f64> = gathered.iter().map(|&r| sums[r as usize]).collect();
            assert_close("gathered_gemv", &y, &expect_g, tol(cols, &sums));
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
