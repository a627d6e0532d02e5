//! Exact magnitude selection over a whole model on the CPU: what a user learns here is how to say
//! "how many" ([`KeepRule`]: a count, a density or a threshold) and the three ways to select:
//!
//! * in memory, over many tensors taken as one vector: [`topk_cut`], then apply the cut tensor by
//!   tensor with a [`TopKApplier`] (ties go to the lower flat index across tensors);
//! * streamed, for models too big to hold: [`StreamingTopK`] in the [`MultiPass`] protocol;
//! * per tensor: [`topk_mask`] (bits), [`topk_keep`] (values), [`topk_indices`].
//!
//! Run: `cargo run --release -p kernels-cpu --example selection`

use kernels_cpu::prelude::*;

fn normal(n: usize, seed: u64) -> Vec<f32> {
    let rng = kernels_cpu::CounterRng::new(seed);
    (0..n as u64).map(|i| rng.normal_at(i) as f32).collect()
}

fn main() -> Result<()> {
    let cpu = Cpu::detect();
    // A "model" of three tensors of different sizes.
    let model: Vec<Vec<f32>> = [100_000, 37, 250_003]
        .iter()
        .enumerate()
        .map(|(i, &n)| normal(n, i as u64))
        .collect();
    let tensors: Vec<&[f32]> = model.iter().map(Vec::as_slice).collect();
    let n: usize = tensors.iter().map(|t| t.len()).sum();

    // The global top 10 % of the whole model.
    let keep = KeepRule::Density(0.1);
    let cut = topk_cut(&cpu, &tensors, keep)?;
    println!(
        "top 10% of {n} entries: keep |x| > {:.4}, plus {} ties",
        cut.magnitude, cut.ties
    );

    // The same cut, streamed: feed every tensor, pass after pass, until the protocol says done.
    let streamed = StreamingTopK::new(keep)?.run(|| tensors.iter(), |s, t| s.feed(&cpu, t))?;
    assert_eq!(
        streamed, cut,
        "streaming selects exactly what the in-memory selection does"
    );

    // Apply the cut tensor by tensor, in flat order.
    let mut applier = TopKApplier::new(&cut);
    let mut kept = 0;
    for t in &tensors {
        let mut out = vec![0.0f32; t.len()];
        applier.keep(&cpu, t, &mut out)?;
        kept += out.iter().filter(|&&v| v != 0.0).count();
    }
    println!("kept {kept} entries across the tensors");
    assert_eq!(
        kept as u64,
        KeepRule::Density(0.1).count(n as u64)?.unwrap_or(0)
    );

    // Per tensor: bits, values, indices; and the k-th largest magnitude.
    let first = tensors[0];
    let mut mask = vec![0u64; first.len().div_ceil(64)];
    topk_mask(&cpu, first, KeepRule::Count(5), &mut mask)?;
    let mut indices = Vec::new();
    topk_indices(&cpu, &[first], KeepRule::Count(5), &mut indices)?;
    println!("the 5 largest magnitudes of the first tensor sit at {indices:?}");
    let fifth = kth_largest_magnitude(&cpu, &[first], 5)?;
    assert!(indices.iter().all(|&i| first[i as usize].abs() >= fifth));
    // A threshold rule needs no selection pass: keep everything above 3 sigma.
    let mut outliers = vec![0.0f32; first.len()];
    topk_keep(&cpu, first, KeepRule::Threshold(3.0), &mut outliers)?;
    println!(
        "{} entries of the first tensor lie beyond 3 sigma",
        outliers.iter().filter(|&&v| v != 0.0).count()
    );
    Ok(())
}
