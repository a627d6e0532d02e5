//! The `unsafe` code of the scalar path on small, strided and zero-extent views, sized to run
//! under Miri (`cargo +nightly miri test -p kernels-cpu --test unsafe_paths`, which CI runs when a
//! nightly toolchain is there): the GEMM's raw views, the projection's per-thread column views,
//! the QR and Jacobi SVD rows shared through raw pointers, and the spinning team's lent outputs.
//! Also part of the normal suite.

use kernels_cpu::prelude::*;

/// The scalar ISA with the portable GEMM: no SIMD intrinsics and no faer, which Miri cannot run.
fn scalar(threads: usize) -> Cpu {
    Cpu::with_isa(Isa::Scalar)
        .unwrap()
        .with_threads(threads)
        .unwrap()
        .with_min_bytes_per_thread(1)
        .with_gemm_backend(GemmBackend::Portable)
}

/// A `rows x cols` view with `pad` elements between rows, values from the index.
fn strided(rows: usize, cols: usize, pad: usize) -> (Vec<f32>, usize) {
    let stride = cols + pad;
    let len = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * stride + cols
    };
    let data = (0..len).map(|i| ((i * 7 + 3) % 11) as f32 - 5.0).collect();
    (data, stride)
}

#[test]
fn gemm_on_strided_and_empty_views() {
    let cpu = scalar(1);
    for (m, k, n) in [
        (3, 0, 2),
        (0, 4, 3),
        (3, 2, 0),
        (2, 3, 5),
        (5, 1, 17),
        (1, 9, 2),
    ] {
        for (a_op, b_op) in [
            (Transpose::No, Transpose::No),
            (Transpose::Yes, Transpose::No),
            (Transpose::No, Transpose::Yes),
        ] {
            let (a_shape, b_shape) = (
                if a_op == Transpose::No {
                    (m, k)
                } else {
                    (k, m)
                },
                if b_op == Transpose::No {
                    (k, n)
                } else {
                    (n, k)
                },
            );
            let (a, a_stride) = strided(a_shape.0, a_shape.1, 2);
            let (b, b_stride) = strided(b_shape.0, b_shape.1, 1);
            let (mut c, c_stride) = strided(m, n, 3);
            let a = MatRef::new(&a, a_shape.0, a_shape.1, a_stride).unwrap();
            let b = MatRef::new(&b, b_shape.0, b_shape.1, b_stride).unwrap();
            let before = c.clone();
            let c_view = MatMut::new(&mut c, m, n, c_stride).unwrap();
            gemm(&cpu, 2.0, a, a_op, b, b_op, 0.5, c_view).unwrap();
            let at = |x: MatRef<'_, f32>, op, i, j| {
                if op == Transpose::No {
                    x.at(i, j)
                } else {
                    x.at(j, i)
                }
            };
            for i in 0..m {
                for j in 0..n {
                    let dot: f32 = (0..k).map(|p| at(a, a_op, i, p) * at(b, b_op, p, j)).sum();
                    let expect = 2.0 * dot + 0.5 * before[i * c_stride + j];
                    assert!((c[i * c_stride + j] - expect).abs() <= 1e-4 * (1.0 + expect.abs()));
                }
            }
            // The padding between rows is never written.
            for (i, (got, was)) in c.iter().zip(&before).enumerate() {
                if i % c_stride >= n {
                    assert_eq!(got, was, "padding at {i}");
                }
            }
        }
    }
    // A 3 x 0 output with a huge stride, and a 0 x 5000 projection: nothing to touch.
    let empty = MatRef::<f32>::new(&[], 3, 0, 1000).unwrap();
    gemm(
        &cpu,
        1.0,
        empty,
        Transpose::No,
        MatRef::new(&[], 0, 0, 9).unwrap(),
        Transpose::No,
        1.0,
        MatMut::new(&mut [], 3, 0, 1000).unwrap(),
    )
    .unwrap();
    let q = MatRef::<f32>::new(&[], 0, 2, 2).unwrap();
    let x = MatRef::<f32>::new(&[], 0, 5000, 5000).unwrap();
    project_out(&cpu, q, x, MatMut::new(&mut [], 0, 5000, 5000).unwrap()).unwrap();
}

#[test]
fn projection_shares_columns_between_threads() {
    let (m, n, r) = (6, 9, 2);
    let mut q = vec![0.0f32; m * r];
    q[0] = 1.0; // e_0
    q[r + 1] = 1.0; // e_1
    let (x, stride) = strided(m, n, 2);
    let x = MatRef::new(&x, m, n, stride).unwrap();
    let q = MatRef::from_slice(&q, m, r).unwrap();
    for threads in [1, 2] {
        let mut out = vec![f32::NAN; m * n];
        project_out(
            &scalar(threads),
            q,
            x,
            MatMut::from_slice(&mut out, m, n).unwrap(),
        )
        .unwrap();
        for i in 0..m {
            for j in 0..n {
                let expect = if i < 2 { 0.0 } else { x.at(i, j) };
                assert_eq!(out[i * n + j], expect, "{threads} threads ({i}, {j})");
            }
        }
    }
}

#[test]
fn factorisations_share_rows_through_raw_pointers() {
    let cpu = scalar(1);
    for (m, n) in [(5, 3), (3, 5), (4, 4), (1, 3), (3, 1)] {
        let (a, stride) = strided(m, n, 1);
        let a = MatRef::new(&a, m, n, stride).unwrap();
        let qr = householder_qr(&cpu, a).unwrap();
        let back = Mat::widen(qr.q.as_ref())
            .matmul(&Mat::widen(qr.r.as_ref()))
            .unwrap();
        assert!(
            back.distance(&Mat::widen(a)).unwrap() <= 1e-4 * (1.0 + Mat::widen(a).frobenius_norm())
        );
        let svd = thin_svd(&cpu, a).unwrap();
        assert!(Mat::widen(svd.u.as_ref()).orthogonality_error().unwrap() < 1e-4);
        assert!(Mat::widen(svd.v.as_ref()).orthogonality_error().unwrap() < 1e-4);
    }
    // Rank deficient: a zero column and two equal ones.
    let a = [1.0f32, 0.0, 1.0, 2.0, 0.0, 2.0, 3.0, 0.0, 3.0];
    let svd = thin_svd(&cpu, MatRef::from_slice(&a, 3, 3).unwrap()).unwrap();
    assert!((svd.s[0] - 14.0f32.sqrt() * 2.0f32.sqrt()).abs() < 1e-5 && svd.s[1] == 0.0);
}

#[test]
fn spinning_team_lends_disjoint_outputs() {
    let (rows, cols) = (13, 7);
    let w: Vec<f32> = (0..rows * cols).map(|i| (i % 5) as f32 - 2.0).collect();
    let x: Vec<f32> = (0..cols).map(|i| i as f32 * 0.5).collect();
    let w = MatRef::from_slice(&w, rows, cols).unwrap();
    let mut expect = vec![0.0f32; rows];
    gemv(&scalar(1), w, &x, &mut expect).unwrap();
    for threads in [2, 3] {
        let cpu = scalar(threads)
            .with_spinning_team()
            .with_min_bytes_per_thread(1);
        for _ in 0..3 {
            let mut y = vec![f32::NAN; rows];
            gemv(&cpu, w, &x, &mut y).unwrap();
            assert_eq!(y, expect, "{threads} threads");
        }
    }
    // Let the team's idle workers end (under Miri after a millisecond): Miri wants every
    // thread finished when the test ends.
    std::thread::sleep(std::time::Duration::from_millis(5));
}
