//! Linear combinations, Gram matrices, SLERP, Model Stock and TIES under mergekit's election
//! rule on every kernel variant and element type, against the references.

use kernels_core::ops::interpolate::{
    gram_ref, linear_combination_ref, model_stock_ratio, model_stock_ref, slerp_coefficients,
    slerp_ref,
};
use kernels_core::ops::merge::{TiesElection, ties_elect_with_ref};
use kernels_core::{CounterRng, Element, Error, Real};
use kernels_testkit::gpu::upload;
use kernels_testkit::{assert_close, gpu_tests, normal};
use kernels_wgpu::interpolate::{
    TILE, gram, gram_tolerance, linear_combination, model_stock, slerp,
};
use kernels_wgpu::merge::{reduction_tolerance, ties_elect_with};
use kernels_wgpu::{Context, GpuElement, GpuTensor, bf16, block_on, f16};

/// Lengths around the element-wise workgroup (256) and [`TILE`] (4096), and primes.
const LENGTHS: [usize; 11] = [0, 1, 3, 255, 257, 1031, 4095, 4096, 4097, 8193, 12_289];

fn models<T: Element>(n: usize, count: usize, seed: u64) -> Vec<Vec<T>> {
    (0..count)
        .map(|m| normal(n, seed + 17 * m as u64))
        .collect()
}

fn run(ctx: &Context, n: usize, op: impl FnOnce(&mut GpuTensor<f32>)) -> Vec<f32> {
    let mut out = upload(ctx, &vec![f32::NAN; n]);
    op(&mut out);
    out.to_vec_blocking(ctx).unwrap()
}

fn linear_combination_matches<T: GpuElement>(ctx: &Context) {
    for n in LENGTHS {
        // Five models take two passes of four.
        for count in [1, 2, 4, 5] {
            let ms: Vec<Vec<T>> = models(n, count, n as u64);
            let views: Vec<&[T]> = ms.iter().map(|m| &m[..]).collect();
            let gpu: Vec<GpuTensor<T>> = ms.iter().map(|m| upload(ctx, m)).collect();
            let gpu: Vec<&GpuTensor<T>> = gpu.iter().collect();
            let weights: Vec<f32> = (0..count).map(|i| 0.75 - 0.5 * i as f32).collect();
            let got = run(ctx, n, |out| {
                linear_combination(ctx, &gpu, &weights, out).unwrap();
            });
            let mut expect = vec![0.0; n];
            linear_combination_ref(&views, &weights, &mut expect).unwrap();
            assert_close(
                &format!("{:?} n={n} N={count}", T::DTYPE),
                &got,
                &expect,
                |j| {
                    let abs: f64 = views
                        .iter()
                        .zip(&weights)
                        .map(|(m, w)| f64::from(w.abs()) * m[j].to_f64().abs())
                        .sum();
                    reduction_tolerance(count, abs)
                },
            );
        }
    }
}

fn gram_matches<T: GpuElement>(ctx: &Context) {
    for n in LENGTHS {
        let ms: Vec<Vec<T>> = models(n, 3, 5 + n as u64);
        let center: Vec<T> = normal(n, 999);
        let views: Vec<&[T]> = ms.iter().map(|m| &m[..]).collect();
        let gpu: Vec<GpuTensor<T>> = ms.iter().map(|m| upload(ctx, m)).collect();
        let gpu: Vec<&GpuTensor<T>> = gpu.iter().collect();
        let gpu_center = upload(ctx, &center);
        for c in [false, true] {
            let (mut got, mut expect) = (vec![f64::NAN; 9], vec![0.0; 9]);
            block_on(gram(ctx, &gpu, c.then_some(&gpu_center), &mut got)).unwrap();
            gram_ref(&views, c.then_some(&center[..]), &mut expect).unwrap();
            for i in 0..3 {
                for j in 0..3 {
                    let tol = gram_tolerance(n, expect[i * 4], expect[j * 4]);
                    assert!(
                        (got[i * 3 + j] - expect[i * 3 + j]).abs() <= tol,
                        "{:?} n={n} centred={c} ({i}, {j}): {} vs {}",
                        T::DTYPE,
                        got[i * 3 + j],
                        expect[i * 3 + j]
                    );
                    assert_eq!(got[i * 3 + j].to_bits(), got[j * 3 + i].to_bits());
                }
            }
        }
    }
}

/// Products past `f32::MAX` overflow a tile's `f32` sum: that tile is summed in `f64` on the
/// host, so the Gram matrix keeps `f64`'s range, as the reference's.
fn gram_keeps_f64_range(ctx: &Context) {
    let n = 2 * TILE + 5;
    let mut a: Vec<f32> = normal(n, 1);
    a[TILE + 3] = 3e30;
    let b: Vec<f32> = normal(n, 2);
    let (mut got, mut expect) = ([0.0; 4], [0.0; 4]);
    block_on(gram(
        ctx,
        &[&upload(ctx, &a), &upload(ctx, &b)],
        None,
        &mut got,
    ))
    .unwrap();
    gram_ref(&[&a[..], &b[..]], None, &mut expect).unwrap();
    assert!(expect[0] > 1e60 && got[0].is_finite());
    for k in 0..4 {
        let tol = gram_tolerance(n, expect[(k / 2) * 3], expect[(k % 2) * 3]);
        assert!(
            (got[k] - expect[k]).abs() <= tol,
            "{k}: {} vs {}",
            got[k],
            expect[k]
        );
    }
}

/// The largest change of `f(g)` over Gram matrices whose entries each move by their
/// [`gram_tolerance`] (every corner of that box): how far the GPU's coefficients may stray.
fn coefficient_slack<const K: usize>(
    g: &[f64],
    len: usize,
    f: impl Fn(&[f64]) -> [f64; K],
) -> [f64; K] {
    let n = (g.len() as f64).sqrt() as usize;
    let pairs: Vec<(usize, usize)> = (0..n).flat_map(|i| (i..n).map(move |j| (i, j))).collect();
    let at = f(g);
    let mut slack = [0.0f64; K];
    for corner in 0..1u32 << pairs.len() {
        let mut moved = g.to_vec();
        for (bit, &(i, j)) in pairs.iter().enumerate() {
            let tol = gram_tolerance(len, g[i * n + i], g[j * n + j]);
            let step = if corner >> bit & 1 == 1 { tol } else { -tol };
            moved[i * n + j] += step;
            if i != j {
                moved[j * n + i] += step;
            }
        }
        for (s, (a, b)) in slack.iter_mut().zip(f(&moved).iter().zip(&at)) {
            *s = s.max((a - b).abs());
        }
    }
    slack
}

fn slerp_and_model_stock_match<T: GpuElement>(ctx: &Context) {
    for n in [1usize, 2, 257, 4097, 8193] {
        // Correlated fine-tunes: a shared base plus small independent offsets.
        let base: Vec<T> = normal(n, 3);
        let tuned: Vec<Vec<T>> = models::<T>(n, 3, 70 + n as u64)
            .iter()
            .map(|m| {
                m.iter()
                    .zip(&base)
                    .map(|(d, b)| T::from_f32(b.to_f32() + 0.1 * d.to_f32()))
                    .collect()
            })
            .collect();
        let gpu_base = upload(ctx, &base);
        let gpu: Vec<GpuTensor<T>> = tuned.iter().map(|m| upload(ctx, m)).collect();
        for t in [0.0f32, 0.3, 1.0, 1.5] {
            let got = run(ctx, n, |out| {
                block_on(slerp(ctx, &gpu_base, &gpu[0], t, out)).unwrap();
            });
            let mut expect = vec![0.0; n];
            slerp_ref(&base, &tuned[0], t, &mut expect).unwrap();
            let mut g = [0.0; 4];
            gram_ref(&[&base[..], &tuned[0][..]], None, &mut g).unwrap();
            let [s0, s1] = slerp_coefficients(f64::from(t), g);
            let slack = coefficient_slack(&g, n, |g| {
                slerp_coefficients(f64::from(t), [g[0], g[1], g[2], g[3]])
            });
            assert_close(
                &format!("slerp {:?} n={n} t={t}", T::DTYPE),
                &got,
                &expect,
                |j| {
                    let (v0, v1) = (base[j].to_f64().abs(), tuned[0][j].to_f64().abs());
                    reduction_tolerance(2, s0.abs() * v0 + s1.abs() * v1)
                        + slack[0] * v0
                        + slack[1] * v1
                },
            );
        }
        if n < 2 {
            continue; // one element: all task vectors are parallel or opposite
        }
        for count in [2, 3] {
            let views: Vec<&[T]> = tuned[..count].iter().map(|m| &m[..]).collect();
            let gpu_views: Vec<&GpuTensor<T>> = gpu[..count].iter().collect();
            let got = run(ctx, n, |out| {
                block_on(model_stock(ctx, &gpu_base, &gpu_views, out)).unwrap();
            });
            let mut expect = vec![0.0; n];
            model_stock_ref(&base, &views, &mut expect).unwrap();
            let mut g = vec![0.0; count * count];
            gram_ref(&views, Some(&base[..]), &mut g).unwrap();
            let [slack] = coefficient_slack(&g, n, |g| [model_stock_ratio(g).unwrap()]);
            assert_close(
                &format!("model stock {:?} n={n} N={count}", T::DTYPE),
                &got,
                &expect,
                |j| {
                    let mean = views.iter().map(|m| m[j].to_f64()).sum::<f64>() / count as f64;
                    let scale = views.iter().map(|m| m[j].to_f64().abs()).sum::<f64>()
                        + base[j].to_f64().abs();
                    reduction_tolerance(count + 1, 2.0 * scale)
                        + slack * (mean.abs() + base[j].to_f64().abs())
                },
            );
        }
    }
}

/// mergekit's election (a zero sum elects `+`, the agreeing sum undivided) and the paper's, on
/// coarse values where zero sums and zero entries are common; the integer sums are exact in
/// `f32`, so the elected signs are the reference's.
fn ties_election_rules_match<T: GpuElement>(ctx: &Context) {
    for n in LENGTHS {
        let rng = CounterRng::new(n as u64);
        let ms: Vec<Vec<T>> = (0..5u64)
            .map(|m| {
                (0..n as u64)
                    .map(|i| T::from_f32((rng.u32_at(m * 100_000 + i) % 5) as f32 - 2.0))
                    .collect()
            })
            .collect();
        let base: Vec<T> = normal(n, 1);
        let weights = [1.0, 1.0, 2.0, 0.5, 3.0];
        let views: Vec<&[T]> = ms.iter().map(|m| &m[..]).collect();
        let gpu: Vec<GpuTensor<T>> = ms.iter().map(|m| upload(ctx, m)).collect();
        let gpu: Vec<&GpuTensor<T>> = gpu.iter().collect();
        let gpu_base = upload(ctx, &base);
        for positive in [false, true] {
            for normalize in [false, true] {
                let rule = TiesElection::default()
                    .with_zero_sum_elects_positive(positive)
                    .with_normalize(normalize);
                let got = run(ctx, n, |out| {
                    ties_elect_with(ctx, &gpu_base, &gpu, &weights, 0.5, rule, out).unwrap();
                });
                let mut expect = vec![0.0; n];
                ties_elect_with_ref(&base, &views, &weights, 0.5, rule, &mut expect).unwrap();
                assert_close(
                    &format!("{:?} n={n} {rule:?}", T::DTYPE),
                    &got,
                    &expect,
                    |j| {
                        let abs: f64 = views
                            .iter()
                            .zip(&weights)
                            .map(|(m, &w)| f64::from(w) * m[j].to_f64().abs())
                            .sum();
                        reduction_tolerance(weights.len(), abs) + base[j].to_f64().abs() * 1e-7
                    },
                );
            }
        }
    }
}

fn f32_all(ctx: &Context) {
    linear_combination_matches::<f32>(ctx);
    gram_matches::<f32>(ctx);
    slerp_and_model_stock_match::<f32>(ctx);
    ties_election_rules_match::<f32>(ctx);
}

fn f16_all(ctx: &Context) {
    linear_combination_matches::<f16>(ctx);
    gram_matches::<f16>(ctx);
    slerp_and_model_stock_match::<f16>(ctx);
    ties_election_rules_match::<f16>(ctx);
}

fn bf16_all(ctx: &Context) {
    linear_combination_matches::<bf16>(ctx);
    gram_matches::<bf16>(ctx);
    slerp_and_model_stock_match::<bf16>(ctx);
    ties_election_rules_match::<bf16>(ctx);
}

fn bad_inputs(ctx: &Context) {
    let a = upload(ctx, &[1.0f32, 2.0, 3.0]);
    let b = upload(ctx, &[1.0f32, 2.0]);
    let mut out3 = upload(ctx, &[0.0f32; 3]);
    let is_shape = |e: &Error| {
        matches!(
            e,
            Error::LengthMismatch { .. } | Error::ShapeMismatch { .. }
        )
    };
    let e = linear_combination(ctx, &[&a, &b], &[1.0, 1.0], &mut out3).unwrap_err();
    assert!(is_shape(&e), "lengths");
    let e = linear_combination(ctx, &[&a], &[f32::NAN], &mut out3).unwrap_err();
    assert!(matches!(e, Error::InvalidParam { .. }), "{e}");
    let e = linear_combination(ctx, &[&a], &[1.0, 2.0], &mut out3).unwrap_err();
    assert!(
        is_shape(&e) || matches!(e, Error::InvalidParam { .. }),
        "weights"
    );
    let mut g = [0.0f64; 3];
    let e = block_on(gram(ctx, &[&a, &a], None, &mut g)).unwrap_err();
    assert!(is_shape(&e), "gram out");
    let e = block_on(gram::<f32>(ctx, &[], None, &mut [])).unwrap_err();
    assert!(matches!(e, Error::InvalidParam { .. }), "{e}");
    let e = block_on(gram(ctx, &[&a], Some(&b), &mut [0.0])).unwrap_err();
    assert!(is_shape(&e), "centre");
    let e = block_on(slerp(ctx, &a, &a, f32::INFINITY, &mut out3)).unwrap_err();
    assert!(matches!(e, Error::InvalidParam { .. }), "{e}");
    let e = block_on(slerp(ctx, &a, &b, 0.5, &mut out3)).unwrap_err();
    assert!(is_shape(&e), "slerp");
    let e = block_on(model_stock(ctx, &a, &[&a], &mut out3)).unwrap_err();
    assert!(matches!(e, Error::InvalidParam { .. }), "{e}");
    // Opposite task vectors (a mean cosine of -1 / (N - 1)) leave Model Stock's ratio undefined.
    let (zero, minus_a) = (
        upload(ctx, &[0.0f32; 3]),
        upload(ctx, &[-1.0f32, -2.0, -3.0]),
    );
    let e = block_on(model_stock(ctx, &zero, &[&a, &minus_a], &mut out3)).unwrap_err();
    assert!(matches!(e, Error::InvalidParam { .. }), "{e}");
    let rule = TiesElection::default();
    let e = ties_elect_with(ctx, &a, &[&b], &[1.0], 1.0, rule, &mut out3).unwrap_err();
    assert!(is_shape(&e), "ties");
}

gpu_tests!(f32_all, f16_all, bf16_all, gram_keeps_f64_range, bad_inputs);
