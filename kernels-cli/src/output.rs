//! The output directory: safetensors shards written tensor by tensor into a temporary directory
//! beside the target, renamed onto the target only once everything is on disk. A failed or
//! interrupted run leaves nothing under the target's name (an interrupted one leaves the
//! temporary directory, named `.<target>.partial-<pid>`).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::checkpoint::ElementType;

/// One output tensor, planned before any is written (a shard's header comes first).
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    /// Name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: ElementType,
}

impl PlannedTensor {
    fn bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// Removes the temporary directory unless the output was committed.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Writes the planned tensors, in order, into shards of at most `shard_bytes` (a tensor larger
/// than that gets a shard of its own), then the index.
pub struct OutputDir {
    target: PathBuf,
    temp: PathBuf,
    cleanup: Cleanup,
    shards: Vec<Vec<PlannedTensor>>,
    shard_names: Vec<String>,
    next: (usize, usize),
    writer: Option<BufWriter<File>>,
    written_bytes: u64,
    stem: String,
}

impl OutputDir {
    /// Prepares the output of `plan` for `target`, as a model's weights (`model.safetensors`, or
    /// `model-00001-of-0000N.safetensors` and `model.safetensors.index.json`).
    ///
    /// # Errors
    ///
    /// An existing target without `force`, a target whose parent does not exist, a duplicate
    /// tensor name, a temporary directory that cannot be made.
    pub fn create(
        target: &Path,
        force: bool,
        shard_bytes: u64,
        plan: Vec<PlannedTensor>,
    ) -> Result<Self> {
        Self::create_named(target, force, shard_bytes, plan, "model")
    }

    /// [`OutputDir::create`] with another file stem (`adapter_model` for a PEFT adapter).
    ///
    /// # Errors
    ///
    /// As [`OutputDir::create`].
    pub fn create_named(
        target: &Path,
        force: bool,
        shard_bytes: u64,
        plan: Vec<PlannedTensor>,
        stem: &str,
    ) -> Result<Self> {
        if target.exists() && !force {
            bail!(
                "'{}' already exists; pass --force to replace it",
                target.display()
            );
        }
        let name = target
            .file_name()
            .ok_or_else(|| anyhow::anyhow!("'{}' is not a directory name", target.display()))?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            bail!("the parent of '{}' does not exist", target.display());
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in &plan {
            if !seen.insert(t.name.as_str()) {
                bail!("two output tensors are named '{}'", t.name);
            }
        }
        let temp = parent.join(format!(
            ".{}.partial-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        if temp.exists() {
            fs::remove_dir_all(&temp)?;
        }
        fs::create_dir(&temp).with_context(|| format!("cannot create '{}'", temp.display()))?;
        let shards = pack(plan, shard_bytes.max(1));
        let count = shards.len();
        let shard_names = (0..count)
            .map(|i| {
                if count == 1 {
                    format!("{stem}.safetensors")
                } else {
                    format!("{stem}-{:05}-of-{count:05}.safetensors", i + 1)
                }
            })
            .collect();
        Ok(Self {
            target: target.to_path_buf(),
            cleanup: Cleanup(Some(temp.clone())),
            temp,
            shards,
            shard_names,
            next: (0, 0),
            writer: None,
            written_bytes: 0,
            stem: stem.to_string(),
        })
    }

    /// The temporary directory, for the other files of the output.
    #[must_use]
    pub fn temp_dir(&self) -> &Path {
        &self.temp
    }

    /// Bytes of tensor data written so far.
    #[must_use]
    pub fn written_bytes(&self) -> u64 {
        self.written_bytes
    }

    /// The next tensor to write.
    #[must_use]
    pub fn next_tensor(&self) -> Option<&PlannedTensor> {
        self.shards
            .get(self.next.0)
            .and_then(|s| s.get(self.next.1))
    }

    /// Writes the next planned tensor's bytes (little-endian elements of its type).
    ///
    /// # Errors
    ///
    /// Bytes of the wrong length, a tensor beyond the plan, an I/O error.
    pub fn write_next(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(planned) = self.next_tensor().cloned() else {
            bail!("more tensors written than planned");
        };
        if bytes.len() as u64 != planned.bytes() {
            bail!(
                "tensor '{}' has {} bytes, planned {}",
                planned.name,
                bytes.len(),
                planned.bytes()
            );
        }
        if self.next.1 == 0 {
            self.start_shard()?;
        }
        let writer = self.writer.as_mut().expect("a shard is open");
        writer.write_all(bytes)?;
        self.written_bytes += bytes.len() as u64;
        self.next.1 += 1;
        if self.next.1 == self.shards[self.next.0].len() {
            self.finish_shard()?;
            self.next = (self.next.0 + 1, 0);
        }
        Ok(())
    }

    fn start_shard(&mut self) -> Result<()> {
        let shard = &self.shards[self.next.0];
        let path = self.temp.join(&self.shard_names[self.next.0]);
        let mut header = serde_json::Map::new();
        let mut metadata = serde_json::Map::new();
        metadata.insert("format".into(), "pt".into());
        header.insert("__metadata__".into(), metadata.into());
        let mut offset = 0u64;
        for t in shard {
            let end = offset + t.bytes();
            header.insert(
                t.name.clone(),
                serde_json::json!({
                    "dtype": t.dtype.safetensors_name(),
                    "shape": t.shape,
                    "data_offsets": [offset, end],
                }),
            );
            offset = end;
        }
        let mut json = serde_json::to_vec(&serde_json::Value::Object(header))?;
        // The data that follows starts 8-byte aligned, so readers can map it in place.
        while (json.len() + 8) % 8 != 0 {
            json.push(b' ');
        }
        let file =
            File::create(&path).with_context(|| format!("cannot create '{}'", path.display()))?;
        let mut writer = BufWriter::with_capacity(8 << 20, file);
        writer.write_all(&(json.len() as u64).to_le_bytes())?;
        writer.write_all(&json)?;
        self.writer = Some(writer);
        Ok(())
    }

    fn finish_shard(&mut self) -> Result<()> {
        if let Some(writer) = self.writer.take() {
            let file = writer
                .into_inner()
                .map_err(std::io::IntoInnerError::into_error)?;
            file.sync_all()?;
        }
        Ok(())
    }

    /// Writes a small file (config, README, tokenizer) into the output.
    ///
    /// # Errors
    ///
    /// An I/O error.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        fs::write(self.temp.join(name), bytes)
            .with_context(|| format!("cannot write '{name}' into the output"))
    }

    /// Writes the index (sharded output), then renames the temporary directory onto the target
    /// (replacing an existing one only now, with `--force`).
    ///
    /// # Errors
    ///
    /// Tensors still unwritten, an I/O error.
    pub fn commit(mut self) -> Result<PathBuf> {
        if let Some(t) = self.next_tensor() {
            bail!("tensor '{}' was planned but never written", t.name);
        }
        if self.shards.len() > 1 {
            let mut weight_map = BTreeMap::new();
            let mut total = 0u64;
            for (shard, file) in self.shards.iter().zip(&self.shard_names) {
                for t in shard {
                    weight_map.insert(t.name.clone(), file.clone());
                    total += t.bytes();
                }
            }
            let index = serde_json::json!({
                "metadata": {"total_size": total},
                "weight_map": weight_map,
            });
            let index_file = format!("{}.safetensors.index.json", self.stem);
            self.write_file(
                &index_file,
                serde_json::to_string_pretty(&index)?.as_bytes(),
            )?;
        }
        if self.target.exists() {
            let old = self.temp.with_extension("replaced");
            fs::rename(&self.target, &old)?;
            fs::rename(&self.temp, &self.target)?;
            fs::remove_dir_all(&old)?;
        } else {
            fs::rename(&self.temp, &self.target).with_context(|| {
                format!("cannot move the output onto '{}'", self.target.display())
            })?;
        }
        self.cleanup.0 = None;
        Ok(self.target.clone())
    }
}

/// A tensor's elements as the type it is written as, owned so that a writer thread can take it
/// and hand the buffer back for the next tensor.
#[derive(Debug)]
pub enum TensorBytes {
    /// `f32` elements.
    F32(Vec<f32>),
    /// `f16` elements.
    F16(Vec<half::f16>),
    /// `bf16` elements.
    BF16(Vec<half::bf16>),
}

impl TensorBytes {
    /// The little-endian bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::F32(v) => bytemuck::cast_slice(v),
            Self::F16(v) => bytemuck::cast_slice(v),
            Self::BF16(v) => bytemuck::cast_slice(v),
        }
    }
}

/// An [`OutputDir`] written by a thread of its own: computing the next tensor overlaps writing
/// this one (a write is a copy into the page cache, or a wait on the disk, that the merge's
/// threads need not sit through). One tensor is written while the next is computed; handing
/// over another waits for the writer.
pub struct WriteBehind {
    to_writer: Option<std::sync::mpsc::SyncSender<TensorBytes>>,
    written: std::sync::mpsc::Receiver<TensorBytes>,
    writer: Option<std::thread::JoinHandle<Result<OutputDir>>>,
}

impl WriteBehind {
    /// Starts the writer thread over `output`.
    ///
    /// # Errors
    ///
    /// A thread that cannot be spawned.
    pub fn start(mut output: OutputDir) -> Result<Self> {
        let (to_writer, from_main) = std::sync::mpsc::sync_channel::<TensorBytes>(0);
        let (to_main, written) = std::sync::mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("kernels-writer".into())
            .spawn(move || {
                for tensor in from_main {
                    output.write_next(tensor.as_bytes())?;
                    // The main thread may have stopped taking buffers back; that is fine.
                    let _ = to_main.send(tensor);
                }
                Ok(output)
            })
            .context("cannot start the writer thread")?;
        Ok(Self {
            to_writer: Some(to_writer),
            written,
            writer: Some(writer),
        })
    }

    /// Hands the next planned tensor to the writer, once it has finished the one before.
    ///
    /// # Errors
    ///
    /// The writer's error, if it has stopped on one.
    pub fn write_next(&mut self, tensor: TensorBytes) -> Result<()> {
        let sent = self.to_writer.as_ref().map(|s| s.send(tensor));
        if matches!(sent, Some(Ok(()))) {
            return Ok(());
        }
        // The writer has stopped: its error says why.
        self.finish()
            .and_then(|_| bail!("the writer thread stopped early"))
    }

    /// A buffer the writer is done with, if any, for the next tensor.
    #[must_use]
    pub fn recycled(&self) -> Option<TensorBytes> {
        self.written.try_recv().ok()
    }

    /// Waits for every tensor handed over to be written and returns the output.
    ///
    /// # Errors
    ///
    /// The writer's error.
    pub fn finish(&mut self) -> Result<OutputDir> {
        drop(self.to_writer.take());
        match self.writer.take().map(std::thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("the writer thread panicked"),
            None => bail!("the writer thread has already finished"),
        }
    }
}

impl Drop for WriteBehind {
    /// Stops and joins the writer, so that a failed run's [`OutputDir`] is dropped (its
    /// temporary directory removed) before the process goes on.
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = self.finish();
        }
    }
}

/// Greedy packing in order: a shard closes before a tensor that would take it past `limit`.
fn pack(plan: Vec<PlannedTensor>, limit: u64) -> Vec<Vec<PlannedTensor>> {
    let mut shards: Vec<Vec<PlannedTensor>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in plan {
        let bytes = t.bytes();
        if size > 0 && size + bytes > limit {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("one shard").push(t);
    }
    shards
}
