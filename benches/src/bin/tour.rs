//! A tour of every op family on one small Llama-shaped problem (a SmolLM2-135M MLP layer and
//! task vectors of its size), printing what each op computed and how it agrees with the
//! reference, plus the speed of the fast kernels that exist so far.
//!
//! Run: `cargo run --release -p kernels-benches --bin tour`

use std::process::ExitCode;

use half::bf16;
use kernels_benches::{
    SMOLLM2_135M, gb_per_s, heavy_tailed, measure_stream_read, median_time, normal,
};
use kernels_core::format::{self, TernaryLayout};
use kernels_core::ops::{lowrank, merge, project, select, sparse, ternary};
use kernels_core::{Mat, MatMut, MatRef, MultiPass, Result};
use kernels_cpu::calibrate::{Calibration, Site};
use kernels_cpu::mlp::MlpScratch;
use kernels_cpu::{Cpu, Isa, merge::sum_squares};

/// Collects agreement checks; the tour fails (exit 1) if any of them does.
struct Checks {
    failed: usize,
}

impl Checks {
    fn check(&mut self, what: &str, ok: bool) {
        if !ok {
            self.failed += 1;
        }
        println!("    {} {what}", if ok { "ok  " } else { "FAIL" });
    }
}

fn relative_distance(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn main() -> ExitCode {
    let mut checks = Checks { failed: 0 };
    match run(&mut checks) {
        Ok(()) if checks.failed == 0 => {
            println!("\nall checks agree with the reference");
            ExitCode::SUCCESS
        }
        Ok(()) => {
            println!("\n{} checks FAILED", checks.failed);
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("\nerror: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(checks: &mut Checks) -> Result<()> {
    let shape = SMOLLM2_135M;
    let (hidden, inter) = (shape.hidden, shape.intermediate);
    let cpu = Cpu::detect();
    let isas: Vec<&str> = Isa::available().map(Isa::name).collect();
    println!(
        "kernel tour: one {}-shaped MLP layer (hidden {hidden}, intermediate {inter}), synthetic data",
        shape.name
    );
    println!(
        "CPU backend: {} (available: {})",
        cpu.isa(),
        isas.join(", ")
    );

    activation_sparsity(checks, hidden, inter)?;
    selection_and_compression(checks, hidden, inter)?;
    merging(checks, hidden * inter)?;
    linear_algebra(checks, hidden)?;
    fast_kernels(checks, cpu)?;
    gpu_kernels(checks, hidden, inter)
}

fn activation_sparsity(checks: &mut Checks, hidden: usize, inter: usize) -> Result<()> {
    println!("\n[activation sparsity: CATS / TEAL]");
    let scale = 1.0 / (hidden as f32).sqrt();
    let gate = normal::<bf16>(inter * hidden, scale, 1);
    let up = normal::<bf16>(inter * hidden, scale, 2);
    let down_t = normal::<bf16>(inter * hidden, scale, 3);
    let x = normal::<f32>(hidden, 1.0, 4);
    let weights = sparse::CatsMlpWeights {
        gate: MatRef::from_slice(&gate, inter, hidden)?,
        up: MatRef::from_slice(&up, inter, hidden)?,
        down_t: MatRef::from_slice(&down_t, inter, hidden)?,
    };
    // Calibrate the CATS threshold on the gate activations of a few calibration inputs.
    let mut samples = Vec::new();
    for seed in 10..14 {
        let xc = normal::<f32>(hidden, 1.0, seed);
        let mut g = vec![0.0; inter];
        sparse::gemv_ref(weights.gate, &xc, &mut g)?;
        samples.extend(g.iter().map(|&g| sparse::silu_f64(f64::from(g)) as f32));
    }
    let t = sparse::calibrate_threshold_ref(&[&samples], 0.5)?;
    let cpu = Cpu::detect();
    let streamed = Calibration::new(0.5)?.run(
        || samples.chunks(1000),
        |c, chunk| c.feed(&cpu, 0, Site::GateActivation, chunk),
    )?;
    let t_stream = streamed[0].2;
    println!(
        "  threshold for 50% sparsity from {} gate activations: t = {t:.5}",
        samples.len()
    );
    checks.check(
        "streaming (histogram) calibration equals the exact quantile",
        t == t_stream,
    );

    let xm = MatRef::from_slice(&x, 1, hidden)?;
    let mut dense = vec![0.0; hidden];
    let mut cats = vec![0.0; hidden];
    sparse::cats_mlp_ref(
        xm,
        weights,
        -1.0,
        MatMut::from_slice(&mut dense, 1, hidden)?,
    )?;
    let report = sparse::cats_mlp_ref(xm, weights, t, MatMut::from_slice(&mut cats, 1, hidden)?)?;
    println!(
        "  CATS MLP: read {} of {inter} rows of W_up and W_down (sparsity {:.1}%), relative L2 change vs dense {:.3}",
        report.active.len(),
        100.0 * report.sparsity(),
        relative_distance(&cats, &dense)
    );
    let ideal = sparse::ideal_mlp_speedup(report.sparsity())?;
    println!("  ideal MLP speed-up at that sparsity with a dense gate: {ideal:.2}x");

    // TEAL: the same layer through transposed gate/up, each input thresholded.
    let transpose = |m: &[bf16]| -> Vec<bf16> {
        (0..m.len())
            .map(|k| m[(k % inter) * hidden + k / inter])
            .collect()
    };
    let (gate_t, up_t) = (transpose(&gate), transpose(&up));
    let teal_weights = sparse::TealMlpWeights {
        gate_t: MatRef::from_slice(&gate_t, hidden, inter)?,
        up_t: MatRef::from_slice(&up_t, hidden, inter)?,
        down_t: weights.down_t,
    };
    let t_x = sparse::calibrate_threshold_ref(&[&x], 0.5)?;
    let mut teal = vec![0.0; hidden];
    let teal_report = sparse::teal_mlp_ref(
        xm,
        teal_weights,
        sparse::TealThresholds::new(t_x, 0.0),
        MatMut::from_slice(&mut teal, 1, hidden)?,
    )?;
    println!(
        "  TEAL MLP (x thresholded at its median): relative L2 change vs dense {:.3}, {} of {inter} W_down rows read",
        relative_distance(&teal, &dense),
        teal_report.active.len()
    );

    // Sparse-input GEMV over W_down_t with h thresholded.
    let h: Vec<f32> = heavy_tailed(inter, 1.0, 5);
    let w_t = MatRef::from_slice(&down_t, inter, hidden)?;
    let t_h = sparse::calibrate_threshold_ref(&[&h], 0.7)?;
    let (mut y_dense, mut y_sparse, mut y_masked) =
        (vec![0.0; hidden], vec![0.0; hidden], vec![0.0; hidden]);
    sparse::gemv_t_ref(w_t, &h, &mut y_dense)?;
    sparse::sparse_input_gemv_ref(w_t, &h, t_h, &mut y_sparse)?;
    let rows = sparse::count_active(&h, t_h);
    let masked: Vec<f32> = h
        .iter()
        .map(|&v| if sparse::is_active(v, t_h) { v } else { 0.0 })
        .collect();
    sparse::gemv_t_ref(w_t, &masked, &mut y_masked)?;
    println!(
        "  sparse-input GEMV (TEAL, t at the 70% quantile): {rows} of {inter} rows read, relative L2 change vs dense {:.3}",
        relative_distance(&y_sparse, &y_dense)
    );
    checks.check(
        "sparse-input GEMV equals the dense GEMV of the thresholded input",
        relative_distance(&y_sparse, &y_masked) < 1e-6,
    );
    Ok(())
}

fn selection_and_compression(checks: &mut Checks, hidden: usize, inter: usize) -> Result<()> {
    println!("\n[selection and ternary compression: ComPEFT]");
    // A task vector of three tensors (gate, up, down of one layer).
    let tensors: Vec<Vec<f32>> = (0..3)
        .map(|i| heavy_tailed(hidden * inter, 1e-3, 20 + i))
        .collect();
    let views: Vec<&[f32]> = tensors.iter().map(Vec::as_slice).collect();
    let n: usize = views.iter().map(|t| t.len()).sum();
    let density = 0.1;
    let keep = select::KeepRule::Density(density);
    let k = keep.count(n as u64)?.unwrap_or(0);
    let sorted_cut = select::topk_cut_ref(&views, keep)?;
    let streamed_cut = select::StreamingTopK::new(keep)?
        .run(|| views.iter().copied(), select::StreamingTopK::feed)?;
    println!(
        "  global top-{k} of {n} entries: k-th magnitude {:.3e} ({} ties kept)",
        sorted_cut.magnitude, sorted_cut.ties
    );
    checks.check(
        "two-pass histogram selection equals the sorted selection",
        sorted_cut == streamed_cut,
    );

    let params = ternary::CompeftParams::default().with_keep(keep);
    let (expect, codes) = ternary::compeft_ref(&views, params)?;
    let scale = expect.scale;
    let decided =
        ternary::Compeft::new(params)?.run(|| views.iter().copied(), ternary::Compeft::feed)?;
    let mut coder = ternary::CompeftEncoder::new(&decided);
    let mut same = decided.cut == expect.cut;
    for (t, expect) in views.iter().zip(&codes) {
        let mut got = vec![0i8; t.len()];
        coder.code(t, &mut got)?;
        same &= &got == expect;
    }
    let nonzero = codes.iter().flatten().filter(|&&c| c != 0).count();
    println!(
        "  ComPEFT (density {density}): scale alpha*sigma = {scale:.4e}, {nonzero} non-zero codes"
    );
    checks.check(
        "streaming ComPEFT (tensor by tensor) equals the in-memory reference",
        same && (decided.scale - scale).abs() <= 1e-6 * scale,
    );

    let gate_codes = &codes[0];
    for layout in [TernaryLayout::Dense2Bit, TernaryLayout::SparseRice] {
        let bytes = format::encode(gate_codes, &[inter as u64, hidden as u64], scale, layout)?;
        let header = format::TernaryHeader::parse(&bytes)?;
        let (_, back) = format::decode(&bytes, gate_codes.len())?;
        let d = header.nnz as f64 / header.numel as f64;
        println!(
            "  packed {layout:?}: {} bytes, {:.3} bits/param (entropy bound {:.3} at density {d:.3})",
            bytes.len(),
            header.bits_per_param(),
            format::entropy_bits_per_param(d)
        );
        checks.check("decode(encode(codes)) == codes", &back == gate_codes);
    }

    let x = normal::<f32>(hidden, 1.0, 30);
    let codes_m = MatRef::from_slice(gate_codes, inter, hidden)?;
    let mut y_ternary = vec![0.0; inter];
    ternary::ternary_gemv_ref(codes_m, scale, &x, &mut y_ternary)?;
    let mut dequantized = vec![0.0f32; gate_codes.len()];
    ternary::ternary_add_ref(&mut dequantized, gate_codes, scale, 1.0)?;
    let mut y_dense = vec![0.0; inter];
    sparse::gemv_ref(
        MatRef::from_slice(&dequantized, inter, hidden)?,
        &x,
        &mut y_dense,
    )?;
    checks.check(
        "ternary GEMV equals the GEMV of the decompressed matrix",
        relative_distance(&y_ternary, &y_dense) < 1e-6,
    );
    Ok(())
}

fn merging(checks: &mut Checks, n: usize) -> Result<()> {
    println!("\n[merging: soups, task arithmetic, TIES, DARE, Breadcrumbs, Fisher]");
    let base = normal::<bf16>(n, 0.02, 40);
    let taus: Vec<Vec<bf16>> = (0..3)
        .map(|i| {
            heavy_tailed(n, 1e-3, 41 + i)
                .into_iter()
                .map(bf16::from_f32)
                .collect()
        })
        .collect();
    let tau_views: Vec<&[bf16]> = taus.iter().map(Vec::as_slice).collect();
    let weights = [1.0, 1.0, 1.0];
    let mut out = vec![0.0f32; n];

    merge::task_arithmetic_ref(&base, &tau_views, &weights, 0.5, &mut out)?;
    let delta: Vec<f32> = out.iter().zip(&base).map(|(o, b)| o - b.to_f32()).collect();
    println!(
        "  task arithmetic (lambda 0.5): ||merged - base|| = {:.4}",
        l2(&delta)
    );

    let ties = merge::TiesParams::default().with_keep(select::KeepRule::Density(0.2));
    merge::ties_ref(&base, &tau_views, &weights, ties, &mut out)?;
    let changed = out
        .iter()
        .zip(&base)
        .filter(|(o, b)| **o != b.to_f32())
        .count();
    println!(
        "  TIES (density 0.2): {:.1}% of entries changed by the elected disjoint mean",
        100.0 * changed as f64 / n as f64
    );
    let mut trimmed = vec![0.0f32; n];
    merge::ties_trim_ref(tau_views[0], ties.keep, &mut trimmed)?;
    let (mut one, mut ta) = (vec![0.0; n], vec![0.0; n]);
    merge::ties_ref(&base, &tau_views[..1], &[1.0], ties, &mut one)?;
    let base32: Vec<f32> = base.iter().map(|b| b.to_f32()).collect();
    merge::task_arithmetic_ref(&base32, &[trimmed.as_slice()], &[1.0], 1.0, &mut ta)?;
    checks.check(
        "TIES of one model equals trimmed task arithmetic",
        one == ta,
    );

    let dare = merge::DareParams::new(0.9, 7);
    let mut dropped = vec![0.0; n];
    merge::dare_ref(tau_views[0], dare, 0, &mut dropped)?;
    let kept = dropped.iter().filter(|v| **v != 0.0).count() as f64 / n as f64;
    let mut chunked = vec![0.0; n];
    let half = n / 2 + 7;
    merge::dare_ref(&tau_views[0][..half], dare, 0, &mut chunked[..half])?;
    merge::dare_ref(
        &tau_views[0][half..],
        dare,
        half as u64,
        &mut chunked[half..],
    )?;
    println!(
        "  DARE (p 0.9, seed 7): kept {:.2}% of entries, rescaled by 10x",
        100.0 * kept
    );
    checks.check(
        "DARE mask is the same when the tensor is processed in two chunks",
        dropped == chunked,
    );

    merge::breadcrumbs_ref(
        tau_views[0],
        merge::BreadcrumbsParams::new(0.9, 0.01),
        &mut out,
    )?;
    let kept = out.iter().filter(|v| **v != 0.0).count();
    println!("  Breadcrumbs (density 0.9, gamma 0.01): kept {kept} of {n} entries");

    let thetas: Vec<Vec<f32>> = taus
        .iter()
        .map(|t| {
            t.iter()
                .zip(&base)
                .map(|(t, b)| t.to_f32() + b.to_f32())
                .collect()
        })
        .collect();
    let theta_views: Vec<&[f32]> = thetas.iter().map(Vec::as_slice).collect();
    let fishers: Vec<Vec<f32>> = (0..3)
        .map(|i| heavy_tailed(n, 1.0, 50 + i).iter().map(|g| g * g).collect())
        .collect();
    let fisher_views: Vec<&[f32]> = fishers.iter().map(Vec::as_slice).collect();
    let norms: Vec<f64> = fisher_views
        .iter()
        .map(|f| merge::sum_squares_ref(f))
        .collect();
    let fisher = merge::FisherParams::default()
        .with_floor(1e-8)
        .with_normalization(&norms);
    merge::fisher_merge_ref(&theta_views, &fisher_views, &weights, fisher, &mut out)?;
    let mut mean = vec![0.0; n];
    merge::weighted_mean_ref(&theta_views, &weights, &mut mean)?;
    println!(
        "  Fisher merge (normalised, floor 1e-8): relative L2 distance to the plain soup {:.4}",
        relative_distance(&out, &mean)
    );
    let equal = vec![fisher_views[0]; 3];
    let plain = merge::FisherParams::default();
    merge::fisher_merge_ref(&theta_views, &equal, &weights, plain, &mut out)?;
    checks.check(
        "Fisher merge with equal Fishers equals the plain mean",
        relative_distance(&out, &mean) < 1e-6,
    );
    Ok(())
}

fn l2(x: &[f32]) -> f64 {
    x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt()
}

fn linear_algebra(checks: &mut Checks, hidden: usize) -> Result<()> {
    println!("\n[projection, QR and low rank: OPCM, LoRA extraction, LoLDU]");
    let cols = 128;
    // A task-vector block with a decaying spectrum: rank-16 signal plus small noise.
    let signal_u = Mat::from_vec(
        normal::<f32>(hidden * 16, 1.0, 60)
            .iter()
            .map(|&v| f64::from(v))
            .collect(),
        hidden,
        16,
    )?;
    let signal_v = Mat::from_vec(
        normal::<f32>(16 * cols, 1.0, 61)
            .iter()
            .map(|&v| f64::from(v))
            .collect(),
        16,
        cols,
    )?;
    let noise = normal::<f32>(hidden * cols, 0.01, 62);
    let signal = signal_u.matmul(&signal_v).unwrap();
    let delta = Mat::from_fn(hidden, cols, |i, j| {
        signal.at(i, j) * 0.1 + f64::from(noise[i * cols + j])
    })
    .unwrap();

    let qr = project::householder_qr_ref(delta.as_ref())?;
    let eps_bound = 16.0 * f64::EPSILON * hidden as f64;
    println!(
        "  Householder QR of {hidden}x{cols}: ||Q^T Q - I|| = {:.2e}",
        qr.q.orthogonality_error().unwrap()
    );
    checks.check(
        "QR reconstructs and Q is orthonormal",
        qr.q.matmul(&qr.r).unwrap().distance(&delta).unwrap() <= eps_bound * delta.frobenius_norm()
            && qr.q.orthogonality_error().unwrap() <= eps_bound,
    );
    let q16 = qr.q.leading_cols(16);
    let mut out = vec![0.0f32; hidden * cols];
    project::project_out_ref(
        q16.as_ref(),
        delta.as_ref(),
        MatMut::from_slice(&mut out, hidden, cols)?,
    )?;
    let residual = Mat::from_vec(out.iter().map(|&v| f64::from(v)).collect(), hidden, cols)?;
    checks.check(
        "X - Q(Q^T X) is orthogonal to Q",
        q16.t_matmul(&residual).unwrap().frobenius_norm() < 1e-4 * delta.frobenius_norm(),
    );

    let svd = lowrank::thin_svd_ref(delta.as_ref())?;
    println!(
        "  thin SVD: s[0] = {:.3}, s[15] = {:.3}, s[16] = {:.4} (noise floor)",
        svd.s[0], svd.s[15], svd.s[16]
    );
    checks.check(
        "U S V^T reconstructs the matrix",
        svd.reconstruct().unwrap().distance(&delta).unwrap() <= eps_bound * delta.frobenius_norm(),
    );
    let rsvd = lowrank::randomized_svd_ref(delta.as_ref(), lowrank::RsvdParams::new(16))?;
    let optimal = svd.s[16..].iter().map(|s| s * s).sum::<f64>().sqrt();
    let achieved = rsvd.reconstruct().unwrap().distance(&delta).unwrap();
    println!(
        "  randomized rank-16 SVD (q = 32, 2 power iterations): error {achieved:.4} vs optimal {optimal:.4}"
    );
    checks.check(
        "randomized SVD within 1.1x of the optimal rank-16 error",
        achieved <= 1.1 * optimal,
    );

    let lora = lowrank::lora_extract_ref(delta.as_ref(), lowrank::LoraRank::Energy(0.99))?;
    println!(
        "  LoRA extraction at 99% energy: rank {} (B {}x{}, A {}x{})",
        lora.b.cols(),
        lora.b.rows(),
        lora.b.cols(),
        lora.a.rows(),
        lora.a.cols()
    );

    let square = delta.leading_rows(cols);
    let ldu = lowrank::ldu_ref(square.as_ref(), lowrank::LuParams::default())?;
    let d = Mat::from_fn(cols, cols, |i, j| if i == j { ldu.d[i] } else { 0.0 }).unwrap();
    let lu = lowrank::lu_ref(square.as_ref())?;
    let back = ldu.l.matmul(&d).unwrap().matmul(&ldu.u).unwrap();
    checks.check(
        "L D U reconstructs P A",
        back.distance(&lu.permute(&square).unwrap()).unwrap()
            <= eps_bound * square.frobenius_norm(),
    );

    let s32: Vec<f32> = svd.s.iter().map(|&v| v as f32).collect();
    let tau_new = Mat::from_vec(
        normal::<f32>(hidden * cols, 0.01, 63)
            .iter()
            .map(|&v| f64::from(v))
            .collect(),
        hidden,
        cols,
    )?;
    let merged = lowrank::SvdRef {
        u: svd.u.as_ref(),
        s: &s32,
        v: svd.v.as_ref(),
    };
    let projected =
        lowrank::opcm_project_ref(merged, tau_new.as_ref(), lowrank::OpcmParams::default())?;
    let r = lowrank::opcm_rank(&s32, 0.5)?;
    println!(
        "  OPCM step (alpha 0.5): leading block r = {r}, ||tau~|| / ||tau|| = {:.3}",
        projected.frobenius_norm() / tau_new.frobenius_norm()
    );
    Ok(())
}

fn view(m: &[bf16], rows: usize, cols: usize) -> MatRef<'_, bf16> {
    MatRef::from_slice(m, rows, cols).expect("shape")
}

fn fast_kernels(checks: &mut Checks, cpu: Cpu) -> Result<()> {
    println!(
        "\n[fast CPU kernels: {} with {} threads]",
        cpu.isa(),
        cpu.threads()
    );
    let stream = measure_stream_read(&cpu, 512 << 20, 5);
    println!("  STREAM-style read bandwidth (all cores, 512 MiB): {stream:.1} GB/s");
    let report = |what: &str, bytes: usize, time: std::time::Duration| {
        let rate = gb_per_s(bytes, time);
        println!(
            "  {what:<46} {:>8.1} us {rate:6.1} GB/s ({:5.1}% of STREAM)",
            time.as_secs_f64() * 1e6,
            100.0 * rate / stream
        );
    };

    // A whole SmolLM2-135M MLP stack (30 layers, bf16): each call reads the next layer, as decoding
    // does, so the weights stream from memory (159 MiB; partly L3-resident on this machine).
    let shape = SMOLLM2_135M;
    let (hidden, inter) = (shape.hidden, shape.intermediate);
    let scale = 1.0 / (hidden as f32).sqrt();
    let layers: Vec<[Vec<bf16>; 3]> = (0..shape.layers)
        .map(|l| [0, 1, 2].map(|p| normal::<bf16>(inter * hidden, scale, 100 + 3 * l as u64 + p)))
        .collect();
    let x = normal::<f32>(hidden, 1.0, 90);
    let layer_bytes = inter * hidden * 2;
    println!(
        "  (rotating over a 30-layer SmolLM2-135M MLP stack, 159 MiB of bf16: partly L3-resident;"
    );
    println!("   BENCHMARKS.md has the cold Llama-2-7B figures the targets are set on)");

    let mut g = vec![0.0f32; inter];
    let mut k = 0;
    let dense = median_time(61, || {
        k += 1;
        kernels_cpu::gemv::gemv(
            &cpu,
            view(&layers[k % layers.len()][0], inter, hidden),
            &x,
            &mut g,
        )
        .expect("gemv");
    });
    report("dense GEMV W_gate 1536x576 bf16", layer_bytes, dense);
    let mut expect = vec![0.0f32; inter];
    sparse::gemv_ref(view(&layers[0][0], inter, hidden), &x, &mut expect)?;
    kernels_cpu::gemv::gemv(&cpu, view(&layers[0][0], inter, hidden), &x, &mut g)?;
    checks.check(
        "dense GEMV agrees with the reference (f32 tolerance)",
        relative_distance(&g, &expect) < 1e-5,
    );

    let h = heavy_tailed(inter, 1.0, 91);
    let mut y = vec![0.0f32; hidden];
    for s in [0.5, 0.7] {
        let t = sparse::calibrate_threshold_ref(&[&h], s)?;
        let time = median_time(61, || {
            k += 1;
            kernels_cpu::gemv::sparse_input_gemv(
                &cpu,
                view(&layers[k % layers.len()][2], inter, hidden),
                &h,
                t,
                &mut y,
            )
            .expect("sparse");
        });
        report(
            &format!(
                "sparse-input GEMV W_down_t s={s}: {:.2}x dense",
                dense.as_secs_f64() / time.as_secs_f64()
            ),
            (layer_bytes as f64 * (1.0 - s)) as usize,
            time,
        );
    }

    let xm = MatRef::from_slice(&x, 1, hidden)?;
    let weights = |layer: usize| sparse::CatsMlpWeights {
        gate: view(&layers[layer][0], inter, hidden),
        up: view(&layers[layer][1], inter, hidden),
        down_t: view(&layers[layer][2], inter, hidden),
    };
    let mut a = vec![0.0f32; inter];
    kernels_cpu::gemv::gemv(&cpu, view(&layers[0][0], inter, hidden), &x, &mut a)?;
    let a: Vec<f32> = a.iter().map(|&g| sparse::silu_f32(g)).collect();
    let mut scratch = MlpScratch::new();
    let mut mlp_time = |t: f32| {
        let mut y = vec![0.0f32; hidden];
        median_time(61, || {
            k += 1;
            kernels_cpu::mlp::cats_mlp(
                &cpu,
                xm,
                weights(k % layers.len()),
                t,
                MatMut::from_slice(&mut y, 1, hidden).expect("shape"),
                &mut scratch,
            )
            .expect("mlp");
        })
    };
    let dense_mlp = mlp_time(-1.0);
    report(
        "dense MLP (CATS at t < 0), 3 matrices",
        3 * layer_bytes,
        dense_mlp,
    );
    for s in [0.5, 0.7] {
        let t = sparse::calibrate_threshold_ref(&[&a], s)?;
        let time = mlp_time(t);
        println!(
            "  CATS MLP s={s}: {:.1} us, {:.2}x the dense MLP (ideal {:.2}x)",
            time.as_secs_f64() * 1e6,
            dense_mlp.as_secs_f64() / time.as_secs_f64(),
            sparse::ideal_mlp_speedup(s)?
        );
    }
    let mut y_ref = vec![0.0f32; hidden];
    let mut y_cpu = vec![0.0f32; hidden];
    sparse::cats_mlp_ref(
        xm,
        weights(0),
        -1.0,
        MatMut::from_slice(&mut y_ref, 1, hidden)?,
    )?;
    kernels_cpu::mlp::cats_mlp(
        &cpu,
        xm,
        weights(0),
        -1.0,
        MatMut::from_slice(&mut y_cpu, 1, hidden)?,
        &mut MlpScratch::new(),
    )?;
    checks.check(
        "CATS MLP agrees with the reference (f32 tolerance)",
        relative_distance(&y_cpu, &y_ref) < 1e-5,
    );

    let samples = normal::<f32>(1 << 20, 1.0, 92);
    checks.check(
        "threaded calibration equals the reference quantile bit for bit",
        kernels_cpu::calibrate::calibrate_threshold(&cpu, &[&samples], 0.6)?
            == sparse::calibrate_threshold_ref(&[&samples], 0.6)?,
    );

    let x = normal::<f32>(64 << 20, 1.0, 70);
    let expect = merge::sum_squares_ref(&x);
    let got = sum_squares(&cpu, &x)?;
    let time = median_time(5, || {
        std::hint::black_box(sum_squares(&cpu, &x).ok());
    });
    report("sum_squares f32 256 MiB (1 thread)", x.len() * 4, time);
    checks.check(
        "sum_squares agrees with the reference",
        (got - expect).abs() <= kernels_cpu::merge::SUM_SQUARES_RELATIVE_TOLERANCE * expect,
    );
    compression_kernels(checks, &cpu, &report)?;
    linear_algebra_kernels(checks, &cpu)
}

/// The linear-algebra kernels of `kernels-cpu` on task-vector-sized blocks, each checked against
/// its `f64` reference (or the optimal error) and timed in GFLOP/s.
fn linear_algebra_kernels(checks: &mut Checks, cpu: &Cpu) -> Result<()> {
    use kernels_cpu::linalg;
    let gflops = |what: &str, flops: f64, time: std::time::Duration| {
        println!(
            "  {what:<46} {:>8.1} ms {:6.1} GFLOP/s",
            time.as_secs_f64() * 1e3,
            flops / time.as_secs_f64() / 1e9
        );
    };
    let random = |m: usize, n: usize, seed| Mat::from_vec(normal::<f32>(m * n, 1.0, seed), m, n);
    let (m, n) = (2048, 256);
    let a = random(m, n, 80)?;
    let tolerance = linalg::factorisation_tolerance(m, n);
    let qr = linalg::householder_qr(cpu, a.as_ref())?;
    let q64 = Mat::widen(qr.q.as_ref());
    let a64 = Mat::widen(a.as_ref());
    checks.check(
        "blocked Householder QR reconstructs A, Q orthonormal",
        q64.matmul(&Mat::widen(qr.r.as_ref()))
            .unwrap()
            .distance(&a64)
            .unwrap()
            <= tolerance * a64.frobenius_norm()
            && q64.orthogonality_error().unwrap() <= tolerance * (n as f64).sqrt(),
    );
    let time = median_time(5, || {
        std::hint::black_box(linalg::householder_qr(cpu, a.as_ref()).ok());
    });
    gflops(
        "Householder QR 2048x256 (with Q)",
        4.0 * (m * n * n) as f64,
        time,
    );

    let x = random(m, 4096, 81)?;
    let q = qr.q.leading_cols(32);
    let mut got = Mat::<f32>::zeros(m, 4096).unwrap();
    let mut expect = Mat::<f32>::zeros(m, 4096).unwrap();
    linalg::project_out(cpu, q.as_ref(), x.as_ref(), got.as_mut())?;
    project::project_out_ref(q.as_ref(), x.as_ref(), expect.as_mut())?;
    checks.check(
        "fused X - Q(Q^T X) agrees with the reference",
        relative_distance(got.as_slice(), expect.as_slice()) <= tolerance,
    );
    let time = median_time(5, || {
        std::hint::black_box(linalg::project_out(cpu, q.as_ref(), x.as_ref(), got.as_mut()).ok());
    });
    gflops(
        "project out of r = 32, 2048x4096",
        4.0 * (m * 4096 * 32) as f64,
        time,
    );

    let block = random(512, 256, 82)?;
    let svd = linalg::thin_svd(cpu, block.as_ref())?;
    let reference = lowrank::thin_svd_ref(block.as_ref())?;
    let worst = svd
        .s
        .iter()
        .zip(&reference.s)
        .map(|(g, e)| (f64::from(*g) - e).abs())
        .fold(0.0, f64::max);
    checks.check(
        "Jacobi thin SVD: singular values agree with the reference",
        worst <= linalg::factorisation_tolerance(512, 256) * reference.s[0],
    );
    let time = median_time(3, || {
        std::hint::black_box(linalg::thin_svd(cpu, block.as_ref()).ok());
    });
    gflops(
        "thin SVD 512x256",
        6.0 * 512.0 * 256.0 * 256.0 + 20.0 * 256f64.powi(3),
        time,
    );

    let rank = 32;
    let exact = lowrank::thin_svd_ref(a.as_ref())?;
    let rsvd = linalg::randomized_svd(cpu, a.as_ref(), lowrank::RsvdParams::new(rank))?;
    let us = Mat::from_fn(m, rank, |i, j| f64::from(rsvd.u.at(i, j) * rsvd.s[j])).unwrap();
    let error = us
        .matmul(&Mat::widen(rsvd.v.as_ref()).transpose())
        .unwrap()
        .distance(&a64)
        .unwrap();
    let optimal = exact.s[rank..].iter().map(|s| s * s).sum::<f64>().sqrt();
    println!(
        "  randomized rank-32 SVD of 2048x256: error / optimal = {:.4}",
        error / optimal
    );
    checks.check(
        "randomized SVD within 1.1x of optimal",
        error <= 1.1 * optimal,
    );

    let square = random(1024, 1024, 83)?;
    let lu = linalg::lu(cpu, square.as_ref())?;
    let permuted = Mat::from_fn(1024, 1024, |i, j| f64::from(square.at(lu.perm[i], j))).unwrap();
    checks.check(
        "blocked LU: P A = L U",
        Mat::widen(lu.l.as_ref())
            .matmul(&Mat::widen(lu.u.as_ref()))
            .unwrap()
            .distance(&permuted)
            .unwrap()
            <= 32.0 * linalg::factorisation_tolerance(1024, 1024) * permuted.frobenius_norm(),
    );
    let time = median_time(5, || {
        std::hint::black_box(linalg::lu(cpu, square.as_ref()).ok());
    });
    gflops("LU 1024x1024", 2.0 / 3.0 * 1024f64.powi(3), time);
    Ok(())
}

/// Selection, ComPEFT, masks and merges of `kernels-cpu` on a 16M-entry task vector (64 MiB),
/// each checked against its reference and timed.
fn compression_kernels(
    checks: &mut Checks,
    cpu: &Cpu,
    report: &dyn Fn(&str, usize, std::time::Duration),
) -> Result<()> {
    let n = 16 << 20;
    let tau = heavy_tailed(n, 1e-3, 71);
    let other = heavy_tailed(n, 1e-3, 72);
    let keep = select::KeepRule::Count((n / 10) as u64);

    let cut = kernels_cpu::select::topk_cut(cpu, &[&tau[..]], keep)?;
    let streamed =
        select::StreamingTopK::new(keep)?.run(|| [&tau[..]], select::StreamingTopK::feed)?;
    checks.check(
        "radix top-k cut equals the streaming reference",
        cut == streamed,
    );
    let time = median_time(5, || {
        std::hint::black_box(kernels_cpu::select::topk_cut(cpu, &[&tau[..]], keep).ok());
    });
    report("top-10% cut of 16M f32 (bytes read once)", n * 4, time);

    let params = ternary::CompeftParams::default();
    let shape = [n as u64];
    let (decided, packed) = kernels_cpu::compress::compeft(
        cpu,
        &[(&tau[..], &shape[..])],
        params,
        TernaryLayout::SparseRice,
    )?;
    let (reference, codes) = ternary::compeft_ref(&[&tau[..]], params)?;
    let scale = reference.scale;
    let expect = format::encode(&codes[0], &shape, decided.scale, TernaryLayout::SparseRice)?;
    checks.check(
        "fast ComPEFT packs the reference's codes byte for byte",
        packed[0] == expect
            && f64::from((decided.scale - scale).abs())
                <= kernels_cpu::compress::SCALE_RELATIVE_TOLERANCE * f64::from(scale),
    );
    let time = median_time(5, || {
        std::hint::black_box(
            kernels_cpu::compress::compeft(
                cpu,
                &[(&tau[..], &shape[..])],
                params,
                TernaryLayout::Dense2Bit,
            )
            .ok(),
        );
    });
    report(
        "ComPEFT 16M f32 -> dense 2-bit (bytes read once)",
        n * 4,
        time,
    );

    let dare = merge::DareParams::new(0.9, 5);
    let (mut got, mut expect) = (vec![0.0f32; n], vec![0.0f32; n]);
    kernels_cpu::masks::dare(cpu, &tau, dare, 0, &mut got)?;
    merge::dare_ref(&tau, dare, 0, &mut expect)?;
    checks.check(
        "DARE mask and values equal the reference bit for bit",
        got == expect,
    );
    let time = median_time(5, || {
        kernels_cpu::masks::dare(cpu, &tau, dare, 0, &mut got).ok();
    });
    report("DARE p = 0.9, 16M f32 (read + write)", n * 8, time);

    let views = [&tau[..], &other[..]];
    kernels_cpu::merge::ties_elect(cpu, &other, &views, &[1.0, 1.0], 1.0, &mut got)?;
    merge::ties_elect_ref(&other, &views, &[1.0, 1.0], 1.0, &mut expect)?;
    // The elected signs are the reference's; the means round in f32 (the mean is at most the
    // larger entry).
    let within = got.iter().zip(&expect).enumerate().all(|(j, (&g, &e))| {
        let largest = f64::from(tau[j].abs().max(other[j].abs()));
        let scale = f64::from(other[j].abs()) + largest;
        (f64::from(g) - f64::from(e)).abs() <= kernels_cpu::merge::ties_tolerance(2, scale)
    });
    checks.check(
        "TIES election elects the reference's signs, values within ties_tolerance",
        within,
    );
    let time = median_time(5, || {
        kernels_cpu::merge::ties_elect(cpu, &other, &views, &[1.0, 1.0], 1.0, &mut got).ok();
    });
    report("TIES election, N = 2, 16M f32", n * 16, time);
    Ok(())
}

/// The GPU kernels on the same layer, against the reference, on whatever adapter the machine has
/// (Mesa's lavapipe counts); skipped, saying how to get one, where there is none.
fn gpu_kernels(checks: &mut Checks, hidden: usize, inter: usize) -> Result<()> {
    use kernels_wgpu::{Context, ContextOptions, GpuTensor, block_on};
    println!("\nGPU kernels (kernels-wgpu)");
    let ctx = match Context::new_blocking(ContextOptions::default()) {
        Ok(ctx) => ctx,
        Err(e @ kernels_core::Error::Unsupported { .. }) => {
            println!("  skipped: {e}");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let info = ctx.adapter_info();
    println!(
        "  adapter: {} ({:?}, {:?}), features {:?}",
        info.name,
        info.backend,
        info.device_type,
        ctx.features()
    );

    // Sparse-input GEMV over W_down_t (bf16) at the threshold that skips half the inputs.
    let w_down_t: Vec<bf16> = normal(inter * hidden, 0.02, 71);
    let h: Vec<f32> = heavy_tailed(inter, 1.0, 72);
    let mut magnitudes: Vec<f32> = h.iter().map(|v| v.abs()).collect();
    magnitudes.sort_by(f32::total_cmp);
    let t = magnitudes[inter / 2];
    let w_ref = MatRef::from_slice(&w_down_t, inter, hidden)?;
    let mut y_ref = vec![0.0; hidden];
    sparse::sparse_input_gemv_ref(w_ref, &h, t, &mut y_ref)?;
    let w = GpuTensor::from_matrix(&ctx, w_ref)?;
    let x = GpuTensor::from_slice(&ctx, &h)?;
    let mut y = GpuTensor::<f32>::zeros(&ctx, hidden, 1)?;
    kernels_wgpu::gemv::sparse_input_gemv(&ctx, &w, &x, t, &mut y)?;
    let y = y.to_vec_blocking(&ctx)?;
    let worst = y
        .iter()
        .zip(&y_ref)
        .enumerate()
        .map(|(j, (g, e))| {
            let scale: f64 = h
                .iter()
                .enumerate()
                .filter(|(_, v)| !(v.abs() <= t))
                .map(|(i, v)| (f64::from(*v) * f64::from(w_ref.row(i)[j].to_f32())).abs())
                .sum();
            (f64::from(*g) - f64::from(*e)).abs() / kernels_wgpu::gemv::gemv_tolerance(inter, scale)
        })
        .fold(0.0f64, f64::max);
    checks.check(
        &format!("GPU sparse-input GEMV {inter}x{hidden} at s = 0.5 within its tolerance (worst {worst:.3} of it)"),
        worst <= 1.0,
    );

    // ComPEFT of the same tensor: the same bytes as the reference's codes.
    let params = ternary::CompeftParams::default();
    let (reference, codes) = ternary::compeft_ref(&[&w_down_t[..]], params)?;
    let scale_ref = reference.scale;
    let shape = [inter as u64, hidden as u64];
    let (decided, packed) = block_on(kernels_wgpu::compress::compeft(
        &ctx,
        &[(&w, &shape[..])],
        params,
        TernaryLayout::SparseRice,
    ))?;
    let scale = decided.scale;
    let expect = format::encode(&codes[0], &shape, scale, TernaryLayout::SparseRice)?;
    checks.check(
        &format!(
            "GPU ComPEFT (d = 0.1, {:.2} bit/param) writes the reference's bytes, scale within {:.1e}",
            packed[0].len() as f64 * 8.0 / (inter * hidden) as f64,
            kernels_wgpu::compress::SCALE_RELATIVE_TOLERANCE
        ),
        packed[0] == expect
            && f64::from((scale - scale_ref).abs())
                <= kernels_wgpu::compress::SCALE_RELATIVE_TOLERANCE * f64::from(scale_ref),
    );

    // DARE: the CPU's mask, bit for bit.
    let dare = merge::DareParams::new(0.9, 5);
    let mut kept_ref = vec![0.0; inter * hidden];
    merge::dare_ref(&w_down_t, dare, 0, &mut kept_ref)?;
    let mut kept = GpuTensor::<f32>::zeros(&ctx, inter, hidden)?;
    block_on(kernels_wgpu::masks::dare(&ctx, &w, dare, 0, &mut kept))?;
    let kept = kept.to_vec_blocking(&ctx)?;
    checks.check(
        "GPU DARE (p = 0.9) keeps exactly the reference's entries",
        kept.iter()
            .zip(&kept_ref)
            .all(|(g, e)| (*g == 0.0) == (*e == 0.0)),
    );
    Ok(())
}
