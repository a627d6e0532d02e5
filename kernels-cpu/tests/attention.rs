//! Decode attention on every ISA, element type and thread count, against the `f64` reference.

use half::bf16;
use kernels_core::ops::attention::attention_ref;
use kernels_cpu::attention::{AttentionHeads, POSITION_BLOCK, attention, attention_tolerance};
use kernels_cpu::prelude::*;
use kernels_testkit::{isa_tests, normal};
use proptest::prelude::*;

/// Head layouts: one head, grouped (SmolLM2's 9 over 3, Llama-2-7B's 32 over 32 at a smaller
/// width), and head widths around the vector lanes.
const HEADS: [(usize, usize, usize); 8] = [
    (1, 1, 1),
    (2, 1, 3),
    (9, 3, 64),
    (4, 2, 17),
    (3, 3, 15),
    (2, 2, 16),
    (4, 1, 33),
    (32, 32, 8),
];

/// Cached lengths: one, around a dot block (4), around a position block, and past two blocks.
const POSITIONS: [usize; 9] = [
    1,
    3,
    4,
    5,
    POSITION_BLOCK - 1,
    POSITION_BLOCK,
    POSITION_BLOCK + 1,
    2 * POSITION_BLOCK + 3,
    211,
];

/// Checks `attention` on `cpu` against the reference for random data whose query is scaled by
/// `sharpness` (large: a peaked softmax) and whose keys grow along the positions by `drift`
/// (so later blocks raise the running maximum and the output is rescaled), and against one
/// thread bit for bit.
fn check<T: Element>(
    cpu: &Cpu,
    (heads, kv_heads, head_dim): (usize, usize, usize),
    positions: usize,
    sharpness: f32,
    drift: f32,
    seed: u64,
) {
    let shape = AttentionHeads {
        heads,
        kv_heads,
        head_dim,
    };
    let q: Vec<f32> = normal::<f32>(shape.query_width(), seed)
        .iter()
        .map(|v| v * sharpness)
        .collect();
    let kv = shape.kv_width();
    let keys: Vec<T> = normal::<f32>(positions * kv, seed + 1)
        .iter()
        .enumerate()
        .map(|(i, v)| T::from_f32(v + drift * (i / kv) as f32 / positions as f32))
        .collect();
    let values: Vec<T> = normal(positions * kv, seed + 2);
    let keys = MatRef::from_slice(&keys, positions, kv).unwrap();
    let values = MatRef::from_slice(&values, positions, kv).unwrap();
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut expected = vec![0.0f32; shape.query_width()];
    attention_ref(shape, &q, keys, values, scale, &mut expected).unwrap();
    let mut got = vec![f32::NAN; shape.query_width()];
    attention(cpu, shape, &q, keys, values, scale, &mut got).unwrap();
    let mut alone = vec![f32::NAN; shape.query_width()];
    attention(
        &cpu.with_threads(1).unwrap(),
        shape,
        &q,
        keys,
        values,
        scale,
        &mut alone,
    )
    .unwrap();
    assert_eq!(
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "{cpu:?}: the thread split changed bits"
    );
    for h in 0..heads {
        let g = shape.kv_head_of(h) * head_dim;
        let q = &q[h * head_dim..(h + 1) * head_dim];
        let key = |t: usize| &keys.row(t)[g..g + head_dim];
        let dot = |t: usize, f: fn(f64) -> f64| -> f64 {
            q.iter()
                .zip(key(t))
                .map(|(a, b)| f(f64::from(*a) * f64::from(b.to_f32())))
                .sum::<f64>()
                * f64::from(scale)
        };
        let score_abs_sum = (0..positions).map(|t| dot(t, f64::abs)).fold(0.0, f64::max);
        let scores: Vec<f64> = (0..positions).map(|t| dot(t, |v| v)).collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
        for j in 0..head_dim {
            let weighted_abs_value: f64 = (0..positions)
                .map(|t| {
                    (scores[t] - max).exp() / total * f64::from(values.row(t)[g + j].to_f32()).abs()
                })
                .sum();
            let bound = attention_tolerance(head_dim, positions, score_abs_sum, weighted_abs_value);
            let (got, want) = (got[h * head_dim + j], expected[h * head_dim + j]);
            let err = (f64::from(got) - f64::from(want)).abs();
            assert!(
                err <= bound + f64::from(want).abs() * f64::from(f32::EPSILON),
                "{cpu:?} {shape:?} positions {positions} head {h} column {j}: {got} vs {want}, error {err:e} over {bound:e}"
            );
        }
    }
}

fn every_shape(cpu: &Cpu) {
    for (i, &heads) in HEADS.iter().enumerate() {
        for (p, &positions) in POSITIONS.iter().enumerate() {
            let seed = (i * 100 + p) as u64;
            check::<f32>(cpu, heads, positions, 1.0, 0.0, seed);
            check::<bf16>(cpu, heads, positions, 1.0, 0.0, seed);
        }
    }
}

/// A peaked softmax whose maximum keeps rising: every block rescales the output.
fn rising_scores(cpu: &Cpu) {
    for positions in [POSITION_BLOCK + 1, 3 * POSITION_BLOCK + 7] {
        check::<f32>(cpu, (9, 3, 64), positions, 4.0, 40.0, 7);
        check::<bf16>(cpu, (4, 2, 17), positions, 4.0, -40.0, 8);
    }
}

/// Bad inputs: each is the error it should be, and `out` is left untouched.
fn bad(cpu: &Cpu) {
    let shape = AttentionHeads {
        heads: 4,
        kv_heads: 2,
        head_dim: 3,
    };
    let q = [0.5f32; 12];
    let cache = [1.0f32; 5 * 6];
    let kv = MatRef::from_slice(&cache, 5, 6).unwrap();
    let mut out = [7.0f32; 12];
    let run = |shape, q: &[f32], keys, values, scale, out: &mut [f32]| {
        attention(cpu, shape, q, keys, values, scale, out)
    };
    let invalid = |r: Result<()>, name: &str| match r {
        Err(Error::InvalidParam { name: n, .. }) => assert_eq!(n, name),
        other => panic!("{name}: expected InvalidParam, got {other:?}"),
    };
    let mismatch = |r: Result<()>, what: &str| match r {
        Err(Error::LengthMismatch { what: w, .. }) => assert_eq!(w, what),
        other => panic!("{what}: expected LengthMismatch, got {other:?}"),
    };
    let with = |heads, kv_heads, head_dim| AttentionHeads {
        heads,
        kv_heads,
        head_dim,
    };
    invalid(run(with(0, 1, 3), &q, kv, kv, 1.0, &mut out), "heads");
    invalid(run(with(4, 3, 3), &q, kv, kv, 1.0, &mut out), "kv_heads");
    invalid(run(with(4, 0, 3), &q, kv, kv, 1.0, &mut out), "kv_heads");
    invalid(run(with(4, 2, 0), &q, kv, kv, 1.0, &mut out), "head_dim");
    invalid(
        run(with(2, 1, usize::MAX), &q, kv, kv, 1.0, &mut out),
        "head_dim",
    );
    let empty = MatRef::from_slice(&cache[..0], 0, 6).unwrap();
    invalid(run(shape, &q, empty, empty, 1.0, &mut out), "positions");
    let narrow = MatRef::from_slice(&cache[..25], 5, 5).unwrap();
    mismatch(run(shape, &q, narrow, kv, 1.0, &mut out), "key width");
    mismatch(run(shape, &q, kv, narrow, 1.0, &mut out), "value width");
    let short = MatRef::from_slice(&cache[..24], 4, 6).unwrap();
    mismatch(run(shape, &q, kv, short, 1.0, &mut out), "value positions");
    mismatch(run(shape, &q[..11], kv, kv, 1.0, &mut out), "q");
    mismatch(run(shape, &q, kv, kv, 1.0, &mut out[..11]), "out");
    for scale in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        invalid(run(shape, &q, kv, kv, scale, &mut out), "scale");
    }
    assert!(
        out.iter().all(|&v| v == 7.0),
        "a refused call wrote its output"
    );
    assert!(run(shape, &q, kv, kv, 1.0, &mut out).is_ok());
    // Equal keys: equal weights, the values' mean (all ones).
    assert!(out.iter().all(|&v| (v - 1.0).abs() < 1e-6), "{out:?}");
}

isa_tests!(every_shape, rising_scores, bad);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn random_shapes_on_the_best_isa(
        kv_heads in 1usize..5,
        group in 1usize..4,
        head_dim in 1usize..80,
        positions in 1usize..300,
        sharpness in 0.1f32..8.0,
        seed in any::<u64>(),
    ) {
        let cpu = Cpu::detect().with_threads(2).unwrap().with_min_bytes_per_thread(1);
        check::<f32>(&cpu, (kv_heads * group, kv_heads, head_dim), positions, sharpness, 0.0, seed);
        check::<bf16>(&cpu, (kv_heads * group, kv_heads, head_dim), positions, sharpness, 0.0, seed);
    }
}
