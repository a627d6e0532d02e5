//! The tokenizer on a small byte-level BPE vocabulary the tests write, from a GGUF file and from
//! a `tokenizer.json` alike: encoding, special tokens, round trips, the chat template, and bad
//! tokenizers refused with an error.

use kernels_core::Error;
use kernels_llm::gguf::{Gguf, Writer};
use kernels_llm::tokenizer::Tokenizer;

const TOKENS: [&str; 10] = ["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa", "Ġab", "1", "11"];
const MERGES: [&str; 4] = ["Ġ a", "a b", "Ġa b", "1 1"];
const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}";

fn gguf(pre: &str, model: &str) -> Vec<u8> {
    let mut w = Writer::new();
    w.metadata_str("tokenizer.ggml.model", model);
    w.metadata_str("tokenizer.ggml.pre", pre);
    w.metadata_strs("tokenizer.ggml.tokens", &TOKENS);
    w.metadata_strs("tokenizer.ggml.merges", &MERGES);
    w.metadata_i32s("tokenizer.ggml.token_type", &[3, 3, 1, 1, 1, 1, 1, 1, 1, 1]);
    w.metadata_u32("tokenizer.ggml.bos_token_id", 0);
    w.metadata_u32("tokenizer.ggml.eos_token_id", 1);
    w.metadata_bool("tokenizer.ggml.add_bos_token", true);
    w.metadata_str("tokenizer.chat_template", TEMPLATE);
    w.finish()
}

fn json() -> String {
    let vocab: Vec<String> = TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{t:?}: {i}"))
        .collect();
    let merges: Vec<String> = MERGES.iter().map(|m| format!("{m:?}")).collect();
    let special = |id: usize| {
        format!(
            r#"{{"id": {id}, "content": {:?}, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}}"#,
            TOKENS[id]
        )
    };
    format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [{}, {}], "normalizer": null,
  "pre_tokenizer": {{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}},
  "post_processor": null,
  "decoder": {{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}},
  "model": {{"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
    "vocab": {{{}}}, "merges": [{}]}}}}"#,
        special(0),
        special(1),
        vocab.join(", "),
        merges.join(", ")
    )
}

const CONFIG: &str = r#"{"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": true,
  "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"}"#;

#[test]
fn gguf_and_json_tokenizers_agree() {
    let bytes = gguf("default", "gpt2");
    let from_gguf = Tokenizer::from_gguf(&Gguf::parse(&bytes).unwrap()).unwrap();
    let from_json = Tokenizer::from_json(json().as_bytes(), Some(CONFIG.as_bytes())).unwrap();
    for t in [&from_gguf, &from_json] {
        assert_eq!((t.bos, t.eos, t.add_bos), (Some(0), Some(1), true));
        assert_eq!(t.encode("ab ab").unwrap(), [0, 4, 7]);
        assert_eq!(
            t.encode("ab</s>a").unwrap(),
            [0, 4, 1, 2],
            "a special token in the text"
        );
        assert_eq!(t.decode(&[4, 7, 1]).unwrap(), "ab ab");
        assert_eq!(t.token_id("Ġab"), Some(7));
        assert_eq!(t.vocab_size(), 10);
        assert_eq!(t.chat_prompt("ab").unwrap(), "<s>[user] ab\n[assistant] ");
    }
}

#[test]
fn digits_split_one_by_one_under_starcoder_style_pre_tokenisers() {
    let plain = Tokenizer::from_gguf(&Gguf::parse(&gguf("gpt2", "gpt2")).unwrap()).unwrap();
    let smollm = Tokenizer::from_gguf(&Gguf::parse(&gguf("smollm", "gpt2")).unwrap()).unwrap();
    // "1 1" merges, but SmolLM2's pre-tokeniser cuts digits apart before any merge can.
    assert_eq!(smollm.encode("a11").unwrap(), [0, 2, 8, 8]);
    assert_eq!(plain.encode("a11").unwrap(), [0, 2, 9]);
    assert_eq!(smollm.decode(&[2, 8, 8]).unwrap(), "a11");
}

#[test]
fn unusable_tokenizers_are_errors() {
    let spm = Tokenizer::from_gguf(&Gguf::parse(&gguf("default", "llama")).unwrap());
    assert!(matches!(spm, Err(Error::Unsupported { .. })));
    let unknown_pre = Tokenizer::from_gguf(&Gguf::parse(&gguf("qwen2", "gpt2")).unwrap());
    assert!(matches!(unknown_pre, Err(Error::Unsupported { .. })));
    let mut w = Writer::new();
    w.metadata_str("tokenizer.ggml.model", "gpt2");
    w.metadata_strs("tokenizer.ggml.tokens", &TOKENS);
    w.metadata_strs("tokenizer.ggml.merges", &["ab"]);
    let bad_merge = Tokenizer::from_gguf(&Gguf::parse(&w.finish()).unwrap());
    assert!(matches!(bad_merge, Err(Error::BadFormat { .. })));
    let mut w = Writer::new();
    w.metadata_str("tokenizer.ggml.model", "gpt2");
    let no_vocab = Tokenizer::from_gguf(&Gguf::parse(&w.finish()).unwrap());
    assert!(matches!(no_vocab, Err(Error::BadFormat { .. })));
    assert!(Tokenizer::from_json(b"{not json", None).is_err());
    assert!(Tokenizer::from_json(json().as_bytes(), Some(b"[1, 2")).is_err());
    let no_template = Tokenizer::from_json(json().as_bytes(), None).unwrap();
    assert_eq!(no_template.chat_prompt("hi").unwrap(), "hi");
    assert!(!no_template.add_bos && no_template.bos.is_none());
    let bad_template = Tokenizer::from_json(
        json().as_bytes(),
        Some(br#"{"chat_template": "{% for %}"}"#),
    )
    .unwrap();
    assert!(bad_template.chat_prompt("hi").is_err());
    let raising = Tokenizer::from_json(
        json().as_bytes(),
        Some(br#"{"chat_template": "{{ raise_exception('no system role') }}"}"#),
    )
    .unwrap();
    assert!(raising.chat_prompt("hi").is_err());
}
