//! Helpers shared by the tracer's integration tests.

pub mod seq2seq;
