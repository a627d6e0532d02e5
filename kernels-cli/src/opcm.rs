//! The `opcm` merge method: OPCM continual merging (Tang et al., 2025, as `FusionBench` runs it),
//! the models merged in the listed order.
//!
//! With task vectors `tau_1 .. tau_T` in order, the unscaled merged task vector of each weight
//! matrix follows `N_1 = tau_1`, `N_t = N_{t-1} + opcm_project(svd(N_{t-1}), tau_t)` (the new
//! task vector with the diagonal and the leading `r x r` block of its coordinates in the merged
//! vector's singular bases removed, `r` from `alpha`); other tensors (embeddings, norms, biases)
//! add their task vectors as they are. `FusionBench` rescales after every step by
//! `lambda_t = ||N_t|| / mean_{i <= t} ||tau_i||` (norms over the whole model); since each step
//! projects against the same singular vectors whatever the scale, the result is
//! `theta = theta_0 + N_T * mean_i ||tau_i|| / ||N_T||`. A first pass computes every `N_T` (one
//! thin SVD per matrix and step) into a scratch file beside the output, and the norms; the merge
//! pass scales.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use kernels_cpu::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::compeft::task_vector;
use crate::config::MergeConfig;
use crate::merge::MergeOptions;

/// The merged task vectors of the first pass, on disk, and the scale the merge applies.
pub(crate) struct OpcmScratch {
    path: PathBuf,
    tensors: BTreeMap<String, (u64, usize)>,
    /// `mean_i ||tau_i|| / ||N_T||`.
    pub(crate) scale: f32,
}

impl Drop for OpcmScratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether OPCM projects a tensor (a linear layer's weight) or adds it as it is.
fn projected(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && !name.contains("embed")
}

impl OpcmScratch {
    /// The first pass.
    pub(crate) fn compute(
        config: &MergeConfig,
        options: &MergeOptions,
        base: &Checkpoint,
        models: &[&Checkpoint],
    ) -> Result<Self> {
        let cpu = &options.cpu;
        let alpha = config
            .global_parameter("alpha", "", 0.0, Some(0.5))
            .map_err(|e| anyhow!(e))?;
        let params = OpcmParams::default().with_alpha(alpha);
        let name = options
            .out
            .file_name()
            .map_or_else(|| "output".into(), |n| n.to_string_lossy().into_owned());
        let parent = match options.out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let path = parent.join(format!(".{name}.opcm-scratch-{}", std::process::id()));
        let mut scratch = Self {
            path,
            tensors: BTreeMap::new(),
            scale: 1.0,
        };
        let mut writer = BufWriter::new(
            File::create(&scratch.path)
                .with_context(|| format!("cannot create '{}'", scratch.path.display()))?,
        );
        let mut task_squares = vec![0.0f64; models.len()];
        let (mut merged_squares, mut offset) = (0.0f64, 0u64);
        for (name, entry) in base.tensors() {
            let mut merged: Vec<f32> = Vec::new();
            for (i, model) in models.iter().enumerate() {
                let tau = task_vector(cpu, base, model, name)?;
                task_squares[i] += sum_squares(cpu, &tau)?;
                if i == 0 {
                    merged = tau;
                    continue;
                }
                let added = if projected(name, &entry.shape) {
                    let [m, n] = [entry.shape[0], entry.shape[1]];
                    let svd = thin_svd(cpu, MatRef::from_slice(&merged, m, n)?)
                        .with_context(|| format!("the SVD of '{name}' after {i} models"))?;
                    let mut cleaned = vec![0.0f32; m * n];
                    opcm_project(
                        cpu,
                        svd.as_ref(),
                        MatRef::from_slice(&tau, m, n)?,
                        params,
                        MatMut::from_slice(&mut cleaned, m, n)?,
                    )?;
                    cleaned
                } else {
                    tau
                };
                let mut next = vec![0.0f32; merged.len()];
                linear_combination(cpu, &[&merged[..], &added[..]], &[1.0, 1.0], &mut next)?;
                merged = next;
            }
            merged_squares += sum_squares(cpu, &merged)?;
            writer.write_all(bytemuck::cast_slice(&merged))?;
            scratch.tensors.insert(name.clone(), (offset, merged.len()));
            offset += (merged.len() * 4) as u64;
        }
        writer.flush()?;
        let mean_norm = task_squares.iter().map(|s| s.sqrt()).sum::<f64>() / models.len() as f64;
        if merged_squares > 0.0 {
            scratch.scale = (mean_norm / merged_squares.sqrt()) as f32;
        }
        Ok(scratch)
    }

    /// The merged task vector `N_T` of a tensor.
    pub(crate) fn read(&self, name: &str) -> Result<Vec<f32>> {
        let (offset, len) = self.tensors[name];
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(offset))?;
        let mut bytes = vec![0u8; len * 4];
        file.read_exact(&mut bytes)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}
