//! Where a model's tensors come from: a GGUF file ([`Gguf`] is a [`TensorSource`]), a Hugging Face
//! checkpoint (safetensors shards a caller maps; [`LlamaConfig::from_hf_config`](crate::model::LlamaConfig::from_hf_config) reads its
//! `config.json`), or anything else that can name a tensor, give its shape and widen it to `f32`.
//! [`Llama::from_source`](crate::model::Llama::from_source) loads from any of them.
//!
//! The two formats name the tensors differently ([`Naming`]) and order the query and key rows
//! differently: llama.cpp's converter permutes each head's rows so that adjacent pairs rotate
//! together ([`RopeStyle::Interleaved`](crate::model::RopeStyle)), where Hugging Face rotates
//! row `i` with row `i + d / 2` ([`RopeStyle::Halves`](crate::model::RopeStyle)). Each config
//! reader sets the style its format needs, so one model gives the same logits from either file.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use kernels_core::{Error, Result};

use crate::gguf::Gguf;

/// A tensor of a Llama model, by its role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tensor {
    /// Token embeddings `[vocab, hidden]`.
    Embed,
    /// Output projection `[vocab, hidden]` (absent when tied to the embeddings).
    Output,
    /// Final RMSNorm `[hidden]`.
    Norm,
    /// Layer `l`'s RMSNorm before attention.
    AttentionNorm(usize),
    /// Layer `l`'s query projection.
    Query(usize),
    /// Layer `l`'s key projection.
    Key(usize),
    /// Layer `l`'s value projection.
    Value(usize),
    /// Layer `l`'s attention output projection.
    AttentionOutput(usize),
    /// Layer `l`'s RMSNorm before the MLP.
    MlpNorm(usize),
    /// Layer `l`'s MLP gate.
    Gate(usize),
    /// Layer `l`'s MLP up projection.
    Up(usize),
    /// Layer `l`'s MLP down projection.
    Down(usize),
}

/// How a format names a model's tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// llama.cpp's: `token_embd.weight`, `blk.{l}.attn_q.weight`, ...
    Gguf,
    /// transformers': `model.embed_tokens.weight`, `model.layers.{l}.self_attn.q_proj.weight`, ...
    HuggingFace,
}

impl Naming {
    /// The name of `tensor` in this format.
    ///
    /// ```
    /// use kernels_llm::source::{Naming, Tensor};
    /// assert_eq!(Naming::Gguf.name(Tensor::Gate(3)), "blk.3.ffn_gate.weight");
    /// assert_eq!(Naming::HuggingFace.name(Tensor::Gate(3)), "model.layers.3.mlp.gate_proj.weight");
    /// assert_eq!(Naming::HuggingFace.name(Tensor::Output), "lm_head.weight");
    /// ```
    #[must_use]
    pub fn name(self, tensor: Tensor) -> String {
        use Tensor as T;
        let (layer, gguf, hf) = match tensor {
            T::Embed => return self.pick("token_embd.weight", "model.embed_tokens.weight"),
            T::Output => return self.pick("output.weight", "lm_head.weight"),
            T::Norm => return self.pick("output_norm.weight", "model.norm.weight"),
            T::AttentionNorm(l) => (l, "attn_norm", "input_layernorm"),
            T::Query(l) => (l, "attn_q", "self_attn.q_proj"),
            T::Key(l) => (l, "attn_k", "self_attn.k_proj"),
            T::Value(l) => (l, "attn_v", "self_attn.v_proj"),
            T::AttentionOutput(l) => (l, "attn_output", "self_attn.o_proj"),
            T::MlpNorm(l) => (l, "ffn_norm", "post_attention_layernorm"),
            T::Gate(l) => (l, "ffn_gate", "mlp.gate_proj"),
            T::Up(l) => (l, "ffn_up", "mlp.up_proj"),
            T::Down(l) => (l, "ffn_down", "mlp.down_proj"),
        };
        match self {
            Self::Gguf => alloc::format!("blk.{layer}.{gguf}.weight"),
            Self::HuggingFace => alloc::format!("model.layers.{layer}.{hf}.weight"),
        }
    }

    fn pick(self, gguf: &str, hf: &str) -> String {
        String::from(match self {
            Self::Gguf => gguf,
            Self::HuggingFace => hf,
        })
    }
}

/// Named tensors a model loads from.
///
/// ```
/// use kernels_core::Result;
/// use kernels_llm::source::{Naming, TensorSource};
/// // One 2 x 3 tensor, named as transformers names the final norm (a made-up shape).
/// struct One;
/// impl TensorSource for One {
///     fn naming(&self) -> Naming { Naming::HuggingFace }
///     fn shape(&self, name: &str) -> Option<Vec<usize>> {
///         (name == "model.norm.weight").then(|| vec![2, 3])
///     }
///     fn read_f32(&self, _: &str) -> Result<Vec<f32>> { Ok(vec![1.0; 6]) }
/// }
/// assert_eq!(One.shape("model.norm.weight"), Some(vec![2, 3]));
/// assert_eq!(One.shape("lm_head.weight"), None);
/// ```
pub trait TensorSource {
    /// How the source names tensors (and so how its query and key rows are ordered).
    fn naming(&self) -> Naming;

    /// Tensor `name`'s shape, slowest dimension first (`nn.Linear`'s `[out, in]`); `None` where
    /// the source has no such tensor.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;

    /// Tensor `name`'s elements as `f32`, row-major. The loader asks only for tensors whose
    /// shape it has checked, and checks the length it gets.
    ///
    /// # Errors
    ///
    /// The source's own: a missing tensor, an element type it cannot widen, unreadable bytes.
    fn read_f32(&self, name: &str) -> Result<Vec<f32>>;
}

impl TensorSource for Gguf<'_> {
    fn naming(&self) -> Naming {
        Naming::Gguf
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        // ggml lists dimensions fastest first.
        let t = self.tensor(name)?;
        t.dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d).ok())
            .collect()
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.dequantize(name)
    }
}

/// A missing or unusable `config.json` field.
#[cfg(feature = "huggingface")]
fn bad_config(reason: &'static str) -> Error {
    Error::BadFormat { offset: 0, reason }
}

#[cfg(feature = "huggingface")]
impl crate::model::LlamaConfig {
    /// The hyper-parameters in a Hugging Face `config.json` (its bytes) of a `llama` model, with
    /// transformers' defaults for what it leaves out (`num_key_value_heads`: the heads;
    /// `head_dim`: the width over the heads; `rope_theta` 10000; `rms_norm_eps` 1e-6;
    /// `max_position_embeddings` 2048), and [`RopeStyle::Halves`](crate::model::RopeStyle).
    ///
    /// ```
    /// use kernels_llm::model::{LlamaConfig, RopeStyle};
    /// let json = br#"{"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
    ///     "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    ///     "num_key_value_heads": 3, "rope_theta": 100000.0, "rms_norm_eps": 1e-05,
    ///     "max_position_embeddings": 8192, "tie_word_embeddings": true}"#;
    /// let c = LlamaConfig::from_hf_config(json)?;
    /// assert_eq!((c.head_dim, c.kv_width(), c.rope_style), (64, 192, RopeStyle::Halves));
    /// # Ok::<(), kernels_core::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::BadFormat`] for bytes that are not a JSON object; [`Error::Unsupported`] for
    /// another `model_type`, an activation other than SiLU, rotary scaling, or biases;
    /// [`Error::InvalidParam`] for a missing or inconsistent size (as
    /// [`LlamaConfig::from_gguf`](crate::model::LlamaConfig::from_gguf)).
    pub fn from_hf_config(bytes: &[u8]) -> Result<Self> {
        Ok(hf_config(bytes)?.0)
    }
}

/// A `config.json`'s hyper-parameters and its `tie_word_embeddings`.
#[cfg(feature = "huggingface")]
pub(crate) fn hf_config(bytes: &[u8]) -> Result<(crate::model::LlamaConfig, bool)> {
    use crate::model::{LlamaConfig, RopeStyle, invalid};
    use serde_json::Value;

    let json: Value =
        serde_json::from_slice(bytes).map_err(|_| bad_config("config.json is not JSON"))?;
    if !json.is_object() {
        return Err(bad_config("config.json is not a JSON object"));
    }
    if json["model_type"].as_str() != Some("llama") {
        return Err(Error::Unsupported {
            feature: "a model_type other than llama",
            hint: "config.json's model_type must be llama (Llama, SmolLM and their fine-tunes)",
        });
    }
    let unsupported =
        |feature: &'static str, hint: &'static str| Err(Error::Unsupported { feature, hint });
    if !matches!(json["hidden_act"].as_str(), None | Some("silu")) {
        return unsupported(
            "an MLP activation other than SiLU",
            "hidden_act must be silu",
        );
    }
    let scaling = &json["rope_scaling"];
    let default_scaling = scaling.is_null()
        || [&scaling["rope_type"], &scaling["type"]]
            .iter()
            .any(|t| t.as_str() == Some("default"));
    if !default_scaling {
        return unsupported(
            "rotary scaling (rope_scaling)",
            "only the plain rotary embedding of Llama 1 and 2 and SmolLM",
        );
    }
    if [&json["attention_bias"], &json["mlp_bias"]]
        .iter()
        .any(|b| b.as_bool() == Some(true))
    {
        return unsupported(
            "biases in attention or MLP",
            "attention_bias and mlp_bias false",
        );
    }
    let size = |key: &'static str, default: Option<usize>| -> Result<usize> {
        match &json[key] {
            Value::Null => default.ok_or(invalid(key, f64::NAN, "present")),
            v => v
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .ok_or(invalid(
                    key,
                    v.as_f64().unwrap_or(f64::NAN),
                    "a whole number",
                )),
        }
    };
    let float = |key: &'static str, default: f64| -> Result<f32> {
        match &json[key] {
            Value::Null => Ok(default as f32),
            v => v
                .as_f64()
                .map(|v| v as f32)
                .ok_or(invalid(key, f64::NAN, "a number")),
        }
    };
    let hidden = size("hidden_size", None)?;
    let heads = size("num_attention_heads", None)?;
    let config = LlamaConfig {
        vocab: size("vocab_size", None)?,
        hidden,
        intermediate: size("intermediate_size", None)?,
        layers: size("num_hidden_layers", None)?,
        heads,
        kv_heads: size("num_key_value_heads", Some(heads))?,
        head_dim: size("head_dim", Some(hidden / heads.max(1)))?,
        rope_theta: float("rope_theta", 10_000.0)?,
        rope_style: RopeStyle::Halves,
        rms_eps: float("rms_norm_eps", 1e-6)?,
        context: size("max_position_embeddings", Some(2048))?,
    };
    config.validate()?;
    let tied = json["tie_word_embeddings"].as_bool().unwrap_or(false);
    Ok((config, tied))
}

/// Tensors held in memory, `f32`, by name: a source for tests, or for a caller that has
/// decoded a checkpoint itself.
///
/// ```
/// use kernels_llm::source::{Naming, NamedTensors, TensorSource};
/// let mut t = NamedTensors::new(Naming::HuggingFace);
/// t.insert("model.norm.weight", vec![3], vec![1.0, 1.0, 1.0])?;
/// assert_eq!(t.shape("model.norm.weight"), Some(vec![3]));
/// assert!(t.insert("bad", vec![2, 2], vec![0.0; 3]).is_err());
/// # Ok::<(), kernels_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct NamedTensors {
    naming: Naming,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl NamedTensors {
    /// No tensors yet, named as `naming` names them.
    #[must_use]
    pub fn new(naming: Naming) -> Self {
        Self {
            naming,
            tensors: BTreeMap::new(),
        }
    }

    /// Adds (or replaces) tensor `name`.
    ///
    /// # Errors
    ///
    /// [`Error::LengthMismatch`] where `values` is not the product of `shape` long.
    pub fn insert(&mut self, name: &str, shape: Vec<usize>, values: Vec<f32>) -> Result<()> {
        let expected = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if expected != Some(values.len()) {
            return Err(Error::LengthMismatch {
                what: "a tensor's elements against its shape",
                expected: expected.unwrap_or(usize::MAX),
                found: values.len(),
            });
        }
        self.tensors.insert(String::from(name), (shape, values));
        Ok(())
    }

    /// Every tensor: name, shape, elements, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[usize], &[f32])> {
        self.tensors
            .iter()
            .map(|(n, (s, v))| (n.as_str(), s.as_slice(), v.as_slice()))
    }
}

impl TensorSource for NamedTensors {
    fn naming(&self) -> Naming {
        self.naming
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|(s, _)| s.clone())
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.tensors
            .get(name)
            .map(|(_, v)| v.clone())
            .ok_or(crate::model::invalid(
                "tensor",
                f64::NAN,
                "present in the file",
            ))
    }
}

/// [`synthetic_gguf`](crate::model::synthetic_gguf)'s model as a Hugging Face checkpoint:
/// `config.json`'s text and the tensors as transformers names them, the query and key rows in
/// transformers' order (llama.cpp's permutation undone), so both load to the same logits.
///
/// ```
/// use kernels_llm::model::{Llama, LlamaConfig, Policy, RopeStyle};
/// use kernels_llm::source::synthetic_hf;
/// let c = LlamaConfig {
///     vocab: 16, hidden: 8, intermediate: 12, layers: 1, heads: 2, kv_heads: 1, head_dim: 4,
///     rope_theta: 10_000.0, rope_style: RopeStyle::Interleaved, rms_eps: 1e-5, context: 8,
/// };
/// let (config_json, tensors) = synthetic_hf(&c, 1, true);
/// let model = Llama::<f32>::from_hf(config_json.as_bytes(), &tensors, Policy::Dense)?;
/// assert_eq!(model.config.rope_style, RopeStyle::Halves);
/// # Ok::<(), kernels_core::Error>(())
/// ```
///
/// # Panics
///
/// Where `config` fails [`LlamaConfig::validate`](crate::model::LlamaConfig::validate).
#[must_use]
pub fn synthetic_hf(
    config: &crate::model::LlamaConfig,
    seed: u64,
    tied: bool,
) -> (String, NamedTensors) {
    config.validate().expect("a valid config");
    let bytes = crate::model::synthetic_gguf(config, seed, tied);
    let file = Gguf::parse(&bytes).expect("the writer's own file");
    let mut tensors = NamedTensors::new(Naming::HuggingFace);
    let mut add = |tensor: Tensor| {
        let name = Naming::Gguf.name(tensor);
        let (Some(shape), Ok(mut values)) = (file.shape(&name), file.read_f32(&name)) else {
            return;
        };
        if let Tensor::Query(_) | Tensor::Key(_) = tensor {
            values = unpermute_rows(&values, config.head_dim, shape[1]);
        }
        let name = Naming::HuggingFace.name(tensor);
        tensors
            .insert(&name, shape, values)
            .expect("the file's shape");
    };
    for t in [Tensor::Embed, Tensor::Output, Tensor::Norm] {
        add(t);
    }
    for l in 0..config.layers {
        for t in [
            Tensor::AttentionNorm(l),
            Tensor::Query(l),
            Tensor::Key(l),
            Tensor::Value(l),
            Tensor::AttentionOutput(l),
            Tensor::MlpNorm(l),
            Tensor::Gate(l),
            Tensor::Up(l),
            Tensor::Down(l),
        ] {
            add(t);
        }
    }
    let c = config;
    let json = alloc::format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
"vocab_size": {}, "hidden_size": {}, "intermediate_size": {}, "num_hidden_layers": {},
"num_attention_heads": {}, "num_key_value_heads": {}, "head_dim": {}, "rope_theta": {:?},
"rms_norm_eps": {:?}, "max_position_embeddings": {}, "tie_word_embeddings": {tied},
"rope_scaling": null, "torch_dtype": "float32"}}"#,
        c.vocab,
        c.hidden,
        c.intermediate,
        c.layers,
        c.heads,
        c.kv_heads,
        c.head_dim,
        c.rope_theta,
        c.rms_eps,
        c.context
    );
    (json, tensors)
}

/// Rows of a query or key matrix (`cols` wide) from llama.cpp's order to transformers': within
/// each head of `head_dim` rows, row `2 i + j` goes to `j head_dim / 2 + i`.
fn unpermute_rows(values: &[f32], head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = alloc::vec![0.0; values.len()];
    for (from, to) in values
        .chunks_exact(head_dim * cols)
        .zip(out.chunks_exact_mut(head_dim * cols))
    {
        for i in 0..half {
            for j in 0..2 {
                let (src, dst) = (2 * i + j, j * half + i);
                to[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&from[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}
