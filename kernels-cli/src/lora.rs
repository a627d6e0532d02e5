//! `kernels extract-lora`: a PEFT LoRA adapter approximating `finetuned - base`, mergekit's
//! conventions: every 2-D weight but the embeddings and `lm_head` becomes
//! `base_model.model.<module>.lora_A.weight` (`[r, in]`) and `lora_B.weight` (`[out, r]`), the
//! singular values split as `sqrt(s)` onto both factors (`lora_alpha = r`, so PEFT's scale is
//! 1); embeddings, `lm_head` and 1-D tensors (norms, biases) that differ from the base are saved
//! whole, under `modules_to_save`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use kernels_cpu::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::merge::{Narrower, check_same_tensors, f32_tensor};
use crate::output::{OutputDir, PlannedTensor};

/// How the rank of each module is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RankRule {
    /// Rank `r` from the randomized SVD (`2 r` probes, 2 power iterations).
    Randomized(usize),
    /// Rank `r` from the exact thin SVD.
    Exact(usize),
    /// Per module, the smallest rank keeping this fraction of `||delta||_F^2` (exact SVD).
    Energy(f64),
}

/// What an extraction did.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSummary {
    /// Modules given LoRA factors, with their ranks.
    pub ranks: BTreeMap<String, usize>,
    /// Modules saved whole.
    pub saved_whole: Vec<String>,
    /// `||delta - B A||_F / ||delta||_F` over all LoRA modules together.
    pub relative_error: f64,
    /// Parameters of the adapter.
    pub parameters: u64,
}

/// Whether a tensor is saved whole rather than factored.
fn saved_whole(name: &str, shape: &[usize]) -> bool {
    shape.len() != 2 || name.contains("embed") || name.contains("lm_head")
}

/// The module of a weight: its name without `.weight`.
fn module(name: &str) -> &str {
    name.strip_suffix(".weight").unwrap_or(name)
}

/// A tensor's elements as `f32`, its pages released.
fn widened(cpu: &Cpu, c: &Checkpoint, name: &str) -> Result<Vec<f32>> {
    let v = f32_tensor(cpu, c, name)?.into_owned();
    // SAFETY: the borrow was consumed above.
    unsafe { c.release(name) };
    Ok(v)
}

/// Extracts the adapter into `out` (a directory, written atomically).
///
/// # Errors
///
/// Models that cannot be opened or whose tensors differ, a rank rule outside its domain, an
/// existing `out` without `force`, an I/O error.
pub fn extract(
    cpu: &Cpu,
    base_path: &Path,
    finetuned_path: &Path,
    out: &Path,
    rule: RankRule,
    force: bool,
) -> Result<LoraSummary> {
    if out.exists() && !force {
        bail!(
            "'{}' already exists; pass --force to replace it",
            out.display()
        );
    }
    let base =
        Checkpoint::open(base_path).with_context(|| format!("base '{}'", base_path.display()))?;
    let tuned = Checkpoint::open(finetuned_path)
        .with_context(|| format!("fine-tune '{}'", finetuned_path.display()))?;
    check_same_tensors(&base, std::iter::once(&tuned))?;
    let mut factors: Vec<(String, Lora<f32>)> = Vec::new();
    let mut whole: Vec<String> = Vec::new();
    let (mut error2, mut norm2) = (0.0f64, 0.0f64);
    for (name, entry) in base.tensors() {
        let (b, t) = (widened(cpu, &base, name)?, widened(cpu, &tuned, name)?);
        let mut delta = vec![0.0f32; b.len()];
        linear_combination(cpu, &[&t[..], &b[..]], &[1.0, -1.0], &mut delta)?;
        if saved_whole(name, &entry.shape) {
            if delta.iter().any(|&d| d != 0.0) {
                whole.push(name.clone());
            }
            continue;
        }
        let [m, n] = [entry.shape[0], entry.shape[1]];
        let view = MatRef::from_slice(&delta, m, n)?;
        let lora = match rule {
            RankRule::Randomized(r) => {
                lora_extract_randomized(cpu, view, RsvdParams::new(r.min(m.min(n))))
            }
            RankRule::Exact(r) => lora_extract(cpu, view, LoraRank::Fixed(r.min(m.min(n)))),
            RankRule::Energy(e) => lora_extract(cpu, view, LoraRank::Energy(e)),
        }
        .with_context(|| format!("tensor '{name}'"))?;
        // B A is the projection of delta onto the leading singular vectors found, so
        // ||delta - B A||^2 = ||delta||^2 - sum of the kept s^2 (for the randomized SVD too).
        let rank = lora.a.shape()[0];
        let total = sum_squares(cpu, &delta)?;
        let kept: f64 = lora
            .singular_values
            .iter()
            .take(rank)
            .map(|&s| f64::from(s) * f64::from(s))
            .sum();
        error2 += (total - kept).max(0.0);
        norm2 += total;
        factors.push((name.clone(), lora));
    }
    let dtype_of = |name: &str| tuned.tensors()[name].dtype;
    let mut plan = Vec::new();
    let mut ranks = BTreeMap::new();
    for (name, lora) in &factors {
        let m = module(name);
        let dtype = dtype_of(name);
        plan.push(PlannedTensor {
            name: format!("base_model.model.{m}.lora_A.weight"),
            shape: lora.a.shape().to_vec(),
            dtype,
        });
        plan.push(PlannedTensor {
            name: format!("base_model.model.{m}.lora_B.weight"),
            shape: lora.b.shape().to_vec(),
            dtype,
        });
        ranks.insert(m.to_string(), lora.a.shape()[0]);
    }
    for name in &whole {
        plan.push(PlannedTensor {
            name: format!("base_model.model.{name}"),
            shape: tuned.tensors()[name].shape.clone(),
            dtype: dtype_of(name),
        });
    }
    let parameters = plan
        .iter()
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .sum();
    let mut output = OutputDir::create_named(out, force, u64::MAX, plan, "adapter_model")?;
    let mut narrower = Narrower::default();
    for (name, lora) in &factors {
        let dtype = dtype_of(name);
        output.write_next(narrower.bytes(cpu, lora.a.as_slice(), dtype)?)?;
        output.write_next(narrower.bytes(cpu, lora.b.as_slice(), dtype)?)?;
    }
    for name in &whole {
        let values = widened(cpu, &tuned, name)?;
        output.write_next(narrower.bytes(cpu, &values, dtype_of(name))?)?;
    }
    write_adapter_config(&output, base_path, &ranks, &whole)?;
    output.commit()?;
    Ok(LoraSummary {
        ranks,
        saved_whole: whole,
        relative_error: if norm2 > 0.0 {
            (error2 / norm2).sqrt()
        } else {
            0.0
        },
        parameters,
    })
}

/// The last component of a module path (`model.layers.0.self_attn.q_proj` -> `q_proj`).
fn leaf(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

fn write_adapter_config(
    output: &OutputDir,
    base: &Path,
    ranks: &BTreeMap<String, usize>,
    whole: &[String],
) -> Result<()> {
    let r = ranks.values().copied().max().unwrap_or(0);
    let targets: std::collections::BTreeSet<&str> = ranks.keys().map(|m| leaf(m)).collect();
    let saved: std::collections::BTreeSet<&str> = whole.iter().map(|n| leaf(module(n))).collect();
    // Ranks below the largest go into the patterns, with alpha = rank so every scale is 1.
    let pattern: serde_json::Map<String, serde_json::Value> = ranks
        .iter()
        .filter(|&(_, &rank)| rank != r)
        .map(|(m, &rank)| (m.clone(), rank.into()))
        .collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.display().to_string(),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": pattern,
        "target_modules": targets,
        "modules_to_save": if saved.is_empty() { serde_json::Value::Null } else { serde_json::json!(saved) },
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
    });
    output.write_file(
        "adapter_config.json",
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    let readme = format!(
        "---\nlibrary_name: peft\ntags:\n- kernels-cli\n---\n# LoRA adapter\n\nExtracted by \
         `kernels extract-lora` (kernels-cli {}) from the difference between a fine-tune and \
         '{}'.\n",
        env!("CARGO_PKG_VERSION"),
        base.display()
    );
    output.write_file("README.md", readme.as_bytes())
}
