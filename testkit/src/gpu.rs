//! The GPU test suites' own pieces: one context per kernel variant, and the test macro.

use kernels_core::MatRef;
use kernels_wgpu::{Context, ContextOptions, FeatureUse, GpuElement, GpuTensor};

/// The kernel variants every body runs on.
#[derive(Clone, Copy, Debug)]
pub enum Variant {
    /// Neither `shader-f16` nor subgroups: the kernels every WebGPU device runs.
    Portable,
    /// f16 weights bound as `array<f16>`.
    ShaderF16,
    /// The subgroup kernels.
    Subgroups,
    /// Portable kernels with 8 KiB pages, so every tensor of a test spans many pages.
    Paged,
}

/// Bytes per page in [`Variant::Paged`]: 2048 `f32`, below most test matrices.
pub const SMALL_PAGE_BYTES: u64 = 8192;

fn options(variant: Variant) -> ContextOptions {
    let portable = ContextOptions {
        shader_f16: FeatureUse::Off,
        subgroups: FeatureUse::Off,
        ..ContextOptions::default()
    };
    match variant {
        Variant::Portable => portable,
        Variant::ShaderF16 => ContextOptions {
            shader_f16: FeatureUse::Required,
            ..portable
        },
        Variant::Subgroups => ContextOptions {
            subgroups: FeatureUse::Required,
            ..portable
        },
        Variant::Paged => ContextOptions {
            max_page_bytes: Some(SMALL_PAGE_BYTES),
            ..portable
        },
    }
}

/// Runs `body` on a context of `variant`.
///
/// Without an adapter the test fails with the context's hint unless
/// `KERNELS_WGPU_SKIP_WITHOUT_ADAPTER` is set. A variant whose feature the adapter lacks is
/// skipped loudly, unless `KERNELS_WGPU_REQUIRE_ALL_VARIANTS` is set (CI sets it: lavapipe offers
/// every feature, so nothing may be skipped there).
pub fn run_on(variant: Variant, body: fn(&Context)) {
    match Context::new_blocking(options(variant)) {
        Ok(ctx) => body(&ctx),
        Err(kernels_core::Error::Unsupported { feature, hint })
            if std::env::var_os("KERNELS_WGPU_SKIP_WITHOUT_ADAPTER").is_some()
                || (!matches!(variant, Variant::Portable | Variant::Paged)
                    && std::env::var_os("KERNELS_WGPU_REQUIRE_ALL_VARIANTS").is_none()) =>
        {
            eprintln!("skipped {variant:?}: {feature} is not available: {hint}");
        }
        Err(e) => panic!("{variant:?}: cannot create a GPU context: {e}"),
    }
}

/// A matrix shape holding `n` elements, several columns wide where `n` allows, so that
/// [`Variant::Paged`] splits tensors into pages of whole rows.
#[must_use]
pub fn shape(n: usize) -> (usize, usize) {
    let cols = [17, 16, 15, 5, 3, 2]
        .into_iter()
        .find(|d| n.is_multiple_of(*d) && n > *d)
        .unwrap_or(1);
    (n / cols, cols)
}

/// `data` on the device, shaped as [`shape`] says.
///
/// # Panics
///
/// If the device refuses the upload (a test failure).
#[must_use]
pub fn upload<T: GpuElement>(ctx: &Context, data: &[T]) -> GpuTensor<T> {
    let (rows, cols) = shape(data.len());
    GpuTensor::from_matrix(ctx, MatRef::from_slice(data, rows, cols).expect("shape"))
        .expect("upload")
}

/// One `#[test]` per kernel variant for each listed body, so a failure names its variant.
#[macro_export]
macro_rules! gpu_tests {
    ($($name:ident),* $(,)?) => {
        mod portable { $( #[test] fn $name() { $crate::gpu::run_on($crate::gpu::Variant::Portable, super::$name) } )* }
        mod shader_f16 { $( #[test] fn $name() { $crate::gpu::run_on($crate::gpu::Variant::ShaderF16, super::$name) } )* }
        mod subgroups { $( #[test] fn $name() { $crate::gpu::run_on($crate::gpu::Variant::Subgroups, super::$name) } )* }
        mod paged { $( #[test] fn $name() { $crate::gpu::run_on($crate::gpu::Variant::Paged, super::$name) } )* }
    };
}
