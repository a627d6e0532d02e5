//! The context: adapter choice and its errors, feature requests, the pipeline cache, the buffer
//! pool and the limits tensors are checked against.

use kernels_core::Error;
use kernels_testkit::gpu_tests;
use kernels_wgpu::gemv::gemv;
use kernels_wgpu::{AdapterChoice, Context, ContextOptions, FeatureUse, GpuTensor};

fn missing_adapter_says_how_to_get_one(_: &Context) {
    for options in [
        ContextOptions {
            adapter: AdapterChoice::NameContains("no adapter has this name".into()),
            ..ContextOptions::default()
        },
        ContextOptions {
            backends: wgpu::Backends::empty(),
            ..ContextOptions::default()
        },
    ] {
        match Context::new_blocking(options) {
            Err(Error::Unsupported { hint, .. }) => {
                assert!(hint.contains("mesa-vulkan-drivers"), "{hint}");
            }
            other => panic!("expected Unsupported, got {:?}", other.map(|_| ())),
        }
    }
}

fn adapter_by_name_and_features_as_asked(ctx: &Context) {
    let name = ctx.adapter_info().name.clone();
    let by_name = Context::new_blocking(ContextOptions {
        adapter: AdapterChoice::NameContains(name.to_uppercase()),
        shader_f16: FeatureUse::Off,
        subgroups: FeatureUse::Off,
        ..ContextOptions::default()
    })
    .unwrap();
    assert_eq!(by_name.adapter_info().name, name);
    assert!(!by_name.features().shader_f16 && !by_name.features().subgroups);
    // A required feature is used, or its absence is a clear error (not a silent fallback).
    for (f16, subgroups) in [
        (FeatureUse::Required, FeatureUse::Off),
        (FeatureUse::Off, FeatureUse::Required),
    ] {
        let result = Context::new_blocking(ContextOptions {
            shader_f16: f16,
            subgroups,
            ..ContextOptions::default()
        });
        match result {
            Ok(ctx) => assert!(ctx.features().shader_f16 || ctx.features().subgroups),
            Err(e) => assert!(matches!(e, Error::Unsupported { .. }), "{e}"),
        }
    }
}

fn pipelines_and_buffers_are_reused(ctx: &Context) {
    let w = GpuTensor::from_slice(ctx, &[1.0f32; 64]).unwrap();
    let w = GpuTensor::from_matrix(
        ctx,
        kernels_core::MatRef::from_slice(&w.to_vec_blocking(ctx).unwrap(), 8, 8).unwrap(),
    )
    .unwrap();
    let x = GpuTensor::from_slice(ctx, &[1.0f32; 8]).unwrap();
    let mut y = GpuTensor::<f32>::zeros(ctx, 8, 1).unwrap();
    gemv(ctx, &w, &x, &mut y).unwrap();
    let (pipelines, pooled) = (ctx.cached_pipelines(), ctx.pooled_buffers());
    assert!(pipelines >= 1 && pooled >= 1);
    for _ in 0..5 {
        gemv(ctx, &w, &x, &mut y).unwrap();
    }
    assert_eq!(
        ctx.cached_pipelines(),
        pipelines,
        "a pipeline was compiled twice"
    );
    assert_eq!(
        ctx.pooled_buffers(),
        pooled,
        "scratch buffers were not reused"
    );
    assert_eq!(y.to_vec_blocking(ctx).unwrap(), [8.0; 8]);
}

fn empty_tensors_round_trip(ctx: &Context) {
    for (rows, cols) in [(0, 0), (0, 5), (3, 0)] {
        let t = GpuTensor::<f32>::zeros(ctx, rows, cols).unwrap();
        assert_eq!(t.to_vec_blocking(ctx).unwrap(), Vec::<f32>::new());
    }
    ctx.check().unwrap();
}

fn too_large_for_the_device(ctx: &Context) {
    // More elements than a shader can index.
    assert!(matches!(
        GpuTensor::<f32>::zeros(ctx, 1 << 20, 1 << 12),
        Err(Error::TooLarge { .. })
    ));
    let long = (ctx.binding_bytes() / 4) as usize + 1;
    if long <= 64 << 20 {
        // A row longer than one storage binding cannot be paged by rows.
        assert!(matches!(
            GpuTensor::<f32>::zeros(ctx, 0, long),
            Err(Error::InvalidParam { name: "cols", .. })
        ));
        // A vector that long pages, but GEMV binds x whole: a clear error.
        let x = GpuTensor::<f32>::zeros(ctx, long, 1).unwrap();
        let w_t = GpuTensor::<f32>::zeros(ctx, long, 1).unwrap();
        let mut y = GpuTensor::<f32>::zeros(ctx, 1, 1).unwrap();
        assert!(matches!(
            kernels_wgpu::gemv::gemv_t(ctx, &w_t, &x, &mut y),
            Err(Error::InvalidParam { name: "x", .. })
        ));
    }
    ctx.check().unwrap();
}

gpu_tests!(
    missing_adapter_says_how_to_get_one,
    adapter_by_name_and_features_as_asked,
    pipelines_and_buffers_are_reused,
    empty_tensors_round_trip,
    too_large_for_the_device
);
