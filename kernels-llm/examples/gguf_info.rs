//! Prints a GGUF file's metadata and tensor table, and checks every tensor this reader can
//! dequantise reads back finite.
//!
//! Run: `cargo run --release -p kernels-llm --example gguf_info -- [FILE]` (default: the
//! SmolLM2 file `scripts/fetch-smollm2.sh` fetches; without it, a small file written here).

use kernels_core::Error;
use kernels_llm::gguf::{Gguf, Value, Writer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
        .into()
    });
    let bytes = std::fs::read(&path).unwrap_or_else(|_| {
        println!("{path} not found: a small file written here instead");
        let mut w = Writer::new();
        w.metadata_str("general.architecture", "llama");
        w.tensor_f32("output_norm.weight", &[4], &[1.0, 0.5, 0.25, 2.0]);
        w.finish()
    });
    let file = Gguf::parse(&bytes)?;
    println!(
        "GGUF v{}, {} tensors, alignment {}",
        file.version,
        file.tensors.len(),
        file.alignment
    );
    for (key, value) in &file.metadata {
        match value {
            Value::Array(items) => println!("  {key}: [{} items]", items.len()),
            Value::Str(s) if s.len() > 60 => {
                println!("  {key}: {:?}...", s.chars().take(60).collect::<String>());
            }
            other => println!("  {key}: {other:?}"),
        }
    }
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for t in &file.tensors {
        *counts.entry(t.ggml_type.name()).or_default() += 1;
    }
    println!("tensor types: {counts:?}");
    let mut read = 0u64;
    for t in &file.tensors {
        let values = match file.dequantize(t.name) {
            // A type this reader lists but does not dequantise (a K-quant, say).
            Err(Error::Unsupported { .. }) => continue,
            other => other?,
        };
        assert!(
            values.iter().all(|v| v.is_finite()),
            "{} has a non-finite value",
            t.name
        );
        read += values.len() as u64;
    }
    println!("dequantised {read} values, all finite");
    Ok(())
}
