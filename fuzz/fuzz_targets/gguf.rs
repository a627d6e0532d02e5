//! The GGUF reader on arbitrary bytes: it never panics; a file it accepts has every tensor of a
//! known type inside its data section, as many bytes as its shape and type need; every tensor
//! it can dequantise reads back to exactly its element count, and never allocates more than the
//! input justifies (libFuzzer's RSS limit catches a header that makes it try).
#![no_main]

use kernels_llm::gguf::Gguf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = Gguf::parse(data) else {
        return;
    };
    assert!(file.data_offset % file.alignment as usize == 0);
    for t in &file.tensors {
        if let Ok(raw) = file.raw(t) {
            assert_eq!(Some(raw.len() as u64), t.bytes, "{}", t.name);
        }
        if let Ok(values) = file.dequantize(t.name) {
            assert_eq!(values.len() as u64, t.elements, "{}", t.name);
        }
    }
    for (key, _) in &file.metadata {
        assert!(file.get(key).is_some());
    }
});
