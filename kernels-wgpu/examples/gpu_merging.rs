//! Model merging on the GPU: what a user learns here is the merge family on device tensors (every
//! reduction element-wise, any number of models): a soup, task arithmetic, TIES in one call and
//! normalised Fisher merging, with the per-model norms from [`sum_squares`] on the device.
//!
//! Run: `cargo run --release -p kernels-wgpu --example gpu_merging`

use kernels_wgpu::prelude::*;

fn normal(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let rng = kernels_wgpu::CounterRng::new(seed);
    (0..n as u64)
        .map(|i| rng.normal_at(i) as f32 * scale)
        .collect()
}

fn main() -> Result<()> {
    let ctx = Context::new_blocking(ContextOptions::default())?;
    let n = 1 << 20;
    let upload = |v: &[f32]| GpuTensor::from_slice(&ctx, v);
    let base_host = normal(n, 0.05, 1);
    let base = upload(&base_host)?;
    let taus: Vec<GpuTensor<f32>> = (0..3)
        .map(|m| upload(&normal(n, 1e-3, 10 + m)))
        .collect::<Result<_>>()?;
    let taus: Vec<&GpuTensor<f32>> = taus.iter().collect();
    let weights = [1.0, 1.0, 1.0];
    let mut out = GpuTensor::<f32>::zeros(&ctx, n, 1)?;

    task_arithmetic(&ctx, &base, &taus, &weights, 0.4, &mut out)?;
    let arithmetic = out.to_vec_blocking(&ctx)?;
    let params = TiesParams::default().with_keep(KeepRule::Density(0.2));
    block_on(ties(&ctx, &base, &taus, &weights, params, &mut out))?;
    let ties_merged = out.to_vec_blocking(&ctx)?;
    // Soups and Fisher merging average whole models.
    let models: Vec<GpuTensor<f32>> = (0..3)
        .map(|m| {
            upload(
                &normal(n, 1e-3, 10 + m)
                    .iter()
                    .zip(&base_host)
                    .map(|(d, b)| b + d)
                    .collect::<Vec<_>>(),
            )
        })
        .collect::<Result<_>>()?;
    let models: Vec<&GpuTensor<f32>> = models.iter().collect();
    weighted_mean(&ctx, &models, &weights, &mut out)?;
    let soup = out.to_vec_blocking(&ctx)?;
    let fishers: Vec<GpuTensor<f32>> = (0..3)
        .map(|m| {
            upload(
                &normal(n, 1.0, 20 + m)
                    .iter()
                    .map(|g| g * g)
                    .collect::<Vec<_>>(),
            )
        })
        .collect::<Result<_>>()?;
    let fishers: Vec<&GpuTensor<f32>> = fishers.iter().collect();
    let norms: Vec<f64> = fishers
        .iter()
        .map(|f| block_on(sum_squares(&ctx, f)))
        .collect::<Result<_>>()?;
    let fisher = FisherParams::default()
        .with_floor(1e-8)
        .with_normalization(&norms);
    fisher_merge(&ctx, &models, &fishers, &weights, fisher, &mut out)?;
    let fisher_merged = out.to_vec_blocking(&ctx)?;

    let distance = |a: &[f32]| -> f64 {
        a.iter()
            .zip(&base_host)
            .map(|(x, b)| f64::from(x - b).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    println!("distance from the base: soup {:.4}", distance(&soup));
    println!(
        "                        task arithmetic {:.4}",
        distance(&arithmetic)
    );
    println!("                        TIES {:.4}", distance(&ties_merged));
    println!(
        "                        Fisher {:.4}",
        distance(&fisher_merged)
    );
    Ok(())
}
