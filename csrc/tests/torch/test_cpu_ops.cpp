// csrc/tests/torch/test_cpu_ops.cpp — ctest: load the C++ CPU kernel library
// (csrc/bindings.cpp + csrc/cpu/*.cpp, built by CMakeLists.txt) the way
// `import pygen._C` does, and call its ops through the torch dispatcher.
//
//   test_cpu_ops <path to libpygen_cpu.so> [--all-cpu]
//
// * the library registers the pygen:: ops; with --all-cpu: every one of them
//   has a CPU kernel (a separate ctest, cpu_kernels_complete);
// * pygen::randn_fill_ has a CPU kernel, and its output (whole-tensor and
//   per-row seeds; fp32, fp64, fp16, bf16; sizes that cross the parallel
//   grain) equals the header math of csrc/include/pygen (philox.h,
//   noise_layout.h) element for element.
#include <dlfcn.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "../check.h"
#include "pygen/noise_layout.h"
#include "pygen/philox.h"

namespace {

// The ops csrc/bindings.cpp defines (TORCH_LIBRARY(pygen, m)), from the dispatcher.
std::vector<std::string> pygen_ops() {
  std::vector<std::string> names;
  for (const c10::OperatorName& op : c10::Dispatcher::singleton().getAllOpNames()) {
    if (op.name.rfind("pygen::", 0) == 0 && op.overload_name.empty()) names.push_back(op.name);
  }
  return names;
}

void test_registry() {
  const std::vector<std::string> names = pygen_ops();
  PYGEN_CHECK(!names.empty(), "no pygen:: ops registered");
  bool has_randn = false;
  for (const std::string& n : names) has_randn |= n == "pygen::randn_fill_";
  PYGEN_CHECK(has_randn, "pygen::randn_fill_ is not registered");
  auto op = c10::Dispatcher::singleton().findSchema({"pygen::randn_fill_", ""});
  if (op) PYGEN_CHECK(op->hasKernelForDispatchKey(c10::DispatchKey::CPU), "randn_fill_ has no CPU kernel");
}

// --all-cpu: every op of bindings.cpp has a C++ CPU kernel (issue #2: each op
// gets a torch reference, Triton, C++ CPU and CUDA version).
int test_all_ops_have_cpu_kernels() {
  const std::vector<std::string> names = pygen_ops();
  PYGEN_CHECK(!names.empty(), "no pygen:: ops registered");
  for (const std::string& n : names) {
    auto op = c10::Dispatcher::singleton().findSchema({n.c_str(), ""});
    PYGEN_CHECK(op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CPU), n,
                " has no CPU kernel (TORCH_LIBRARY_IMPL(pygen, CPU, m) in csrc/cpu/)");
    std::printf("  %s: %s\n", n.c_str(),
                op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CPU) ? "CPU kernel" : "MISSING");
  }
  return pygen_test::finish("test_cpu_ops --all-cpu");
}

// pygen.randn's contract, from the headers: element e of noise row r.
std::vector<float> expected_normals(int64_t numel, int64_t batch, uint64_t seed, uint64_t stream,
                                    const std::vector<int64_t>* row_seeds) {
  const pygen::NoiseLayout l = pygen::make_noise_layout(numel, batch, row_seeds != nullptr);
  std::vector<float> out(static_cast<size_t>(numel));
  for (int64_t r = 0; r < l.rows && l.row_len > 0; ++r) {
    const uint64_t s = row_seeds ? static_cast<uint64_t>((*row_seeds)[r]) : seed;
    for (int64_t i = 0; i < l.row_len; ++i) {
      const pygen::Normals4 z = pygen::philox_normals(s, stream, static_cast<uint64_t>(i / 4));
      out[r * l.row_len + i] = z.z[i % 4];
    }
  }
  return out;
}

void call_randn_fill(at::Tensor& out, int64_t seed, int64_t stream, const std::optional<at::Tensor>& rows) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("pygen::randn_fill_", "");
  torch::jit::Stack stack;
  stack.emplace_back(out);
  stack.emplace_back(seed);
  stack.emplace_back(stream);
  stack.emplace_back(rows.has_value() ? c10::IValue(*rows) : c10::IValue());
  stack.emplace_back(c10::IValue());  // stream_offset
  op.callBoxed(&stack);
  PYGEN_CHECK(stack.empty(), "randn_fill_ returns nothing, got ", stack.size(), " values");
}

void check_randn(std::vector<int64_t> shape, at::ScalarType dtype, int64_t seed, int64_t stream,
                 bool per_row) {
  at::Tensor out = at::full(shape, std::nan(""), at::TensorOptions().dtype(dtype));
  const int64_t batch = shape.empty() ? 1 : shape[0];
  std::vector<int64_t> seeds;
  std::optional<at::Tensor> rows;
  if (per_row) {
    for (int64_t r = 0; r < batch; ++r) seeds.push_back(seed + 1000003 * r - 7 * r * r);
    if (!seeds.empty()) seeds[0] = -1;  // negative seeds: the same 64 bits as uint64
    rows = at::tensor(seeds, at::kLong);
  }
  call_randn_fill(out, seed, stream, rows);
  const std::vector<float> want =
      expected_normals(out.numel(), batch, static_cast<uint64_t>(seed), static_cast<uint64_t>(stream),
                       per_row ? &seeds : nullptr);
  const at::Tensor got = out.to(at::kDouble).contiguous();
  const double* g = got.data_ptr<double>();
  // The kernel may compute log/sin/cos its own (vectorised) way: fp32/fp64
  // storage agree to fp32 rounding of those; fp16/bf16 to one ulp of the
  // storage type (the fp32 values may round to neighbouring storage values).
  const double ulp = dtype == at::kHalf ? std::ldexp(1.0, -10) : dtype == at::kBFloat16 ? std::ldexp(1.0, -7) : 0.0;
  int64_t bad = 0;
  for (int64_t e = 0; e < out.numel(); ++e) {
    const double w = want[e];
    const double mag = std::fabs(w) < 1.0 ? 1.0 : std::exp2(std::floor(std::log2(std::fabs(w))));
    const double tol = ulp > 0 ? ulp * mag : 2e-6 * (1.0 + std::fabs(w));
    if (!(std::fabs(g[e] - w) <= tol)) ++bad;
  }
  PYGEN_CHECK(bad == 0, "randn_fill_ ", c10::toString(dtype), " numel=", out.numel(), " per_row=", per_row,
              ": ", bad, " elements differ from the header math");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3 || (argc == 3 && std::string(argv[2]) != "--all-cpu")) {
    std::fprintf(stderr, "usage: %s <libpygen_cpu.so> [--all-cpu]\n", argv[0]);
    return 2;
  }
  // RTLD_LAZY: bindings.cpp also defines PyInit__C for Python; its Python
  // symbols are never called here and need no libpython.
  void* lib = dlopen(argv[1], RTLD_LAZY | RTLD_LOCAL);
  if (lib == nullptr) {
    std::fprintf(stderr, "dlopen(%s) failed: %s\n", argv[1], dlerror());
    return 1;
  }
  if (argc == 3) return test_all_ops_have_cpu_kernels();
  test_registry();
  check_randn({5, 1}, at::kFloat, 0, 0, false);
  check_randn({3, 5, 7}, at::kFloat, 123456789, 3, false);
  check_randn({3, 5, 7}, at::kFloat, 123456789, 3, true);
  check_randn({2, 1001}, at::kDouble, -5, 1 << 20, true);
  check_randn({2, 1001}, at::kHalf, 77, 0, false);
  check_randn({2, 1001}, at::kBFloat16, 77, 0, true);
  check_randn({4, 40001}, at::kFloat, 0x7fffffffffffffffll, -1, false);  // > parallel grain
  check_randn({4, 40001}, at::kFloat, 99, 12, true);
  check_randn({0, 3}, at::kFloat, 1, 1, true);
  check_randn({}, at::kFloat, 1, 1, false);
  return pygen_test::finish("test_cpu_ops");
}
