//! Where a merge's ops run (`--device cpu|gpu|auto`): every op the GPU backend has with the
//! semantics a merge needs runs there, the rest on the CPU.
//!
//! On the GPU: linear combinations (linear, passthrough), task arithmetic and the TIES vote of
//! the task-arithmetic family, SLERP, whole-tensor Model Stock, Fisher merging and DARE's masks.
//! On the CPU whatever the device: magnitude trimming, Breadcrumbs, DELLA's ranks, ComPEFT, OPCM
//! and LoRA's factorisations (both take the exact thin SVD, which has no GPU form: its Jacobi
//! sweeps are sequential; the GPU's randomized SVD is not the same answer), filter-wise Model
//! Stock (a Gram matrix per row), and reading and writing. Each GPU op is within its documented tolerance of the CPU's (`f32` sums where the
//! CPU keeps `f64`; DARE's masks are the same bits).

use std::sync::Arc;

use anyhow::{Context as _, Result};
use kernels_cpu::prelude as cpu;
use kernels_cpu::prelude::{Cpu, DareParams, FisherParams, TiesElection};
use kernels_wgpu::prelude as gpu;
use kernels_wgpu::prelude::{Context, ContextOptions, GpuElement, GpuTensor, block_on};

/// Where `--device` asks the kernels to run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The CPU.
    Cpu,
    /// The GPU (through wgpu): an error if no adapter is found.
    Gpu,
    /// A hardware GPU if there is one; the CPU otherwise (a software rasteriser such as
    /// lavapipe is slower than our CPU kernels, so `auto` passes it by).
    Auto,
}

/// The GPU context a run uses, if any, chosen from `device`.
///
/// # Errors
///
/// `Device::Gpu` without a usable adapter (the message says what wgpu found).
pub fn select(device: Device) -> Result<Option<Arc<Context>>> {
    match device {
        Device::Cpu => Ok(None),
        Device::Gpu => Context::new_blocking(ContextOptions::default())
            .map(|c| Some(Arc::new(c)))
            .context("--device gpu: no usable GPU adapter (try --device cpu)"),
        Device::Auto => Ok(Context::new_blocking(ContextOptions::default())
            .ok()
            .filter(|c| c.adapter_info().device_type != kernels_wgpu::wgpu::DeviceType::Cpu)
            .map(Arc::new)),
    }
}

/// A short description of where the ops ran, for the summary line.
#[must_use]
pub fn describe(gpu: Option<&Context>) -> String {
    gpu.map_or_else(
        || "the CPU".to_owned(),
        |c| format!("the GPU ({})", c.adapter_info().name),
    )
}

/// The ops a merge routes by device: the CPU's, or the GPU's with uploads and downloads around.
#[derive(Clone, Copy)]
pub struct Ops<'a> {
    /// The CPU backend (also the fallback for what the GPU lacks).
    pub cpu: &'a Cpu,
    /// The GPU, when the run uses one.
    pub gpu: Option<&'a Context>,
}

fn upload<T: GpuElement>(ctx: &Context, data: &[T]) -> Result<GpuTensor<T>> {
    Ok(GpuTensor::from_slice(ctx, data)?)
}

fn upload_all<T: GpuElement>(ctx: &Context, data: &[&[T]]) -> Result<Vec<GpuTensor<T>>> {
    data.iter().map(|d| upload(ctx, d)).collect()
}

/// Runs `op` into a fresh device tensor of `out`'s length and downloads the result into `out`.
fn into(
    ctx: &Context,
    out: &mut [f32],
    op: impl FnOnce(&mut GpuTensor<f32>) -> kernels_wgpu::Result<()>,
) -> Result<()> {
    let mut device = GpuTensor::zeros(ctx, out.len(), 1)?;
    op(&mut device)?;
    out.copy_from_slice(&device.to_vec_blocking(ctx)?);
    Ok(())
}

impl<'a> Ops<'a> {
    /// The GPU, for an output of `len` elements (an empty one has nothing to compute there).
    fn gpu_for(self, len: usize) -> Option<&'a Context> {
        self.gpu.filter(|_| len > 0)
    }

    /// `out = sum w_i m_i`.
    pub fn linear_combination<T: GpuElement>(
        self,
        models: &[&[T]],
        weights: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        let Some(ctx) = self.gpu_for(out.len()) else {
            return Ok(cpu::linear_combination(self.cpu, models, weights, out)?);
        };
        let tensors = upload_all(ctx, models)?;
        let views: Vec<&GpuTensor<T>> = tensors.iter().collect();
        into(ctx, out, |o| {
            gpu::linear_combination(ctx, &views, weights, o)
        })
    }

    /// `out = base + lambda sum w_i tau_i`.
    pub fn task_arithmetic(
        self,
        base: &[f32],
        taus: &[&[f32]],
        weights: &[f32],
        lambda: f32,
        out: &mut [f32],
    ) -> Result<()> {
        let Some(ctx) = self.gpu_for(out.len()) else {
            return Ok(cpu::task_arithmetic(
                self.cpu, base, taus, weights, lambda, out,
            )?);
        };
        let base = upload(ctx, base)?;
        let tensors = upload_all(ctx, taus)?;
        let views: Vec<&GpuTensor<f32>> = tensors.iter().collect();
        into(ctx, out, |o| {
            gpu::task_arithmetic(ctx, &base, &views, weights, lambda, o)
        })
    }

    /// The TIES vote and combination under `rule` over trimmed task vectors.
    pub fn ties_elect_with(
        self,
        base: &[f32],
        trimmed: &[&[f32]],
        weights: &[f32],
        lambda: f32,
        rule: TiesElection,
        out: &mut [f32],
    ) -> Result<()> {
        let Some(ctx) = self.gpu_for(out.len()) else {
            return Ok(cpu::ties_elect_with(
                self.cpu, base, trimmed, weights, lambda, rule, out,
            )?);
        };
        let base = upload(ctx, base)?;
        let tensors = upload_all(ctx, trimmed)?;
        let views: Vec<&GpuTensor<f32>> = tensors.iter().collect();
        into(ctx, out, |o| {
            gpu::ties_elect_with(ctx, &base, &views, weights, lambda, rule, o)
        })
    }

    /// SLERP of two whole tensors.
    pub fn slerp<T: GpuElement>(self, v0: &[T], v1: &[T], t: f32, out: &mut [f32]) -> Result<()> {
        let Some(ctx) = self.gpu_for(out.len()) else {
            return Ok(cpu::slerp(self.cpu, v0, v1, t, out)?);
        };
        let (v0, v1) = (upload(ctx, v0)?, upload(ctx, v1)?);
        into(ctx, out, |o| block_on(gpu::slerp(ctx, &v0, &v1, t, o)))
    }

    /// Model Stock of whole tensors.
    pub fn model_stock<T: GpuElement>(
        self,
        base: &[T],
        models: &[&[T]],
        out: &mut [f32],
    ) -> Result<()> {
        let Some(ctx) = self.gpu_for(out.len()) else {
            return Ok(cpu::model_stock(self.cpu, base, models, out)?);
        };
        let base = upload(ctx, base)?;
        let tensors = upload_all(ctx, models)?;
        let views: Vec<&GpuTensor<T>> = tensors.iter().collect();
        into(ctx, out, |o| {
            block_on(gpu::model_stock(ctx, &base, &views, o))
        })
    }

    /// Fisher merging.
    pub fn fisher_merge<T: GpuElement>(
        self,
        thetas: &[&[T]],
        fishers: &[&[f32]],
        weights: &[f32],
        params: FisherParams<'_>,
        out: &mut [f32],
    ) -> Result<()> {
        let Some(ctx) = self.gpu_for(out.len()) else {
            return Ok(cpu::fisher_merge(
                self.cpu, thetas, fishers, weights, params, out,
            )?);
        };
        let thetas = upload_all(ctx, thetas)?;
        let fishers = upload_all(ctx, fishers)?;
        let thetas: Vec<&GpuTensor<T>> = thetas.iter().collect();
        let fishers: Vec<&GpuTensor<f32>> = fishers.iter().collect();
        into(ctx, out, |o| {
            gpu::fisher_merge(ctx, &thetas, &fishers, weights, params, o)
        })
    }

    /// DARE's random drop of a whole task vector (the same mask bits on either device).
    pub fn dare(self, tau: &[f32], params: DareParams, out: &mut [f32]) -> Result<()> {
        let Some(ctx) = self.gpu_for(out.len()) else {
            return Ok(cpu::dare(self.cpu, tau, params, 0, out)?);
        };
        let tau = upload(ctx, tau)?;
        into(ctx, out, |o| block_on(gpu::dare(ctx, &tau, params, 0, o)))
    }
}
