//! mergekit's YAML config reader on arbitrary text: it accepts or refuses with a line inside the
//! text, never panics, and every parameter of what it accepts resolves for any tensor and layer
//! position without panicking (filters that match nothing resolve to nothing).
#![no_main]

use kernels_cli::config::MergeConfig;
use libfuzzer_sys::fuzz_target;

const TENSORS: [&str; 3] = [
    "model.embed_tokens.weight",
    "model.layers.3.mlp.up_proj.weight",
    "lm_head.weight",
];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // YAML breaks lines at \n, \r and \r\n: at most one line per break, plus one, plus the
    // line after the end, where the parser places an empty node that ends the input.
    let lines = text.matches(['\n', '\r']).count() + 2;
    match MergeConfig::parse(&text) {
        Err(e) => {
            if let Some(line) = e.line {
                assert!(line <= lines, "line {line} of {lines}: {e}");
            }
        }
        Ok(config) => {
            assert_eq!(MergeConfig::parse(&text).as_ref(), Ok(&config));
            for tensor in TENSORS {
                for t in [0.0, 0.37, 1.0] {
                    for (name, value) in &config.parameters {
                        let _ = value.resolve(tensor, t);
                        let _ = config.global_parameter(name, tensor, t, None);
                    }
                    for (i, model) in config.models.iter().enumerate() {
                        for name in model.parameters.keys() {
                            let _ = config.model_parameter(i, name, tensor, t, None);
                        }
                    }
                }
            }
        }
    }
});
