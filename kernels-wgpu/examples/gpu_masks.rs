//! Task-vector masks on the GPU: what a user learns here is that DARE draws the CPU's mask bit for
//! bit (the counter-based generator runs in 32-bit integers in WGSL), and TIES trimming and
//! Breadcrumbs select exactly what the reference selects.
//!
//! Run: `cargo run --release -p kernels-wgpu --example gpu_masks`

use kernels_wgpu::prelude::*;

fn main() -> Result<()> {
    let ctx = Context::new_blocking(ContextOptions::default())?;
    let rng = kernels_wgpu::CounterRng::new(7);
    let host: Vec<f32> = (0..1_000_000u64)
        .map(|i| rng.normal_at(i) as f32 * 1e-3)
        .collect();
    let tau = GpuTensor::from_slice(&ctx, &host)?;
    let mut out = GpuTensor::<f32>::zeros(&ctx, host.len(), 1)?;

    let params = DareParams::default().with_drop(0.9).with_seed(42);
    block_on(dare(&ctx, &tau, params, 0, &mut out))?;
    let gpu = out.to_vec_blocking(&ctx)?;
    let mut expect = vec![0.0f32; host.len()];
    kernels_wgpu::kernels_core::ops::merge::dare_ref(&host, params, 0, &mut expect)?;
    let same_mask = gpu
        .iter()
        .zip(&expect)
        .all(|(g, e)| (*g == 0.0) == (*e == 0.0));
    println!(
        "DARE p = 0.9: kept {} entries, the reference's mask: {same_mask}",
        gpu.iter().filter(|&&v| v != 0.0).count()
    );
    assert!(same_mask);

    block_on(ties_trim(&ctx, &tau, KeepRule::Density(0.2), &mut out))?;
    let kept = out
        .to_vec_blocking(&ctx)?
        .iter()
        .filter(|&&v| v != 0.0)
        .count();
    println!("TIES trim to density 0.2: {kept} kept");

    let crumbs = BreadcrumbsParams::default()
        .with_density(0.8)
        .with_gamma(0.01);
    block_on(breadcrumbs(&ctx, &tau, crumbs, &mut out))?;
    let kept = out
        .to_vec_blocking(&ctx)?
        .iter()
        .filter(|&&v| v != 0.0)
        .count();
    println!("Breadcrumbs (0.8, 0.01): {kept} kept");
    Ok(())
}
