//! Model merging on the CPU: what a user learns here is the merge family streamed tensor by
//! tensor (every reduction is element-wise, so a frontend never holds a whole model): a soup,
//! task arithmetic, TIES in one call, and normalised Fisher merging, whose per-model norms come
//! from [`sum_squares`] summed over every tensor of each model's Fisher first.
//!
//! Run: `cargo run --release -p kernels-cpu --example merging`

use kernels_cpu::prelude::*;

fn normal(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let rng = kernels_cpu::CounterRng::new(seed);
    (0..n as u64)
        .map(|i| rng.normal_at(i) as f32 * scale)
        .collect()
}

fn main() -> Result<()> {
    let cpu = Cpu::detect();
    let n = 1 << 20;
    let base = normal(n, 0.05, 1);
    let models: Vec<Vec<f32>> = (0..3)
        .map(|m| {
            base.iter()
                .zip(normal(n, 1e-3, 10 + m))
                .map(|(b, d)| b + d)
                .collect()
        })
        .collect();
    let thetas: Vec<&[f32]> = models.iter().map(Vec::as_slice).collect();
    let taus: Vec<Vec<f32>> = models
        .iter()
        .map(|m| m.iter().zip(&base).map(|(t, b)| t - b).collect())
        .collect();
    let taus: Vec<&[f32]> = taus.iter().map(Vec::as_slice).collect();
    let weights = [1.0, 1.0, 1.0];

    // A uniform soup, written straight in bf16 (the f32 result rounded once).
    let mut soup = vec![bf16::ZERO; n];
    weighted_mean(&cpu, &thetas, &weights, &mut soup)?;
    // Task arithmetic at lambda 0.4.
    let mut arithmetic = vec![0.0f32; n];
    task_arithmetic(&cpu, &base, &taus, &weights, 0.4, &mut arithmetic)?;
    // TIES: trim each task vector to its top 20 %, elect signs, take the disjoint mean.
    let mut ties_merged = vec![0.0f32; n];
    let params = TiesParams::default().with_keep(KeepRule::Density(0.2));
    ties(&cpu, &base, &taus, &weights, params, &mut ties_merged)?;
    // Fisher merging, normalised per model by ||F_i||: the norms first, over whole models.
    let fishers: Vec<Vec<f32>> = (0..3).map(|m| normal(n, 1.0, 20 + m)).collect();
    let fishers: Vec<Vec<f32>> = fishers
        .iter()
        .map(|f| f.iter().map(|g| g * g).collect())
        .collect();
    let fisher_views: Vec<&[f32]> = fishers.iter().map(Vec::as_slice).collect();
    let norms = fisher_views
        .iter()
        .map(|f| sum_squares(&cpu, f))
        .collect::<Result<Vec<f64>>>()?;
    let fisher = FisherParams::default()
        .with_floor(1e-8)
        .with_normalization(&norms);
    let mut fisher_merged = vec![0.0f32; n];
    fisher_merge(
        &cpu,
        &thetas,
        &fisher_views,
        &weights,
        fisher,
        &mut fisher_merged,
    )?;

    let distance = |a: &[f32]| -> f64 {
        a.iter()
            .zip(&base)
            .map(|(x, b)| f64::from(x - b).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let soup32: Vec<f32> = soup.iter().map(|v| v.to_f32()).collect();
    println!("distance from the base: soup {:.4}", distance(&soup32));
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
