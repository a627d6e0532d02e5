//! Every GPU kernel family at real model sizes, with the device's copy bandwidth measured in the
//! same run as the reference: GEMV (dense, sparse-input at s = 0.5, gathered), the CATS MLP,
//! ternary GEMV, merge reductions (mean, Fisher, TIES under both election rules), linear
//! combinations, Gram matrices and SLERP, DARE, top-k selection, Breadcrumbs and ComPEFT; and the
//! linear algebra (`gpu_linalg`: GEMM, projection, QR, randomized SVD in GFLOP/s beside the CPU's).
//!
//! GB/s count the bytes each kernel must touch once (weights and inputs read, outputs written);
//! the copy reads and writes its buffer, so its figure counts both. A timed iteration submits the
//! op and waits for the device to finish it, so small sizes include the submission latency.
//!
//! Runs on the adapter `Context` picks (set `KERNELS_WGPU_ADAPTER` to choose); without one it
//! prints why and measures nothing. On Mesa's lavapipe (a CPU) the figures are not GPU
//! performance figures.
//!
//! Run: `cargo bench -p kernels-benches --bench gpu && python3 benches/medians.py gpu`

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::f16;
use kernels_benches::{normal, threshold_for_sparsity};
use kernels_wgpu::prelude::*;

/// Llama-2-7B's MLP projection: 11008 x 4096.
const ROWS: usize = 11008;
const COLS: usize = 4096;
/// Element-wise families: 2^25 entries (128 MiB as f32).
const N: usize = 1 << 25;

/// Times `iters` runs of `op`, waiting for the device after the last.
fn time(ctx: &Context, iters: u64, mut op: impl FnMut()) -> Duration {
    block_on(ctx.finish()).expect("idle");
    let start = Instant::now();
    for _ in 0..iters {
        op();
    }
    block_on(ctx.finish()).expect("finish");
    start.elapsed()
}

fn bench_gpu(c: &mut Criterion) {
    let ctx = match Context::new_blocking(ContextOptions::default()) {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("gpu benches skipped: {e}");
            return;
        }
    };
    let info = ctx.adapter_info();
    let device = format!("{} ({:?})", info.name, info.backend);
    eprintln!("gpu benches on {device}, features {:?}", ctx.features());
    let mut group = c.benchmark_group("gpu");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));

    // The reference: a device-to-device copy of 128 MiB.
    let source = GpuTensor::<f32>::zeros(&ctx, N, 1).expect("source");
    let mut target = GpuTensor::<f32>::zeros(&ctx, N, 1).expect("target");
    group.throughput(Throughput::Bytes((2 * N * 4) as u64));
    group.bench_function(BenchmarkId::new("device_copy", N), |b| {
        b.iter_custom(|iters| {
            time(&ctx, iters, || {
                target.copy_from(&ctx, &source).expect("copy");
            })
        });
    });

    // GEMV: W [ROWS, COLS] f16; x and the sparse threshold at s = 0.5.
    let w_host: Vec<f16> = normal(ROWS * COLS, 0.02, 1);
    let w = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&w_host, ROWS, COLS).expect("w"))
        .expect("upload w");
    let w_t = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&w_host, ROWS, COLS).expect("w"))
        .expect("upload w_t");
    drop(w_host);
    let x_cols = GpuTensor::from_slice(&ctx, &normal::<f32>(COLS, 1.0, 2)).expect("x");
    let x_rows_host: Vec<f32> = normal(ROWS, 1.0, 3);
    let threshold = threshold_for_sparsity(&x_rows_host, 0.5);
    let x_rows = GpuTensor::from_slice(&ctx, &x_rows_host).expect("x");
    let mut y_rows = GpuTensor::<f32>::zeros(&ctx, ROWS, 1).expect("y");
    let mut y_cols = GpuTensor::<f32>::zeros(&ctx, COLS, 1).expect("y");
    let weights = (ROWS * COLS * 2) as u64;
    group.throughput(Throughput::Bytes(weights));
    group.bench_function(
        BenchmarkId::new("gemv_f16", format!("{ROWS}x{COLS}")),
        |b| {
            b.iter_custom(|iters| {
                time(&ctx, iters, || {
                    gemv(&ctx, &w, &x_cols, &mut y_rows).expect("gemv");
                })
            });
        },
    );
    group.bench_function(
        BenchmarkId::new("gemv_t_f16_dense", format!("{ROWS}x{COLS}")),
        |b| {
            b.iter_custom(|iters| {
                time(&ctx, iters, || {
                    sparse_input_gemv(&ctx, &w_t, &x_rows, 0.0, &mut y_cols).expect("dense");
                })
            });
        },
    );
    // Half the rows are read: the bytes touched are half the weights.
    group.throughput(Throughput::Bytes(weights / 2));
    group.bench_function(
        BenchmarkId::new("sparse_gemv_f16_s0.5", format!("{ROWS}x{COLS}")),
        |b| {
            b.iter_custom(|iters| {
                time(&ctx, iters, || {
                    sparse_input_gemv(&ctx, &w_t, &x_rows, threshold, &mut y_cols).expect("sparse");
                })
            });
        },
    );
    let picks: Vec<u32> = (0..ROWS as u32).step_by(2).collect();
    let mut gathered = GpuTensor::<f32>::zeros(&ctx, picks.len(), 1).expect("out");
    group.bench_function(
        BenchmarkId::new("gathered_gemv_f16_half", format!("{ROWS}x{COLS}")),
        |b| {
            b.iter_custom(|iters| {
                time(&ctx, iters, || {
                    gathered_gemv(&ctx, &w, &x_cols, &picks, &mut gathered).expect("gathered");
                })
            });
        },
    );
    drop((w, w_t));

    // The CATS MLP of one Llama-2-7B layer (f16), threshold at s = 0.5 of the gate activations:
    // the gate is read whole, half the rows of up and down.
    let mlp_weights: Vec<GpuTensor<f16>> = (0..3)
        .map(|k| {
            let host: Vec<f16> = normal(ROWS * COLS, 0.02, 20 + k);
            GpuTensor::from_matrix(&ctx, MatRef::from_slice(&host, ROWS, COLS).expect("w"))
                .expect("upload")
        })
        .collect();
    let x_batch = GpuTensor::from_matrix(
        &ctx,
        MatRef::from_slice(&normal::<f32>(COLS, 1.0, 4), 1, COLS).expect("x"),
    )
    .expect("x");
    let mut y_batch = GpuTensor::<f32>::zeros(&ctx, 1, COLS).expect("y");
    let cats = CatsMlpWeights {
        gate: &mlp_weights[0],
        up: &mlp_weights[1],
        down_t: &mlp_weights[2],
    };
    let mut gate_out = GpuTensor::<f32>::zeros(&ctx, ROWS, 1).expect("g");
    gemv(&ctx, cats.gate, &x_cols, &mut gate_out).expect("gate");
    let silu: Vec<f32> = gate_out
        .to_vec_blocking(&ctx)
        .expect("g")
        .iter()
        .map(|&g| g / (1.0 + (-g).exp()))
        .collect();
    let cats_threshold = threshold_for_sparsity(&silu, 0.5);
    group.throughput(Throughput::Bytes(weights * 2));
    // One scratch for every token, and no read-back inside the timed loop (a decode loop's).
    let mut scratch = MlpScratch::new();
    group.bench_function(
        BenchmarkId::new("cats_mlp_f16_s0.5", format!("{ROWS}x{COLS}")),
        |b| {
            b.iter_custom(|iters| {
                time(&ctx, iters, || {
                    cats_mlp(
                        &ctx,
                        &x_batch,
                        cats,
                        cats_threshold,
                        &mut y_batch,
                        &mut scratch,
                    )
                    .expect("cats");
                })
            });
        },
    );
    drop(mlp_weights);

    // Ternary GEMV from 2-bit codes.
    let codes: Vec<i8> = (0..ROWS * COLS)
        .map(|i| [0i8, 1, 0, -1][(i * 7) % 4])
        .collect();
    let packed = kernels_wgpu::format::encode(
        &codes,
        &[ROWS as u64, COLS as u64],
        0.01,
        TernaryLayout::Dense2Bit,
    )
    .expect("encode");
    drop(codes);
    let ternary = GpuTernary::upload(&ctx, &packed).expect("upload codes");
    group.throughput(Throughput::Bytes((ROWS * COLS / 4) as u64));
    group.bench_function(
        BenchmarkId::new("ternary_gemv", format!("{ROWS}x{COLS}")),
        |b| {
            b.iter_custom(|iters| {
                time(&ctx, iters, || {
                    ternary_gemv(&ctx, &ternary, &x_cols, &mut y_rows).expect("tgemv");
                })
            });
        },
    );

    // Element-wise: four f16 models into an f32 mean; DARE; top-k; ComPEFT.
    let models: Vec<GpuTensor<f16>> = (0..4)
        .map(|k| GpuTensor::from_slice(&ctx, &normal::<f16>(N, 0.01, 10 + k)).expect("model"))
        .collect();
    let views: Vec<&GpuTensor<f16>> = models.iter().collect();
    let mut out = GpuTensor::<f32>::zeros(&ctx, N, 1).expect("out");
    group.throughput(Throughput::Bytes((N * (4 * 2 + 4)) as u64));
    group.bench_function(BenchmarkId::new("weighted_mean_f16_models4", N), |b| {
        b.iter_custom(|iters| {
            time(&ctx, iters, || {
                weighted_mean(&ctx, &views, &[1.0; 4], &mut out).expect("mean");
            })
        });
    });
    let fishers: Vec<GpuTensor<f32>> = (0..2)
        .map(|k| GpuTensor::from_slice(&ctx, &normal::<f32>(N, 1.0, 30 + k)).expect("fisher"))
        .collect();
    let fisher_views: Vec<&GpuTensor<f32>> = fishers.iter().collect();
    group.throughput(Throughput::Bytes((N * (2 * (2 + 4) + 4)) as u64));
    group.bench_function(BenchmarkId::new("fisher_merge_f16_models2", N), |b| {
        b.iter_custom(|iters| {
            time(&ctx, iters, || {
                let params = FisherParams::default();
                fisher_merge(
                    &ctx,
                    &views[..2],
                    &fisher_views,
                    &[1.0; 2],
                    params,
                    &mut out,
                )
                .expect("fisher");
            })
        });
    });
    drop(fishers);
    group.throughput(Throughput::Bytes((N * (5 * 2 + 4)) as u64));
    group.bench_function(BenchmarkId::new("ties_elect_f16_models4", N), |b| {
        b.iter_custom(|iters| {
            time(&ctx, iters, || {
                ties_elect(&ctx, views[0], &views, &[1.0; 4], 1.0, &mut out).expect("ties");
            })
        });
    });
    group.bench_function(
        BenchmarkId::new("ties_elect_with_mergekit_f16_models4", N),
        |b| {
            let mergekit = TiesElection::default()
                .with_zero_sum_elects_positive(true)
                .with_normalize(false);
            b.iter_custom(|iters| {
                time(&ctx, iters, || {
                    ties_elect_with(&ctx, views[0], &views, &[1.0; 4], 1.0, mergekit, &mut out)
                        .expect("ties");
                })
            });
        },
    );
    group.throughput(Throughput::Bytes((N * (3 * 2 + 4)) as u64));
    group.bench_function(BenchmarkId::new("linear_combination_f16_models3", N), |b| {
        b.iter_custom(|iters| {
            time(&ctx, iters, || {
                linear_combination(&ctx, &views[..3], &[0.5, -0.25, 0.75], &mut out)
                    .expect("linear");
            })
        });
    });
    // The Gram matrix of 3 centred models reads 3 tensors per pair (6 pairs); GB/s count the
    // 4 tensors once, as a one-pass kernel would.
    group.throughput(Throughput::Bytes((N * 4 * 2) as u64));
    group.bench_function(BenchmarkId::new("gram_f16_models3_centred", N), |b| {
        let mut g = [0.0f64; 9];
        b.iter_custom(|iters| {
            time(&ctx, iters, || {
                block_on(gram(&ctx, &views[1..], Some(views[0]), &mut g)).expect("gram");
            })
        });
    });
    group.throughput(Throughput::Bytes((N * (2 * 2 + 4)) as u64));
    group.bench_function(BenchmarkId::new("slerp_f16", N), |b| {
        b.iter_custom(|iters| {
            time(&ctx, iters, || {
                block_on(slerp(&ctx, views[0], views[1], 0.3, &mut out)).expect("slerp");
            })
        });
    });
    group.throughput(Throughput::Bytes((N * (2 + 4)) as u64));
    group.bench_function(BenchmarkId::new("dare_f16_p0.9", N), |b| {
        b.iter_custom(|iters| {
            time(&ctx, iters, || {
                let params = DareParams::default().with_drop(0.9).with_seed(7);
                block_on(dare(&ctx, views[0], params, 0, &mut out)).expect("dare");
            })
        });
    });
    // Selection reads its input once per radix digit (three passes); GB/s count one.
    group.throughput(Throughput::Bytes((N * 2) as u64));
    group.bench_function(BenchmarkId::new("topk_cut_f16_d0.1", N), |b| {
        b.iter_custom(|iters| {
            time(&ctx, iters, || {
                block_on(topk_cut(&ctx, &views[..1], KeepRule::Density(0.1))).expect("topk");
            })
        });
    });
    // Breadcrumbs selects twice and applies both cuts in one pass; GB/s count one read.
    group.bench_function(BenchmarkId::new("breadcrumbs_f16_d0.9", N), |b| {
        b.iter_custom(|iters| {
            time(&ctx, iters, || {
                block_on(breadcrumbs(
                    &ctx,
                    views[0],
                    BreadcrumbsParams::default(),
                    &mut out,
                ))
                .expect("breadcrumbs");
            })
        });
    });
    let shape = [N as u64];
    group.bench_function(BenchmarkId::new("compeft_f16_d0.1", N), |b| {
        b.iter_custom(|iters| {
            time(&ctx, iters, || {
                block_on(compeft(
                    &ctx,
                    &[(views[0], &shape[..])],
                    CompeftParams::default(),
                    TernaryLayout::Dense2Bit,
                ))
                .expect("compeft");
            })
        });
    });
    group.finish();
}

/// GFLOP/s of the GPU's linear algebra at the shapes OPCM and LoRA extraction use (Llama-2-7B's
/// 4096 x 11008 projections, rank 64), beside the CPU's GEMM (faer, all threads) on the same
/// products in the same run: the best GEMM this machine has without a GPU. Throughput counts
/// floating-point operations as elements (`medians.py` prints them as G elements/s = GFLOP/s).
fn bench_gpu_linalg(c: &mut Criterion) {
    use kernels_cpu::Cpu;
    use kernels_cpu::linalg as cpu_linalg;
    let Ok(ctx) = Context::new_blocking(ContextOptions::default()) else {
        return;
    };
    let cpu = Cpu::detect();
    let mut group = c.benchmark_group("gpu_linalg");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(3));
    let (m, n, r) = (4096, 11008, 64);
    let square = 2048;

    // Square GEMM, GPU and CPU.
    let a_host: Vec<f32> = normal(square * square, 1.0, 11);
    let a_view = MatRef::from_slice(&a_host, square, square).expect("a");
    let a = GpuTensor::from_matrix(&ctx, a_view).expect("a");
    let mut c_gpu = GpuTensor::<f32>::zeros(&ctx, square, square).expect("c");
    let mut c_host = vec![0.0f32; square * square];
    group.throughput(Throughput::Elements((2 * square * square * square) as u64));
    group.bench_function(BenchmarkId::new("gemm_f32", square), |b| {
        b.iter_custom(|iters| {
            time(&ctx, iters, || {
                gemm(
                    &ctx,
                    1.0,
                    &a,
                    Transpose::No,
                    &a,
                    Transpose::No,
                    0.0,
                    &mut c_gpu,
                )
                .expect("gemm");
            })
        });
    });
    group.bench_function(BenchmarkId::new("cpu_gemm_f32", square), |b| {
        b.iter(|| {
            let out = MatMut::from_slice(&mut c_host, square, square).expect("c");
            cpu_linalg::gemm(
                &cpu,
                1.0,
                a_view,
                Transpose::No,
                a_view,
                Transpose::No,
                0.0,
                out,
            )
            .expect("gemm");
        });
    });
    drop((a, c_gpu, c_host, a_host));

    // The projections' shapes: Q (m x r, orthonormal), X (m x n).
    let q_host = cpu_linalg::householder_qr(
        &cpu,
        MatRef::from_slice(&normal::<f32>(m * r, 1.0, 12), m, r).expect("q"),
    )
    .expect("qr")
    .q;
    let x_host: Vec<f32> = normal(m * n, 0.02, 13);
    let x_view = MatRef::from_slice(&x_host, m, n).expect("x");
    let q = GpuTensor::from_matrix(&ctx, q_host.as_ref()).expect("q");
    let x = GpuTensor::from_matrix(&ctx, x_view).expect("x");
    let mut coefficients = GpuTensor::<f32>::zeros(&ctx, r, n).expect("q^t x");
    let mut coefficients_host = vec![0.0f32; r * n];
    group.throughput(Throughput::Elements((2 * m * n * r) as u64));
    group.bench_function(
        BenchmarkId::new("gemm_qt_x_f32", format!("{m}x{n}_r{r}")),
        |b| {
            b.iter_custom(|iters| {
                time(&ctx, iters, || {
                    gemm(
                        &ctx,
                        1.0,
                        &q,
                        Transpose::Yes,
                        &x,
                        Transpose::No,
                        0.0,
                        &mut coefficients,
                    )
                    .expect("gemm");
                })
            });
        },
    );
    group.bench_function(
        BenchmarkId::new("cpu_gemm_qt_x_f32", format!("{m}x{n}_r{r}")),
        |b| {
            b.iter(|| {
                let out = MatMut::from_slice(&mut coefficients_host, r, n).expect("c");
                cpu_linalg::gemm(
                    &cpu,
                    1.0,
                    q_host.as_ref(),
                    Transpose::Yes,
                    x_view,
                    Transpose::No,
                    0.0,
                    out,
                )
                .expect("gemm");
            });
        },
    );
    let mut out = GpuTensor::<f32>::zeros(&ctx, m, n).expect("out");
    group.throughput(Throughput::Elements((4 * m * n * r) as u64));
    group.bench_function(
        BenchmarkId::new("project_out_f32", format!("{m}x{n}_r{r}")),
        |b| {
            b.iter_custom(|iters| {
                time(&ctx, iters, || {
                    project_out(&ctx, &q, &x, &mut out).expect("project_out");
                })
            });
        },
    );
    drop((coefficients, out, coefficients_host));

    // Householder QR of a tall block: 4 m r^2 - 4 r^3 / 3 operations (factor and form Q).
    group.throughput(Throughput::Elements(
        (4 * m * r * r - 4 * r * r * r / 3) as u64,
    ));
    group.bench_function(
        BenchmarkId::new("householder_qr_f32", format!("{m}x{r}")),
        |b| {
            b.iter_custom(|iters| {
                time(&ctx, iters, || {
                    block_on(householder_qr(&ctx, &q)).expect("qr");
                })
            });
        },
    );

    // The randomized SVD at rank 64 with the default oversampling and power iterations: its GEMMs
    // are 2 (q + 1) products with A of 2 m n p operations each, plus U = Q U_B.
    let params = RsvdParams::new(r);
    let probes = r + params.oversample;
    group.throughput(Throughput::Elements(
        (2 * (params.power_iterations + 1) * 2 * m * n * probes + 2 * m * probes * r) as u64,
    ));
    group.bench_function(
        BenchmarkId::new("randomized_svd_f32", format!("{m}x{n}_r{r}")),
        |b| {
            b.iter_custom(|iters| {
                time(&ctx, iters, || {
                    block_on(randomized_svd(&ctx, &x, params)).expect("rsvd");
                })
            });
        },
    );
    group.bench_function(
        BenchmarkId::new("cpu_randomized_svd_f32", format!("{m}x{n}_r{r}")),
        |b| {
            b.iter(|| cpu_linalg::randomized_svd(&cpu, x_view, params).expect("rsvd"));
        },
    );
    group.finish();
}

criterion_group!(benches, bench_gpu, bench_gpu_linalg);
criterion_main!(benches);
