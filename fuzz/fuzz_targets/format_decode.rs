//! The packed ternary decoder on arbitrary bytes: the header parser, `decode`, `decode_into` and
//! the CPU's `PackedTernary` must agree on what is valid, and where it is, on every code, on the
//! decoded values and on the GEMV straight from the bytes, in both format versions. Allocation is bounded by the caller's
//! element limit.
#![no_main]

use kernels_core::format::{self, TernaryHeader, TernaryLayout};
use kernels_core::ops::ternary::ternary_gemv_ref;
use kernels_cpu::gemv::gemv_tolerance;
use kernels_cpu::prelude::*;
use kernels_fuzz::{assert_close, assert_same_outcome, backends, within_f32};
use libfuzzer_sys::fuzz_target;

/// The most codes a case decodes: a sparse header's element count is not bounded by its bytes.
const MAX_ELEMENTS: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    // The first byte picks a valid start (so the fuzzer reaches the payload), the rest mutates.
    let bytes: Vec<u8> = match data.split_first() {
        Some((&mode, rest)) if mode % 2 == 0 && rest.len() >= 2 => {
            let codes: Vec<i8> = rest[2..].iter().map(|b| (*b % 3) as i8 - 1).collect();
            let layout = if rest[0] % 2 == 0 {
                TernaryLayout::Dense2Bit
            } else {
                TernaryLayout::SparseRice
            };
            let n = codes.len() as u64;
            let cols = u64::from(rest[1] % 8) + 1;
            let shape: &[u64] = if n % cols == 0 {
                &[n / cols, cols]
            } else {
                &[n]
            };
            // Both versions: version 1's sparse payload is one stream, version 2's has blocks.
            let version = 1 + (rest[0] / 2) % 2;
            format::encode_version(&codes, shape, 0.5, layout, version).expect("valid codes")
        }
        Some((_, rest)) => rest.to_vec(),
        None => return,
    };
    let header = TernaryHeader::parse(&bytes);
    let decoded = format::decode(&bytes, MAX_ELEMENTS);
    let cpu = Cpu::detect();
    let packed = PackedTernary::new(&cpu, &bytes);
    let Ok(header) = header else {
        assert!(decoded.is_err() && packed.is_err());
        return;
    };
    if header.numel > MAX_ELEMENTS as u64 {
        assert!(decoded.is_err());
        return;
    }
    let mut codes = vec![0i8; header.numel as usize];
    let into = format::decode_into(&bytes, &mut codes);
    assert_same_outcome("decode_into", &into, &decoded);
    assert_same_outcome("PackedTernary::new", &packed, &decoded);
    let (Ok((_, expect_codes)), Ok(packed)) = (decoded, packed) else {
        return;
    };
    assert_eq!(codes, expect_codes);
    for cpu in backends() {
        let mut got = vec![7i8; codes.len()];
        ternary_codes(&cpu, &packed, &mut got).unwrap();
        assert_eq!(got, codes, "{}", cpu.isa());
        let mut values = vec![f32::NAN; codes.len()];
        ternary_decode(&cpu, &packed, &mut values).unwrap();
        for (v, &c) in values.iter().zip(&codes) {
            assert_eq!(*v, f32::from(c) * header.scale);
        }
        if let &[rows, cols] = header.shape() {
            let (rows, cols) = (rows as usize, cols as usize);
            if rows.max(cols) > MAX_ELEMENTS {
                // No codes, but more rows or columns than a caller's `y` or `x` could hold:
                // what it can pass is refused.
                let x = vec![1.0f32; if cols > MAX_ELEMENTS { 1 } else { cols }];
                let got = ternary_gemv(&cpu, &packed, &x, &mut []);
                assert!(matches!(got, Err(Error::LengthMismatch { .. })), "{got:?}");
                continue;
            }
            let x: Vec<f32> = (0..cols).map(|j| (j % 7) as f32 - 3.0).collect();
            let mut expect = vec![0.0f32; rows];
            ternary_gemv_ref(
                MatRef::from_slice(&codes, rows, cols).unwrap(),
                header.scale,
                &x,
                &mut expect,
            )
            .unwrap();
            let mut y = vec![f32::NAN; rows];
            ternary_gemv(&cpu, &packed, &x, &mut y).unwrap();
            let abs_sum = 3.0 * cols as f64 * f64::from(header.scale.abs());
            assert_close("ternary_gemv", &y, &expect, |_| {
                within_f32(abs_sum, gemv_tolerance(cols, abs_sum))
            });
        }
    }
});
