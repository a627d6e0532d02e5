//! Activation-sparse decoding on the GPU: what a user learns here is a decode loop that keeps its
//! tensors on the device: each token's input written in place ([`GpuTensor::write`], one host
//! copy), the CATS MLP recorded and submitted without a read-back, and the rows it read fetched
//! only when asked ([`MlpScratch::report`]). The threshold is calibrated on the device; the
//! result is checked against the CPU backend.
//!
//! Run: `cargo run --release -p kernels-wgpu --example gpu_sparse_inference` (any GPU, or Mesa's
//! lavapipe: `apt-get install mesa-vulkan-drivers`).

use std::time::Instant;

use kernels_wgpu::prelude::*;

fn normal(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let rng = kernels_wgpu::CounterRng::new(seed);
    (0..n as u64)
        .map(|i| rng.normal_at(i) as f32 * scale)
        .collect()
}

fn main() -> Result<()> {
    let ctx = Context::new_blocking(ContextOptions::default())?;
    println!("GPU: {} ({:?})", ctx.adapter_info().name, ctx.features());
    let (hidden, inter) = (576, 1536);
    let scale = 1.0 / (hidden as f32).sqrt();
    let host: Vec<Vec<f16>> = (1..=3)
        .map(|seed| {
            normal(inter * hidden, scale, seed)
                .into_iter()
                .map(f16::from_f32)
                .collect()
        })
        .collect();
    let [gate, up, down_t] = [0, 1, 2]
        .map(|p| GpuTensor::from_matrix(&ctx, MatRef::from_slice(&host[p], inter, hidden)?));
    let (gate, up, down_t) = (gate?, up?, down_t?);
    let weights = CatsMlpWeights {
        gate: &gate,
        up: &up,
        down_t: &down_t,
    };

    // Calibrate on the device: the gate activations of 16 tokens, the 50 % quantile of |a|.
    let mut x = GpuTensor::<f32>::zeros(&ctx, 1, hidden)?;
    let mut g = GpuTensor::<f32>::zeros(&ctx, inter, 1)?;
    let mut activations = Vec::new();
    for t in 0..16 {
        x.write(&ctx, &normal(hidden, 1.0, 100 + t))?;
        gemv(&ctx, &gate, &x, &mut g)?;
        let a: Vec<f32> = g
            .to_vec_blocking(&ctx)?
            .iter()
            .map(|&g| g / (1.0 + (-g).exp()))
            .collect();
        activations.push(GpuTensor::from_slice(&ctx, &a)?);
    }
    let samples: Vec<&GpuTensor<f32>> = activations.iter().collect();
    let threshold = block_on(calibrate_threshold(&ctx, &samples, 0.5))?;
    println!("CATS threshold for 50% sparsity: t = {threshold:.5}");

    // The decode loop: write, record, submit; nothing comes back until the end.
    let mut y = GpuTensor::<f32>::zeros(&ctx, 1, hidden)?;
    let mut scratch = MlpScratch::new();
    let tokens: Vec<Vec<f32>> = (0..32).map(|t| normal(hidden, 1.0, 200 + t)).collect();
    let started = Instant::now();
    for token in &tokens {
        x.write(&ctx, token)?;
        cats_mlp(&ctx, &x, weights, threshold, &mut y, &mut scratch)?;
    }
    block_on(ctx.finish())?;
    println!(
        "CATS MLP: {:?} per token",
        started.elapsed() / tokens.len() as u32
    );
    let report = block_on(scratch.report(&ctx))?;
    println!(
        "the last token read {} of {inter} rows of W_up and W_down ({:.1}% skipped)",
        report.active.len(),
        100.0 * report.sparsity()
    );

    // The same last token on the CPU backend's reference.
    let last = tokens.last().map_or(&[][..], Vec::as_slice);
    let mut expect = vec![0.0f32; hidden];
    let cpu_weights = CatsMlpWeights {
        gate: MatRef::from_slice(&host[0], inter, hidden)?,
        up: MatRef::from_slice(&host[1], inter, hidden)?,
        down_t: MatRef::from_slice(&host[2], inter, hidden)?,
    };
    kernels_wgpu::kernels_core::ops::sparse::cats_mlp_ref(
        MatRef::from_slice(last, 1, hidden)?,
        cpu_weights,
        threshold,
        MatMut::from_slice(&mut expect, 1, hidden)?,
    )?;
    let got = y.to_vec_blocking(&ctx)?;
    let worst = got
        .iter()
        .zip(&expect)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("worst difference from the f64 reference: {worst:.2e}");
    assert!(worst < 1e-3);
    Ok(())
}
