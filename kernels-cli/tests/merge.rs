//! `kernels merge` end to end on small models the tests write (single-file and sharded, f32 and
//! bf16, a tied embedding): every method's output against the reference ops, a few configs
//! against values worked out by hand, and bad inputs (missing tensors, mismatched shapes,
//! truncated files, lying headers) failing with a named error and nothing left behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use kernels_cli::checkpoint::{Checkpoint, TensorData};
use kernels_cli::config::MergeConfig;
use kernels_cli::merge::{self, MergeOptions, mask_seed};
use kernels_core::CounterRng;
use kernels_core::ops::interpolate::{model_stock_ref, slerp_ref};
use kernels_core::ops::merge::{
    BreadcrumbsParams, DareParams, DareRescale, DellaParams, TiesElection, breadcrumbs_ref,
    dare_ref, della_ref, preserve_l1_ref, ties_elect_with_ref, ties_trim_ref,
};
use kernels_core::ops::select::KeepRule;
use kernels_cpu::Cpu;
use kernels_cpu::merge::ties_tolerance;
use kernels_wgpu::prelude::{Context, ContextOptions};
use safetensors::{Dtype, tensor::TensorView};

/// The shapes of a tiny two-layer Llama with a tied embedding (no `lm_head`).
const SHAPES: [(&str, [usize; 2]); 7] = [
    ("model.embed_tokens.weight", [16, 8]),
    ("model.layers.0.mlp.up_proj.weight", [12, 8]),
    ("model.layers.0.self_attn.q_proj.weight", [8, 8]),
    ("model.layers.0.input_layernorm.weight", [1, 8]),
    ("model.layers.1.mlp.up_proj.weight", [12, 8]),
    ("model.layers.1.self_attn.q_proj.weight", [8, 8]),
    ("model.norm.weight", [1, 8]),
];

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn model_values(seed: u64, offset_of: Option<&Tensors>, scale: f64) -> Tensors {
    let rng = CounterRng::new(seed);
    SHAPES
        .iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n = shape[0] * shape[1];
            let values = (0..n)
                .map(|i| {
                    let base = offset_of.map_or(0.0, |b| f64::from(b[*name].1[i]));
                    (base + scale * rng.normal_at((k * 1000 + i) as u64)) as f32
                })
                .collect();
            // Norm weights are 1-D, as in real checkpoints.
            let shape = if shape[0] == 1 {
                vec![shape[1]]
            } else {
                shape.to_vec()
            };
            ((*name).to_string(), (shape, values))
        })
        .collect()
}

/// Writes a model directory: `shards` safetensors files (an index when more than one) holding
/// `tensors` as `dtype` (values rounded as the file type requires), and a `config.json`.
fn write_model(dir: &Path, tensors: &Tensors, dtype: Dtype, shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, (shape, values))| {
            let bytes = match dtype {
                Dtype::F32 => bytemuck::cast_slice(values).to_vec(),
                Dtype::BF16 => {
                    let v: Vec<half::bf16> =
                        values.iter().map(|&x| half::bf16::from_f32(x)).collect();
                    bytemuck::cast_slice(&v).to_vec()
                }
                _ => unreachable!(),
            };
            (name.clone(), shape.clone(), bytes)
        })
        .collect();
    let per_shard = encoded.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (s, chunk) in encoded.chunks(per_shard).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", s + 1)
        };
        let views: Vec<(String, TensorView<'_>)> = chunk
            .iter()
            .map(|(name, shape, bytes)| {
                weight_map.insert(name.clone(), file.clone().into());
                (
                    name.clone(),
                    TensorView::new(dtype, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 2,
        "tie_word_embeddings": true,
        "torch_dtype": if dtype == Dtype::F32 { "float32" } else { "bfloat16" },
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": {}}").unwrap();
}

/// A base and three fine-tunes, written under `root`.
struct Zoo {
    root: tempfile::TempDir,
    base: Tensors,
    tuned: Vec<Tensors>,
}

impl Zoo {
    fn new(dtype: Dtype, shards: usize) -> Self {
        let root = tempfile::tempdir().unwrap();
        let base = model_values(1, None, 1.0);
        let tuned: Vec<Tensors> = (0..3)
            .map(|i| model_values(10 + i, Some(&base), 0.05))
            .collect();
        write_model(&root.path().join("base"), &base, dtype, shards);
        for (i, t) in tuned.iter().enumerate() {
            write_model(&root.path().join(format!("ft{i}")), t, dtype, shards);
        }
        // What the files hold, after rounding to their type.
        let read = |name: &str| read_all(&root.path().join(name));
        let base = read("base");
        let tuned = (0..3).map(|i| read(&format!("ft{i}"))).collect();
        Self { root, base, tuned }
    }

    fn path(&self, name: &str) -> String {
        self.root.path().join(name).display().to_string()
    }

    fn merge(&self, yaml: &str, out: &str) -> anyhow::Result<Tensors> {
        self.merge_on(yaml, out, None)
    }

    fn merge_on(
        &self,
        yaml: &str,
        out: &str,
        gpu: Option<Arc<Context>>,
    ) -> anyhow::Result<Tensors> {
        let yaml = yaml
            .replace("BASE", &self.path("base"))
            .replace("FT0", &self.path("ft0"))
            .replace("FT1", &self.path("ft1"))
            .replace("FT2", &self.path("ft2"));
        let config = MergeConfig::parse(&yaml)?;
        let options = MergeOptions {
            out: self.root.path().join(out),
            force: false,
            shard_bytes: 5_000_000_000,
            seed: 7,
            cpu: Cpu::detect(),
            gpu,
            progress: false,
        };
        merge::run(&config, &yaml, &options)?;
        Ok(read_all(&options.out))
    }
}

fn read_all(dir: &Path) -> Tensors {
    let c = Checkpoint::open(dir).unwrap();
    c.tensors()
        .keys()
        .map(|name| {
            let (entry, data) = c.read(name).unwrap();
            let values = match data {
                TensorData::F32(v) => v.to_vec(),
                TensorData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
                TensorData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            };
            (name.clone(), (entry.shape, values))
        })
        .collect()
}

fn tau(model: &Tensors, base: &Tensors, name: &str) -> Vec<f32> {
    model[name]
        .1
        .iter()
        .zip(&base[name].1)
        .map(|(m, b)| m - b)
        .collect()
}

/// The output, rounded as written (bf16 inputs give bf16 outputs).
fn round_as(values: &[f32], like: Dtype) -> Vec<f32> {
    match like {
        Dtype::BF16 => values
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect(),
        _ => values.to_vec(),
    }
}

#[test]
fn ties_on_bf16_matches_the_reference() {
    let zoo = Zoo::new(Dtype::BF16, 1);
    let yaml = "\
models:
  - model: BASE
  - model: FT0
    parameters: {weight: 1.0, density: 0.5}
  - model: FT1
    parameters: {weight: 0.5, density: [0.9, 0.3]}
  - model: FT2
    parameters: {weight: 0.25, density: 0.2}
merge_method: ties
base_model: BASE
parameters:
  lambda: 0.8
";
    let out = zoo.merge(yaml, "out").unwrap();
    for (name, (shape, got)) in &out {
        assert_eq!(shape, &zoo.base[name].0);
        let n = got.len();
        let layer_t =
            if name.contains("layers.1") || !name.contains("layers.") && !name.contains("embed") {
                1.0
            } else {
                0.0
            };
        let densities = [0.5, 0.9 + (0.3 - 0.9) * layer_t, 0.2];
        let trimmed: Vec<Vec<f32>> = (0..3)
            .map(|i| {
                let keep = ((densities[i] * n as f64).floor() as u64).max(1);
                let mut t = vec![0.0; n];
                ties_trim_ref(
                    &tau(&zoo.tuned[i], &zoo.base, name),
                    KeepRule::Count(keep),
                    &mut t,
                )
                .unwrap();
                t
            })
            .collect();
        let views: Vec<&[f32]> = trimmed.iter().map(|t| &t[..]).collect();
        let rule = TiesElection::default()
            .with_zero_sum_elects_positive(true)
            .with_normalize(true);
        let mut expect = vec![0.0; n];
        ties_elect_with_ref(
            &zoo.base[name].1,
            &views,
            &[1.0, 0.5, 0.25],
            0.8,
            rule,
            &mut expect,
        )
        .unwrap();
        // The CPU's TIES is within `ties_tolerance` of the reference in f32 (the same elected
        // sign), and rounding to bf16 is monotonic: each value lies between the bf16 roundings
        // of the reference's value minus and plus that bound.
        let base = &zoo.base[name].1;
        for (j, (&g, &e)) in got.iter().zip(&expect).enumerate() {
            let largest = views.iter().map(|t| t[j].abs()).fold(0.0, f32::max);
            let scale = f64::from(base[j].abs()) + 0.8 * f64::from(largest);
            let bound = ties_tolerance(3, scale);
            let (lo, hi) = (f64::from(e) - bound, f64::from(e) + bound);
            let (lo, hi) = (
                round_as(&[lo as f32], Dtype::BF16)[0],
                round_as(&[hi as f32], Dtype::BF16)[0],
            );
            assert!(lo <= g && g <= hi, "{name}[{j}]: {g} outside [{lo}, {hi}]");
        }
    }
}

#[test]
fn hand_worked_ties_and_linear() {
    // One tensor of four: base 0, two fine-tunes, density 1 (no trim).
    let root = tempfile::tempdir().unwrap();
    let one = |values: [f32; 4]| -> Tensors {
        [("w".to_string(), (vec![4], values.to_vec()))]
            .into_iter()
            .collect()
    };
    write_model(&root.path().join("b"), &one([0.0; 4]), Dtype::F32, 1);
    write_model(
        &root.path().join("x"),
        &one([1.0, -2.0, 0.5, 1.0]),
        Dtype::F32,
        1,
    );
    write_model(
        &root.path().join("y"),
        &one([-3.0, 1.0, 0.5, -1.0]),
        Dtype::F32,
        1,
    );
    let run = |yaml: &str, out: &str| {
        let yaml = yaml.replace("DIR", &root.path().display().to_string());
        let config = MergeConfig::parse(&yaml).unwrap();
        let options = MergeOptions {
            out: root.path().join(out),
            force: false,
            shard_bytes: 1 << 30,
            seed: 0,
            cpu: Cpu::detect(),
            gpu: None,
            progress: false,
        };
        merge::run(&config, &yaml, &options).unwrap();
        read_all(&options.out)["w"].1.clone()
    };
    let ties = "merge_method: ties\nbase_model: DIR/b\nmodels:\n  - model: DIR/x\n    parameters: {weight: 1}\n  - model: DIR/y\n    parameters: {weight: 1}\n";
    // Sums -2, -1, 1, 0: signs -, -, +, and + for the zero sum (mergekit's >= 0). Agreeing
    // entries averaged: -3; -2; (0.5 + 0.5) / 2; x's 1 alone.
    assert_eq!(run(ties, "ties"), [-3.0, -2.0, 0.5, 1.0]);
    // Without normalising, the agreeing entries add up.
    let summed = format!("{ties}parameters: {{normalize: false}}\n");
    assert_eq!(run(&summed, "ties_sum"), [-3.0, -2.0, 1.0, 1.0]);
    // linear: (3 x + y) / 4.
    let linear = "merge_method: linear\nmodels:\n  - model: DIR/x\n    parameters: {weight: 3}\n  - model: DIR/y\n    parameters: {weight: 1}\n";
    assert_eq!(run(linear, "linear"), [0.0, -1.25, 0.5, 0.5]);
    // task_arithmetic: base + 0.5 (x + y) (no normalising by default).
    let ta = "merge_method: task_arithmetic\nbase_model: DIR/b\nparameters: {lambda: 0.5}\nmodels:\n  - model: DIR/x\n    parameters: {weight: 1}\n  - model: DIR/y\n    parameters: {weight: 1}\n";
    assert_eq!(run(ta, "ta"), [-1.0, -0.5, 0.5, 0.0]);
    // slerp at t = 0 and 1 gives the endpoints; x and y are at an obtuse angle, not parallel.
    let slerp = |t: f32| {
        format!(
            "merge_method: slerp\nbase_model: DIR/x\nmodels:\n  - model: DIR/y\nparameters: {{t: {t}}}\n"
        )
    };
    let at0 = run(&slerp(0.0), "s0");
    let at1 = run(&slerp(1.0), "s1");
    for (got, want) in at0.iter().zip([1.0, -2.0, 0.5, 1.0]) {
        assert!((got - want).abs() < 1e-6);
    }
    for (got, want) in at1.iter().zip([-3.0, 1.0, 0.5, -1.0]) {
        assert!((got - want).abs() < 1e-6);
    }
}

#[test]
fn every_method_matches_its_reference_on_sharded_f32() {
    let zoo = Zoo::new(Dtype::F32, 3);
    for method in [
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
    ] {
        let extra = if method.starts_with("della") {
            ", epsilon: 0.1"
        } else if method.starts_with("breadcrumbs") {
            ", gamma: 0.05"
        } else {
            ""
        };
        let yaml = format!(
            "merge_method: {method}\nbase_model: BASE\nmodels:\n  - model: FT0\n    parameters: {{weight: 1.0, density: 0.6{extra}}}\n  - model: FT1\n    parameters: {{weight: 0.5, density: 0.6{extra}}}\n"
        );
        let out = zoo.merge(&yaml, method).unwrap();
        for (name, (shape, got)) in &out {
            let n = got.len();
            let cols = *shape.last().unwrap();
            let sparse: Vec<Vec<f32>> = (0..2)
                .map(|i| {
                    let t = tau(&zoo.tuned[i], &zoo.base, name);
                    let seed = mask_seed(7, i, name);
                    let mut o = vec![0.0; n];
                    match method {
                        "dare_linear" | "dare_ties" => {
                            let p =
                                DareParams::new(0.4, seed).with_rescale(DareRescale::PreserveL1);
                            dare_ref(&t, p, 0, &mut o).unwrap();
                        }
                        "breadcrumbs" | "breadcrumbs_ties" => {
                            breadcrumbs_ref(&t, BreadcrumbsParams::new(0.6, 0.05), &mut o).unwrap();
                        }
                        _ => {
                            let p = DellaParams::new(0.6, 0.1, seed);
                            della_ref(&t, cols, p, 0, &mut o).unwrap();
                        }
                    }
                    o
                })
                .collect();
            let views: Vec<&[f32]> = sparse.iter().map(|t| &t[..]).collect();
            let mut expect = vec![0.0; n];
            let base = &zoo.base[name].1;
            if method.ends_with("ties") || method == "della" {
                let rule = TiesElection::default()
                    .with_zero_sum_elects_positive(true)
                    .with_normalize(method == "della");
                ties_elect_with_ref(base, &views, &[1.0, 0.5], 1.0, rule, &mut expect).unwrap();
            } else {
                kernels_core::ops::merge::task_arithmetic_ref(
                    base,
                    &views,
                    &[1.0, 0.5],
                    1.0,
                    &mut expect,
                )
                .unwrap();
            }
            for (j, (g, e)) in got.iter().zip(&expect).enumerate() {
                // L1 rescales and the f32 weighted sums round differently from the references.
                let tol = 4.0 * f32::EPSILON * (e.abs() + 1.0);
                assert!((g - e).abs() <= tol, "{method} {name}[{j}]: {g} vs {e}");
            }
        }
    }
    // mergekit's `rescale: true` on a magnitude method: each trimmed task vector keeps its L1.
    let yaml = "merge_method: ties\nbase_model: BASE\nparameters: {rescale: true}\nmodels:\n  - model: FT0\n    parameters: {weight: 1.0, density: 0.3}\n  - model: FT1\n    parameters: {weight: 0.5, density: 0.3}\n";
    let out = zoo.merge(yaml, "ties-rescaled").unwrap();
    for (name, (_, got)) in &out {
        let n = got.len();
        let trimmed: Vec<Vec<f32>> = (0..2)
            .map(|i| {
                let t = tau(&zoo.tuned[i], &zoo.base, name);
                let keep = ((0.3 * n as f64).floor() as u64).max(1);
                let mut o = vec![0.0; n];
                ties_trim_ref(&t, KeepRule::Count(keep), &mut o).unwrap();
                preserve_l1_ref(&t, &mut o).unwrap();
                o
            })
            .collect();
        let views: Vec<&[f32]> = trimmed.iter().map(|t| &t[..]).collect();
        let rule = TiesElection::default()
            .with_zero_sum_elects_positive(true)
            .with_normalize(true);
        let mut expect = vec![0.0; n];
        ties_elect_with_ref(
            &zoo.base[name].1,
            &views,
            &[1.0, 0.5],
            1.0,
            rule,
            &mut expect,
        )
        .unwrap();
        for (j, (g, e)) in got.iter().zip(&expect).enumerate() {
            let tol = 4.0 * f32::EPSILON * (e.abs() + 1.0);
            assert!(
                (g - e).abs() <= tol,
                "rescaled ties {name}[{j}]: {g} vs {e}"
            );
        }
    }
    // Model Stock and slerp.
    let stock = "merge_method: model_stock\nbase_model: BASE\nmodels:\n  - model: FT0\n  - model: FT1\n  - model: FT2\n";
    let out = zoo.merge(stock, "stock").unwrap();
    for (name, (_, got)) in &out {
        let views: Vec<&[f32]> = zoo.tuned.iter().map(|t| &t[name].1[..]).collect();
        let mut expect = vec![0.0; got.len()];
        model_stock_ref(&zoo.base[name].1, &views, &mut expect).unwrap();
        for (g, e) in got.iter().zip(&expect) {
            assert!(
                (g - e).abs() <= 8.0 * f32::EPSILON * (e.abs() + 1.0),
                "stock {name}: {g} vs {e}"
            );
        }
    }
    let slerp = "merge_method: slerp\nbase_model: BASE\nmodels:\n  - model: FT0\nparameters:\n  t:\n    - filter: mlp\n      value: 0.7\n    - value: 0.3\n";
    let out = zoo.merge(slerp, "slerp").unwrap();
    for (name, (_, got)) in &out {
        let t = if name.contains("mlp") { 0.7 } else { 0.3 };
        let mut expect = vec![0.0; got.len()];
        slerp_ref(&zoo.base[name].1, &zoo.tuned[0][name].1, t, &mut expect).unwrap();
        for (g, e) in got.iter().zip(&expect) {
            assert!(
                (g - e).abs() <= 4.0 * f32::EPSILON * (e.abs() + 1.0),
                "slerp {name}"
            );
        }
    }
}

#[test]
fn random_methods_reproduce_bit_for_bit_and_change_with_the_seed() {
    let zoo = Zoo::new(Dtype::BF16, 1);
    let yaml = "merge_method: dare_ties\nbase_model: BASE\nmodels:\n  - model: FT0\n    parameters: {weight: 1, density: 0.3}\n  - model: FT1\n    parameters: {weight: 1, density: 0.3}\n";
    let a = zoo.merge(yaml, "a").unwrap();
    let b = zoo.merge(yaml, "b").unwrap();
    assert_eq!(a, b);
    let args = |seed: &str, out: &str| {
        let config = zoo.root.path().join("dare.yml");
        let text = yaml
            .replace("BASE", &zoo.path("base"))
            .replace("FT0", &zoo.path("ft0"))
            .replace("FT1", &zoo.path("ft1"));
        std::fs::write(&config, text).unwrap();
        let status = Command::new(env!("CARGO_BIN_EXE_kernels"))
            .args(["merge", "--random-seed", seed, "-q"])
            .arg(&config)
            .arg(zoo.root.path().join(out))
            .status()
            .unwrap();
        assert!(status.success());
        read_all(&zoo.root.path().join(out))
    };
    assert_eq!(args("7", "c"), a, "the library and the binary agree");
    assert_ne!(args("8", "d"), a, "another seed draws other masks");
}

#[test]
fn output_is_a_loadable_sharded_directory() {
    let zoo = Zoo::new(Dtype::BF16, 2);
    let yaml = format!(
        "merge_method: linear\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 1}}\n  - model: {}\n    parameters: {{weight: 1}}\nout_dtype: float32\n",
        zoo.path("base"),
        zoo.path("ft0"),
        zoo.path("ft1")
    );
    let config = zoo.root.path().join("linear.yml");
    std::fs::write(&config, &yaml).unwrap();
    let out = zoo.root.path().join("sharded");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kernels"))
            .args(["merge", "--out-shard-size", "600"])
            .args(extra)
            .arg(&config)
            .arg(&out)
            .output()
            .unwrap()
    };
    let first = run(&[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let summary = String::from_utf8_lossy(&first.stdout);
    assert!(
        summary.contains("merged 7 tensors with linear"),
        "{summary}"
    );
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(shards.len() > 2, "{shards:?}");
    let config_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config_json["torch_dtype"], "float32");
    assert_eq!(config_json["tie_word_embeddings"], true);
    assert!(out.join("tokenizer.json").is_file() && out.join("README.md").is_file());
    let merged = read_all(&out);
    for (name, (_, got)) in &merged {
        for (j, g) in got.iter().enumerate() {
            let e = f32::midpoint(zoo.tuned[0][name].1[j], zoo.tuned[1][name].1[j]);
            assert!((g - e).abs() <= f32::EPSILON * e.abs(), "{name}");
        }
    }
    // An existing target is kept without --force (exit code 1), replaced with it.
    let again = run(&[]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert!(run(&["--force"]).status.success());
    // Usage errors exit with 2.
    let usage = Command::new(env!("CARGO_BIN_EXE_kernels"))
        .args(["merge", "--out-shard-size", "lots"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
}

fn merge_fails(zoo: &Zoo, out: &str) -> String {
    let yaml = "merge_method: ties\nbase_model: BASE\nmodels:\n  - model: FT0\n    parameters: {weight: 1, density: 0.5}\n  - model: FT1\n    parameters: {weight: 1, density: 0.5}\n";
    let err = zoo.merge(yaml, out).unwrap_err();
    let target = zoo.root.path().join(out);
    assert!(
        !target.exists(),
        "a failed merge left '{}'",
        target.display()
    );
    let leftovers: Vec<PathBuf> = std::fs::read_dir(zoo.root.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    format!("{err:#}")
}

#[test]
fn bad_models_fail_with_a_named_error_and_leave_nothing() {
    let zoo = Zoo::new(Dtype::BF16, 1);
    let ft1 = zoo.root.path().join("ft1");
    let file = ft1.join("model.safetensors");
    let mut good = zoo.tuned[1].clone();

    // A missing tensor.
    good.remove("model.norm.weight");
    write_model(&ft1, &good, Dtype::BF16, 1);
    let e = merge_fails(&zoo, "missing");
    assert!(e.contains("model.norm.weight") && e.contains("ft1"), "{e}");

    // A mismatched shape.
    let mut wrong = zoo.tuned[1].clone();
    wrong.get_mut("model.norm.weight").unwrap().0 = vec![2, 4];
    write_model(&ft1, &wrong, Dtype::BF16, 1);
    let e = merge_fails(&zoo, "shape");
    assert!(
        e.contains("model.norm.weight") && e.contains("shape"),
        "{e}"
    );

    // A truncated file.
    write_model(&ft1, &zoo.tuned[1], Dtype::BF16, 1);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
    let e = merge_fails(&zoo, "truncated");
    assert!(e.contains("model.safetensors") && e.contains("ft1"), "{e}");

    // A header whose offsets lie (point past the data).
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
    let lying = header.replacen("\"data_offsets\":[0,", "\"data_offsets\":[2,", 1);
    assert_ne!(lying, header);
    let mut forged = bytes[..8].to_vec();
    forged.extend_from_slice(lying.as_bytes());
    forged.extend_from_slice(&bytes[8 + header_len..]);
    std::fs::write(&file, forged).unwrap();
    let e = merge_fails(&zoo, "lying");
    assert!(e.contains("not a valid safetensors file"), "{e}");

    // A hub id: local paths only.
    let e = MergeConfig::parse("merge_method: linear\nmodels:\n  - model: https://huggingface.co/x\n    parameters: {weight: 1}\n")
        .unwrap_err();
    assert!(e.to_string().contains("local paths only"));
    let missing = zoo.merge(
        "merge_method: linear\nmodels:\n  - model: org/some-model\n    parameters: {weight: 1}\n",
        "hub",
    );
    assert!(format!("{:#}", missing.unwrap_err()).contains("local paths only"));
}

#[test]
fn synthetic_models_merge_through_the_binary() {
    let root = tempfile::tempdir().unwrap();
    let zoo = root.path().join("zoo");
    let kernels = env!("CARGO_BIN_EXE_kernels");
    let made = Command::new(kernels)
        .args([
            "synthetic",
            "--finetunes",
            "2",
            "--hidden",
            "64",
            "--intermediate",
            "96",
        ])
        .args(["--vocab", "128", "--dtype", "float16"])
        .arg(&zoo)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let base = Checkpoint::open(&zoo.join("base")).unwrap();
    assert_eq!(base.tensors().len(), 2 + 2 * 9 + 1);
    // The fine-tunes differ from the base by small deltas.
    let (b, f) = (read_all(&zoo.join("base")), read_all(&zoo.join("ft1")));
    let name = "model.layers.1.mlp.up_proj.weight";
    let diff: f32 = b[name]
        .1
        .iter()
        .zip(&f[name].1)
        .map(|(x, y)| (x - y).abs())
        .sum::<f32>()
        / b[name].1.len() as f32;
    assert!((0.0005..0.005).contains(&diff), "{diff}");
    let config = root.path().join("ties.yml");
    std::fs::write(
        &config,
        format!(
            "merge_method: ties\nbase_model: {0}/base\nmodels:\n  - model: {0}/ft1\n    parameters: {{weight: 1, density: 0.3}}\n  - model: {0}/ft2\n    parameters: {{weight: 1, density: 0.3}}\n",
            zoo.display()
        ),
    )
    .unwrap();
    let merged = Command::new(kernels)
        .args(["merge", "-q"])
        .arg(&config)
        .arg(root.path().join("merged"))
        .output()
        .unwrap();
    assert!(
        merged.status.success(),
        "{}",
        String::from_utf8_lossy(&merged.stderr)
    );
    assert_eq!(
        read_all(&root.path().join("merged")).len(),
        base.tensors().len()
    );
    assert!(String::from_utf8_lossy(&merged.stdout).contains("merged 21 tensors with ties on"));
    // The same merge with its reductions on the GPU, where there is one.
    if gpu_or_skip().is_some() {
        let on_gpu = Command::new(kernels)
            .args(["merge", "-q", "--device", "gpu"])
            .arg(&config)
            .arg(root.path().join("merged-gpu"))
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&on_gpu.stdout);
        assert!(
            on_gpu.status.success() && said.contains("on the GPU ("),
            "{said}"
        );
        assert_eq!(read_all(&root.path().join("merged-gpu")).len(), 21);
    }
    // Writing over an existing directory is refused.
    let again = Command::new(kernels)
        .arg("synthetic")
        .arg(&zoo)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
}

#[test]
fn compress_and_apply_match_the_compeft_reference() {
    use kernels_cli::compeft::{Compressed, apply, compress};
    use kernels_core::ops::ternary::{CompeftParams, compeft_ref, ternary_add_ref};
    let zoo = Zoo::new(Dtype::BF16, 2);
    let cpu = Cpu::detect();
    let params = CompeftParams::default()
        .with_keep(KeepRule::Density(0.1))
        .with_alpha(1.5);
    let packed = zoo.root.path().join("ft0.ternary");
    let base = zoo.root.path().join("base");
    let s = compress(
        &cpu,
        &base,
        &zoo.root.path().join("ft0"),
        &packed,
        params,
        false,
    )
    .unwrap();
    let total: usize = zoo.base.values().map(|(_, v)| v.len()).sum();
    assert_eq!(s.parameters, total as u64);
    assert_eq!(s.kept, (total as f64 * 0.1).floor() as u64);
    // Tiny tensors: the per-tensor headers dominate, but it is still smaller than the task vector.
    assert!(s.packed_bytes < s.original_bytes, "{s:?}");
    assert!(s.relative_error > 0.0 && s.relative_error < 1.0);
    // The codes, tensor by tensor, are the reference's over the whole model.
    let taus: Vec<Vec<f32>> = zoo
        .base
        .keys()
        .map(|n| tau(&zoo.tuned[0], &zoo.base, n))
        .collect();
    let views: Vec<&[f32]> = taus.iter().map(|t| &t[..]).collect();
    let (decided, codes) = compeft_ref(&views, params).unwrap();
    let file = Compressed::open(&packed).unwrap();
    let tensors = file.tensors();
    assert_eq!(
        tensors.values().map(|b| b.len() as u64).sum::<u64>(),
        s.packed_bytes
    );
    for ((name, (_, base_values)), expect) in zoo.base.iter().zip(&codes) {
        let (header, got) = kernels_core::format::decode(tensors[name.as_str()], 1 << 20).unwrap();
        assert_eq!(&got, expect, "{name}");
        assert!(
            (header.scale - decided.scale).abs() <= 1e-6 * decided.scale,
            "{name}"
        );
        let _ = base_values;
    }
    // Applied onto the base, in the base's type.
    let out = zoo.root.path().join("applied");
    assert_eq!(
        apply(&cpu, &base, &packed, &out, 1.0, false).unwrap(),
        zoo.base.len()
    );
    let applied = read_all(&out);
    for ((name, (_, base_values)), expect) in zoo.base.iter().zip(&codes) {
        let mut theta: Vec<half::bf16> = base_values
            .iter()
            .map(|&v| half::bf16::from_f32(v))
            .collect();
        ternary_add_ref(&mut theta, expect, decided.scale, 1.0).unwrap();
        let theta: Vec<f32> = theta.iter().map(|v| v.to_f32()).collect();
        for (g, e) in applied[name].1.iter().zip(&theta) {
            // The scales agree to 1e-6 relative; a bf16 rounding may land on either side.
            assert!((g - e).abs() <= e.abs() / 128.0, "{name}: {g} vs {e}");
        }
    }
    assert!(out.join("config.json").is_file());
    // Refusals: an existing output, a base that lacks a tensor, a file of another format.
    assert!(
        compress(
            &cpu,
            &base,
            &zoo.root.path().join("ft0"),
            &packed,
            params,
            false
        )
        .is_err()
    );
    let e = apply(
        &cpu,
        &zoo.root.path().join("ft1"),
        &base.join("model-00001-of-00002.safetensors"),
        &zoo.root.path().join("x"),
        1.0,
        false,
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("kernels-compeft"), "{e:#}");
    let mut partial = zoo.base.clone();
    partial.remove("model.norm.weight");
    write_model(&zoo.root.path().join("partial"), &partial, Dtype::BF16, 1);
    let e = apply(
        &cpu,
        &zoo.root.path().join("partial"),
        &packed,
        &zoo.root.path().join("y"),
        1.0,
        false,
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("model.norm.weight"), "{e:#}");
    assert!(!zoo.root.path().join("y").exists());
}

#[test]
fn extract_lora_writes_a_peft_adapter_matching_the_reference() {
    use kernels_cli::lora::{RankRule, extract};
    use kernels_core::ops::lowrank::{LoraRank, lora_extract_ref};
    use kernels_core::{Mat, MatRef};
    let zoo = Zoo::new(Dtype::F32, 1);
    let cpu = Cpu::detect();
    let (base, ft) = (zoo.root.path().join("base"), zoo.root.path().join("ft0"));
    let out = zoo.root.path().join("adapter");
    let s = extract(&cpu, &base, &ft, &out, RankRule::Exact(3), false).unwrap();
    assert_eq!(s.ranks.len(), 4); // q_proj and up_proj in two layers
    assert!(s.ranks.values().all(|&r| r == 3));
    // The embedding and the norms differ from the base: saved whole.
    assert_eq!(s.saved_whole.len(), 3, "{:?}", s.saved_whole);
    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let adapter: Tensors = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32);
            let values: Vec<f32> = bytemuck::pod_collect_to_vec(view.data());
            (name, (view.shape().to_vec(), values))
        })
        .collect();
    assert!(adapter.contains_key("base_model.model.model.embed_tokens.weight"));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (config["r"].clone(), config["lora_alpha"].clone()),
        (3.into(), 3.into())
    );
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "up_proj"])
    );
    let mut tail2 = 0.0;
    let mut norm2 = 0.0;
    for name in zoo.base.keys().filter(|n| n.contains("proj")) {
        let (shape, _) = &zoo.base[name];
        let (m, n) = (shape[0], shape[1]);
        let module = name.strip_suffix(".weight").unwrap();
        let (a_shape, a) = &adapter[&format!("base_model.model.{module}.lora_A.weight")];
        let (b_shape, b) = &adapter[&format!("base_model.model.{module}.lora_B.weight")];
        assert_eq!(
            (a_shape.as_slice(), b_shape.as_slice()),
            ([3, n].as_slice(), [m, 3].as_slice())
        );
        let delta = tau(&zoo.tuned[0], &zoo.base, name);
        let reference = lora_extract_ref(
            MatRef::from_slice(&delta, m, n).unwrap(),
            LoraRank::Fixed(3),
        )
        .unwrap();
        let expect = reference.b.matmul(&reference.a).unwrap();
        let got = Mat::widen(MatRef::from_slice(b, m, 3).unwrap())
            .matmul(&Mat::widen(MatRef::from_slice(a, 3, n).unwrap()))
            .unwrap();
        let scale = Mat::widen(MatRef::from_slice(&delta, m, n).unwrap()).frobenius_norm();
        assert!(got.distance(&expect).unwrap() <= 1e-5 * scale, "{name}");
        // The error the summary reports is the singular values' tail.
        tail2 += reference.singular_values[3..]
            .iter()
            .map(|s| s * s)
            .sum::<f64>();
        norm2 += scale * scale;
    }
    assert!(
        (s.relative_error - (tail2 / norm2).sqrt()).abs() <= 1e-4,
        "{}",
        s.relative_error
    );
    // The randomized default and the energy rule, through the binary.
    let kernels = env!("CARGO_BIN_EXE_kernels");
    for extra in [&["--rank", "2"][..], &["--energy", "0.9"][..]] {
        let run = Command::new(kernels)
            .args(["extract-lora", "--base"])
            .arg(&base)
            .arg("--finetuned")
            .arg(&ft)
            .arg("-o")
            .arg(zoo.root.path().join(format!("adapter{}", extra[1])))
            .args(extra)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    assert!(extract(&cpu, &base, &ft, &out, RankRule::Exact(3), false).is_err());
}

#[test]
fn the_demo_runs_every_subcommand_and_says_what_it_did() {
    let root = tempfile::tempdir().unwrap();
    let kept = root.path().join("demo");
    let run = Command::new(env!("CARGO_BIN_EXE_kernels"))
        .args(["demo", "--keep"])
        .arg(&kept)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for needle in [
        "1. wrote",
        "2. TIES merge",
        "3. ComPEFT",
        "bits per parameter",
        "4. LoRA",
    ] {
        assert!(stdout.contains(needle), "{needle}: {stdout}");
    }
    for dir in ["merged", "ft1-compeft", "ft1-lora"] {
        assert!(kept.join(dir).is_dir(), "{dir}");
    }
    assert!(Checkpoint::open(&kept.join("merged")).is_ok());
}

#[test]
fn compeft_merge_adds_each_compressed_task_vector() {
    use kernels_core::ops::ternary::{CompeftParams, compeft_ref, ternary_add_ref};
    let zoo = Zoo::new(Dtype::F32, 1);
    let yaml = "merge_method: compeft\nbase_model: BASE\nparameters: {alpha: 2.0, lambda: 0.5}\nmodels:\n  - model: FT0\n    parameters: {weight: 1.0, density: 0.2}\n  - model: FT1\n    parameters: {weight: 0.5, density: 0.05}\n";
    let out = zoo.merge(yaml, "compeft").unwrap();
    let decisions: Vec<_> = [(0, 0.2), (1, 0.05)]
        .iter()
        .map(|&(i, d)| {
            let taus: Vec<Vec<f32>> = zoo
                .base
                .keys()
                .map(|n| tau(&zoo.tuned[i], &zoo.base, n))
                .collect();
            let views: Vec<&[f32]> = taus.iter().map(|t| &t[..]).collect();
            let params = CompeftParams::default()
                .with_keep(KeepRule::Density(d))
                .with_alpha(2.0);
            compeft_ref(&views, params).unwrap()
        })
        .collect();
    for (k, (name, (_, got))) in out.iter().enumerate() {
        let mut expect = zoo.base[name].1.clone();
        for ((decided, codes), w) in decisions.iter().zip([1.0f32, 0.5]) {
            ternary_add_ref(&mut expect, &codes[k], decided.scale, 0.5 * w).unwrap();
        }
        for (g, e) in got.iter().zip(&expect) {
            assert!(
                (g - e).abs() <= 1e-6 * (e.abs() + 1.0),
                "{name}: {g} vs {e}"
            );
        }
        // Something was added: the merge differs from the base.
        assert_ne!(got, &zoo.base[name].1, "{name}");
    }
}

#[test]
fn fisher_merge_weights_by_the_fisher_diagonals() {
    use kernels_core::ops::merge::{FisherParams, fisher_merge_ref, sum_squares_ref};
    let zoo = Zoo::new(Dtype::F32, 1);
    // Fisher diagonals: squares of random draws, so positive with a spread.
    let fishers: Vec<Tensors> = (0..2)
        .map(|i| {
            let mut f = model_values(50 + i, None, 1.0);
            for (_, v) in f.values_mut() {
                for x in v.iter_mut() {
                    *x *= *x;
                }
            }
            write_model(
                &zoo.root.path().join(format!("fisher{i}")),
                &f,
                Dtype::F32,
                1,
            );
            f
        })
        .collect();
    let yaml = format!(
        "merge_method: fisher\nparameters: {{normalize: true, floor: 1e-6}}\nmodels:\n  - model: FT0\n    parameters: {{weight: 1.0, fisher: {0}/fisher0}}\n  - model: FT1\n    parameters: {{weight: 2.0, fisher: {0}/fisher1}}\n",
        zoo.root.path().display()
    );
    let out = zoo.merge(&yaml, "fisher").unwrap();
    let norms: Vec<f64> = fishers
        .iter()
        .map(|f| f.values().map(|(_, v)| sum_squares_ref(v)).sum())
        .collect();
    for (name, (_, got)) in &out {
        let mut expect = vec![0.0; got.len()];
        let params = FisherParams::default()
            .with_floor(1e-6)
            .with_normalization(&norms);
        fisher_merge_ref(
            &[&zoo.tuned[0][name].1[..], &zoo.tuned[1][name].1[..]],
            &[&fishers[0][name].1[..], &fishers[1][name].1[..]],
            &[1.0, 2.0],
            params,
            &mut expect,
        )
        .unwrap();
        for (g, e) in got.iter().zip(&expect) {
            assert!(
                (g - e).abs() <= 1e-5 * (e.abs() + 1e-3),
                "{name}: {g} vs {e}"
            );
        }
    }
    // A model without its Fisher directory is an error naming it.
    let missing = "merge_method: fisher\nmodels:\n  - model: FT0\n    parameters: {weight: 1.0}\n";
    let e = zoo.merge(missing, "nofisher").unwrap_err();
    assert!(format!("{e:#}").contains("fisher"), "{e:#}");
}

#[test]
fn opcm_merges_in_order_as_the_reference_projections_say() {
    use kernels_core::ops::lowrank::{OpcmParams, SvdRef, opcm_project_ref, thin_svd_ref};
    use kernels_core::{MatRef, Real};
    let zoo = Zoo::new(Dtype::F32, 1);
    let yaml = "merge_method: opcm\nbase_model: BASE\nparameters: {alpha: 0.4}\nmodels:\n  - model: FT2\n  - model: FT0\n  - model: FT1\n";
    let out = zoo.merge(yaml, "opcm").unwrap();
    let order = [2, 0, 1];
    let mut merged: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut task_norms = [0.0f64; 3];
    for (name, (shape, _)) in &zoo.base {
        let taus: Vec<Vec<f32>> = order
            .iter()
            .map(|&i| tau(&zoo.tuned[i], &zoo.base, name))
            .collect();
        for (k, t) in taus.iter().enumerate() {
            task_norms[k] += t.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>();
        }
        let mut n: Vec<f64> = taus[0].iter().map(|&v| f64::from(v)).collect();
        for t in &taus[1..] {
            let added: Vec<f64> = if shape.len() == 2 && !name.contains("embed") {
                let (rows, cols) = (shape[0], shape[1]);
                let svd = thin_svd_ref(MatRef::from_slice(&n, rows, cols).unwrap()).unwrap();
                let s: Vec<f32> = svd.s.iter().map(|&v| v as f32).collect();
                let view = SvdRef {
                    u: svd.u.as_ref(),
                    s: &s,
                    v: svd.v.as_ref(),
                };
                let t: Vec<f64> = t.iter().map(|v| v.to_f64()).collect();
                let cleaned = opcm_project_ref(
                    view,
                    MatRef::from_slice(&t, rows, cols).unwrap(),
                    OpcmParams::default().with_alpha(0.4),
                )
                .unwrap();
                cleaned.as_slice().to_vec()
            } else {
                t.iter().map(|v| v.to_f64()).collect()
            };
            for (a, b) in n.iter_mut().zip(added) {
                *a += b;
            }
        }
        merged.insert(name.clone(), n);
    }
    let merged_norm = merged.values().flatten().map(|v| v * v).sum::<f64>().sqrt();
    let scale = task_norms.iter().map(|s| s.sqrt()).sum::<f64>() / 3.0 / merged_norm;
    for (name, (_, got)) in &out {
        for (j, g) in got.iter().enumerate() {
            let e = f64::from(zoo.base[name].1[j]) + scale * merged[name][j];
            assert!(
                (f64::from(*g) - e).abs() <= 1e-5 * (e.abs() + 1.0),
                "{name}[{j}]: {g} vs {e}"
            );
        }
    }
}

#[test]
fn slices_stack_and_merge_layer_ranges() {
    let zoo = Zoo::new(Dtype::F32, 1);
    // A frankenmerge: both layers of FT0, then layer 1 of FT1 as layer 2.
    let stacked = "merge_method: passthrough\nslices:\n  - sources:\n      - model: FT0\n        layer_range: [0, 2]\n  - sources:\n      - model: FT1\n        layer_range: [1, 2]\n";
    let out = zoo.merge(stacked, "stacked").unwrap();
    let layer = |l: usize, suffix: &str| format!("model.layers.{l}.{suffix}");
    for suffix in ["mlp.up_proj.weight", "self_attn.q_proj.weight"] {
        assert_eq!(out[&layer(0, suffix)].1, zoo.tuned[0][&layer(0, suffix)].1);
        assert_eq!(out[&layer(1, suffix)].1, zoo.tuned[0][&layer(1, suffix)].1);
        assert_eq!(out[&layer(2, suffix)].1, zoo.tuned[1][&layer(1, suffix)].1);
    }
    // Embeddings from the first slice, the final norm from the last.
    let embed = "model.embed_tokens.weight";
    assert_eq!(out[embed].1, zoo.tuned[0][embed].1);
    assert_eq!(
        out["model.norm.weight"].1,
        zoo.tuned[1]["model.norm.weight"].1
    );
    // The test model has an input norm in layer 0 only.
    assert_eq!(out.len(), 1 + 3 + 2 + 2 + 1);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(zoo.root.path().join("stacked/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["num_hidden_layers"], 3);
    // A slerp over a slice with a gradient: layer 0 at t = 0 is the base, layer 1 at t = 1 FT0.
    let slerp = "merge_method: slerp\nbase_model: BASE\nparameters:\n  t: [0.0, 1.0]\nslices:\n  - sources:\n      - model: BASE\n        layer_range: [0, 2]\n      - model: FT0\n        layer_range: [0, 2]\n";
    let out = zoo.merge(slerp, "slerped").unwrap();
    for suffix in ["mlp.up_proj.weight", "self_attn.q_proj.weight"] {
        for (l, want) in [(0, &zoo.base), (1, &zoo.tuned[0])] {
            for (g, e) in out[&layer(l, suffix)]
                .1
                .iter()
                .zip(&want[&layer(l, suffix)].1)
            {
                assert!(
                    (g - e).abs() <= 1e-6 * (e.abs() + 1.0),
                    "layer {l} {suffix}"
                );
            }
        }
    }
    // A source whose layers are missing is an error naming the tensor and model.
    let beyond = "merge_method: passthrough\nslices:\n  - sources:\n      - model: FT0\n        layer_range: [1, 3]\n";
    let e = zoo.merge(beyond, "beyond").unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("no layer 2") && e.contains("ft0"), "{e}");
    // A second source that lacks the layers is an error naming the tensor and that model.
    let short = "merge_method: linear\nslices:\n  - sources:\n      - model: FT0\n        layer_range: [0, 1]\n        parameters: {weight: 1}\n      - model: FT1\n        layer_range: [1, 2]\n        parameters: {weight: 1}\n";
    let e = format!("{:#}", zoo.merge(short, "short").unwrap_err());
    assert!(
        e.contains("model.layers.1.input_layernorm.weight") && e.contains("ft1"),
        "{e}"
    );
}

#[test]
fn ties_over_tensors_larger_than_a_chunk_matches_the_reference() {
    // 5e6 elements: more than one 2^22-element chunk of the streamed merge, with ties at the cut.
    let root = tempfile::tempdir().unwrap();
    let (rows, cols) = (2500, 2000);
    let n = rows * cols;
    let one = |seed: u64, offset: Option<&[f32]>| -> Tensors {
        let rng = CounterRng::new(seed);
        let values = (0..n)
            .map(|i| {
                let b = offset.map_or(0.0, |o| o[i]);
                // Coarse steps: many equal magnitudes around the cut.
                b + ((rng.u32_at(i as u64) % 64) as f32 - 32.0) / 256.0
            })
            .collect();
        [("w".to_string(), (vec![rows, cols], values))]
            .into_iter()
            .collect()
    };
    let base = one(1, None);
    write_model(&root.path().join("b"), &base, Dtype::BF16, 1);
    for i in 0..2 {
        write_model(
            &root.path().join(format!("t{i}")),
            &one(2 + i, Some(&base["w"].1)),
            Dtype::BF16,
            1,
        );
    }
    let dir = root.path().display();
    let yaml = format!(
        "merge_method: ties\nbase_model: {dir}/b\nmodels:\n  - model: {dir}/t0\n    parameters: {{weight: 1, density: 0.3}}\n  - model: {dir}/t1\n    parameters: {{weight: 0.5, density: 0.3}}\n"
    );
    let config = MergeConfig::parse(&yaml).unwrap();
    let options = MergeOptions {
        out: root.path().join("out"),
        force: false,
        shard_bytes: 1 << 40,
        seed: 0,
        cpu: Cpu::detect(),
        gpu: None,
        progress: false,
    };
    merge::run(&config, &yaml, &options).unwrap();
    let got = &read_all(&options.out)["w"].1;
    let read = |name: &str| read_all(&root.path().join(name))["w"].1.clone();
    let (b, t0, t1) = (read("b"), read("t0"), read("t1"));
    let keep = (0.3 * n as f64).floor() as u64;
    let trimmed: Vec<Vec<f32>> = [&t0, &t1]
        .iter()
        .map(|t| {
            let tau: Vec<f32> = t.iter().zip(&b).map(|(x, y)| x - y).collect();
            let mut out = vec![0.0; n];
            ties_trim_ref(&tau, KeepRule::Count(keep), &mut out).unwrap();
            out
        })
        .collect();
    let rule = TiesElection::default()
        .with_zero_sum_elects_positive(true)
        .with_normalize(true);
    let mut expect = vec![0.0; n];
    ties_elect_with_ref(
        &b,
        &[&trimmed[0], &trimmed[1]],
        &[1.0, 0.5],
        1.0,
        rule,
        &mut expect,
    )
    .unwrap();
    assert_eq!(got, &round_as(&expect, Dtype::BF16));
}

/// A GPU context (lavapipe in CI), or `None` where the environment says to skip GPU tests.
fn gpu_or_skip() -> Option<Arc<Context>> {
    match Context::new_blocking(ContextOptions::default()) {
        Ok(ctx) => Some(Arc::new(ctx)),
        Err(e) if std::env::var_os("KERNELS_WGPU_SKIP_WITHOUT_ADAPTER").is_some() => {
            eprintln!("skipped: no GPU adapter: {e}");
            None
        }
        Err(e) => panic!("no GPU adapter (set KERNELS_WGPU_SKIP_WITHOUT_ADAPTER to skip): {e}"),
    }
}

#[test]
fn gpu_merges_match_the_cpu_merges() {
    let Some(gpu) = gpu_or_skip() else {
        return;
    };
    let two = |method: &str, params: &str| {
        format!(
            "merge_method: {method}\nbase_model: BASE\nmodels:\n  - model: FT0\n    parameters: {{weight: 1.0{params}}}\n  - model: FT1\n    parameters: {{weight: 0.5{params}}}\n"
        )
    };
    let configs = [
        ("linear", "merge_method: linear\nmodels:\n  - model: FT0\n    parameters: {weight: 1.0}\n  - model: FT1\n    parameters: {weight: 3.0}\n".to_owned()),
        ("passthrough", "merge_method: passthrough\nmodels:\n  - model: FT2\n    parameters: {scale: 0.5}\n".to_owned()),
        ("task_arithmetic", two("task_arithmetic", "")),
        ("ties", two("ties", ", density: 0.5")),
        ("dare_ties", two("dare_ties", ", density: 0.5")),
        ("dare_linear", two("dare_linear", ", density: 0.7")),
        ("breadcrumbs_ties", two("breadcrumbs_ties", ", density: 0.6, gamma: 0.05")),
        ("slerp", "merge_method: slerp\nbase_model: BASE\nmodels:\n  - model: FT0\nparameters: {t: 0.3}\n".to_owned()),
        ("model_stock", "merge_method: model_stock\nbase_model: BASE\nmodels:\n  - model: FT0\n  - model: FT1\n  - model: FT2\n".to_owned()),
    ];
    for dtype in [Dtype::F32, Dtype::BF16] {
        let zoo = Zoo::new(dtype, 2);
        for i in 0..2 {
            let mut f = model_values(50 + i, None, 1.0);
            f.values_mut().flat_map(|(_, v)| v).for_each(|x| *x *= *x);
            let dir = zoo.root.path().join(format!("fisher{i}"));
            write_model(&dir, &f, Dtype::F32, 1);
        }
        let fisher = format!(
            "merge_method: fisher\nparameters: {{normalize: true}}\nmodels:\n  - model: FT0\n    parameters: {{weight: 1.0, fisher: {0}/fisher0}}\n  - model: FT1\n    parameters: {{weight: 2.0, fisher: {0}/fisher1}}\n",
            zoo.root.path().display()
        );
        for (method, yaml) in configs.iter().chain([&("fisher", fisher)]) {
            let on_cpu = zoo.merge(yaml, &format!("{method}-cpu")).unwrap();
            let on_gpu = zoo
                .merge_on(yaml, &format!("{method}-gpu"), Some(gpu.clone()))
                .unwrap();
            assert_eq!(on_cpu.len(), on_gpu.len());
            for (name, (shape, c)) in &on_cpu {
                let (gpu_shape, g) = &on_gpu[name];
                assert_eq!(shape, gpu_shape);
                for (j, (g, c)) in g.iter().zip(c).enumerate() {
                    // f32 sums on the GPU against f64 on the CPU: a few ulps of the terms (the
                    // values and deltas are O(1)); bf16 output: one rounding step either way.
                    let mut tol = 64.0 * f32::EPSILON * (c.abs() + 1.0);
                    if dtype == Dtype::BF16 {
                        tol += c.abs() / 128.0;
                    }
                    assert!(
                        (g - c).abs() <= tol,
                        "{method} {dtype:?} {name}[{j}]: GPU {g} vs CPU {c}"
                    );
                }
            }
        }
    }
}
