//! int8 quantization (work in progress).
