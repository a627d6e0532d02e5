//! Packed ternary kernels on every ISA and thread count: decode and decompress-add bit-identical
//! to the reference, GEMV within tolerance, garbled bytes rejected exactly when the reference
//! decoder rejects them.

use kernels_core::ops::ternary::{ternary_add_ref, ternary_gemv_ref};
use kernels_cpu::format;
use kernels_cpu::gemv::gemv_tolerance;
use kernels_cpu::prelude::*;
use kernels_testkit::{EDGE_DIMS, assert_close, isa_tests, normal, random_codes};
use proptest::prelude::*;

const LAYOUTS: [TernaryLayout; 2] = [TernaryLayout::Dense2Bit, TernaryLayout::SparseRice];

fn decode_matches(cpu: &Cpu) {
    for n in [0usize, 1, 3, 4, 5, 63, 64, 65, 127, 1000, 4099, 70_001] {
        for density in [0.0, 0.05, 0.5, 1.0] {
            let c = random_codes(n, density, n as u64);
            for layout in LAYOUTS {
                let bytes = format::encode(&c, &[n as u64], -0.5, layout).unwrap();
                let packed = PackedTernary::new(cpu, &bytes).unwrap();
                let mut got = vec![7i8; n];
                ternary_codes(cpu, &packed, &mut got).unwrap();
                assert_eq!(got, c, "n={n} d={density} {layout:?} {cpu:?}");
                let nnz = c.iter().filter(|&&v| v != 0).count() as u64;
                assert_eq!((packed.header().nnz, packed.len()), (nnz, n));
                assert!(ternary_codes(cpu, &packed, &mut vec![0; n + 1]).is_err());
                // Values: scale * code exactly, +0.0 for a zero code.
                let mut values = vec![f32::NAN; n];
                ternary_decode(cpu, &packed, &mut values).unwrap();
                for (v, &k) in values.iter().zip(&c) {
                    let expect = if k == 0 { 0.0 } else { -0.5 * f32::from(k) };
                    assert_eq!(v.to_bits(), expect.to_bits());
                }
                assert!(ternary_decode(cpu, &packed, &mut vec![0.0; n + 1]).is_err());
            }
        }
    }
}

fn add_matches<T: Element>(cpu: &Cpu) {
    for n in [0usize, 1, 5, 64, 65, 1000, 4099] {
        let c = random_codes(n, 0.3, 7 + n as u64);
        let base: Vec<T> = normal(n, 3);
        for layout in LAYOUTS {
            let bytes = format::encode(&c, &[n as u64], 0.37, layout).unwrap();
            let mut got = base.clone();
            let packed = PackedTernary::new(cpu, &bytes).unwrap();
            ternary_add(cpu, &mut got, &packed, -1.3).unwrap();
            let mut expect = base.clone();
            ternary_add_ref(&mut expect, &c, 0.37, -1.3).unwrap();
            let bits = |v: &[T]| v.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&got),
                bits(&expect),
                "{:?} n={n} {layout:?} {cpu:?}",
                T::DTYPE
            );
        }
    }
}

fn add_f32(cpu: &Cpu) {
    add_matches::<f32>(cpu);
}
fn add_f16(cpu: &Cpu) {
    add_matches::<f16>(cpu);
}
fn add_bf16(cpu: &Cpu) {
    add_matches::<bf16>(cpu);
}

fn gemv_matches(cpu: &Cpu) {
    for &rows in &EDGE_DIMS[..8] {
        for &cols in &EDGE_DIMS {
            let c = random_codes(rows * cols, 0.4, (rows * 1000 + cols) as u64);
            let x: Vec<f32> = normal(cols, 5);
            let mut expect = vec![0.0; rows];
            ternary_gemv_ref(
                MatRef::from_slice(&c, rows, cols).unwrap(),
                0.8,
                &x,
                &mut expect,
            )
            .unwrap();
            for layout in LAYOUTS {
                let bytes = format::encode(&c, &[rows as u64, cols as u64], 0.8, layout).unwrap();
                let mut y = vec![f32::NAN; rows];
                let packed = PackedTernary::new(cpu, &bytes).unwrap();
                ternary_gemv(cpu, &packed, &x, &mut y).unwrap();
                let abs: Vec<f64> = c
                    .chunks(cols.max(1))
                    .map(|row| {
                        row.iter()
                            .zip(&x)
                            .map(|(&k, &v)| 0.8 * f64::from(k.abs()) * f64::from(v.abs()))
                            .sum()
                    })
                    .collect();
                assert_close(
                    &format!("ternary gemv {rows}x{cols} {layout:?} {cpu:?}"),
                    &y,
                    &expect,
                    |r| {
                        gemv_tolerance(cols, abs.get(r).copied().unwrap_or(0.0))
                            + 1e-7 * f64::from(expect[r].abs())
                    },
                );
            }
        }
    }
}

fn bad_inputs(cpu: &Cpu) {
    let c = random_codes(100, 0.3, 1);
    let dense = format::encode(&c, &[10, 10], 1.0, TernaryLayout::Dense2Bit).unwrap();
    let dense = PackedTernary::new(cpu, &dense).unwrap();
    let mut y = vec![0.0; 10];
    assert!(matches!(
        ternary_gemv(cpu, &dense, &[0.0; 9], &mut y),
        Err(Error::LengthMismatch { what: "x", .. })
    ));
    assert!(ternary_gemv(cpu, &dense, &[0.0; 10], &mut y[..9]).is_err());
    let flat = format::encode(&c, &[100], 1.0, TernaryLayout::Dense2Bit).unwrap();
    let packed = PackedTernary::new(cpu, &flat).unwrap();
    assert!(
        ternary_gemv(cpu, &packed, &[0.0; 100], &mut [0.0; 1]).is_err(),
        "1-D"
    );
    assert!(ternary_add(cpu, &mut [0.0f32; 100], &packed, f32::NAN).is_err());
    assert!(ternary_add(cpu, &mut [0.0f32; 99], &packed, 1.0).is_err());
    // Garbled bytes are rejected when the tensor is made, before any op can touch its output.
    let mut garbled = flat.clone();
    *garbled.last_mut().unwrap() = 0xFF;
    assert!(matches!(
        PackedTernary::new(cpu, &garbled),
        Err(Error::BadFormat { .. })
    ));
}

isa_tests!(
    decode_matches,
    add_f32,
    add_f16,
    add_bf16,
    gemv_matches,
    bad_inputs
);

/// Accept and reject exactly as the reference decoder, on any mutation of valid encodings.
fn check_garbled(bytes: &[u8], n: usize) {
    let mut expect = vec![0i8; n];
    let reference = format::decode_into(bytes, &mut expect);
    for threads in [1, 3] {
        let cpu = Cpu::detect()
            .with_threads(threads)
            .unwrap()
            .with_min_bytes_per_thread(1);
        let packed = match (&reference, PackedTernary::new(&cpu, bytes)) {
            (Ok(_), Ok(packed)) => packed,
            (Err(_), Err(_)) => continue,
            (_, fast) => panic!("reference {reference:?} but fast {fast:?}"),
        };
        let mut got = vec![0i8; n];
        ternary_codes(&cpu, &packed, &mut got).unwrap();
        assert_eq!(got, expect);
        let mut theta = vec![0.5f32; n];
        let mut theta_ref = theta.clone();
        ternary_add(&cpu, &mut theta, &packed, 2.0).unwrap();
        ternary_add_ref(&mut theta_ref, &expect, packed.header().scale, 2.0).unwrap();
        assert_eq!(theta, theta_ref);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn garbled_bytes_are_rejected_as_the_reference_rejects_them(
        n in 0usize..300,
        density in 0.0f64..1.0,
        sparse in any::<bool>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 0..4),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let layout = if sparse { TernaryLayout::SparseRice } else { TernaryLayout::Dense2Bit };
        let mut bytes = format::encode(&random_codes(n, density, n as u64), &[n as u64], 1.5, layout).unwrap();
        let header = kernels_core::backend::header_len(1);
        for (at, bit) in flips {
            // Flip payload bits (the header is the parser's job, tested in kernels-core).
            if bytes.len() > header {
                let i = header + at.index(bytes.len() - header);
                bytes[i] ^= 1 << bit;
            }
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        check_garbled(&bytes, n);
    }
}

const BLOCK: usize = format::RICE_BLOCK as usize;

/// Sparse payloads of many blocks, walked by several cursors per thread: every op gives the
/// reference's result on 1, 2 and 3 threads, in both format versions (version 1 is one stream),
/// and the GEMV the same bits whatever the split and the version (each row summed in order).
#[test]
fn sparse_blocks_on_any_split() {
    // Rows inside a block, rows across blocks, rows of whole blocks, a tail block of one element.
    for (rows, cols, density) in [
        (97, 7001, 0.1),
        (40_001, 5, 0.5),
        (3, 2 * BLOCK + 1, 0.02),
        (4, BLOCK, 1e-4),
        (1, 3 * BLOCK + 1, 0.0),
    ] {
        let n = rows * cols;
        let mut c = random_codes(n, density, n as u64);
        // A full block and an empty one.
        if n >= 3 * BLOCK {
            c[BLOCK..2 * BLOCK].fill(-1);
            c[2 * BLOCK..3 * BLOCK].fill(0);
        }
        let x: Vec<f32> = normal(cols, 11);
        let base: Vec<bf16> = normal(n, 5);
        let mut expect_theta = base.clone();
        ternary_add_ref(&mut expect_theta, &c, 0.75, 1.5).unwrap();
        let mut expect_y = vec![0.0; rows];
        ternary_gemv_ref(
            MatRef::from_slice(&c, rows, cols).unwrap(),
            0.75,
            &x,
            &mut expect_y,
        )
        .unwrap();
        let mut first_y: Option<Vec<f32>> = None;
        for version in [2, 1] {
            let shape = [rows as u64, cols as u64];
            let bytes =
                format::encode_version(&c, &shape, 0.75, TernaryLayout::SparseRice, version)
                    .unwrap();
            for threads in [1, 2, 3] {
                let cpu = Cpu::detect()
                    .with_threads(threads)
                    .unwrap()
                    .with_min_bytes_per_thread(1);
                let what = format!("{rows}x{cols} d={density} v{version} {threads} threads");
                let packed = PackedTernary::new(&cpu, &bytes).unwrap();
                let mut codes = vec![7i8; n];
                ternary_codes(&cpu, &packed, &mut codes).unwrap();
                assert!(codes == c, "codes {what}");
                let mut values = vec![f32::NAN; n];
                ternary_decode(&cpu, &packed, &mut values).unwrap();
                assert!(
                    values
                        .iter()
                        .zip(&c)
                        .all(|(v, &k)| *v == 0.75 * f32::from(k)),
                    "values {what}"
                );
                let mut theta = base.clone();
                ternary_add(&cpu, &mut theta, &packed, 1.5).unwrap();
                assert!(theta == expect_theta, "add {what}");
                let mut y = vec![f32::NAN; rows];
                ternary_gemv(&cpu, &packed, &x, &mut y).unwrap();
                if let Some(first) = &first_y {
                    assert_eq!(
                        y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        first.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "gemv {what}"
                    );
                } else {
                    let abs: f64 = x.iter().map(|v| 0.75 * f64::from(v.abs())).sum();
                    assert_close(&format!("gemv {what}"), &y, &expect_y, |_| {
                        gemv_tolerance(cols, abs)
                    });
                    first_y = Some(y);
                }
            }
        }
    }
}

/// Index entries that do not describe the streams are rejected when the tensor is made, as the
/// reference rejects them.
#[test]
fn inconsistent_block_index_is_rejected() {
    let n = 3 * BLOCK + 77;
    let c = random_codes(n, 0.05, 9);
    let good = format::encode(&c, &[n as u64], 1.0, TernaryLayout::SparseRice).unwrap();
    let index = kernels_core::backend::header_len(1);
    let entry = |bytes: &[u8], b: usize, half: usize| {
        let at = index + 8 * b + 4 * half;
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    };
    let set = |bytes: &mut Vec<u8>, b: usize, half: usize, v: u32| {
        let at = index + 8 * b + 4 * half;
        bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    };
    let mut cases = Vec::new();
    // Two blocks' entries swapped: the lengths and counts still add up, the streams do not fit.
    let mut swapped = good.clone();
    let (a, b) = (
        (entry(&good, 0, 0), entry(&good, 0, 1)),
        (entry(&good, 1, 0), entry(&good, 1, 1)),
    );
    set(&mut swapped, 0, 0, b.0);
    set(&mut swapped, 0, 1, b.1);
    set(&mut swapped, 1, 0, a.0);
    set(&mut swapped, 1, 1, a.1);
    cases.push(("swapped entries", swapped));
    // One byte moved from a block's stream to the next one's.
    let mut moved = good.clone();
    set(&mut moved, 1, 0, entry(&good, 1, 0) - 1);
    set(&mut moved, 2, 0, entry(&good, 2, 0) + 1);
    cases.push(("a byte moved between blocks", moved));
    // One non-zero moved from a block to the next.
    let mut recounted = good.clone();
    set(&mut recounted, 2, 1, entry(&good, 2, 1) - 1);
    set(&mut recounted, 3, 1, entry(&good, 3, 1) + 1);
    cases.push(("a count moved between blocks", recounted));
    // More non-zeros than the block has elements.
    let mut overfull = good.clone();
    set(&mut overfull, 3, 1, 78);
    cases.push(("the last block overfull", overfull));
    // An index shorter than the blocks need.
    let mut short = good[..index].to_vec();
    short[index - 8..].copy_from_slice(&0u64.to_le_bytes());
    cases.push(("no index", short));
    for (what, bytes) in cases {
        let reference = format::decode(&bytes, n);
        assert!(
            matches!(reference, Err(Error::BadFormat { .. })),
            "{what}: {reference:?}"
        );
        for threads in [1, 3] {
            let cpu = Cpu::detect()
                .with_threads(threads)
                .unwrap()
                .with_min_bytes_per_thread(1);
            let got = PackedTernary::new(&cpu, &bytes).map(|_| ());
            assert_eq!(
                got,
                reference.as_ref().map(|_| ()).map_err(Clone::clone),
                "{what}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn garbled_blocks_are_rejected_as_the_reference_rejects_them(
        density in 0.0f64..0.2,
        version in 1u8..=2,
        flips in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..3),
        in_index in any::<bool>(),
    ) {
        let n = 3 * BLOCK + 77;
        let mut bytes = format::encode_version(
            &random_codes(n, density, 5), &[n as u64], 1.5, TernaryLayout::SparseRice, version,
        ).unwrap();
        let header = kernels_core::backend::header_len(1);
        // Flips in the index (version 2: its first 32 bytes) or anywhere in the payload.
        let span = if in_index && version == 2 { 32 } else { bytes.len() - header };
        for (at, bit) in flips {
            bytes[header + at.index(span)] ^= 1 << bit;
        }
        check_garbled(&bytes, n);
    }
}
