//! MPNet's relative position bias in TorchScript: the bucket grid is built from the
//! sequence length (`torch.arange` over an element of `torch.size`), so a dynamic archive
//! serves every length and a fixed one bakes the length in.

use std::path::Path;

use ferry_torchscript::{Shapes, generate};

fn mpnet() -> ferry_ir::Graph {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/mpnet-tiny-feature-extraction");
    let c = ferry_loader::load(&dir).expect("load");
    ferry_tracer::trace(&c.config, &c.weights, &Default::default()).expect("trace")
}

#[test]
fn bucket_ops_translate() {
    let g = mpnet();
    let m = generate(
        &g,
        "MPNetModel",
        &Shapes::Dynamic,
        false,
        &Default::default(),
    )
    .expect("generate");
    let src = &m.source;
    for needle in [
        "torch.arange(0, _",
        "torch.lt(",
        "torch.abs(",
        "torch.log(",
        "torch.clamp_max(",
        "torch.where(",
        "torch.cumsum(",
    ] {
        assert!(src.contains(needle), "{needle} missing from\n{src}");
    }
    let fixed = Shapes::Fixed(
        [
            ("batch_size".to_string(), 2),
            ("sequence_length".to_string(), 7),
        ]
        .into(),
    );
    let m = generate(&g, "MPNetModel", &fixed, false, &Default::default()).expect("generate");
    assert!(m.source.contains("torch.arange(0, 7, 1)"), "{}", m.source);
}
