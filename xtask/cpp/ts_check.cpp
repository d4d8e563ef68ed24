// ts_check: runs ferry's TorchScript archives with libtorch from C++ (`torch::jit::load`),
// for `cargo xtask verify` (xtask/src/torch_cpp.rs builds it against the libtorch inside
// the PyPI torch wheel and compares what it writes with the goldens; this program compares
// nothing itself).
//
// Usage: ts_check JOBS
// JOBS holds one job per line, fields separated by tabs:
//   run    ARCHIVE IN OUT               forward(*IN) written to OUT
//   chain  ARCHIVE IN0 OUT0 IN1 OUT1 …  step k calls forward(*INk, *outputs[1:] of step k-1)
//                                       (a decoder fed its own present.* back as its past)
// IN and OUT are tensor files: "FTT1", u32 count, then per tensor u32 dtype (1 float32,
// 2 int64), u32 rank, i64 dims[rank] and the row-major data, all little-endian. Outputs are
// the forward result flattened (tuples and lists in order), floating tensors as float32.
// One line per job on stdout: "ok ARCHIVE" or "error ARCHIVE: what"; exit status 1 when
// any job failed, 2 on a usage or JOBS error.

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/serialization/import.h>

#include <cstdint>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "tensor files are little-endian");

namespace {

constexpr char kMagic[4] = {'F', 'T', 'T', '1'};
constexpr uint32_t kFloat32 = 1;
constexpr uint32_t kInt64 = 2;

template <typename T>
T read_pod(std::istream& in, const std::string& path) {
  T v;
  if (!in.read(reinterpret_cast<char*>(&v), sizeof v)) {
    throw std::runtime_error(path + ": truncated tensor file");
  }
  return v;
}

std::vector<at::Tensor> read_tensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  char magic[4];
  if (!in.read(magic, 4) || std::string(magic, 4) != std::string(kMagic, 4)) {
    throw std::runtime_error(path + ": not a tensor file");
  }
  const auto count = read_pod<uint32_t>(in, path);
  std::vector<at::Tensor> out;
  for (uint32_t i = 0; i < count; ++i) {
    const auto dtype = read_pod<uint32_t>(in, path);
    const auto rank = read_pod<uint32_t>(in, path);
    std::vector<int64_t> dims;
    int64_t numel = 1;
    for (uint32_t d = 0; d < rank; ++d) {
      dims.push_back(read_pod<int64_t>(in, path));
      if (dims.back() < 0) throw std::runtime_error(path + ": negative dimension");
      numel *= dims.back();
    }
    at::ScalarType type;
    if (dtype == kFloat32) {
      type = at::kFloat;
    } else if (dtype == kInt64) {
      type = at::kLong;
    } else {
      throw std::runtime_error(path + ": unknown dtype " + std::to_string(dtype));
    }
    auto t = at::empty(dims, at::TensorOptions().dtype(type));
    const auto bytes = static_cast<std::streamsize>(numel * t.element_size());
    if (!in.read(static_cast<char*>(t.data_ptr()), bytes)) {
      throw std::runtime_error(path + ": truncated tensor data");
    }
    out.push_back(t);
  }
  return out;
}

void write_tensors(const std::string& path, const std::vector<at::Tensor>& tensors) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error(path + ": cannot create");
  out.write(kMagic, 4);
  const auto count = static_cast<uint32_t>(tensors.size());
  out.write(reinterpret_cast<const char*>(&count), sizeof count);
  for (const auto& tensor : tensors) {
    at::Tensor t;
    uint32_t dtype;
    if (tensor.is_floating_point()) {
      t = tensor.to(at::kFloat).contiguous();
      dtype = kFloat32;
    } else {
      t = tensor.to(at::kLong).contiguous();
      dtype = kInt64;
    }
    const auto rank = static_cast<uint32_t>(t.dim());
    out.write(reinterpret_cast<const char*>(&dtype), sizeof dtype);
    out.write(reinterpret_cast<const char*>(&rank), sizeof rank);
    for (const auto d : t.sizes()) {
      const int64_t v = d;
      out.write(reinterpret_cast<const char*>(&v), sizeof v);
    }
    out.write(static_cast<const char*>(t.data_ptr()),
              static_cast<std::streamsize>(t.numel() * t.element_size()));
  }
  if (!out) throw std::runtime_error(path + ": write failed");
}

// The forward result as a flat list of tensors (tuples and lists in order).
void flatten(const c10::IValue& v, std::vector<at::Tensor>& out) {
  if (v.isTensor()) {
    out.push_back(v.toTensor());
  } else if (v.isTuple()) {
    for (const auto& e : v.toTupleRef().elements()) flatten(e, out);
  } else if (v.isList()) {
    for (const auto& e : v.toListRef()) flatten(e, out);
  } else {
    throw std::runtime_error("forward returned a " + v.tagKind() + ", not tensors");
  }
}

std::vector<at::Tensor> forward(torch::jit::Module& module,
                                   const std::vector<at::Tensor>& inputs) {
  std::vector<c10::IValue> args(inputs.begin(), inputs.end());
  std::vector<at::Tensor> out;
  flatten(module.forward(args), out);
  return out;
}

// Runs one job line; throws on any failure.
void run_job(const std::vector<std::string>& f) {
  if (f.size() < 4 || (f[0] != "run" && f[0] != "chain") || f.size() % 2 != 0 ||
      (f[0] == "run" && f.size() != 4)) {
    throw std::runtime_error("malformed job line");
  }
  auto module = torch::jit::load(f[1]);
  module.eval();
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> past;
  for (size_t i = 2; i < f.size(); i += 2) {
    auto inputs = read_tensors(f[i]);
    inputs.insert(inputs.end(), past.begin(), past.end());
    auto out = forward(module, inputs);
    write_tensors(f[i + 1], out);
    if (out.empty()) throw std::runtime_error("forward returned no tensor");
    past.assign(out.begin() + 1, out.end());
  }
}

std::vector<std::string> split_tabs(const std::string& line) {
  std::vector<std::string> fields;
  std::stringstream s(line);
  std::string field;
  while (std::getline(s, field, '\t')) fields.push_back(field);
  return fields;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: ts_check JOBS\n";
    return 2;
  }
  std::ifstream jobs(argv[1]);
  if (!jobs) {
    std::cerr << "ts_check: cannot open " << argv[1] << "\n";
    return 2;
  }
  // One intra-op thread: the golden models are tiny, and OpenMP's spinning workers cost
  // more than they save (5x slower with two on a busy 2-core machine).
  at::set_num_threads(1);
  int failed = 0;
  std::string line;
  while (std::getline(jobs, line)) {
    if (line.empty()) continue;
    const auto fields = split_tabs(line);
    const std::string archive = fields.size() > 1 ? fields[1] : line;
    try {
      run_job(fields);
      std::cout << "ok " << archive << std::endl;
    } catch (const std::exception& e) {
      ++failed;
      // c10::Error messages carry a C++ backtrace after the first line; keep one line.
      std::string what = e.what();
      what = what.substr(0, what.find('\n'));
      std::cout << "error " << archive << ": " << what << std::endl;
    }
  }
  return failed ? 1 : 0;
}
