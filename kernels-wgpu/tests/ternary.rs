//! Ternary compression on every kernel variant and element type: ComPEFT's bytes against the
//! reference, and GEMV, decode and decompress-and-add from codes on the device.

use half::{bf16, f16};
use kernels_core::format::{self, TernaryLayout};
use kernels_core::ops::select::KeepRule;
use kernels_core::ops::ternary::{CompeftParams, compeft_ref, ternary_add_ref, ternary_gemv_ref};
use kernels_core::{Error, MatRef};
use kernels_testkit::gpu_tests;
use kernels_testkit::{EDGE_DIMS, assert_close, normal, random_codes, task_vector};
use kernels_wgpu::compress::{SCALE_RELATIVE_TOLERANCE, compeft, compeft_codes};
use kernels_wgpu::gemv::gemv_tolerance;
use kernels_wgpu::ternary::{
    GpuTernary, ternary_add, ternary_add_tolerance, ternary_decode, ternary_gemv,
};
use kernels_wgpu::{Context, GpuElement, GpuTensor, block_on};

const LAYOUTS: [TernaryLayout; 2] = [TernaryLayout::Dense2Bit, TernaryLayout::SparseRice];

/// A matrix shape for `n` entries, several columns wide where `n` allows (paged contexts split
/// it into pages).
fn upload<T: GpuElement>(ctx: &Context, x: &[T]) -> GpuTensor<T> {
    let cols = [13, 8, 3]
        .into_iter()
        .find(|d| x.len().is_multiple_of(*d))
        .unwrap_or(1);
    GpuTensor::from_matrix(ctx, MatRef::from_slice(x, x.len() / cols, cols).unwrap()).unwrap()
}

fn decode_and_add_into<T: GpuElement>(ctx: &Context) {
    for n in [
        0usize, 1, 3, 4, 5, 15, 16, 17, 63, 64, 65, 127, 1000, 4099, 70_001,
    ] {
        let c = random_codes(n, 0.3, 7 + n as u64);
        let base: Vec<T> = normal(n, 3);
        for layout in LAYOUTS {
            let bytes = format::encode(&c, &[n as u64], 0.37, layout).unwrap();
            let packed = GpuTernary::upload(ctx, &bytes).unwrap();
            let what = format!("{:?} n={n} {layout:?}", T::DTYPE);
            if T::DTYPE == kernels_core::DType::F32 {
                let mut decoded = upload(ctx, &vec![f32::NAN; n]);
                ternary_decode(ctx, &packed, &mut decoded).unwrap();
                let expect: Vec<f32> = c.iter().map(|&k| 0.37 * f32::from(k)).collect();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&decoded.to_vec_blocking(ctx).unwrap()),
                    bits(&expect),
                    "decode {what}"
                );
            }
            let mut theta = upload(ctx, &base);
            ternary_add(ctx, &mut theta, &packed, -1.3).unwrap();
            let mut expect = base.clone();
            ternary_add_ref(&mut expect, &c, 0.37, -1.3).unwrap();
            let step = -1.3 * 0.37;
            let widen = |v: Vec<T>| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
            let got = widen(theta.to_vec_blocking(ctx).unwrap());
            let expect = widen(expect);
            // The GPU rounds f32 sums to a 16-bit T as the reference rounds f64 ones: the two
            // differ only where the f32 sum straddles a boundary of T, rarely (truncating
            // would differ in half of them).
            if T::DTYPE != kernels_core::DType::F32 {
                let differing = got
                    .iter()
                    .zip(&expect)
                    .filter(|(g, e)| g.to_bits() != e.to_bits())
                    .count();
                assert!(
                    differing <= n / 100 + 1,
                    "add {what}: {differing} of {n} differ"
                );
            }
            assert_close(&format!("add {what}"), &got, &expect, |i| match c[i] {
                // A zero code leaves theta exactly as it was.
                0 => 0.0,
                code => ternary_add_tolerance::<T>(base[i].to_f32(), step * f64::from(code)),
            });
        }
    }
}

fn decode_and_add(ctx: &Context) {
    decode_and_add_into::<f32>(ctx);
    decode_and_add_into::<f16>(ctx);
    decode_and_add_into::<bf16>(ctx);
}

fn gemv_matches(ctx: &Context) {
    for &rows in &EDGE_DIMS[..8] {
        for &cols in &EDGE_DIMS {
            let c = random_codes(rows * cols, 0.4, (rows * 1000 + cols) as u64);
            let x: Vec<f32> = normal(cols, 5);
            let mut expect = vec![0.0; rows];
            ternary_gemv_ref(
                MatRef::from_slice(&c, rows, cols).unwrap(),
                0.8,
                &x,
                &mut expect,
            )
            .unwrap();
            let x_gpu = GpuTensor::from_slice(ctx, &x).unwrap();
            for layout in LAYOUTS {
                let bytes = format::encode(&c, &[rows as u64, cols as u64], 0.8, layout).unwrap();
                let packed = GpuTernary::upload(ctx, &bytes).unwrap();
                let mut y = GpuTensor::from_slice(ctx, &vec![f32::NAN; rows]).unwrap();
                ternary_gemv(ctx, &packed, &x_gpu, &mut y).unwrap();
                let abs: Vec<f64> = c
                    .chunks(cols.max(1))
                    .map(|row| {
                        row.iter()
                            .zip(&x)
                            .map(|(&k, &v)| 0.8 * f64::from(k.abs()) * f64::from(v.abs()))
                            .sum()
                    })
                    .collect();
                // The sum rounds as a GEMV's; the scale multiplies once more.
                assert_close(
                    &format!("ternary gemv {rows}x{cols} {layout:?}"),
                    &y.to_vec_blocking(ctx).unwrap(),
                    &expect,
                    |r| {
                        gemv_tolerance(cols, abs.get(r).copied().unwrap_or(0.0))
                            + f64::from(f32::EPSILON) * f64::from(expect[r].abs())
                    },
                );
            }
        }
    }
}

/// The packed tensors against the reference: the same bytes (with our scale written in), and
/// the scale within its tolerance.
fn check_model<T: GpuElement>(ctx: &Context, tensors: &[Vec<T>], keep: KeepRule, what: &str) {
    let shapes: Vec<Vec<u64>> = tensors
        .iter()
        .map(|t| {
            if t.len() % 2 == 0 && !t.is_empty() {
                vec![2, t.len() as u64 / 2]
            } else {
                vec![t.len() as u64]
            }
        })
        .collect();
    let views: Vec<&[T]> = tensors.iter().map(Vec::as_slice).collect();
    let gpu: Vec<GpuTensor<T>> = tensors.iter().map(|t| upload(ctx, t)).collect();
    let params = CompeftParams::default().with_keep(keep).with_alpha(1.5);
    let (expect, codes) = compeft_ref(&views, params).unwrap();
    let scale = expect.scale;
    let gpu_views: Vec<&GpuTensor<T>> = gpu.iter().collect();
    let (decided, got) = block_on(compeft_codes(ctx, &gpu_views, params)).unwrap();
    assert_eq!((decided.cut, decided.total), (expect.cut, expect.total));
    assert_eq!(got, codes, "{what} {:?} {keep:?} codes", T::DTYPE);
    for layout in LAYOUTS {
        let input: Vec<(&GpuTensor<T>, &[u64])> = gpu
            .iter()
            .zip(&shapes)
            .map(|(t, s)| (t, s.as_slice()))
            .collect();
        let (decided, packed) = block_on(compeft(ctx, &input, params, layout)).unwrap();
        let got_scale = decided.scale;
        let label = format!("{what} {:?} {keep:?} {layout:?}", T::DTYPE);
        assert!(
            (f64::from(got_scale) - f64::from(scale)).abs()
                <= SCALE_RELATIVE_TOLERANCE * f64::from(scale).abs() + 1e-37,
            "{label}: scale {got_scale} vs {scale}"
        );
        for ((bytes, expect_codes), shape) in packed.iter().zip(&codes).zip(&shapes) {
            let expect = format::encode(expect_codes, shape, got_scale, layout).unwrap();
            assert_eq!(bytes, &expect, "{label}");
        }
    }
}

fn models<T: GpuElement>(ctx: &Context) {
    for (sizes, seed) in [
        (&[0usize, 1][..], 1),
        (&[3, 64, 65], 2),
        (&[1000, 17, 4099], 3),
        (&[9000, 8193], 4),
    ] {
        let tensors: Vec<Vec<T>> = sizes
            .iter()
            .map(|&n| task_vector(n, seed * 100 + n as u64, 3.0))
            .collect();
        let what = format!("sizes {sizes:?}");
        for density in [0.05, 0.1, 0.5, 0.9, 1.0] {
            check_model(ctx, &tensors, KeepRule::Density(density), &what);
        }
        let n: usize = sizes.iter().sum();
        for keep in [KeepRule::Count(n as u64 / 3), KeepRule::Threshold(3.5)] {
            check_model(ctx, &tensors, keep, &what);
        }
    }
}

fn compeft_f32(ctx: &Context) {
    models::<f32>(ctx);
}

fn compeft_f16(ctx: &Context) {
    models::<f16>(ctx);
}

fn compeft_bf16(ctx: &Context) {
    models::<bf16>(ctx);
}

fn bad_inputs(ctx: &Context) {
    let c = random_codes(12, 0.5, 1);
    let bytes = format::encode(&c, &[3, 4], 1.0, TernaryLayout::Dense2Bit).unwrap();
    // Garbled bytes are the decoder's errors, before anything reaches the device.
    let mut garbled = bytes.clone();
    garbled[0] ^= 1;
    assert!(matches!(
        GpuTernary::upload(ctx, &garbled),
        Err(Error::BadFormat { .. })
    ));
    assert!(GpuTernary::upload(ctx, &bytes[..bytes.len() - 1]).is_err());
    let packed = GpuTernary::upload(ctx, &bytes).unwrap();
    let x3 = GpuTensor::from_slice(ctx, &[1.0f32; 3]).unwrap();
    let x4 = GpuTensor::from_slice(ctx, &[1.0f32; 4]).unwrap();
    let mut y3 = GpuTensor::<f32>::zeros(ctx, 3, 1).unwrap();
    assert!(matches!(
        ternary_gemv(ctx, &packed, &x3, &mut y3),
        Err(Error::LengthMismatch { what: "x", .. })
    ));
    let mut y4 = GpuTensor::<f32>::zeros(ctx, 4, 1).unwrap();
    assert!(matches!(
        ternary_gemv(ctx, &packed, &x4, &mut y4),
        Err(Error::LengthMismatch { what: "y", .. })
    ));
    let flat = format::encode(&c, &[12], 1.0, TernaryLayout::Dense2Bit).unwrap();
    let flat = GpuTernary::upload(ctx, &flat).unwrap();
    assert!(matches!(
        ternary_gemv(ctx, &flat, &x4, &mut y3),
        Err(Error::InvalidParam {
            name: "packed shape",
            ..
        })
    ));
    let mut theta = GpuTensor::<f16>::zeros(ctx, 11, 1).unwrap();
    assert!(matches!(
        ternary_add(ctx, &mut theta, &packed, 1.0),
        Err(Error::LengthMismatch { .. })
    ));
    let mut theta = GpuTensor::<f32>::zeros(ctx, 12, 1).unwrap();
    assert!(matches!(
        ternary_add(ctx, &mut theta, &packed, f32::NAN),
        Err(Error::InvalidParam { name: "lambda", .. })
    ));
    let tau = upload(ctx, &[1.0f32; 12]);
    assert!(matches!(
        block_on(compeft(
            ctx,
            &[(&tau, &[5][..])],
            CompeftParams::default(),
            TernaryLayout::Dense2Bit
        )),
        Err(Error::InvalidParam { .. }
            | Error::ShapeMismatch { .. }
            | Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        block_on(compeft(
            ctx,
            &[(&tau, &[12][..])],
            CompeftParams::default().with_keep(KeepRule::Density(0.0)),
            TernaryLayout::Dense2Bit
        )),
        Err(Error::InvalidParam {
            name: "density",
            ..
        })
    ));
    ctx.check().unwrap();
}

gpu_tests!(
    decode_and_add,
    gemv_matches,
    compeft_f32,
    compeft_f16,
    compeft_bf16,
    bad_inputs
);
