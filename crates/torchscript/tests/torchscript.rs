//! Archive structure: records, 64-byte alignment, pickle opcodes within protocol 2, tensor
//! bytes identical to the checkpoint's.

use std::io::Read;
use std::path::Path;

use ferry_torchscript::pickle::{op, opcodes};
use ferry_torchscript::{Shapes, export, generate};

fn tiny() -> (ferry_loader::Checkpoint, ferry_ir::Graph) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/bert-tiny-gelu");
    let c = ferry_loader::load(&dir).expect("load");
    let g = ferry_tracer::trace(&c.config, &c.weights, &Default::default()).expect("trace");
    (c, g)
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
    let report = export(&g, "BertModel", &fixed(), false, &path).expect("export");
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
    let module = generate(&g, "BertModel", &fixed(), false).expect("generate");
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
    let m = generate(&g, "BertModel", &Shapes::Dynamic, false).expect("generate");
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
    let tied = generate(&g, "BertModel", &Shapes::Dynamic, false).expect("generate");
    let untied = generate(&g, "BertModel", &Shapes::Dynamic, true).expect("generate");
    assert_eq!(untied.params.len(), tied.params.len() + 1);
    let clone = untied
        .params
        .iter()
        .find(|(a, _)| a == "encoder_layer_0_attention_self_query_weight_1")
        .expect("cloned parameter");
    assert_eq!(clone.1.name, "encoder.layer.0.attention.self.query.weight");
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
        &dir.path().join("no/x.pt"),
    )
    .expect_err("missing dir");
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
}
