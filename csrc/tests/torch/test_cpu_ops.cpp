// csrc/tests/torch/test_cpu_ops.cpp — ctest: load the C++ CPU kernel library
// (csrc/bindings.cpp + csrc/cpu/*.cpp, built by CMakeLists.txt) the way
// `import pygen._C` does, and call its ops through the torch dispatcher.
//
//   test_cpu_ops <path to libpygen_cpu.so>
//
// * every schema of csrc/bindings.cpp is registered under pygen::;
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
#include <optional>
#include <string>
#include <vector>

#include "../check.h"
#include "pygen/noise_layout.h"
#include "pygen/philox.h"

namespace {

const char* const kOps[] = {"randn_fill_",   "q_sample",      "reparameterize",
                            "langevin_step", "sampler_step_", "step_coefficients"};

void test_schemas() {
  auto& d = c10::Dispatcher::singleton();
  for (const char* name : kOps) {
    const std::string full = std::string("pygen::") + name;
    PYGEN_CHECK(d.findSchema({full.c_str(), ""}).has_value(), full, " is not registered");
  }
  auto op = d.findSchema({"pygen::randn_fill_", ""});
  if (op) PYGEN_CHECK(op->hasKernelForDispatchKey(c10::DispatchKey::CPU), "randn_fill_ has no CPU kernel");
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
  // fp32/fp64: the same header math in the same compiler -> equal up to fp32
  // rounding; fp16/bf16: the fp32 value rounded to the storage type.
  int64_t bad = 0;
  for (int64_t e = 0; e < out.numel(); ++e) {
    double w = want[e];
    double tol = 2e-6 * (1.0 + std::fabs(w));
    if (dtype == at::kHalf) w = static_cast<double>(static_cast<float>(c10::Half(want[e]))), tol = 0;
    if (dtype == at::kBFloat16) w = static_cast<double>(static_cast<float>(c10::BFloat16(want[e]))), tol = 0;
    if (!(std::fabs(g[e] - w) <= tol)) ++bad;
  }
  PYGEN_CHECK(bad == 0, "randn_fill_ ", c10::toString(dtype), " numel=", out.numel(), " per_row=", per_row,
              ": ", bad, " elements differ from the header math");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <libpygen_cpu.so>\n", argv[0]);
    return 2;
  }
  // RTLD_LAZY: bindings.cpp also defines PyInit__C for Python; its Python
  // symbols are never called here and need no libpython.
  void* lib = dlopen(argv[1], RTLD_LAZY | RTLD_LOCAL);
  if (lib == nullptr) {
    std::fprintf(stderr, "dlopen(%s) failed: %s\n", argv[1], dlerror());
    return 1;
  }
  test_schemas();
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
