//! mergekit's YAML merge configuration, read as mergekit 0.1.5 reads it: every key checked, every
//! error naming its line.
//!
//! A parameter value is a scalar, a list of numbers interpolated over the layers (a gradient), or
//! a list of `{filter, value}` conditions matched by substring of the tensor name (the first
//! match wins; no `filter` or `filter: "*"` matches everything). [`ParamValue::resolve`] turns
//! one into a number for a tensor at a position `t` in `[0, 1]` through the layers.

use std::collections::BTreeMap;
use std::fmt;

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use marked_yaml::{LoaderOptions, Node};

/// Bound on a configuration file's size: far above any real merge config, and what the parser
/// may allocate stays proportional to it.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// A configuration error, with the line (1-based) it points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Line of the offending key or value, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

type Result<T> = std::result::Result<T, ConfigError>;

fn line_of(node: &Node) -> Option<usize> {
    node.span().start().map(marked_yaml::Marker::line)
}

fn scalar_line(node: &MarkedScalarNode) -> Option<usize> {
    node.span().start().map(marked_yaml::Marker::line)
}

fn error<T>(line: Option<usize>, message: impl Into<String>) -> Result<T> {
    Err(ConfigError {
        line,
        message: message.into(),
    })
}

/// The merge methods: mergekit's, then ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `linear`: weighted sum of the models, divided by the weights' sum (`normalize`, default on).
    Linear,
    /// `task_arithmetic`: base plus the weighted task vectors.
    TaskArithmetic,
    /// `ties`: magnitude trim, sign election, disjoint mean.
    Ties,
    /// `dare_linear`: random drop (L1-rescaled), weighted sum.
    DareLinear,
    /// `dare_ties`: random drop, sign election.
    DareTies,
    /// `breadcrumbs`: drop outliers and the smallest, weighted sum.
    Breadcrumbs,
    /// `breadcrumbs_ties`: the same, with sign election.
    BreadcrumbsTies,
    /// `della`: rank-weighted random drop, sign election.
    Della,
    /// `della_linear`: rank-weighted random drop, weighted sum.
    DellaLinear,
    /// `model_stock`: interpolation towards the fine-tunes' average by their mean cosine.
    ModelStock,
    /// `slerp`: spherical interpolation between the base and one other model.
    Slerp,
    /// `passthrough`: one model's tensors as they are (optionally scaled).
    Passthrough,
    /// `fisher` (ours): Fisher-weighted averaging, each model with a Fisher-diagonal directory
    /// (`parameters: {fisher: PATH}`, safetensors with the model's tensor names).
    Fisher,
    /// `opcm` (ours): OPCM continual merging, the models in the listed order.
    Opcm,
    /// `compeft` (ours): each task vector ComPEFT-compressed over its whole model (global top-k,
    /// ternary, `alpha * std`), then summed as task arithmetic.
    Compeft,
}

/// How a method of the generalised task-arithmetic family sparsifies each task vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsify {
    /// Keep the `max(1, floor(density n))` largest magnitudes.
    Magnitude,
    /// DARE: keep each entry with probability `density`.
    Random,
    /// Breadcrumbs: drop the `floor(gamma n)` largest, then the smallest, keeping `density`.
    MagnitudeOutliers,
    /// DELLA: keep with a probability that rises with the magnitude rank in the row.
    RankedRandom,
}

impl Method {
    /// Every method, with its YAML name.
    pub const ALL: [(&'static str, Method); 15] = [
        ("linear", Method::Linear),
        ("task_arithmetic", Method::TaskArithmetic),
        ("ties", Method::Ties),
        ("dare_linear", Method::DareLinear),
        ("dare_ties", Method::DareTies),
        ("breadcrumbs", Method::Breadcrumbs),
        ("breadcrumbs_ties", Method::BreadcrumbsTies),
        ("della", Method::Della),
        ("della_linear", Method::DellaLinear),
        ("model_stock", Method::ModelStock),
        ("slerp", Method::Slerp),
        ("passthrough", Method::Passthrough),
        ("compeft", Method::Compeft),
        ("fisher", Method::Fisher),
        ("opcm", Method::Opcm),
    ];

    /// The method's YAML name.
    #[must_use]
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("?", |(n, _)| n)
    }

    /// For the generalised task-arithmetic family: (sparsification, sign consensus,
    /// `normalize` default, `rescale` default), as mergekit's registry defines them.
    #[must_use]
    pub fn task_arithmetic_family(self) -> Option<(Option<Sparsify>, bool, bool, bool)> {
        use Sparsify::{Magnitude, MagnitudeOutliers, Random, RankedRandom};
        Some(match self {
            Method::TaskArithmetic => (None, false, false, false),
            Method::Ties => (Some(Magnitude), true, true, false),
            Method::DareTies => (Some(Random), true, false, true),
            Method::DareLinear => (Some(Random), false, false, true),
            Method::Breadcrumbs => (Some(MagnitudeOutliers), false, false, false),
            Method::BreadcrumbsTies => (Some(MagnitudeOutliers), true, false, false),
            Method::Della => (Some(RankedRandom), true, true, true),
            Method::DellaLinear => (Some(RankedRandom), false, false, true),
            _ => return None,
        })
    }

    /// Whether the method needs a `base_model`.
    #[must_use]
    pub fn needs_base(self) -> bool {
        !matches!(self, Method::Linear | Method::Passthrough | Method::Fisher)
    }

    /// Parameters each model may set (`models[i].parameters`), and whether each is required.
    fn model_parameters(self) -> &'static [(&'static str, bool)] {
        match self {
            Method::Linear => &[("weight", true)],
            Method::TaskArithmetic
            | Method::Ties
            | Method::DareLinear
            | Method::DareTies
            | Method::Compeft => &[("weight", true), ("density", false)],
            Method::Breadcrumbs | Method::BreadcrumbsTies => {
                &[("weight", true), ("density", false), ("gamma", false)]
            }
            Method::Della | Method::DellaLinear => &[
                ("weight", true),
                ("density", false),
                ("epsilon", false),
                ("lambda", false),
            ],
            Method::ModelStock | Method::Slerp | Method::Opcm => &[],
            Method::Passthrough => &[("scale", false)],
            Method::Fisher => &[("weight", true), ("fisher", true)],
        }
    }

    /// Parameters the merge as a whole may set (top-level `parameters:`).
    fn global_parameters(self) -> &'static [&'static str] {
        match self {
            Method::Linear => &["normalize", "weight"],
            Method::ModelStock => &["filter_wise"],
            Method::Slerp => &["t"],
            Method::Passthrough => &["scale"],
            Method::Compeft => &["alpha", "lambda", "weight", "density"],
            Method::Fisher => &["normalize", "floor", "weight"],
            Method::Opcm => &["alpha"],
            _ => &[
                "normalize",
                "rescale",
                "lambda",
                "int8_mask",
                "density",
                "weight",
            ],
        }
    }
}

/// Options mergekit has that change nothing here; each prints a warning when set.
const IGNORED_OPTIONS: [(&str, &str); 1] = [(
    "int8_mask",
    "masks are bit sets here; int8_mask changes nothing",
)];

/// A parameter's value before it is resolved for a tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// A number (booleans are 0 and 1).
    Number(f64),
    /// Numbers interpolated linearly over the layers: the first at `t = 0`, the last at `t = 1`.
    Gradient(Vec<f64>),
    /// `{filter, value}` conditions, the first whose filter is a substring of the tensor name
    /// wins; `None` (or `*`) matches any tensor.
    Filtered(Vec<(Option<String>, ParamValue)>),
    /// A local path (the parameters in [`PATH_PARAMETERS`]); never a number.
    Path(String),
}

/// Parameters whose value is a local directory, not a number.
pub const PATH_PARAMETERS: [&str; 1] = ["fisher"];

impl ParamValue {
    /// The value for tensor `name` at position `t` in `[0, 1]` through the layers; `None` where
    /// no condition matches.
    #[must_use]
    pub fn resolve(&self, name: &str, t: f64) -> Option<f64> {
        match self {
            ParamValue::Number(v) => Some(*v),
            ParamValue::Gradient(values) => {
                let scaled = t.clamp(0.0, 1.0) * (values.len() - 1) as f64;
                let i0 = scaled.floor() as usize;
                let i1 = (i0 + 1).min(values.len() - 1);
                let frac = scaled - i0 as f64;
                Some((1.0 - frac) * values[i0] + frac * values[i1])
            }
            ParamValue::Filtered(conditions) => conditions
                .iter()
                .find(|(filter, _)| {
                    filter
                        .as_deref()
                        .is_none_or(|f| f == "*" || name.contains(f))
                })
                .and_then(|(_, value)| value.resolve(name, t)),
            ParamValue::Path(_) => None,
        }
    }
}

/// One `models:` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    /// The model's directory, as written.
    pub path: String,
    /// Its parameters by name.
    pub parameters: BTreeMap<String, ParamValue>,
    /// Line of the entry.
    pub line: Option<usize>,
    /// In a slice's `sources`: the layers `[start, end)` it takes.
    pub layer_range: Option<(usize, usize)>,
}

/// One `slices:` entry: sources whose layer ranges have the same length, merged layer by layer
/// into that many output layers (the output's layers are the slices' in order).
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    /// The sources, in order (the base among them for methods that need one).
    pub sources: Vec<ModelEntry>,
    /// Line of the slice.
    pub line: Option<usize>,
}

impl Slice {
    /// Layers the slice contributes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.sources
            .first()
            .and_then(|s| s.layer_range)
            .map_or(0, |(a, b)| b - a)
    }

    /// Whether it contributes no layer.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A parsed merge configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeConfig {
    /// The method.
    pub method: Method,
    /// The models, in order, the base excluded.
    pub models: Vec<ModelEntry>,
    /// The base model's directory.
    pub base_model: Option<String>,
    /// Top-level parameters.
    pub parameters: BTreeMap<String, ParamValue>,
    /// `dtype`, as written.
    pub dtype: Option<String>,
    /// `out_dtype`, as written.
    pub out_dtype: Option<String>,
    /// Warnings to print (ignored options).
    pub warnings: Vec<String>,
    /// `slices:` (empty when the config lists whole `models:`).
    pub slices: Vec<Slice>,
}

impl MergeConfig {
    /// Parses a configuration.
    ///
    /// ```
    /// use kernels_cli::config::{MergeConfig, Method};
    /// let yaml = "merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./base\n  - model: ./math\n    parameters: {weight: 1.0, density: [1.0, 0.5]}\n";
    /// let config = MergeConfig::parse(yaml)?;
    /// assert_eq!((config.method, config.models.len()), (Method::Ties, 1)); // the base is not a task vector
    /// // The density is a gradient over the layers: halfway at t = 0.5.
    /// assert_eq!(config.model_parameter(0, "density", "model.layers.3.mlp.up_proj.weight", 0.5, None), Ok(0.75));
    /// // Unknown keys are errors naming their line.
    /// let e = MergeConfig::parse("merge_method: ties\nmodle: x\n").unwrap_err();
    /// assert_eq!(e.line, Some(2));
    /// # Ok::<(), kernels_cli::config::ConfigError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the line of the first problem: YAML syntax, an unknown key,
    /// method or parameter, a missing required one, a value of the wrong type.
    pub fn parse(text: &str) -> Result<Self> {
        if text.len() > MAX_CONFIG_BYTES {
            return error(None, format!("the config is over {MAX_CONFIG_BYTES} bytes"));
        }
        let options = LoaderOptions::default().error_on_duplicate_keys(true);
        let root =
            marked_yaml::parse_yaml_with_options(0, text, options).map_err(|e| ConfigError {
                line: None,
                message: format!("not valid YAML for a merge config: {e}"),
            })?;
        let Some(root) = root.as_mapping() else {
            return error(line_of(&root), "the config must be a mapping");
        };
        let mut warnings = Vec::new();
        let mut method = None;
        let mut models_node = None;
        let mut base_model = None;
        let mut parameters_node = None;
        let mut slices_node = None;
        let (mut dtype, mut out_dtype) = (None, None);
        for (key, value) in root.iter() {
            match key.as_str() {
                "merge_method" => {
                    let name = scalar(value, "merge_method")?;
                    let found = Method::ALL.iter().find(|(n, _)| *n == name.as_str());
                    let Some((_, found)) = found else {
                        let known: Vec<&str> = Method::ALL.iter().map(|(n, _)| *n).collect();
                        return error(
                            line_of(value),
                            format!(
                                "unknown merge_method '{}' (this tool has: {})",
                                name.as_str(),
                                known.join(", ")
                            ),
                        );
                    };
                    method = Some(*found);
                }
                "models" => models_node = Some(value),
                "base_model" => base_model = Some(model_reference(value, "base_model")?),
                "parameters" => parameters_node = Some(value),
                "dtype" => dtype = Some(scalar(value, "dtype")?.as_str().to_string()),
                "out_dtype" => out_dtype = Some(scalar(value, "out_dtype")?.as_str().to_string()),
                "name" | "chat_template" => {
                    warnings.push(format!(
                        "line {}: '{}' is ignored by this tool",
                        scalar_line(key).unwrap_or(0),
                        key.as_str()
                    ));
                }
                "tokenizer_source" => {
                    let v = scalar(value, "tokenizer_source")?;
                    if v.as_str() != "base" {
                        return error(
                            line_of(value),
                            "tokenizer_source other than 'base' is not supported: the base \
                             model's tokenizer files are copied",
                        );
                    }
                }
                "slices" => slices_node = Some(value),
                other => {
                    return error(
                        scalar_line(key),
                        format!(
                            "unknown key '{other}' (a merge config has merge_method, models, \
                             base_model, parameters, dtype, out_dtype)"
                        ),
                    );
                }
            }
        }
        let Some(method) = method else {
            return error(None, "the config has no merge_method");
        };
        let parameters = match parameters_node {
            Some(node) => parameter_map(
                node,
                method.global_parameters(),
                "parameters",
                &mut warnings,
            )?,
            None => BTreeMap::new(),
        };
        let allowed: Vec<&str> = method.model_parameters().iter().map(|(n, _)| *n).collect();
        let mut models = Vec::new();
        if let Some(node) = models_node {
            let Some(list) = node.as_sequence() else {
                return error(line_of(node), "'models' must be a list");
            };
            for entry in list.iter() {
                models.push(model_entry(entry, &allowed, false, &mut warnings)?);
            }
        }
        let mut slices = Vec::new();
        if let Some(node) = slices_node {
            if models_node.is_some() {
                return error(line_of(node), "a config has 'models' or 'slices', not both");
            }
            let Some(list) = node.as_sequence() else {
                return error(line_of(node), "'slices' must be a list");
            };
            for entry in list.iter() {
                slices.push(slice(entry, &allowed, &mut warnings)?);
            }
            if slices.is_empty() {
                return error(line_of(node), "'slices' is empty");
            }
        }
        // A base listed under models is the base, not a task vector.
        if let Some(base) = &base_model {
            models.retain(|m| &m.path != base || !method.needs_base());
        }
        let config = Self {
            method,
            models,
            base_model,
            parameters,
            dtype,
            out_dtype,
            warnings,
            slices,
        };
        if config.slices.is_empty() {
            config.check_required()?;
        } else {
            if matches!(method, Method::Compeft | Method::Fisher | Method::Opcm) {
                return error(
                    None,
                    format!(
                        "{} merges whole models: list them under 'models'",
                        method.name()
                    ),
                );
            }
            for k in 0..config.slices.len() {
                config
                    .for_slice(k)
                    .check_required()
                    .map_err(|e| ConfigError {
                        line: e.line.or(config.slices[k].line),
                        message: format!("slice {}: {}", k + 1, e.message),
                    })?;
                if let Some(base) = &config.base_model
                    && method.needs_base()
                    && !config.slices[k].sources.iter().any(|s| &s.path == base)
                {
                    return error(
                        config.slices[k].line,
                        format!(
                            "slice {}: the base model '{base}' is not among its sources",
                            k + 1
                        ),
                    );
                }
            }
        }
        Ok(config)
    }

    /// The config of slice `k` as a merge of whole models: its sources as the models (the base
    /// excluded), the top-level parameters and base as they are.
    #[must_use]
    pub fn for_slice(&self, k: usize) -> MergeConfig {
        let mut models = self.slices[k].sources.clone();
        if let Some(base) = &self.base_model {
            models.retain(|m| &m.path != base || !self.method.needs_base());
        }
        MergeConfig {
            models,
            slices: Vec::new(),
            warnings: Vec::new(),
            ..self.clone()
        }
    }

    fn check_required(&self) -> Result<()> {
        let method = self.method;
        if method.needs_base() && self.base_model.is_none() {
            return error(None, format!("{} needs a base_model", method.name()));
        }
        let count = self.models.len();
        let (needed, what) = match method {
            Method::Slerp => (1, "exactly one model besides the base"),
            Method::Passthrough => (1, "exactly one model"),
            Method::ModelStock => (2, "at least two models besides the base"),
            Method::Linear => (1, "at least one model"),
            _ => (1, "at least one model besides the base"),
        };
        let exact = matches!(method, Method::Slerp | Method::Passthrough);
        if count < needed || (exact && count != needed) {
            return error(
                None,
                format!("{} needs {what}; the config lists {count}", method.name()),
            );
        }
        if method == Method::Slerp && !self.parameters.contains_key("t") {
            return error(None, "slerp needs the parameter 't'");
        }
        for model in &self.models {
            for (name, required) in method.model_parameters() {
                let global = self.parameters.contains_key(*name);
                if *required && !global && !model.parameters.contains_key(*name) {
                    return error(
                        model.line,
                        format!(
                            "model '{}' has no '{name}' (required by {})",
                            model.path,
                            method.name()
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// A model's parameter for tensor `name` at layer position `t`: its own value, else the
    /// top-level one, else `default`.
    ///
    /// # Errors
    ///
    /// Where neither is set and there is no default, or no filter matches the tensor.
    pub fn model_parameter(
        &self,
        model: usize,
        parameter: &str,
        tensor: &str,
        t: f64,
        default: Option<f64>,
    ) -> std::result::Result<f64, String> {
        let entry = &self.models[model];
        let value = entry
            .parameters
            .get(parameter)
            .or_else(|| self.parameters.get(parameter));
        match value.and_then(|v| v.resolve(tensor, t)).or(default) {
            Some(v) => Ok(v),
            None => Err(format!(
                "no value of '{parameter}' for tensor '{tensor}' of model '{}'",
                entry.path
            )),
        }
    }

    /// A model's path parameter (`fisher`).
    ///
    /// # Errors
    ///
    /// Where the model has none.
    pub fn model_path(&self, model: usize, parameter: &str) -> std::result::Result<&str, String> {
        let entry = &self.models[model];
        match entry.parameters.get(parameter) {
            Some(ParamValue::Path(p)) => Ok(p),
            _ => Err(format!(
                "model '{}' has no '{parameter}' directory",
                entry.path
            )),
        }
    }

    /// A top-level parameter for tensor `name` at layer position `t`, else `default`.
    ///
    /// # Errors
    ///
    /// Where it is not set and there is no default, or no filter matches the tensor.
    pub fn global_parameter(
        &self,
        parameter: &str,
        tensor: &str,
        t: f64,
        default: Option<f64>,
    ) -> std::result::Result<f64, String> {
        match self
            .parameters
            .get(parameter)
            .and_then(|v| v.resolve(tensor, t))
            .or(default)
        {
            Some(v) => Ok(v),
            None => Err(format!("no value of '{parameter}' for tensor '{tensor}'")),
        }
    }
}

/// A `models:` entry, or a slice's source (`with_range`: `layer_range: [start, end]` required).
fn model_entry(
    entry: &Node,
    allowed: &[&str],
    with_range: bool,
    warnings: &mut Vec<String>,
) -> Result<ModelEntry> {
    let what = if with_range { "sources" } else { "models" };
    let Some(map) = entry.as_mapping() else {
        return error(
            line_of(entry),
            format!("each entry of '{what}' must be a mapping"),
        );
    };
    let (mut path, mut params, mut layer_range) = (None, BTreeMap::new(), None);
    for (key, value) in map.iter() {
        match key.as_str() {
            "model" => path = Some(model_reference(value, "model")?),
            "parameters" => params = parameter_map(value, allowed, "parameters", warnings)?,
            "layer_range" if with_range => layer_range = Some(range(value)?),
            other => {
                let keys = if with_range {
                    "model, layer_range, parameters"
                } else {
                    "model, parameters"
                };
                return error(
                    scalar_line(key),
                    format!("unknown key '{other}' in a {what} entry ({keys})"),
                );
            }
        }
    }
    let Some(path) = path else {
        return error(line_of(entry), format!("a {what} entry has no 'model'"));
    };
    if with_range && layer_range.is_none() {
        return error(line_of(entry), "a slice's source has no 'layer_range'");
    }
    Ok(ModelEntry {
        path,
        parameters: params,
        line: line_of(entry),
        layer_range,
    })
}

/// `layer_range: [start, end]`, `start < end`.
fn range(node: &Node) -> Result<(usize, usize)> {
    let bounds: Option<Vec<usize>> = node.as_sequence().map(|seq| {
        seq.iter()
            .filter_map(|e| e.as_scalar()?.as_str().trim().parse().ok())
            .collect()
    });
    match bounds.as_deref() {
        Some(&[start, end]) if start < end && node.as_sequence().is_some_and(|s| s.len() == 2) => {
            Ok((start, end))
        }
        _ => error(
            line_of(node),
            "'layer_range' is [start, end] with integers start < end",
        ),
    }
}

/// A `slices:` entry: `sources:` of equal layer counts.
fn slice(entry: &Node, allowed: &[&str], warnings: &mut Vec<String>) -> Result<Slice> {
    let Some(map) = entry.as_mapping() else {
        return error(line_of(entry), "each entry of 'slices' must be a mapping");
    };
    let mut sources = Vec::new();
    for (key, value) in map.iter() {
        match key.as_str() {
            "sources" => {
                let Some(list) = value.as_sequence() else {
                    return error(line_of(value), "'sources' must be a list");
                };
                for source in list.iter() {
                    sources.push(model_entry(source, allowed, true, warnings)?);
                }
            }
            other => {
                return error(
                    scalar_line(key),
                    format!("unknown key '{other}' in a slice (sources)"),
                );
            }
        }
    }
    let slice = Slice {
        sources,
        line: line_of(entry),
    };
    if slice.sources.is_empty() {
        return error(slice.line, "a slice has no sources");
    }
    let len = slice.len();
    if let Some(other) = slice
        .sources
        .iter()
        .find(|s| s.layer_range.map(|(a, b)| b - a) != Some(len))
    {
        return error(
            other.line,
            format!("every source of a slice takes the same number of layers ({len} here)"),
        );
    }
    Ok(slice)
}

fn scalar<'a>(node: &'a Node, what: &str) -> Result<&'a MarkedScalarNode> {
    node.as_scalar().map_or_else(
        || error(line_of(node), format!("'{what}' must be a single value")),
        Ok,
    )
}

/// A model reference: a local directory. mergekit also takes hub ids and `model+lora` paths;
/// this tool reads local directories only.
fn model_reference(node: &Node, what: &str) -> Result<String> {
    let value = if let Some(map) = node.as_mapping() {
        // mergekit's long form: {model: {path: ...}} or {path: ...}.
        let inner = map.get_node("path").or_else(|| map.get_node("model"));
        match inner {
            Some(inner) => return model_reference(inner, what),
            None => return error(line_of(node), format!("'{what}' has no path")),
        }
    } else {
        scalar(node, what)?.as_str().to_string()
    };
    if value.contains("://") || value.contains('+') {
        return error(
            line_of(node),
            format!("'{value}': local paths only (no URLs, hub downloads or model+lora paths)"),
        );
    }
    if value.is_empty() {
        return error(line_of(node), format!("'{what}' is empty"));
    }
    Ok(value)
}

fn parameter_map(
    node: &Node,
    allowed: &[&str],
    what: &str,
    warnings: &mut Vec<String>,
) -> Result<BTreeMap<String, ParamValue>> {
    let Some(map) = node.as_mapping() else {
        return error(line_of(node), format!("'{what}' must be a mapping"));
    };
    let mut out = BTreeMap::new();
    for (key, value) in map.iter() {
        let name = key.as_str();
        if let Some((_, why)) = IGNORED_OPTIONS.iter().find(|(n, _)| *n == name) {
            warnings.push(format!(
                "line {}: '{name}' is accepted and ignored: {why}",
                scalar_line(key).unwrap_or(0)
            ));
            continue;
        }
        if !allowed.contains(&name) {
            return error(
                scalar_line(key),
                format!(
                    "unknown parameter '{name}' here (allowed: {})",
                    allowed.join(", ")
                ),
            );
        }
        let value = if PATH_PARAMETERS.contains(&name) {
            ParamValue::Path(model_reference(value, name)?)
        } else {
            param_value(value)?
        };
        out.insert(name.to_string(), value);
    }
    Ok(out)
}

fn param_value(node: &Node) -> Result<ParamValue> {
    if let Some(s) = node.as_scalar() {
        return number(s).map(ParamValue::Number);
    }
    if let Some(seq) = node.as_sequence() {
        if seq.is_empty() {
            return error(line_of(node), "an empty list is not a parameter value");
        }
        if seq.iter().all(|e| e.as_scalar().is_some()) {
            let values = seq
                .iter()
                .map(|e| number(e.as_scalar().expect("checked")))
                .collect::<Result<Vec<f64>>>()?;
            return Ok(ParamValue::Gradient(values));
        }
        let mut conditions = Vec::new();
        for entry in seq.iter() {
            let Some(map) = entry.as_mapping() else {
                return error(
                    line_of(entry),
                    "a parameter list is either all numbers or all {filter, value} mappings",
                );
            };
            conditions.push(condition(map)?);
        }
        return Ok(ParamValue::Filtered(conditions));
    }
    error(
        line_of(node),
        "a parameter value is a number, a list of numbers or a list of {filter, value}",
    )
}

fn condition(map: &MarkedMappingNode) -> Result<(Option<String>, ParamValue)> {
    let (mut filter, mut value) = (None, None);
    for (key, v) in map.iter() {
        match key.as_str() {
            "filter" => filter = Some(scalar(v, "filter")?.as_str().to_string()),
            "value" => value = Some(param_value(v)?),
            other => {
                return error(
                    scalar_line(key),
                    format!("unknown key '{other}' in a condition (filter, value)"),
                );
            }
        }
    }
    match value {
        Some(value) => Ok((filter, value)),
        None => error(
            map.span().start().map(marked_yaml::Marker::line),
            "a condition has no 'value'",
        ),
    }
}

fn number(s: &MarkedScalarNode) -> Result<f64> {
    if let Some(b) = s.as_bool() {
        return Ok(if b { 1.0 } else { 0.0 });
    }
    match s.as_str().trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => error(
            scalar_line(s),
            format!("'{}' is not a finite number", s.as_str()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIES: &str = "\
models:
  - model: ./base
  - model: ./math
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: ./code
    parameters:
      density: 0.5
      weight:
        - filter: mlp
          value: 0.5
        - value: 0.25
merge_method: ties
base_model: ./base
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
";

    #[test]
    fn reads_a_ties_config_as_mergekit_writes_it() {
        let c = MergeConfig::parse(TIES).unwrap();
        assert_eq!(c.method, Method::Ties);
        assert_eq!(c.base_model.as_deref(), Some("./base"));
        // The base listed under models is not a task vector.
        assert_eq!(c.models.len(), 2);
        assert_eq!(c.models[0].path, "./math");
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings); // int8_mask
        // A gradient at the middle layer and between points.
        assert_eq!(c.model_parameter(0, "density", "x", 0.5, None), Ok(0.7));
        assert!((c.model_parameter(0, "density", "x", 0.25, None).unwrap() - 0.85).abs() < 1e-12);
        // Filters by substring; the first match wins.
        assert_eq!(
            c.model_parameter(1, "weight", "layers.0.mlp.up_proj", 0.0, None),
            Ok(0.5)
        );
        assert_eq!(
            c.model_parameter(1, "weight", "layers.0.self_attn.q", 0.0, None),
            Ok(0.25)
        );
        assert_eq!(c.global_parameter("normalize", "x", 0.0, None), Ok(1.0));
        assert_eq!(c.global_parameter("lambda", "x", 0.0, Some(1.0)), Ok(1.0));
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (
                "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n      densty: 0.5\n",
                7,
                "densty",
            ),
            ("merge_method: frankenmerge\n", 1, "frankenmerge"),
            ("merge_method: linear\nmodel: x\n", 2, "unknown key 'model'"),
            (
                "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: abc\n",
                5,
                "not a finite number",
            ),
            (
                "merge_method: linear\nmodels:\n  - model: hf://org/model\n    parameters: {weight: 1}\n",
                3,
                "local paths only",
            ),
            (
                "merge_method: slerp\nslices:\n  - sources: []\n",
                3,
                "no sources",
            ),
            (
                "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 4]\n      - model: b\n        layer_range: [2, 4]\n",
                6,
                "same number of layers",
            ),
            (
                "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [4, 2]\n",
                5,
                "start < end",
            ),
            (
                "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layers: [0, 2]\n",
                5,
                "unknown key 'layers'",
            ),
            (
                "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n",
                6,
                "not both",
            ),
        ];
        for (text, line, needle) in cases {
            let e = MergeConfig::parse(text).unwrap_err();
            assert_eq!(e.line, Some(line), "{text}: {e}");
            assert!(e.to_string().contains(needle), "{e}");
        }
    }

    #[test]
    fn missing_requirements_are_errors() {
        for (text, needle) in [
            (
                "merge_method: ties\nmodels:\n  - model: a\n    parameters: {weight: 1}\n",
                "base_model",
            ),
            ("merge_method: linear\nmodels:\n  - model: a\n", "'weight'"),
            (
                "merge_method: slerp\nbase_model: a\nmodels:\n  - model: b\n",
                "'t'",
            ),
            (
                "merge_method: model_stock\nbase_model: a\nmodels:\n  - model: b\n",
                "at least two",
            ),
            ("models: []\n", "no merge_method"),
            ("[1, 2]\n", "YAML"),
            ("merge_method: linear\nmerge_method: ties\n", "Duplicate"),
        ] {
            let e = MergeConfig::parse(text).unwrap_err();
            assert!(e.to_string().contains(needle), "{text}: {e}");
        }
    }
}
