//! ComPEFT compression of a task vector on the CPU: what a user learns here is the streaming
//! workflow over a model read tensor by tensor ([`Compeft`] in the [`MultiPass`] protocol, then a
//! [`CompeftEncoder`]), the packed format's size against its entropy bound, and how to use the
//! packed tensors without unpacking them ([`PackedTernary`], [`ternary_gemv`], [`ternary_add`]).
//!
//! Run: `cargo run --release -p kernels-cpu --example compression`

use kernels_cpu::format::{self, entropy_bits_per_param};
use kernels_cpu::prelude::*;

fn normal(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let rng = kernels_cpu::CounterRng::new(seed);
    (0..n as u64)
        .map(|i| rng.normal_at(i) as f32 * scale)
        .collect()
}

fn main() -> Result<()> {
    let cpu = Cpu::detect();
    // A fine-tuned layer and its base: the task vector is their difference.
    let (rows, cols) = (1536, 576);
    let base = normal(rows * cols, 0.05, 1);
    let tuned: Vec<f32> = base
        .iter()
        .zip(normal(rows * cols, 1e-3, 2))
        .map(|(b, d)| b + d)
        .collect();
    let tau: Vec<f32> = tuned.iter().zip(&base).map(|(t, b)| t - b).collect();
    let tensors = [&tau[..rows * cols / 2], &tau[rows * cols / 2..]];

    // Decide (two passes over the whole model), then code each tensor in the same order.
    let params = CompeftParams::default().with_keep(KeepRule::Density(0.1));
    let decided = Compeft::new(params)?.run(|| tensors, |c, t| c.feed(&cpu, t))?;
    let mut encoder = CompeftEncoder::new(&decided);
    let half = [rows as u64 / 2, cols as u64];
    let packed: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| encoder.encode(&cpu, t, &half, TernaryLayout::SparseRice))
        .collect::<Result<_>>()?;
    let header = format::TernaryHeader::parse(&packed[0])?;
    let density = header.nnz as f64 / header.numel as f64;
    println!(
        "ComPEFT at density 0.1: scale {:.3e}, {:.3} bits/param (entropy bound {:.3}; f32 is 32)",
        decided.scale,
        header.bits_per_param(),
        entropy_bits_per_param(density)
    );

    // The one-call form gives the same bytes.
    let one_call = compeft(
        &cpu,
        &[(tensors[0], &half[..])],
        params,
        TernaryLayout::SparseRice,
    );
    println!(
        "one call over the first half alone: {} bytes",
        one_call?.1[0].len()
    );

    // Use the packed tensor as it is: a GEMV, and decompress-and-add onto the base.
    let first = PackedTernary::new(&cpu, &packed[0])?;
    let x = normal(cols, 1.0, 3);
    let mut y = vec![0.0f32; rows / 2];
    ternary_gemv(&cpu, &first, &x, &mut y)?;
    let mut restored = base[..rows * cols / 2].to_vec();
    ternary_add(&cpu, &mut restored, &first, 1.0)?;
    let error: f64 = restored
        .iter()
        .zip(&tuned)
        .map(|(r, t)| f64::from(r - t).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = tensors[0]
        .iter()
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt();
    println!(
        "restored half-layer: relative error {:.3} of the task vector",
        error / norm
    );
    assert!(error < norm, "the ternary task vector points the right way");
    Ok(())
}
