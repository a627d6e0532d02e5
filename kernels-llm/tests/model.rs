//! The dense forward pass on tiny random models the tests write as GGUF (grouped-query and
//! plain attention, tied and untied embeddings, f32 and bf16 weights, several ISAs): every
//! position's logits against the `f64` reference within [`LOGIT_RELATIVE_TOLERANCE`]; bad
//! tokens, full caches and inconsistent files are errors.

use kernels_core::{Element, Error, bf16};
use kernels_cpu::Cpu;
use kernels_llm::gguf::{Gguf, Writer};
use kernels_llm::model::{
    Decoder, LOGIT_RELATIVE_TOLERANCE, LayerThresholds, Llama, LlamaConfig, Policy, RopeStyle,
    reference_logits, synthetic_gguf,
};
use kernels_llm::source::{NamedTensors, Naming, synthetic_hf};

fn config(heads: usize, kv_heads: usize) -> LlamaConfig {
    LlamaConfig {
        vocab: 37,
        hidden: 8 * heads,
        intermediate: 40,
        layers: 3,
        heads,
        kv_heads,
        head_dim: 8,
        rope_theta: 10_000.0,
        rope_style: RopeStyle::Interleaved,
        rms_eps: 1e-5,
        context: 32,
    }
}

const PROMPT: [u32; 9] = [3, 17, 0, 36, 5, 5, 21, 9, 30];

/// Every position's logits of `model` against the reference.
fn check_against_reference<W: Element>(model: &Llama<W>, cpu: &Cpu, what: &str) -> Vec<f32> {
    let c = &model.config;
    let mut decoder = Decoder::new(c, 16).unwrap();
    let mut logits = vec![0.0f32; c.vocab];
    for (pos, &t) in PROMPT.iter().enumerate() {
        model.forward(cpu, &mut decoder, t, &mut logits).unwrap();
        let expect = reference_logits(model, &PROMPT[..=pos]).unwrap();
        let scale = 1.0 + expect.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (j, (g, e)) in logits.iter().zip(&expect).enumerate() {
            assert!(
                (f64::from(*g) - e).abs() <= LOGIT_RELATIVE_TOLERANCE * scale,
                "{what} {:?} {:?} pos {pos} logit {j}: {g} vs {e}",
                W::DTYPE,
                cpu.isa()
            );
        }
    }
    assert_eq!(decoder.len(), PROMPT.len());
    logits
}

/// Thresholds that skip a good share of each site's activations in the synthetic models (whose
/// normalised states are about unit-sized).
const SPARSE: LayerThresholds = LayerThresholds {
    gate_activation: 0.2,
    attention_input: 0.5,
    attention_output: 0.2,
    mlp_input: 0.6,
    down_input: 0.1,
};

#[test]
fn cats_and_teal_match_the_reference_and_change_the_logits() {
    let c = config(4, 2);
    let bytes = synthetic_gguf(&c, 13, false);
    let file = Gguf::parse(&bytes).unwrap();
    for cpu in Cpu::all_available() {
        let dense =
            check_against_reference(&Llama::<f32>::from_gguf(&file).unwrap(), &cpu, "dense");
        for policy in [Policy::Cats, Policy::Teal] {
            let mut model = Llama::<f32>::from_gguf_with(&file, policy).unwrap();
            // Thresholds of 0 skip nothing: the dense logits, up to rounding.
            let same = check_against_reference(&model, &cpu, "sparse layout, no threshold");
            for (a, b) in same.iter().zip(&dense) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{policy:?}: {a} vs {b}"
                );
            }
            model.set_thresholds(vec![SPARSE; c.layers]).unwrap();
            let sparse = check_against_reference(&model, &cpu, &format!("{policy:?}"));
            let moved = sparse.iter().zip(&dense).any(|(a, b)| (a - b).abs() > 1e-2);
            assert!(moved, "{policy:?}: the thresholds changed nothing");
            let bf16_model = {
                let mut m = Llama::<bf16>::from_gguf_with(&file, policy).unwrap();
                m.set_thresholds(vec![SPARSE; c.layers]).unwrap();
                m
            };
            check_against_reference(&bf16_model, &cpu, &format!("{policy:?}"));
        }
    }
}

#[test]
fn thresholds_are_checked() {
    let c = config(4, 2);
    let bytes = synthetic_gguf(&c, 2, true);
    let mut model =
        Llama::<f32>::from_gguf_with(&Gguf::parse(&bytes).unwrap(), Policy::Teal).unwrap();
    assert_eq!(model.thresholds(), vec![LayerThresholds::default(); 3]);
    assert!(matches!(
        model.set_thresholds(vec![SPARSE; 2]),
        Err(Error::LengthMismatch { .. })
    ));
    let nan = LayerThresholds {
        down_input: f32::NAN,
        ..SPARSE
    };
    assert!(matches!(
        model.set_thresholds(vec![nan; 3]),
        Err(Error::InvalidParam { .. })
    ));
    assert!(model.layers[0].qkv.is_transposed() && model.layers[0].down.is_transposed());
    let cats = Llama::<f32>::from_gguf_with(&Gguf::parse(&bytes).unwrap(), Policy::Cats).unwrap();
    assert!(!cats.layers[0].gate.is_transposed() && cats.layers[0].down.is_transposed());
}

fn matches_reference<W: Element>(c: &LlamaConfig, tied: bool, cpu: &Cpu) {
    let bytes = synthetic_gguf(c, 7, tied);
    let file = Gguf::parse(&bytes).unwrap();
    let model = Llama::<W>::from_gguf(&file).unwrap();
    assert_eq!(model.config, *c);
    assert_eq!(model.output.is_none(), tied);
    let what = format!("heads {}/{} tied {tied}", c.heads, c.kv_heads);
    check_against_reference(&model, cpu, &what);
}

#[test]
fn forward_matches_the_reference_on_every_isa() {
    for cpu in Cpu::all_available() {
        for (heads, kv_heads) in [(4, 2), (3, 3), (4, 1)] {
            for tied in [false, true] {
                let c = config(heads, kv_heads);
                matches_reference::<f32>(&c, tied, &cpu);
                matches_reference::<bf16>(&c, tied, &cpu);
            }
        }
    }
}

#[test]
fn a_different_prompt_changes_the_logits_and_reset_starts_over() {
    let c = config(4, 2);
    let bytes = synthetic_gguf(&c, 3, false);
    let model = Llama::<f32>::from_gguf(&Gguf::parse(&bytes).unwrap()).unwrap();
    let cpu = Cpu::detect();
    let mut decoder = Decoder::new(&c, 4).unwrap();
    let (mut a, mut b) = (vec![0.0; c.vocab], vec![0.0; c.vocab]);
    model.forward(&cpu, &mut decoder, 1, &mut a).unwrap();
    model.forward(&cpu, &mut decoder, 2, &mut b).unwrap();
    assert_ne!(a, b);
    decoder.reset();
    assert!(decoder.is_empty());
    model.forward(&cpu, &mut decoder, 1, &mut b).unwrap();
    assert_eq!(a, b, "the same token at position 0 after a reset");
}

#[test]
fn bad_inputs_are_errors() {
    let c = config(4, 2);
    let bytes = synthetic_gguf(&c, 1, true);
    let file = Gguf::parse(&bytes).unwrap();
    let model = Llama::<f32>::from_gguf(&file).unwrap();
    let cpu = Cpu::detect();
    let mut decoder = Decoder::new(&c, 2).unwrap();
    let mut logits = vec![0.0; c.vocab];
    let e = model
        .forward(&cpu, &mut decoder, 37, &mut logits)
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidParam { name: "token", .. }),
        "{e}"
    );
    let e = model
        .forward(&cpu, &mut decoder, 1, &mut logits[1..])
        .unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { .. }), "{e}");
    model.forward(&cpu, &mut decoder, 1, &mut logits).unwrap();
    model.forward(&cpu, &mut decoder, 1, &mut logits).unwrap();
    let e = model
        .forward(&cpu, &mut decoder, 1, &mut logits)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidParam {
                name: "position",
                ..
            }
        ),
        "{e}"
    );
    let mut other = Decoder::new(&config(3, 3), 2).unwrap();
    assert!(model.forward(&cpu, &mut other, 1, &mut logits).is_err());
    assert!(Decoder::new(&c, 0).is_err() && Decoder::new(&c, 33).is_err());
    assert!(reference_logits(&model, &[]).is_err());
    assert!(reference_logits(&model, &[99]).is_err());

    // Files: another architecture, heads not dividing the width, a missing tensor, a wrong shape.
    let mut w = Writer::new();
    w.metadata_str("general.architecture", "gpt2");
    let other = w.finish();
    let e = Llama::<f32>::from_gguf(&Gguf::parse(&other).unwrap()).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let uneven = LlamaConfig {
        heads: 3,
        kv_heads: 3,
        ..c.clone()
    };
    let e = Llama::<f32>::from_gguf(&Gguf::parse(&synthetic_gguf(&uneven, 1, true)).unwrap())
        .unwrap_err();
    assert!(matches!(e, Error::InvalidParam { .. }), "{e}");
    let grouped = LlamaConfig {
        kv_heads: 3,
        ..c.clone()
    };
    let e = Llama::<f32>::from_gguf(&Gguf::parse(&synthetic_gguf(&grouped, 1, true)).unwrap())
        .unwrap_err();
    assert!(matches!(e, Error::InvalidParam { .. }), "{e}");
    let fewer_layers = LlamaConfig {
        layers: 2,
        ..c.clone()
    };
    // A file with two layers' tensors that says it has three.
    let mut short = synthetic_gguf(&fewer_layers, 1, true);
    let at = short
        .windows(17)
        .position(|w| w == b"llama.block_count")
        .unwrap();
    short[at + 17 + 4] = 3;
    let e = Llama::<f32>::from_gguf(&Gguf::parse(&short).unwrap()).unwrap_err();
    assert!(
        matches!(e, Error::InvalidParam { name: "tensor", .. }),
        "{e}"
    );
}

#[test]
fn greedy_generation_follows_the_argmax_and_stops_where_told() {
    let c = config(4, 2);
    let bytes = synthetic_gguf(&c, 5, false);
    let model = Llama::<f32>::from_gguf(&Gguf::parse(&bytes).unwrap()).unwrap();
    let cpu = Cpu::detect();
    let mut decoder = Decoder::new(&c, 16).unwrap();
    let mut logits = vec![0.0; c.vocab];
    let mut streamed = Vec::new();
    let out = model
        .generate(
            &cpu,
            &mut decoder,
            &PROMPT[..3],
            6,
            None,
            &mut logits,
            |t| {
                streamed.push(t);
                true
            },
        )
        .unwrap();
    assert_eq!((out.len(), &streamed), (6, &out));
    // The same tokens one forward at a time, from the reference's argmax.
    let mut sequence = PROMPT[..3].to_vec();
    for &t in &out {
        let expect = reference_logits(&model, &sequence).unwrap();
        let best = expect
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(t as usize, best);
        sequence.push(t);
    }
    // A stop token ends it (not included); so does the callback.
    let stopped = model
        .generate(
            &cpu,
            &mut decoder,
            &PROMPT[..3],
            6,
            Some(out[0]),
            &mut logits,
            |_| true,
        )
        .unwrap();
    assert!(stopped.is_empty());
    if let Some(k) = out.iter().position(|&t| t != out[0]) {
        let stopped = model
            .generate(
                &cpu,
                &mut decoder,
                &PROMPT[..3],
                6,
                Some(out[k]),
                &mut logits,
                |_| true,
            )
            .unwrap();
        assert_eq!(stopped, out[..k]);
    }
    let one = model
        .generate(
            &cpu,
            &mut decoder,
            &PROMPT[..3],
            6,
            None,
            &mut logits,
            |_| false,
        )
        .unwrap();
    assert_eq!(one, out[..1]);
    assert!(
        model
            .generate(&cpu, &mut decoder, &[], 2, None, &mut logits, |_| true)
            .is_err()
    );
    assert!(
        model
            .generate(&cpu, &mut decoder, &PROMPT, 9, None, &mut logits, |_| true)
            .is_err()
    );
}

#[test]
fn perplexity_scores_every_token_but_each_windows_first() {
    let c = config(4, 2);
    let bytes = synthetic_gguf(&c, 9, true);
    let model = Llama::<f32>::from_gguf(&Gguf::parse(&bytes).unwrap()).unwrap();
    let cpu = Cpu::detect();
    let mut logits = vec![0.0; c.vocab];
    // One window: the negative log-likelihood the reference's logits give.
    let mut decoder = Decoder::new(&c, 16).unwrap();
    let p = model
        .perplexity(&cpu, &mut decoder, &PROMPT, &mut logits)
        .unwrap();
    let mut nll = 0.0;
    for pos in 1..PROMPT.len() {
        let l = reference_logits(&model, &PROMPT[..pos]).unwrap();
        let max = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let log_sum = l.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
        nll += log_sum - l[PROMPT[pos] as usize];
    }
    assert_eq!(p.tokens_scored, PROMPT.len() - 1);
    assert!((p.nll - nll).abs() <= 1e-4 * nll, "{} vs {nll}", p.nll);
    assert!(p.value() > 1.0 && p.value() < c.vocab as f64 * 10.0);
    // Windows of 4 over 9 tokens: 4 + 4 + 1, scoring 3 + 3 + 0.
    let mut small = Decoder::new(&c, 4).unwrap();
    let windows = model
        .perplexity(&cpu, &mut small, &PROMPT, &mut logits)
        .unwrap();
    assert_eq!(windows.tokens_scored, 6);
    assert!(
        model
            .perplexity(&cpu, &mut small, &PROMPT[..1], &mut logits)
            .is_err()
    );
}

/// Calibration's thresholds are the exact quantiles of the activations a dense pass shows, per
/// layer and site: `t = sorted |a|` at rank `ceil(k n)` (`#{|a| <= t} / n >= k`).
#[test]
fn calibration_gives_the_exact_quantile_of_each_site() {
    use kernels_llm::calibrate::{calibrate, sites};
    use kernels_llm::model::Site;
    use std::collections::BTreeMap;
    let c = config(4, 2);
    let bytes = synthetic_gguf(&c, 21, false);
    let model = Llama::<f32>::from_gguf(&Gguf::parse(&bytes).unwrap()).unwrap();
    let cpu = Cpu::detect();
    let mut logits = vec![0.0; c.vocab];
    // Windows of 4: the thresholds cover every window's positions.
    let mut decoder = Decoder::new(&c, 4).unwrap();
    let mut seen: BTreeMap<(usize, Site), Vec<f32>> = BTreeMap::new();
    for window in PROMPT.chunks(4) {
        decoder.reset();
        for &t in window {
            model
                .forward_observed(&cpu, &mut decoder, t, &mut logits, &mut |l, site, x| {
                    seen.entry((l, site))
                        .or_default()
                        .extend(x.iter().map(|v| v.abs()));
                    Ok(())
                })
                .unwrap();
        }
    }
    for policy in [Policy::Cats, Policy::Teal] {
        for k in [0.3, 0.5, 0.7] {
            let found =
                calibrate(&model, &cpu, &mut decoder, &PROMPT, policy, k, &mut logits).unwrap();
            for (layer, t) in found.iter().enumerate() {
                for &site in sites(policy) {
                    let mut values = seen[&(layer, site)].clone();
                    values.sort_by(f32::total_cmp);
                    let rank = (k * values.len() as f64).ceil() as usize;
                    let expect = values[rank - 1];
                    let got = match site {
                        Site::GateActivation => t.gate_activation,
                        Site::AttentionInput => t.attention_input,
                        Site::AttentionOutput => t.attention_output,
                        Site::MlpInput => t.mlp_input,
                        _ => t.down_input,
                    };
                    assert_eq!(got, expect, "{policy:?} k={k} layer {layer} {site:?}");
                }
            }
        }
    }
    let sparse = Llama::<f32>::from_gguf_with(&Gguf::parse(&bytes).unwrap(), Policy::Cats).unwrap();
    assert!(
        calibrate(
            &sparse,
            &cpu,
            &mut decoder,
            &PROMPT,
            Policy::Cats,
            0.5,
            &mut logits
        )
        .is_err()
    );
    assert!(
        calibrate(
            &model,
            &cpu,
            &mut decoder,
            &[],
            Policy::Cats,
            0.5,
            &mut logits
        )
        .is_err()
    );
    assert!(
        calibrate(
            &model,
            &cpu,
            &mut decoder,
            &PROMPT,
            Policy::Cats,
            1.5,
            &mut logits
        )
        .is_err()
    );
}

#[test]
fn the_mlp_alone_is_each_policys_and_checks_its_inputs() {
    let c = config(4, 2);
    let bytes = synthetic_gguf(&c, 7, true);
    let file = Gguf::parse(&bytes).unwrap();
    let cpu = Cpu::detect();
    let x: Vec<f32> = (0..c.hidden).map(|i| (i as f32 * 0.37).sin()).collect();
    let mlp = |policy: Policy| {
        let model = Llama::<f32>::from_gguf_with(&file, policy).unwrap();
        let mut decoder = Decoder::new(&c, 4).unwrap();
        let mut out = vec![f32::NAN; c.hidden];
        model.mlp(&cpu, &mut decoder, 1, &x, &mut out).unwrap();
        out
    };
    let dense = mlp(Policy::Dense);
    assert!(dense.iter().any(|&v| v != 0.0));
    // Zero thresholds skip nothing: every policy computes the dense MLP, in its own order.
    for policy in [Policy::Cats, Policy::Teal] {
        for (got, want) in mlp(policy).iter().zip(&dense) {
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{policy:?}: {got} vs {want}"
            );
        }
    }
    let model = Llama::<f32>::from_gguf(&file).unwrap();
    let mut decoder = Decoder::new(&c, 4).unwrap();
    let mut out = vec![0.0; c.hidden];
    assert!(
        model
            .mlp(&cpu, &mut decoder, c.layers, &x, &mut out)
            .is_err()
    );
    assert!(model.mlp(&cpu, &mut decoder, 0, &x[1..], &mut out).is_err());
    assert!(model.mlp(&cpu, &mut decoder, 0, &x, &mut out[1..]).is_err());
    let mut other = Decoder::new(&config(2, 2), 4).unwrap();
    assert!(model.mlp(&cpu, &mut other, 0, &x, &mut out).is_err());
}

/// A model's logits over [`PROMPT`], position by position.
fn prompt_logits<W: Element>(model: &Llama<W>, cpu: &Cpu) -> Vec<Vec<f32>> {
    let mut decoder = Decoder::new(&model.config, PROMPT.len()).unwrap();
    let mut logits = vec![0.0f32; model.config.vocab];
    PROMPT
        .iter()
        .map(|&t| {
            model.forward(cpu, &mut decoder, t, &mut logits).unwrap();
            logits.clone()
        })
        .collect()
}

#[test]
fn a_hugging_face_checkpoint_gives_the_gguf_logits() {
    // The same weights in both formats: the GGUF's q and k rows permuted as llama.cpp's
    // converter does, rotated in adjacent pairs; the checkpoint's rotated in halves.
    for (heads, kv_heads, tied) in [(4, 2, false), (3, 3, true), (4, 1, true)] {
        let c = config(heads, kv_heads);
        let gguf_bytes = synthetic_gguf(&c, 21, tied);
        let gguf = Gguf::parse(&gguf_bytes).unwrap();
        let (json, tensors) = synthetic_hf(&c, 21, tied);
        assert_eq!(
            LlamaConfig::from_hf_config(json.as_bytes())
                .unwrap()
                .rope_style,
            RopeStyle::Halves
        );
        for cpu in Cpu::all_available() {
            for policy in [Policy::Dense, Policy::Cats, Policy::Teal] {
                let mut from_gguf = Llama::<f32>::from_gguf_with(&gguf, policy).unwrap();
                let mut from_hf = Llama::<f32>::from_hf(json.as_bytes(), &tensors, policy).unwrap();
                assert_eq!(from_hf.output.is_none(), tied);
                assert_eq!(
                    LlamaConfig {
                        rope_style: RopeStyle::Interleaved,
                        ..from_hf.config.clone()
                    },
                    from_gguf.config
                );
                if policy != Policy::Dense {
                    from_gguf.set_thresholds(vec![SPARSE; c.layers]).unwrap();
                    from_hf.set_thresholds(vec![SPARSE; c.layers]).unwrap();
                }
                check_against_reference(&from_hf, &cpu, "from a Hugging Face checkpoint");
                let (a, b) = (
                    prompt_logits(&from_gguf, &cpu),
                    prompt_logits(&from_hf, &cpu),
                );
                for (pos, (a, b)) in a.iter().zip(&b).enumerate() {
                    let scale = 1.0 + a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    for (x, y) in a.iter().zip(b) {
                        assert!(
                            f64::from((x - y).abs()) <= LOGIT_RELATIVE_TOLERANCE * f64::from(scale),
                            "{heads}/{kv_heads} {policy:?} {:?} pos {pos}: {x} vs {y}",
                            cpu.isa()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn bad_hugging_face_checkpoints_are_errors() {
    let c = config(4, 2);
    let (json, tensors) = synthetic_hf(&c, 5, false);
    let load = |json: &str, tensors: &NamedTensors| {
        Llama::<f32>::from_hf(json.as_bytes(), tensors, Policy::Dense).map(|_| ())
    };
    load(&json, &tensors).unwrap();
    let edited = |from: &str, to: &str| {
        assert!(json.contains(from), "{from}");
        json.replace(from, to)
    };
    let unsupported = [
        edited(r#""model_type": "llama""#, r#""model_type": "mistral""#),
        edited(r#""hidden_act": "silu""#, r#""hidden_act": "gelu""#),
        edited(
            r#""rope_scaling": null"#,
            r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#,
        ),
        edited(
            r#""rope_scaling": null"#,
            r#""rope_scaling": null, "attention_bias": true"#,
        ),
    ];
    for bad in &unsupported {
        let e = load(bad, &tensors).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{bad}: {e}");
    }
    let invalid = [
        edited(r#""num_key_value_heads": 2"#, r#""num_key_value_heads": 3"#),
        edited(r#""head_dim": 8"#, r#""head_dim": 7"#),
        edited(r#""num_hidden_layers": 3"#, r#""num_hidden_layers": 0"#),
        edited(r#""num_hidden_layers": 3"#, r#""num_hidden_layers": -3"#),
        edited(r#""vocab_size": 37,"#, ""),
        edited(r#""rms_norm_eps": 1e-5"#, r#""rms_norm_eps": "small""#),
        edited(r#""rope_theta": 10000.0"#, r#""rope_theta": -1.0"#),
        // A layer the checkpoint does not have.
        edited(r#""num_hidden_layers": 3"#, r#""num_hidden_layers": 4"#),
    ];
    for bad in &invalid {
        let e = load(bad, &tensors).unwrap_err();
        assert!(matches!(e, Error::InvalidParam { .. }), "{bad}: {e}");
    }
    for bad in ["", "[1, 2]", "{\"model_type\": \"llama\""] {
        let e = load(bad, &tensors).unwrap_err();
        assert!(matches!(e, Error::BadFormat { .. }), "{bad}: {e}");
    }
    // Tensors: lm_head missing while untied, a matrix of the wrong shape, a norm of the
    // wrong length.
    let without = |skip: &str| {
        let mut t = NamedTensors::new(Naming::HuggingFace);
        for (name, shape, values) in tensors.iter().filter(|(n, _, _)| *n != skip) {
            t.insert(name, shape.to_vec(), values.to_vec()).unwrap();
        }
        t
    };
    let e = load(&json, &without("lm_head.weight")).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidParam {
                name: "lm_head.weight",
                ..
            }
        ),
        "{e}"
    );
    load(
        &edited(
            r#""tie_word_embeddings": false"#,
            r#""tie_word_embeddings": true"#,
        ),
        &without("lm_head.weight"),
    )
    .unwrap();
    let mut reshaped = without("");
    reshaped
        .insert(
            "model.layers.1.mlp.up_proj.weight",
            vec![c.hidden, c.intermediate],
            vec![0.0; c.hidden * c.intermediate],
        )
        .unwrap();
    let e = load(&json, &reshaped).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let mut short_norm = without("");
    short_norm
        .insert(
            "model.norm.weight",
            vec![c.hidden - 1],
            vec![1.0; c.hidden - 1],
        )
        .unwrap();
    let e = load(&json, &short_norm).unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { .. }), "{e}");
    let e = load(&json, &without("model.layers.2.self_attn.k_proj.weight")).unwrap_err();
    assert!(
        matches!(e, Error::InvalidParam { name: "tensor", .. }),
        "{e}"
    );
    // GGUF tensors (llama.cpp's names and row order) under transformers' config.
    let gguf_bytes = synthetic_gguf(&c, 5, false);
    let e = Llama::<f32>::from_hf(
        json.as_bytes(),
        &Gguf::parse(&gguf_bytes).unwrap(),
        Policy::Dense,
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidParam { .. }), "{e}");
}
