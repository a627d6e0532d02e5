//! `kernels merge`: a mergekit config run tensor by tensor over memory-mapped checkpoints, every
//! number computed by the public ops of `kernels-cpu`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use kernels_cpu::prelude::*;
use kernels_wgpu::prelude::GpuElement;

use crate::checkpoint::{Checkpoint, ElementType, TensorData, TensorEntry};
use crate::compeft::task_vector;
use crate::config::{MergeConfig, Method, ModelEntry, Slice, Sparsify};
use crate::device::Ops;
use crate::opcm::OpcmScratch;
use crate::output::{OutputDir, PlannedTensor, TensorBytes, WriteBehind};

/// How a merge runs.
#[derive(Clone)]
pub struct MergeOptions {
    /// The output directory.
    pub out: PathBuf,
    /// Replace an existing output directory.
    pub force: bool,
    /// Largest shard, in bytes.
    pub shard_bytes: u64,
    /// Seed of the random methods' Philox masks.
    pub seed: u64,
    /// The CPU backend (ISA, threads).
    pub cpu: Cpu,
    /// The GPU the ops it has run on ([`crate::device::select`]), or none: all on the CPU.
    pub gpu: Option<std::sync::Arc<kernels_wgpu::prelude::Context>>,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

/// What a merge did.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data read from the inputs.
    pub read_bytes: u64,
    /// Bytes of tensor data written.
    pub written_bytes: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Where the output is.
    pub out: PathBuf,
}

/// Files copied from the base (or first) model beside the weights, where it has them.
const TOKENIZER_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
];

/// The Philox seed of model `model`'s mask of tensor `name`: distinct per model and tensor,
/// fixed by `--random-seed` (FNV-1a of the name, mixed with the seed and model index by
/// `SplitMix64`).
///
/// ```
/// use kernels_cli::merge::mask_seed;
/// let name = "model.layers.0.mlp.up_proj.weight";
/// assert_eq!(mask_seed(7, 0, name), mask_seed(7, 0, name)); // reproducible
/// assert_ne!(mask_seed(7, 0, name), mask_seed(7, 1, name)); // each model its own mask
/// assert_ne!(mask_seed(7, 0, name), mask_seed(8, 0, name)); // and each --random-seed
/// ```
#[must_use]
pub fn mask_seed(seed: u64, model: usize, name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut z = h ^ seed.wrapping_add((model as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn layer_index(name: &str) -> Option<usize> {
    let at = name.find("layers.")?;
    let rest = &name[at + "layers.".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Runs a merge.
///
/// # Errors
///
/// Any model that cannot be opened, tensors missing from a model or shaped differently, a
/// parameter outside its op's domain (named with the tensor), an output that cannot be written.
/// On error nothing is left under the output's name.
pub fn run(config: &MergeConfig, config_text: &str, options: &MergeOptions) -> Result<Summary> {
    let started = Instant::now();
    for w in &config.warnings {
        eprintln!("warning: {w}");
    }
    let mut checkpoints = Checkpoints::default();
    let base = match &config.base_model {
        Some(path) if config.method.needs_base() => Some(checkpoints.open(path, "base model")?),
        _ => None,
    };
    let models = config
        .models
        .iter()
        .map(|m| checkpoints.open(&m.path, "model"))
        .collect::<Result<Vec<_>>>()?;
    for slice in &config.slices {
        for source in &slice.sources {
            checkpoints.open(&source.path, "model")?;
        }
    }
    let out_type =
        match config.out_dtype.as_ref().or(config.dtype.as_ref()) {
            Some(name) => Some(ElementType::from_config_name(name).ok_or_else(|| {
                anyhow!("dtype '{name}' is not one of float32, float16, bfloat16")
            })?),
            None => None,
        };
    // Whole models are one slice over all their layers.
    let mut sliced = config.clone();
    if config.slices.is_empty() {
        let reference = &checkpoints.all[base.unwrap_or(models[0])];
        let all = base.iter().chain(&models).map(|&i| &checkpoints.all[i]);
        check_same_tensors(reference, all)?;
        let layers = layer_count(reference);
        let whole = |path: &str| ModelEntry {
            path: path.to_string(),
            parameters: BTreeMap::new(),
            line: None,
            layer_range: Some((0, layers)),
        };
        let mut sources: Vec<ModelEntry> = config
            .base_model
            .iter()
            .filter(|_| base.is_some())
            .map(|p| whole(p))
            .collect();
        sources.extend(config.models.iter().map(|m| ModelEntry {
            layer_range: Some((0, layers)),
            ..m.clone()
        }));
        sliced.slices = vec![Slice {
            sources,
            line: None,
        }];
    }
    let plan = plan_tensors(&sliced, &checkpoints, out_type)?;
    let reference = &checkpoints.all[plan.reference];
    let mut model_config = reference.config()?;
    if !config.slices.is_empty()
        && let Some(map) = model_config
            .as_mut()
            .and_then(serde_json::Value::as_object_mut)
        && map.contains_key("num_hidden_layers")
    {
        let layers: usize = config.slices.iter().map(Slice::len).sum();
        map.insert("num_hidden_layers".into(), layers.into());
    }
    let total_bytes: u64 = plan
        .tensors
        .iter()
        .map(|t| (t.out.shape.iter().product::<usize>() * t.out.dtype.size()) as u64)
        .sum();
    let planned: Vec<PlannedTensor> = plan.tensors.iter().map(|t| t.out.clone()).collect();
    let output = OutputDir::create(&options.out, options.force, options.shard_bytes, planned)?;
    let bar = progress_bar(options.progress, total_bytes);
    let whole_models: Vec<&Checkpoint> = models.iter().map(|&i| &checkpoints.all[i]).collect();
    let state = match config.method {
        Method::Compeft => MethodState::Compeft(std::cell::RefCell::new(compeft_encoders(
            config,
            options,
            &checkpoints.all[base.expect("compeft has a base")],
            &whole_models,
        )?)),
        Method::Fisher => MethodState::Fisher(FisherInputs::open(config, options, reference)?),
        Method::Opcm => MethodState::Opcm(OpcmScratch::compute(
            config,
            options,
            &checkpoints.all[base.expect("opcm has a base")],
            &whole_models,
        )?),
        _ => MethodState::None,
    };
    let slice_configs: Vec<MergeConfig> = (0..sliced.slices.len())
        .map(|k| sliced.for_slice(k))
        .collect();
    let has_base = base.is_some();
    let (mut read_bytes, mut tensors) = (0u64, 0usize);
    let mut writer = WriteBehind::start(output)?;
    let mut spare = SpareBuffers::default();
    let buffers = std::cell::RefCell::new(Buffers::default());
    for job in &plan.tensors {
        let name = &job.out.name;
        let data = job
            .inputs
            .iter()
            .map(|(c, input)| checkpoints.all[*c].read(input))
            .collect::<Result<Vec<(TensorEntry, TensorData<'_>)>>>()?;
        read_bytes += data
            .iter()
            .map(|(e, _)| (e.len() * e.dtype.size()) as u64)
            .sum::<u64>();
        let merged = merge_tensor(
            &slice_configs[job.slice],
            options,
            name,
            &job.out.shape,
            job.t,
            has_base,
            &data,
            &state,
            &buffers,
        )
        .with_context(|| format!("merging tensor '{name}'"))?;
        drop(data);
        for (c, input) in &job.inputs {
            // SAFETY: `data`, the only borrow of this tensor's bytes, is dropped.
            unsafe { checkpoints.all[*c].release(input) };
        }
        while let Some(done) = writer.recycled() {
            spare.put(done);
        }
        let (tensor, kept) = spare.narrow(&options.cpu, merged, job.out.dtype)?;
        bar.inc(tensor.as_bytes().len() as u64);
        writer.write_next(tensor)?;
        tensors += 1;
        buffers.borrow_mut().out = match kept {
            Some(merged) => merged,
            None => spare.f32.pop().unwrap_or_default(),
        };
    }
    let output = writer.finish()?;
    bar.finish_and_clear();
    let readme = format!(
        "---\ntags:\n- merge\n- kernels-cli\n---\n# Merged model\n\nMade by `kernels merge` \
         (kernels-cli {}) from this configuration:\n\n```yaml\n{}\n```\n",
        env!("CARGO_PKG_VERSION"),
        config_text.trim_end()
    );
    write_side_files(&output, reference, model_config, out_type, &readme)?;
    let written_bytes = output.written_bytes();
    let out = output.commit()?;
    Ok(Summary {
        tensors,
        read_bytes,
        written_bytes,
        seconds: started.elapsed().as_secs_f64(),
        out,
    })
}

/// The checkpoints a merge reads, each opened once.
#[derive(Default)]
struct Checkpoints {
    all: Vec<Checkpoint>,
    paths: Vec<String>,
}

impl Checkpoints {
    /// The index of `path`, opening it the first time.
    fn open(&mut self, path: &str, what: &str) -> Result<usize> {
        if let Some(i) = self.paths.iter().position(|p| p == path) {
            return Ok(i);
        }
        let c = Checkpoint::open(Path::new(path)).with_context(|| format!("{what} '{path}'"))?;
        self.all.push(c);
        self.paths.push(path.to_string());
        Ok(self.all.len() - 1)
    }

    fn index(&self, path: &str) -> usize {
        self.paths
            .iter()
            .position(|p| p == path)
            .expect("opened before planning")
    }
}

/// The decoder layers of a checkpoint: one past the largest `layers.N.` in its tensor names (what
/// is there to merge, whatever its config says).
fn layer_count(c: &Checkpoint) -> usize {
    c.tensors()
        .keys()
        .filter_map(|n| layer_index(n))
        .max()
        .map_or(0, |m| m + 1)
}

/// One output tensor: what it is, which tensors of which checkpoints it merges (in the slice
/// config's order: the base first where there is one), its layer position and slice.
struct TensorPlan {
    out: PlannedTensor,
    inputs: Vec<(usize, String)>,
    t: f64,
    slice: usize,
}

struct MergePlan {
    tensors: Vec<TensorPlan>,
    /// The checkpoint whose config and tokenizer the output takes.
    reference: usize,
}

/// The output's tensors: the embeddings from the first slice's sources (at `t = 0`), each
/// slice's layers renumbered from where the previous slice ended (layer `i` of `n` at
/// `t = i / (n - 1)`), the other tensors outside the layers (final norm, `lm_head`) from the
/// last slice's sources (at `t = 1`).
fn plan_tensors(
    config: &MergeConfig,
    checkpoints: &Checkpoints,
    out_type: Option<ElementType>,
) -> Result<MergePlan> {
    let slices = &config.slices;
    let order = |k: usize| -> Vec<(usize, usize)> {
        // The slice's sources in its config's order: the base first, then the rest.
        let c = config.for_slice(k);
        let mut sources = Vec::new();
        if config.method.needs_base()
            && let Some(base) = &config.base_model
        {
            let s = slices[k]
                .sources
                .iter()
                .find(|s| &s.path == base)
                .expect("checked");
            sources.push((checkpoints.index(base), s.layer_range.expect("a range").0));
        }
        for m in &c.models {
            sources.push((
                checkpoints.index(&m.path),
                m.layer_range.expect("a range").0,
            ));
        }
        sources
    };
    let reference = order(0)[0].0;
    let mut tensors = Vec::new();
    let outside = |k: usize, pre: bool, t: f64, tensors: &mut Vec<TensorPlan>| -> Result<()> {
        let sources = order(k);
        let first = &checkpoints.all[sources[0].0];
        for (name, entry) in first.tensors() {
            if layer_index(name).is_some() || name.contains("embed") != pre {
                continue;
            }
            let inputs = sources.iter().map(|&(c, _)| (c, name.clone())).collect();
            tensors.push(plan_one(
                checkpoints,
                name.clone(),
                entry,
                inputs,
                t,
                k,
                out_type,
            )?);
        }
        Ok(())
    };
    outside(0, true, 0.0, &mut tensors)?;
    let mut next_layer = 0usize;
    for k in 0..slices.len() {
        let sources = order(k);
        let n = slices[k].len();
        let first = &checkpoints.all[sources[0].0];
        for i in 0..n {
            let t = if n > 1 {
                i as f64 / (n - 1) as f64
            } else {
                0.0
            };
            let layer = sources[0].1 + i;
            let before = tensors.len();
            for (name, entry) in first.tensors() {
                if layer_index(name) != Some(layer) {
                    continue;
                }
                let inputs = sources
                    .iter()
                    .map(|&(c, start)| (c, renumber(name, start + i)))
                    .collect();
                let out = renumber(name, next_layer + i);
                tensors.push(plan_one(checkpoints, out, entry, inputs, t, k, out_type)?);
            }
            if tensors.len() == before {
                bail!(
                    "model '{}' has no layer {layer} (slice {} takes layers {:?})",
                    first.dir.display(),
                    k + 1,
                    slices[k]
                        .sources
                        .iter()
                        .find_map(|s| s.layer_range)
                        .unwrap_or_default()
                );
            }
        }
        next_layer += n;
    }
    outside(slices.len() - 1, false, 1.0, &mut tensors)?;
    if tensors.is_empty() {
        bail!(
            "'{}' holds no tensors",
            checkpoints.all[reference].dir.display()
        );
    }
    Ok(MergePlan { tensors, reference })
}

/// One output tensor, its inputs checked: present in each checkpoint, with the same shape.
fn plan_one(
    checkpoints: &Checkpoints,
    out: String,
    entry: &TensorEntry,
    inputs: Vec<(usize, String)>,
    t: f64,
    slice: usize,
    out_type: Option<ElementType>,
) -> Result<TensorPlan> {
    for (c, input) in &inputs {
        let c = &checkpoints.all[*c];
        match c.tensors().get(input) {
            None => bail!(
                "tensor '{input}' is missing from model '{}'",
                c.dir.display()
            ),
            Some(other) if other.shape != entry.shape => bail!(
                "tensor '{input}' has shape {:?} in model '{}' but {:?} in the slice's first source",
                other.shape,
                c.dir.display(),
                entry.shape
            ),
            Some(_) => {}
        }
    }
    Ok(TensorPlan {
        out: PlannedTensor {
            name: out,
            shape: entry.shape.clone(),
            dtype: out_type.unwrap_or(entry.dtype),
        },
        inputs,
        t,
        slice,
    })
}

/// `name` with its `layers.N.` index replaced by `layer`.
fn renumber(name: &str, layer: usize) -> String {
    let at = name.find("layers.").expect("a layer tensor") + "layers.".len();
    let digits = name[at..].chars().take_while(char::is_ascii_digit).count();
    format!("{}{layer}{}", &name[..at], &name[at + digits..])
}

/// The `compeft` method's decisions: each model's task vector streamed over the whole model
/// (two passes of ComPEFT's global top-k), in the merge's tensor order.
fn compeft_encoders(
    config: &MergeConfig,
    options: &MergeOptions,
    base: &Checkpoint,
    models: &[&Checkpoint],
) -> Result<Vec<CompeftEncoder>> {
    let cpu = &options.cpu;
    let alpha = config
        .global_parameter("alpha", "", 0.0, Some(1.0))
        .map_err(|e| anyhow!(e))?;
    let mut encoders = Vec::with_capacity(models.len());
    for (i, model) in models.iter().enumerate() {
        // A global top-k has one density per model: filters and gradients do not apply.
        let density = config
            .model_parameter(i, "density", "", 0.0, Some(0.1))
            .map_err(|e| anyhow!(e))?;
        let params = CompeftParams::default()
            .with_keep(KeepRule::Density(density))
            .with_alpha(alpha as f32);
        let mut plan = Compeft::new(params)
            .with_context(|| format!("ComPEFT of model '{}'", model.dir.display()))?;
        loop {
            for name in base.tensors().keys() {
                let tau = task_vector(cpu, base, model, name)?;
                plan.feed(cpu, &tau)
                    .with_context(|| format!("tensor '{name}' of '{}'", model.dir.display()))?;
            }
            if !plan.next_pass()? {
                break;
            }
        }
        encoders.push(CompeftEncoder::new(&plan.finish()?));
    }
    Ok(encoders)
}

/// Every checkpoint has exactly the reference's tensors, with the same shapes.
pub(crate) fn check_same_tensors<'a>(
    reference: &Checkpoint,
    all: impl Iterator<Item = &'a Checkpoint>,
) -> Result<()> {
    for c in all {
        for (name, entry) in reference.tensors() {
            match c.tensors().get(name) {
                None => bail!(
                    "tensor '{name}' is missing from model '{}' (it is in '{}')",
                    c.dir.display(),
                    reference.dir.display()
                ),
                Some(other) if other.shape != entry.shape => bail!(
                    "tensor '{name}' has shape {:?} in model '{}' but {:?} in '{}'",
                    other.shape,
                    c.dir.display(),
                    entry.shape,
                    reference.dir.display()
                ),
                Some(_) => {}
            }
        }
        if let Some(extra) = c
            .tensors()
            .keys()
            .find(|n| !reference.tensors().contains_key(*n))
        {
            bail!(
                "tensor '{extra}' of model '{}' is not in '{}'",
                c.dir.display(),
                reference.dir.display()
            );
        }
    }
    Ok(())
}

fn progress_bar(enabled: bool, total: u64) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Rounds tensors to the element type they are written as, reusing its buffers from tensor to
/// tensor (a fresh buffer per tensor would fault in a tensor's worth of new pages every time).
#[derive(Default)]
pub struct Narrower {
    f16: Vec<f16>,
    bf16: Vec<bf16>,
}

impl Narrower {
    /// The little-endian bytes of `values` rounded (to nearest even) to `dtype`, by the CPU
    /// backend's vectorised, threaded narrowing (a linear combination with the one weight 1,
    /// exact before the rounding); `f32` values are their own bytes.
    ///
    /// # Errors
    ///
    /// None in practice (one model, a finite weight); the op's `Result` is passed on.
    pub fn bytes<'a>(
        &'a mut self,
        cpu: &Cpu,
        values: &'a [f32],
        dtype: ElementType,
    ) -> Result<&'a [u8]> {
        fn narrowed<'b, O: Element>(
            cpu: &Cpu,
            values: &[f32],
            out: &'b mut Vec<O>,
        ) -> Result<&'b [u8]> {
            narrow_into(cpu, values, out)?;
            Ok(bytemuck::cast_slice(out))
        }
        match dtype {
            ElementType::F32 => Ok(bytemuck::cast_slice(values)),
            ElementType::F16 => narrowed(cpu, values, &mut self.f16),
            ElementType::BF16 => narrowed(cpu, values, &mut self.bf16),
        }
    }
}

/// `out` set to `values` rounded (to nearest even) to `O` by the CPU backend's vectorised,
/// threaded narrowing (a linear combination with the one weight 1, exact before the rounding).
fn narrow_into<O: Element>(cpu: &Cpu, values: &[f32], out: &mut Vec<O>) -> Result<()> {
    out.clear();
    out.resize(values.len(), O::from_f32(0.0));
    linear_combination(cpu, &[values], &[1.0], out)?;
    Ok(())
}

/// Buffers the writer thread has handed back, by element type, for the next tensors (fresh
/// ones would fault in a tensor's worth of new pages every time).
#[derive(Default)]
struct SpareBuffers {
    f32: Vec<Vec<f32>>,
    f16: Vec<Vec<f16>>,
    bf16: Vec<Vec<bf16>>,
}

impl SpareBuffers {
    fn put(&mut self, done: TensorBytes) {
        match done {
            TensorBytes::F32(v) => self.f32.push(v),
            TensorBytes::F16(v) => self.f16.push(v),
            TensorBytes::BF16(v) => self.bf16.push(v),
        }
    }

    /// `values` as `dtype`'s elements for the writer, rounded by the CPU backend's narrowing into
    /// a spare buffer (an `f32` output hands over `values` itself); and `values` back where it
    /// was not handed over.
    fn narrow(
        &mut self,
        cpu: &Cpu,
        values: Vec<f32>,
        dtype: ElementType,
    ) -> Result<(TensorBytes, Option<Vec<f32>>)> {
        fn narrowed<O: Element>(
            cpu: &Cpu,
            values: &[f32],
            spare: &mut Vec<Vec<O>>,
        ) -> Result<Vec<O>> {
            let mut out = spare.pop().unwrap_or_default();
            narrow_into(cpu, values, &mut out)?;
            Ok(out)
        }
        Ok(match dtype {
            ElementType::F32 => (TensorBytes::F32(values), None),
            ElementType::F16 => (
                TensorBytes::F16(narrowed(cpu, &values, &mut self.f16)?),
                Some(values),
            ),
            ElementType::BF16 => (
                TensorBytes::BF16(narrowed(cpu, &values, &mut self.bf16)?),
                Some(values),
            ),
        })
    }
}

/// `values` widened to `f32` by the CPU backend (vectorised, threaded).
///
/// # Errors
///
/// None in practice (one input, weight 1); the op's `Result` is passed on.
pub fn widen<T: Element>(cpu: &Cpu, values: &[T]) -> Result<Vec<f32>> {
    let mut out = vec![0.0f32; values.len()];
    linear_combination(cpu, &[values], &[1.0], &mut out)?;
    Ok(out)
}

/// The inputs of one tensor as slices of one element type (widened to `f32` where they differ).
enum Inputs<'a> {
    F32(Vec<Cow<'a, [f32]>>),
    F16(Vec<&'a [f16]>),
    BF16(Vec<&'a [bf16]>),
}

fn same_type<'a>(cpu: &Cpu, data: &'a [(TensorEntry, TensorData<'a>)]) -> Result<Inputs<'a>> {
    /// Every input as `T`, if all are stored as `T`.
    fn all_as<'a, T>(
        data: &'a [(TensorEntry, TensorData<'a>)],
        pick: impl Fn(&'a TensorData<'a>) -> Option<&'a [T]>,
    ) -> Option<Vec<&'a [T]>> {
        data.iter().map(|(_, d)| pick(d)).collect()
    }
    if let Some(v) = all_as(data, |d| match d {
        TensorData::F16(v) => Some(&v[..]),
        _ => None,
    }) {
        return Ok(Inputs::F16(v));
    }
    if let Some(v) = all_as(data, |d| match d {
        TensorData::BF16(v) => Some(&v[..]),
        _ => None,
    }) {
        return Ok(Inputs::BF16(v));
    }
    Ok(Inputs::F32(
        data.iter()
            .map(|(_, d)| d.as_f32(cpu))
            .collect::<Result<_>>()?,
    ))
}

fn merge_tensor(
    config: &MergeConfig,
    options: &MergeOptions,
    name: &str,
    shape: &[usize],
    t: f64,
    has_base: bool,
    data: &[(TensorEntry, TensorData<'_>)],
    state: &MethodState,
    buffers: &std::cell::RefCell<Buffers>,
) -> Result<Vec<f32>> {
    let job = Job {
        config,
        options,
        name,
        shape,
        t,
        state,
        buffers,
    };
    match same_type(&options.cpu, data)? {
        Inputs::F32(v) => {
            let views: Vec<&[f32]> = v.iter().map(|c| &c[..]).collect();
            job.run(has_base, &views)
        }
        Inputs::F16(v) => job.run(has_base, &v),
        Inputs::BF16(v) => job.run(has_base, &v),
    }
}

/// What mergekit's magnitude trimming keeps of `n` entries: `max(1, floor(density n))`.
fn trim_count(density: f64, n: usize) -> KeepRule {
    KeepRule::Count(((density * n as f64).floor() as u64).max(1).min(n as u64))
}

/// Elements of a tensor the task-arithmetic family merges at a time once the task vectors'
/// cuts are known (16 MiB of `f32` per model).
const FAMILY_CHUNK: usize = 1 << 22;

/// A task vector, ready for the chunked merge.
enum Prepared {
    /// Sparsified as a whole tensor.
    Whole(Vec<f32>),
    /// Computed chunk by chunk from the model and the base, trimmed by a magnitude cut if any.
    Streamed(Option<TopKApplier>),
}

struct Job<'a> {
    config: &'a MergeConfig,
    options: &'a MergeOptions,
    name: &'a str,
    shape: &'a [usize],
    t: f64,
    state: &'a MethodState,
    buffers: &'a std::cell::RefCell<Buffers>,
}

/// Tensor-sized buffers kept from tensor to tensor (fresh ones would fault in new pages for
/// every tensor: several seconds of a multi-GB merge).
#[derive(Default)]
struct Buffers {
    /// The merged tensor.
    out: Vec<f32>,
    /// A whole task vector, for its magnitude cut.
    tau: Vec<f32>,
}

impl Buffers {
    /// A buffer of `n` elements (contents unspecified: every user overwrites them all).
    fn take(buffer: &mut Vec<f32>, n: usize) -> Vec<f32> {
        let mut v = std::mem::take(buffer);
        v.resize(n, 0.0);
        v
    }
}

/// What a method prepares before the tensor loop.
enum MethodState {
    /// Nothing.
    None,
    /// `compeft`: one encoder per model, fed tensors in the merge's order.
    Compeft(std::cell::RefCell<Vec<CompeftEncoder>>),
    /// `fisher`: the Fisher diagonals.
    Fisher(FisherInputs),
    /// `opcm`: the merged task vectors, computed in a first pass.
    Opcm(OpcmScratch),
}

/// The `fisher` method's Fisher-diagonal checkpoints, one per model, and their squared norms
/// over the whole model when normalising.
struct FisherInputs {
    checkpoints: Vec<Checkpoint>,
    squared_norms: Option<Vec<f64>>,
}

impl FisherInputs {
    fn open(config: &MergeConfig, options: &MergeOptions, reference: &Checkpoint) -> Result<Self> {
        let mut checkpoints = Vec::with_capacity(config.models.len());
        for i in 0..config.models.len() {
            let path = config.model_path(i, "fisher").map_err(|e| anyhow!(e))?;
            let c = Checkpoint::open(Path::new(path))
                .with_context(|| format!("Fisher diagonals '{path}'"))?;
            checkpoints.push(c);
        }
        check_same_tensors(reference, checkpoints.iter())?;
        let normalize = config
            .global_parameter("normalize", "", 0.0, Some(0.0))
            .map_err(|e| anyhow!(e))?
            != 0.0;
        let squared_norms = if normalize {
            let mut norms = Vec::with_capacity(checkpoints.len());
            for c in &checkpoints {
                let mut sum = 0.0;
                for name in c.tensors().keys() {
                    sum += sum_squares(&options.cpu, &f32_tensor(&options.cpu, c, name)?)?;
                    // SAFETY: the copy above holds no borrow of the mapping.
                    unsafe { c.release(name) };
                }
                norms.push(sum);
            }
            Some(norms)
        } else {
            None
        };
        Ok(Self {
            checkpoints,
            squared_norms,
        })
    }
}

/// A tensor as `f32`, borrowed where it is stored as `f32` (and aligned), else widened.
pub(crate) fn f32_tensor<'a>(cpu: &Cpu, c: &'a Checkpoint, name: &str) -> Result<Cow<'a, [f32]>> {
    c.read(name)?.1.into_f32(cpu)
}

impl Job<'_> {
    fn ops(&self) -> Ops<'_> {
        Ops {
            cpu: &self.options.cpu,
            gpu: self.options.gpu.as_deref(),
        }
    }

    fn model_param(&self, model: usize, param: &str, default: Option<f64>) -> Result<f64> {
        self.config
            .model_parameter(model, param, self.name, self.t, default)
            .map_err(|e| anyhow!(e))
    }

    fn global_param(&self, param: &str, default: Option<f64>) -> Result<f64> {
        self.config
            .global_parameter(param, self.name, self.t, default)
            .map_err(|e| anyhow!(e))
    }

    fn weights(&self, count: usize) -> Result<Vec<f32>> {
        (0..count)
            .map(|i| self.model_param(i, "weight", None).map(|w| w as f32))
            .collect()
    }

    fn run<T: GpuElement>(&self, has_base: bool, inputs: &[&[T]]) -> Result<Vec<f32>> {
        let cpu = &self.options.cpu;
        let ops = self.ops();
        let n = inputs[0].len();
        let mut out = Buffers::take(&mut self.buffers.borrow_mut().out, n);
        let (base, models) = if has_base {
            (Some(inputs[0]), &inputs[1..])
        } else {
            (None, inputs)
        };
        match self.config.method {
            Method::Linear => {
                let mut weights = self.weights(models.len())?;
                if self.global_param("normalize", Some(1.0))? != 0.0 {
                    let sum: f64 = weights.iter().map(|&w| f64::from(w)).sum();
                    if sum == 0.0 {
                        bail!("the weights sum to zero; set normalize: false or change them");
                    }
                    for w in &mut weights {
                        *w = (f64::from(*w) / sum) as f32;
                    }
                }
                ops.linear_combination(models, &weights, &mut out)?;
            }
            Method::Passthrough => {
                let scale = self.model_param(0, "scale", Some(1.0))? as f32;
                ops.linear_combination(models, &[scale], &mut out)?;
            }
            Method::Slerp => {
                let t = self.global_param("t", None)? as f32;
                ops.slerp(base.expect("slerp has a base"), models[0], t, &mut out)?;
            }
            Method::ModelStock => {
                let base = base.expect("model_stock has a base");
                let filter_wise = self.global_param("filter_wise", Some(0.0))? != 0.0;
                if filter_wise && self.shape.len() >= 2 {
                    // A Gram matrix per row: too little work per row to pay a GPU round trip.
                    let cols = *self.shape.last().expect("2-D");
                    for (row, o) in out.chunks_mut(cols.max(1)).enumerate() {
                        let range = row * cols..(row + 1) * cols;
                        let rows: Vec<&[T]> = models.iter().map(|m| &m[range.clone()]).collect();
                        model_stock(cpu, &base[range], &rows, o)?;
                    }
                } else {
                    ops.model_stock(base, models, &mut out)?;
                }
            }
            Method::Fisher => {
                let MethodState::Fisher(inputs) = self.state else {
                    unreachable!("fisher prepares its diagonals")
                };
                let fishers = inputs
                    .checkpoints
                    .iter()
                    .map(|c| f32_tensor(cpu, c, self.name))
                    .collect::<Result<Vec<_>>>()?;
                let views: Vec<&[f32]> = fishers.iter().map(|f| &f[..]).collect();
                let floor = self.global_param("floor", Some(0.0))? as f32;
                let mut params = FisherParams::default().with_floor(floor);
                if let Some(norms) = &inputs.squared_norms {
                    params = params.with_normalization(norms);
                }
                let weights = self.weights(models.len())?;
                ops.fisher_merge(models, &views, &weights, params, &mut out)?;
                drop(fishers);
                for c in &inputs.checkpoints {
                    // SAFETY: the views of this tensor (`fishers`) are dropped.
                    unsafe { c.release(self.name) };
                }
            }
            Method::Opcm => {
                let MethodState::Opcm(scratch) = self.state else {
                    unreachable!("opcm prepares its merged task vectors")
                };
                let merged = scratch.read(self.name)?;
                let base = widen(cpu, base.expect("opcm has a base"))?;
                task_arithmetic(cpu, &base, &[&merged[..]], &[scratch.scale], 1.0, &mut out)?;
            }
            Method::Compeft => {
                let base = base.expect("compeft has a base");
                let lambda = self.global_param("lambda", Some(1.0))?;
                let weights = self.weights(models.len())?;
                for (o, b) in out.iter_mut().zip(base) {
                    *o = b.to_f32();
                }
                let shape: Vec<u64> = self.shape.iter().map(|&d| d as u64).collect();
                let MethodState::Compeft(encoders) = self.state else {
                    unreachable!("compeft prepares its encoders")
                };
                let mut encoders = encoders.borrow_mut();
                for ((m, encoder), w) in models.iter().zip(encoders.iter_mut()).zip(weights) {
                    let mut tau = vec![0.0f32; n];
                    linear_combination(cpu, &[*m, base], &[1.0, -1.0], &mut tau)?;
                    // The codes, packed and added straight from the packed form.
                    let packed = encoder.encode(cpu, &tau, &shape, TernaryLayout::Dense2Bit)?;
                    let packed = PackedTernary::new(cpu, &packed)?;
                    ternary_add(cpu, &mut out, &packed, (lambda * f64::from(w)) as f32)?;
                }
            }
            method => {
                let family = method
                    .task_arithmetic_family()
                    .expect("the rest are the family");
                self.task_arithmetic_family(family, base.expect("has a base"), models, &mut out)?;
            }
        }
        Ok(out)
    }

    fn task_arithmetic_family<T: GpuElement>(
        &self,
        (sparsify, consensus, normalize_default, rescale_default): (
            Option<Sparsify>,
            bool,
            bool,
            bool,
        ),
        base: &[T],
        models: &[&[T]],
        out: &mut [f32],
    ) -> Result<()> {
        let cpu = &self.options.cpu;
        let ops = self.ops();
        let n = base.len();
        let normalize =
            self.global_param("normalize", Some(f64::from(u8::from(normalize_default))))? != 0.0;
        let rescale =
            self.global_param("rescale", Some(f64::from(u8::from(rescale_default))))? != 0.0;
        let mut lambda = self.global_param("lambda", Some(1.0))?;
        if sparsify == Some(Sparsify::RankedRandom) {
            // mergekit's DELLA reads lambda from the first model's parameters.
            lambda = self.model_param(0, "lambda", Some(lambda))?;
        }
        let weights = self.weights(models.len())?;
        // Random drops, DELLA's rows, Breadcrumbs' two cuts and L1 rescales need a whole task
        // vector at once; magnitude trimming needs only its cut. Those are held whole, the rest
        // streams in chunks, so memory holds one f32 task vector at a time, not N.
        let mut prepared = Vec::with_capacity(models.len());
        for (i, m) in models.iter().enumerate() {
            let density = self.model_param(i, "density", Some(1.0))?;
            let sparse = sparsify.filter(|_| density < 1.0);
            prepared.push(match sparse {
                None => Prepared::Streamed(None),
                Some(Sparsify::Magnitude) if !rescale => {
                    let mut tau = Buffers::take(&mut self.buffers.borrow_mut().tau, n);
                    linear_combination(cpu, &[*m, base], &[1.0, -1.0], &mut tau)?;
                    let cut = topk_cut(cpu, &[&tau[..]], trim_count(density, n));
                    self.buffers.borrow_mut().tau = tau;
                    Prepared::Streamed(Some(TopKApplier::new(&cut?)))
                }
                Some(how) => {
                    let mut tau = vec![0.0f32; n];
                    linear_combination(cpu, &[*m, base], &[1.0, -1.0], &mut tau)?;
                    Prepared::Whole(self.sparsify(how, i, density, rescale, &tau)?)
                }
            });
        }
        let lambda = lambda as f32;
        let rule = TiesElection::default()
            .with_zero_sum_elects_positive(true)
            .with_normalize(normalize);
        let mut coefficients = weights.clone();
        if normalize && !consensus {
            let sum: f64 = coefficients.iter().map(|&w| f64::from(w)).sum();
            let divisor = if sum.abs() < 1e-8 { 1.0 } else { sum };
            for w in &mut coefficients {
                *w = (f64::from(*w) / divisor) as f32;
            }
        }
        let chunk = FAMILY_CHUNK.min(n).max(1);
        let mut buffers = vec![vec![0.0f32; chunk]; models.len()];
        let mut scratch = vec![0.0f32; chunk];
        for start in (0..n).step_by(chunk) {
            let range = start..(start + chunk).min(n);
            let len = range.len();
            for ((m, p), buffer) in models.iter().zip(&mut prepared).zip(&mut buffers) {
                let Prepared::Streamed(applier) = p else {
                    continue;
                };
                let pair = [&m[range.clone()], &base[range.clone()]];
                match applier {
                    None => linear_combination(cpu, &pair, &[1.0, -1.0], &mut buffer[..len])?,
                    Some(applier) => {
                        linear_combination(cpu, &pair, &[1.0, -1.0], &mut scratch[..len])?;
                        applier.keep(cpu, &scratch[..len], &mut buffer[..len])?;
                    }
                }
            }
            let views: Vec<&[f32]> = prepared
                .iter()
                .zip(&buffers)
                .map(|(p, buffer)| match p {
                    Prepared::Whole(tau) => &tau[range.clone()],
                    Prepared::Streamed(_) => &buffer[..len],
                })
                .collect();
            let base_chunk = widen(cpu, &base[range.clone()])?;
            let out = &mut out[range];
            if consensus {
                ops.ties_elect_with(&base_chunk, &views, &weights, lambda, rule, out)?;
            } else {
                ops.task_arithmetic(&base_chunk, &views, &coefficients, lambda, out)?;
            }
        }
        Ok(())
    }

    fn sparsify(
        &self,
        how: Sparsify,
        model: usize,
        density: f64,
        rescale: bool,
        tau: &[f32],
    ) -> Result<Vec<f32>> {
        let cpu = &self.options.cpu;
        let n = tau.len();
        let mut out = vec![0.0f32; n];
        let seed = mask_seed(self.options.seed, model, self.name);
        let l1 = if rescale {
            DareRescale::PreserveL1
        } else {
            DareRescale::None
        };
        match how {
            // Without rescale, magnitude trimming streams by its cut instead.
            Sparsify::Magnitude => {
                ties_trim(cpu, tau, trim_count(density, n), &mut out)?;
                preserve_l1(cpu, tau, &mut out)?;
            }
            Sparsify::MagnitudeOutliers => {
                let mut gamma = self.model_param(model, "gamma", Some(0.01))?;
                // mergekit drops fewer outliers where density + gamma exceeds 1.
                if density + gamma > 1.0 {
                    gamma = 1.0 - density;
                }
                breadcrumbs(cpu, tau, BreadcrumbsParams::new(density, gamma), &mut out)?;
                if rescale {
                    preserve_l1(cpu, tau, &mut out)?;
                }
            }
            Sparsify::Random => {
                let params = DareParams::new(1.0 - density, seed).with_rescale(l1);
                self.ops().dare(tau, params, &mut out)?;
            }
            Sparsify::RankedRandom => {
                let epsilon = self.model_param(model, "epsilon", Some(0.15))?;
                let cols = if self.shape.len() >= 2 {
                    *self.shape.last().expect("2-D")
                } else {
                    n
                };
                let params = DellaParams::new(density, epsilon, seed).with_rescale(l1);
                della(cpu, tau, cols, params, 0, &mut out)?;
            }
        }
        Ok(out)
    }
}

/// The files beside the weights: `model_config` (its dtype set to `out_type` when given), the
/// reference model's tokenizer files, and `readme` as `README.md`.
pub(crate) fn write_side_files(
    output: &OutputDir,
    reference: &Checkpoint,
    model_config: Option<serde_json::Value>,
    out_type: Option<ElementType>,
    readme: &str,
) -> Result<()> {
    if let Some(mut c) = model_config {
        if let (Some(t), Some(map)) = (out_type, c.as_object_mut()) {
            map.insert("torch_dtype".into(), t.torch_name().into());
            if map.contains_key("dtype") {
                map.insert("dtype".into(), t.torch_name().into());
            }
        }
        output.write_file("config.json", serde_json::to_string_pretty(&c)?.as_bytes())?;
    }
    for file in TOKENIZER_FILES {
        let from = reference.dir.join(file);
        if from.is_file() {
            std::fs::copy(&from, output.temp_dir().join(file))
                .with_context(|| format!("cannot copy '{}'", from.display()))?;
        }
    }
    output.write_file("README.md", readme.as_bytes())
}
