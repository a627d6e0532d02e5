//! The linear-algebra kernels side by side with faer doing the same work through its own
//! routines, each with its GFLOP/s and its accuracy, and GEMM (ours through faer, and the
//! portable kernel) as the machine's FLOP reference.
//!
//! | bench | ours | faer |
//! |---|---|---|
//! | `qr/4096x256`, `qr/{4096,11008}x16/{1,2}t` | `householder_qr`, `cgs2` | `qr()` + `compute_thin_Q()` (same thread count) |
//! | `project_out`, `project_onto` `/4096x11008/r{16,64,256}/{1,2}t` | streaming (r <= 64) or GEMM panels, out of place and in place | two `matmul`s in place (`Accum::Add`), and out of place with a copy |
//! | `thin_svd/{1024x1024,4096x512}` | `thin_svd` | `thin_svd()` |
//! | `rsvd/{4096x4096,4096x11008}/r64`, `rsvd/4096x11008/r64/q64`, `rsvd/4096x11008/r16/1t` | `randomized_svd` (q = 2r but where the id says q, 2 power iterations) | the same algorithm (probes drawn inside the timing too) from `matmul`, `qr()` and `thin_svd()` |
//! | `exact_svd/{4096x4096,4096x11008}` | - | `thin_svd()` of the same matrices |
//! | `lu/2048x2048` | `lu` | `partial_piv_lu()` |
//! | `gemm/2048` | `gemm` (faer, portable) | - |
//!
//! Accuracy and FLOP counts are computed once, outside the timings, and written to
//! `target/criterion/linalg-notes/`, which `benches/linalg_report.py` joins with the
//! medians. Projections read fresh copies of `X` in turn (3 x 180 MB, beyond the L3 cache).
//!
//! Run: `cargo bench -p kernels-benches --bench linalg && python3 benches/linalg_report.py`

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use faer::{Accum, Par};
use kernels_benches::{bench_stream_read, normal};
use kernels_core::{CounterRng, Mat};
use kernels_cpu::Cpu;
use kernels_cpu::linalg::{self, GemmBackend, RsvdParams, Transpose};

/// Rank of the randomized SVDs.
const RSVD_RANK: usize = 64;

fn random(m: usize, n: usize, seed: u64) -> Mat<f32> {
    Mat::from_vec(normal::<f32>(m * n, 1.0, seed), m, n).expect("shape")
}

fn view(a: &Mat<f32>) -> faer::MatRef<'_, f32> {
    faer::MatRef::from_row_major_slice(a.as_slice(), a.rows(), a.cols())
}

fn to_f64(a: faer::MatRef<'_, f32>) -> faer::Mat<f64> {
    faer::Mat::from_fn(a.nrows(), a.ncols(), |i, j| f64::from(a[(i, j)]))
}

fn par(cpu: &Cpu) -> Par {
    Par::rayon(cpu.threads())
}

/// `x^T y` and `x y` in f64 through faer.
fn mul(a: faer::MatRef<'_, f64>, b: faer::MatRef<'_, f64>) -> faer::Mat<f64> {
    let mut c = faer::Mat::zeros(a.nrows(), b.ncols());
    faer::linalg::matmul::matmul(c.as_mut(), Accum::Replace, a, b, 1.0, Par::rayon(0));
    c
}

/// `||Q^T Q - I||_2` in f64: the orthogonality measure of the accuracy contract.
fn orthogonality(q: faer::MatRef<'_, f32>) -> f64 {
    let q = to_f64(q);
    let g = mul(q.transpose(), q.as_ref());
    let deviation = g - faer::Mat::<f64>::identity(q.ncols(), q.ncols());
    deviation
        .singular_values()
        .map_or(f64::NAN, |s| s.first().copied().unwrap_or(0.0))
}

/// `||A - U diag(s) V^T||_F / ||A||_F` in f64.
fn svd_residual(
    a: &Mat<f32>,
    u: faer::MatRef<'_, f32>,
    s: &[f32],
    v: faer::MatRef<'_, f32>,
) -> f64 {
    let a64 = to_f64(view(a));
    let us = faer::Mat::from_fn(u.nrows(), s.len(), |i, j| {
        f64::from(u[(i, j)]) * f64::from(s[j])
    });
    let approx = mul(us.as_ref(), to_f64(v).transpose());
    (&a64 - &approx).norm_l2() / a64.norm_l2()
}

/// `U diag(s) V^T` with random near-orthonormal factors and singular values `1 / (1 + i)`: a
/// spectrum that decays as trained weight deltas do, so the rank-64 error is meaningful.
fn decaying(m: usize, n: usize, seed: u64) -> Mat<f32> {
    let k = m.min(n);
    let g1 = faer::Mat::<f32>::from_fn(m, k, |i, j| {
        CounterRng::new(seed).normal_at((i * k + j) as u64) as f32
            / (m as f32).sqrt()
            / (1.0 + j as f32)
    });
    let g2 = faer::Mat::<f32>::from_fn(k, n, |i, j| {
        CounterRng::new(seed + 1).normal_at((i * n + j) as u64) as f32 / (n as f32).sqrt()
    });
    let mut a = Mat::<f32>::zeros(m, n).unwrap();
    let dst = faer::MatMut::from_row_major_slice_mut(a.as_mut_slice(), m, n);
    faer::linalg::matmul::matmul(
        dst,
        Accum::Replace,
        g1.as_ref(),
        g2.as_ref(),
        1.0,
        Par::rayon(0),
    );
    a
}

/// What the report needs per bench besides its time, kept per group.
#[derive(Default)]
struct Notes(BTreeMap<String, Vec<(String, f64)>>);

impl Notes {
    fn add(&mut self, bench: &str, key: &str, value: f64) {
        self.0
            .entry(bench.to_owned())
            .or_default()
            .push((key.to_owned(), value));
    }

    /// Writes `target/criterion/linalg-notes/<group>.json`, so a filtered run keeps the notes of
    /// the groups it skipped.
    fn write(&self, group: &str) {
        let mut json = String::from("{\n");
        for (i, (bench, fields)) in self.0.iter().enumerate() {
            let body: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("\"{k}\": {v:e}"))
                .collect();
            let _ = write!(json, "  \"{bench}\": {{{}}}", body.join(", "));
            json.push_str(if i + 1 < self.0.len() { ",\n" } else { "\n" });
        }
        json.push('}');
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/criterion/linalg-notes");
        std::fs::create_dir_all(&dir).expect("notes directory");
        std::fs::write(dir.join(format!("{}.json", group.replace('/', "_"))), json)
            .expect("write notes");
    }
}

/// Whether the command line's filter (criterion's positional argument, a regex such as
/// `linalg/(qr|lu)`) names `group`, as a substring either way or by its last component: the
/// accuracy references (exact SVDs of 4096 x 11008 among them) run only for selected groups.
fn selected(group: &str) -> bool {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let name = group.rsplit('/').next().unwrap_or(group);
    filters.is_empty()
        || filters
            .iter()
            .any(|f| group.contains(f.as_str()) || f.contains(group) || f.contains(name))
}

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
    seconds: u64,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(seconds));
    g
}

fn gemm_reference(c: &mut Criterion, cpu: &Cpu, notes: &mut Notes) {
    let n = 2048;
    let (a, b) = (random(n, n, 1), random(n, n, 2));
    let mut out = Mat::<f32>::zeros(n, n).unwrap();
    let mut g = group(c, "linalg/gemm", 3);
    for (label, backend) in [
        ("faer", GemmBackend::Auto),
        ("portable", GemmBackend::Portable),
    ] {
        let cpu = cpu.with_gemm_backend(backend);
        notes.add(
            &format!("linalg/gemm/{label}/{n}"),
            "flops",
            2.0 * (n as f64).powi(3),
        );
        g.bench_function(BenchmarkId::new(label, n), |bench| {
            bench.iter(|| {
                linalg::gemm(
                    &cpu,
                    1.0,
                    a.as_ref(),
                    Transpose::No,
                    b.as_ref(),
                    Transpose::No,
                    0.0,
                    out.as_mut(),
                )
                .expect("gemm");
            });
        });
    }
    g.finish();
}

fn qr(c: &mut Criterion, cpu: &Cpu, notes: &mut Notes) {
    let one = cpu.with_threads(1).expect("one thread");
    // The first is the blocked factorisation's shape; the narrow ones are the randomized SVD's
    // and OPCM's bases, where fixed costs count.
    for (m, n, cpu) in [
        (4096, 256, *cpu),
        (4096, 16, *cpu),
        (11008, 16, *cpu),
        (4096, 16, one),
        (11008, 16, one),
    ] {
        let a = random(m, n, 3);
        let flops = 4.0 * m as f64 * (n as f64).powi(2) - 4.0 / 3.0 * (n as f64).powi(3);
        let threads = cpu.threads();
        let shape = if n == 256 {
            format!("{m}x{n}")
        } else {
            format!("{m}x{n}/{threads}t")
        };
        let householder = linalg::householder_qr(&cpu, a.as_ref()).expect("qr");
        let cgs2 = linalg::cgs2(&cpu, a.as_ref()).expect("cgs2");
        let theirs = view(&a).qr();
        for (label, q, r) in [
            ("householder", view(&householder.q), view(&householder.r)),
            ("cgs2", view(&cgs2.q), view(&cgs2.r)),
        ] {
            let bench = format!("linalg/qr/{label}/{shape}");
            notes.add(&bench, "flops", flops);
            notes.add(&bench, "residual", {
                let qr = mul(to_f64(q).as_ref(), to_f64(r).as_ref());
                (&to_f64(view(&a)) - &qr).norm_l2() / to_f64(view(&a)).norm_l2()
            });
            notes.add(&bench, "orthogonality", orthogonality(q));
        }
        let bench = format!("linalg/qr/faer/{shape}");
        notes.add(&bench, "flops", flops);
        notes.add(
            &bench,
            "orthogonality",
            orthogonality(theirs.compute_thin_Q().as_ref()),
        );
        let mut g = group(c, "linalg/qr", 3);
        g.bench_function(BenchmarkId::new("householder", &shape), |b| {
            b.iter(|| linalg::householder_qr(&cpu, a.as_ref()).expect("qr"));
        });
        g.bench_function(BenchmarkId::new("cgs2", &shape), |b| {
            b.iter(|| linalg::cgs2(&cpu, a.as_ref()).expect("cgs2"));
        });
        // `qr()` runs on faer's global parallelism: the same thread count as ours.
        let global = faer::get_global_parallelism();
        faer::set_global_parallelism(par(&cpu));
        g.bench_function(BenchmarkId::new("faer", &shape), |b| {
            b.iter(|| view(&a).qr().compute_thin_Q());
        });
        faer::set_global_parallelism(global);
        g.finish();
    }
}

/// The projections of a 4096 x 11008 `X` (the shape of a 7B model's MLP matrix), cold: each
/// call takes the next of three copies (540 MB, beyond any L3 here). Ours out of place and in
/// place; faer composed in its strongest form: `C = Q^T X` then `X -= Q C` in place
/// (`Accum::Add`, BLAS's `beta = 1`), and out of place with the copy that needs. At r = 16 also
/// on one thread.
fn projections(c: &mut Criterion, cpu: &Cpu, notes: &mut Notes) {
    let (m, n) = (4096, 11008);
    let mut copies: Vec<Mat<f32>> = (0..3).map(|i| random(m, n, 10 + i)).collect();
    let mut out = Mat::<f32>::zeros(m, n).unwrap();
    let one = cpu.with_threads(1).expect("one thread");
    for (r, cpu) in [(16usize, *cpu), (16, one), (64, *cpu), (256, *cpu)] {
        let q = linalg::householder_qr(&cpu, random(m, r, 20).as_ref())
            .expect("basis")
            .q;
        let threads = cpu.threads();
        let id = format!("{m}x{n}/r{r}/{threads}t");
        for complement in [true, false] {
            let op = if complement {
                "project_out"
            } else {
                "project_onto"
            };
            for label in ["kernels", "kernels_in_place", "faer", "faer_in_place"] {
                let bench = format!("linalg/{op}/{label}/{id}");
                notes.add(&bench, "flops", 4.0 * (m * n * r) as f64);
                notes.add(&bench, "bytes", 2.0 * (m * n * 4) as f64);
            }
            // Accuracy against the f64 product, on the first copy.
            if complement {
                linalg::project_out(&cpu, q.as_ref(), copies[0].as_ref(), out.as_mut())
            } else {
                linalg::project_onto(&cpu, q.as_ref(), copies[0].as_ref(), out.as_mut())
            }
            .expect("projection");
            let (q64, x64) = (to_f64(view(&q)), to_f64(view(&copies[0])));
            let onto = mul(q64.as_ref(), mul(q64.transpose(), x64.as_ref()).as_ref());
            let exact = if complement { &x64 - &onto } else { onto };
            notes.add(
                &format!("linalg/{op}/kernels/{id}"),
                "residual",
                (&to_f64(view(&out)) - &exact).norm_l2() / x64.norm_l2(),
            );
            let mut g = group(c, &format!("linalg/{op}"), 4);
            let mut turn = 0;
            g.bench_function(BenchmarkId::new("kernels", &id), |b| {
                b.iter(|| {
                    turn = (turn + 1) % copies.len();
                    let x = copies[turn].as_ref();
                    if complement {
                        linalg::project_out(&cpu, q.as_ref(), x, out.as_mut())
                    } else {
                        linalg::project_onto(&cpu, q.as_ref(), x, out.as_mut())
                    }
                    .expect("projection");
                });
            });
            // In place on the copies: a projection's image projects to itself, so every call
            // does the same work on the same kind of data.
            g.bench_function(BenchmarkId::new("kernels_in_place", &id), |b| {
                b.iter(|| {
                    turn = (turn + 1) % copies.len();
                    let x = copies[turn].as_mut();
                    if complement {
                        linalg::project_out_in_place(&cpu, q.as_ref(), x)
                    } else {
                        linalg::project_onto_in_place(&cpu, q.as_ref(), x)
                    }
                    .expect("projection");
                });
            });
            let mut coefficients = faer::Mat::<f32>::zeros(r, n);
            for in_place in [false, true] {
                let label = if in_place { "faer_in_place" } else { "faer" };
                g.bench_function(BenchmarkId::new(label, &id), |b| {
                    b.iter(|| {
                        turn = (turn + 1) % copies.len();
                        let x = &mut copies[turn];
                        faer::linalg::matmul::matmul(
                            coefficients.as_mut(),
                            Accum::Replace,
                            view(&q).transpose(),
                            view(x),
                            1.0,
                            par(&cpu),
                        );
                        let dst = if in_place {
                            faer::MatMut::from_row_major_slice_mut(x.as_mut_slice(), m, n)
                        } else {
                            let mut dst =
                                faer::MatMut::from_row_major_slice_mut(out.as_mut_slice(), m, n);
                            if complement {
                                dst.copy_from(view(x));
                            }
                            dst
                        };
                        let (accum, alpha) = if complement {
                            (Accum::Add, -1.0)
                        } else {
                            (Accum::Replace, 1.0)
                        };
                        faer::linalg::matmul::matmul(
                            dst,
                            accum,
                            view(&q),
                            coefficients.as_ref(),
                            alpha,
                            par(&cpu),
                        );
                    });
                });
            }
            g.finish();
        }
    }
}

fn thin_svd(c: &mut Criterion, cpu: &Cpu, notes: &mut Notes) {
    for (m, n) in [(1024, 1024), (4096, 512)] {
        let a = random(m, n, 30);
        let id = format!("{m}x{n}");
        // Golub and Van Loan's count for a thin SVD with both factors.
        let flops = 6.0 * m as f64 * (n as f64).powi(2) + 20.0 * (n as f64).powi(3);
        let ours = linalg::thin_svd(cpu, a.as_ref()).expect("svd");
        let theirs = view(&a).thin_svd().expect("faer svd");
        let exact = to_f64(view(&a)).thin_svd().expect("f64 svd");
        let s_max = exact.S().column_vector()[0];
        let bench = format!("linalg/thin_svd/kernels/{id}");
        notes.add(&bench, "flops", flops);
        notes.add(
            &bench,
            "residual",
            svd_residual(&a, view(&ours.u), &ours.s, view(&ours.v)),
        );
        notes.add(&bench, "orthogonality_u", orthogonality(view(&ours.u)));
        notes.add(&bench, "orthogonality_v", orthogonality(view(&ours.v)));
        notes.add(
            &bench,
            "singular_values",
            ours.s
                .iter()
                .enumerate()
                .map(|(i, &s)| (f64::from(s) - exact.S().column_vector()[i]).abs())
                .fold(0.0, f64::max)
                / s_max,
        );
        let theirs_s: Vec<f32> = (0..n.min(m))
            .map(|i| theirs.S().column_vector()[i])
            .collect();
        let bench = format!("linalg/thin_svd/faer/{id}");
        notes.add(&bench, "flops", flops);
        notes.add(
            &bench,
            "residual",
            svd_residual(&a, theirs.U(), &theirs_s, theirs.V()),
        );
        let mut g = group(c, "linalg/thin_svd", 10);
        g.bench_function(BenchmarkId::new("kernels", &id), |b| {
            b.iter(|| linalg::thin_svd(cpu, a.as_ref()).expect("svd"));
        });
        g.bench_function(BenchmarkId::new("faer", &id), |b| {
            b.iter(|| view(&a).thin_svd().expect("svd"));
        });
        g.finish();
    }
}

/// faer doing the randomized SVD's work through its own routines: the same probes, products,
/// Householder re-orthonormalisations and small SVD.
fn faer_rsvd(
    a: faer::MatRef<'_, f32>,
    params: RsvdParams,
    par: Par,
) -> (faer::Mat<f32>, Vec<f32>, faer::Mat<f32>) {
    let product = |x: faer::MatRef<'_, f32>, y: faer::MatRef<'_, f32>| {
        let mut out = faer::Mat::zeros(x.nrows(), y.ncols());
        faer::linalg::matmul::matmul(out.as_mut(), Accum::Replace, x, y, 1.0, par);
        out
    };
    let probes = params.rank + params.oversample;
    let rng = CounterRng::new(params.seed);
    let omega = faer::Mat::<f32>::from_fn(a.ncols(), probes, |i, j| {
        rng.normal_at((i * probes + j) as u64) as f32
    });
    let power_iterations = params.power_iterations;
    let mut q = product(a, omega.as_ref()).qr().compute_thin_Q();
    for _ in 0..power_iterations {
        let z = product(a.transpose(), q.as_ref()).qr().compute_thin_Q();
        q = product(a, z.as_ref()).qr().compute_thin_Q();
    }
    let b = product(q.transpose(), a);
    let small = b.thin_svd().expect("small svd");
    let u = product(q.as_ref(), small.U());
    let s = (0..small.S().dim())
        .map(|i| small.S().column_vector()[i])
        .collect();
    (u, s, small.V().to_owned())
}

/// The randomized SVDs: rank 64 with the default oversampling (q = 2r) on both shapes; on
/// 4096 x 11008 also q = r, and rank 16 (q = 2r) on one thread. faer runs the same parameters,
/// on the same thread count.
fn rsvd(c: &mut Criterion, cpu: &Cpu, notes: &mut Notes) {
    let one = cpu.with_threads(1).expect("one thread");
    for (m, n) in [(4096, 4096), (4096, 11008)] {
        let a = decaying(m, n, 40);
        let exact = view(&a).thin_svd().expect("exact svd");
        let norm = to_f64(view(&a)).norm_l2();
        let mut cases = vec![(RSVD_RANK, RsvdParams::new(RSVD_RANK), *cpu, String::new())];
        if n == 11008 {
            cases.push((
                RSVD_RANK,
                RsvdParams::new(RSVD_RANK).with_oversample(0),
                *cpu,
                "/q64".into(),
            ));
            cases.push((16, RsvdParams::new(16), one, "/1t".into()));
        }
        for (rank, params, cpu, suffix) in cases {
            let id = format!("{m}x{n}/r{rank}{suffix}");
            let probes = params.rank + params.oversample;
            let flops =
                2.0 * (m * n * probes) as f64 * (2.0 * params.power_iterations as f64 + 2.0);
            let tail: f64 = (rank..m.min(n))
                .map(|i| f64::from(exact.S().column_vector()[i]).powi(2))
                .sum::<f64>()
                .sqrt();
            let par = par(&cpu);
            let global = faer::get_global_parallelism();
            faer::set_global_parallelism(par);
            let ours = linalg::randomized_svd(&cpu, a.as_ref(), params).expect("rsvd");
            let (u, s, v) = faer_rsvd(view(&a), params, par);
            let truncate = |x: faer::MatRef<'_, f32>| x.subcols(0, rank).to_owned();
            for (label, error) in [
                (
                    "kernels",
                    svd_residual(&a, view(&ours.u), &ours.s, view(&ours.v)),
                ),
                (
                    "faer",
                    svd_residual(
                        &a,
                        truncate(u.as_ref()).as_ref(),
                        &s[..rank],
                        truncate(v.as_ref()).as_ref(),
                    ),
                ),
            ] {
                let bench = format!("linalg/rsvd/{label}/{id}");
                notes.add(&bench, "flops", flops);
                notes.add(&bench, "error_over_optimal", error * norm / tail);
            }
            notes.add(
                &format!("linalg/rsvd/kernels/{id}"),
                "orthogonality_u",
                orthogonality(view(&ours.u)),
            );
            let mut g = group(c, "linalg/rsvd", 10);
            g.bench_function(BenchmarkId::new("kernels", &id), |b| {
                b.iter(|| linalg::randomized_svd(&cpu, a.as_ref(), params).expect("rsvd"));
            });
            g.bench_function(BenchmarkId::new("faer", &id), |b| {
                b.iter(|| faer_rsvd(view(&a), params, par));
            });
            g.finish();
            faer::set_global_parallelism(global);
        }
    }
}

/// faer's exact thin SVD of the randomized SVD's matrices, which the randomized one must beat
/// by 5x (it takes seconds per run: flat sampling, ten runs).
fn exact_svd(c: &mut Criterion, _: &Cpu, _: &mut Notes) {
    for (m, n) in [(4096, 4096), (4096, 11008)] {
        let a = decaying(m, n, 40);
        let mut g = group(c, "linalg/exact_svd", 1);
        g.sampling_mode(criterion::SamplingMode::Flat);
        g.bench_function(BenchmarkId::new("faer", format!("{m}x{n}")), |b| {
            b.iter(|| view(&a).thin_svd().expect("svd"));
        });
        g.finish();
    }
}

fn lu(c: &mut Criterion, cpu: &Cpu, notes: &mut Notes) {
    let n = 2048;
    let a = random(n, n, 50);
    let id = format!("{n}x{n}");
    let f = linalg::lu(cpu, a.as_ref()).expect("lu");
    let a64 = to_f64(view(&a));
    let pa = faer::Mat::<f64>::from_fn(n, n, |i, j| a64[(f.perm[i], j)]);
    let lu = mul(to_f64(view(&f.l)).as_ref(), to_f64(view(&f.u)).as_ref());
    for label in ["kernels", "faer"] {
        notes.add(
            &format!("linalg/lu/{label}/{id}"),
            "flops",
            2.0 / 3.0 * (n as f64).powi(3),
        );
    }
    notes.add(
        &format!("linalg/lu/kernels/{id}"),
        "residual",
        (&pa - &lu).norm_l2() / a64.norm_l2(),
    );
    let mut g = group(c, "linalg/lu", 4);
    g.bench_function(BenchmarkId::new("kernels", &id), |b| {
        b.iter(|| linalg::lu(cpu, a.as_ref()).expect("lu"));
    });
    g.bench_function(BenchmarkId::new("faer", &id), |b| {
        b.iter(|| view(&a).partial_piv_lu());
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    type Bench = fn(&mut Criterion, &Cpu, &mut Notes);
    let cpu = Cpu::detect();
    let groups: [(&str, Bench); 8] = [
        ("linalg/gemm", gemm_reference),
        ("linalg/qr", qr),
        ("linalg/project", projections),
        ("linalg/lu", lu),
        ("linalg/thin_svd", thin_svd),
        ("linalg/rsvd", rsvd),
        ("linalg/exact_svd", exact_svd),
        ("linalg/stream", |c, cpu, _| {
            bench_stream_read(c, "linalg/stream", cpu);
        }),
    ];
    for (group, bench) in groups {
        if selected(group) {
            let mut notes = Notes::default();
            bench(c, &cpu, &mut notes);
            notes.write(group);
        }
    }
}

criterion_group!(linalg_benches, benches);
criterion_main!(linalg_benches);
