//! Activation-sparse decoding on the CPU: what a user learns here is the whole CATS workflow on
//! one MLP layer of SmolLM2-135M's shape (synthetic weights):
//!
//! 1. calibrate the threshold that skips half the gate activations, streamed over calibration
//!    tokens with [`Calibration`] (two passes, exact);
//! 2. run a decode loop with one [`MlpScratch`] reused for every token (no allocation per token)
//!    and read which rows each token touched;
//! 3. compare against the dense MLP, and run the TEAL policy and a sparse-input GEMV on the same
//!    layer;
//! 4. attend over a KV cache of SmolLM2's heads (9 query heads sharing 3 key/value heads), as a
//!    decoder does between its projections.
//!
//! Run: `cargo run --release -p kernels-cpu --example sparse_inference`

use std::time::Instant;

use kernels_cpu::prelude::*;

/// Normal draws scaled by `scale`, from the family's counter-based generator.
fn normal(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let rng = kernels_cpu::CounterRng::new(seed);
    (0..n as u64)
        .map(|i| rng.normal_at(i) as f32 * scale)
        .collect()
}

fn main() -> Result<()> {
    let (hidden, inter) = (576, 1536);
    let cpu = Cpu::detect();
    println!("CPU backend: {} on {} threads", cpu.isa(), cpu.threads());
    let scale = 1.0 / (hidden as f32).sqrt();
    let to_bf16 = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
    let gate = to_bf16(normal(inter * hidden, scale, 1));
    let up = to_bf16(normal(inter * hidden, scale, 2));
    let down_t = to_bf16(normal(inter * hidden, scale, 3));
    let weights = CatsMlpWeights {
        gate: MatRef::from_slice(&gate, inter, hidden)?,
        up: MatRef::from_slice(&up, inter, hidden)?,
        down_t: MatRef::from_slice(&down_t, inter, hidden)?,
    };

    // 1. Calibration: gate activations of 32 calibration tokens, streamed twice.
    let tokens: Vec<Vec<f32>> = (0..32).map(|t| normal(hidden, 1.0, 100 + t)).collect();
    let activations = |x: &[f32]| -> Result<Vec<f32>> {
        let mut g = vec![0.0; inter];
        gemv(&cpu, weights.gate, x, &mut g)?;
        Ok(g.iter().map(|&g| g / (1.0 + (-g).exp())).collect())
    };
    let gates: Vec<Vec<f32>> = tokens
        .iter()
        .map(|x| activations(x))
        .collect::<Result<_>>()?;
    let thresholds = Calibration::new(0.5)?.run(
        || gates.iter(),
        |calibration, a| calibration.feed(&cpu, 0, Site::GateActivation, a),
    )?;
    let threshold = thresholds[0].2;
    println!("CATS threshold for 50% sparsity: t = {threshold:.5}");

    // 2. A decode loop: one scratch for every token.
    let mut scratch = MlpScratch::new();
    let mut y = vec![0.0f32; hidden];
    let started = Instant::now();
    let mut sparsity = 0.0;
    for x in &tokens {
        let x = MatRef::from_slice(x, 1, hidden)?;
        cats_mlp(
            &cpu,
            x,
            weights,
            threshold,
            MatMut::from_slice(&mut y, 1, hidden)?,
            &mut scratch,
        )?;
        sparsity += scratch.report().sparsity() / tokens.len() as f64;
    }
    let sparse_time = started.elapsed() / tokens.len() as u32;
    println!(
        "CATS MLP: {sparse_time:?} per token, {:.1}% of up/down rows skipped",
        100.0 * sparsity
    );

    // 3. Against the dense MLP (threshold < 0 keeps every row) and the f64 reference.
    let x = MatRef::from_slice(&tokens[0], 1, hidden)?;
    let started = Instant::now();
    let mut dense = vec![0.0f32; hidden];
    for _ in 0..tokens.len() {
        cats_mlp(
            &cpu,
            x,
            weights,
            -1.0,
            MatMut::from_slice(&mut dense, 1, hidden)?,
            &mut scratch,
        )?;
    }
    let dense_time = started.elapsed() / tokens.len() as u32;
    let mut reference = vec![0.0f32; hidden];
    kernels_cpu::kernels_core::ops::sparse::cats_mlp_ref(
        x,
        weights,
        -1.0,
        MatMut::from_slice(&mut reference, 1, hidden)?,
    )?;
    let worst = dense
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!(
        "dense MLP: {dense_time:?} per token; worst difference from the f64 reference {worst:.2e}"
    );
    assert!(worst < 1e-4, "the dense MLP agrees with the reference");

    // TEAL on the same layer: every projection's input thresholded, gate and up read transposed.
    let transpose = |m: &[bf16]| -> Vec<bf16> {
        (0..m.len())
            .map(|k| m[(k % inter) * hidden + k / inter])
            .collect()
    };
    let (gate_t, up_t) = (transpose(&gate), transpose(&up));
    let teal = TealMlpWeights {
        gate_t: MatRef::from_slice(&gate_t, hidden, inter)?,
        up_t: MatRef::from_slice(&up_t, hidden, inter)?,
        down_t: weights.down_t,
    };
    let t_x = calibrate_threshold(&cpu, &[&tokens[1]], 0.4)?;
    teal_mlp(
        &cpu,
        x,
        teal,
        TealThresholds::new(t_x, 0.01),
        MatMut::from_slice(&mut y, 1, hidden)?,
        &mut scratch,
    )?;
    println!(
        "TEAL MLP: {} of {inter} down rows read",
        scratch.report().active.len()
    );

    // The sparse-input GEMV on its own: y = sum over |h_i| > t of h_i W_down_t[i, :].
    let h = normal(inter, 1.0, 7);
    let t_h = calibrate_threshold(&cpu, &[&h], 0.7)?;
    sparse_input_gemv(&cpu, weights.down_t, &h, t_h, &mut y)?;
    println!(
        "sparse-input GEMV: {} of {inter} rows of W_down_t read",
        kernels_cpu::kernels_core::ops::sparse::count_active(&h, t_h)
    );

    // Decode attention: one query over 165 cached positions, `[positions, kv_heads * head_dim]`.
    let heads = AttentionHeads {
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
    };
    let positions = 165;
    let keys = normal(positions * heads.kv_width(), 1.0, 8);
    let values = normal(positions * heads.kv_width(), 1.0, 9);
    let q = normal(heads.query_width(), 1.0, 10);
    let mut attended = vec![0.0f32; heads.query_width()];
    let start = Instant::now();
    attention(
        &cpu,
        heads,
        &q,
        MatRef::from_slice(&keys, positions, heads.kv_width())?,
        MatRef::from_slice(&values, positions, heads.kv_width())?,
        1.0 / (heads.head_dim as f32).sqrt(),
        &mut attended,
    )?;
    println!(
        "attention: 9 heads over {positions} positions in {:.1} us",
        start.elapsed().as_secs_f64() * 1e6
    );
    Ok(())
}
