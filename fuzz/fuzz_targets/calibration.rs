//! Streaming calibration driven in any order: chunks for any key in any pass, pass switches and
//! `finish` at any point. Never a panic; where the protocol was kept, every threshold is the
//! reference's, bit for bit.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use kernels_core::ops::sparse::calibrate_threshold_ref;
use kernels_cpu::prelude::*;
use kernels_fuzz::{backends, values};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Call {
    Feed { layer: u8, site: u8, len: u8 },
    NextPass,
    Finish,
}

fn site(s: u8) -> Site {
    [
        Site::GateActivation,
        Site::MlpInput,
        Site::DownInput,
        Site::AttentionInput,
        Site::AttentionOutput,
    ][usize::from(s % 5)]
}

fn run(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let k = *u.choose(&[0.0, 0.25, 0.5, 0.9, 1.0, -0.5, f64::NAN, 1.5])?;
    let specials = u.ratio(1, 8)?;
    let calls: Vec<Call> = u.arbitrary()?;
    let chunks: Vec<Vec<f32>> = calls
        .iter()
        .map(|c| match c {
            Call::Feed { len, .. } => values(u, usize::from(*len), specials),
            _ => Ok(Vec::new()),
        })
        .collect::<arbitrary::Result<_>>()?;
    let cpu = *u.choose(&backends())?;
    let Ok(mut cal) = Calibration::new(k) else {
        assert!(calibrate_threshold_ref(&[&[1.0]], k).is_err());
        return Ok(());
    };
    // The protocol kept: pass 1 chunks, then the same chunks per pass until done.
    let mut pass1: Vec<(usize, Site, &[f32])> = Vec::new();
    let mut kept = true;
    let mut pass = 1;
    let mut fed_this_pass: Vec<(usize, Site, &[f32])> = Vec::new();
    for (call, chunk) in calls.iter().zip(&chunks) {
        match call {
            Call::Feed { layer, site: s, .. } => {
                let key = (usize::from(*layer % 4), site(*s));
                if cal.feed(&cpu, key.0, key.1, chunk).is_ok() {
                    fed_this_pass.push((key.0, key.1, chunk));
                } else {
                    kept = false;
                }
                if pass == 1 {
                    pass1.push((key.0, key.1, chunk));
                }
            }
            Call::NextPass => {
                if pass > 1 && fed_this_pass != pass1 {
                    kept = false;
                }
                match cal.next_pass() {
                    Ok(_) => pass += 1,
                    Err(_) => kept = false,
                }
                fed_this_pass.clear();
            }
            Call::Finish => {
                let _ = cal.finish();
            }
        }
    }
    let done = cal.finish();
    if kept && pass >= 2 && done.is_ok() {
        for (layer, site, threshold) in done.unwrap() {
            let samples: Vec<&[f32]> = pass1
                .iter()
                .filter(|(l, s, _)| (*l, *s) == (layer, site))
                .map(|(_, _, c)| *c)
                .collect();
            let expect = calibrate_threshold_ref(&samples, k).unwrap();
            assert_eq!(
                threshold.to_bits(),
                expect.to_bits(),
                "layer {layer} {site:?}"
            );
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
