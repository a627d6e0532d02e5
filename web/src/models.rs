//! Models as the page holds them: safetensors files read from memory (the user's files never leave
//! the page), every tensor widened to `f32` with its shape and stored type, and written back.

use half::{bf16, f16};
use kernels_core::CounterRng;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// The element types the page reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// `F32`.
    F32,
    /// `F16`.
    F16,
    /// `BF16`.
    BF16,
}

impl Stored {
    fn of(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(Self::F32),
            Dtype::F16 => Some(Self::F16),
            Dtype::BF16 => Some(Self::BF16),
            _ => None,
        }
    }

    /// Bytes per element.
    #[must_use]
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    fn dtype(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
        }
    }
}

/// One tensor, widened to `f32` (exactly: every stored type is a subset of `f32`).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Its name in the file.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// The type it was stored as.
    pub stored: Stored,
    /// Its values, row-major.
    pub values: Vec<f32>,
}

impl Tensor {
    /// `[rows, cols]` as the kernels see it: the last dimension is the row (a scalar or a vector
    /// is one row).
    #[must_use]
    pub fn matrix_shape(&self) -> [usize; 2] {
        let cols = self.shape.last().copied().unwrap_or(1);
        [self.values.len() / cols.max(1), cols]
    }
}

/// A model: its tensors, sorted by name.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    /// The tensors.
    pub tensors: Vec<Tensor>,
}

impl Model {
    /// Reads a safetensors file from memory; `which` names it in errors ("model 2"). The header is
    /// checked by the `safetensors` crate (offsets inside the file, each tensor's bytes matching
    /// its shape), so what is allocated here is bounded by the file's own length.
    ///
    /// # Errors
    ///
    /// A message for the page: not a safetensors file, a tensor type other than F32, F16 or BF16.
    pub fn parse(bytes: &[u8], which: &str) -> Result<Self, String> {
        let file = SafeTensors::deserialize(bytes)
            .map_err(|e| format!("{which} is not a safetensors file: {e}"))?;
        let mut tensors = Vec::new();
        for (name, view) in file.tensors() {
            let stored = Stored::of(view.dtype()).ok_or_else(|| {
                format!(
                    "{which}: tensor '{name}' holds {:?}; the page reads F32, F16 and BF16 tensors",
                    view.dtype()
                )
            })?;
            let data = view.data();
            let values: Vec<f32> = match stored {
                Stored::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                Stored::F16 => data
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Stored::BF16 => data
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
            };
            tensors.push(Tensor {
                name,
                shape: view.shape().to_vec(),
                stored,
                values,
            });
        }
        if tensors.is_empty() {
            return Err(format!("{which} holds no tensor"));
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self { tensors })
    }

    /// Checks that `other` has this model's tensors with the same shapes.
    ///
    /// # Errors
    ///
    /// A message naming the first tensor that is missing, extra or shaped differently.
    pub fn check_same_layout(&self, other: &Self, which: &str) -> Result<(), String> {
        for t in &self.tensors {
            match other.tensors.iter().find(|o| o.name == t.name) {
                None => return Err(format!("{which} has no tensor '{}' (the base has)", t.name)),
                Some(o) if o.shape != t.shape => {
                    return Err(format!(
                        "{which}'s tensor '{}' has shape {:?} where the base's has {:?}",
                        t.name, o.shape, t.shape
                    ));
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = other
            .tensors
            .iter()
            .find(|o| !self.tensors.iter().any(|t| t.name == o.name))
        {
            return Err(format!(
                "{which} has a tensor '{}' the base lacks",
                extra.name
            ));
        }
        Ok(())
    }

    /// Number of parameters.
    #[must_use]
    pub fn parameters(&self) -> usize {
        self.tensors.iter().map(|t| t.values.len()).sum()
    }

    /// Bytes the tensors take as stored.
    #[must_use]
    pub fn stored_bytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|t| t.values.len() * t.stored.size())
            .sum()
    }
}

/// A safetensors file of `tensors` (name, shape, type to store, values), each value rounded to
/// its type.
///
/// # Errors
///
/// A message if the values do not fill the shape.
pub fn write(tensors: &[(&str, &[usize], Stored, &[f32])]) -> Result<Vec<u8>, String> {
    let encoded: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, stored, values)| match stored {
            Stored::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Stored::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            Stored::BF16 => values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        })
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, stored, _), bytes) in tensors.iter().zip(&encoded) {
        let view = TensorView::new(stored.dtype(), shape.to_vec(), bytes)
            .map_err(|e| format!("tensor '{name}': {e}"))?;
        views.push((name.to_string(), view));
    }
    safetensors::serialize(views, None).map_err(|e| format!("writing the merged model: {e}"))
}

/// The tensors of the synthetic set: a small transformer block's names and shapes.
const SYNTHETIC: [(&str, [usize; 2]); 4] = [
    ("model.layers.0.mlp.down_proj.weight", [128, 384]),
    ("model.layers.0.mlp.up_proj.weight", [384, 128]),
    ("model.layers.0.self_attn.q_proj.weight", [128, 128]),
    ("model.norm.weight", [1, 128]),
];

/// A synthetic set of `count` models (`count >= 2`): a base and fine-tunes of it, each a base
/// plus a sparse, heavy-tailed task vector, stored as bf16, as safetensors files.
///
/// # Errors
///
/// A message if `count` is below 2.
pub fn synthetic(count: usize, seed: u64) -> Result<Vec<Vec<u8>>, String> {
    if count < 2 {
        return Err("a synthetic set needs a base and at least one fine-tune".into());
    }
    let rng = CounterRng::new(seed);
    let mut files = Vec::with_capacity(count);
    for model in 0..count as u64 {
        let mut tensors = Vec::with_capacity(SYNTHETIC.len());
        for (t, (_, [rows, cols])) in SYNTHETIC.iter().enumerate() {
            let stream = (t as u64) << 32;
            let values: Vec<f32> = (0..(rows * cols) as u64)
                .map(|i| {
                    let base = 0.05 * rng.normal_at(stream | i) as f32;
                    if model == 0 {
                        return base;
                    }
                    // A task vector: a normal times a normal (a few large entries, many small).
                    let k = (model << 40) | stream | i;
                    base + 0.01 * (rng.normal_at(k) * rng.normal_at(k ^ (1 << 62))) as f32
                })
                .collect();
            tensors.push(values);
        }
        let entries: Vec<(&str, &[usize], Stored, &[f32])> = SYNTHETIC
            .iter()
            .zip(&tensors)
            .map(|((name, shape), v)| (*name, &shape[..], Stored::BF16, &v[..]))
            .collect();
        files.push(write(&entries)?);
    }
    Ok(files)
}

/// Diagonal Fisher information for the synthetic set's fine-tunes: one file per fine-tune, the
/// same tensors, positive values (squared normal draws, as squared gradients are), stored as f32.
///
/// # Errors
///
/// As [`write()`].
pub fn synthetic_fishers(count: usize, seed: u64) -> Result<Vec<Vec<u8>>, String> {
    let rng = CounterRng::new(seed ^ 0xf15e);
    (0..count as u64)
        .map(|model| {
            let tensors: Vec<Vec<f32>> = SYNTHETIC
                .iter()
                .enumerate()
                .map(|(t, (_, [rows, cols]))| {
                    (0..(rows * cols) as u64)
                        .map(|i| {
                            (rng.normal_at((model << 40) | ((t as u64) << 32) | i) as f32).powi(2)
                        })
                        .collect()
                })
                .collect();
            let entries: Vec<(&str, &[usize], Stored, &[f32])> = SYNTHETIC
                .iter()
                .zip(&tensors)
                .map(|((name, shape), v)| (*name, &shape[..], Stored::F32, &v[..]))
                .collect();
            write(&entries)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_type_and_rejects_what_it_cannot_read() {
        let values = [1.0f32, -2.5, 0.125, 3.0];
        let file = write(&[
            ("a", &[2, 2], Stored::F32, &values),
            ("b", &[4], Stored::BF16, &values),
            ("c", &[1, 4], Stored::F16, &values),
        ])
        .unwrap();
        let model = Model::parse(&file, "model 1").unwrap();
        assert_eq!(model.tensors.len(), 3);
        for t in &model.tensors {
            assert_eq!(t.values, values, "{}", t.name);
        }
        assert_eq!(model.tensors[0].matrix_shape(), [2, 2]);
        assert_eq!(model.tensors[1].matrix_shape(), [1, 4]);
        assert_eq!(model.stored_bytes(), 16 + 8 + 8);
        assert!(
            Model::parse(b"not a model", "model 2")
                .unwrap_err()
                .starts_with("model 2 is not")
        );
        assert!(Model::parse(&file[..file.len() - 1], "model 3").is_err());
        let ints = safetensors::serialize(
            [(
                "i",
                TensorView::new(Dtype::I32, vec![1], &[0u8; 4]).unwrap(),
            )],
            None,
        )
        .unwrap();
        assert!(
            Model::parse(&ints, "model 4")
                .unwrap_err()
                .contains("F32, F16 and BF16")
        );
    }

    #[test]
    fn layouts_must_match_the_base() {
        let files = synthetic(3, 1).unwrap();
        let models: Vec<Model> = files
            .iter()
            .map(|f| Model::parse(f, "m").unwrap())
            .collect();
        models[0].check_same_layout(&models[1], "model 2").unwrap();
        assert_ne!(models[0], models[1]);
        let mut other = models[1].clone();
        other.tensors[0].shape = vec![384, 128];
        assert!(
            models[0]
                .check_same_layout(&other, "model 2")
                .unwrap_err()
                .contains("shape")
        );
        other.tensors[0].shape = models[1].tensors[0].shape.clone();
        other.tensors.pop();
        assert!(
            models[0]
                .check_same_layout(&other, "model 2")
                .unwrap_err()
                .contains("no tensor")
        );
        assert!(synthetic(1, 0).is_err());
    }
}
