//! Radix selection on every ISA, element type and thread count: bit-identical to the sorting
//! reference, ties included.

mod common;

use common::{ks, normal, tied};
use half::{bf16, f16};
use kernels_core::ops::select::{TopKCut, topk_cut_ref, topk_global_ref, topk_mask_ref};
use kernels_core::{Element, Error};
use kernels_cpu::Cpu;
use kernels_cpu::select::{
    KeepRule, SAMPLE_RUN, SAMPLED_MIN, STREAM_SAMPLE_STRIDE, StreamingTopK, TopKApplier,
    kth_largest_magnitude, sample_runs, topk_cut, topk_indices, topk_mask,
};
use proptest::prelude::*;

const LENGTHS: [usize; 12] = [0, 1, 3, 15, 16, 17, 63, 64, 65, 127, 1000, 4099];

fn bits_of(mask: &[bool]) -> Vec<u64> {
    mask.chunks(64)
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u64, |w, (j, &b)| w | (u64::from(b) << j))
        })
        .collect()
}

fn check_one<T: Element>(cpu: &Cpu, x: &[T], what: &str) {
    for k in ks(x.len()) {
        let label = format!("{what} {:?} n={} k={k} {cpu:?}", T::DTYPE, x.len());
        let expect = topk_global_ref(&[x], k).unwrap();
        assert_eq!(topk_indices(cpu, &[x], k).unwrap(), expect, "{label}");
        assert_eq!(
            topk_cut(cpu, &[x], k).unwrap(),
            topk_cut_ref(&[x], k).unwrap(),
            "{label}"
        );
        let mut mask = vec![u64::MAX; x.len().div_ceil(64)];
        topk_mask(cpu, x, k as usize, &mut mask).unwrap();
        assert_eq!(
            mask,
            bits_of(&topk_mask_ref(x, k as usize).unwrap()),
            "{label}"
        );
        if k > 0 {
            assert_eq!(
                kth_largest_magnitude(cpu, &[x], k).unwrap(),
                topk_cut_ref(&[x], k).unwrap().magnitude,
                "{label}"
            );
        }
    }
}

fn single_slices<T: Element>(cpu: &Cpu) {
    for n in LENGTHS {
        check_one::<T>(cpu, &tied(n, n as u64), "tied");
        check_one::<T>(cpu, &normal(n, 7 + n as u64), "normal");
    }
}

fn selection_f32(cpu: &Cpu) {
    single_slices::<f32>(cpu);
}
fn selection_f16(cpu: &Cpu) {
    single_slices::<f16>(cpu);
}
fn selection_bf16(cpu: &Cpu) {
    single_slices::<bf16>(cpu);
}

/// Above `SAMPLED_MIN`: the sampled bracket, and the radix fallback where it misses.
fn large_vectors(cpu: &Cpu) {
    let n = SAMPLED_MIN as usize + 4099;
    let smooth: Vec<f32> = normal(n, 5);
    // The sample sees zeros where the rest holds larger values: every bracket misses.
    let mut adversarial = smooth.clone();
    for (i, v) in adversarial.iter_mut().enumerate() {
        let runs = sample_runs(n as u64) as u128;
        let run = (i as u128 * runs / n as u128) as usize;
        let run_start = (run as u128 * n as u128 / runs) as usize;
        if i < run_start + SAMPLE_RUN {
            *v = 0.0;
        }
    }
    for (x, what) in [(&smooth, "normal"), (&adversarial, "adversarial")] {
        for k in [1, n as u64 / 100, n as u64 / 2, n as u64] {
            let slices = [&x[..1000], &x[1000..]];
            assert_eq!(
                topk_cut(cpu, &slices, k).unwrap(),
                topk_cut_ref(&slices, k).unwrap(),
                "{what} k={k} {cpu:?}"
            );
        }
        let k = n / 10;
        let mut mask = vec![0u64; n.div_ceil(64)];
        topk_mask(cpu, x, k, &mut mask).unwrap();
        assert_eq!(mask, bits_of(&topk_mask_ref(x, k).unwrap()), "{what}");
    }
}

fn global_over_many_slices(cpu: &Cpu) {
    let x: Vec<f32> = tied(3000, 11);
    for cuts in [
        &[0usize, 0, 3000][..],
        &[1, 64, 65, 1000, 2999],
        &[700, 701, 2048],
    ] {
        let mut slices = Vec::new();
        let mut from = 0;
        for &c in cuts {
            slices.push(&x[from..c]);
            from = c;
        }
        slices.push(&x[from..]);
        for k in ks(x.len()) {
            assert_eq!(
                topk_indices(cpu, &slices, k).unwrap(),
                topk_global_ref(&[&x[..]], k).unwrap(),
                "cuts {cuts:?} k={k} {cpu:?}"
            );
            assert_eq!(
                topk_cut(cpu, &slices, k).unwrap(),
                topk_cut_ref(&[&x[..]], k).unwrap()
            );
        }
    }
}

/// Streams `x` in `chunks` through `StreamingTopK` and `TopKApplier`; returns the cut, the
/// passes taken and the flat mask.
fn stream<T: Element>(
    cpu: &Cpu,
    x: &[T],
    chunk: usize,
    rule: KeepRule,
) -> (TopKCut, usize, Vec<bool>) {
    let mut topk = StreamingTopK::new(rule);
    for c in x.chunks(chunk.max(1)) {
        topk.observe(cpu, c).unwrap();
    }
    let mut passes = 1;
    while topk.next_pass().unwrap() {
        passes += 1;
        for c in x.chunks(chunk.max(1)) {
            topk.refine(cpu, c).unwrap();
        }
    }
    let cut = topk.cut().unwrap();
    let mut applier = TopKApplier::new(&cut);
    let mut kept = Vec::with_capacity(x.len());
    for c in x.chunks(chunk.max(1)) {
        let mut mask = vec![0u64; c.len().div_ceil(64)];
        applier.mask(cpu, c, &mut mask).unwrap();
        kept.extend((0..c.len()).map(|i| mask[i / 64] >> (i % 64) & 1 == 1));
    }
    (cut, passes, kept)
}

fn streaming(cpu: &Cpu) {
    for n in [0usize, 1, 65, 4099] {
        let x: Vec<bf16> = tied(n, 3);
        for k in ks(n) {
            for chunk in [n.clamp(1, 7), 64, 1000] {
                let (cut, _, kept) = stream(cpu, &x, chunk, KeepRule::Count(k));
                assert_eq!(
                    cut,
                    topk_cut_ref(&[&x[..]], k).unwrap(),
                    "n={n} k={k} chunk={chunk}"
                );
                assert_eq!(kept, topk_mask_ref(&x, k as usize).unwrap(), "n={n} k={k}");
            }
        }
    }
    // Above SAMPLED_MIN: two passes on shuffled data, four where the sample is fooled.
    let n = SAMPLED_MIN as usize + 1000;
    let smooth: Vec<f32> = normal(n, 9);
    let mut fooled = smooth.clone();
    for run in (0..n).step_by(STREAM_SAMPLE_STRIDE as usize) {
        fooled[run..(run + SAMPLE_RUN).min(n)].fill(0.0);
    }
    for (x, passes) in [(&smooth, 2), (&fooled, 4)] {
        let k = n / 10;
        let (cut, taken, kept) = stream(cpu, x, 300_007, KeepRule::Density(0.1));
        assert_eq!(taken, passes);
        assert_eq!(cut, topk_cut_ref(&[&x[..]], k as u64).unwrap());
        assert_eq!(kept, topk_mask_ref(x, k).unwrap());
    }
}

fn bad_streams(cpu: &Cpu) {
    let x: Vec<f32> = normal(100, 1);
    let mut topk = StreamingTopK::new(KeepRule::Density(1.5));
    topk.observe(cpu, &x).unwrap();
    assert!(topk.next_pass().is_err(), "density above 1");
    let mut topk = StreamingTopK::new(KeepRule::Count(10));
    assert!(topk.refine(cpu, &x).is_err(), "refine before pass 1 ends");
    assert!(topk.cut().is_err());
    topk.observe(cpu, &x[..50]).unwrap();
    assert!(matches!(
        topk.observe(cpu, &[1.0, f32::NAN]),
        Err(Error::NonFinite { index: 51, .. })
    ));
    topk.observe(cpu, &x[50..]).unwrap();
    assert!(topk.next_pass().unwrap());
    topk.refine(cpu, &x[..60]).unwrap();
    assert!(topk.next_pass().is_err(), "a pass over fewer entries");
    let mut applier = TopKApplier::new(&topk_cut_ref(&[&x[..]], 3).unwrap());
    assert!(applier.mask(cpu, &x, &mut [0u64; 1]).is_err());
}

fn bad_inputs(cpu: &Cpu) {
    let mut x: Vec<f32> = normal(300, 3);
    assert!(matches!(
        topk_cut(cpu, &[&x[..]], 301),
        Err(Error::InvalidParam { name: "k", .. })
    ));
    assert!(matches!(
        kth_largest_magnitude(cpu, &[&x[..]], 0),
        Err(Error::InvalidParam { name: "k", .. })
    ));
    assert!(matches!(
        topk_mask(cpu, &x, 3, &mut [0u64; 4]),
        Err(Error::LengthMismatch { .. })
    ));
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        x[257] = bad;
        let head = &x[..100];
        let tail = &x[100..];
        assert!(
            matches!(
                topk_indices(cpu, &[head, tail], 5),
                Err(Error::NonFinite { index: 257, .. })
            ),
            "{bad} {cpu:?}"
        );
        // k = 0 still validates, as the reference does.
        assert!(topk_cut(cpu, &[&x[..]], 0).is_err());
    }
    assert_eq!(
        topk_cut::<f32>(cpu, &[], 0).unwrap(),
        TopKCut::NONE,
        "empty input"
    );
}

isa_tests!(
    selection_f32,
    selection_f16,
    selection_bf16,
    global_over_many_slices,
    large_vectors,
    streaming,
    bad_streams,
    bad_inputs
);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn any_data_any_split_selects_as_the_reference(
        x in prop::collection::vec((-20i32..=20).prop_map(|v| v as f32 * 0.125), 0..700),
        k_frac in 0.0f64..=1.0,
        split in 0usize..700,
        threads in 1usize..=3,
    ) {
        let k = (k_frac * x.len() as f64) as u64;
        let split = split.min(x.len());
        let slices = [&x[..split], &x[split..]];
        let cpu = Cpu::detect().with_threads(threads).unwrap().with_min_bytes_per_thread(1);
        prop_assert_eq!(topk_indices(&cpu, &slices, k).unwrap(), topk_global_ref(&slices, k).unwrap());
    }
}
