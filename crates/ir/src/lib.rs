//! ferry-ir: the graph representation every ferry stage reads and writes.
//!
//! A [`Graph`] is a list of [`Node`]s in topological order over named values, with typed
//! graph [`Value`]s whose dims are fixed numbers or named symbols ([`Dim`]), and
//! [`Initializer`]s whose bytes ([`TensorData`]) stay borrowed from the checkpoint file
//! until a writer streams them out. Model configs ([`ModelConfig`]) and checkpoint weight
//! tables ([`Weights`]) live here too, so the loader and the tracer meet without depending
//! on each other.

mod config;
mod dtype;
mod graph;
mod merge;
mod sentence;
mod tensor;

pub use config::{ConfigError, ModelConfig};
pub use dtype::DType;
pub use graph::{Attr, Dim, Graph, Node, OpsetImport, Segment, Value};
pub use merge::{MergeError, USE_CACHE_BRANCH, map_merged, merge_decoders, split_merged};
pub use sentence::{PoolingMode, SentenceDense, SentenceError, SentenceModules};
pub use tensor::{
    BAND_BYTES, Initializer, MappedFile, RowProducer, TensorData, Weights, can_convert,
};
