//! fp16 quantization (work in progress).
