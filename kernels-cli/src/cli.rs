//! Argument parsing and the subcommands' entry points. Exit codes: 0 done, 1 failed, 2 usage.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use kernels_cpu::Cpu;
use kernels_cpu::prelude::{CompeftParams, KeepRule};

use crate::checkpoint::ElementType;
use crate::config::MergeConfig;
use crate::device::{self, Device};
use crate::merge::{self, MergeOptions};
use crate::synthetic::{self, LlamaShape};
use crate::{compeft, llm, lora};

/// Merge models on the kernels of this crate family: mergekit's YAML, at memory speed.
#[derive(Parser, Debug)]
#[command(name = "kernels", version, about, long_about = None)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Merge models as a mergekit YAML config says.
    #[command(after_help = MERGE_HELP)]
    Merge(MergeArgs),
    /// ComPEFT-compress a fine-tune's task vector (global top-k, ternary codes, one scale).
    #[command(after_help = COMPRESS_HELP)]
    Compress(CompressArgs),
    /// Add a compressed task vector onto a base model, writing a model directory.
    #[command(after_help = APPLY_HELP)]
    Apply(ApplyArgs),
    /// Extract a PEFT LoRA adapter approximating a fine-tune's difference from its base.
    #[command(name = "extract-lora", after_help = EXTRACT_HELP)]
    ExtractLora(ExtractLoraArgs),
    /// With no files: write a small synthetic base and three fine-tunes, then run a TIES merge, a
    /// ComPEFT round trip and a LoRA extraction through the same code paths, and say what each
    /// did.
    Demo(DemoArgs),
    /// Write a synthetic Llama-shaped base model and fine-tunes of it, to try merges on.
    #[command(after_help = SYNTHETIC_HELP)]
    Synthetic(SyntheticArgs),
    /// Calibrate CATS or TEAL thresholds of a GGUF model on a text.
    #[command(after_help = CALIBRATE_HELP)]
    Calibrate(llm::CalibrateArgs),
    /// Perplexity of a GGUF model on a text, dense or with calibrated thresholds.
    #[command(after_help = EVAL_HELP)]
    Eval(llm::EvalArgs),
    /// Greedy generation from a GGUF model, dense or with calibrated thresholds; tokens/s at the
    /// end.
    #[command(after_help = GENERATE_HELP)]
    Generate(llm::GenerateArgs),
}

const CALIBRATE_HELP: &str = "\
A dense pass over the text (twice: the calibration is exact) records every layer's activations at
the policy's sites: CATS the MLP's gate activation silu(W_gate x); TEAL the input of every
projection (q, k and v share theirs; o; gate and up; down). Each threshold is the --sparsity
quantile of its site's magnitudes, so that share of them is skipped. The text is tokenised without
the chat template and decoded in windows of --window tokens.

Examples:
  kernels calibrate --model SmolLM2-135M-Instruct.Q4_1.gguf --text wiki.txt --policy teal -o teal50.json
  kernels calibrate --model M.gguf --text wiki.txt --policy cats --sparsity 0.7 -o cats70.json";

const EVAL_HELP: &str = "\
Perplexity over non-overlapping windows of --window tokens, each decoded from an empty cache;
every token of a window but its first is scored. Prints the perplexity, the tokens scored and the
decoding speed.

Examples:
  kernels eval --model M.gguf --text other.txt
  kernels eval --model M.gguf --text other.txt --thresholds teal50.json --dtype f32";

const GENERATE_HELP: &str = "\
The prompt goes through the model's chat template (its default system prompt included) unless
--raw; decoding is greedy and stops at the model's end-of-sequence token or --max-tokens. The
answer streams to stdout; prompt size and tokens/s go to stderr at the end.

Examples:
  kernels generate --model M.gguf --prompt \"What is the capital of France?\"
  kernels generate --model M.gguf --prompt \"Tell me a story\" --thresholds cats50.json --max-tokens 256";

const COMPRESS_HELP: &str = "\
tau = finetuned - base over the whole model; the `density` fraction of largest |tau| (one global
top-k, ties by order) becomes +-alpha std(tau), the rest 0. Each tensor is stored in the packed
ternary format inside a safetensors file, in the smaller layout by expected size: Golomb-Rice
coded gaps, within 2 % of the entropy bound, which stays under the dense layout's 2 bits per
entry at every density. Prints the bits per parameter, the compression ratio against the task vector
in the fine-tune's own types, and the relative L2 error ||tau - tau_hat|| / ||tau||.

Examples:
  kernels compress --base ./Llama-3.2-1B --finetuned ./Llama-3.2-1B-math -o math.ternary
  kernels compress --base B --finetuned F -o x.ternary --density 0.05 --alpha 1.5";

const APPLY_HELP: &str = "\
theta = base + lambda * tau_hat, written in the base's element types with its config and
tokenizer files (atomically; --force to replace).

Examples:
  kernels apply --base ./Llama-3.2-1B math.ternary -o ./math-compeft";

/// A base model and a fine-tune of it.
#[derive(clap::Args, Debug)]
pub struct ModelPair {
    /// The base model's directory.
    #[arg(long)]
    pub base: PathBuf,
    /// The fine-tuned model's directory.
    #[arg(long)]
    pub finetuned: PathBuf,
}

/// What every writing subcommand takes.
#[derive(clap::Args, Debug)]
pub struct RunOptions {
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// `kernels compress` arguments.
#[derive(clap::Args, Debug)]
pub struct CompressArgs {
    /// The two models.
    #[command(flatten)]
    pub models: ModelPair,
    /// The compressed file to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Fraction of the task vector's entries kept.
    #[arg(long, default_value_t = 0.1)]
    pub density: f64,
    /// Scale of the kept entries, in standard deviations of the task vector.
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f32,
    /// Output and threads.
    #[command(flatten)]
    pub run: RunOptions,
}

/// `kernels apply` arguments.
#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    /// The base model's directory.
    #[arg(long)]
    pub base: PathBuf,
    /// The compressed file (`kernels compress`).
    pub compressed: PathBuf,
    /// The model directory to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Scale of the task vector added.
    #[arg(long, default_value_t = 1.0)]
    pub lambda: f32,
    /// Output and threads.
    #[command(flatten)]
    pub run: RunOptions,
}

const EXTRACT_HELP: &str = "\
Every 2-D weight but the embeddings and lm_head becomes lora_A [r, in] and lora_B [out, r]
(mergekit's conventions: sqrt(s) on both factors, lora_alpha = r so PEFT's scale is 1); the
embeddings, lm_head and 1-D tensors that differ from the base are saved whole under
modules_to_save. The randomized SVD (2r probes, 2 power iterations) by default; --exact for the
thin SVD; --energy keeps, per module, the smallest rank holding that fraction of the squared
Frobenius norm (exact SVD; per-module ranks go into rank_pattern). Prints the relative error
||delta - B A||_F / ||delta||_F over all factored modules.

Examples:
  kernels extract-lora --base ./Llama-3.2-1B --finetuned ./Llama-3.2-1B-math --rank 16 -o ./math-lora
  kernels extract-lora --base B --finetuned F --energy 0.99 -o ./adapter";

/// `kernels demo` arguments.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Keep the models and outputs here (created; must not exist) instead of a temporary
    /// directory removed at the end.
    #[arg(long)]
    pub keep: Option<PathBuf>,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// `kernels extract-lora` arguments.
#[derive(clap::Args, Debug)]
pub struct ExtractLoraArgs {
    /// The two models.
    #[command(flatten)]
    pub models: ModelPair,
    /// The adapter directory to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// LoRA rank (capped by each matrix's smaller side).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Use the exact thin SVD instead of the randomized one.
    #[arg(long)]
    pub exact: bool,
    /// Pick each module's rank to keep this fraction of its energy (exact SVD).
    #[arg(long, conflicts_with = "exact")]
    pub energy: Option<f64>,
    /// Output and threads.
    #[command(flatten)]
    pub run: RunOptions,
}

const SYNTHETIC_HELP: &str = "\
Writes OUT_DIR/base and OUT_DIR/ft1 .. OUT_DIR/ftN: real model directories (config.json,
safetensors) whose weights are N(0, 0.02^2) (norms 1), the fine-tunes the base plus
N(0, delta^2) each.

Examples:
  kernels synthetic ./zoo
  kernels synthetic --layers 10 --hidden 2048 --intermediate 5632 --vocab 32000 ./zoo";

/// `kernels synthetic` arguments.
#[derive(clap::Args, Debug)]
pub struct SyntheticArgs {
    /// Where to write the models (created; must not exist).
    pub out_dir: PathBuf,
    /// Fine-tunes to write beside the base.
    #[arg(long, default_value_t = 3)]
    pub finetunes: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    /// MLP size.
    #[arg(long, default_value_t = 688)]
    pub intermediate: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 1024)]
    pub vocab: usize,
    /// Element type: float32, float16 or bfloat16.
    #[arg(long, default_value = "bfloat16")]
    pub dtype: String,
    /// Standard deviation of the fine-tunes' deltas.
    #[arg(long, default_value_t = 0.002)]
    pub delta: f32,
}

const MERGE_HELP: &str = "\
Methods (mergekit 0.1.5's semantics): linear, task_arithmetic, ties, dare_linear, dare_ties,
breadcrumbs, breadcrumbs_ties, della, della_linear, model_stock, slerp, passthrough; and ours:
compeft (each task vector ComPEFT-compressed over its whole model: `density` per model, default
0.1, and `alpha`, default 1; then base + lambda * sum weight_i tau_hat_i) and fisher
(sum w_i F_i theta_i / sum w_i F_i, each model with `fisher: DIR`, a directory of Fisher
diagonals under the model's tensor names; `normalize` divides each w_i by ||F_i||_2, `floor`
raises small Fisher entries; where every F is 0, the plain weighted mean) and opcm (OPCM
continual merging in the listed order, `alpha` default 0.5: each weight matrix's new task
vector projected off the merged one's leading singular directions, the result rescaled to the
task vectors' mean norm, as FusionBench runs it).

Where mergekit's semantics differ from the kernel crates' defaults, this command follows
mergekit: TIES-family votes elect + for a weighted sum of exactly zero and divide by the
agreeing weights only with `normalize` (on by default for ties, della and linear); trimming keeps
max(1, floor(density n)) per tensor; DARE and DELLA rescale each tensor to keep its L1 norm
(`rescale`, on by default for them), not by 1/density, and `rescale: true` does the same for
the magnitude methods; `lambda` scales the merged task vector
after normalising; a base listed under `models:` is the base; slerp interpolates the whole
flattened tensor (linearly where the normalised dot exceeds 0.9995); Model Stock's ratio is not
clamped. `slices:` stack and merge layer ranges as mergekit does: each slice's sources take equally many
layers, merged layer by layer (a gradient runs from the slice's first layer to its last), the
output's layers numbered on from slice to slice; embeddings come from the first slice's sources,
the final norm and lm_head from the last's; config.json's num_hidden_layers becomes the total.
Random masks come from Philox keyed by --random-seed, the model's index and the
tensor's name: reproducible bit for bit, not torch's draws (the same bits with --device gpu).
Computation is in f32 with f64 accumulation whatever `dtype` says (with --device gpu, the
reductions sum in f32: within a few ulps of the CPU's result, and a TIES vote whose sum is within
rounding of zero may go the other way); `out_dtype` (else `dtype`, else each tensor's own type) is
what is written.

Examples:
  kernels merge ties.yml ./merged
  kernels merge --random-seed 7 --out-shard-size 2GB dare.yml ./merged --force
  kernels merge --device gpu ties.yml ./merged";

/// `kernels merge` arguments.
#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// The mergekit YAML config.
    pub config: PathBuf,
    /// The output directory (written atomically; see --force).
    pub out_dir: PathBuf,
    /// Largest output shard: bytes, or with a suffix (KB, MB, GB; K, M, G; KiB, MiB, GiB).
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub out_shard_size: u64,
    /// Seed of the random methods' masks (DARE, DELLA).
    #[arg(long, default_value_t = 0)]
    pub random_seed: u64,
    /// Output and threads.
    #[command(flatten)]
    pub run: RunOptions,
    /// Where the kernels run: with `gpu`, the reductions (linear, task arithmetic, the TIES
    /// vote, slerp, Model Stock, Fisher) and DARE's masks run on the GPU; trimming, Breadcrumbs,
    /// DELLA, ComPEFT and OPCM stay on the CPU. `auto` takes a hardware GPU if there is one. The
    /// default, `cpu`, gives the same bits on every machine.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Parses a size such as `5GB`, `500MiB` or `1000000`.
///
/// # Errors
///
/// Anything else.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size"))?;
    let scale: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "'{text}': unknown unit (B, KB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    let bytes = value * scale;
    if !(1.0..1e18).contains(&bytes) {
        return Err(format!("'{text}' is out of range"));
    }
    Ok(bytes as u64)
}

/// The CPU backend on `threads` threads (the global rayon pool sized to match), or all cores.
fn cpu(threads: Option<usize>) -> Result<Cpu> {
    let cpu = Cpu::detect();
    let Some(n) = threads else {
        return Ok(cpu);
    };
    if n == 0 {
        bail!("--threads must be at least 1");
    }
    // The pool can be sized once per process; a second call (tests) keeps the first size.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    Ok(cpu.with_threads(n)?)
}

fn merge_command(args: &MergeArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("cannot read '{}'", args.config.display()))?;
    let config =
        MergeConfig::parse(&text).with_context(|| format!("in '{}'", args.config.display()))?;
    let options = MergeOptions {
        out: args.out_dir.clone(),
        force: args.run.force,
        shard_bytes: args.out_shard_size,
        seed: args.random_seed,
        cpu: cpu(args.run.threads)?,
        gpu: device::select(args.device)?,
        progress: !args.quiet && std::io::stderr().is_terminal(),
    };
    let summary = merge::run(&config, &text, &options)?;
    let gb = |b: u64| b as f64 / 1e9;
    println!(
        "merged {} tensors with {} on {}: read {:.3} GB, wrote {:.3} GB to '{}' in {:.2} s \
         ({:.2} GB/s)",
        summary.tensors,
        config.method.name(),
        device::describe(options.gpu.as_deref()),
        gb(summary.read_bytes),
        gb(summary.written_bytes),
        summary.out.display(),
        summary.seconds,
        gb(summary.read_bytes + summary.written_bytes) / summary.seconds.max(1e-9)
    );
    Ok(())
}

fn compress_command(args: &CompressArgs) -> Result<()> {
    let params = CompeftParams::default()
        .with_keep(KeepRule::Density(args.density))
        .with_alpha(args.alpha);
    let s = compeft::compress(
        &cpu(args.run.threads)?,
        &args.models.base,
        &args.models.finetuned,
        &args.output,
        params,
        args.run.force,
    )?;
    println!(
        "compressed {} parameters ({} kept) to {:.3} bits per parameter, {:.1}x smaller than the \
         task vector's {:.3} GB, relative error {:.4}, {:?} layout, in {:.2} s",
        s.parameters,
        s.kept,
        s.bits_per_parameter(),
        s.original_bytes as f64 / s.packed_bytes.max(1) as f64,
        s.original_bytes as f64 / 1e9,
        s.relative_error,
        s.layout,
        s.seconds
    );
    Ok(())
}

fn apply_command(args: &ApplyArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let cpu = cpu(args.run.threads)?;
    let count = compeft::apply(
        &cpu,
        &args.base,
        &args.compressed,
        &args.output,
        args.lambda,
        args.run.force,
    )?;
    println!(
        "applied {count} tensors to '{}' in {:.2} s",
        args.output.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn extract_command(args: &ExtractLoraArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let rule = match (args.energy, args.exact) {
        (Some(e), _) => lora::RankRule::Energy(e),
        (None, true) => lora::RankRule::Exact(args.rank),
        (None, false) => lora::RankRule::Randomized(args.rank),
    };
    let s = lora::extract(
        &cpu(args.run.threads)?,
        &args.models.base,
        &args.models.finetuned,
        &args.output,
        rule,
        args.run.force,
    )?;
    let (lo, hi) = (
        s.ranks.values().min().copied().unwrap_or(0),
        s.ranks.values().max().copied().unwrap_or(0),
    );
    println!(
        "extracted {} LoRA modules (rank {lo} to {hi}) and {} whole tensors, {} parameters, \
         relative error {:.4}, to '{}' in {:.2} s",
        s.ranks.len(),
        s.saved_whole.len(),
        s.parameters,
        s.relative_error,
        args.output.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn demo_command(args: &DemoArgs) -> Result<()> {
    let root = if let Some(dir) = &args.keep {
        if dir.exists() {
            bail!("'{}' already exists", dir.display());
        }
        dir.clone()
    } else {
        std::env::temp_dir().join(format!("kernels-demo-{}", std::process::id()))
    };
    std::fs::create_dir_all(&root)?;
    let result = run_demo(&root, &cpu(args.threads)?);
    if args.keep.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    } else if result.is_ok() {
        println!("models and outputs kept under '{}'", root.display());
    }
    result
}

fn run_demo(root: &std::path::Path, cpu: &Cpu) -> Result<()> {
    let shape = LlamaShape {
        layers: 4,
        hidden: 512,
        intermediate: 1376,
        vocab: 4096,
    };
    let dtype = ElementType::BF16;
    let started = std::time::Instant::now();
    synthetic::write_model(&root.join("base"), shape, dtype, 1, None)?;
    for i in 1..=3u64 {
        synthetic::write_model(
            &root.join(format!("ft{i}")),
            shape,
            dtype,
            1,
            Some((100 + i, 0.002)),
        )?;
    }
    let model_bytes = shape.parameters() * dtype.size();
    println!(
        "1. wrote a synthetic Llama-shaped base and three fine-tunes: {} parameters, {:.1} MB each \
         in bf16 ({:.2} s)",
        shape.parameters(),
        model_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    let yaml = format!(
        "merge_method: ties\nbase_model: {0}/base\nmodels:\n  - model: {0}/ft1\n    parameters: \
         {{weight: 1.0, density: 0.2}}\n  - model: {0}/ft2\n    parameters: {{weight: 1.0, density: \
         0.2}}\n  - model: {0}/ft3\n    parameters: {{weight: 1.0, density: 0.2}}\n",
        root.display()
    );
    let config = MergeConfig::parse(&yaml)?;
    let options = MergeOptions {
        out: root.join("merged"),
        force: false,
        shard_bytes: 5_000_000_000,
        seed: 0,
        cpu: *cpu,
        gpu: None,
        progress: false,
    };
    let m = merge::run(&config, &yaml, &options)?;
    println!(
        "2. TIES merge of the three (density 0.2): {} tensors, read {:.1} MB, wrote {:.1} MB in \
         {:.2} s ({:.2} GB/s)",
        m.tensors,
        m.read_bytes as f64 / 1e6,
        m.written_bytes as f64 / 1e6,
        m.seconds,
        (m.read_bytes + m.written_bytes) as f64 / m.seconds.max(1e-9) / 1e9
    );
    let packed = root.join("ft1.ternary");
    let params = CompeftParams::default().with_keep(KeepRule::Density(0.1));
    let c = compeft::compress(
        cpu,
        &root.join("base"),
        &root.join("ft1"),
        &packed,
        params,
        false,
    )?;
    let applied_at = std::time::Instant::now();
    compeft::apply(
        cpu,
        &root.join("base"),
        &packed,
        &root.join("ft1-compeft"),
        1.0,
        false,
    )?;
    println!(
        "3. ComPEFT of fine-tune 1 (density 0.1): {:.3} bits per parameter, {:.1}x smaller than \
         its bf16 task vector, relative error {:.3} ({:.2} s); applied back onto the base in \
         {:.2} s",
        c.bits_per_parameter(),
        c.original_bytes as f64 / c.packed_bytes.max(1) as f64,
        c.relative_error,
        c.seconds,
        applied_at.elapsed().as_secs_f64()
    );
    let extracted_at = std::time::Instant::now();
    let l = lora::extract(
        cpu,
        &root.join("base"),
        &root.join("ft1"),
        &root.join("ft1-lora"),
        lora::RankRule::Randomized(16),
        false,
    )?;
    println!(
        "4. LoRA rank 16 of fine-tune 1 (randomized SVD): {} modules, {} whole tensors, {} \
         parameters ({:.1} % of the model), relative error {:.3} ({:.2} s; random deltas are \
         full-rank, so the error is large: a real fine-tune's is low-rank)",
        l.ranks.len(),
        l.saved_whole.len(),
        l.parameters,
        100.0 * l.parameters as f64 / shape.parameters() as f64,
        l.relative_error,
        extracted_at.elapsed().as_secs_f64()
    );
    Ok(())
}

fn synthetic_command(args: &SyntheticArgs) -> Result<()> {
    let dtype = ElementType::from_config_name(&args.dtype)
        .ok_or_else(|| anyhow::anyhow!("--dtype '{}': float32, float16 or bfloat16", args.dtype))?;
    if args.out_dir.exists() {
        bail!("'{}' already exists", args.out_dir.display());
    }
    let shape = LlamaShape {
        layers: args.layers,
        hidden: args.hidden,
        intermediate: args.intermediate,
        vocab: args.vocab,
    };
    std::fs::create_dir_all(&args.out_dir)?;
    let started = std::time::Instant::now();
    synthetic::write_model(&args.out_dir.join("base"), shape, dtype, 1, None)?;
    for i in 1..=args.finetunes {
        let dir = args.out_dir.join(format!("ft{i}"));
        synthetic::write_model(&dir, shape, dtype, 1, Some((100 + i as u64, args.delta)))?;
    }
    let bytes = shape.parameters() * dtype.size() * (args.finetunes + 1);
    println!(
        "wrote a base and {} fine-tunes of {} parameters each ({:.3} GB in all) under '{}' in {:.1} s",
        args.finetunes,
        shape.parameters(),
        bytes as f64 / 1e9,
        args.out_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs the command line; the exit code says how it went.
#[must_use]
pub fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match &args.command {
        Command::Merge(m) => merge_command(m),
        Command::Compress(c) => compress_command(c),
        Command::Apply(a) => apply_command(a),
        Command::ExtractLora(e) => extract_command(e),
        Command::Demo(d) => demo_command(d),
        Command::Synthetic(s) => synthetic_command(s),
        Command::Calibrate(c) => llm::calibrate_command(c).map(|s| {
            println!(
                "calibrated {} layers on {} tokens in {:.2} s: wrote '{}'",
                s.layers,
                s.tokens,
                s.seconds,
                c.output.display()
            );
        }),
        Command::Eval(e) => llm::eval_command(e).map(|s| {
            println!(
                "perplexity {:.3} over {} tokens scored in {:.2} s ({:.1} tok/s)",
                s.perplexity,
                s.tokens_scored,
                s.seconds,
                s.tokens_scored as f64 / s.seconds.max(1e-9)
            );
        }),
        Command::Generate(g) => llm::generate_command(g, &mut std::io::stdout()).map(|s| {
            eprintln!(
                "{} prompt tokens; {} tokens generated at {:.1} tok/s",
                s.prompt_tokens, s.tokens, s.tokens_per_second
            );
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("").is_err());
    }
}
