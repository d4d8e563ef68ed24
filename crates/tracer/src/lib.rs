//! ferry-tracer: runs transformer architectures over symbolic tensors and records the
//! result as a ferry IR [`Graph`].
//!
//! Each architecture follows its transformers `modeling_*.py` op for op, so the exported
//! graph computes what transformers computes; shared pieces are written once and configured
//! per architecture: linear layers, LayerNorm, activations, self-attention and feed-forward
//! blocks in `layers`, embeddings in `embeddings`, task inputs and heads in `heads`, shared
//! config reading in `config`.
//! Weights are referenced, never copied: initializers borrow the loader's tensor bytes.

mod albert;
mod bart;
mod bert;
mod builder;
mod causal;
mod config;
mod deberta;
mod decoder;
mod distilbert;
mod electra;
mod embeddings;
mod gpt2;
mod heads;
mod layers;
mod modernbert;
mod mpnet;
mod roberta;
mod sentence;
mod seq2seq;
mod t5;

pub use builder::{T, Tracer};
use ferry_ir::{ConfigError, Graph, ModelConfig, Weights};
pub use seq2seq::{Seq2SeqPart, is_encoder_decoder, trace_seq2seq};

/// Traces one architecture for one (canonical) task into the tracer.
type BuildFn = fn(&mut Tracer, &Request<'_>) -> Result<(), TraceError>;

/// What an architecture's tracer is asked to trace.
pub(crate) struct Request<'a> {
    /// The checkpoint's config.
    pub config: &'a ModelConfig,
    /// The checkpoint's weights.
    pub weights: &'a Weights,
    /// Options (opset, axis names).
    pub opts: &'a TraceOptions,
    /// The canonical task (see [`canonical_task`]).
    pub task: &'a str,
}

/// One exportable architecture: the `model_type`s it covers, its tasks and its tracer.
struct Arch {
    model_types: &'static [&'static str],
    tasks: &'static [&'static str],
    build: BuildFn,
    /// Whether the tracer can emit float16 compute (`--dtype fp16`).
    half_compute: bool,
    /// Whether ferry-torchscript can write this architecture's graphs.
    torchscript: bool,
}

/// The registry every lookup (dispatch, `--list`, error messages) is generated from.
const ARCHITECTURES: &[Arch] = &[
    Arch {
        model_types: &["albert"],
        tasks: heads::ENCODER_TASKS,
        build: albert::build,
        half_compute: true,
        torchscript: true,
    },
    Arch {
        model_types: &["modernbert"],
        tasks: heads::ENCODER_TASKS,
        build: modernbert::build,
        half_compute: false,
        torchscript: true,
    },
    Arch {
        model_types: &["mpnet"],
        tasks: heads::ENCODER_TASKS,
        build: mpnet::build,
        half_compute: true,
        torchscript: true,
    },
    Arch {
        model_types: &["gpt2"],
        tasks: gpt2::GPT2_TASKS,
        build: gpt2::build,
        half_compute: false,
        torchscript: true,
    },
    Arch {
        model_types: decoder::MODEL_TYPES,
        tasks: decoder::DECODER_TASKS,
        build: decoder::build,
        half_compute: true,
        torchscript: false,
    },
    Arch {
        model_types: &["bert"],
        tasks: heads::ENCODER_TASKS,
        build: bert::build,
        half_compute: true,
        torchscript: true,
    },
    Arch {
        model_types: &["distilbert"],
        tasks: heads::ENCODER_TASKS,
        build: distilbert::build,
        half_compute: true,
        torchscript: true,
    },
    Arch {
        model_types: &["roberta", "xlm-roberta", "camembert"],
        tasks: heads::ENCODER_TASKS,
        build: roberta::build,
        half_compute: true,
        torchscript: true,
    },
    Arch {
        model_types: &["deberta-v2"],
        tasks: heads::ENCODER_TASKS,
        build: deberta::build,
        half_compute: true,
        torchscript: true,
    },
    Arch {
        model_types: &["deberta"],
        tasks: deberta::V1_TASKS,
        build: deberta::build,
        half_compute: true,
        torchscript: true,
    },
    Arch {
        model_types: seq2seq::MODEL_TYPES,
        tasks: seq2seq::SEQ2SEQ_TASKS,
        build: seq2seq::build,
        half_compute: false,
        torchscript: false,
    },
    Arch {
        model_types: &["electra"],
        tasks: heads::ENCODER_TASKS,
        build: electra::build,
        half_compute: true,
        torchscript: true,
    },
];

fn arch(model_type: &str) -> Option<&'static Arch> {
    ARCHITECTURES
        .iter()
        .find(|a| a.model_types.contains(&model_type))
}

/// Architectures (`model_type`) the tracer can export, sorted.
pub fn supported_architectures() -> Vec<&'static str> {
    let mut v: Vec<&str> = ARCHITECTURES
        .iter()
        .flat_map(|a| a.model_types.iter().copied())
        .collect();
    v.sort_unstable();
    v
}

/// Tasks the tracer can export for an architecture, by optimum's names.
pub fn supported_tasks(model_type: &str) -> &'static [&'static str] {
    arch(model_type).map(|a| a.tasks).unwrap_or(&[])
}

/// Whether the architecture can be traced with float16 compute (`--dtype fp16`).
pub fn exports_half_compute(model_type: &str) -> bool {
    arch(model_type).is_some_and(|a| a.half_compute)
}

/// Whether `model_type` is one of the Llama-family decoder LLMs.
pub fn is_decoder_llm(model_type: &str) -> bool {
    decoder::MODEL_TYPES.contains(&model_type)
}

/// Whether `--format torchscript` can export this architecture (the decoder LLMs cannot).
pub fn exports_torchscript(model_type: &str) -> bool {
    arch(model_type).is_some_and(|a| a.torchscript)
}

/// Every task any architecture supports, in a stable order.
pub const ALL_TASKS: &[&str] = &[
    "feature-extraction",
    "fill-mask",
    "text-classification",
    "token-classification",
    "question-answering",
    "multiple-choice",
    "text-generation",
    "text-generation-with-past",
    "text2text-generation",
    "text2text-generation-with-past",
];

/// The supported architecture × task table, as `ferry export --list` prints it.
pub fn support_table() -> String {
    let mut out = format!("{:<12}", "model_type");
    for t in ALL_TASKS {
        out.push_str(&format!(" {t}"));
    }
    out.push('\n');
    for m in supported_architectures() {
        out.push_str(&format!("{m:<12}"));
        let tasks = supported_tasks(m);
        for t in ALL_TASKS {
            let mark = if tasks.contains(t) { "yes" } else { "-" };
            out.push_str(&format!(" {mark:^w$}", w = t.len()));
        }
        out.push('\n');
    }
    out
}

/// The task a checkpoint was saved for, from `config.architectures` (as optimum infers
/// it): `BertForQuestionAnswering` → `question-answering`; base models → feature-extraction.
pub fn infer_task(config: &ModelConfig) -> String {
    let arch = config
        .architectures
        .first()
        .map(String::as_str)
        .unwrap_or("");
    let task = [
        ("ForMaskedLM", "fill-mask"),
        ("ForSequenceClassification", "text-classification"),
        ("ForTokenClassification", "token-classification"),
        ("ForQuestionAnswering", "question-answering"),
        ("ForMultipleChoice", "multiple-choice"),
        ("ForCausalLM", "text-generation"),
        ("ForConditionalGeneration", "text2text-generation"),
        ("MTModel", "text2text-generation"),
        ("LMHeadModel", "text-generation"),
    ]
    .iter()
    .find(|(suffix, _)| arch.ends_with(suffix))
    .map(|(_, t)| *t)
    .unwrap_or("feature-extraction");
    task.to_string()
}

/// What to trace.
#[derive(Debug, Clone)]
pub struct TraceOptions {
    /// Task (optimum's name or a seed pipeline alias; see [`infer_task`]).
    pub task: String,
    /// Default-domain ONNX opset the graph targets (affects which ops are used).
    pub opset: i64,
    /// Name of the batch axis.
    pub batch_axis: String,
    /// Name of the sequence axis.
    pub sequence_axis: String,
    /// Element type of the float compute and outputs: float32, or float16 (weights must
    /// then be float16). Weights may be bfloat16 under float32 compute: each is cast once
    /// where it is used, as ONNX Runtime's CPU provider lacks bfloat16 kernels.
    pub float_dtype: ferry_ir::DType,
    /// Symbolic dims to fix, by name (`batch_size` → 2): every graph input, output and
    /// value_info dim of that name becomes that size (products such as
    /// `batch_size*num_choices` too, once all their factors are fixed), so the exported
    /// model has static shapes and its shape arithmetic folds to constants. Empty: dynamic
    /// axes.
    pub fixed_dims: std::collections::BTreeMap<String, i64>,
    /// A sentence-transformers checkpoint's modules: feature-extraction then adds the
    /// `sentence_embedding` output (pooling, dense layers, normalization) computed in the
    /// graph. `None`: token states only.
    pub sentence: Option<ferry_ir::SentenceModules>,
    /// Name feature-extraction's token states `token_embeddings` (optimum's name when it
    /// exports with the sentence-transformers library) instead of `last_hidden_state`.
    pub token_embeddings_name: bool,
}

impl Default for TraceOptions {
    fn default() -> Self {
        Self {
            task: "feature-extraction".into(),
            opset: 17,
            batch_axis: "batch_size".into(),
            sequence_axis: "sequence_length".into(),
            float_dtype: ferry_ir::DType::F32,
            fixed_dims: Default::default(),
            sentence: None,
            token_embeddings_name: false,
        }
    }
}

/// Why a model could not be traced.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// `model_type` is not one ferry exports.
    #[error("unknown architecture `{model_type}`; supported: {}", supported_architectures().join(", "))]
    UnknownArchitecture {
        /// The config's `model_type`.
        model_type: String,
    },
    /// The task is not supported for this architecture.
    #[error("task `{task}` is not supported for `{model_type}`; supported: {supported}")]
    UnsupportedTask {
        /// Requested task.
        task: String,
        /// Architecture.
        model_type: String,
        /// What is supported.
        supported: String,
    },
    /// The config is missing something or is inconsistent.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A config value ferry does not implement.
    #[error("unsupported config: {0}")]
    Unsupported(String),
    /// The checkpoint lacks a weight the architecture needs.
    #[error("checkpoint has no weight `{name}` (also tried with prefix `{prefix}`)")]
    MissingWeight {
        /// Weight name without prefix.
        name: String,
        /// The base-model prefix also tried.
        prefix: String,
    },
    /// The checkpoint lacks a weight the task's head (or base) needs.
    #[error(
        "task `{task}` needs weight `{name}` (also tried with prefix `{prefix}`), which the checkpoint lacks; export a task the checkpoint was trained for, e.g. feature-extraction"
    )]
    MissingHeadWeight {
        /// Task.
        task: String,
        /// Weight name without prefix.
        name: String,
        /// The base-model prefix also tried.
        prefix: String,
    },
    /// A weight's shape disagrees with the config.
    #[error("weight `{name}` has shape {actual:?} but config.json implies {expected:?}")]
    WeightShape {
        /// Weight name.
        name: String,
        /// Shape implied by the config.
        expected: Vec<i64>,
        /// Shape in the checkpoint.
        actual: Vec<i64>,
    },
    /// A weight's dtype is not exportable yet.
    #[error(
        "weight `{name}` is {dtype} but the graph computes in {compute} (convert the weights first, e.g. `Weights::floats_as`)"
    )]
    WeightDtype {
        /// Weight name.
        name: String,
        /// Its dtype.
        dtype: ferry_ir::DType,
        /// The graph's compute dtype.
        compute: ferry_ir::DType,
    },
    /// An encoder-decoder checkpoint without its decoder (an encoder-only save).
    #[error(
        "checkpoint has no decoder weights (`{missing}` is missing): it holds only an encoder; export `{model_type}` with --task feature-extraction"
    )]
    NoDecoderWeights {
        /// Architecture.
        model_type: String,
        /// The first decoder weight looked for.
        missing: String,
    },
    /// Internal shape inference failed (a bug or an inconsistent config).
    #[error("shape inference: {0}")]
    Shape(String),
}

/// The transformers class a (model type, task) pair corresponds to (`BertModel`).
pub fn model_class_name(model_type: &str, task: &str) -> String {
    let base: String = match model_type {
        "bert" => "Bert".into(),
        "distilbert" => "DistilBert".into(),
        "roberta" => "Roberta".into(),
        "xlm-roberta" => "XLMRoberta".into(),
        "camembert" => "Camembert".into(),
        "albert" => "Albert".into(),
        "electra" => "Electra".into(),
        "mpnet" => "MPNet".into(),
        "modernbert" => "ModernBert".into(),
        "gpt2" => "GPT2".into(),
        "t5" => "T5".into(),
        "mt5" => "MT5".into(),
        "mbart" => "MBart".into(),
        other => other
            .split(['-', '_'])
            .map(|p| {
                let mut c = p.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect(),
    };
    let suffix = match canonical_task(task).as_str() {
        "text-classification" => "ForSequenceClassification",
        "token-classification" => "ForTokenClassification",
        "question-answering" => "ForQuestionAnswering",
        "fill-mask" => "ForMaskedLM",
        "multiple-choice" => "ForMultipleChoice",
        "text-generation" | "text-generation-with-past" if model_type == "gpt2" => "LMHeadModel",
        "text-generation" | "text-generation-with-past" => "ForCausalLM",
        "text2text-generation" | "text2text-generation-with-past" if model_type == "marian" => {
            "MTModel"
        }
        "text2text-generation" | "text2text-generation-with-past" => "ForConditionalGeneration",
        _ => "Model",
    };
    format!("{base}{suffix}")
}

/// Canonical task name for an optimum task or seed pipeline alias.
pub fn canonical_task(task: &str) -> String {
    match task {
        "default" => "feature-extraction",
        "sentiment-analysis" | "sequence-classification" => "text-classification",
        "ner" => "token-classification",
        "masked-lm" => "fill-mask",
        "causal-lm" => "text-generation",
        // The seed's encoder-decoder pipelines: the folder with the decoder's cache.
        "translation_en_to_fr"
        | "translation_en_to_de"
        | "translation_en_to_ro"
        | "translation"
        | "summarization" => "text2text-generation-with-past",
        other => other,
    }
    .to_string()
}

/// Replaces the symbolic dims named in `fixed` (and products of them, `a*b`) by their
/// sizes in the graph's inputs, outputs and value_info.
pub(crate) fn fix_dims(mut graph: Graph, fixed: &std::collections::BTreeMap<String, i64>) -> Graph {
    if fixed.is_empty() {
        return graph;
    }
    let size = |name: &str| -> Option<i64> {
        name.split('*')
            .map(|f| fixed.get(f.trim()).copied())
            .product()
    };
    let values = graph
        .inputs
        .iter_mut()
        .chain(graph.outputs.iter_mut())
        .chain(graph.value_info.iter_mut());
    for v in values {
        for d in v.shape.iter_mut().flatten() {
            if let ferry_ir::Dim::Sym(name) = d
                && let Some(n) = size(name)
            {
                *d = ferry_ir::Dim::Fixed(n);
            }
        }
    }
    graph
}

/// Appends the sentence-transformers modules of [`TraceOptions::sentence`] to a
/// feature-extraction trace, and names its token states `token_embeddings` when
/// [`TraceOptions::token_embeddings_name`] asks.
fn sentence_outputs(
    t: &mut Tracer,
    opts: &TraceOptions,
    task: &str,
    weights: &Weights,
) -> Result<(), TraceError> {
    if opts.token_embeddings_name && task != "feature-extraction" {
        return Err(TraceError::Unsupported(format!(
            "token_embeddings naming applies to feature-extraction, not `{task}`"
        )));
    }
    if let Some(st) = opts
        .sentence
        .as_ref()
        .filter(|_| task == "feature-extraction")
    {
        sentence::append(t, st, weights)?;
    }
    if opts.token_embeddings_name {
        t.rename_output("last_hidden_state", "token_embeddings");
    }
    Ok(())
}

/// Traces the model described by `config` over `weights` into a graph.
pub fn trace(
    config: &ModelConfig,
    weights: &Weights,
    opts: &TraceOptions,
) -> Result<Graph, TraceError> {
    let task = canonical_task(&opts.task);
    let supported = supported_tasks(&config.model_type);
    if !supported.is_empty() && !supported.contains(&task.as_str()) {
        return Err(TraceError::UnsupportedTask {
            task,
            model_type: config.model_type.clone(),
            supported: supported.join(", "),
        });
    }
    let result = match arch(&config.model_type) {
        Some(a) => {
            if !matches!(
                opts.float_dtype,
                ferry_ir::DType::F32 | ferry_ir::DType::F16
            ) {
                return Err(TraceError::Unsupported(format!(
                    "{} compute (ferry computes in float32 or float16; bfloat16 weights are cast to float32 at use)",
                    opts.float_dtype
                )));
            }
            if opts.float_dtype != ferry_ir::DType::F32 && !a.half_compute {
                return Err(TraceError::Unsupported(format!(
                    "{} compute for `{}` (float16 graphs: {})",
                    opts.float_dtype,
                    config.model_type,
                    ARCHITECTURES
                        .iter()
                        .filter(|a| a.half_compute)
                        .map(|a| a.model_types.join(", "))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let mut t = Tracer::new("main_graph", opts.opset);
            t.set_float_dtype(opts.float_dtype);
            let request = Request {
                config,
                weights,
                opts,
                task: &task,
            };
            (a.build)(&mut t, &request)
                .and_then(|()| sentence_outputs(&mut t, opts, &task, weights))
                .map(|()| fix_dims(t.finish(), &opts.fixed_dims))
        }
        None => Err(TraceError::UnknownArchitecture {
            model_type: config.model_type.clone(),
        }),
    };
    // A head weight the checkpoint lacks: say which task needed it.
    result.map_err(|e| match e {
        TraceError::MissingWeight { name, prefix } if task != "feature-extraction" => {
            TraceError::MissingHeadWeight { task, name, prefix }
        }
        e => e,
    })
}

#[cfg(test)]
mod fixed_dims_tests {
    use ferry_ir::Dim;

    use super::*;

    /// Traces the testdata case `case` for `task` with the dims in `fixed` fixed (the
    /// architectures' own tests use it too).
    pub(crate) fn traced(case: &str, task: &str, fixed: &[(&str, i64)]) -> Graph {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata")
            .join(case);
        let c = ferry_loader::load(&dir).expect("load");
        let opts = TraceOptions {
            task: task.into(),
            fixed_dims: fixed.iter().map(|&(k, v)| (k.to_string(), v)).collect(),
            ..Default::default()
        };
        trace(&c.config, &c.weights, &opts).expect("trace")
    }

    fn all_fixed(g: &Graph) -> bool {
        g.inputs
            .iter()
            .chain(&g.outputs)
            .chain(&g.value_info)
            .all(|v| v.shape.iter().flatten().all(|d| d.fixed().is_some()))
    }

    #[test]
    fn fixed_dims_make_every_shape_static() {
        let g = traced(
            "bert-tiny-text-classification",
            "text-classification",
            &[("batch_size", 2), ("sequence_length", 7)],
        );
        assert_eq!(g.inputs[0].shape, Some(vec![Dim::Fixed(2), Dim::Fixed(7)]));
        assert!(all_fixed(&g));
        // Multiple choice: the flattened `batch_size*num_choices` axis is fixed too.
        let g = traced(
            "bert-tiny-multiple-choice",
            "multiple-choice",
            &[
                ("batch_size", 2),
                ("num_choices", 3),
                ("sequence_length", 5),
            ],
        );
        assert!(all_fixed(&g));
        assert!(
            g.value_info
                .iter()
                .any(|v| v.shape.as_deref() == Some(&[Dim::Fixed(6), Dim::Fixed(5)][..]))
        );
        // Without fixing, the axes stay symbolic.
        let g = traced("bert-tiny-text-classification", "text-classification", &[]);
        assert_eq!(
            g.inputs[0].shape,
            Some(vec![Dim::sym("batch_size"), Dim::sym("sequence_length")])
        );
    }
}
