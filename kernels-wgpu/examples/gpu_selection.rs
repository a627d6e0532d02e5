//! Exact magnitude selection on the GPU: what a user learns here is a global top-k over a whole
//! model held on the device ([`topk_cut`] over many tensors, `async` because the radix select
//! reads its histograms back), applied tensor by tensor with a [`TopKApplier`], and the same cut
//! as the reference's, bit for bit.
//!
//! Run: `cargo run --release -p kernels-wgpu --example gpu_selection`

use kernels_wgpu::prelude::*;

fn normal(n: usize, seed: u64) -> Vec<f32> {
    let rng = kernels_wgpu::CounterRng::new(seed);
    (0..n as u64).map(|i| rng.normal_at(i) as f32).collect()
}

fn main() -> Result<()> {
    let ctx = Context::new_blocking(ContextOptions::default())?;
    let host: Vec<Vec<f32>> = [100_000, 37, 250_003]
        .iter()
        .enumerate()
        .map(|(i, &n)| normal(n, i as u64))
        .collect();
    let tensors: Vec<GpuTensor<f32>> = host
        .iter()
        .map(|t| GpuTensor::from_slice(&ctx, t))
        .collect::<Result<_>>()?;
    let views: Vec<&GpuTensor<f32>> = tensors.iter().collect();

    let keep = KeepRule::Density(0.1);
    let cut = block_on(topk_cut(&ctx, &views, keep))?;
    println!(
        "top 10%: keep |x| > {:.4}, plus {} ties",
        cut.magnitude, cut.ties
    );
    let host_views: Vec<&[f32]> = host.iter().map(Vec::as_slice).collect();
    let reference = kernels_wgpu::kernels_core::ops::select::topk_cut_ref(&host_views, keep)?;
    assert_eq!(cut, reference, "bit-identical to the reference");

    let mut applier = TopKApplier::new(&cut);
    let mut kept = 0;
    for t in &views {
        let mut out = GpuTensor::<f32>::zeros(&ctx, t.rows(), t.cols())?;
        block_on(applier.keep(&ctx, t, &mut out))?;
        kept += out
            .to_vec_blocking(&ctx)?
            .iter()
            .filter(|&&v| v != 0.0)
            .count();
    }
    println!("kept {kept} entries across the tensors");
    let fifth = block_on(kth_largest_magnitude(&ctx, &views[..1], 5))?;
    println!("the 5th largest magnitude of the first tensor: {fifth:.4}");
    Ok(())
}
