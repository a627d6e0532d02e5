//! Radix selection on every ISA, element type and thread count: bit-identical to the sorting
//! reference, ties included.

use kernels_core::ops::select::{topk_cut_ref, topk_indices_ref, topk_mask_ref};
use kernels_cpu::prelude::*;
use kernels_testkit::{isa_tests, ks, normal, tied};
use proptest::prelude::*;

// The CPU selection's sampling plan (private tuning in `kernels-cpu`'s `select/rank.rs` and
// `select/streaming.rs`), mirrored to build data that fools it. Should it change, the pass
// counts asserted below fail and these must follow.
/// Vectors from this many entries up take the sampled bracket.
const SAMPLED_MIN: usize = 1 << 16;
/// Entries per sample run.
const SAMPLE_RUN: usize = 64;
/// Entries between the sample runs of a streamed vector.
const STREAM_SAMPLE_STRIDE: usize = 1 << 14;
/// Sample runs of an in-memory vector of `n` entries.
fn sample_runs(n: usize) -> usize {
    (n / 1024).clamp(64, 4096)
}

fn indices<T: Element>(cpu: &Cpu, slices: &[&[T]], keep: KeepRule) -> Result<Vec<u64>> {
    let mut out = vec![u64::MAX; 3];
    topk_indices(cpu, slices, keep, &mut out).map(|()| out)
}

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
    let n = x.len();
    let rules = ks(n)
        .into_iter()
        .map(KeepRule::Count)
        .chain([0.1, 1.0].map(KeepRule::Density))
        .chain([0.0, 0.5, f32::INFINITY].map(KeepRule::Threshold));
    for keep in rules {
        let label = format!("{what} {:?} n={n} {keep:?} {cpu:?}", T::DTYPE);
        let expect = topk_indices_ref(&[x], keep).unwrap();
        assert_eq!(indices(cpu, &[x], keep).unwrap(), expect, "{label}");
        assert_eq!(
            topk_cut(cpu, &[x], keep).unwrap(),
            topk_cut_ref(&[x], keep).unwrap(),
            "{label}"
        );
        let mut mask = vec![u64::MAX; n.div_ceil(64)];
        topk_mask(cpu, x, keep, &mut mask).unwrap();
        let expect_mask = topk_mask_ref(x, keep).unwrap();
        assert_eq!(mask, bits_of(&expect_mask), "{label}");
        let mut kept = vec![T::from_f32(9.0); n];
        topk_keep(cpu, x, keep, &mut kept).unwrap();
        for ((k, v), m) in kept.iter().zip(x).zip(&expect_mask) {
            let expect = if *m { v.to_f32() } else { 0.0 };
            assert_eq!(
                k.to_f32().to_bits(),
                expect.to_bits(),
                "{label} kept values"
            );
        }
        if let KeepRule::Count(k @ 1..) = keep {
            assert_eq!(
                kth_largest_magnitude(cpu, &[x], k).unwrap(),
                topk_cut_ref(&[x], keep).unwrap().magnitude,
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

/// Above `SAMPLED_MIN`: the sampled bracket, and the radix fallback where it misses or holds too
/// many keys (16-bit types: classified by their words where the ISA can, widened elsewhere).
fn large_vectors(cpu: &Cpu) {
    large_vectors_of::<f32>(cpu);
    large_vectors_of::<f16>(cpu);
    large_vectors_of::<bf16>(cpu);
}

fn large_vectors_of<T: Element>(cpu: &Cpu) {
    let n = SAMPLED_MIN + 4099;
    let smooth: Vec<T> = normal(n, 5);
    // The sample sees zeros where the rest holds larger values: every bracket misses.
    let mut adversarial = smooth.clone();
    for (i, v) in adversarial.iter_mut().enumerate() {
        let runs = sample_runs(n) as u128;
        let run = (i as u128 * runs / n as u128) as usize;
        let run_start = (run as u128 * n as u128 / runs) as usize;
        if i < run_start + SAMPLE_RUN {
            *v = T::from_f32(0.0);
        }
    }
    // Nine magnitudes: the bracket's keys outgrow their first buffer, then its cap.
    let few: Vec<T> = tied(n, 9);
    for (x, what) in [
        (&smooth, "normal"),
        (&adversarial, "adversarial"),
        (&few, "tied"),
    ] {
        for k in [1, n as u64 / 100, n as u64 / 2, n as u64] {
            let slices = [&x[..1000], &x[1000..]];
            let keep = KeepRule::Count(k);
            assert_eq!(
                topk_cut(cpu, &slices, keep).unwrap(),
                topk_cut_ref(&slices, keep).unwrap(),
                "{what} {:?} k={k} {cpu:?}",
                T::DTYPE
            );
        }
        let keep = KeepRule::Density(0.1);
        let mut mask = vec![0u64; n.div_ceil(64)];
        topk_mask(cpu, x, keep, &mut mask).unwrap();
        assert_eq!(mask, bits_of(&topk_mask_ref(x, keep).unwrap()), "{what}");
        let mut kept = vec![T::from_f32(9.0); n];
        topk_keep(cpu, x, keep, &mut kept).unwrap();
        for ((k, v), m) in kept.iter().zip(x).zip(topk_mask_ref(x, keep).unwrap()) {
            let expect = if m { v.to_f32() } else { 0.0 };
            assert_eq!(k.to_f32().to_bits(), expect.to_bits(), "{what} kept values");
        }
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
            let keep = KeepRule::Count(k);
            assert_eq!(
                indices(cpu, &slices, keep).unwrap(),
                topk_indices_ref(&[&x[..]], keep).unwrap(),
                "cuts {cuts:?} k={k} {cpu:?}"
            );
            assert_eq!(
                topk_cut(cpu, &slices, keep).unwrap(),
                topk_cut_ref(&[&x[..]], keep).unwrap()
            );
        }
    }
}

/// Streams `x` in `chunks` through `StreamingTopK` and `TopKApplier`; returns the cut, the
/// passes taken and the flat mask (checking the kept values against it).
fn stream<T: Element>(
    cpu: &Cpu,
    x: &[T],
    chunk: usize,
    rule: KeepRule,
) -> (TopKCut, usize, Vec<bool>) {
    let mut topk = StreamingTopK::new(rule).unwrap();
    let mut passes = 0;
    loop {
        passes += 1;
        for c in x.chunks(chunk.max(1)) {
            topk.feed(cpu, c).unwrap();
        }
        if !topk.next_pass().unwrap() {
            break;
        }
    }
    let cut = topk.finish().unwrap();
    let (mut masks, mut values) = (TopKApplier::new(&cut), TopKApplier::new(&cut));
    let mut kept = Vec::with_capacity(x.len());
    for c in x.chunks(chunk.max(1)) {
        let mut mask = vec![0u64; c.len().div_ceil(64)];
        masks.mask(cpu, c, &mut mask).unwrap();
        let mut out = vec![f32::NAN; c.len()];
        values.keep(cpu, c, &mut out).unwrap();
        for (i, (o, v)) in out.iter().zip(c).enumerate() {
            let bit = mask[i / 64] >> (i % 64) & 1 == 1;
            let expect = if bit { v.to_f32() } else { 0.0 };
            assert_eq!(o.to_bits(), expect.to_bits(), "kept values");
            kept.push(bit);
        }
    }
    (cut, passes, kept)
}

fn streaming(cpu: &Cpu) {
    for n in [0usize, 1, 65, 4099] {
        let x: Vec<bf16> = tied(n, 3);
        for k in ks(n) {
            for chunk in [n.clamp(1, 7), 64, 1000] {
                let keep = KeepRule::Count(k);
                let (cut, _, kept) = stream(cpu, &x, chunk, keep);
                assert_eq!(
                    cut,
                    topk_cut_ref(&[&x[..]], keep).unwrap(),
                    "n={n} k={k} chunk={chunk}"
                );
                assert_eq!(kept, topk_mask_ref(&x, keep).unwrap(), "n={n} k={k}");
            }
        }
        // A threshold needs no second pass.
        let keep = KeepRule::Threshold(0.5);
        let (cut, passes, kept) = stream(cpu, &x, 64, keep);
        assert_eq!((cut, passes), (topk_cut_ref(&[&x[..]], keep).unwrap(), 1));
        assert_eq!(kept, topk_mask_ref(&x, keep).unwrap());
    }
    // Above SAMPLED_MIN: two passes on shuffled data, four where the sample is fooled.
    let n = SAMPLED_MIN + 1000;
    let smooth: Vec<f32> = normal(n, 9);
    let mut fooled = smooth.clone();
    for run in (0..n).step_by(STREAM_SAMPLE_STRIDE) {
        fooled[run..(run + SAMPLE_RUN).min(n)].fill(0.0);
    }
    for (x, passes) in [(&smooth, 2), (&fooled, 4)] {
        let keep = KeepRule::Density(0.1);
        let (cut, taken, kept) = stream(cpu, x, 300_007, keep);
        assert_eq!(taken, passes);
        assert_eq!(cut, topk_cut_ref(&[&x[..]], keep).unwrap());
        assert_eq!(kept, topk_mask_ref(x, keep).unwrap());
    }
}

fn bad_streams(cpu: &Cpu) {
    let x: Vec<f32> = normal(100, 1);
    assert!(
        StreamingTopK::new(KeepRule::Density(1.5)).is_err(),
        "density above 1"
    );
    let mut topk = StreamingTopK::new(KeepRule::Count(101)).unwrap();
    topk.feed(cpu, &x).unwrap();
    assert!(topk.next_pass().is_err(), "more than n");
    let mut topk = StreamingTopK::new(KeepRule::Count(10)).unwrap();
    assert!(matches!(topk.finish(), Err(Error::PassOrder { .. })));
    topk.feed(cpu, &x[..50]).unwrap();
    assert!(matches!(
        topk.feed(cpu, &[1.0, f32::NAN]),
        Err(Error::NonFinite { index: 51, .. })
    ));
    topk.feed(cpu, &x[50..]).unwrap();
    assert!(topk.next_pass().unwrap());
    topk.feed(cpu, &x[..60]).unwrap();
    assert!(
        matches!(topk.next_pass(), Err(Error::PassOrder { .. })),
        "a pass over fewer entries"
    );
    let mut done = StreamingTopK::new(KeepRule::Threshold(1.0)).unwrap();
    done.feed(cpu, &x).unwrap();
    assert!(!done.next_pass().unwrap());
    assert!(matches!(done.feed(cpu, &x), Err(Error::PassOrder { .. })));
    let cut = topk_cut_ref(&[&x[..]], KeepRule::Count(3)).unwrap();
    let mut applier = TopKApplier::new(&cut);
    assert!(applier.mask(cpu, &x, &mut [0u64; 1]).is_err());
    assert!(applier.keep(cpu, &x, &mut [0.0f32; 99]).is_err());
}

fn bad_inputs(cpu: &Cpu) {
    let mut x: Vec<f32> = normal(300, 3);
    assert!(matches!(
        topk_cut(cpu, &[&x[..]], KeepRule::Count(301)),
        Err(Error::InvalidParam { name: "k", .. })
    ));
    assert!(matches!(
        topk_cut(cpu, &[&x[..]], KeepRule::Threshold(f32::NAN)),
        Err(Error::InvalidParam { .. })
    ));
    assert!(matches!(
        kth_largest_magnitude(cpu, &[&x[..]], 0),
        Err(Error::InvalidParam { name: "k", .. })
    ));
    assert!(matches!(
        topk_mask(cpu, &x, KeepRule::Count(3), &mut [0u64; 4]),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        topk_keep(cpu, &x, KeepRule::Count(3), &mut [0.0f32; 4]),
        Err(Error::LengthMismatch { .. })
    ));
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        x[257] = bad;
        let head = &x[..100];
        let tail = &x[100..];
        assert!(
            matches!(
                indices(cpu, &[head, tail], KeepRule::Count(5)),
                Err(Error::NonFinite { index: 257, .. })
            ),
            "{bad} {cpu:?}"
        );
        // k = 0 and threshold rules still validate, as the reference does.
        assert!(topk_cut(cpu, &[&x[..]], KeepRule::Count(0)).is_err());
        assert!(topk_cut(cpu, &[&x[..]], KeepRule::Threshold(1.0)).is_err());
    }
    assert_eq!(
        topk_cut::<f32>(cpu, &[], KeepRule::Count(0)).unwrap(),
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
        let keep = KeepRule::Count(k);
        prop_assert_eq!(indices(&cpu, &slices, keep).unwrap(), topk_indices_ref(&slices, keep).unwrap());
    }
}
