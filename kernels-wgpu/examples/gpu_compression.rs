//! ComPEFT on the GPU: what a user learns here is compressing a task vector held on the device
//! into the packed format (the same bytes the CPU and the reference write), and using the
//! packed tensor on the device without unpacking it ([`GpuTernary`]: GEMV, decode,
//! decompress-and-add).
//!
//! Run: `cargo run --release -p kernels-wgpu --example gpu_compression`

use kernels_wgpu::prelude::*;

fn normal(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let rng = kernels_wgpu::CounterRng::new(seed);
    (0..n as u64)
        .map(|i| rng.normal_at(i) as f32 * scale)
        .collect()
}

fn main() -> Result<()> {
    let ctx = Context::new_blocking(ContextOptions::default())?;
    let (rows, cols) = (1536, 576);
    let tau_host = normal(rows * cols, 1e-3, 2);
    let tau = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&tau_host, rows, cols)?)?;
    let shape = [rows as u64, cols as u64];
    let params = CompeftParams::default().with_keep(KeepRule::Density(0.1));
    let (decided, packed) = block_on(compeft(
        &ctx,
        &[(&tau, &shape[..])],
        params,
        TernaryLayout::SparseRice,
    ))?;
    let header = TernaryHeader::parse(&packed[0])?;
    println!(
        "ComPEFT at density 0.1: scale {:.3e}, {} bytes, {:.3} bits/param",
        decided.scale,
        packed[0].len(),
        header.bits_per_param()
    );
    // The reference's codes, packed with our scale, are the same bytes.
    let (_, codes) =
        kernels_wgpu::kernels_core::ops::ternary::compeft_ref(&[&tau_host[..]], params)?;
    let expect =
        kernels_wgpu::format::encode(&codes[0], &shape, decided.scale, TernaryLayout::SparseRice)?;
    assert_eq!(packed[0], expect, "the reference's bytes");

    // On the device, straight from the codes.
    let ternary = GpuTernary::upload(&ctx, &packed[0])?;
    let x = GpuTensor::from_slice(&ctx, &normal(cols, 1.0, 3))?;
    let mut y = GpuTensor::<f32>::zeros(&ctx, rows, 1)?;
    ternary_gemv(&ctx, &ternary, &x, &mut y)?;
    let mut theta = GpuTensor::<f32>::zeros(&ctx, rows, cols)?;
    ternary_add(&ctx, &mut theta, &ternary, 1.0)?;
    let restored = theta.to_vec_blocking(&ctx)?;
    let nonzero = restored.iter().filter(|&&v| v != 0.0).count();
    println!(
        "decompress-add onto zeros: {nonzero} entries of magnitude {:.3e}",
        decided.scale
    );
    Ok(())
}
