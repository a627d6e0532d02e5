//! The page's demos as plain async Rust over either backend, each checked against the
//! `kernels-core` reference with the running backend's documented tolerance: what the page shows
//! as "matches the reference" is computed here, and the host tests run the same code.

use kernels_core::format::{self, TernaryLayout};
use kernels_core::ops::interpolate::linear_combination_ref;
use kernels_core::ops::lowrank::{RsvdParams, factorisation_tolerance, randomized_svd_ref};
use kernels_core::ops::merge::{DareParams, TiesParams, dare_ref, task_arithmetic_ref, ties_ref};
use kernels_core::ops::select::KeepRule;
use kernels_core::ops::sparse::sparse_input_gemv_ref;
use kernels_core::ops::ternary::CompeftParams;
use kernels_core::{CounterRng, Error, MatRef, Result};
use kernels_cpu::Cpu;
use kernels_wgpu::{Context, GpuTensor, f16};

use crate::models::{Model, Tensor};

/// Where the demos run.
pub enum Backend {
    /// WebGPU (or any wgpu adapter on native); boxed, for the context is large.
    Gpu(Box<Context>),
    /// The CPU kernels (simd128 in the browser).
    Cpu(Cpu),
}

impl Backend {
    /// A name for the page: the adapter, or the CPU's instruction set.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::Gpu(ctx) => {
                let info = ctx.adapter_info();
                // Browsers hide the adapter's name unless asked; say what is known.
                let name = if info.name.is_empty() {
                    "a WebGPU adapter"
                } else {
                    &info.name
                };
                let features = ctx.features();
                let yes_no = |on: bool| if on { "yes" } else { "no" };
                format!(
                    "GPU: {name} ({:?}; shader-f16: {}, subgroups: {})",
                    info.backend,
                    yes_no(features.shader_f16),
                    yes_no(features.subgroups)
                )
            }
            Self::Cpu(cpu) => format!("CPU: {:?}", cpu.isa()),
        }
    }

    /// Waits until the device has run what was submitted (nothing to wait for on the CPU).
    async fn finish(&self) -> Result<()> {
        match self {
            Self::Gpu(ctx) => ctx.finish().await,
            Self::Cpu(_) => Ok(()),
        }
    }

    fn reduction_tolerance(&self, terms: usize, abs_sum: f64) -> f64 {
        match self {
            Self::Gpu(_) => kernels_wgpu::merge::reduction_tolerance(terms, abs_sum),
            Self::Cpu(_) => kernels_cpu::merge::reduction_tolerance(terms, abs_sum),
        }
    }
}

/// How a worst element compares with its bound: `worst_ratio <= 1` passes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Check {
    /// The largest `|got - reference| / bound` over the elements.
    pub worst_ratio: f64,
    /// The largest `|got - reference|`.
    pub max_difference: f64,
}

impl Check {
    pub(crate) fn add(&mut self, got: f32, reference: f64, bound: f64) {
        let difference = (f64::from(got) - reference).abs();
        self.max_difference = self.max_difference.max(difference);
        let ratio = if difference == 0.0 {
            0.0
        } else {
            difference / bound
        };
        // NaN (a wrong answer) must not pass.
        self.worst_ratio = if ratio.is_nan() {
            f64::INFINITY
        } else {
            self.worst_ratio.max(ratio)
        };
    }

    /// Whether every element was within its bound.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.worst_ratio <= 1.0
    }
}

/// The merge methods the page offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `base + lambda sum tau_i`.
    TaskArithmetic,
    /// TIES: trim each task vector to its top `density`, elect signs, mean of the agreeing.
    Ties,
    /// DARE: drop each entry with probability `drop`, rescale the survivors, then add.
    Dare,
    /// Fisher merging: the fine-tunes averaged weighted by their diagonal Fisher information
    /// (the base is not used).
    Fisher,
}

impl Method {
    /// The method of a name (`task_arithmetic`, `ties`, `dare`).
    ///
    /// # Errors
    ///
    /// A message naming the methods the page knows.
    pub fn parse(name: &str) -> core::result::Result<Self, String> {
        match name {
            "task_arithmetic" => Ok(Self::TaskArithmetic),
            "ties" => Ok(Self::Ties),
            "dare" => Ok(Self::Dare),
            "fisher" => Ok(Self::Fisher),
            other => Err(format!(
                "unknown merge method '{other}': the page offers task_arithmetic, ties, dare and \
                 fisher"
            )),
        }
    }
}

/// A merge's knobs.
#[derive(Clone, Copy, Debug)]
pub struct MergeKnobs {
    /// The method.
    pub method: Method,
    /// The task vectors' scale.
    pub lambda: f32,
    /// TIES: the fraction of each task vector kept.
    pub density: f64,
    /// DARE: the drop probability.
    pub drop: f64,
    /// DARE: the seed (model `i` draws with `seed + i`).
    pub seed: u64,
}

/// Task vectors `tuned - base` of one tensor, rounded once from `f64` (the reference's rounding,
/// computed on the host so the backend and the reference see the same inputs).
fn task_vectors(base: &Tensor, tuned: &[&Tensor]) -> Result<Vec<Vec<f32>>> {
    tuned
        .iter()
        .map(|t| {
            let mut tau = vec![0.0f32; base.values.len()];
            linear_combination_ref(&[&t.values[..], &base.values[..]], &[1.0, -1.0], &mut tau)?;
            Ok(tau)
        })
        .collect()
}

/// One tensor of the fine-tunes merged by Fisher merging on `backend` (`fishers[i]` the diagonal
/// Fisher information of `tuned[i]`), and how it compares with the reference.
///
/// # Errors
///
/// The backend's error (a negative or non-finite Fisher entry, a tensor the device cannot hold).
pub async fn fisher_tensor(
    backend: &Backend,
    tuned: &[&Tensor],
    fishers: &[&Tensor],
) -> Result<(Vec<f32>, Check)> {
    let n = tuned[0].values.len();
    let weights = vec![1.0f32; tuned.len()];
    let params = kernels_core::ops::merge::FisherParams::default();
    let thetas: Vec<&[f32]> = tuned.iter().map(|t| &t.values[..]).collect();
    let fisher_values: Vec<&[f32]> = fishers.iter().map(|f| &f.values[..]).collect();
    let mut reference = vec![0.0f32; n];
    kernels_core::ops::merge::fisher_merge_ref(
        &thetas,
        &fisher_values,
        &weights,
        params,
        &mut reference,
    )?;
    let merged = match backend {
        Backend::Gpu(ctx) => {
            let [rows, cols] = tuned[0].matrix_shape();
            let upload =
                |v: &[f32]| GpuTensor::from_matrix(ctx, MatRef::from_slice(v, rows, cols)?);
            let thetas_gpu = thetas
                .iter()
                .map(|t| upload(t))
                .collect::<Result<Vec<_>>>()?;
            let fishers_gpu = fisher_values
                .iter()
                .map(|f| upload(f))
                .collect::<Result<Vec<_>>>()?;
            let mut out = GpuTensor::zeros(ctx, rows, cols)?;
            kernels_wgpu::merge::fisher_merge(
                ctx,
                &thetas_gpu.iter().collect::<Vec<_>>(),
                &fishers_gpu.iter().collect::<Vec<_>>(),
                &weights,
                params,
                &mut out,
            )?;
            out.to_vec(ctx).await?
        }
        Backend::Cpu(cpu) => {
            let mut out = vec![0.0f32; n];
            kernels_cpu::merge::fisher_merge(
                cpu,
                &thetas,
                &fisher_values,
                &weights,
                params,
                &mut out,
            )?;
            out
        }
    };
    let mut check = Check::default();
    for (j, (&got, &expect)) in merged.iter().zip(&reference).enumerate() {
        // The merged value is a convex combination: no term exceeds the largest |theta|.
        let largest = thetas
            .iter()
            .map(|t| f64::from(t[j].abs()))
            .fold(0.0, f64::max);
        let bound = backend.reduction_tolerance(2 * thetas.len(), thetas.len() as f64 * largest);
        check.add(
            got,
            f64::from(expect),
            bound.max(f64::from(f32::MIN_POSITIVE)),
        );
    }
    Ok((merged, check))
}

/// One tensor merged on `backend` (`first_index`: the tensor's offset in the model, DARE's
/// counter), and how it compares with the reference.
///
/// # Errors
///
/// The backend's error (a parameter out of range, a tensor the device cannot hold).
pub async fn merge_tensor(
    backend: &Backend,
    base: &Tensor,
    tuned: &[&Tensor],
    knobs: MergeKnobs,
    first_index: u64,
) -> Result<(Vec<f32>, Check)> {
    let mut taus = task_vectors(base, tuned)?;
    let n = base.values.len();
    let dare_params = |i: usize| {
        DareParams::default()
            .with_drop(knobs.drop)
            .with_seed(knobs.seed + i as u64)
    };
    let ties_params = TiesParams::default()
        .with_keep(KeepRule::Density(knobs.density))
        .with_lambda(knobs.lambda);
    let weights = vec![1.0f32; taus.len()];
    // The reference, on the same task vectors.
    let mut reference = vec![0.0f32; n];
    let mut reference_taus = taus.clone();
    if knobs.method == Method::Dare {
        for (i, tau) in reference_taus.iter_mut().enumerate() {
            let mut dropped = vec![0.0f32; n];
            dare_ref(tau, dare_params(i), first_index, &mut dropped)?;
            *tau = dropped;
        }
    }
    let views: Vec<&[f32]> = reference_taus.iter().map(|t| &t[..]).collect();
    match knobs.method {
        Method::Ties => ties_ref(&base.values, &views, &weights, ties_params, &mut reference)?,
        _ => task_arithmetic_ref(&base.values, &views, &weights, knobs.lambda, &mut reference)?,
    }
    let merged = match backend {
        Backend::Gpu(ctx) => {
            let [rows, cols] = base.matrix_shape();
            let upload =
                |v: &[f32]| GpuTensor::from_matrix(ctx, MatRef::from_slice(v, rows, cols)?);
            let base_gpu = upload(&base.values)?;
            let mut taus_gpu = taus.iter().map(|t| upload(t)).collect::<Result<Vec<_>>>()?;
            if knobs.method == Method::Dare {
                for (i, tau) in taus_gpu.iter_mut().enumerate() {
                    let mut dropped = GpuTensor::zeros(ctx, rows, cols)?;
                    kernels_wgpu::masks::dare(ctx, tau, dare_params(i), first_index, &mut dropped)
                        .await?;
                    *tau = dropped;
                }
            }
            let views: Vec<&GpuTensor<f32>> = taus_gpu.iter().collect();
            let mut out = GpuTensor::zeros(ctx, rows, cols)?;
            match knobs.method {
                Method::Ties => {
                    kernels_wgpu::merge::ties(
                        ctx,
                        &base_gpu,
                        &views,
                        &weights,
                        ties_params,
                        &mut out,
                    )
                    .await?;
                }
                _ => kernels_wgpu::merge::task_arithmetic(
                    ctx,
                    &base_gpu,
                    &views,
                    &weights,
                    knobs.lambda,
                    &mut out,
                )?,
            }
            out.to_vec(ctx).await?
        }
        Backend::Cpu(cpu) => {
            if knobs.method == Method::Dare {
                for (i, tau) in taus.iter_mut().enumerate() {
                    let mut dropped = vec![0.0f32; n];
                    kernels_cpu::masks::dare(cpu, tau, dare_params(i), first_index, &mut dropped)?;
                    *tau = dropped;
                }
            }
            let views: Vec<&[f32]> = taus.iter().map(|t| &t[..]).collect();
            let mut out = vec![0.0f32; n];
            match knobs.method {
                Method::Ties => kernels_cpu::merge::ties(
                    cpu,
                    &base.values,
                    &views,
                    &weights,
                    ties_params,
                    &mut out,
                )?,
                _ => kernels_cpu::merge::task_arithmetic(
                    cpu,
                    &base.values,
                    &views,
                    &weights,
                    knobs.lambda,
                    &mut out,
                )?,
            }
            out
        }
    };
    let mut check = Check::default();
    for (j, (&got, &expect)) in merged.iter().zip(&reference).enumerate() {
        let abs_sum = f64::from(base.values[j].abs())
            + f64::from(knobs.lambda.abs())
                * reference_taus
                    .iter()
                    .map(|t| f64::from(t[j].abs()))
                    .sum::<f64>();
        let bound = match (knobs.method, backend) {
            // The CPU's TIES elects the reference's sign and rounds its mean in f32.
            (Method::Ties, Backend::Cpu(_)) => {
                kernels_cpu::merge::ties_tolerance(taus.len(), abs_sum)
            }
            _ => backend.reduction_tolerance(taus.len() + 1, abs_sum),
        };
        check.add(got, f64::from(expect), bound);
    }
    Ok((merged, check))
}

/// ComPEFT of a fine-tune's task vector, as the page reports it.
#[wasm_bindgen::prelude::wasm_bindgen(getter_with_clone)]
#[derive(Clone, Debug)]
pub struct Compressed {
    /// Bits per parameter of the packed tensors (sparse Rice layout).
    pub bits_per_parameter: f64,
    /// `||tau - decoded|| / ||tau||`.
    pub relative_error: f64,
    /// Bytes of the fine-tune's tensors as stored.
    pub original_bytes: usize,
    /// Bytes of the packed task vector.
    pub compressed_bytes: usize,
    /// Entries kept.
    pub kept: u64,
    /// Whether every code equals the reference's (ComPEFT's codes are bit-identical on every
    /// backend).
    pub codes_match: bool,
    /// Milliseconds the page's call took, reading the files included (the page's layer sets it;
    /// 0 here).
    pub millis: f64,
}

/// ComPEFT of `tuned - base` at `density` on `backend`, checked against the reference's codes.
///
/// # Errors
///
/// The backend's error.
pub async fn compress(
    backend: &Backend,
    base: &Model,
    tuned: &Model,
    density: f64,
) -> Result<Compressed> {
    let taus: Vec<Vec<f32>> = base
        .tensors
        .iter()
        .zip(&tuned.tensors)
        .map(|(b, t)| task_vectors(b, &[t]).map(|mut v| v.remove(0)))
        .collect::<Result<_>>()?;
    let shapes: Vec<Vec<u64>> = base
        .tensors
        .iter()
        .map(|t| t.shape.iter().map(|&d| d as u64).collect())
        .collect();
    let params = CompeftParams::default().with_keep(KeepRule::Density(density));
    let layout = TernaryLayout::SparseRice;
    let (cut, packed) = match backend {
        Backend::Gpu(ctx) => {
            let tensors = taus
                .iter()
                .zip(&base.tensors)
                .map(|(tau, t)| {
                    let [rows, cols] = t.matrix_shape();
                    GpuTensor::from_matrix(ctx, MatRef::from_slice(tau, rows, cols)?)
                })
                .collect::<Result<Vec<_>>>()?;
            let pairs: Vec<(&GpuTensor<f32>, &[u64])> = tensors
                .iter()
                .zip(&shapes)
                .map(|(t, s)| (t, &s[..]))
                .collect();
            kernels_wgpu::compress::compeft(ctx, &pairs, params, layout).await?
        }
        Backend::Cpu(cpu) => {
            let pairs: Vec<(&[f32], &[u64])> = taus
                .iter()
                .zip(&shapes)
                .map(|(t, s)| (&t[..], &s[..]))
                .collect();
            kernels_cpu::compress::compeft(cpu, &pairs, params, layout)?
        }
    };
    let views: Vec<&[f32]> = taus.iter().map(|t| &t[..]).collect();
    let (_, reference) = kernels_core::ops::ternary::compeft_ref(&views, params)?;
    let mut codes_match = true;
    let (mut error, mut norm, mut kept) = (0.0f64, 0.0f64, 0u64);
    for ((bytes, expect), tau) in packed.iter().zip(&reference).zip(&taus) {
        let (header, codes) = format::decode(bytes, tau.len())?;
        codes_match &= codes == *expect;
        kept += codes.iter().filter(|&&c| c != 0).count() as u64;
        for (&c, &v) in codes.iter().zip(tau) {
            error += (f64::from(header.scale) * f64::from(c) - f64::from(v)).powi(2);
            norm += f64::from(v).powi(2);
        }
    }
    let total = cut.total.max(1);
    let compressed_bytes: usize = packed.iter().map(Vec::len).sum();
    Ok(Compressed {
        bits_per_parameter: 8.0 * compressed_bytes as f64 / total as f64,
        relative_error: (error / norm.max(f64::MIN_POSITIVE)).sqrt(),
        original_bytes: tuned.stored_bytes(),
        compressed_bytes,
        kept,
        codes_match,
        millis: 0.0,
    })
}

/// Dense and sparse-input GEMV timings at one sparsity.
#[derive(Clone, Copy, Debug)]
pub struct GemvTiming {
    /// Milliseconds per dense GEMV.
    pub dense_ms: f64,
    /// Milliseconds per sparse-input GEMV.
    pub sparse_ms: f64,
    /// The sparse result against the reference.
    pub check: Check,
}

/// Times `repeats` dense and sparse-input GEMVs of an f16 `[inputs, outputs]` matrix at
/// `sparsity` (the fraction of inputs skipped), with `clock` giving milliseconds.
///
/// # Errors
///
/// The backend's error, or `sparsity` outside `[0, 1)`.
pub async fn gemv_timing(
    backend: &Backend,
    inputs: usize,
    outputs: usize,
    sparsity: f64,
    repeats: usize,
    clock: &dyn Fn() -> f64,
) -> Result<GemvTiming> {
    if !(0.0..1.0).contains(&sparsity) {
        return Err(Error::InvalidParam {
            name: "sparsity",
            value: sparsity,
            expected: "in [0, 1)",
        });
    }
    let rng = CounterRng::new(5);
    let w: Vec<f16> = (0..(inputs * outputs) as u64)
        .map(|i| f16::from_f32(0.05 * rng.normal_at(i) as f32))
        .collect();
    let x: Vec<f32> = (0..inputs as u64)
        .map(|i| rng.normal_at(1 << 40 | i) as f32)
        .collect();
    let mut magnitudes: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    magnitudes.sort_by(f32::total_cmp);
    let skipped = ((sparsity * inputs as f64) as usize).min(inputs);
    let threshold = if skipped == 0 {
        -1.0
    } else {
        magnitudes[skipped - 1]
    };
    let w_view = MatRef::from_slice(&w, inputs, outputs)?;
    let mut y = vec![0.0f32; outputs];
    let repeats = repeats.max(1);
    let (dense_ms, sparse_ms) = match backend {
        Backend::Gpu(ctx) => {
            let w_gpu = GpuTensor::from_matrix(ctx, w_view)?;
            let x_gpu = GpuTensor::from_slice(ctx, &x)?;
            let mut y_gpu = GpuTensor::<f32>::zeros(ctx, outputs, 1)?;
            let mut time = async |t: f32| -> Result<f64> {
                // One untimed call compiles the pipeline.
                kernels_wgpu::gemv::sparse_input_gemv(ctx, &w_gpu, &x_gpu, t, &mut y_gpu)?;
                backend.finish().await?;
                let start = clock();
                for _ in 0..repeats {
                    kernels_wgpu::gemv::sparse_input_gemv(ctx, &w_gpu, &x_gpu, t, &mut y_gpu)?;
                }
                backend.finish().await?;
                Ok((clock() - start) / repeats as f64)
            };
            let dense = time(-1.0).await?;
            let sparse = time(threshold).await?;
            y = y_gpu.to_vec(ctx).await?;
            (dense, sparse)
        }
        Backend::Cpu(cpu) => {
            let mut time = |t: f32| -> Result<f64> {
                // One untimed call warms the caches, as the GPU's compiles its pipeline.
                kernels_cpu::gemv::sparse_input_gemv(cpu, w_view, &x, t, &mut y)?;
                let start = clock();
                for _ in 0..repeats {
                    kernels_cpu::gemv::sparse_input_gemv(cpu, w_view, &x, t, &mut y)?;
                }
                Ok((clock() - start) / repeats as f64)
            };
            let dense = time(-1.0)?;
            (dense, time(threshold)?)
        }
    };
    let mut reference = vec![0.0f32; outputs];
    sparse_input_gemv_ref(w_view, &x, threshold, &mut reference)?;
    let mut check = Check::default();
    for (j, (&got, &expect)) in y.iter().zip(&reference).enumerate() {
        let abs_sum: f64 = (0..inputs)
            .filter(|&i| !(x[i].abs() <= threshold))
            .map(|i| (f64::from(w[i * outputs + j].to_f32()) * f64::from(x[i])).abs())
            .sum();
        let bound = match backend {
            Backend::Gpu(_) => kernels_wgpu::gemv::gemv_tolerance(inputs, abs_sum),
            Backend::Cpu(_) => kernels_cpu::gemv::gemv_tolerance(inputs, abs_sum),
        };
        check.add(got, f64::from(expect), bound);
    }
    Ok(GemvTiming {
        dense_ms,
        sparse_ms,
        check,
    })
}

/// A picture approximated at a rank.
#[derive(Clone, Debug)]
pub struct LowRank {
    /// The approximation, row-major like the input.
    pub image: Vec<f32>,
    /// The leading singular values found.
    pub singular_values: Vec<f32>,
    /// `||A - A_r|| / ||A||` for ranks 1 to `rank`, from the singular values.
    pub errors: Vec<f64>,
    /// The singular values against the reference's (same probes, in `f64`).
    pub check: Check,
}

/// The rank-`rank` randomized SVD of a `height x width` grey image on `backend`.
///
/// # Errors
///
/// A rank outside `1..=min(height, width)`, or the backend's error.
pub async fn low_rank(
    backend: &Backend,
    pixels: &[f32],
    height: usize,
    width: usize,
    rank: usize,
) -> Result<LowRank> {
    let a = MatRef::from_slice(pixels, height, width)?;
    let params = RsvdParams::new(rank).with_seed(3);
    let svd = match backend {
        Backend::Gpu(ctx) => {
            let gpu = GpuTensor::from_matrix(ctx, a)?;
            kernels_wgpu::linalg::randomized_svd(ctx, &gpu, params).await?
        }
        Backend::Cpu(cpu) => kernels_cpu::linalg::randomized_svd(cpu, a, params)?,
    };
    let reference = randomized_svd_ref(a, params)?;
    let norm2: f64 = pixels.iter().map(|&v| f64::from(v).powi(2)).sum();
    let bound = factorisation_tolerance(height, width) * norm2.sqrt();
    let mut check = Check::default();
    for (&got, &expect) in svd.s.iter().zip(&reference.s) {
        check.add(got, expect, bound.max(f64::MIN_POSITIVE));
    }
    let mut image = vec![0.0f32; height * width];
    for (i, row) in image.chunks_mut(width.max(1)).enumerate() {
        for (j, out) in row.iter_mut().enumerate() {
            *out = (0..svd.s.len())
                .map(|k| svd.u.at(i, k) * svd.s[k] * svd.v.at(j, k))
                .sum();
        }
    }
    let mut kept = 0.0f64;
    let errors = svd
        .s
        .iter()
        .map(|&s| {
            kept += f64::from(s).powi(2);
            ((norm2 - kept).max(0.0) / norm2.max(f64::MIN_POSITIVE)).sqrt()
        })
        .collect();
    Ok(LowRank {
        image,
        singular_values: svd.s,
        errors,
        check,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::synthetic;
    use kernels_wgpu::ContextOptions;

    /// The CPU, and lavapipe or whatever adapter the machine has (skipped loudly without one,
    /// unless `KERNELS_WGPU_REQUIRE_ALL_VARIANTS` says the machine must have one).
    fn backends() -> Vec<Backend> {
        let mut out = vec![Backend::Cpu(Cpu::detect())];
        match Context::new_blocking(ContextOptions::default()) {
            Ok(ctx) => out.push(Backend::Gpu(Box::new(ctx))),
            Err(e) if std::env::var_os("KERNELS_WGPU_REQUIRE_ALL_VARIANTS").is_none() => {
                eprintln!("GPU demos skipped: {e}");
            }
            Err(e) => panic!("no GPU adapter: {e}"),
        }
        out
    }

    fn clock() -> f64 {
        use std::sync::OnceLock;
        static START: OnceLock<std::time::Instant> = OnceLock::new();
        START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs_f64()
            * 1e3
    }

    #[test]
    fn every_demo_matches_the_reference_on_every_backend() {
        let files = synthetic(3, 7).unwrap();
        let models: Vec<Model> = files
            .iter()
            .map(|f| Model::parse(f, "m").unwrap())
            .collect();
        for backend in backends() {
            let name = backend.describe();
            for method in [Method::TaskArithmetic, Method::Ties, Method::Dare] {
                let knobs = MergeKnobs {
                    method,
                    lambda: 0.8,
                    density: 0.3,
                    drop: 0.7,
                    seed: 4,
                };
                let mut first = 0;
                for (i, base) in models[0].tensors.iter().enumerate() {
                    let tuned = [&models[1].tensors[i], &models[2].tensors[i]];
                    let (merged, check) =
                        kernels_wgpu::block_on(merge_tensor(&backend, base, &tuned, knobs, first))
                            .unwrap();
                    assert_eq!(merged.len(), base.values.len());
                    assert!(check.passed(), "{name} {method:?} {}: {check:?}", base.name);
                    first += base.values.len() as u64;
                }
            }
            let fishers: Vec<Model> = crate::models::synthetic_fishers(2, 7)
                .unwrap()
                .iter()
                .map(|f| Model::parse(f, "fisher").unwrap())
                .collect();
            for i in 0..models[0].tensors.len() {
                let tuned = [&models[1].tensors[i], &models[2].tensors[i]];
                let f = [&fishers[0].tensors[i], &fishers[1].tensors[i]];
                let (merged, check) =
                    kernels_wgpu::block_on(fisher_tensor(&backend, &tuned, &f)).unwrap();
                assert_eq!(merged.len(), tuned[0].values.len());
                assert!(check.passed(), "{name} Fisher: {check:?}");
            }
            let c =
                kernels_wgpu::block_on(compress(&backend, &models[0], &models[1], 0.1)).unwrap();
            assert!(c.codes_match, "{name}");
            assert!(
                c.bits_per_parameter > 0.0 && c.bits_per_parameter < 2.0,
                "{name}: {c:?}"
            );
            assert!(
                c.relative_error > 0.0 && c.relative_error < 1.0,
                "{name}: {c:?}"
            );
            assert!(c.compressed_bytes * 4 < c.original_bytes, "{name}: {c:?}");
            let t =
                kernels_wgpu::block_on(gemv_timing(&backend, 300, 200, 0.5, 2, &clock)).unwrap();
            assert!(t.check.passed(), "{name}: {t:?}");
            assert!(t.dense_ms >= 0.0 && t.sparse_ms >= 0.0);
            let (h, w) = (48, 40);
            let pixels: Vec<f32> = (0..h * w)
                .map(|k| ((k / w) as f32 * 0.2).sin() + ((k % w) as f32 * 0.1).cos())
                .collect();
            let r = kernels_wgpu::block_on(low_rank(&backend, &pixels, h, w, 4)).unwrap();
            assert!(r.check.passed(), "{name}: {:?}", r.check);
            assert_eq!((r.image.len(), r.errors.len()), (h * w, 4));
            assert!(
                r.errors.windows(2).all(|e| e[0] >= e[1]),
                "{name}: {:?}",
                r.errors
            );
            // sin(i) + cos(j) is rank 2: two singular values carry it.
            assert!(r.errors[1] < 1e-3, "{name}: {:?}", r.errors);
        }
    }

    #[test]
    fn bad_input_is_an_error_with_words() {
        let backend = Backend::Cpu(Cpu::detect());
        assert!(
            Method::parse("slerp")
                .unwrap_err()
                .contains("task_arithmetic")
        );
        let e = kernels_wgpu::block_on(gemv_timing(&backend, 4, 4, 1.0, 1, &clock)).unwrap_err();
        assert!(e.to_string().contains("sparsity"), "{e}");
        let e = kernels_wgpu::block_on(low_rank(&backend, &[0.0; 12], 3, 4, 5)).unwrap_err();
        assert!(e.to_string().contains("rank"), "{e}");
    }
}
