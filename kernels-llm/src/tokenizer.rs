//! Tokenisation and chat prompts (feature `tokenizer`): a GGUF file's byte-level BPE
//! (`tokenizer.ggml.model = gpt2`: its vocabulary, merges and special tokens) or a Hugging Face
//! `tokenizer.json`, both through Hugging Face's `tokenizers`; the model's Jinja chat template
//! through `minijinja`.
//!
//! GGUF pre-tokenisers follow llama.cpp's table for the types supported here: `gpt2` and
//! `default` split with GPT-2's pattern; `smollm`, `starcoder`, `refact`, `codeshell` and
//! `command-r` first split every digit apart. Others are an [`Error::Unsupported`] naming the
//! way out (the model's `tokenizer.json`).

use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

use kernels_core::{Error, Result};
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, DecoderWrapper};

use crate::gguf::{Gguf, Value};

/// GGUF's token types that are special tokens (`CONTROL`, `USER_DEFINED`).
const SPECIAL_TOKEN_TYPES: [u64; 2] = [3, 4];

/// GPT-2's byte-to-character map, the 256 tokens every byte-level BPE vocabulary starts from:
/// printable bytes stand for themselves, the others (space, controls, ...) for `U+0100` on.
///
/// ```
/// let alphabet = kernels_llm::tokenizer::byte_level_alphabet();
/// assert_eq!((alphabet[b'a' as usize], alphabet[b' ' as usize]), ('a', 'Ġ'));
/// ```
#[must_use]
pub fn byte_level_alphabet() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut extra = 0u32;
    for (b, c) in out.iter_mut().enumerate() {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        *c = if printable {
            char::from(b as u8)
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("a valid code point")
        };
    }
    out
}

/// A tokenizer with the model's special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence token, if the model has one.
    pub bos: Option<u32>,
    /// End-of-sequence token (generation stops there), if the model has one.
    pub eos: Option<u32>,
    /// Whether prompts start with `bos`.
    pub add_bos: bool,
    chat_template: Option<String>,
}

impl core::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn bad_tokenizer(reason: &'static str) -> Error {
    Error::BadFormat { offset: 0, reason }
}

fn from_tokenizers(_: tokenizers::Error) -> Error {
    bad_tokenizer("the tokenizer rejected its vocabulary, merges or input")
}

impl Tokenizer {
    /// The tokenizer a GGUF file embeds.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] for a tokenizer model other than `gpt2` or a pre-tokeniser this
    /// crate does not know; [`Error::BadFormat`] for missing or malformed vocabulary, merges or
    /// token types.
    pub fn from_gguf(file: &Gguf<'_>) -> Result<Self> {
        if file.str("tokenizer.ggml.model") != Some("gpt2") {
            return Err(Error::Unsupported {
                feature: "a GGUF tokenizer other than byte-level BPE (gpt2)",
                hint: "load the model's Hugging Face directory (tokenizer.json) instead",
            });
        }
        let strings = |key: &'static str| -> Result<Vec<&str>> {
            file.get(key)
                .and_then(Value::as_array)
                .ok_or(bad_tokenizer("tokenizer.ggml.tokens or merges missing"))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or(bad_tokenizer("a token or merge that is not a string"))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| ((*t).to_string(), i as u32))
            .collect();
        let merges = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or(bad_tokenizer("a merge that is not two tokens"))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(from_tokenizers)?;
        let byte_level = ByteLevel::new(false, true, true);
        let pre: PreTokenizerWrapper = match file.str("tokenizer.ggml.pre").unwrap_or("default") {
            "default" | "gpt2" => byte_level.into(),
            "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            _ => {
                return Err(Error::Unsupported {
                    feature: "this GGUF pre-tokeniser",
                    hint: "load the model's Hugging Face directory (tokenizer.json) instead",
                });
            }
        };
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(DecoderWrapper::ByteLevel(byte_level)));
        if let Some(types) = file
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
        {
            let special: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(t, _)| t.as_u64().is_some_and(|t| SPECIAL_TOKEN_TYPES.contains(&t)))
                .map(|(_, token)| AddedToken::from((*token).to_string(), true))
                .collect();
            inner.add_special_tokens(&special);
        }
        let id = |key: &str| file.u64(key).and_then(|v| u32::try_from(v).ok());
        Ok(Self {
            inner,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            add_bos: file
                .get("tokenizer.ggml.add_bos_token")
                .is_some_and(|v| *v == Value::Bool(true)),
            chat_template: file.str("tokenizer.chat_template").map(ToString::to_string),
        })
    }

    /// A Hugging Face tokenizer (`tokenizer.json`'s bytes), with `tokenizer_config.json`'s bytes
    /// where there are some (its `bos_token`, `eos_token`, `add_bos_token` and
    /// `chat_template`).
    ///
    /// # Errors
    ///
    /// [`Error::BadFormat`] for JSON the tokenizer or the config reader rejects.
    pub fn from_json(tokenizer: &[u8], config: Option<&[u8]>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer).map_err(from_tokenizers)?;
        let config: serde_json::Value = match config {
            Some(bytes) => serde_json::from_slice(bytes)
                .map_err(|_| bad_tokenizer("tokenizer_config.json is not JSON"))?,
            None => serde_json::Value::Null,
        };
        let token = |key: &str| {
            let text = match &config[key] {
                serde_json::Value::String(s) => Some(s.as_str()),
                serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()),
                _ => None,
            };
            text.and_then(|t| inner.token_to_id(t))
        };
        Ok(Self {
            bos: token("bos_token"),
            eos: token("eos_token"),
            add_bos: config["add_bos_token"].as_bool().unwrap_or(false),
            chat_template: config["chat_template"].as_str().map(ToString::to_string),
            inner,
        })
    }

    /// The tokenizer as `tokenizer.json` text, which [`Self::from_json`] reads back (the
    /// special tokens and chat template live in `tokenizer_config.json`, not here).
    ///
    /// # Errors
    ///
    /// [`Error::BadFormat`] where `tokenizers` cannot serialise it.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(from_tokenizers)
    }

    /// The token ids of `text` (special tokens written out in it are recognised), with `bos`
    /// first where the model adds it.
    ///
    /// # Errors
    ///
    /// [`Error::BadFormat`] where the tokenizer fails on the text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(from_tokenizers)?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// The text of `ids` (special tokens left out).
    ///
    /// # Errors
    ///
    /// [`Error::BadFormat`] for ids outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(from_tokenizers)
    }

    /// Vocabulary size, special tokens included.
    #[must_use]
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token's text (`ĠParis`: byte-level BPE marks a leading space with `Ġ`).
    #[must_use]
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// `user` as the model's chat template renders a one-message conversation ready for the
    /// assistant's answer (its default system prompt included where the template adds one);
    /// `user` itself where the model has no template.
    ///
    /// # Errors
    ///
    /// [`Error::BadFormat`] for a template `minijinja` cannot render.
    pub fn chat_prompt(&self, user: &str) -> Result<String> {
        let Some(template) = &self.chat_template else {
            return Ok(user.to_string());
        };
        let token_text = |id: Option<u32>| {
            id.and_then(|i| self.inner.id_to_token(i))
                .unwrap_or_default()
        };
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |message: String| -> core::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|_| bad_tokenizer("a chat template minijinja cannot parse"))?;
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => vec![minijinja::context! { role => "user", content => user }],
                    add_generation_prompt => true,
                    bos_token => token_text(self.bos),
                    eos_token => token_text(self.eos),
                })
            })
            .map_err(|_| bad_tokenizer("a chat template minijinja cannot render"))
    }
}
