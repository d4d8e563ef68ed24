//! Loading a checkpoint's tokenizer for `ferry run`: `tokenizer.json` as transformers'
//! fast tokenizers save it, or a BERT WordPiece tokenizer built from `vocab.txt` (as
//! transformers builds one from a vocab-only checkpoint), plus the special tokens and limits
//! that `tokenizer_config.json` / `special_tokens_map.json` declare.

use std::path::{Path, PathBuf};

use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{
    AddedToken, EncodeInput, Encoding, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

/// Why a tokenizer could not be loaded or could not encode or decode.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TokenizerError(pub String);

impl TokenizerError {
    fn msg(m: String) -> Self {
        Self(m)
    }
}

impl From<String> for TokenizerError {
    fn from(m: String) -> Self {
        Self(m)
    }
}

impl From<TokenizerError> for String {
    fn from(e: TokenizerError) -> Self {
        e.0
    }
}

/// A tokenizer with the special tokens the task code needs.
pub struct TextTokenizer {
    tok: Tokenizer,
    /// Where it was loaded from.
    pub dir: PathBuf,
    /// `model_max_length` from tokenizer_config.json (absent or absurdly large: None).
    pub model_max_length: Option<usize>,
    /// `[MASK]`-like token and its id.
    pub mask: Option<(String, u32)>,
    /// Padding token id.
    pub pad_id: Option<u32>,
    /// Classification token id (`[CLS]`).
    pub cls_id: Option<u32>,
    /// Unknown-token id.
    pub unk_id: Option<u32>,
    /// End-of-sequence token id.
    pub eos_id: Option<u32>,
    /// tokenizer_config.json's `clean_up_tokenization_spaces`.
    clean_up_spaces: bool,
}

/// The value of a special-token entry: a plain string or an `AddedToken` object.
fn token_str(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, TokenizerError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError(format!("{} is not valid JSON: {e}", path.display())))
}

impl TextTokenizer {
    /// Loads the tokenizer in `dir`: `tokenizer.json`, else `vocab.txt` (BERT WordPiece).
    pub fn load(dir: &Path) -> Result<Self, TokenizerError> {
        if !dir.is_dir() {
            return Err(TokenizerError::msg(format!(
                "tokenizer directory {} does not exist",
                dir.display()
            )));
        }
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let special_map = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or_default();
        let special = |name: &str| -> Option<String> {
            config
                .get(name)
                .and_then(token_str)
                .or_else(|| special_map.get(name).and_then(token_str))
        };
        let json = dir.join("tokenizer.json");
        let vocab = dir.join("vocab.txt");
        let mut tok = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| format!("{}: {e}", json.display()))?
        } else if vocab.is_file() {
            wordpiece_from_vocab(&vocab, &config, &special)?
        } else {
            return Err(TokenizerError::msg(format!(
                "no tokenizer.json or vocab.txt in {}",
                dir.display()
            )));
        };
        // transformers ignores the padding/truncation saved in tokenizer.json unless asked.
        tok.with_padding(None);
        tok.with_truncation(None)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let id = |name: &str| special(name).as_deref().and_then(|t| tok.token_to_id(t));
        let mask = special("mask_token").and_then(|t| tok.token_to_id(&t).map(|i| (t, i)));
        let (pad_id, cls_id, unk_id, eos_id) = (
            id("pad_token"),
            id("cls_token"),
            id("unk_token"),
            id("eos_token"),
        );
        // Vocab-only BERT checkpoints name no special tokens: use BERT's.
        let bert = |t: &str| tok.token_to_id(t);
        let model_max_length = config
            .get("model_max_length")
            .and_then(serde_json::Value::as_u64)
            .filter(|&n| n < 1_000_000_000)
            .map(|n| n as usize);
        Ok(Self {
            mask: mask.or_else(|| bert("[MASK]").map(|i| ("[MASK]".to_string(), i))),
            pad_id: pad_id.or_else(|| bert("[PAD]")),
            cls_id: cls_id.or_else(|| bert("[CLS]")),
            unk_id: unk_id.or_else(|| bert("[UNK]")),
            eos_id,
            model_max_length,
            // transformers 5 skips the clean-up for BPE models (it would strip legitimate
            // spaces before punctuation) unless told to corrupt the output anyway.
            clean_up_spaces: config
                .get("clean_up_tokenization_spaces")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false)
                && (!matches!(tok.get_model(), tokenizers::ModelWrapper::BPE(_))
                    || config
                        .get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
                        .and_then(serde_json::Value::as_bool)
                        .unwrap_or(false)),
            dir: dir.to_path_buf(),
            tok,
        })
    }

    /// Encodes one text or a pair, with the tokenizer's special tokens, offsets in characters.
    pub fn encode<'s>(
        &self,
        input: impl Into<EncodeInput<'s>>,
    ) -> Result<Encoding, TokenizerError> {
        self.encode_with(input, true)
    }

    /// Encodes with or without special tokens (text-generation prompts go without, as in the
    /// transformers pipeline).
    pub fn encode_with<'s>(
        &self,
        input: impl Into<EncodeInput<'s>>,
        add_special_tokens: bool,
    ) -> Result<Encoding, TokenizerError> {
        self.tok
            .encode_char_offsets(input, add_special_tokens)
            .map_err(|e| TokenizerError(format!("tokenizer: {e}")))
    }

    /// Encodes one text cut to at most `max_length` tokens (the rest is dropped).
    pub fn encode_truncated(
        &self,
        text: &str,
        max_length: usize,
    ) -> Result<Encoding, TokenizerError> {
        let mut tok = self.tok.clone();
        tok.with_truncation(Some(TruncationParams {
            max_length,
            ..Default::default()
        }))
        .map_err(|e| format!("tokenizer: {e}"))?;
        let mut enc = tok
            .encode_char_offsets(text, true)
            .map_err(|e| format!("tokenizer: {e}"))?;
        enc.take_overflowing();
        Ok(enc)
    }

    /// Encodes a pair, cutting only the second text into windows of at most `max_length`
    /// tokens that overlap by `stride` tokens: the first window, then the overflowing ones.
    pub fn encode_windows(
        &self,
        first: &str,
        second: &str,
        max_length: usize,
        stride: usize,
    ) -> Result<Vec<Encoding>, TokenizerError> {
        let mut tok = self.tok.clone();
        tok.with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length,
            strategy: TruncationStrategy::OnlySecond,
            stride,
        }))
        .map_err(|e| format!("tokenizer: {e}"))?;
        let mut enc = tok
            .encode_char_offsets((first, second), true)
            .map_err(|e| format!("tokenizer: {e}"))?;
        let rest = enc.take_overflowing();
        let mut all = vec![enc];
        all.extend(rest);
        Ok(all)
    }

    /// Decodes ids to text, as transformers' `tokenizer.decode` (with its
    /// `clean_up_tokenization_spaces` when tokenizer_config.json turns it on).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        let text = self
            .tok
            .decode(ids, skip_special_tokens)
            .map_err(|e| format!("tokenizer: {e}"))?;
        if !self.clean_up_spaces {
            return Ok(text);
        }
        // transformers' `clean_up_tokenization`.
        let mut t = text;
        for (from, to) in [
            (" .", "."),
            (" ?", "?"),
            (" !", "!"),
            (" ,", ","),
            (" ' ", "'"),
            (" n't", "n't"),
            (" 'm", "'m"),
            (" 's", "'s"),
            (" 've", "'ve"),
            (" 're", "'re"),
        ] {
            t = t.replace(from, to);
        }
        Ok(t)
    }

    /// The vocabulary string of an id.
    pub fn id_to_token(&self, id: u32) -> String {
        self.tok
            .id_to_token(id)
            .unwrap_or_else(|| format!("<{id}>"))
    }

    /// Joins tokens into text, as transformers' `convert_tokens_to_string`.
    pub fn tokens_to_string(&self, tokens: &[String]) -> Result<String, TokenizerError> {
        use tokenizers::Decoder;
        match self.tok.get_decoder() {
            Some(d) => d
                .decode(tokens.to_vec())
                .map_err(|e| TokenizerError(format!("tokenizer: {e}"))),
            None => Ok(tokens.join(" ")),
        }
    }

    /// Whether the model's vocabulary marks word continuations (WordPiece's `##`), as the
    /// token-classification pipeline checks to tell subwords.
    pub fn has_continuing_subword_prefix(&self) -> bool {
        match self.tok.get_model() {
            tokenizers::ModelWrapper::WordPiece(w) => !w.continuing_subword_prefix.is_empty(),
            tokenizers::ModelWrapper::BPE(b) => b.continuing_subword_prefix.is_some(),
            _ => false,
        }
    }
}

/// A BERT tokenizer over `vocab.txt`, as transformers' `BertTokenizer` builds it.
fn wordpiece_from_vocab(
    vocab: &Path,
    config: &serde_json::Value,
    special: &dyn Fn(&str) -> Option<String>,
) -> Result<Tokenizer, TokenizerError> {
    let name = vocab.display().to_string();
    let words = WordPiece::read_file(&name).map_err(|e| format!("{name}: {e}"))?;
    let unk = special("unk_token").unwrap_or_else(|| "[UNK]".into());
    let sep = special("sep_token").unwrap_or_else(|| "[SEP]".into());
    let cls = special("cls_token").unwrap_or_else(|| "[CLS]".into());
    let lookup = |t: &str| {
        words
            .get(t)
            .copied()
            .ok_or_else(|| format!("{name} has no `{t}` token"))
    };
    let (sep_id, cls_id) = (lookup(&sep)?, lookup(&cls)?);
    let specials: Vec<String> = [
        "pad_token",
        "unk_token",
        "cls_token",
        "sep_token",
        "mask_token",
    ]
    .iter()
    .zip(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    .map(|(k, d)| special(k).unwrap_or_else(|| d.to_string()))
    .filter(|t| words.contains_key(t))
    .collect();
    let model = WordPiece::builder()
        .vocab(words)
        .unk_token(unk)
        .build()
        .map_err(|e| format!("{name}: {e}"))?;
    let flag = |k: &str, default: bool| config.get(k).and_then(|v| v.as_bool()).unwrap_or(default);
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(BertNormalizer::new(
        true,
        flag("tokenize_chinese_chars", true),
        config.get("strip_accents").and_then(|v| v.as_bool()),
        flag("do_lower_case", true),
    )))
    .map_err(|e| format!("{name}: {e}"))?;
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(BertProcessing::new((sep, sep_id), (cls, cls_id))));
    tok.with_decoder(Some(WordPieceDecoder::default()));
    let added: Vec<AddedToken> = specials
        .into_iter()
        .map(|t| AddedToken::from(t, true))
        .collect();
    tok.add_special_tokens(added)
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(tok)
}

/// Decodes generated tokens as they arrive, returning only the text not returned before:
/// the pieces joined equal the decode of all the tokens. A piece that ends inside a
/// character (byte-level BPE splits many characters over several tokens) is held back until
/// the character is complete.
pub struct StreamDecoder<'t> {
    tok: &'t TextTokenizer,
    ids: Vec<u32>,
    emitted: String,
}

impl<'t> StreamDecoder<'t> {
    /// A decoder over `tok`, skipping special tokens (as the generation pipelines do).
    pub fn new(tok: &'t TextTokenizer) -> Self {
        Self {
            tok,
            ids: Vec::new(),
            emitted: String::new(),
        }
    }

    /// Adds one token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        Ok(self.take(text))
    }

    /// Whatever is left once generation ends (an incomplete character included).
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        let text = self.tok.decode(&self.ids, true)?;
        Ok(self.take(text))
    }

    /// The decode of every token so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }

    fn take(&mut self, text: String) -> String {
        // Decoding more tokens can rewrite the end of the text only in tokenizers that
        // clean up spaces; then wait until the text grows past what was emitted.
        match text.strip_prefix(self.emitted.as_str()) {
            Some(rest) => {
                let rest = rest.to_string();
                self.emitted = text;
                rest
            }
            None => String::new(),
        }
    }
}
