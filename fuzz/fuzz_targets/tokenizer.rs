//! The tokenizer's input: arbitrary bytes as text (lossy UTF-8) through a GGUF-built byte-level
//! BPE tokenizer (every byte in its vocabulary, a few merges, two special tokens, SmolLM2's
//! digit-splitting pre-tokeniser), and as a chat message through its template. Encoding never
//! panics, every id is in the vocabulary, and decoding gives the text back wherever the text
//! holds no special token's literal.
#![no_main]

use std::sync::OnceLock;

use kernels_llm::gguf::{Gguf, Writer};
use kernels_llm::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let alphabet = kernels_llm::tokenizer::byte_level_alphabet().map(String::from);
        let mut tokens = vec!["<s>".to_string(), "</s>".to_string()];
        tokens.extend(alphabet);
        tokens.extend(["Ġt".into(), "he".into(), "Ġthe".into(), "11".into()]);
        let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let mut types = vec![3i32, 3];
        types.resize(tokens.len(), 1);
        let mut w = Writer::new();
        w.metadata_str("tokenizer.ggml.model", "gpt2");
        w.metadata_str("tokenizer.ggml.pre", "smollm");
        w.metadata_strs("tokenizer.ggml.tokens", &token_refs);
        w.metadata_strs("tokenizer.ggml.merges", &["Ġ t", "h e", "Ġt he", "1 1"]);
        w.metadata_i32s("tokenizer.ggml.token_type", &types);
        w.metadata_u32("tokenizer.ggml.bos_token_id", 0);
        w.metadata_u32("tokenizer.ggml.eos_token_id", 1);
        w.metadata_str(
            "tokenizer.chat_template",
            "{% for m in messages %}<s>{{ m.role }}: {{ m.content }}</s>{% endfor %}",
        );
        let bytes = w.finish();
        Tokenizer::from_gguf(&Gguf::parse(&bytes).unwrap()).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let t = tokenizer();
    let text = String::from_utf8_lossy(data);
    let ids = t.encode(&text).expect("any text encodes");
    assert!(ids.iter().all(|&id| (id as usize) < t.vocab_size()));
    if !text.contains("<s>") && !text.contains("</s>") {
        assert_eq!(t.decode(&ids).expect("decodes"), text);
    }
    let prompt = t
        .chat_prompt(&text)
        .expect("the template renders any message");
    assert!(prompt.contains(&*text));
});
