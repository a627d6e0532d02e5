//! `kernels compress` and `kernels apply`: a fine-tune's task vector ComPEFT-compressed over the
//! whole model (global top-k by magnitude, `alpha * std` as the one scale), each tensor in the
//! packed ternary format, and added back onto a base.
//!
//! The compressed file is a safetensors file (so any safetensors reader lists it) whose tensors
//! are the packed ternary bytes (`U8`, one per model tensor, under the tensor's name) and whose
//! metadata says `format: kernels-compeft`, the version, the density, alpha and scale. Its
//! tensors' packed bytes are validated by `PackedTernary` before use. The packed bytes are held
//! in memory until written (about `bits per parameter / 16` of a bf16 model).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use kernels_core::format::entropy_bits_per_param;
use kernels_cpu::prelude::*;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::checkpoint::{Checkpoint, TensorData};
use crate::merge::{check_same_tensors, write_side_files};
use crate::output::{OutputDir, PlannedTensor};

/// The metadata value naming this file format.
pub const FORMAT: &str = "kernels-compeft";
/// The version written and accepted.
pub const VERSION: &str = "1";

/// What `compress` did.
#[derive(Clone, Debug, PartialEq)]
pub struct CompressSummary {
    /// Parameters of the task vector.
    pub parameters: u64,
    /// Non-zero codes kept.
    pub kept: u64,
    /// Bytes of packed tensors written.
    pub packed_bytes: u64,
    /// Bytes the task vector takes in the fine-tune's own element types.
    pub original_bytes: u64,
    /// `||tau - tau_hat||_2 / ||tau||_2` over the whole model.
    pub relative_error: f64,
    /// The layout chosen.
    pub layout: TernaryLayout,
    /// Wall time, seconds.
    pub seconds: f64,
}

impl CompressSummary {
    /// Bits per parameter of the packed tensors (headers included).
    #[must_use]
    pub fn bits_per_parameter(&self) -> f64 {
        8.0 * self.packed_bytes as f64 / self.parameters.max(1) as f64
    }
}

/// The packed layout for a model kept at density `d`: Golomb-Rice coded gaps where their
/// expected size (the entropy bound plus a tenth, a margin over the coder's measured 2 %) is below the
/// dense layout's 2 bits per parameter.
///
/// ```
/// use kernels_cli::compeft::layout_for_density;
/// use kernels_cpu::prelude::TernaryLayout;
/// // The entropy bound peaks at 1.58 bits per entry (d = 2/3): Rice wins at every density.
/// for d in [0.01, 0.1, 0.5, 2.0 / 3.0, 1.0] {
///     assert_eq!(layout_for_density(d), TernaryLayout::SparseRice);
/// }
/// ```
#[must_use]
pub fn layout_for_density(d: f64) -> TernaryLayout {
    if 1.1 * entropy_bits_per_param(d) < 2.0 {
        TernaryLayout::SparseRice
    } else {
        TernaryLayout::Dense2Bit
    }
}

/// `tau = finetuned - base` of one tensor, in `f32` (the tensor's pages released after).
pub(crate) fn task_vector(
    cpu: &Cpu,
    base: &Checkpoint,
    tuned: &Checkpoint,
    name: &str,
) -> Result<Vec<f32>> {
    let (_, b) = base.read(name)?;
    let (entry, t) = tuned.read(name)?;
    let mut tau = vec![0.0f32; entry.len()];
    match (&b, &t) {
        (TensorData::BF16(b), TensorData::BF16(t)) => {
            linear_combination(cpu, &[&t[..], &b[..]], &[1.0, -1.0], &mut tau)?;
        }
        (TensorData::F16(b), TensorData::F16(t)) => {
            linear_combination(cpu, &[&t[..], &b[..]], &[1.0, -1.0], &mut tau)?;
        }
        _ => {
            let (b, t) = (b.as_f32(cpu)?, t.as_f32(cpu)?);
            linear_combination(cpu, &[&t[..], &b[..]], &[1.0, -1.0], &mut tau)?;
        }
    }
    drop((b, t));
    // SAFETY: the borrows of this tensor's bytes are dropped.
    unsafe {
        base.release(name);
        tuned.release(name);
    }
    Ok(tau)
}

/// Compresses `finetuned - base` into `out` (a file, written atomically: a temporary file beside
/// it, renamed at the end).
///
/// # Errors
///
/// Models that cannot be opened or whose tensors differ, a density or alpha outside ComPEFT's
/// domain, a non-finite task vector entry, an existing `out` without `force`, an I/O error.
pub fn compress(
    cpu: &Cpu,
    base: &Path,
    finetuned: &Path,
    out: &Path,
    params: CompeftParams,
    force: bool,
) -> Result<CompressSummary> {
    let started = Instant::now();
    if out.exists() && !force {
        bail!(
            "'{}' already exists; pass --force to replace it",
            out.display()
        );
    }
    let base = Checkpoint::open(base).with_context(|| format!("base '{}'", base.display()))?;
    let tuned = Checkpoint::open(finetuned)
        .with_context(|| format!("fine-tune '{}'", finetuned.display()))?;
    check_same_tensors(&base, std::iter::once(&tuned))?;
    let names: Vec<String> = base.tensors().keys().cloned().collect();
    let mut plan = Compeft::new(params)?;
    loop {
        for name in &names {
            let tau = task_vector(cpu, &base, &tuned, name)?;
            plan.feed(cpu, &tau)
                .with_context(|| format!("tensor '{name}'"))?;
        }
        if !plan.next_pass()? {
            break;
        }
    }
    let decided = plan.finish()?;
    let parameters = decided.total;
    let k = params.keep.count(parameters)?.unwrap_or(parameters);
    let density = k as f64 / parameters.max(1) as f64;
    let layout = layout_for_density(density);
    let mut encoder = CompeftEncoder::new(&decided);
    let mut packed: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(names.len());
    let (mut error2, mut norm2, mut original_bytes, mut kept) = (0.0f64, 0.0f64, 0u64, 0u64);
    for name in &names {
        let entry = &tuned.tensors()[name];
        let tau = task_vector(cpu, &base, &tuned, name)?;
        let shape: Vec<u64> = entry.shape.iter().map(|&d| d as u64).collect();
        let bytes = encoder.encode(cpu, &tau, &shape, layout)?;
        // The error, from the packed bytes as `apply` will read them.
        let mut tau_hat = vec![0.0f32; tau.len()];
        let unpacked = PackedTernary::new(cpu, &bytes)?;
        kept += unpacked.header().nnz;
        ternary_add(cpu, &mut tau_hat, &unpacked, 1.0)?;
        let mut diff = vec![0.0f32; tau.len()];
        linear_combination(cpu, &[&tau[..], &tau_hat[..]], &[1.0, -1.0], &mut diff)?;
        error2 += sum_squares(cpu, &diff)?;
        norm2 += sum_squares(cpu, &tau)?;
        original_bytes += (entry.len() * entry.dtype.size()) as u64;
        packed.push((name.clone(), vec![bytes.len()], bytes));
    }
    let packed_bytes = packed.iter().map(|(_, _, b)| b.len() as u64).sum();
    let metadata: std::collections::HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("version", VERSION.to_string()),
        ("density", density.to_string()),
        ("alpha", params.alpha.to_string()),
        ("scale", decided.scale.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let views = packed
        .iter()
        .map(|(name, shape, bytes)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::U8, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let temp = temporary_beside(out)?;
    let written = safetensors::serialize_to_file(views, Some(metadata), &temp)
        .map_err(|e| anyhow!("cannot write '{}': {e}", temp.display()))
        .and_then(|()| std::fs::rename(&temp, out).map_err(Into::into));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written.with_context(|| format!("writing '{}'", out.display()))?;
    Ok(CompressSummary {
        parameters,
        kept,
        packed_bytes,
        original_bytes,
        relative_error: if norm2 > 0.0 {
            (error2 / norm2).sqrt()
        } else {
            0.0
        },
        layout,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn temporary_beside(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| anyhow!("'{}' is not a file name", out.display()))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(parent.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// The packed tensors of a compressed file's bytes, by name: byte ranges into `bytes`. The
/// safetensors crate checks the header (offsets inside the data, contiguous); this checks the
/// format's metadata and that every tensor is `U8`. The packed bytes themselves are checked
/// when read (`PackedTernary::new`).
///
/// # Errors
///
/// Not a safetensors file, another format or version, a tensor that is not `U8`.
pub fn packed_tensors(bytes: &[u8]) -> Result<BTreeMap<String, std::ops::Range<usize>>> {
    let (header_len, metadata) = SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow!("not a valid safetensors file: {e}"))?;
    let meta = metadata.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT)
        || meta.get("version").map(String::as_str) != Some(VERSION)
    {
        bail!("not a {FORMAT} version {VERSION} file");
    }
    let mut tensors = BTreeMap::new();
    for (name, info) in metadata.tensors() {
        if info.dtype != Dtype::U8 {
            bail!("tensor '{name}' is not U8");
        }
        let (start, end) = info.data_offsets;
        tensors.insert(name, 8 + header_len + start..8 + header_len + end);
    }
    Ok(tensors)
}

/// A compressed task vector, mapped and checked: its metadata names this format and version,
/// and its tensors are `U8`.
pub struct Compressed {
    map: Mmap,
    tensors: BTreeMap<String, std::ops::Range<usize>>,
}

impl Compressed {
    /// Opens a file `compress` wrote.
    ///
    /// # Errors
    ///
    /// Not a safetensors file, another format or version, a tensor that is not `U8`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open '{}'", path.display()))?;
        // SAFETY: read-only map, as in `Checkpoint::open`.
        let map = unsafe { Mmap::map(&file) }?;
        let tensors = packed_tensors(&map)
            .with_context(|| format!("'{}' (made by `kernels compress`?)", path.display()))?;
        Ok(Self { map, tensors })
    }

    /// The packed bytes of each tensor, by name.
    #[must_use]
    pub fn tensors(&self) -> BTreeMap<&str, &[u8]> {
        self.tensors
            .iter()
            .map(|(n, r)| (n.as_str(), &self.map[r.clone()]))
            .collect()
    }
}

/// Adds a compressed task vector onto `base`, writing a model directory at `out` (atomically)
/// in the base's element types, with its config and tokenizer files. Returns the tensors written.
///
/// # Errors
///
/// A base or file that cannot be opened, tensors that differ between them (by name or element
/// count), packed bytes that do not decode, an existing `out` without `force`.
pub fn apply(
    cpu: &Cpu,
    base: &Path,
    compressed: &Path,
    out: &Path,
    lambda: f32,
    force: bool,
) -> Result<usize> {
    let base_dir = base;
    let base = Checkpoint::open(base).with_context(|| format!("base '{}'", base.display()))?;
    let file = Compressed::open(compressed)?;
    let packed = file.tensors();
    for name in base.tensors().keys() {
        if !packed.contains_key(name.as_str()) {
            bail!(
                "tensor '{name}' of the base is not in '{}'",
                compressed.display()
            );
        }
    }
    if let Some(extra) = packed.keys().find(|n| !base.tensors().contains_key(**n)) {
        bail!(
            "tensor '{extra}' of '{}' is not in the base",
            compressed.display()
        );
    }
    let plan = base
        .tensors()
        .iter()
        .map(|(name, e)| PlannedTensor {
            name: name.clone(),
            shape: e.shape.clone(),
            dtype: e.dtype,
        })
        .collect();
    let mut output = OutputDir::create(out, force, 5_000_000_000, plan)?;
    let mut count = 0;
    while let Some(next) = output.next_tensor().cloned() {
        let name = &next.name;
        let bytes = PackedTernary::new(cpu, packed[name.as_str()])
            .with_context(|| format!("tensor '{name}' of '{}'", compressed.display()))?;
        let (_, data) = base.read(name)?;
        let merged: Vec<u8> = match data {
            TensorData::F32(v) => add(cpu, v.into_owned(), &bytes, lambda, name)?,
            TensorData::F16(v) => add(cpu, v.into_owned(), &bytes, lambda, name)?,
            TensorData::BF16(v) => add(cpu, v.into_owned(), &bytes, lambda, name)?,
        };
        // SAFETY: the borrow of this tensor's bytes (`data`) was consumed above.
        unsafe { base.release(name) };
        output.write_next(&merged)?;
        count += 1;
    }
    let readme = format!(
        "---\ntags:\n- compeft\n- kernels-cli\n---\n# Model\n\nMade by `kernels apply` \
         (kernels-cli {}): the base '{}' plus {lambda} times the ComPEFT task vector '{}'.\n",
        env!("CARGO_PKG_VERSION"),
        base_dir.display(),
        compressed.display()
    );
    write_side_files(&output, &base, base.config()?, None, &readme)?;
    output.commit()?;
    Ok(count)
}

fn add<T: Element>(
    cpu: &Cpu,
    mut theta: Vec<T>,
    packed: &PackedTernary<'_>,
    lambda: f32,
    name: &str,
) -> Result<Vec<u8>> {
    ternary_add(cpu, &mut theta, packed, lambda).with_context(|| format!("tensor '{name}'"))?;
    Ok(bytemuck::cast_slice(&theta).to_vec())
}
