//! Every GEMV kernel, on every ISA, element type and thread count, against the reference.

mod common;

use common::{EDGE_DIMS, abs_sums, assert_close, bits, normal};
use half::{bf16, f16};
use kernels_core::ops::sparse::{
    gathered_gemv_ref, gemv_ref, gemv_t_ref, is_active, sparse_input_gemv_ref,
};
use kernels_core::{Element, Error, MatRef};
use kernels_cpu::Cpu;
use kernels_cpu::gemv::{gathered_gemv, gemv, gemv_t, gemv_tolerance, sparse_input_gemv};
use proptest::prelude::*;

fn check_gemv<T: Element>(cpu: &Cpu, rows: usize, cols: usize, seed: u64) {
    let w = normal::<T>(rows * cols, seed);
    let x = normal::<f32>(cols, seed + 1);
    let w = MatRef::from_slice(&w, rows, cols).unwrap();
    let mut expect = vec![0.0; rows];
    gemv_ref(w, &x, &mut expect).unwrap();
    let mut got = vec![f32::NAN; rows];
    gemv(cpu, w, &x, &mut got).unwrap();
    let scale = abs_sums(w, &x);
    assert_close(
        &format!("gemv {:?} {rows}x{cols} {cpu:?}", T::DTYPE),
        &got,
        &expect,
        |i| gemv_tolerance(cols, scale[i]),
    );
    // Gathered rows: every row in reverse, and some twice.
    let picks: Vec<u32> = (0..rows as u32)
        .rev()
        .chain((0..rows as u32).step_by(3))
        .collect();
    let mut gathered = vec![0.0; picks.len()];
    gathered_gemv(cpu, w, &x, &picks, &mut gathered).unwrap();
    let mut gathered_ref = vec![0.0; picks.len()];
    gathered_gemv_ref(w, &x, &picks, &mut gathered_ref).unwrap();
    assert_close("gathered", &gathered, &gathered_ref, |k| {
        gemv_tolerance(cols, scale[picks[k] as usize])
    });
    // The thread split never changes a bit.
    let mut single = vec![0.0; rows];
    gemv(&cpu.with_threads(1).unwrap(), w, &x, &mut single).unwrap();
    assert_eq!(bits(&got), bits(&single), "thread count changed the result");
}

fn check_sparse<T: Element>(cpu: &Cpu, rows: usize, cols: usize, threshold: f32, seed: u64) {
    let w_t = normal::<T>(rows * cols, seed);
    let x = normal::<f32>(rows, seed + 1);
    let w_t = MatRef::from_slice(&w_t, rows, cols).unwrap();
    let mut expect = vec![0.0; cols];
    let read_ref = sparse_input_gemv_ref(w_t, &x, threshold, &mut expect).unwrap();
    let mut got = vec![f32::NAN; cols];
    let read = sparse_input_gemv(cpu, w_t, &x, threshold, &mut got).unwrap();
    assert_eq!(read, read_ref);
    // Scale per output column: sum over active rows of |x_i w_t[i, j]|.
    let scale: Vec<f64> = (0..cols)
        .map(|j| {
            (0..rows)
                .filter(|&i| is_active(x[i], threshold))
                .map(|i| (f64::from(x[i]) * f64::from(w_t.at(i, j).to_f32())).abs())
                .sum()
        })
        .collect();
    assert_close(
        &format!("sparse {:?} {rows}x{cols} t={threshold} {cpu:?}", T::DTYPE),
        &got,
        &expect,
        |j| gemv_tolerance(read, scale[j]),
    );
    let mut single = vec![0.0; cols];
    sparse_input_gemv(
        &cpu.with_threads(1).unwrap(),
        w_t,
        &x,
        threshold,
        &mut single,
    )
    .unwrap();
    assert_eq!(bits(&got), bits(&single), "thread count changed the result");
}

fn edge_shapes(cpu: &Cpu) {
    for (k, &rows) in EDGE_DIMS.iter().enumerate() {
        for &cols in &EDGE_DIMS {
            let seed = (k * 1000 + cols) as u64;
            check_gemv::<f32>(cpu, rows, cols, seed);
            check_gemv::<f16>(cpu, rows, cols, seed);
            check_gemv::<bf16>(cpu, rows, cols, seed);
            for t in [-1.0, 0.0, 0.7, f32::INFINITY] {
                check_sparse::<f32>(cpu, rows, cols, t, seed);
                check_sparse::<bf16>(cpu, rows, cols, t, seed);
                check_sparse::<f16>(cpu, rows, cols, t, seed);
            }
        }
    }
}

fn real_model_sizes(cpu: &Cpu) {
    // SmolLM2-135M's gate (576 -> 1536) and down (1536 -> 576), and a Llama-2-7B row block.
    check_gemv::<bf16>(cpu, 1536, 576, 1);
    check_sparse::<bf16>(cpu, 1536, 576, 0.67, 2);
    check_gemv::<f32>(cpu, 64, 11008, 3);
    check_sparse::<f16>(cpu, 11008, 96, 0.5, 4);
}

fn transposed_dense_equals_sparse_at_minus_infinity(cpu: &Cpu) {
    let w_t = normal::<f32>(37 * 29, 5);
    let w_t = MatRef::from_slice(&w_t, 37, 29).unwrap();
    let mut x = normal::<f32>(37, 6);
    x[3] = 0.0; // a zero input is still a row of the dense product
    let (mut dense, mut expect) = (vec![0.0; 29], vec![0.0; 29]);
    gemv_t(cpu, w_t, &x, &mut dense).unwrap();
    gemv_t_ref(w_t, &x, &mut expect).unwrap();
    let scale = vec![40.0; 29];
    assert_close("gemv_t", &dense, &expect, |j| gemv_tolerance(37, scale[j]));
}

fn special_values(cpu: &Cpu) {
    let w = normal::<f32>(8 * 40, 7);
    let w_t = MatRef::from_slice(&w, 8, 40).unwrap();
    let mut y = vec![1.0; 40];
    // All-zero input and an infinite threshold give exact zeros.
    sparse_input_gemv(cpu, w_t, &[0.0; 8], 0.0, &mut y).unwrap();
    assert!(y.iter().all(|&v| v == 0.0));
    y.fill(1.0);
    sparse_input_gemv(cpu, w_t, &normal::<f32>(8, 8), f32::INFINITY, &mut y).unwrap();
    assert!(y.iter().all(|&v| v == 0.0));
    // NaN activations are active and propagate, even under an infinite threshold.
    let mut x = vec![0.0; 8];
    x[2] = f32::NAN;
    sparse_input_gemv(cpu, w_t, &x, f32::INFINITY, &mut y).unwrap();
    assert!(y.iter().all(|v| v.is_nan()));
    let mut yd = vec![0.0; 8];
    let mut xd = normal::<f32>(40, 9);
    xd[39] = f32::INFINITY;
    gemv(cpu, MatRef::from_slice(&w, 8, 40).unwrap(), &xd, &mut yd).unwrap();
    assert!(yd.iter().all(|v| v.is_infinite() || v.is_nan()));
}

fn bad_inputs(cpu: &Cpu) {
    let w = [0.0f32; 12];
    let m = MatRef::from_slice(&w, 3, 4).unwrap();
    let mut y3 = [0.0; 3];
    let mut y4 = [0.0; 4];
    assert!(matches!(
        gemv(cpu, m, &[0.0; 3], &mut y3),
        Err(Error::LengthMismatch {
            what: "x",
            expected: 4,
            found: 3
        })
    ));
    assert!(matches!(
        gemv(cpu, m, &[0.0; 4], &mut y4),
        Err(Error::LengthMismatch { what: "y", .. })
    ));
    assert!(matches!(
        sparse_input_gemv(cpu, m, &[0.0; 3], f32::NAN, &mut y4),
        Err(Error::InvalidParam {
            name: "threshold",
            ..
        })
    ));
    assert!(sparse_input_gemv(cpu, m, &[0.0; 4], 0.0, &mut y4).is_err());
    assert!(gathered_gemv(cpu, m, &[0.0; 4], &[3], &mut y3[..1]).is_err());
    assert!(gathered_gemv(cpu, m, &[0.0; 4], &[0, 1], &mut y3).is_err());
}

isa_tests!(
    edge_shapes,
    real_model_sizes,
    transposed_dense_equals_sparse_at_minus_infinity,
    special_values,
    bad_inputs
);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn random_shapes_on_the_best_isa(rows in 0usize..200, cols in 0usize..200, t in -0.5f32..2.0, seed in any::<u64>()) {
        let cpu = Cpu::detect().with_threads(2).unwrap();
        check_gemv::<bf16>(&cpu, rows, cols, seed);
        check_sparse::<f32>(&cpu, rows, cols, t, seed);
    }
}
