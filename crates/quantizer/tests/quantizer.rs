//! ferry-quantizer integration tests: every mode on generated graphs (structure-aware
//! fuzzing, `fuzz`).

mod fuzz {
    use ferry_ir::Graph;
    use ferry_quantizer::fp16::{Fp16Options, convert_fp16};
    use ferry_quantizer::int4::{Int4Options, quantize_int4};
    use ferry_quantizer::{Int8Options, QType, QuantizeError, quantize_int8};

    /// The int8 option sets `ferry quantize` offers.
    fn int8_options() -> [Int8Options; 4] {
        let d = Int8Options::default();
        [
            d.clone(),
            Int8Options {
                per_channel: false,
                ..d.clone()
            },
            Int8Options {
                reduce_range: true,
                ..d.clone()
            },
            Int8Options {
                weight_type: QType::UInt8,
                ..d
            },
        ]
    }

    #[test]
    fn int8_never_panics() {
        let options = int8_options();
        ferry_fuzz::fuzz("int8", |g: &mut Graph| {
            let mut result = Ok(());
            for o in &options {
                result = quantize_int8(&mut g.clone(), o).map(|_| ());
            }
            result
        });
    }

    #[test]
    fn int4_never_panics() {
        let options = [
            Int4Options::default(),
            Int4Options {
                block_size: 16,
                symmetric: true,
                accuracy_level: Some(4),
                ..Int4Options::default()
            },
        ];
        ferry_fuzz::fuzz("int4", |g: &mut Graph| {
            let mut result = Ok(());
            for o in &options {
                result = quantize_int4(&mut g.clone(), o).map(|_| ());
            }
            result
        });
    }

    #[test]
    fn fp16_never_panics() {
        let options = [
            Fp16Options::default(),
            Fp16Options {
                keep_io_types: false,
                ..Fp16Options::default()
            },
        ];
        ferry_fuzz::fuzz("fp16", |g: &mut Graph| {
            let mut result: Result<(), QuantizeError> = Ok(());
            for o in &options {
                result = convert_fp16(&mut g.clone(), o).map(|_| ());
            }
            result
        });
    }
}
