//! Streaming ComPEFT and its encoder driven in any order; where the protocol was kept, the
//! decision is the reference's and every tensor's codes and bytes are too, and the bytes decode.
#![no_main]

use arbitrary::Unstructured;
use kernels_core::format::{self, TernaryLayout};
use kernels_core::ops::ternary::compeft_ref;
use kernels_cpu::prelude::*;
use kernels_fuzz::{
    PassCall, assert_same_outcome, backends, chunks, keep_rule, streaming_outcome, value,
};
use libfuzzer_sys::fuzz_target;

fn run(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let specials = u.ratio(1, 8)?;
    let data = chunks(u, specials)?;
    let n: usize = data.iter().map(Vec::len).sum();
    let alpha = if u.ratio(3, 4)? { 1.0 } else { value(u, true)? };
    let params = CompeftParams::default()
        .with_keep(keep_rule(u, n)?)
        .with_alpha(alpha);
    let layout = if u.arbitrary()? {
        TernaryLayout::Dense2Bit
    } else {
        TernaryLayout::SparseRice
    };
    let calls: Vec<PassCall> = u.arbitrary()?;
    let cpu = *u.choose(&backends())?;
    let slices: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
    let expect = streaming_outcome(params.validate(), &slices, compeft_ref(&slices, params));
    let Ok(mut plan) = Compeft::new(params) else {
        assert!(expect.is_err());
        return Ok(());
    };
    for call in &calls {
        match *call {
            PassCall::Feed(i) if !slices.is_empty() => {
                let _ = plan.feed(&cpu, slices[usize::from(i) % slices.len()]);
            }
            PassCall::Feed(_) => {}
            PassCall::NextPass => {
                let _ = plan.next_pass();
            }
            PassCall::Finish => {
                if let Ok(cut) = plan.finish() {
                    // An encoder from whatever was decided codes without panicking.
                    let mut encoder = CompeftEncoder::new(&cut);
                    for s in &slices {
                        if let Ok(bytes) = encoder.encode(&cpu, s, &[s.len() as u64], layout) {
                            format::decode(&bytes, s.len()).expect("encoded bytes decode");
                        }
                    }
                }
            }
        }
    }
    let got = Compeft::new(params)
        .unwrap()
        .run(|| slices.iter(), |p, s| p.feed(&cpu, s));
    assert_same_outcome("Compeft", &got, &expect);
    let (Ok(got), Ok((decided, codes))) = (got, expect) else {
        return Ok(());
    };
    assert_eq!((got.cut, got.total), (decided.cut, decided.total));
    assert!(
        (f64::from(got.scale) - f64::from(decided.scale)).abs()
            <= kernels_cpu::compress::SCALE_RELATIVE_TOLERANCE * f64::from(decided.scale.abs())
    );
    let mut encoder = CompeftEncoder::new(&decided);
    let mut reference = kernels_core::ops::ternary::CompeftEncoder::new(&decided);
    for (s, want) in slices.iter().zip(&codes) {
        let bytes = encoder.encode(&cpu, s, &[s.len() as u64], layout).unwrap();
        let expect_bytes = reference.encode(s, &[s.len() as u64], layout).unwrap();
        assert_eq!(bytes, expect_bytes);
        assert_eq!(&format::decode(&bytes, s.len()).unwrap().1, want);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
