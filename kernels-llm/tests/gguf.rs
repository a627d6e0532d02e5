//! The GGUF reader: files the tests write (every supported tensor type, hand-worked values),
//! hostile files (each malformation an error with its offset, never a panic or a large
//! allocation), and the real SmolLM2 file where `scripts/fetch-smollm2.sh` has fetched it.

use half::{bf16, f16};
use kernels_core::{CounterRng, Error};
use kernels_llm::gguf::{GgmlType, Gguf, Value, Writer, dequantize_into};

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

/// A file with metadata of several types and one tensor of each supported type.
fn sample() -> Vec<u8> {
    let mut w = Writer::new();
    w.metadata_str("general.architecture", "llama");
    w.metadata_u32("llama.block_count", 2);
    w.metadata_f32("llama.rope.freq_base", 10000.0);
    w.metadata_bool("tokenizer.ggml.add_bos_token", true);
    w.metadata_strs("tokenizer.ggml.tokens", &["<s>", "a", "Ġb"]);
    w.metadata_i32s("tokenizer.ggml.token_type", &[3, 1, 1]);
    w.tensor_f32("f32", &[3], &[1.5, -2.0, 0.25]);
    let f16s: Vec<u8> = [0.5f32, -0.125]
        .iter()
        .flat_map(|&v| f16_bytes(v))
        .collect();
    w.tensor_raw("f16", &[2], GgmlType::F16, &f16s);
    let bf16s: Vec<u8> = [3.0f32, -1.0]
        .iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect();
    w.tensor_raw("bf16", &[2], GgmlType::BF16, &bf16s);
    // Q8_0: d = 0.25, q = -16..16.
    let mut q8 = f16_bytes(0.25).to_vec();
    q8.extend((0..32).map(|j| (j as i8 - 16) as u8));
    w.tensor_raw("q8_0", &[32], GgmlType::Q8_0, &q8);
    // Q4_0: d = 2, nibbles j (low) and 15 - j (high).
    let mut q4 = f16_bytes(2.0).to_vec();
    q4.extend((0..16u8).map(|j| j | (15 - j) << 4));
    w.tensor_raw("q4_0", &[32], GgmlType::Q4_0, &q4);
    // Q4_1: two rows of one block each, d = 0.5, m = -1 and d = 1, m = 0.25.
    let mut q41 = Vec::new();
    for (d, m) in [(0.5, -1.0), (1.0, 0.25)] {
        q41.extend(f16_bytes(d));
        q41.extend(f16_bytes(m));
        q41.extend((0..16u8).map(|j| j | (15 - j) << 4));
    }
    w.tensor_raw("q4_1", &[32, 2], GgmlType::Q4_1, &q41);
    w.finish()
}

#[test]
fn every_supported_type_dequantises_as_ggml_does() {
    let bytes = sample();
    let file = Gguf::parse(&bytes).unwrap();
    assert_eq!(file.version, 3);
    assert_eq!(file.str("general.architecture"), Some("llama"));
    assert_eq!(file.u64("llama.block_count"), Some(2));
    assert_eq!(file.f64("llama.rope.freq_base"), Some(10000.0));
    assert_eq!(
        file.get("tokenizer.ggml.add_bos_token"),
        Some(&Value::Bool(true))
    );
    let tokens = file
        .get("tokenizer.ggml.tokens")
        .unwrap()
        .as_array()
        .unwrap();
    assert_eq!(tokens[2].as_str(), Some("Ġb"));
    assert_eq!(file.dequantize("f32").unwrap(), [1.5, -2.0, 0.25]);
    assert_eq!(file.dequantize("f16").unwrap(), [0.5, -0.125]);
    assert_eq!(file.dequantize("bf16").unwrap(), [3.0, -1.0]);
    let q8 = file.dequantize("q8_0").unwrap();
    assert_eq!((q8[0], q8[16], q8[31]), (-4.0, 0.0, 3.75));
    let q4 = file.dequantize("q4_0").unwrap();
    // Low nibbles are the block's first 16 values, high nibbles its last 16.
    assert_eq!((q4[0], q4[15], q4[16], q4[31]), (-16.0, 14.0, 14.0, -16.0));
    let q41 = file.dequantize("q4_1").unwrap();
    assert_eq!(q41.len(), 64);
    assert_eq!((q41[0], q41[15], q41[16], q41[31]), (-1.0, 6.5, 6.5, -1.0));
    assert_eq!(
        (q41[32], q41[47], q41[48], q41[63]),
        (0.25, 15.25, 15.25, 0.25)
    );
    let t = file.tensor("q4_1").unwrap();
    assert_eq!(
        (t.dims.clone(), t.elements, t.bytes),
        (vec![32, 2], 64, Some(40))
    );
    assert_eq!(file.data_offset % 32, 0);
}

/// The reference formulas, written out independently: `d * q` and `d * q + m` in `f32` from
/// random blocks, for every block of a multi-block tensor.
#[test]
fn quantised_blocks_match_the_formulas_on_random_data() {
    let rng = CounterRng::new(5);
    let blocks = 7;
    let mut q8 = Vec::new();
    let mut q41 = Vec::new();
    let (mut expect8, mut expect41) = (Vec::new(), Vec::new());
    for b in 0..blocks {
        let d = f16::from_f32(rng.normal_at(b) as f32 * 0.01);
        let m = f16::from_f32(rng.normal_at(100 + b) as f32 * 0.1);
        q8.extend(d.to_le_bytes());
        q41.extend(d.to_le_bytes());
        q41.extend(m.to_le_bytes());
        let mut nibbles = [0u8; 32];
        for j in 0..32u64 {
            let q = rng.u32_at(1000 + b * 64 + j) as u8;
            q8.push(q);
            expect8.push(f32::from(q as i8) * d.to_f32());
            nibbles[j as usize] = (rng.u32_at(5000 + b * 64 + j) & 15) as u8;
        }
        q41.extend((0..16).map(|j| nibbles[j] | nibbles[j + 16] << 4));
        expect41.extend(
            nibbles
                .iter()
                .map(|&q| f32::from(q) * d.to_f32() + m.to_f32()),
        );
    }
    let n = 32 * blocks as usize;
    let mut out = vec![f32::NAN; n];
    dequantize_into(GgmlType::Q8_0, &q8, &mut out).unwrap();
    assert_eq!(out, expect8);
    dequantize_into(GgmlType::Q4_1, &q41, &mut out).unwrap();
    assert_eq!(out, expect41);
    // Wrong lengths and unknown types are errors.
    assert!(matches!(
        dequantize_into(GgmlType::Q8_0, &q8[1..], &mut out),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        dequantize_into(GgmlType(14), &[0; 210], &mut vec![0.0; 256]),
        Err(Error::Unsupported { .. })
    ));
    assert!(dequantize_into(GgmlType(99), &[], &mut []).is_err());
}

fn bad_at(bytes: &[u8]) -> (usize, &'static str) {
    match Gguf::parse(bytes) {
        Err(Error::BadFormat { offset, reason }) => (offset, reason),
        other => panic!("expected BadFormat, got {other:?}"),
    }
}

/// A header: magic, version, tensor count, metadata count.
fn header(version: u32, tensors: u64, kvs: u64) -> Vec<u8> {
    let mut h = b"GGUF".to_vec();
    h.extend(version.to_le_bytes());
    h.extend(tensors.to_le_bytes());
    h.extend(kvs.to_le_bytes());
    h
}

fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// One tensor entry.
fn entry(name: &str, dims: &[u64], ggml_type: u32, offset: u64) -> Vec<u8> {
    let mut e = string(name.as_bytes());
    e.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        e.extend(d.to_le_bytes());
    }
    e.extend(ggml_type.to_le_bytes());
    e.extend(offset.to_le_bytes());
    e
}

#[test]
fn malformed_files_are_errors_with_their_offset() {
    assert_eq!(bad_at(b"GGU").1, "a file shorter than GGUF's magic");
    assert_eq!(bad_at(b"GGML\x03\0\0\0").1, "not a GGUF file (wrong magic)");
    assert_eq!(
        bad_at(&header(1, 0, 0)).1,
        "a GGUF version other than 2 or 3"
    );
    // Counts no file could hold are refused before anything is allocated for them.
    assert_eq!(
        bad_at(&header(3, u64::MAX, 0)).1,
        "more tensors than the file has room for"
    );
    assert_eq!(
        bad_at(&header(3, 0, 1 << 40)).1,
        "more metadata than the file has room for"
    );
    let kv = |kind: u32, value: &[u8]| {
        let mut f = header(3, 0, 1);
        f.extend(string(b"k"));
        f.extend(kind.to_le_bytes());
        f.extend_from_slice(value);
        f
    };
    assert_eq!(bad_at(&kv(7, &[2])).1, "a bool that is neither 0 nor 1");
    assert_eq!(bad_at(&kv(13, &[0; 8])).1, "an unknown metadata value type");
    assert_eq!(
        bad_at(&kv(8, &string(b"\xff\xfe"))).1,
        "a string that is not UTF-8"
    );
    assert_eq!(
        bad_at(&kv(8, &u64::MAX.to_le_bytes())).1,
        "a string longer than the file"
    );
    // An array of 2^60 uint64s, and arrays nested three deep.
    let mut huge = 10u32.to_le_bytes().to_vec();
    huge.extend((1u64 << 60).to_le_bytes());
    assert_eq!(bad_at(&kv(9, &huge)).1, "an array longer than the file");
    let mut nested = Vec::new();
    for _ in 0..3 {
        nested.extend(9u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
    }
    nested.extend(4u32.to_le_bytes());
    nested.extend(0u64.to_le_bytes());
    assert_eq!(bad_at(&kv(9, &nested)).1, "arrays nested too deep");
    let mut f = header(3, 0, 1);
    f.extend(string(b"general.alignment"));
    f.extend(4u32.to_le_bytes());
    f.extend(48u32.to_le_bytes());
    assert_eq!(bad_at(&f).1, "general.alignment is not a power of two");
    let tensor = |e: Vec<u8>, data: usize| {
        let mut f = header(3, 1, 0);
        f.extend(e);
        f.resize(f.len().next_multiple_of(32) + data, 0);
        f
    };
    assert_eq!(
        bad_at(&tensor(entry("t", &[1, 1, 1, 1, 1], 0, 0), 4)).1,
        "a tensor with more than 4 dimensions"
    );
    assert_eq!(
        bad_at(&tensor(entry("t", &[1 << 40, 1 << 40], 0, 0), 4)).1,
        "a tensor shape whose size overflows"
    );
    assert_eq!(
        bad_at(&tensor(entry("t", &[16], 3, 0), 64)).1,
        "a quantised row that is not whole blocks"
    );
    assert_eq!(
        bad_at(&tensor(entry("t", &[4], 0, 8), 64)).1,
        "a tensor offset that is not aligned"
    );
    assert_eq!(
        bad_at(&tensor(entry("t", &[17], 0, 0), 64)).1,
        "tensor data past the end of the file"
    );
    assert_eq!(
        bad_at(&tensor(entry("t", &[4], 0, u64::MAX - 31), 64)).1,
        "tensor data past the end of the file"
    );
    let mut twice = header(3, 2, 0);
    twice.extend(entry("t", &[1], 0, 0));
    twice.extend(entry("t", &[1], 0, 32));
    twice.resize(twice.len().next_multiple_of(32) + 64, 0);
    assert_eq!(bad_at(&twice).1, "a tensor name given twice");
    // A type this reader does not know is listed, and refused when read.
    let unknown = tensor(entry("t", &[4], 77, 0), 64);
    let file = Gguf::parse(&unknown).unwrap();
    assert_eq!(file.tensor("t").unwrap().bytes, None);
    assert!(matches!(
        file.dequantize("t"),
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        file.dequantize("absent"),
        Err(Error::InvalidParam { .. })
    ));
}

/// Every prefix of a valid file, and thousands of byte mutations of it, parse to an error or to
/// a file whose tensors all read back (or are refused): never a panic.
#[test]
fn truncations_and_mutations_never_panic() {
    let bytes = sample();
    for len in 0..bytes.len() {
        let _ = Gguf::parse(&bytes[..len]).map(|f| {
            for t in &f.tensors {
                let _ = f.dequantize(t.name);
            }
        });
    }
    let rng = CounterRng::new(11);
    for trial in 0..5000u64 {
        let mut mutated = bytes.clone();
        for k in 0..4 {
            let at = rng.u32_at(trial * 8 + k) as usize % mutated.len();
            mutated[at] = rng.u32_at(trial * 8 + 4 + k) as u8;
        }
        if let Ok(f) = Gguf::parse(&mutated) {
            for t in &f.tensors {
                let _ = f.dequantize(t.name);
            }
        }
    }
}

/// The real model, where it has been fetched (`scripts/fetch-smollm2.sh`); skipped otherwise.
#[test]
fn smollm2_parses_where_fetched() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let Ok(bytes) = std::fs::read(&path) else {
        eprintln!("skipped: {} not fetched", path.display());
        return;
    };
    let file = Gguf::parse(&bytes).unwrap();
    assert_eq!(file.str("general.architecture"), Some("llama"));
    assert_eq!(file.u64("llama.block_count"), Some(30));
    assert_eq!(file.u64("llama.embedding_length"), Some(576));
    assert_eq!(file.tensors.len(), 272);
    let tokens = file
        .get("tokenizer.ggml.tokens")
        .unwrap()
        .as_array()
        .unwrap();
    assert_eq!(tokens.len(), 49152);
    let embed = file.tensor("token_embd.weight").unwrap();
    assert_eq!(
        (embed.ggml_type, embed.dims.clone()),
        (GgmlType::Q8_0, vec![576, 49152])
    );
    let q = file.dequantize("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.len(), 576 * 576);
    assert!(q.iter().all(|v| v.is_finite()) && q.iter().any(|&v| v != 0.0));
}
