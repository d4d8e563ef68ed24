//! Throughput of the quantization kernels on in-memory float32 weights (MB/s of float
//! input): int8 per-column ranges and quantization (what a lazily quantized weight runs per
//! band), and int4 block quantization (`MatMulNBits` codes), streamed to a sink as the
//! writer streams them.

// criterion's `criterion_group!`/`criterion_main!` generate undocumented functions.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry_ir::TensorData;
use ferry_quantizer::QType;
use ferry_quantizer::int4_lazy::lazy_int4;
use ferry_quantizer::qparams::{RangeAxis, Ranges, RowQuantizer, TensorSpec};

/// A `[rows, cols]` float32 weight with values in about ±0.05, as little-endian bytes.
fn weight(rows: usize, cols: usize) -> Vec<u8> {
    let mut x = 0x2545_F491u32;
    (0..rows * cols)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            ((x >> 8) as f32 / (1u32 << 24) as f32 * 0.1 - 0.05).to_le_bytes()
        })
        .collect()
}

fn int8(c: &mut Criterion) {
    // A 1024 × 4096 weight (16 MiB), per output column, as `ferry quantize` defaults.
    let (rows, cols) = (1024, 4096);
    let w = weight(rows, cols);
    let spec = TensorSpec {
        qtype: QType::Int8,
        symmetric: true,
        reduce_range: false,
        per_column: true,
    };
    let mut g = c.benchmark_group("int8");
    g.throughput(Throughput::Bytes(w.len() as u64));
    g.bench_function("column ranges 1024x4096", |b| {
        b.iter(|| {
            let mut r = Ranges::new(RangeAxis::Columns(cols));
            r.update(black_box(&w));
            r.params(spec)
        })
    });
    let mut r = Ranges::new(RangeAxis::Columns(cols));
    r.update(&w);
    let q = RowQuantizer::new(&r.params(spec), cols, QType::Int8);
    let mut out = vec![0u8; rows * cols];
    g.bench_function("quantize per column 1024x4096", |b| {
        b.iter(|| q.quantize(black_box(&w), &mut out))
    });
    g.finish();
}

fn int4(c: &mut Criterion) {
    // A linear layer's [out, in] = [1024, 4096] weight: 1024 columns of K = 4096.
    let (n, k) = (1024, 4096);
    let w = TensorData::owned(weight(n, k));
    let mut g = c.benchmark_group("int4");
    g.throughput(Throughput::Bytes(w.len()));
    for (bs, symmetric) in [(32, true), (128, false)] {
        let p = lazy_int4(w.clone(), k, bs, symmetric);
        let name = format!(
            "codes block {bs} {} 1024x4096",
            if symmetric {
                "symmetric"
            } else {
                "zero points"
            }
        );
        g.bench_function(name, |b| b.iter(|| p.data.write_to(&mut std::io::sink())));
    }
    g.finish();
}

criterion_group!(benches, int8, int4);
criterion_main!(benches);
