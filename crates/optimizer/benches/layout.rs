//! Throughput of the weight layouts `ferry optimize` writes (MB/s of tensor bytes), streamed
//! to a sink as the writer streams them: a folded `Transpose` of a linear weight
//! (`TensorData::Transposed`, computed band by band) and the Attention QKV packing
//! (`TensorData::Concat` of three transposed views).

// criterion's `criterion_group!`/`criterion_main!` generate undocumented functions.
#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry_ir::TensorData;

/// A `[rows, cols]` float32 tensor of distinct values.
fn weight(rows: usize, cols: usize, seed: f32) -> TensorData {
    let v: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 1e-6 + seed).collect();
    TensorData::from_f32(&v)
}

fn transpose(c: &mut Criterion) {
    let mut g = c.benchmark_group("transpose");
    // bert-base's FFN weight and a Llama-3-8B-sized projection.
    for (rows, cols) in [(3072usize, 768usize), (4096, 4096)] {
        let t = TensorData::transposed(weight(rows, cols, 0.0), &[rows, cols], &[1, 0], 4)
            .expect("transpose");
        g.throughput(Throughput::Bytes(t.len()));
        g.bench_function(format!("{rows}x{cols} f32"), |b| {
            b.iter(|| t.write_to(&mut std::io::sink()))
        });
    }
    g.finish();
}

fn qkv(c: &mut Criterion) {
    let mut g = c.benchmark_group("qkv packing");
    for h in [768usize, 2048] {
        let parts: Vec<TensorData> = (0..3)
            .map(|i| {
                TensorData::transposed(weight(h, h, i as f32), &[h, h], &[1, 0], 4)
                    .expect("transpose")
            })
            .collect();
        let packed = TensorData::concat_rows(parts, h as u64).expect("concat");
        g.throughput(Throughput::Bytes(packed.len()));
        g.bench_function(format!("3 x {h}x{h} transposed, concatenated"), |b| {
            b.iter(|| packed.write_to(&mut std::io::sink()))
        });
    }
    g.finish();
}

criterion_group!(benches, transpose, qkv);
criterion_main!(benches);
