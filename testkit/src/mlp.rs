//! The MLP test bodies every backend runs: CATS and TEAL over shapes, batches and thresholds
//! placed away from every activation, against the reference, within the backend's tolerance.

use half::{bf16, f16};
use kernels_core::ops::sparse::{
    CatsMlpWeights, MlpReport, TealMlpWeights, TealThresholds, cats_mlp_ref, silu_f64, teal_mlp_ref,
};
use kernels_core::{Element, MatMut, MatRef, Result};

use crate::{assert_close, normal};

/// A backend's MLPs on host slices, and its tolerance.
pub trait MlpBackend<T> {
    /// For failure messages.
    fn name(&self) -> String;
    /// The CATS MLP.
    fn cats(
        &self,
        x: MatRef<'_, f32>,
        weights: CatsMlpWeights<MatRef<'_, T>>,
        threshold: f32,
        y: MatMut<'_, f32>,
    ) -> Result<MlpReport>;
    /// The TEAL MLP.
    fn teal(
        &self,
        x: MatRef<'_, f32>,
        weights: TealMlpWeights<MatRef<'_, T>>,
        thresholds: TealThresholds,
        y: MatMut<'_, f32>,
    ) -> Result<MlpReport>;
    /// The bound on an output (see each backend's `mlp_tolerance`).
    fn tolerance(
        &self,
        hidden: usize,
        active: usize,
        propagated: f64,
        direct: f64,
        max_gate: f64,
    ) -> f64;
}

/// A threshold near the `q`-quantile of `|values|` that sits in a gap between neighbouring values
/// much wider than `f32` rounding, so the kernel and the `f64` reference agree on every row.
fn safe_threshold(values: &[f64], q: f64) -> f32 {
    let mut mags: Vec<f64> = values.iter().map(|v| v.abs()).collect();
    mags.sort_by(f64::total_cmp);
    let start = ((q * mags.len() as f64) as usize).min(mags.len().saturating_sub(2));
    for offset in 0..mags.len() {
        for j in [start + offset, start.saturating_sub(offset)] {
            if j + 1 < mags.len() && mags[j + 1] - mags[j] > 1e-3 * (1.0 + mags[j + 1]) {
                return f64::midpoint(mags[j], mags[j + 1]) as f32;
            }
        }
    }
    -1.0
}

pub struct Layer<T> {
    pub inter: usize,
    pub hidden: usize,
    pub gate: Vec<T>,
    pub up: Vec<T>,
    pub down_t: Vec<T>,
}

impl<T: Element> Layer<T> {
    pub fn new(inter: usize, hidden: usize, seed: u64) -> Self {
        let scale = |v: Vec<T>| {
            v.into_iter()
                .map(|w| T::from_f32(w.to_f32() / (hidden as f32).sqrt()))
                .collect()
        };
        Self {
            inter,
            hidden,
            gate: scale(normal(inter * hidden, seed)),
            up: scale(normal(inter * hidden, seed + 1)),
            down_t: scale(normal(inter * hidden, seed + 2)),
        }
    }

    pub fn cats(&self) -> CatsMlpWeights<MatRef<'_, T>> {
        CatsMlpWeights {
            gate: MatRef::from_slice(&self.gate, self.inter, self.hidden).unwrap(),
            up: MatRef::from_slice(&self.up, self.inter, self.hidden).unwrap(),
            down_t: MatRef::from_slice(&self.down_t, self.inter, self.hidden).unwrap(),
        }
    }

    pub fn transposed(&self, m: &[T]) -> Vec<T> {
        (0..m.len())
            .map(|k| m[(k % self.inter) * self.hidden + k / self.inter])
            .collect()
    }
}

/// Per intermediate row of one sample: `a = silu(g)`, `u`, and the absolute sums of the gate and up
/// dots, all in `f64` from the `f32` inputs.
struct Row {
    g: f64,
    a: f64,
    u: f64,
    gate_scale: f64,
    up_scale: f64,
}

impl Row {
    fn h(&self) -> f64 {
        self.a * self.u
    }
}

/// Checks each output column within the backend's MLP tolerance, from its `propagated` and
/// `direct` scales and the largest gate magnitude among the active rows.
fn check_outputs<T: Element, B: MlpBackend<T>>(
    backend: &B,
    what: &str,
    down_t: MatRef<'_, T>,
    hidden: usize,
    rows: &[(usize, Row)],
    got: &[f32],
    expect: &[f32],
) {
    let (propagated, direct): (Vec<f64>, Vec<f64>) = (0..down_t.cols())
        .map(|j| {
            rows.iter().fold((0.0, 0.0), |(p, d), (i, r)| {
                let w = f64::from(down_t.at(*i, j).to_f32()).abs();
                (
                    p + (r.a.abs() * r.up_scale + 1.1 * r.u.abs() * r.gate_scale) * w,
                    d + (r.h() * w).abs(),
                )
            })
        })
        .unzip();
    let max_gate = rows.iter().map(|(_, r)| r.g.abs()).fold(0.0, f64::max);
    assert_close(what, got, expect, |j| {
        backend.tolerance(hidden, rows.len(), propagated[j], direct[j], max_gate)
    });
}

/// `(value, sum |w_k x_k|)` of a dot in `f64`.
fn dot_with_scale<T: Element>(
    w: impl Iterator<Item = T>,
    x: impl Iterator<Item = f32>,
) -> (f64, f64) {
    w.zip(x).fold((0.0, 0.0), |(v, s), (w, x)| {
        let p = f64::from(w.to_f32()) * f64::from(x);
        (v + p, s + p.abs())
    })
}

fn check_cats<T: Element, B: MlpBackend<T>>(
    backend: &B,
    inter: usize,
    hidden: usize,
    batch: usize,
    q: f64,
    seed: u64,
) {
    let layer = Layer::<T>::new(inter, hidden, seed);
    let weights = layer.cats();
    let x = normal::<f32>(batch * hidden, seed + 3);
    let xm = MatRef::from_slice(&x, batch, hidden).unwrap();
    // Reference activations, to place the threshold away from every one of them.
    let samples: Vec<Vec<Row>> = (0..batch)
        .map(|b| {
            (0..inter)
                .map(|i| {
                    let xb = xm.row(b).iter().copied();
                    let (g, gate_scale) =
                        dot_with_scale(weights.gate.row(i).iter().copied(), xb.clone());
                    let (u, up_scale) = dot_with_scale(weights.up.row(i).iter().copied(), xb);
                    Row {
                        g,
                        a: silu_f64(g),
                        u,
                        gate_scale,
                        up_scale,
                    }
                })
                .collect()
        })
        .collect();
    let all_a: Vec<f64> = samples.iter().flatten().map(|r| r.a).collect();
    let t = if q.is_infinite() {
        f32::INFINITY
    } else if q <= 0.0 {
        -1.0
    } else {
        safe_threshold(&all_a, q)
    };
    let mut expect = vec![0.0; batch * hidden];
    let report_ref = cats_mlp_ref(
        xm,
        weights,
        t,
        MatMut::from_slice(&mut expect, batch, hidden).unwrap(),
    )
    .unwrap();
    let mut got = vec![f32::NAN; batch * hidden];
    let report = backend
        .cats(
            xm,
            weights,
            t,
            MatMut::from_slice(&mut got, batch, hidden).unwrap(),
        )
        .unwrap();
    assert_eq!(
        report, report_ref,
        "rows read {inter}x{hidden} batch {batch} t {t}"
    );
    for (b, rows) in samples.into_iter().enumerate() {
        let active: Vec<(usize, Row)> = rows
            .into_iter()
            .enumerate()
            .filter(|(_, r)| (r.a as f32).abs() > t)
            .collect();
        check_outputs(
            backend,
            &format!(
                "cats {:?} {inter}x{hidden} batch {batch} sample {b} t {t} {}",
                T::DTYPE,
                backend.name()
            ),
            weights.down_t,
            hidden,
            &active,
            &got[b * hidden..][..hidden],
            &expect[b * hidden..][..hidden],
        );
    }
    if t == f32::INFINITY {
        assert!(got.iter().all(|&v| v == 0.0) && report.active.is_empty());
    }
}

fn check_teal<T: Element, B: MlpBackend<T>>(
    backend: &B,
    inter: usize,
    hidden: usize,
    batch: usize,
    q: f64,
    seed: u64,
) {
    let layer = Layer::<T>::new(inter, hidden, seed);
    let (gate_t, up_t) = (layer.transposed(&layer.gate), layer.transposed(&layer.up));
    let weights = TealMlpWeights {
        gate_t: MatRef::from_slice(&gate_t, hidden, inter).unwrap(),
        up_t: MatRef::from_slice(&up_t, hidden, inter).unwrap(),
        down_t: MatRef::from_slice(&layer.down_t, inter, hidden).unwrap(),
    };
    let x = normal::<f32>(batch * hidden, seed + 3);
    let xm = MatRef::from_slice(&x, batch, hidden).unwrap();
    let x_f64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let t_x = if q <= 0.0 {
        -1.0
    } else {
        safe_threshold(&x_f64, q)
    };
    let samples: Vec<Vec<Row>> = (0..batch)
        .map(|b| {
            let active_x: Vec<usize> = (0..hidden).filter(|&k| xm.at(b, k).abs() > t_x).collect();
            (0..inter)
                .map(|i| {
                    let xs = active_x.iter().map(|&k| xm.at(b, k));
                    let (g, gate_scale) = dot_with_scale(
                        active_x.iter().map(|&k| weights.gate_t.at(k, i)),
                        xs.clone(),
                    );
                    let (u, up_scale) =
                        dot_with_scale(active_x.iter().map(|&k| weights.up_t.at(k, i)), xs);
                    // The reference rounds g and u to f32 before SiLU.
                    Row {
                        g,
                        a: silu_f64(f64::from(g as f32)),
                        u: f64::from(u as f32),
                        gate_scale,
                        up_scale,
                    }
                })
                .collect()
        })
        .collect();
    let all_h: Vec<f64> = samples.iter().flatten().map(Row::h).collect();
    let t_h = if q <= 0.0 {
        -1.0
    } else {
        safe_threshold(&all_h, q)
    };
    let thresholds = TealThresholds::new(t_x, t_h);
    let mut expect = vec![0.0; batch * hidden];
    let report_ref = teal_mlp_ref(
        xm,
        weights,
        thresholds,
        MatMut::from_slice(&mut expect, batch, hidden).unwrap(),
    )
    .unwrap();
    let mut got = vec![f32::NAN; batch * hidden];
    let report = backend
        .teal(
            xm,
            weights,
            thresholds,
            MatMut::from_slice(&mut got, batch, hidden).unwrap(),
        )
        .unwrap();
    assert_eq!(report, report_ref, "rows read");
    for (b, rows) in samples.into_iter().enumerate() {
        let active: Vec<(usize, Row)> = rows
            .into_iter()
            .enumerate()
            .filter(|(_, r)| (r.h() as f32).abs() > t_h)
            .collect();
        check_outputs(
            backend,
            &format!(
                "teal {:?} {inter}x{hidden} batch {batch} sample {b} {}",
                T::DTYPE,
                backend.name()
            ),
            weights.down_t,
            hidden,
            &active,
            &got[b * hidden..][..hidden],
            &expect[b * hidden..][..hidden],
        );
    }
}

pub fn cats_shapes_batches_and_thresholds<
    B: MlpBackend<f32> + MlpBackend<bf16> + MlpBackend<f16>,
>(
    backend: &B,
) {
    let mut seed = 0;
    for (inter, hidden) in [(1, 1), (5, 3), (17, 16), (64, 33), (131, 97)] {
        for batch in 1..=4 {
            for q in [0.0, 0.5, 0.9, f64::INFINITY] {
                seed += 10;
                check_cats::<f32, B>(backend, inter, hidden, batch, q, seed);
                check_cats::<bf16, B>(backend, inter, hidden, batch, q, seed);
                check_cats::<f16, B>(backend, inter, hidden, batch, q, seed);
            }
        }
    }
}

pub fn teal_shapes_batches_and_thresholds<
    B: MlpBackend<f32> + MlpBackend<bf16> + MlpBackend<f16>,
>(
    backend: &B,
) {
    let mut seed = 0;
    for (inter, hidden) in [(1, 1), (5, 3), (17, 16), (64, 33), (131, 97)] {
        for batch in 1..=4 {
            for q in [0.0, 0.5, 0.8] {
                seed += 10;
                check_teal::<f32, B>(backend, inter, hidden, batch, q, seed);
                check_teal::<bf16, B>(backend, inter, hidden, batch, q, seed);
                check_teal::<f16, B>(backend, inter, hidden, batch, q, seed);
            }
        }
    }
}

pub fn real_model_sizes<B: MlpBackend<f32> + MlpBackend<bf16> + MlpBackend<f16>>(backend: &B) {
    // One SmolLM2-135M MLP layer.
    check_cats::<bf16, B>(backend, 1536, 576, 1, 0.5, 1);
    check_cats::<bf16, B>(backend, 1536, 576, 3, 0.7, 2);
    check_teal::<bf16, B>(backend, 1536, 576, 2, 0.5, 3);
}
