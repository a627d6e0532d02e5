//! `kernels calibrate`, `kernels eval` and `kernels generate`: `kernels-llm`'s decoder over a GGUF
//! model or a Hugging Face directory (dense, CATS or TEAL), as the library's public API offers
//! it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use kernels_core::bf16;
use kernels_cpu::Cpu;
use kernels_llm::calibrate::calibrate;
use kernels_llm::generate::{generate, perplexity};
use kernels_llm::gguf::Gguf;
use kernels_llm::gpu::GpuLlama;
use kernels_llm::model::{Decoder, Forward, LayerThresholds, Llama, OnCpu, Policy};
use kernels_llm::source::{Naming, TensorSource};
use kernels_llm::tokenizer::Tokenizer;
use kernels_wgpu::prelude::GpuElement;

use crate::checkpoint::Checkpoint;
use crate::device::{self, Device};

/// What names a thresholds file's format (its `format` field).
pub const THRESHOLDS_FORMAT: &str = "kernels-llm thresholds v1";

/// The options every decoding subcommand shares.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model: a GGUF file of the llama architecture (float tensors, or ggml's 8-bit and
    /// 4-bit blocks), or a Hugging Face directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Weight type the tensors are dequantised to.
    #[arg(long, value_enum, default_value_t = WeightType::Bf16)]
    pub dtype: WeightType,
    /// Threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where the decoder's matrix products run (`gpu`: through wgpu, with attention and norms
    /// on the CPU; `calibrate` runs on the CPU).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
}

/// Weight types the decoder holds.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightType {
    /// 32-bit floats.
    F32,
    /// bfloat16 (half the bytes per token).
    Bf16,
}

/// The sparse policies a thresholds file is calibrated for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SparsePolicy {
    /// CATS: the MLP's gate activation thresholded per layer.
    Cats,
    /// TEAL: every projection's input thresholded at its own magnitude.
    Teal,
}

impl SparsePolicy {
    fn policy(self) -> Policy {
        match self {
            Self::Cats => Policy::Cats,
            Self::Teal => Policy::Teal,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Cats => "cats",
            Self::Teal => "teal",
        }
    }
}

/// A model on disk: a GGUF file (memory-mapped) or a Hugging Face directory (`config.json`,
/// safetensors, `tokenizer.json`).
pub enum ModelFile {
    /// A GGUF file's bytes.
    Gguf(memmap2::Mmap),
    /// A Hugging Face directory.
    HuggingFace(Checkpoint),
}

/// A checkpoint's tensors as the decoder's loader reads them: widened to `f32` by the CPU
/// backend.
struct CheckpointTensors<'a> {
    checkpoint: &'a Checkpoint,
    cpu: Cpu,
}

impl TensorSource for CheckpointTensors<'_> {
    fn naming(&self) -> Naming {
        Naming::HuggingFace
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.checkpoint.tensors().get(name).map(|e| e.shape.clone())
    }

    fn read_f32(&self, name: &str) -> kernels_core::Result<Vec<f32>> {
        let unreadable = kernels_core::Error::BadFormat {
            offset: 0,
            reason: "a tensor the checkpoint cannot give as f32",
        };
        let (_, data) = self.checkpoint.read(name).map_err(|_| unreadable.clone())?;
        Ok(data
            .into_f32(&self.cpu)
            .map_err(|_| unreadable)?
            .into_owned())
    }
}

impl ModelFile {
    /// Maps a GGUF file, or opens a Hugging Face directory.
    ///
    /// # Errors
    ///
    /// A path that is neither a readable file nor a checkpoint directory with `config.json`.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            if !path.join("config.json").is_file() {
                bail!(
                    "'{}' is a directory without config.json: the decoder reads a GGUF file or \
                     a Hugging Face model directory",
                    path.display()
                );
            }
            return Ok(Self::HuggingFace(Checkpoint::open(path)?));
        }
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open the model '{}'", path.display()))?;
        // SAFETY: the mapping is read only, and the file is not expected to change while the
        // command runs (as with any memory-mapped model).
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map '{}'", path.display()))?;
        Ok(Self::Gguf(map))
    }

    fn gguf(map: &memmap2::Mmap) -> Result<Gguf<'_>> {
        Gguf::parse(map).context("not a readable GGUF file")
    }

    fn read(checkpoint: &Checkpoint, file: &str) -> Result<Vec<u8>> {
        let path = checkpoint.dir.join(file);
        std::fs::read(&path).with_context(|| format!("cannot read '{}'", path.display()))
    }

    /// The model's tokenizer: embedded in the GGUF file, or the directory's `tokenizer.json`
    /// (with `tokenizer_config.json` where there is one).
    ///
    /// # Errors
    ///
    /// A file that is not GGUF, a tokenizer missing or unreadable.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        Ok(match self {
            Self::Gguf(map) => Tokenizer::from_gguf(&Self::gguf(map)?)?,
            Self::HuggingFace(checkpoint) => {
                let tokenizer = Self::read(checkpoint, "tokenizer.json")?;
                let config = checkpoint.dir.join("tokenizer_config.json");
                let config = if config.is_file() {
                    Some(Self::read(checkpoint, "tokenizer_config.json")?)
                } else {
                    None
                };
                Tokenizer::from_json(&tokenizer, config.as_deref())
                    .context("tokenizer.json or tokenizer_config.json is unreadable")?
            }
        })
    }

    /// The model, its weights rounded to `W` and stored as `policy` reads them.
    ///
    /// # Errors
    ///
    /// The loaders' (an unsupported architecture, a tensor missing or misshapen).
    pub fn load<W: kernels_core::Element>(&self, policy: Policy) -> Result<Llama<W>> {
        Ok(match self {
            Self::Gguf(map) => Llama::from_gguf_with(&Self::gguf(map)?, policy)?,
            Self::HuggingFace(checkpoint) => {
                let config = Self::read(checkpoint, "config.json")?;
                let tensors = CheckpointTensors {
                    checkpoint,
                    cpu: Cpu::detect(),
                };
                Llama::from_hf(&config, &tensors, policy)
                    .with_context(|| format!("'{}'", checkpoint.dir.display()))?
            }
        })
    }
}

fn cpu_for(args: &ModelArgs) -> Result<Cpu> {
    let cpu = Cpu::detect();
    Ok(match args.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => {
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global();
            cpu.with_threads(n)?
        }
        None => cpu,
    }
    // A token is a few hundred small kernels microseconds apart.
    .with_spinning_team())
}

/// Runs `f` on `model` on the CPU, or with its products on `gpu` where there is one.
fn on_device<W: GpuElement, R>(
    model: &Llama<W>,
    cpu: &Cpu,
    gpu: Option<&kernels_wgpu::Context>,
    f: impl FnOnce(&mut dyn Forward) -> Result<R>,
) -> Result<R> {
    match gpu {
        None => f(&mut OnCpu { model, cpu }),
        Some(ctx) => f(&mut GpuLlama::new(ctx, model)
            .context("cannot upload the model to the GPU (try --device cpu)")?),
    }
}

/// A model of either weight type, so each command is written once.
enum Model {
    F32(Llama<f32>),
    Bf16(Llama<bf16>),
}

macro_rules! with_model {
    ($model:expr, $m:ident => $body:expr) => {
        match $model {
            Model::F32($m) => $body,
            Model::Bf16($m) => $body,
        }
    };
}

fn load(args: &ModelArgs, file: &ModelFile, policy: Policy) -> Result<Model> {
    Ok(match args.dtype {
        WeightType::F32 => Model::F32(file.load(policy)?),
        WeightType::Bf16 => Model::Bf16(file.load(policy)?),
    })
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the text '{}'", path.display()))
}

/// Thresholds as the file stores them.
fn thresholds_json(
    policy: SparsePolicy,
    sparsity: f64,
    layers: &[LayerThresholds],
) -> serde_json::Value {
    serde_json::json!({
        "format": THRESHOLDS_FORMAT,
        "policy": policy.name(),
        "sparsity": sparsity,
        "layers": layers.iter().map(|t| serde_json::json!({
            "gate_activation": t.gate_activation,
            "attention_input": t.attention_input,
            "attention_output": t.attention_output,
            "mlp_input": t.mlp_input,
            "down_input": t.down_input,
        })).collect::<Vec<_>>(),
    })
}

/// Reads a thresholds file: its policy and one [`LayerThresholds`] per layer.
///
/// # Errors
///
/// A file that is not JSON of [`THRESHOLDS_FORMAT`], an unknown policy, a threshold that is not
/// a number.
pub fn read_thresholds(path: &Path) -> Result<(Policy, Vec<LayerThresholds>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the thresholds '{}'", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("'{}' is not JSON", path.display()))?;
    if json["format"] != THRESHOLDS_FORMAT {
        bail!(
            "'{}' is not a thresholds file ({THRESHOLDS_FORMAT})",
            path.display()
        );
    }
    let policy = match json["policy"].as_str() {
        Some("cats") => Policy::Cats,
        Some("teal") => Policy::Teal,
        other => bail!(
            "'{}': unknown policy {other:?} (cats or teal)",
            path.display()
        ),
    };
    let layers = json["layers"]
        .as_array()
        .with_context(|| format!("'{}' has no layers", path.display()))?
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            let field = |name: &str| -> Result<f32> {
                layer[name]
                    .as_f64()
                    .map(|v| v as f32)
                    .with_context(|| format!("layer {i}: '{name}' is not a number"))
            };
            Ok(LayerThresholds {
                gate_activation: field("gate_activation")?,
                attention_input: field("attention_input")?,
                attention_output: field("attention_output")?,
                mlp_input: field("mlp_input")?,
                down_input: field("down_input")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((policy, layers))
}

/// `kernels calibrate` arguments.
#[derive(clap::Args, Debug)]
pub struct CalibrateArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The calibration text (a UTF-8 file).
    #[arg(long)]
    pub text: PathBuf,
    /// Share of each site's activations to skip, in [0, 1].
    #[arg(long, default_value_t = 0.5)]
    pub sparsity: f64,
    /// The sparse policy the thresholds are for.
    #[arg(long, value_enum)]
    pub policy: SparsePolicy,
    /// Tokens per window (each window is decoded from an empty cache).
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Where to write the thresholds (JSON).
    #[arg(short, long)]
    pub output: PathBuf,
}

/// What `kernels calibrate` did.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrateSummary {
    /// Layers calibrated.
    pub layers: usize,
    /// Tokens of text decoded (twice).
    pub tokens: usize,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Runs `kernels calibrate`.
///
/// # Errors
///
/// Unreadable model or text, a sparsity outside [0, 1], an unwritable output.
pub fn calibrate_command(args: &CalibrateArgs) -> Result<CalibrateSummary> {
    let started = Instant::now();
    if args.model.device != Device::Cpu {
        bail!(
            "calibrate runs on the CPU (it reads activations inside the MLP, which the GPU \
             kernels keep to themselves): use --device cpu"
        );
    }
    let cpu = cpu_for(&args.model)?;
    let file = ModelFile::open(&args.model.model)?;
    let tokenizer = file.tokenizer()?;
    let tokens = tokenizer.encode(&read_text(&args.text)?)?;
    let model = load(&args.model, &file, Policy::Dense)?;
    let layers = with_model!(&model, m => {
        let window = args.window.clamp(1, m.config.context);
        let mut decoder = Decoder::new(&m.config, window)?;
        let mut logits = vec![0.0; m.config.vocab];
        calibrate(m, &cpu, &mut decoder, &tokens, args.policy.policy(), args.sparsity, &mut logits)?
    });
    let json = thresholds_json(args.policy, args.sparsity, &layers);
    std::fs::write(&args.output, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("cannot write '{}'", args.output.display()))?;
    Ok(CalibrateSummary {
        layers: layers.len(),
        tokens: tokens.len(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `kernels eval` arguments.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The evaluation text (a UTF-8 file).
    #[arg(long)]
    pub text: PathBuf,
    /// Thresholds from `kernels calibrate` (dense without).
    #[arg(long)]
    pub thresholds: Option<PathBuf>,
    /// Tokens per window (non-overlapping, each from an empty cache).
    #[arg(long, default_value_t = 512)]
    pub window: usize,
}

/// What `kernels eval` measured.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSummary {
    /// Perplexity.
    pub perplexity: f64,
    /// Tokens scored (every token of a window but its first).
    pub tokens_scored: usize,
    /// Wall time of the decoding, seconds.
    pub seconds: f64,
}

fn sparse_model(args: &ModelArgs, file: &ModelFile, thresholds: Option<&Path>) -> Result<Model> {
    Ok(match thresholds {
        None => load(args, file, Policy::Dense)?,
        Some(path) => {
            let (policy, layers) = read_thresholds(path)?;
            let mut model = load(args, file, policy)?;
            with_model!(&mut model, m => m.set_thresholds(layers).with_context(|| {
                format!("'{}' does not fit this model", path.display())
            })?);
            model
        }
    })
}

/// Runs `kernels eval`.
///
/// # Errors
///
/// Unreadable model, text or thresholds; a text of fewer than two tokens.
pub fn eval_command(args: &EvalArgs) -> Result<EvalSummary> {
    let cpu = cpu_for(&args.model)?;
    let gpu = device::select(args.model.device)?;
    let file = ModelFile::open(&args.model.model)?;
    let tokenizer = file.tokenizer()?;
    let tokens = tokenizer.encode(&read_text(&args.text)?)?;
    let model = sparse_model(&args.model, &file, args.thresholds.as_deref())?;
    let started = Instant::now();
    let p = with_model!(&model, m => {
        let mut decoder = Decoder::new(&m.config, args.window.clamp(2, m.config.context))?;
        let mut logits = vec![0.0; m.config.vocab];
        on_device(m, &cpu, gpu.as_deref(), |f| {
            Ok(perplexity(f, &mut decoder, &tokens, &mut logits)?)
        })?
    });
    Ok(EvalSummary {
        perplexity: p.value(),
        tokens_scored: p.tokens_scored,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `kernels generate` arguments.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (a user message, through the model's chat template unless --raw).
    #[arg(long)]
    pub prompt: String,
    /// Tokenise the prompt as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Thresholds from `kernels calibrate` (dense without).
    #[arg(long)]
    pub thresholds: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Keep generating past the end-of-sequence token (for timing a fixed number of tokens,
    /// as llama.cpp's `--ignore-eos`).
    #[arg(long)]
    pub ignore_eos: bool,
}

/// What `kernels generate` did.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateSummary {
    /// The answer.
    pub text: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub tokens: usize,
    /// Generated tokens per second, from the first generated token on.
    pub tokens_per_second: f64,
}

/// Runs `kernels generate`, writing the answer to `out` as it is generated.
///
/// # Errors
///
/// Unreadable model or thresholds; a prompt and `--max-tokens` past the model's context.
pub fn generate_command(args: &GenerateArgs, out: &mut dyn Write) -> Result<GenerateSummary> {
    let cpu = cpu_for(&args.model)?;
    let gpu = device::select(args.model.device)?;
    let file = ModelFile::open(&args.model.model)?;
    let tokenizer = file.tokenizer()?;
    let text = if args.raw {
        args.prompt.clone()
    } else {
        tokenizer.chat_prompt(&args.prompt)?
    };
    let prompt = tokenizer.encode(&text)?;
    let model = sparse_model(&args.model, &file, args.thresholds.as_deref())?;
    let (answer, tokens_per_second) = with_model!(&model, m => {
        let capacity = prompt.len() + args.max_tokens;
        if capacity > m.config.context {
            bail!(
                "{} prompt tokens and --max-tokens {} pass the model's context of {}",
                prompt.len(),
                args.max_tokens,
                m.config.context
            );
        }
        let mut decoder = Decoder::new(&m.config, capacity)?;
        let mut logits = vec![0.0; m.config.vocab];
        let (mut shown, mut printed, mut first) = (Vec::new(), 0, None);
        let mut failed = None;
        let stop = tokenizer.eos.filter(|_| !args.ignore_eos);
        let answer = on_device(m, &cpu, gpu.as_deref(), |f| Ok(generate(f, &mut decoder, &prompt, args.max_tokens, stop, &mut logits, |t| {
            first.get_or_insert_with(Instant::now);
            shown.push(t);
            // Print what the answer so far adds (a token may end inside a character).
            let text = tokenizer.decode(&shown).unwrap_or_default();
            if let Some(new) = text.get(printed..) {
                if let Err(e) = write!(out, "{new}").and_then(|()| out.flush()) {
                    failed = Some(e);
                    return false;
                }
                printed = text.len();
            }
            true
        })?))?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        let seconds = first.map_or(0.0, |f: Instant| f.elapsed().as_secs_f64());
        (answer, answer_rate(shown.len(), seconds))
    });
    writeln!(out)?;
    Ok(GenerateSummary {
        text: tokenizer.decode(&answer)?,
        prompt_tokens: prompt.len(),
        tokens: answer.len(),
        tokens_per_second,
    })
}

/// Tokens per second after the first (whose time is the prompt's).
fn answer_rate(tokens: usize, seconds: f64) -> f64 {
    if tokens > 1 && seconds > 0.0 {
        (tokens - 1) as f64 / seconds
    } else {
        0.0
    }
}
