//! Low rank on the GPU: what a user learns here is that a LoRA pair comes out of a task vector
//! without leaving the device until the small factors download, that the randomized SVD's error is
//! close to the best a rank can do, and that the OPCM step and the projections run as GEMMs there.
//!
//! Run: `cargo run --release -p kernels-wgpu --example gpu_low_rank`

use kernels_wgpu::kernels_core::ops::lowrank::thin_svd_ref;
use kernels_wgpu::prelude::*;

fn main() -> Result<()> {
    let ctx = Context::new_blocking(ContextOptions::default())?;
    // A task vector with a decaying spectrum: sum_i 0.7^i u_i v_i^T plus a little noise.
    let (m, n) = (384, 256);
    let rng = kernels_wgpu::CounterRng::new(3);
    let delta = Mat::from_fn(m, n, |i, j| {
        let low_rank: f64 = (0..12)
            .map(|r| {
                let (a, b) = (
                    rng.normal_at((r * m + i) as u64),
                    rng.normal_at((10_000 + r * n + j) as u64),
                );
                0.7f64.powi(r as i32) * a * b
            })
            .sum();
        (low_rank + 1e-3 * rng.normal_at((100_000 + i * n + j) as u64)) as f32
    })?;
    let gpu = GpuTensor::from_matrix(&ctx, delta.as_ref())?;

    let rank = 8;
    let lora = block_on(lora_extract_randomized(&ctx, &gpu, RsvdParams::new(rank)))?;
    let wide = Mat::widen(delta.as_ref());
    let approx = Mat::widen(lora.b.as_ref()).matmul(&Mat::widen(lora.a.as_ref()))?;
    let error = approx.distance(&wide)? / wide.frobenius_norm();
    let exact = thin_svd_ref(delta.as_ref())?;
    let optimal =
        (exact.s[rank..].iter().map(|s| s * s).sum::<f64>()).sqrt() / wide.frobenius_norm();
    println!(
        "LoRA rank {rank}: B {:?}, A {:?}; relative error {error:.5} (best possible {optimal:.5})",
        lora.b.shape(),
        lora.a.shape()
    );
    assert!(
        error <= 1.1 * optimal + 1e-4,
        "the randomized SVD is near optimal"
    );

    // What of delta lies outside the LoRA's column space: a projection on the device.
    let svd = block_on(randomized_svd(&ctx, &gpu, RsvdParams::new(rank)))?;
    let basis = GpuTensor::from_matrix(&ctx, svd.u.as_ref())?;
    let mut rest = GpuTensor::<f32>::zeros(&ctx, m, n)?;
    project_out(&ctx, &basis, &gpu, &mut rest)?;
    let rest = rest.to_vec_blocking(&ctx)?;
    let rest_norm = rest
        .iter()
        .map(|&v| f64::from(v).powi(2))
        .sum::<f64>()
        .sqrt()
        / wide.frobenius_norm();
    println!("outside the rank-{rank} basis: {rest_norm:.5} of the task vector");
    assert!((rest_norm - error).abs() < 1e-3);

    // OPCM: a second task vector, projected away from the merged one's leading directions.
    let u = GpuTensor::from_matrix(&ctx, svd.u.as_ref())?;
    let v = GpuTensor::from_matrix(&ctx, svd.v.as_ref())?;
    let tau = GpuTensor::from_matrix(
        &ctx,
        Mat::from_fn(m, n, |i, j| {
            rng.normal_at((500_000 + i * n + j) as u64) as f32
        })?
        .as_ref(),
    )?;
    let mut projected = GpuTensor::<f32>::zeros(&ctx, m, n)?;
    let merged = GpuSvdRef {
        u: &u,
        s: &svd.s,
        v: &v,
    };
    opcm_project(&ctx, merged, &tau, OpcmParams::default(), &mut projected)?;
    // U^T out V has a zero diagonal: the new task vector no longer moves the merged directions.
    let mut shared = GpuTensor::<f32>::zeros(&ctx, rank, n)?;
    gemm(
        &ctx,
        1.0,
        &u,
        Transpose::Yes,
        &projected,
        Transpose::No,
        0.0,
        &mut shared,
    )?;
    let mut core = GpuTensor::<f32>::zeros(&ctx, rank, rank)?;
    gemm(
        &ctx,
        1.0,
        &shared,
        Transpose::No,
        &v,
        Transpose::No,
        0.0,
        &mut core,
    )?;
    let core = core.to_vec_blocking(&ctx)?;
    let diagonal = (0..rank)
        .map(|i| core[i * rank + i].abs())
        .fold(0.0f32, f32::max);
    println!("OPCM: largest |u_i^T out v_i| = {diagonal:.2e}");
    assert!(diagonal < 1e-3);

    // Householder QR of a tall block on the device.
    let qr = block_on(householder_qr(&ctx, &basis))?;
    println!(
        "QR of the (orthonormal) basis: R's diagonal {:?}",
        (0..rank).map(|i| qr.r.at(i, i)).collect::<Vec<_>>()
    );
    Ok(())
}
