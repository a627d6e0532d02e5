//! `StreamingTopK` driven in any order; where the protocol was kept (every chunk, in order, in
//! every pass), the cut is the reference's and applying it matches the reference's mask.
#![no_main]

use arbitrary::Unstructured;
use kernels_core::ops::select::{topk_cut_ref, topk_mask_ref};
use kernels_cpu::prelude::*;
use kernels_fuzz::{PassCall, assert_same_outcome, backends, chunks, keep_rule, streaming_outcome};
use libfuzzer_sys::fuzz_target;

fn run(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let specials = u.ratio(1, 8)?;
    let data = chunks(u, specials)?;
    let n: usize = data.iter().map(Vec::len).sum();
    let keep = keep_rule(u, n)?;
    let calls: Vec<PassCall> = u.arbitrary()?;
    let cpu = *u.choose(&backends())?;
    let slices: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
    let expect = streaming_outcome(keep.validate(), &slices, topk_cut_ref(&slices, keep));
    let Ok(mut topk) = StreamingTopK::new(keep) else {
        assert!(expect.is_err() || keep.validate().is_err());
        return Ok(());
    };
    // Any order first: no panic, whatever it returns.
    for call in &calls {
        match *call {
            PassCall::Feed(i) if !slices.is_empty() => {
                let _ = topk.feed(&cpu, slices[usize::from(i) % slices.len()]);
            }
            PassCall::Feed(_) => {}
            PassCall::NextPass => {
                let _ = topk.next_pass();
            }
            PassCall::Finish => {
                let _ = topk.finish();
            }
        }
    }
    // Then the protocol, on a fresh one.
    let got = StreamingTopK::new(keep)
        .unwrap()
        .run(|| slices.iter(), |t, s| t.feed(&cpu, s));
    assert_same_outcome("StreamingTopK", &got, &expect);
    if let (Ok(got), Ok(expect)) = (got, expect) {
        assert_eq!(got, expect);
        let mut applier = TopKApplier::new(&got);
        let flat: Vec<f32> = slices.concat();
        let want = topk_mask_ref(&flat, keep).unwrap();
        let mut kept = Vec::new();
        for s in &slices {
            let mut mask = vec![0u64; s.len().div_ceil(64)];
            applier.mask(&cpu, s, &mut mask).unwrap();
            kept.extend((0..s.len()).map(|i| mask[i / 64] >> (i % 64) & 1 == 1));
        }
        assert_eq!(kept, want);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
