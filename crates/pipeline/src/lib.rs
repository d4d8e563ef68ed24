//! ferry-pipeline: runs models ferry exported with the semantics of transformers'
//! pipelines, for Rust programs that want answers rather than tensors: [`generate`],
//! greedy decoding as `model.generate(do_sample=False)` computes it over optimum's decoder
//! interface, with or without the key/value cache; and [`tokenizer`], a checkpoint's
//! tokenizer (`tokenizer.json`, or WordPiece from `vocab.txt`) with the special tokens and
//! decoding rules transformers applies, and streamed decoding of generated tokens; and
//! [`tasks`], every task's answer as its pipeline computes it ([`tasks::run_task`]), which
//! `ferry run` prints; and [`genai`], the folder onnxruntime-genai loads (`genai_config.json`
//! from the checkpoint's configs, its tokenizer files) that `ferry export --genai` writes;
//! and [`seq2seq`], encoder-decoder folders (optimum's layout) generating greedy or with
//! beam search as `generate` does, and the translation / summarization pipelines.

pub mod genai;
pub mod generate;
pub mod seq2seq;
pub mod tasks;
pub mod tokenizer;

pub use generate::{GenerateError, GenerationConfig, greedy, left_pad};
pub use seq2seq::{Seq2Seq, Seq2SeqConfig, Seq2SeqError};
pub use tokenizer::{StreamDecoder, TextTokenizer, TokenizerError};
