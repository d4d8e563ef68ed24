//! ferry-optimizer integration tests: the passes on generated graphs (structure-aware
//! fuzzing, `fuzz`) and on the small models that used to make `ferry optimize` panic
//! (`regressions`).

mod fuzz {
    use ferry_ir::Graph;
    use ferry_optimizer::{
        OptimizeError, OptimizeOptions, approximate_gelu, bypass_identities, fold_computed,
        fold_constants, fold_transposes, fuse_attention, fuse_bias_gelu, fuse_embed_layer_norm,
        fuse_fast_gelu, fuse_gelu, fuse_gpt2_attention, fuse_layer_norm, fuse_multi_head_attention,
        fuse_skip_layer_norm, infer_shapes, optimize_with, remove_dead_nodes,
        remove_unused_initializers,
    };

    /// `optimize_with` (every fusion, with and without the Gelu approximation) never panics.
    #[test]
    fn optimize_never_panics() {
        ferry_fuzz::fuzz("optimize", |g: &mut Graph| {
            let mut approx = g.clone();
            let opts = OptimizeOptions {
                gelu_approximation: true,
                ..OptimizeOptions::default()
            };
            let _ = optimize_with(&mut approx, &opts);
            optimize_with(g, &OptimizeOptions::default()).map(|_| ())
        });
    }

    /// Each public pass, alone and chained, on graphs `optimize` would first check: none
    /// panics on nodes of the wrong arity.
    #[test]
    fn every_pass_never_panics() {
        let passes: [fn(&mut Graph) -> usize; 15] = [
            fold_constants,
            bypass_identities,
            |g| fold_transposes(g).unwrap_or(0),
            infer_shapes,
            fuse_gelu,
            fuse_bias_gelu,
            fuse_fast_gelu,
            fuse_layer_norm,
            fuse_skip_layer_norm,
            fuse_attention,
            fuse_gpt2_attention,
            fuse_multi_head_attention,
            fuse_embed_layer_norm,
            approximate_gelu,
            fold_computed,
        ];
        ferry_fuzz::fuzz("each pass", |g: &mut Graph| {
            for pass in passes {
                pass(&mut g.clone());
            }
            for pass in passes {
                pass(g);
            }
            remove_dead_nodes(g);
            remove_unused_initializers(g);
            Ok::<(), OptimizeError>(())
        });
    }
}

mod regressions {
    use std::collections::BTreeMap;

    use ferry_ir::{Attr, DType, Dim, Graph, Node, OpsetImport, Value};
    use ferry_optimizer::{OptimizeError, optimize};

    /// A one-node graph `y = op(inputs)` at `opset` over a float32 `[2, 3]` input `x`.
    fn one_node(opset: i64, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> Graph {
        let f = |name: &str| Value::new(name, DType::F32, vec![Dim::Fixed(2), Dim::Fixed(3)]);
        Graph {
            name: "g".into(),
            inputs: vec![f("x")],
            outputs: vec![f("y")],
            nodes: vec![Node {
                name: format!("/{op}"),
                op_type: op.into(),
                domain: String::new(),
                inputs: inputs.iter().map(|s| s.to_string()).collect(),
                outputs: vec!["y".into()],
                attrs: attrs
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect::<BTreeMap<_, _>>(),
            }],
            initializers: vec![],
            value_info: vec![],
            opsets: vec![OpsetImport {
                domain: String::new(),
                version: opset,
            }],
        }
    }

    /// Opset 9's Slice takes `starts`/`ends`/`axes` as attributes; shape inference used to
    /// index its (absent) second input.
    #[test]
    fn opset9_slice_with_attributes_optimizes() {
        let mut g = one_node(
            9,
            "Slice",
            &["x"],
            vec![
                ("starts", Attr::Ints(vec![0])),
                ("ends", Attr::Ints(vec![1])),
                ("axes", Attr::Ints(vec![1])),
            ],
        );
        optimize(&mut g).expect("a valid opset-9 model optimizes");
        assert_eq!(g.nodes.len(), 1);
        assert_eq!(g.nodes[0].op_type, "Slice");
        assert_eq!(g.nodes[0].inputs, ["x"]);
    }

    /// A `Mul` with one input is malformed: a typed error naming the node, not a panic.
    #[test]
    fn mul_with_one_input_is_a_bad_node() {
        let mut g = one_node(17, "Mul", &["x"], vec![]);
        let e = optimize(&mut g).expect_err("malformed");
        assert!(
            matches!(&e, OptimizeError::BadNode { node, op_type, .. } if node == "/Mul" && op_type == "Mul"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "node `/Mul` (Mul): has 1 input, needs 2 inputs at opset 17"
        );
    }
}
