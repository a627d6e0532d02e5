//! Regression tests for inputs a hostile or careless caller can pass: empty views with strides,
//! sizes that overflow, extreme magnitudes, NaN where a number is expected, state machines driven
//! out of order. Each found a panic, a hang, an abort or a wrong answer once (issue 13); each
//! must now get the reference's answer or a clear error, on every instruction set.

use kernels_core::backend::MagnitudeHistogram;
use kernels_core::format::{self, TernaryLayout};
use kernels_core::ops::lowrank::thin_svd_ref;
use kernels_core::ops::merge::{sum_squares_ref, weighted_mean_ref};
use kernels_core::ops::project::project_out_ref;
use kernels_cpu::linalg::factorisation_tolerance;
use kernels_cpu::prelude::*;

/// The empty views a caller can build: no columns with a stride, no rows with a stride, and an
/// empty block of a larger matrix.
fn empty_views(buffer: &[f32]) -> Vec<MatRef<'_, f32>> {
    let whole = MatRef::from_slice(buffer, 4, 4).unwrap();
    vec![
        MatRef::new(&[], 3, 0, 5).unwrap(),
        MatRef::new(buffer, 3, 0, 1000).unwrap(),
        MatRef::new(&[], 0, 3, 1000).unwrap(),
        whole.submatrix(2, 4, 2, 0).unwrap(),
        whole.submatrix(4, 1, 0, 3).unwrap(),
    ]
}

#[test]
fn empty_strided_views_have_rows_of_nothing() {
    let buffer = [1.0f32; 16];
    for view in empty_views(&buffer) {
        assert!(view.as_slice().is_empty(), "{:?}", view.shape());
        assert_eq!(view.row_iter().count(), view.rows());
        assert!(view.row_iter().all(<[f32]>::is_empty));
    }
    let mut out = [0.0f32; 4];
    let mut view = MatMut::new(&mut out, 3, 0, 1000).unwrap();
    assert!(view.row_mut(2).is_empty());
    assert!(
        view.as_mut_slice().is_empty(),
        "an empty view lends nothing of the buffer"
    );
}

#[test]
fn gemv_family_on_empty_strided_views() {
    let buffer = [1.0f32; 16];
    for cpu in Cpu::all_available() {
        for w in empty_views(&buffer) {
            let [rows, cols] = w.shape();
            let x = vec![1.0f32; cols];
            let mut y = vec![7.0f32; rows];
            gemv(&cpu, w, &x, &mut y).unwrap();
            assert!(y.iter().all(|&v| v == 0.0), "{:?}", w.shape());
            let x_t = vec![1.0f32; rows];
            let mut y_t = vec![7.0f32; cols];
            gemv_t(&cpu, w, &x_t, &mut y_t).unwrap();
            sparse_input_gemv(&cpu, w, &x_t, 0.0, &mut y_t).unwrap();
            assert!(y_t.iter().all(|&v| v == 0.0));
            let mut gathered = vec![7.0f32; rows];
            let all: Vec<u32> = (0..rows as u32).collect();
            gathered_gemv(&cpu, w, &x, &all, &mut gathered).unwrap();
        }
    }
}

#[test]
fn mlps_with_an_empty_intermediate_dimension() {
    let (hidden, batch) = (3, 2);
    let empty = MatRef::<f32>::new(&[], hidden, 0, 9).unwrap();
    let empty_t = MatRef::<f32>::new(&[], 0, hidden, 9).unwrap();
    let x = vec![1.0f32; batch * hidden];
    let x = MatRef::from_slice(&x, batch, hidden).unwrap();
    for cpu in Cpu::all_available() {
        let mut y = vec![7.0f32; batch * hidden];
        let weights = CatsMlpWeights {
            gate: empty_t,
            up: empty_t,
            down_t: empty_t,
        };
        let mut scratch = MlpScratch::new();
        cats_mlp(
            &cpu,
            x,
            weights,
            0.0,
            MatMut::from_slice(&mut y, batch, hidden).unwrap(),
            &mut scratch,
        )
        .unwrap();
        assert!(y.iter().all(|&v| v == 0.0));
        let teal = TealMlpWeights {
            gate_t: empty,
            up_t: empty,
            down_t: empty_t,
        };
        teal_mlp(
            &cpu,
            x,
            teal,
            TealThresholds::default(),
            MatMut::from_slice(&mut y, batch, hidden).unwrap(),
            &mut scratch,
        )
        .unwrap();
        assert!(y.iter().all(|&v| v == 0.0));
    }
}

#[test]
fn linear_algebra_on_empty_strided_views() {
    let cpu = Cpu::detect();
    for backend in [GemmBackend::Auto, GemmBackend::Portable] {
        let cpu = cpu.with_gemm_backend(backend);
        let a = MatRef::<f32>::new(&[], 3, 0, 1000).unwrap();
        let b = MatRef::<f32>::new(&[], 0, 0, 7).unwrap();
        let mut c_buffer = [5.0f32; 4];
        let c = MatMut::new(&mut c_buffer, 3, 0, 1000).unwrap();
        gemm(&cpu, 1.0, a, Transpose::No, b, Transpose::No, 0.0, c).unwrap();
        assert_eq!(c_buffer, [5.0; 4], "a 3 x 0 output writes nothing");
        // Q 0 x 2 and X 0 x 5000: nothing to project.
        let q = MatRef::<f32>::new(&[], 0, 2, 2).unwrap();
        let x = MatRef::<f32>::new(&[], 0, 5000, 5000).unwrap();
        let out = MatMut::<f32>::new(&mut [], 0, 5000, 5000).unwrap();
        project_out(&cpu, q, x, out).unwrap();
        let qr = householder_qr(&cpu, a).unwrap();
        assert_eq!((qr.q.shape(), qr.r.shape()), ([3, 0], [0, 0]));
        let svd = thin_svd(&cpu, a).unwrap();
        assert_eq!(
            (svd.u.shape(), svd.s.len(), svd.v.shape()),
            ([3, 0], 0, [0, 0])
        );
        let wide = MatRef::<f32>::new(&[], 0, 4, 9).unwrap();
        assert_eq!(thin_svd(&cpu, wide).unwrap().v.shape(), [4, 0]);
    }
}

#[test]
fn project_out_with_no_basis_rejects_non_finite_x_as_the_reference_does() {
    let q = MatRef::<f32>::new(&[], 2, 0, 0).unwrap();
    let x = [1.0f32, f32::NAN, 3.0, 4.0];
    let x = MatRef::from_slice(&x, 2, 2).unwrap();
    let mut out = [0.0f32; 4];
    let expect = project_out_ref(q, x, MatMut::from_slice(&mut out, 2, 2).unwrap());
    assert_eq!(
        expect,
        Err(Error::NonFinite {
            what: "x",
            index: 1
        })
    );
    for cpu in Cpu::all_available() {
        let got = project_out(&cpu, q, x, MatMut::from_slice(&mut out, 2, 2).unwrap());
        assert_eq!(got, expect, "{}", cpu.isa());
    }
}

#[test]
fn sizes_that_overflow_are_errors() {
    assert!(matches!(
        Mat::<f32>::zeros(usize::MAX, 2),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        Mat::<f32>::zeros(usize::MAX / 8, 1),
        Err(Error::OutOfMemory { .. })
    ));
    assert!(matches!(
        Mat::from_fn(1 << 40, 1 << 40, |_, _| 0.0f32),
        Err(Error::TooLarge { .. })
    ));
    let a = Mat::<f64>::identity(2).unwrap();
    assert!(a.distance(&Mat::identity(3).unwrap()).is_err());
    assert!(a.matmul(&Mat::identity(3).unwrap()).is_err());
    // A shape whose element count overflows names the limit, not a length of usize::MAX.
    let err = format::encode(&[], &[1 << 40, 1 << 40], 1.0, TernaryLayout::Dense2Bit).unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
}

#[test]
fn decode_of_a_huge_sparse_shape_is_out_of_memory_not_an_abort() {
    // An all-zero sparse tensor of 2^60 elements is a few bytes in version 1.
    let header = {
        let mut out = Vec::new();
        kernels_core::backend::write_header(
            &mut out,
            1,
            TernaryLayout::SparseRice,
            0,
            1.0,
            0,
            &[1 << 60],
            0,
        )
        .unwrap();
        out
    };
    let err = format::decode(&header, usize::MAX).unwrap_err();
    assert!(
        matches!(err, Error::OutOfMemory { .. } | Error::TooLarge { .. }),
        "{err}"
    );
}

#[test]
fn headers_that_decode_rejects_are_never_written() {
    let write_version = |version: u8, scale: f32, nnz: u64, shape: &[u64]| {
        let mut out = Vec::new();
        kernels_core::backend::write_header(
            &mut out,
            version,
            TernaryLayout::Dense2Bit,
            0,
            scale,
            nnz,
            shape,
            0,
        )
    };
    let write = |scale, nnz, shape: &[u64]| write_version(format::VERSION, scale, nnz, shape);
    assert!(write(1.0, 0, &[0]).is_ok());
    assert!(write_version(0, 1.0, 0, &[0]).is_err(), "version 0");
    assert!(
        write_version(format::VERSION + 1, 1.0, 0, &[0]).is_err(),
        "a future version"
    );
    assert!(write(1.0, 0, &[1; 300]).is_err(), "300 dimensions");
    assert!(write(f32::NAN, 0, &[0]).is_err());
    assert!(write(f32::INFINITY, 0, &[0]).is_err());
    assert!(write(1.0, 5, &[4]).is_err(), "more non-zeros than elements");
    let cpu = Cpu::detect();
    // A finite alpha whose scale overflows f32.
    let tau = [3.0e38f32, -3.0e38, 1.0, 0.0];
    let params = CompeftParams::default()
        .with_keep(KeepRule::Count(2))
        .with_alpha(1.0e30);
    for layout in [TernaryLayout::Dense2Bit, TernaryLayout::SparseRice] {
        let got = compeft(&cpu, &[(&tau[..], &[4][..])], params, layout);
        assert!(
            matches!(got, Err(Error::InvalidParam { name: "alpha", .. })),
            "{got:?}"
        );
    }
    // An encoder given a NaN scale.
    let params = CompeftParams::default().with_keep(KeepRule::Count(2));
    let (mut decided, _) = compeft_codes(&cpu, &[&tau[2..]], params).unwrap();
    decided.scale = f32::NAN;
    let got = CompeftEncoder::new(&decided).encode(&cpu, &tau[2..], &[2], TernaryLayout::Dense2Bit);
    assert!(got.is_err(), "{got:?}");
}

#[test]
fn dare_indices_past_u64_max_are_rejected_on_both_paths() {
    let tau = [1.0f32; 4];
    let mut out = [0.0f32; 4];
    let params = DareParams::default().with_drop(0.5);
    let cpu = Cpu::detect();
    assert!(
        dare(&cpu, &tau, params, u64::MAX - 3, &mut out).is_ok(),
        "the last index is u64::MAX"
    );
    let got = dare(&cpu, &tau, params, u64::MAX - 2, &mut out);
    assert!(
        matches!(
            got,
            Err(Error::InvalidParam {
                name: "first_index",
                ..
            })
        ),
        "{got:?}"
    );
    let expect = kernels_core::ops::merge::dare_ref(&tau, params, u64::MAX - 2, &mut out);
    assert_eq!(got, expect);
}

#[test]
fn weighted_mean_with_extreme_weights_is_the_reference() {
    let (a, b) = ([1.0f32, -2.0, 3.0], [1.0f32, -2.0, 3.0]);
    for weights in [[1e-45f32, 1e-45], [3e38, 3e38], [f32::MIN_POSITIVE, 3e38]] {
        let mut expect = [0.0f32; 3];
        weighted_mean_ref(&[&a, &b], &weights, &mut expect).unwrap();
        assert_eq!(expect, a, "{weights:?}");
        for cpu in Cpu::all_available() {
            let mut out = [0.0f32; 3];
            weighted_mean(&cpu, &[&a, &b], &weights, &mut out).unwrap();
            assert_eq!(out, expect, "{} {weights:?}", cpu.isa());
        }
    }
}

/// Coefficients `lambda w_i` that f32 cannot hold as normal numbers (found by the `merge` fuzz
/// target): the sum must still be the reference's.
#[test]
fn task_arithmetic_with_coefficients_outside_f32() {
    let cases: [(f32, f32, [f32; 2]); 4] = [
        (1.04e34, 4.17e-8, [1e-40, 1.0]), // w tau underflows; lambda w is a normal f32
        (1.07e-41, -0.0625, [3e38, 1.0]), // lambda w is subnormal
        (2.68e-32, 2.68e-32, [-1.0, 3e38]), // lambda w underflows to zero
        (1e38, 10.0, [1e-44, 0.0]),       // lambda w overflows
    ];
    for (lambda, w, tau) in cases {
        // A base small enough that the lost term shows.
        let base = [1e-30f32, -2.0];
        let mut expect = [0.0f32; 2];
        kernels_core::ops::merge::task_arithmetic_ref(&base, &[&tau], &[w], lambda, &mut expect)
            .unwrap();
        for cpu in Cpu::all_available() {
            let mut out = [0.0f32; 2];
            task_arithmetic(&cpu, &base, &[&tau], &[w], lambda, &mut out).unwrap();
            for j in 0..2 {
                let term = f64::from(lambda) * f64::from(w) * f64::from(tau[j]);
                let abs = f64::from(base[j]).abs() + term.abs();
                assert!(
                    (f64::from(out[j]) - f64::from(expect[j])).abs()
                        <= kernels_cpu::merge::reduction_tolerance(1, abs),
                    "{} lambda {lambda:e} w {w:e}: {out:?} vs {expect:?}",
                    cpu.isa()
                );
            }
        }
    }
}

#[test]
fn sum_squares_keeps_the_range_of_f64() {
    for value in [1e20f32, 3e38, 1e-23, 1e-40, f32::from_bits(1)] {
        for n in [1, 17, 5000] {
            let x = vec![value; n];
            let expect = sum_squares_ref(&x);
            assert!(expect > 0.0 && expect.is_finite());
            for cpu in Cpu::all_available() {
                let got = sum_squares(&cpu, &x).unwrap();
                assert!(
                    (got - expect).abs()
                        <= kernels_cpu::merge::SUM_SQUARES_RELATIVE_TOLERANCE * expect,
                    "{} {value} x {n}: {got} vs {expect}",
                    cpu.isa()
                );
            }
        }
    }
    let cpu = Cpu::detect();
    assert!(sum_squares(&cpu, &[1.0f32, f32::NAN]).unwrap().is_nan());
    assert_eq!(
        sum_squares(&cpu, &[1.0f32, f32::INFINITY]).unwrap(),
        f64::INFINITY
    );
}

#[test]
fn a_nan_fisher_entry_propagates_instead_of_becoming_the_floor() {
    let (a, b) = ([1.0f32, 2.0], [3.0f32, 4.0]);
    let (fa, fb) = ([f32::NAN, 1.0], [1.0f32, 1.0]);
    let params = FisherParams::default().with_floor(1e-3);
    let mut expect = [0.0f32; 2];
    kernels_core::ops::merge::fisher_merge_ref(
        &[&a, &b],
        &[&fa, &fb],
        &[1.0, 1.0],
        params,
        &mut expect,
    )
    .unwrap();
    assert!(expect[0].is_nan() && expect[1] == 3.0, "{expect:?}");
    for cpu in Cpu::all_available() {
        let mut out = [0.0f32; 2];
        fisher_merge(&cpu, &[&a, &b], &[&fa, &fb], &[1.0, 1.0], params, &mut out).unwrap();
        assert!(out[0].is_nan() && out[1] == 3.0, "{} {out:?}", cpu.isa());
    }
}

#[test]
fn a_failed_histogram_update_changes_nothing() {
    let mut h = MagnitudeHistogram::new();
    h.observe(&[1.0f32, 2.0]).unwrap();
    let mut counts = vec![0u32; kernels_core::backend::HIGH_BINS];
    counts[0] = 5;
    counts[kernels_core::backend::FIRST_NON_FINITE_BIN] = 1;
    assert!(h.add_counts(&counts).is_err());
    assert_eq!(h.total(), 2);
    let mut fresh = MagnitudeHistogram::new();
    fresh.observe(&[1.0f32, 2.0]).unwrap();
    assert_eq!(
        h.kth_smallest(2).unwrap().bin(),
        fresh.kth_smallest(2).unwrap().bin()
    );
}

#[test]
fn calibration_survives_a_failed_pass_switch() {
    let cpu = Cpu::detect();
    let mut cal = Calibration::new(0.5).unwrap();
    cal.feed(&cpu, 0, Site::GateActivation, &[1.0, 2.0, 3.0])
        .unwrap();
    assert!(
        cal.feed(&cpu, 1, Site::GateActivation, &[f32::NAN])
            .is_err()
    );
    // Whatever failed, every later call answers.
    let _ = cal.next_pass();
    let _ = cal.feed(&cpu, 0, Site::GateActivation, &[1.0, 2.0, 3.0]);
    let _ = cal.next_pass();
    let _ = cal.finish();
}

#[test]
fn qr_whose_factor_overflows_f32_says_so() {
    let a = [3e38f32, 3e38];
    let a = MatRef::from_slice(&a, 2, 1).unwrap();
    let cpu = Cpu::detect();
    for result in [householder_qr(&cpu, a), cgs2(&cpu, a)] {
        match result {
            Err(Error::Overflow { what: "r" }) => {}
            other => panic!("R = sqrt(2) * 3e38 is not an f32: {other:?}"),
        }
    }
}

/// `x = (3e38, 3e38)` against `q = (1, 1) / sqrt(2)`: the residual is finite, but the coefficient
/// `q^T x = 4.2e38` is not an `f32`. It was an infinity in `out` (a `linalg` fuzz finding); now
/// it is an error, and a NaN elsewhere in `x` (in another thread's columns) still comes first.
#[test]
fn projection_whose_coefficients_overflow_f32_says_so() {
    let half = core::f32::consts::FRAC_1_SQRT_2;
    let q = [half, half];
    let q = MatRef::from_slice(&q, 2, 1).unwrap();
    let n = 8193;
    let mut x = vec![1.0f32; 2 * n];
    (x[0], x[n]) = (3e38, 3e38);
    let mut out = vec![0.0f32; 2 * n];
    let mut expect = out.clone();
    project_out_ref(
        q,
        MatRef::from_slice(&x, 2, n).unwrap(),
        MatMut::from_slice(&mut expect, 2, n).unwrap(),
    )
    .unwrap();
    // 0 up to `q`'s rounding to f32.
    assert!(
        expect[0].abs() < 1e32 && expect[n].abs() < 1e32,
        "{expect:?}"
    );
    for cpu in Cpu::all_available()
        .flat_map(|cpu| [1, 2].map(|threads| cpu.with_threads(threads).unwrap()))
    {
        let xv = MatRef::from_slice(&x, 2, n).unwrap();
        for project in [project_out::<f32, f32>, project_onto::<f32, f32>] {
            let got = project(&cpu, q, xv, MatMut::from_slice(&mut out, 2, n).unwrap());
            assert_eq!(
                got,
                Err(Error::Overflow {
                    what: "the projection's coefficients Q^T X"
                }),
                "{} on {} threads",
                cpu.isa(),
                cpu.threads()
            );
        }
        let mut with_nan = x.clone();
        with_nan[n - 1] = f32::NAN;
        let xv = MatRef::from_slice(&with_nan, 2, n).unwrap();
        let got = project_out(&cpu, q, xv, MatMut::from_slice(&mut out, 2, n).unwrap());
        assert_eq!(
            got,
            Err(Error::NonFinite {
                what: "x",
                index: n - 1
            })
        );
    }
}

#[test]
fn randomized_svd_bounds_its_power_iterations() {
    let a = [1.0f32; 6];
    let a = MatRef::from_slice(&a, 2, 3).unwrap();
    let params = RsvdParams::new(1).with_power_iterations(usize::MAX);
    assert!(matches!(
        randomized_svd(&Cpu::detect(), a, params),
        Err(Error::InvalidParam {
            name: "power_iterations",
            ..
        })
    ));
}

/// Rank-deficient, zero and extreme-scale matrices: every SVD entry point factors them within the
/// contract (reconstruction, orthonormal factors, the reference's singular values).
#[test]
fn svd_of_rank_deficient_and_extreme_scale_input() {
    let rank_one: Vec<f32> = (0..20)
        .map(|i| ((i / 5) + 1) as f32 * ((i % 5) as f32 - 1.5))
        .collect();
    let mut zero_column = vec![0.0f32; 12];
    let mut equal_columns = vec![0.0f32; 12];
    for i in 0..4 {
        zero_column[i * 3] = i as f32 + 1.0;
        zero_column[i * 3 + 2] = (i * i) as f32 - 2.0;
        equal_columns[i * 3] = i as f32 - 1.5;
        equal_columns[i * 3 + 1] = i as f32 - 1.5;
        equal_columns[i * 3 + 2] = 1.0;
    }
    let cases: Vec<(&str, Vec<f32>, usize, usize)> = vec![
        ("rank 1, 4 x 5", rank_one.clone(), 4, 5),
        ("rank 1, 5 x 4", rank_one, 5, 4),
        ("zero column", zero_column.clone(), 4, 3),
        ("equal columns", equal_columns, 4, 3),
        ("zero", vec![0.0; 12], 4, 3),
        (
            "tiny",
            zero_column.iter().map(|v| v * 1e-42).collect(),
            4,
            3,
        ),
        ("huge", zero_column.iter().map(|v| v * 1e37).collect(), 4, 3),
    ];
    for cpu in Cpu::all_available() {
        for (name, data, m, n) in &cases {
            let a = MatRef::from_slice(data, *m, *n).unwrap();
            let expect = thin_svd_ref(a).unwrap();
            let scale = expect.s.first().copied().unwrap_or(0.0);
            let bound = factorisation_tolerance(*m, *n);
            let svd = thin_svd(&cpu, a).unwrap_or_else(|e| panic!("{name}: {e}"));
            for (got, want) in svd.s.iter().zip(&expect.s) {
                assert!(
                    // Plus the spacing of f32 near zero: a subnormal result rounds to it.
                    (f64::from(*got) - want).abs() <= bound * scale + f64::from(f32::from_bits(1)),
                    "{name} {}: {:?} vs {:?}",
                    cpu.isa(),
                    svd.s,
                    expect.s
                );
            }
            let u = Mat::widen(svd.u.as_ref());
            let v = Mat::widen(svd.v.as_ref());
            assert!(u.orthogonality_error().unwrap() <= bound, "{name}: U");
            assert!(v.orthogonality_error().unwrap() <= bound, "{name}: V");
            let rank = 1.min(svd.s.len());
            let lora = lora_extract(&cpu, a, LoraRank::Fixed(rank))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(lora.b.shape(), [*m, rank]);
            let rsvd = randomized_svd(&cpu, a, RsvdParams::new(rank))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(rsvd.s.len(), rank);
            let mut streaming = StreamingSvd::new(*n, rank, Centering::None).unwrap();
            streaming
                .feed(&cpu, a)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}

/// Deviations whose `f32` squares underflow (found by the `compeft_passes` fuzz target): the
/// standard deviation is the reference's, not 0.
#[test]
fn moments_of_subnormal_data() {
    for x in [
        vec![0.0f32, 1e-45, 0.0, 1e-40],
        vec![1e-38f32; 3000],
        vec![3e-39f32, -3e-39],
    ] {
        let mut expect = kernels_core::ops::ternary::Moments::default();
        expect.observe(&x);
        for cpu in Cpu::all_available() {
            let got = moments(&cpu, &x).unwrap();
            assert!(
                (got.std() - expect.std()).abs() <= 1e-6 * expect.std(),
                "{}: {:e} vs {:e}",
                cpu.isa(),
                got.std(),
                expect.std()
            );
        }
    }
}
