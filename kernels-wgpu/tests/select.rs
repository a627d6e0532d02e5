//! Magnitude selection, TIES trim and Breadcrumbs on every kernel variant and element type:
//! bit-identical to the reference, with the CPU suite's data.

use half::{bf16, f16};
use kernels_core::ops::merge::{BreadcrumbsParams, breadcrumbs_ref, ties_trim_ref};
use kernels_core::ops::select::{KeepRule, TopKCut, topk_cut_ref, topk_mask_ref};
use kernels_core::{Element, Error, MatRef};
use kernels_testkit::gpu_tests;
use kernels_testkit::{bits, ks, normal, tied};
use kernels_wgpu::masks::{breadcrumbs, ties_trim};
use kernels_wgpu::select::{TopKApplier, kth_largest_magnitude, topk_cut, topk_keep};
use kernels_wgpu::{Context, GpuElement, GpuTensor, block_on};

/// The CPU suite's lengths, and two past one 4096-entry tile.
const LENGTHS: [usize; 13] = [0, 1, 3, 15, 16, 17, 63, 64, 65, 127, 1000, 4099, 9000];

/// Uploads `x` several columns wide where its length allows, so that paged contexts split it.
fn upload<T: GpuElement>(ctx: &Context, x: &[T]) -> GpuTensor<T> {
    let cols = [13, 8, 3]
        .into_iter()
        .find(|d| x.len().is_multiple_of(*d))
        .unwrap_or(1);
    GpuTensor::from_matrix(ctx, MatRef::from_slice(x, x.len() / cols, cols).unwrap()).unwrap()
}

fn fresh(ctx: &Context, like: &GpuTensor<impl bytemuck::Pod>) -> GpuTensor<f32> {
    let [rows, cols] = like.shape();
    GpuTensor::from_matrix(
        ctx,
        MatRef::from_slice(&vec![f32::NAN; rows * cols], rows, cols).unwrap(),
    )
    .unwrap()
}

/// `x` where `mask` keeps, `+0.0` elsewhere, as bits.
fn masked<T: Element>(x: &[T], mask: &[bool]) -> Vec<u32> {
    x.iter()
        .zip(mask)
        .map(|(v, &keep)| if keep { v.to_f32().to_bits() } else { 0 })
        .collect()
}

fn check_one<T: GpuElement>(ctx: &Context, x: &[T], what: &str) {
    let gpu = upload(ctx, x);
    let rules = ks(x.len())
        .into_iter()
        .map(KeepRule::Count)
        .chain([KeepRule::Density(0.1), KeepRule::Threshold(0.5)]);
    for keep in rules {
        let label = format!("{what} {:?} n={} {keep:?}", T::DTYPE, x.len());
        let cut = block_on(topk_cut(ctx, &[&gpu], keep)).unwrap();
        assert_eq!(cut, topk_cut_ref(&[x], keep).unwrap(), "{label}");
        let mut out = fresh(ctx, &gpu);
        block_on(topk_keep(ctx, &gpu, keep, &mut out)).unwrap();
        let expect = masked(x, &topk_mask_ref(x, keep).unwrap());
        assert_eq!(bits(&out.to_vec_blocking(ctx).unwrap()), expect, "{label}");
        // The public cut, applied by an applier, keeps the same entries.
        let mut applied = fresh(ctx, &gpu);
        block_on(TopKApplier::new(&cut).keep(ctx, &gpu, &mut applied)).unwrap();
        assert_eq!(
            bits(&applied.to_vec_blocking(ctx).unwrap()),
            expect,
            "{label}: applier"
        );
        if let KeepRule::Count(k @ 1..) = keep {
            assert_eq!(
                block_on(kth_largest_magnitude(ctx, &[&gpu], k)).unwrap(),
                cut.magnitude,
                "{label}"
            );
        }
    }
}

fn single_slices<T: GpuElement>(ctx: &Context) {
    for n in LENGTHS {
        check_one::<T>(ctx, &tied(n, n as u64), "tied");
        check_one::<T>(ctx, &normal(n, 7 + n as u64), "normal");
    }
}

fn selection_f32(ctx: &Context) {
    single_slices::<f32>(ctx);
}

fn selection_f16(ctx: &Context) {
    single_slices::<f16>(ctx);
}

fn selection_bf16(ctx: &Context) {
    single_slices::<bf16>(ctx);
}

fn global_over_many_slices(ctx: &Context) {
    let x: Vec<f32> = tied(9000, 11);
    for cuts in [
        &[0usize, 0, 9000][..],
        &[1, 64, 65, 1000, 8999],
        &[700, 701, 4096, 4097],
    ] {
        let mut slices = Vec::new();
        let mut from = 0;
        for &c in cuts {
            slices.push(&x[from..c]);
            from = c;
        }
        slices.push(&x[from..]);
        let gpu: Vec<GpuTensor<f32>> = slices.iter().map(|s| upload(ctx, s)).collect();
        let gpu: Vec<&GpuTensor<f32>> = gpu.iter().collect();
        for k in ks(x.len()) {
            let keep = KeepRule::Count(k);
            let cut = block_on(topk_cut(ctx, &gpu, keep)).unwrap();
            assert_eq!(
                cut,
                topk_cut_ref(&[&x[..]], keep).unwrap(),
                "cuts {cuts:?} k={k}"
            );
            // Ties spent in one slice are not kept again in the next.
            let mut applier = TopKApplier::new(&cut);
            let mut kept = Vec::new();
            for slice in &gpu {
                let mut out = fresh(ctx, slice);
                block_on(applier.keep(ctx, slice, &mut out)).unwrap();
                kept.extend(bits(&out.to_vec_blocking(ctx).unwrap()));
            }
            let expect = masked(&x, &topk_mask_ref(&x, keep).unwrap());
            assert_eq!(kept, expect, "cuts {cuts:?} k={k}: applied");
        }
    }
}

fn trim_and_breadcrumbs<T: GpuElement>(ctx: &Context) {
    for n in LENGTHS {
        for tau in [tied::<T>(n, n as u64), normal::<T>(n, 9)] {
            let gpu = upload(ctx, &tau);
            for density in [0.01, 0.2, 0.5, 1.0] {
                let keep = KeepRule::Density(density);
                let mut out = fresh(ctx, &gpu);
                block_on(ties_trim(ctx, &gpu, keep, &mut out)).unwrap();
                let mut expect = vec![0.0f32; n];
                ties_trim_ref(&tau, keep, &mut expect).unwrap();
                assert_eq!(
                    bits(&out.to_vec_blocking(ctx).unwrap()),
                    bits(&expect),
                    "trim {:?} n={n} d={density}",
                    T::DTYPE
                );
            }
            // gamma n < 1 drops no outlier; density + gamma = 1 keeps all but the outliers.
            for (density, gamma) in [
                (0.5, 0.0),
                (0.9, 0.01),
                (0.5, 0.1),
                (0.2, 0.8),
                (0.001, 0.0005),
            ] {
                let params = BreadcrumbsParams::default()
                    .with_density(density)
                    .with_gamma(gamma);
                let mut out = fresh(ctx, &gpu);
                block_on(breadcrumbs(ctx, &gpu, params, &mut out)).unwrap();
                let mut expect = vec![0.0; n];
                breadcrumbs_ref(&tau, params, &mut expect).unwrap();
                assert_eq!(
                    bits(&out.to_vec_blocking(ctx).unwrap()),
                    bits(&expect),
                    "breadcrumbs {:?} n={n} {params:?}",
                    T::DTYPE
                );
            }
        }
    }
}

fn masks_f32(ctx: &Context) {
    trim_and_breadcrumbs::<f32>(ctx);
}

fn masks_f16(ctx: &Context) {
    trim_and_breadcrumbs::<f16>(ctx);
}

fn masks_bf16(ctx: &Context) {
    trim_and_breadcrumbs::<bf16>(ctx);
}

fn bad_inputs(ctx: &Context) {
    let mut x: Vec<f32> = normal(300, 3);
    let gpu = upload(ctx, &x);
    assert!(matches!(
        block_on(topk_cut(ctx, &[&gpu], KeepRule::Count(301))),
        Err(Error::InvalidParam { name: "k", .. })
    ));
    assert!(matches!(
        block_on(kth_largest_magnitude(ctx, &[&gpu], 0)),
        Err(Error::InvalidParam { name: "k", .. })
    ));
    let mut short = GpuTensor::<f32>::zeros(ctx, 3, 1).unwrap();
    assert!(matches!(
        block_on(ties_trim(ctx, &gpu, KeepRule::Density(0.5), &mut short)),
        Err(Error::LengthMismatch { .. })
    ));
    let mut out = fresh(ctx, &gpu);
    assert!(matches!(
        block_on(ties_trim(ctx, &gpu, KeepRule::Density(0.0), &mut out)),
        Err(Error::InvalidParam {
            name: "density",
            ..
        })
    ));
    assert!(matches!(
        block_on(breadcrumbs(
            ctx,
            &gpu,
            BreadcrumbsParams::default()
                .with_density(0.5)
                .with_gamma(0.6),
            &mut out
        )),
        Err(Error::InvalidParam {
            name: "density + gamma",
            ..
        })
    ));
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        x[257] = bad;
        let head = upload(ctx, &x[..100]);
        let tail = upload(ctx, &x[100..]);
        assert!(
            matches!(
                block_on(topk_cut(ctx, &[&head, &tail], KeepRule::Count(5))),
                Err(Error::NonFinite { index: 257, .. })
            ),
            "{bad}"
        );
        // k = 0 and threshold rules still validate, as the reference does.
        assert!(block_on(topk_cut(ctx, &[&head, &tail], KeepRule::Count(0))).is_err());
        assert!(block_on(topk_cut(ctx, &[&head, &tail], KeepRule::Threshold(1.0))).is_err());
    }
    assert_eq!(
        block_on(topk_cut::<f32>(ctx, &[], KeepRule::Count(0))).unwrap(),
        TopKCut::NONE,
        "empty input"
    );
    ctx.check().unwrap();
}

gpu_tests!(
    selection_f32,
    selection_f16,
    selection_bf16,
    global_over_many_slices,
    masks_f32,
    masks_f16,
    masks_bf16,
    bad_inputs
);

mod calibration {
    use super::*;
    use kernels_core::ops::sparse::calibrate_threshold_ref;
    use kernels_wgpu::calibrate::calibrate_threshold;

    fn matches_reference(ctx: &Context) {
        for n in [1usize, 2, 17, 1000, 9000] {
            let samples: Vec<f32> = normal(n, 40 + n as u64);
            let split = n / 3;
            let parts = [
                upload(ctx, &samples[..split]),
                upload(ctx, &samples[split..]),
            ];
            let parts: Vec<&GpuTensor<f32>> = parts.iter().filter(|p| !p.is_empty()).collect();
            for k in [0.0, 0.001, 0.3, 0.5, 0.9, 1.0] {
                assert_eq!(
                    block_on(calibrate_threshold(ctx, &parts, k)).unwrap(),
                    calibrate_threshold_ref(&[&samples], k).unwrap(),
                    "n={n} k={k}"
                );
            }
        }
        let mut bad: Vec<f32> = normal(50, 1);
        bad[20] = f32::NAN;
        let bad = upload(ctx, &bad);
        for k in [0.0, 0.5] {
            assert!(matches!(
                block_on(calibrate_threshold(ctx, &[&bad], k)),
                Err(Error::NonFinite { index: 20, .. })
            ));
        }
        assert!(matches!(
            block_on(calibrate_threshold(ctx, &[], 0.5)),
            Err(Error::InvalidParam { .. })
        ));
        let good = upload(ctx, &[1.0f32; 4]);
        assert!(matches!(
            block_on(calibrate_threshold(ctx, &[&good], 1.5)),
            Err(Error::InvalidParam { name: "k", .. })
        ));
    }

    gpu_tests!(matches_reference);
}
