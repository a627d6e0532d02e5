//! Low rank on the CPU: what a user learns here is LoRA extraction from a fine-tuning delta (exact
//! and randomized), the OPCM continual-merging step against the merged task vector's SVD, and
//! the streaming SVD/PCA of rows that arrive in batches.
//!
//! Run: `cargo run --release -p kernels-cpu --example linear_algebra`

use kernels_cpu::prelude::*;

fn normal(n: usize, seed: u64) -> Vec<f32> {
    let rng = kernels_cpu::CounterRng::new(seed);
    (0..n as u64).map(|i| rng.normal_at(i) as f32).collect()
}

/// A `rows x cols` matrix of rank `rank` plus a little noise: what a LoRA fine-tune's delta is.
fn low_rank(rows: usize, cols: usize, rank: usize, seed: u64) -> Mat<f32> {
    let (b, a) = (normal(rows * rank, seed), normal(rank * cols, seed + 1));
    let noise = normal(rows * cols, seed + 2);
    let mut m = Mat::zeros(rows, cols).unwrap();
    for i in 0..rows {
        for j in 0..cols {
            let signal: f32 = (0..rank).map(|k| b[i * rank + k] * a[k * cols + j]).sum();
            *m.at_mut(i, j) = signal + 1e-3 * noise[i * cols + j];
        }
    }
    m
}

fn main() -> Result<()> {
    let cpu = Cpu::detect();
    let (rows, cols) = (512, 256);
    let delta = low_rank(rows, cols, 8, 1);

    // LoRA extraction: the smallest rank keeping 99.9 % of the energy, from the exact SVD.
    let lora = lora_extract(&cpu, delta.as_ref(), LoraRank::Energy(0.999))?;
    println!(
        "LoRA at 99.9% energy: rank {} (B {:?}, A {:?})",
        lora.b.cols(),
        lora.b.shape(),
        lora.a.shape()
    );
    assert_eq!(lora.b.cols(), 8);
    // The randomized SVD at a fixed rank, for matrices too large for the exact one.
    let params = RsvdParams::new(8).with_power_iterations(2);
    let fast = lora_extract_randomized(&cpu, delta.as_ref(), params)?;
    println!(
        "randomized: leading singular value {:.3} vs exact {:.3}",
        fast.singular_values[0], lora.singular_values[0]
    );

    // OPCM: project a new task vector away from the merged one's leading directions.
    let merged = thin_svd(&cpu, delta.as_ref())?;
    let tau = low_rank(rows, cols, 4, 5);
    let mut projected = Mat::zeros(rows, cols).unwrap();
    opcm_project(
        &cpu,
        merged.as_ref(),
        tau.as_ref(),
        OpcmParams::default(),
        projected.as_mut(),
    )?;
    let norm = |m: &Mat<f32>| {
        m.as_slice()
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    println!(
        "OPCM step: ||tau~|| / ||tau|| = {:.3}",
        norm(&projected) / norm(&tau)
    );

    // Streaming PCA over batches of 64 rows: only the rank-8 state is kept between batches.
    let mut pca = StreamingSvd::new(cols, 8, Centering::Mean)?;
    for batch in 0..rows / 64 {
        let change = pca.feed(&cpu, delta.as_ref().submatrix(batch * 64, 0, 64, cols)?)?;
        println!("  batch {batch}: subspace moved by {change:.2e}");
    }
    println!(
        "streaming PCA: {} components, leading value {:.3}",
        pca.finish()?.rows(),
        pca.singular_values()[0]
    );
    Ok(())
}
