//! Archive structure: records, 64-byte alignment, pickle opcodes within protocol 2, tensor
//! bytes identical to the checkpoint's.

mod relative_bias;

use std::io::Read;
use std::path::Path;

use ferry_torchscript::pickle::{op, opcodes};
use ferry_torchscript::{Shapes, StateDictNames, Tree, export, generate, state_dict_names};

fn tiny() -> (ferry_loader::Checkpoint, ferry_ir::Graph) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/bert-tiny-gelu");
    let c = ferry_loader::load(&dir).expect("load");
    let g = ferry_tracer::trace(&c.config, &c.weights, &Default::default()).expect("trace");
    (c, g)
}

fn none() -> StateDictNames {
    StateDictNames::new()
}

fn fixed() -> Shapes {
    Shapes::Fixed(
        [
            ("batch_size".to_string(), 2),
            ("sequence_length".to_string(), 7),
        ]
        .into(),
    )
}

#[test]
fn archive_structure() {
    let (c, g) = tiny();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("traced_bert.pt");
    let report = export(&g, "BertModel", &fixed(), false, &none(), &path).expect("export");
    assert_eq!(report.tensors, g.initializers.len());

    let raw = std::fs::read(&path).expect("read");
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(raw.clone())).expect("zip");
    let names: Vec<String> = (0..z.len())
        .map(|i| {
            z.by_index(i)
                .expect("entry")
                .name()
                .expect("name")
                .into_owned()
        })
        .collect();
    for want in [
        "data.pkl",
        "code/__torch__/ferry.py",
        "constants.pkl",
        ".data/version",
        "byteorder",
        "data/0",
    ] {
        assert!(
            names.contains(&format!("traced_bert/{want}")),
            "missing {want}: {names:?}"
        );
    }
    assert!(
        names.iter().all(|n| n.starts_with("traced_bert/")),
        "one top folder"
    );
    assert!(!names.iter().any(|n| n.ends_with("model.json")));

    let mut read = |name: &str| {
        let mut f = z.by_name(&format!("traced_bert/{name}")).expect(name);
        let mut v = Vec::new();
        f.read_to_end(&mut v).expect("read entry");
        v
    };
    assert_eq!(read(".data/version"), b"10\n");
    assert_eq!(read("byteorder"), b"little");
    assert_eq!(
        read("constants.pkl"),
        [op::PROTO, 2, op::EMPTY_TUPLE, op::STOP]
    );
    let data_pkl = read("data.pkl");
    let ops = opcodes(&data_pkl).expect("protocol-2 subset only");
    assert_eq!(
        ops.iter().filter(|&&o| o == op::BINPERSID).count(),
        g.initializers.len()
    );
    let code = String::from_utf8(read("code/__torch__/ferry.py")).expect("utf8");
    assert!(code.starts_with("class BertModel(Module):"));
    assert!(code.contains("def forward(self: __torch__.ferry.BertModel"));
    assert!(code.contains("-> Tuple[Tensor, Tensor]"));
    assert!(code.contains("torch.reshape(_"), "{code}");
    assert!(
        code.contains(", [2, 7, 4, 8])"),
        "fixed sizes are literal: {code}"
    );

    // Every data record: 64-byte aligned, uncompressed, bytes equal to the checkpoint's.
    let module = generate(&g, "BertModel", &fixed(), false, &none()).expect("generate");
    for (i, (_, t)) in module.params.iter().enumerate() {
        let f = z.by_name(&format!("traced_bert/data/{i}")).expect("record");
        assert_eq!(f.compression(), zip::CompressionMethod::Stored);
        let start = f.data_start().expect("data start") as usize;
        assert_eq!(
            start % 64,
            0,
            "record {i} at {start} is not 64-byte aligned"
        );
        let want = t.data.bytes().expect("bytes");
        assert_eq!(f.size() as usize, want.len(), "record {i} size");
        assert_eq!(
            &raw[start..start + want.len()],
            &want[..],
            "record {i} bytes"
        );
    }
    assert!(c.weights.len() >= module.params.len());
}

#[test]
fn dynamic_axes_read_sizes_at_run_time() {
    let (_, g) = tiny();
    let m = generate(&g, "BertModel", &Shapes::Dynamic, false, &none()).expect("generate");
    assert!(m.source.contains("torch.size(_"), "{}", m.source);
    assert!(m.source.contains("torch.size(input_ids)"), "{}", m.source);
    assert!(!m.source.contains(", [2, 7, 4, 8])"));
}

#[test]
fn untie_clones_reused_parameters() {
    let (_, mut g) = tiny();
    // Tie the pooler weight to the query weight of layer 0 (same shape), as an LM head ties
    // to the word embeddings.
    for n in &mut g.nodes {
        for i in &mut n.inputs {
            if i == "pooler.dense.weight" {
                *i = "encoder.layer.0.attention.self.query.weight".into();
            }
        }
    }
    // A tied checkpoint stores the tied weight once.
    g.initializers.retain(|i| i.name != "pooler.dense.weight");
    let tied = generate(&g, "BertModel", &Shapes::Dynamic, false, &none()).expect("generate");
    let untied = generate(&g, "BertModel", &Shapes::Dynamic, true, &none()).expect("generate");
    let query = "encoder.layer.0.attention.self.query.weight";
    // Tied: the pooler's name shares the query weight's storage.
    let q = tied
        .params
        .iter()
        .position(|(k, _)| k == query)
        .expect("query");
    assert_eq!(tied.aliases, vec![("pooler.dense.weight".to_string(), q)]);
    assert!(tied.params.iter().all(|(k, _)| k != "pooler.dense.weight"));
    // Untied: a separate parameter under the pooler's name, cloned from the query weight.
    assert!(untied.aliases.is_empty());
    assert_eq!(untied.params.len(), tied.params.len() + 1);
    let clone = untied
        .params
        .iter()
        .find(|(k, _)| k == "pooler.dense.weight")
        .expect("cloned parameter");
    assert_eq!(clone.1.name, query);
    // The archive pickles the tied name as the same tensor object (memo), the untied one
    // as its own record.
    let ops = opcodes(&ferry_torchscript::module_pickle(&tied)).expect("pickle");
    assert_eq!(ops.iter().filter(|&&o| o == op::BINGET).count(), 1);
    let ops = opcodes(&ferry_torchscript::module_pickle(&untied)).expect("pickle");
    assert!(!ops.contains(&op::BINGET));
}

#[test]
fn module_tree_mirrors_the_state_dict_keys() {
    let (c, g) = tiny();
    // A task model's checkpoint stores the base model under `bert.`.
    let mut prefixed = ferry_ir::Weights::new();
    for t in c.weights.iter() {
        let mut t = t.clone();
        if !t.name.starts_with("classifier.") {
            t.name = format!("bert.{}", t.name);
        }
        prefixed.insert(t);
    }
    let names = state_dict_names(&g, &prefixed, true);
    assert_eq!(
        names["embeddings.word_embeddings.weight"],
        "bert.embeddings.word_embeddings.weight"
    );
    assert!(
        state_dict_names(&g, &prefixed, false).is_empty(),
        "base model: no prefix"
    );
    assert!(
        state_dict_names(&g, &c.weights, true).is_empty(),
        "stored unprefixed"
    );

    let m = generate(&g, "BertForX", &Shapes::Dynamic, false, &names).expect("generate");
    assert!(
        m.params.iter().all(|(k, _)| k.starts_with("bert.")),
        "{:?}",
        m.params
    );
    let bert = &m.tree.children[0];
    assert_eq!(bert.0, "bert");
    let child = |t: &Tree, n: &str| {
        t.children
            .iter()
            .find(|(a, _)| a == n)
            .map(|(_, c)| c.clone())
    };
    let layer0 = child(
        &child(&child(&bert.1, "encoder").expect("encoder"), "layer").expect("layer"),
        "0",
    )
    .expect("layer 0");
    let query = child(
        &child(&child(&layer0, "attention").expect("attention"), "self").expect("self"),
        "query",
    )
    .expect("query");
    let leaves: Vec<&str> = query.params.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(leaves, ["weight", "bias"]);
    // Every module is a class of its own; the source declares the submodules and reads
    // parameters through them (`getattr` for the list index).
    let classes: std::collections::HashSet<&str> =
        m.tree.modules().iter().map(|t| t.class.as_str()).collect();
    assert_eq!(classes.len(), m.tree.modules().len());
    assert!(
        m.source
            .contains("  bert : __torch__.ferry.BertForX_bert\n"),
        "{}",
        m.source
    );
    assert!(
        m.source
            .contains("  __annotations__[\"0\"] = __torch__.ferry.BertForX_bert_encoder_layer_0\n")
    );
    assert!(
        m.source
            .contains("= getattr(self.bert.encoder.layer, \"0\").attention.self.query.weight\n")
    );
    // Optional inputs with transformers' defaults.
    assert!(
        m.source.contains("attention_mask: Optional[Tensor]=None"),
        "{}",
        m.source
    );
    assert!(m.source.contains("torch.zeros_like(input_ids)"));
}

#[test]
fn clashing_keys_are_an_error() {
    let e = Tree::build("M", &[("a.b".into(), 0), ("a.b.c".into(), 1)]).expect_err("clash");
    assert!(e.to_string().contains("`a.b.c`"), "{e}");
    let e = Tree::build("M", &[("a.b".into(), 0), ("a.b".into(), 1)]).expect_err("twice");
    assert!(e.to_string().contains("`a.b`"), "{e}");
    let t = Tree::build("M", &[("x_y.z".into(), 0), ("x.y_z".into(), 1)]).expect("tree");
    let classes: Vec<&str> = t.modules().iter().map(|m| m.class.as_str()).collect();
    assert_eq!(classes.len(), 3);
    assert!(classes[1] != classes[2], "{classes:?}");
}

#[test]
fn unwritable_output_leaves_nothing() {
    let (_, g) = tiny();
    let dir = tempfile::tempdir().expect("tempdir");
    let e = export(
        &g,
        "BertModel",
        &fixed(),
        false,
        &none(),
        &dir.path().join("no/x.pt"),
    )
    .expect_err("missing dir");
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
}
