//! int4 quantization (work in progress).
