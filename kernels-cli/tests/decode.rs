//! `kernels calibrate`, `eval` and `generate` through the binary, on a tiny random Llama with a
//! byte-level tokenizer and a chat template, written as GGUF by the test: thresholds files that
//! read back with one entry per layer, perplexities that thresholds change, generation that
//! streams, and bad inputs failing with a named error.

use std::path::Path;
use std::process::{Command, Output};

use kernels_cli::llm::read_thresholds;
use kernels_llm::gguf::Gguf;
use kernels_llm::model::{LlamaConfig, Policy, RopeStyle, synthetic_writer};
use kernels_llm::source::synthetic_hf;
use kernels_llm::tokenizer::{Tokenizer, byte_level_alphabet};
use safetensors::{Dtype, tensor::TensorView};

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n";

fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        vocab: 256 + SPECIALS.len(),
        hidden: 32,
        intermediate: 48,
        layers: 3,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        rope_theta: 10_000.0,
        rope_style: RopeStyle::Interleaved,
        rms_eps: 1e-5,
        context: 256,
    }
}

fn write_model(path: &Path) {
    let mut w = synthetic_writer(&tiny_config(), 3, true);
    let alphabet: Vec<String> = byte_level_alphabet().iter().map(char::to_string).collect();
    let mut tokens: Vec<&str> = alphabet.iter().map(String::as_str).collect();
    tokens.extend(SPECIALS);
    let mut types = vec![1; 256];
    types.extend([3, 3, 3]);
    w.metadata_str("tokenizer.ggml.model", "gpt2");
    w.metadata_str("tokenizer.ggml.pre", "smollm");
    w.metadata_strs("tokenizer.ggml.tokens", &tokens);
    w.metadata_strs("tokenizer.ggml.merges", &[]);
    w.metadata_i32s("tokenizer.ggml.token_type", &types);
    w.metadata_u32("tokenizer.ggml.eos_token_id", 258);
    w.metadata_str("tokenizer.chat_template", CHAT_TEMPLATE);
    std::fs::write(path, w.finish()).unwrap();
}

/// [`write_model`]'s model and tokenizer as a Hugging Face directory: `config.json`,
/// `model.safetensors` (f32, transformers' names and q/k row order), `tokenizer.json` and
/// `tokenizer_config.json`.
fn write_hf_model(gguf: &Path, dir: &Path) {
    let (config, tensors) = synthetic_hf(&tiny_config(), 3, true);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            let view =
                TensorView::new(Dtype::F32, shape.to_vec(), bytemuck::cast_slice(values)).unwrap();
            (name.to_string(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let bytes = std::fs::read(gguf).unwrap();
    let tokenizer = Tokenizer::from_gguf(&Gguf::parse(&bytes).unwrap()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_json().unwrap()).unwrap();
    let tokenizer_config = serde_json::json!({
        "eos_token": "<|endoftext|>",
        "add_bos_token": false,
        "chat_template": CHAT_TEMPLATE,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .unwrap();
}

fn kernels(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kernels"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn perplexity(stdout: &str) -> f64 {
    stdout
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no perplexity in {stdout:?}"))
}

#[test]
fn calibrate_eval_and_generate_run_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_model(&model);
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog, 1234 times. ".repeat(4),
    )
    .unwrap();
    let m = model.to_str().unwrap();
    let t = text.to_str().unwrap();
    let dense = ok(&kernels(&[
        "eval", "--model", m, "--text", t, "--window", "64",
    ]));
    assert!(dense.contains("tokens scored"), "{dense}");
    for (policy, expected) in [("cats", Policy::Cats), ("teal", Policy::Teal)] {
        let file = dir.path().join(format!("{policy}.json"));
        let f = file.to_str().unwrap();
        let said = ok(&kernels(&[
            "calibrate",
            "--model",
            m,
            "--text",
            t,
            "--policy",
            policy,
            "--sparsity",
            "0.6",
            "--window",
            "64",
            "-o",
            f,
        ]));
        assert!(said.contains("calibrated 3 layers"), "{said}");
        let (read_policy, layers) = read_thresholds(&file).unwrap();
        assert_eq!((read_policy, layers.len()), (expected, 3));
        assert!(layers.iter().all(|l| match expected {
            Policy::Cats => l.gate_activation > 0.0 && l.mlp_input == 0.0,
            _ => l.mlp_input > 0.0 && l.down_input > 0.0 && l.gate_activation == 0.0,
        }));
        let sparse = ok(&kernels(&[
            "eval",
            "--model",
            m,
            "--text",
            t,
            "--window",
            "64",
            "--thresholds",
            f,
            "--dtype",
            "f32",
        ]));
        assert_ne!(perplexity(&sparse), perplexity(&dense), "{policy}");
        let generated = kernels(&[
            "generate",
            "--model",
            m,
            "--prompt",
            "hello",
            "--thresholds",
            f,
            "--max-tokens",
            "8",
        ]);
        ok(&generated);
        let stderr = String::from_utf8_lossy(&generated.stderr);
        assert!(
            stderr.contains("prompt tokens;") && stderr.contains("tok/s"),
            "{stderr}"
        );
    }
    let raw = ok(&kernels(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "abc",
        "--raw",
        "--max-tokens",
        "4",
    ]));
    assert!(!raw.is_empty());
    // Past the end-of-sequence token: exactly the tokens asked for.
    let timed = kernels(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "abc",
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--threads",
        "2",
    ]);
    ok(&timed);
    let stderr = String::from_utf8_lossy(&timed.stderr);
    assert!(stderr.contains("; 12 tokens generated"), "{stderr}");
}

#[test]
fn the_gpu_decodes_as_the_cpu() {
    if kernels_wgpu::Context::new_blocking(kernels_wgpu::ContextOptions::default()).is_err()
        && std::env::var_os("KERNELS_WGPU_SKIP_WITHOUT_ADAPTER").is_some()
    {
        eprintln!("skipped: no GPU adapter");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_model(&model);
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "Sphinx of black quartz, judge my vow. ".repeat(3)).unwrap();
    let (m, t) = (model.to_str().unwrap(), text.to_str().unwrap());
    let eval = |device: &str| {
        let args = [
            "eval", "--model", m, "--text", t, "--dtype", "f32", "--device", device,
        ];
        perplexity(&ok(&kernels(&args)))
    };
    let (cpu, gpu) = (eval("cpu"), eval("gpu"));
    assert!((cpu - gpu).abs() <= 1e-4 * cpu, "{cpu} vs {gpu}");
    let generated = kernels(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "hi",
        "--max-tokens",
        "5",
        "--ignore-eos",
        "--device",
        "gpu",
    ]);
    ok(&generated);
    let stderr = String::from_utf8_lossy(&generated.stderr);
    assert!(stderr.contains("; 5 tokens generated"), "{stderr}");
}

#[test]
fn a_hugging_face_directory_decodes_as_its_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_model(&gguf);
    let hf = dir.path().join("tiny-hf");
    write_hf_model(&gguf, &hf);
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "Pack my box with five dozen liquor jugs. ".repeat(3)).unwrap();
    let t = text.to_str().unwrap();
    let eval = |model: &Path| {
        let args = [
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--text",
            t,
            "--dtype",
            "f32",
        ];
        perplexity(&ok(&kernels(&args)))
    };
    let (from_gguf, from_hf) = (eval(&gguf), eval(&hf));
    assert!(
        (from_gguf - from_hf).abs() <= 1e-4 * from_gguf,
        "{from_gguf} vs {from_hf}"
    );
    let thresholds = dir.path().join("teal.json");
    let th = thresholds.to_str().unwrap();
    let h = hf.to_str().unwrap();
    ok(&kernels(&[
        "calibrate",
        "--model",
        h,
        "--text",
        t,
        "--policy",
        "teal",
        "-o",
        th,
    ]));
    let generated = kernels(&[
        "generate",
        "--model",
        h,
        "--prompt",
        "hello",
        "--thresholds",
        th,
        "--max-tokens",
        "6",
        "--ignore-eos",
    ]);
    ok(&generated);
    let stderr = String::from_utf8_lossy(&generated.stderr);
    assert!(stderr.contains("; 6 tokens generated"), "{stderr}");
    // A directory whose tokenizer.json is missing.
    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    let out = kernels(&["eval", "--model", h, "--text", t]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokenizer.json"));
}

#[test]
fn bad_inputs_fail_with_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_model(&model);
    let m = model.to_str().unwrap();
    let fails = |args: &[&str], says: &str| {
        let out = kernels(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    };
    fails(
        &["eval", "--model", m, "--text", "/nonexistent.txt"],
        "cannot read the text",
    );
    let not_gguf = dir.path().join("not.gguf");
    std::fs::write(&not_gguf, b"GGML and then nothing").unwrap();
    fails(
        &["eval", "--model", not_gguf.to_str().unwrap(), "--text", m],
        "not a readable GGUF file",
    );
    fails(
        &[
            "generate",
            "--model",
            dir.path().to_str().unwrap(),
            "--prompt",
            "x",
        ],
        "without config.json",
    );
    fails(
        &[
            "calibrate",
            "--model",
            m,
            "--text",
            m,
            "--policy",
            "cats",
            "-o",
            "t.json",
            "--device",
            "gpu",
        ],
        "calibrate runs on the CPU",
    );
    fails(
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "x",
            "--max-tokens",
            "100000",
        ],
        "context",
    );
    let other = dir.path().join("other.json");
    std::fs::write(
        &other,
        r#"{"format": "kernels-llm thresholds v1", "policy": "cats", "layers": []}"#,
    )
    .unwrap();
    fails(
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "x",
            "--thresholds",
            other.to_str().unwrap(),
        ],
        "does not fit this model",
    );
    std::fs::write(&other, r#"{"format": "something else"}"#).unwrap();
    fails(
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "x",
            "--thresholds",
            other.to_str().unwrap(),
        ],
        "not a thresholds file",
    );
    let usage = kernels(&["calibrate", "--model", m]);
    assert_eq!(usage.status.code(), Some(2));
}
