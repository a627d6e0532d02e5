//! Merge reductions and DARE on every kernel variant and element type, against the reference,
//! with the CPU suite's data; paging and chunking never change a bit.

use half::{bf16, f16};
use kernels_core::ops::merge::{
    DareParams, DareRescale, TiesElection, dare_ref, fisher_merge_ref, sum_squares_ref,
    ties_elect_ref, ties_ref,
};
use kernels_core::ops::select::KeepRule;
use kernels_core::{CounterRng, Error, Result};
use kernels_testkit::gpu::upload;
use kernels_testkit::gpu_tests;
use kernels_testkit::merge::{
    LENGTHS, MODEL_COUNTS, ReduceBackend, every_length_model_count_and_type,
    non_finite_data_propagates, ties_scale,
};
use kernels_testkit::{assert_close, bits, normal, sparse_taus};
use kernels_wgpu::masks::{DARE_L1_RELATIVE_TOLERANCE, DARE_RELATIVE_TOLERANCE, dare};
use kernels_wgpu::merge::{
    FisherParams, SUM_SQUARES_RELATIVE_TOLERANCE, TiesParams, fisher_accumulate, fisher_merge,
    reduction_tolerance, sum_squares, task_arithmetic, ties, ties_elect, weighted_mean,
};
use kernels_wgpu::{Context, GpuElement, GpuTensor, block_on};

fn fresh(ctx: &Context, n: usize) -> GpuTensor<f32> {
    upload(ctx, &vec![f32::NAN; n])
}

/// [`assert_close`], with infinities required to match exactly.
fn assert_near(what: &str, got: &[f32], expect: &[f32], tolerance: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), expect.len(), "{what}: lengths");
    for (j, (g, e)) in got.iter().zip(expect).enumerate() {
        if e.is_infinite() {
            assert_eq!(g, e, "{what}[{j}]");
        } else {
            assert_close(what, &[*g], &[*e], |_| tolerance(j));
        }
    }
}

/// Runs `op` on `out`'s contents uploaded (shaped as [`shape`] says), and downloads the result.
fn into_host(
    ctx: &Context,
    out: &mut [f32],
    op: impl FnOnce(&mut GpuTensor<f32>) -> Result<()>,
) -> Result<()> {
    let mut device = upload(ctx, out);
    op(&mut device)?;
    out.copy_from_slice(&device.to_vec_blocking(ctx)?);
    Ok(())
}

/// The GPU backend, for the shared bodies.
struct OnGpu<'a>(&'a Context);

impl<T: GpuElement> ReduceBackend<T> for OnGpu<'_> {
    fn name(&self) -> String {
        format!("{} {:?}", self.0.adapter_info().name, self.0.features())
    }

    fn weighted_mean(&self, models: &[&[T]], weights: &[f32], out: &mut [f32]) -> Result<()> {
        let models: Vec<GpuTensor<T>> = models.iter().map(|m| upload(self.0, m)).collect();
        let models: Vec<&GpuTensor<T>> = models.iter().collect();
        into_host(self.0, out, |out| {
            weighted_mean(self.0, &models, weights, out)
        })
    }

    fn task_arithmetic(
        &self,
        base: &[T],
        taus: &[&[T]],
        weights: &[f32],
        lambda: f32,
        out: &mut [f32],
    ) -> Result<()> {
        let base = upload(self.0, base);
        let taus: Vec<GpuTensor<T>> = taus.iter().map(|t| upload(self.0, t)).collect();
        let taus: Vec<&GpuTensor<T>> = taus.iter().collect();
        into_host(self.0, out, |out| {
            task_arithmetic(self.0, &base, &taus, weights, lambda, out)
        })
    }

    fn fisher_accumulate(&self, fisher: &mut [f32], grad: &[T], scale: f32) -> Result<()> {
        let grad = upload(self.0, grad);
        into_host(self.0, fisher, |fisher| {
            fisher_accumulate(self.0, fisher, &grad, scale)
        })
    }

    fn tolerance(&self, terms: usize, abs_sum: f64) -> f64 {
        reduction_tolerance(terms, abs_sum)
    }

    fn alternate(&self) -> Option<Self> {
        None
    }
}

fn shared_reductions(ctx: &Context) {
    every_length_model_count_and_type(&OnGpu(ctx));
}

fn shared_non_finite(ctx: &Context) {
    non_finite_data_propagates(&OnGpu(ctx));
}

fn ties_and_fisher<T: GpuElement>(ctx: &Context) {
    for &n in &LENGTHS {
        for models in MODEL_COUNTS {
            let taus: Vec<Vec<T>> = (0..models)
                .map(|i| sparse_taus(n, (n * 10 + i) as u64, i == 1))
                .collect();
            let views: Vec<&[T]> = taus.iter().map(Vec::as_slice).collect();
            let gpu: Vec<GpuTensor<T>> = taus.iter().map(|t| upload(ctx, t)).collect();
            let gpu: Vec<&GpuTensor<T>> = gpu.iter().collect();
            let weights: Vec<f32> = (0..models).map(|i| 0.25 + i as f32).collect();
            let base_host: Vec<T> = normal(n, 77);
            let base = upload(ctx, &base_host);
            let what = format!("{:?} n={n} N={models}", T::DTYPE);
            let mut out = fresh(ctx, n);
            let mut expect = vec![0.0; n];
            ties_elect(ctx, &base, &gpu, &weights, 0.7, &mut out).unwrap();
            ties_elect_ref(&base_host, &views, &weights, 0.7, &mut expect).unwrap();
            assert_near(
                &format!("TIES {what}"),
                &out.to_vec_blocking(ctx).unwrap(),
                &expect,
                |j| {
                    let scale = ties_scale(
                        &base_host,
                        &views,
                        &weights,
                        0.7,
                        TiesElection::default(),
                        j,
                    );
                    reduction_tolerance(models, scale)
                },
            );
            // TIES in one call: the trim is exact, the election within the same bound.
            let params = TiesParams::default()
                .with_keep(KeepRule::Density(0.3))
                .with_lambda(0.7);
            let finite: Vec<Vec<T>> = (0..models)
                .map(|i| sparse_taus(n, (n * 30 + i) as u64, false))
                .collect();
            let finite_views: Vec<&[T]> = finite.iter().map(Vec::as_slice).collect();
            let finite_gpu: Vec<GpuTensor<T>> = finite.iter().map(|t| upload(ctx, t)).collect();
            let finite_gpu: Vec<&GpuTensor<T>> = finite_gpu.iter().collect();
            block_on(ties(ctx, &base, &finite_gpu, &weights, params, &mut out)).unwrap();
            ties_ref(&base_host, &finite_views, &weights, params, &mut expect).unwrap();
            let scale: f64 = finite_views
                .iter()
                .flat_map(|t| t.iter().map(|v| f64::from(v.to_f32()).abs()))
                .fold(0.0, f64::max);
            assert_near(
                &format!("TIES in one call {what}"),
                &out.to_vec_blocking(ctx).unwrap(),
                &expect,
                |j| {
                    let base = f64::from(base_host[j].to_f32()).abs();
                    reduction_tolerance(models, base + 0.7 * scale)
                },
            );

            // Fisher diagonals with zeros (the plain-mean fallback), negatives and a NaN.
            let fishers: Vec<Vec<f32>> = (0..models)
                .map(|i| {
                    sparse_taus::<f32>(n, (n * 20 + i) as u64, i == 0)
                        .iter()
                        .map(|v| if i == 2 { -v } else { v.abs() })
                        .collect()
                })
                .collect();
            let fisher_views: Vec<&[f32]> = fishers.iter().map(Vec::as_slice).collect();
            let fisher_gpu: Vec<GpuTensor<f32>> = fishers.iter().map(|f| upload(ctx, f)).collect();
            let fisher_gpu: Vec<&GpuTensor<f32>> = fisher_gpu.iter().collect();
            let norms: Vec<f64> = fisher_views
                .iter()
                .map(|f| sum_squares_ref(f).max(1.0))
                .collect();
            let plain = FisherParams::default();
            for params in [
                plain,
                plain.with_floor(1e-3),
                plain.with_normalization(&norms),
            ] {
                let floor = params.floor;
                fisher_merge(ctx, &gpu, &fisher_gpu, &weights, params, &mut out).unwrap();
                fisher_merge_ref(&views, &fisher_views, &weights, params, &mut expect).unwrap();
                let effective = |i: usize| {
                    params.squared_norms.map_or(f64::from(weights[i]), |n| {
                        f64::from(weights[i]) / n[i].sqrt()
                    })
                };
                let fisher_scale = |j: usize| {
                    let (mut num, mut den, mut plain, mut wsum) = (0.0, 0.0, 0.0, 0.0);
                    for (i, (m, f)) in views.iter().zip(&fisher_views).enumerate() {
                        let (w, theta) = (effective(i), f64::from(m[j].to_f32()));
                        let f = f64::from(f[j].max(floor));
                        num += (w * f * theta).abs();
                        den += w * f;
                        plain += (w * theta).abs();
                        wsum += w;
                    }
                    if den > 0.0 { num / den } else { plain / wsum }
                };
                assert_near(
                    &format!("Fisher {params:?} {what}"),
                    &out.to_vec_blocking(ctx).unwrap(),
                    &expect,
                    |j| reduction_tolerance(models, fisher_scale(j)),
                );
            }
        }
    }
}

fn ties_fisher_f32(ctx: &Context) {
    ties_and_fisher::<f32>(ctx);
}

fn ties_fisher_f16(ctx: &Context) {
    ties_and_fisher::<f16>(ctx);
}

fn ties_fisher_bf16(ctx: &Context) {
    ties_and_fisher::<bf16>(ctx);
}

fn dare_matches<T: GpuElement>(ctx: &Context) {
    for n in LENGTHS {
        let tau_host: Vec<T> = normal(n, 3 + n as u64);
        let tau = upload(ctx, &tau_host);
        for drop in [0.0, 0.1, 0.5, 0.9, 0.999] {
            for first in [0u64, 1, 3, (1 << 32) - 7, (1 << 40) + 2] {
                for rescale in [
                    DareRescale::InverseKeep,
                    DareRescale::None,
                    DareRescale::PreserveL1,
                ] {
                    let params = DareParams::new(drop, 42).with_rescale(rescale);
                    let mut out = fresh(ctx, n);
                    let mut expect = vec![0.0; n];
                    block_on(dare(ctx, &tau, params, first, &mut out)).unwrap();
                    dare_ref(&tau_host, params, first, &mut expect).unwrap();
                    let got = out.to_vec_blocking(ctx).unwrap();
                    let what = format!("{:?} n={n} p={drop} first={first} {rescale:?}", T::DTYPE);
                    // The same survivors, bit for bit, and survivors within the tolerance.
                    let tolerance = if rescale == DareRescale::PreserveL1 {
                        DARE_L1_RELATIVE_TOLERANCE
                    } else {
                        DARE_RELATIVE_TOLERANCE
                    };
                    for (j, (g, e)) in got.iter().zip(&expect).enumerate() {
                        assert_eq!(g.to_bits() == 0, e.to_bits() == 0, "{what}: mask at {j}");
                        let err = (f64::from(*g) - f64::from(*e)).abs();
                        assert!(
                            err <= tolerance * f64::from(e.abs()),
                            "{what}: {g} vs {e} at {j}"
                        );
                    }
                    if rescale == DareRescale::PreserveL1 {
                        // Its scale depends on the slice it is given: chunks differ by design.
                        continue;
                    }
                    // Any chunking draws the same mask: a head and a tail as separate tensors.
                    let split = n / 3;
                    let (head, tail) = tau_host.split_at(split);
                    let mut parts = Vec::new();
                    for (part, offset) in [(head, 0), (tail, split as u64)] {
                        let mut part_out = fresh(ctx, part.len());
                        let part_gpu = upload(ctx, part);
                        block_on(dare(ctx, &part_gpu, params, first + offset, &mut part_out))
                            .unwrap();
                        parts.extend(part_out.to_vec_blocking(ctx).unwrap());
                    }
                    assert_eq!(bits(&parts), bits(&got), "{what}: chunking");
                }
            }
        }
    }
}

fn dare_f32(ctx: &Context) {
    dare_matches::<f32>(ctx);
    // A draw exactly at the threshold survives (the integer comparison is `>=`).
    let tau_host = vec![1.0f32; 100];
    let tau = upload(ctx, &tau_host);
    for (at, first) in [(37u64, 0u64), (1, 0), (0, 1)] {
        let draw = CounterRng::new(42).u24_at(at + first);
        let params = DareParams::new(f64::from(draw) / 16_777_216.0, 42);
        assert_eq!(params.drop_threshold(), draw);
        let mut out = fresh(ctx, 100);
        let mut expect = vec![0.0; 100];
        block_on(dare(ctx, &tau, params, first, &mut out)).unwrap();
        dare_ref(&tau_host, params, first, &mut expect).unwrap();
        let got = out.to_vec_blocking(ctx).unwrap();
        assert!(expect[at as usize] > 0.0);
        assert!(got[at as usize] > 0.0, "boundary draw at {at}");
    }
}

fn dare_f16(ctx: &Context) {
    dare_matches::<f16>(ctx);
}

fn dare_bf16(ctx: &Context) {
    dare_matches::<bf16>(ctx);
}

fn bad_inputs(ctx: &Context) {
    let a = upload(ctx, &[1.0f32; 4]);
    let b = upload(ctx, &[1.0f32; 5]);
    let mut out4 = fresh(ctx, 4);
    assert!(matches!(
        weighted_mean(ctx, &[&a, &b], &[1.0, 1.0], &mut out4),
        Err(Error::LengthMismatch {
            what: "models[i]",
            ..
        })
    ));
    assert!(matches!(
        weighted_mean::<f32>(ctx, &[], &[], &mut out4),
        Err(Error::InvalidParam { name: "models", .. })
    ));
    assert!(matches!(
        weighted_mean(ctx, &[&a], &[-1.0], &mut out4),
        Err(Error::InvalidParam {
            name: "weights",
            ..
        })
    ));
    assert!(matches!(
        weighted_mean(ctx, &[&a], &[1.0, 2.0], &mut out4),
        Err(Error::LengthMismatch {
            what: "weights",
            ..
        })
    ));
    assert!(matches!(
        task_arithmetic(ctx, &a, &[&a], &[1.0], f32::NAN, &mut out4),
        Err(Error::InvalidParam { name: "lambda", .. })
    ));
    // Same length, another shape ([4, 1] against [2, 2]): the pages would not pair up.
    let column = GpuTensor::from_slice(ctx, &[1.0f32; 4]).unwrap();
    assert!(matches!(
        weighted_mean(ctx, &[&column], &[1.0], &mut out4),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        fisher_merge(
            ctx,
            &[&a],
            &[&b],
            &[1.0],
            FisherParams::default(),
            &mut out4
        ),
        Err(Error::LengthMismatch {
            what: "fishers[i]",
            ..
        })
    ));
    assert!(matches!(
        fisher_merge(
            ctx,
            &[&a],
            &[&a],
            &[1.0],
            FisherParams::default().with_floor(-1.0),
            &mut out4
        ),
        Err(Error::InvalidParam { name: "floor", .. })
    ));
    assert!(matches!(
        fisher_accumulate(ctx, &mut out4, &a, f32::INFINITY),
        Err(Error::InvalidParam { name: "scale", .. })
    ));
    assert!(matches!(
        block_on(dare(ctx, &a, DareParams::new(1.0, 0), 0, &mut out4)),
        Err(Error::InvalidParam { name: "drop", .. })
    ));
    assert!(matches!(
        block_on(dare(ctx, &b, DareParams::new(0.5, 0), 0, &mut out4)),
        Err(Error::LengthMismatch { what: "out", .. })
    ));
    ctx.check().unwrap();
}

fn sums_of_squares(ctx: &Context) {
    for n in [0usize, 1, 17, 4095, 4096, 4097, 30_011] {
        let x = normal::<bf16>(n, n as u64);
        let expect = sum_squares_ref(&x);
        let got = block_on(sum_squares(ctx, &upload(ctx, &x))).unwrap();
        assert!(
            (got - expect).abs() <= SUM_SQUARES_RELATIVE_TOLERANCE * expect,
            "n={n}: {got} vs {expect}"
        );
    }
}

gpu_tests!(
    shared_reductions,
    shared_non_finite,
    sums_of_squares,
    ties_fisher_f32,
    ties_fisher_f16,
    ties_fisher_bf16,
    dare_f32,
    dare_f16,
    dare_bf16,
    bad_inputs
);
