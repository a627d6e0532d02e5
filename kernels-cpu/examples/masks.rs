//! Task-vector masks on the CPU: what a user learns here is DARE's chunk-independence (the mask
//! is a function of the seed and the flat index, so any chunking or thread count draws the same
//! one), TIES trimming into the model's own element type, and Model Breadcrumbs' two tails.
//!
//! Run: `cargo run --release -p kernels-cpu --example masks`

use kernels_cpu::prelude::*;

fn main() -> Result<()> {
    let cpu = Cpu::detect();
    let rng = kernels_cpu::CounterRng::new(7);
    let tau: Vec<bf16> = (0..1_000_000u64)
        .map(|i| bf16::from_f32(rng.normal_at(i) as f32 * 1e-3))
        .collect();

    // DARE: drop 90 %, rescale the survivors by 10. Two chunks draw what one call draws.
    let params = DareParams::default().with_drop(0.9).with_seed(42);
    let mut whole = vec![0.0f32; tau.len()];
    dare(&cpu, &tau, params, 0, &mut whole)?;
    let mut chunked = vec![0.0f32; tau.len()];
    let (a, b) = chunked.split_at_mut(333_333);
    dare(&cpu, &tau[..333_333], params, 0, a)?;
    dare(&cpu, &tau[333_333..], params, 333_333, b)?;
    assert_eq!(whole, chunked);
    let kept = whole.iter().filter(|&&v| v != 0.0).count();
    println!(
        "DARE p = 0.9: kept {kept} of {} (the same mask in chunks)",
        tau.len()
    );

    // TIES trim: keep the top 20 % by magnitude, written in bf16 like the model.
    let mut trimmed = vec![bf16::ZERO; tau.len()];
    ties_trim(&cpu, &tau, KeepRule::Density(0.2), &mut trimmed)?;
    let kept = trimmed.iter().filter(|v| v.to_f32() != 0.0).count();
    println!("TIES trim to density 0.2: {kept} entries kept");

    // Breadcrumbs: drop the top 1 % (outliers) and keep the next 80 %.
    let crumbs = BreadcrumbsParams::default()
        .with_density(0.8)
        .with_gamma(0.01);
    let mut out = vec![0.0f32; tau.len()];
    breadcrumbs(&cpu, &tau, crumbs, &mut out)?;
    let largest = tau.iter().map(|v| v.to_f32().abs()).fold(0.0, f32::max);
    assert!(
        out.iter().all(|v| v.abs() < largest),
        "the largest magnitude is an outlier"
    );
    println!(
        "Breadcrumbs (0.8, 0.01): {} entries kept",
        out.iter().filter(|&&v| v != 0.0).count()
    );
    Ok(())
}
