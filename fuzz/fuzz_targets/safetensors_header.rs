//! The safetensors shard and index readers, and the compressed task vector's reader, on
//! arbitrary bytes: a shard they accept has every
//! tensor's bytes inside the file, as many as its shape and type need, no two overlapping; an
//! index they accept names only plain shard files. Neither panics, and neither allocates more
//! than the input justifies.
#![no_main]

use kernels_cli::checkpoint::{parse_index, shard_tensors};
use kernels_cli::compeft::packed_tensors;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = shard_tensors(data, 0) {
        let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
        for (name, entry) in &entries {
            assert!(
                entry.bytes.end <= data.len(),
                "{name}: {:?} past {}",
                entry.bytes,
                data.len()
            );
            let elements = entry
                .shape
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .expect("an accepted shape's size fits");
            assert_eq!(entry.bytes.len(), elements * entry.dtype.size(), "{name}");
            ranges.push(entry.bytes.clone());
        }
        ranges.sort_by_key(|r| r.start);
        for pair in ranges.windows(2) {
            assert!(pair[0].end <= pair[1].start || pair[0].is_empty() || pair[1].is_empty());
        }
    }
    if let Ok(tensors) = packed_tensors(data) {
        for range in tensors.values() {
            assert!(range.end <= data.len() && range.start <= range.end);
        }
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data)
        && let Ok(map) = parse_index(&value)
    {
        for file in map.values() {
            assert!(!file.contains('/') && !file.contains('\\') && file.ends_with(".safetensors"));
        }
    }
});
