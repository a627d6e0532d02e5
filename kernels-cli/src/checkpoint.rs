//! A model directory on disk: `config.json` and `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Every shard is memory-mapped and its header checked by the
//! `safetensors` crate (offsets inside the file, contiguous, matching each shape); a tensor's bytes
//! are read only when a merge asks for them, so memory holds what the merge is working on, not
//! the model.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

/// The index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Bound on an index file's size (a 405B model's index is a few hundred KB).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;

/// The element types a merge reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementType {
    /// `F32`.
    F32,
    /// `F16`.
    F16,
    /// `BF16`.
    BF16,
}

impl ElementType {
    /// Bytes per element.
    #[must_use]
    pub fn size(self) -> usize {
        match self {
            ElementType::F32 => 4,
            ElementType::F16 | ElementType::BF16 => 2,
        }
    }

    /// The safetensors header's name.
    #[must_use]
    pub fn safetensors_name(self) -> &'static str {
        match self {
            ElementType::F32 => "F32",
            ElementType::F16 => "F16",
            ElementType::BF16 => "BF16",
        }
    }

    /// The name a Hugging Face `config.json` uses (`torch_dtype`).
    #[must_use]
    pub fn torch_name(self) -> &'static str {
        match self {
            ElementType::F32 => "float32",
            ElementType::F16 => "float16",
            ElementType::BF16 => "bfloat16",
        }
    }

    /// From a config's `dtype` (mergekit accepts the torch names and their short forms).
    #[must_use]
    pub fn from_config_name(name: &str) -> Option<Self> {
        match name {
            "float32" | "fp32" | "f32" => Some(ElementType::F32),
            "float16" | "fp16" | "f16" | "half" => Some(ElementType::F16),
            "bfloat16" | "bf16" => Some(ElementType::BF16),
            _ => None,
        }
    }

    fn from_safetensors(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(ElementType::F32),
            Dtype::F16 => Some(ElementType::F16),
            Dtype::BF16 => Some(ElementType::BF16),
            _ => None,
        }
    }
}

/// Where a tensor lives.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Which shard.
    pub shard: usize,
    /// Its element type.
    pub dtype: ElementType,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Byte range in the shard's file.
    pub bytes: std::ops::Range<usize>,
}

impl TensorEntry {
    /// Number of elements.
    #[must_use]
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether it has no elements.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A tensor's elements, widened or borrowed.
pub enum TensorData<'a> {
    /// `f32` elements.
    F32(std::borrow::Cow<'a, [f32]>),
    /// `f16` elements.
    F16(std::borrow::Cow<'a, [f16]>),
    /// `bf16` elements.
    BF16(std::borrow::Cow<'a, [bf16]>),
}

impl<'a> TensorData<'a> {
    /// The elements as `f32`: the same slice where they are `f32`, else widened by the CPU
    /// backend.
    ///
    /// # Errors
    ///
    /// None in practice; the widening op's `Result` is passed on.
    pub fn into_f32(self, cpu: &kernels_cpu::Cpu) -> Result<std::borrow::Cow<'a, [f32]>> {
        use std::borrow::Cow;
        Ok(match self {
            TensorData::F32(v) => v,
            TensorData::F16(v) => Cow::Owned(crate::merge::widen(cpu, &v)?),
            TensorData::BF16(v) => Cow::Owned(crate::merge::widen(cpu, &v)?),
        })
    }

    /// [`TensorData::into_f32`] of a borrowed tensor.
    ///
    /// # Errors
    ///
    /// As [`TensorData::into_f32`].
    pub fn as_f32(&self, cpu: &kernels_cpu::Cpu) -> Result<std::borrow::Cow<'_, [f32]>> {
        use std::borrow::Cow;
        Ok(match self {
            TensorData::F32(v) => Cow::Borrowed(&v[..]),
            TensorData::F16(v) => Cow::Owned(crate::merge::widen(cpu, v)?),
            TensorData::BF16(v) => Cow::Owned(crate::merge::widen(cpu, v)?),
        })
    }
}

/// An opened model directory.
pub struct Checkpoint {
    /// The directory.
    pub dir: PathBuf,
    shards: Vec<(PathBuf, Mmap)>,
    tensors: BTreeMap<String, TensorEntry>,
}

impl Checkpoint {
    /// Opens a local model directory.
    ///
    /// # Errors
    ///
    /// A path that is a URL or does not exist ("local paths only"), a directory without
    /// safetensors, an index naming files outside the directory or tensors its shards lack, a
    /// shard whose header is malformed or whose offsets lie, a tensor in two shards, an element
    /// type other than F32/F16/BF16.
    pub fn open(path: &Path) -> Result<Self> {
        let shown = path.display();
        if path.to_string_lossy().contains("://") {
            bail!("'{shown}': local paths only (this tool does not download models)");
        }
        if !path.is_dir() {
            bail!(
                "'{shown}' is not a local directory (local paths only: download a hub model first, \
                 e.g. with `huggingface-cli download`)"
            );
        }
        let index = path.join(INDEX_FILE);
        let files: Vec<String> = if index.is_file() {
            shard_files(&index)?
        } else if path.join(SINGLE_FILE).is_file() {
            vec![SINGLE_FILE.to_string()]
        } else {
            bail!("'{shown}' has neither {SINGLE_FILE} nor {INDEX_FILE}");
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (shard, file) in files.iter().enumerate() {
            let file_path = path.join(file);
            let handle = File::open(&file_path)
                .with_context(|| format!("cannot open '{}'", file_path.display()))?;
            // SAFETY: the map is read-only; a file truncated underneath us by another process
            // would fault, the same contract every mmap-based loader (safetensors, torch) has.
            let map = unsafe { Mmap::map(&handle) }
                .with_context(|| format!("cannot map '{}'", file_path.display()))?;
            // Merges read each tensor once, front to back: read ahead generously. Only a hint.
            #[cfg(unix)]
            let _ = map.advise(memmap2::Advice::Sequential);
            let entries = shard_tensors(&map, shard).with_context(|| {
                format!("'{}' is not a valid safetensors file", file_path.display())
            })?;
            for (name, entry) in entries {
                if tensors.insert(name.clone(), entry).is_some() {
                    bail!("tensor '{name}' is in more than one shard of '{shown}'");
                }
            }
            shards.push((file_path, map));
        }
        if index.is_file() {
            check_index_names(&index, &tensors)?;
        }
        Ok(Self {
            dir: path.to_path_buf(),
            shards,
            tensors,
        })
    }

    /// The tensors by name.
    #[must_use]
    pub fn tensors(&self) -> &BTreeMap<String, TensorEntry> {
        &self.tensors
    }

    /// The file holding a tensor.
    #[must_use]
    pub fn file_of(&self, entry: &TensorEntry) -> &Path {
        &self.shards[entry.shard].0
    }

    /// A tensor's elements: borrowed from the map where aligned, else copied.
    ///
    /// # Errors
    ///
    /// A name the checkpoint lacks.
    pub fn read(&self, name: &str) -> Result<(TensorEntry, TensorData<'_>)> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("tensor '{name}' is missing from '{}'", self.dir.display()))?
            .clone();
        let bytes = &self.shards[entry.shard].1[entry.bytes.clone()];
        let data = match entry.dtype {
            ElementType::F32 => TensorData::F32(cast(bytes)),
            ElementType::F16 => TensorData::F16(cast(bytes)),
            ElementType::BF16 => TensorData::BF16(cast(bytes)),
        };
        Ok((entry, data))
    }

    /// Drops a tensor's pages from this process's mapping once a merge is done with them: they
    /// stay in the page cache, but no longer count towards this process's resident memory, so
    /// a merge's peak RSS is a few tensors, not the models it has read. A no-op off Unix.
    ///
    /// # Safety
    ///
    /// No slice returned by [`Checkpoint::read`] for this tensor may be alive (the pages of a
    /// read-only shared file mapping fault back in with the same bytes, but a borrow across the
    /// call is not allowed by `madvise`'s contract).
    pub unsafe fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(entry) = self.tensors.get(name) {
            const PAGE: usize = 4096;
            let map = &self.shards[entry.shard].1;
            // Whole pages inside the tensor only: a neighbour's first or last page may still be
            // in use.
            let start = entry.bytes.start.div_ceil(PAGE) * PAGE;
            let end = (entry.bytes.end / PAGE) * PAGE;
            if end > start {
                // SAFETY: no borrow of these pages is alive (the caller's contract); the map is a
                // read-only shared file mapping, whose pages fault back in from the file.
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = name;
    }

    /// The directory's `config.json`, if it has one.
    ///
    /// # Errors
    ///
    /// A `config.json` that is not JSON.
    pub fn config(&self) -> Result<Option<serde_json::Value>> {
        let path = self.dir.join("config.json");
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read '{}'", path.display()))?;
        let value = serde_json::from_str(&text)
            .with_context(|| format!("'{}' is not valid JSON", path.display()))?;
        Ok(Some(value))
    }
}

/// The tensors a safetensors file's bytes hold, checked by the `safetensors` crate (a header
/// of valid JSON within the file, offsets contiguous, inside the data and matching each shape),
/// as entries of shard `shard`: byte ranges into `bytes`, element types F32, F16 or BF16.
///
/// # Errors
///
/// A malformed header, lying offsets, another element type.
pub fn shard_tensors(bytes: &[u8], shard: usize) -> Result<Vec<(String, TensorEntry)>> {
    let (header_len, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| anyhow!("{e}"))?;
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in metadata.tensors() {
        let dtype = ElementType::from_safetensors(info.dtype).ok_or_else(|| {
            anyhow!(
                "tensor '{name}' is {:?}; merges read F32, F16 and BF16",
                info.dtype
            )
        })?;
        let (start, end) = info.data_offsets;
        let entry = TensorEntry {
            shard,
            dtype,
            shape: info.shape.clone(),
            bytes: data_start + start..data_start + end,
        };
        out.push((name, entry));
    }
    Ok(out)
}

/// Elements of `bytes` (whose length the header check made a multiple of the size), borrowed
/// when aligned.
fn cast<T: bytemuck::Pod>(bytes: &[u8]) -> std::borrow::Cow<'_, [T]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(slice) => std::borrow::Cow::Borrowed(slice),
        Err(_) => std::borrow::Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}

/// The shard files an index names, in first-mention order; each must be a plain file name.
fn shard_files(index: &Path) -> Result<Vec<String>> {
    let map = index_map(index)?;
    let mut files: Vec<String> = Vec::new();
    for file in map.values() {
        if !files.contains(file) {
            files.push(file.clone());
        }
    }
    Ok(files)
}

fn index_map(index: &Path) -> Result<BTreeMap<String, String>> {
    let shown = index.display();
    let size = std::fs::metadata(index)?.len();
    if size > MAX_INDEX_BYTES {
        bail!("'{shown}' is {size} bytes, over the {MAX_INDEX_BYTES} an index can need");
    }
    let text = std::fs::read_to_string(index).with_context(|| format!("cannot read '{shown}'"))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("'{shown}' is not valid JSON"))?;
    parse_index(&value).with_context(|| format!("'{shown}' is not a safetensors index"))
}

/// The `weight_map` of an index: tensor name to a plain shard file name.
///
/// ```
/// use kernels_cli::checkpoint::parse_index;
/// let index = serde_json::json!({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}});
/// assert_eq!(parse_index(&index)?["lm_head.weight"], "model-00002-of-00002.safetensors");
/// // A shard outside the model's directory is refused.
/// assert!(parse_index(&serde_json::json!({"weight_map": {"w": "../x.safetensors"}})).is_err());
/// # Ok::<(), anyhow::Error>(())
/// ```
///
/// # Errors
///
/// No `weight_map` object, a value that is not a string, or a file name that is not a plain
/// `*.safetensors` name in the same directory.
pub fn parse_index(value: &serde_json::Value) -> Result<BTreeMap<String, String>> {
    let map = value
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| anyhow!("no 'weight_map' object"))?;
    let mut out = BTreeMap::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| anyhow!("the shard of '{name}' is not a string"))?;
        let plain = !file.is_empty()
            && !file.contains(['/', '\\'])
            && file != ".."
            && file.ends_with(".safetensors");
        if !plain {
            bail!("the shard '{file}' of '{name}' is not a plain .safetensors file name");
        }
        out.insert(name.clone(), file.to_string());
    }
    Ok(out)
}

fn check_index_names(index: &Path, tensors: &BTreeMap<String, TensorEntry>) -> Result<()> {
    for (name, file) in index_map(index)? {
        if !tensors.contains_key(&name) {
            bail!(
                "'{}' lists tensor '{name}' in '{file}', which does not hold it",
                index.display()
            );
        }
    }
    Ok(())
}
