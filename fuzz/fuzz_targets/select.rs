//! Top-k selection on every instruction set against the references: masks, kept values,
//! indices and the k-th largest magnitude, on data with ties, signed zeros and specials.
#![no_main]

use arbitrary::Unstructured;
use kernels_core::ops::select::{kth_largest_magnitude_ref, topk_indices_ref, topk_mask_ref};
use kernels_cpu::prelude::*;
use kernels_fuzz::{assert_same_outcome, backends, keep_rule, size, values};
use libfuzzer_sys::fuzz_target;

fn run(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let specials = u.ratio(1, 8)?;
    let n = size(u, 300)?;
    let x = values(u, n, specials)?;
    let keep = keep_rule(u, n)?;
    let k: u64 = u.int_in_range(0..=n as u64 + 1)?;
    let mask_len = if u.ratio(7, 8)? {
        n.div_ceil(64)
    } else {
        size(u, 8)?
    };
    let expect_mask = topk_mask_ref(&x, keep);
    let expect_indices = topk_indices_ref(&[&x], keep);
    let expect_kth = kth_largest_magnitude_ref(&[&x], k);
    for cpu in backends() {
        let mut mask = vec![u64::MAX; mask_len];
        let got = topk_mask(&cpu, &x, keep, &mut mask);
        if mask_len == n.div_ceil(64) {
            assert_same_outcome("topk_mask", &got, &expect_mask);
        } else {
            assert!(got.is_err() || n.div_ceil(64) == mask_len);
        }
        if let (Ok(()), Ok(want)) = (&got, &expect_mask) {
            let bits: Vec<bool> = (0..n).map(|i| mask[i / 64] >> (i % 64) & 1 == 1).collect();
            assert_eq!(&bits, want, "{}", cpu.isa());
        }
        let mut kept = vec![f32::NAN; n];
        let got = topk_keep(&cpu, &x, keep, &mut kept);
        assert_same_outcome("topk_keep", &got, &expect_mask);
        if let (Ok(()), Ok(want)) = (&got, &expect_mask) {
            for i in 0..n {
                let expect = if want[i] { x[i] } else { 0.0 };
                assert_eq!(kept[i].to_bits(), expect.to_bits(), "topk_keep {i}");
            }
        }
        let mut indices = Vec::new();
        let got = topk_indices(&cpu, &[&x], keep, &mut indices);
        assert_same_outcome("topk_indices", &got, &expect_indices);
        if let (Ok(_), Ok(want)) = (&got, &expect_indices) {
            assert_eq!(&indices, want);
        }
        let got = kth_largest_magnitude(&cpu, &[&x], k);
        assert_same_outcome("kth_largest_magnitude", &got, &expect_kth);
        if let (Ok(g), Ok(e)) = (&got, &expect_kth) {
            assert_eq!(g.to_bits(), e.to_bits());
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
