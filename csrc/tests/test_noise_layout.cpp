// csrc/tests/test_noise_layout.cpp — ctest for csrc/include/pygen/noise_layout.h (no torch).
//
// make_noise_layout's rows / row_len / groups_per_row / work_items for whole-
// tensor and per-row numbering (incl. empty and huge tensors), and that the
// work-item walk of the kernels (csrc/cpu/cpu_common.h for_each_noise_element,
// the CUDA kernels) visits every element exactly once with the Philox group
// and lane that pygen.randn's contract gives it.
#include <cstdint>
#include <vector>

#include "check.h"
#include "pygen/noise_layout.h"

using pygen::make_noise_layout;
using pygen::NoiseLayout;

static void check_layout(int64_t numel, int64_t batch, bool per_row, int64_t rows, int64_t row_len,
                         int64_t groups) {
  const NoiseLayout l = make_noise_layout(numel, batch, per_row);
  PYGEN_CHECK(l.rows == rows && l.row_len == row_len && l.groups_per_row == groups &&
                  l.work_items() == rows * groups,
              "numel=", numel, " batch=", batch, " per_row=", per_row, ": rows ", l.rows, " row_len ",
              l.row_len, " groups ", l.groups_per_row, " work ", l.work_items());
}

// Walk the work items as the kernels do and check the element <-> (row, group, lane) map.
static void check_walk(int64_t numel, int64_t batch, bool per_row) {
  const NoiseLayout l = make_noise_layout(numel, batch, per_row);
  std::vector<int> hits(static_cast<size_t>(numel), 0);
  int64_t wrong = 0;
  for (int64_t w = 0; w < l.work_items(); ++w) {
    const int64_t r = w / l.groups_per_row;
    const int64_t g = w - r * l.groups_per_row;
    const int64_t base = r * l.row_len + g * pygen::kGroup;
    const int64_t left = l.row_len - g * pygen::kGroup;
    const int64_t n = left < pygen::kGroup ? left : pygen::kGroup;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t e = base + j;
      if (e < 0 || e >= numel) {
        ++wrong;
        continue;
      }
      ++hits[e];
      // contract: per-row numbering restarts in every batch row
      const int64_t row = per_row ? e / (numel / batch) : 0;
      const int64_t idx = per_row ? e % (numel / batch) : e;
      wrong += row != r || idx / 4 != g || idx % 4 != j;
    }
  }
  int64_t not_once = 0;
  for (int h : hits) not_once += h != 1;
  PYGEN_CHECK(wrong == 0 && not_once == 0, "numel=", numel, " batch=", batch, " per_row=", per_row,
              ": wrong ", wrong, ", elements not visited exactly once ", not_once);
}

int main() {
  // whole tensor, flat numbering
  check_layout(10, 2, false, 1, 10, 3);
  check_layout(8, 1, false, 1, 8, 2);
  check_layout(1, 1, false, 1, 1, 1);
  check_layout(0, 0, false, 1, 0, 0);
  check_layout(0, 5, false, 1, 0, 0);
  // per-row numbering
  check_layout(10, 2, true, 2, 5, 2);
  check_layout(3 * 5 * 7, 3, true, 3, 35, 9);
  check_layout(2 * 1001, 2, true, 2, 1001, 251);
  check_layout(4, 1, true, 1, 4, 1);
  check_layout(0, 3, true, 3, 0, 0);
  check_layout(0, 0, true, 1, 0, 0);
  // huge tensors: 64-bit arithmetic, no overflow
  check_layout(int64_t{1} << 40, 1 << 10, true, 1 << 10, int64_t{1} << 30, int64_t{1} << 28);
  check_layout((int64_t{1} << 40) + 3, 1, false, 1, (int64_t{1} << 40) + 3, (int64_t{1} << 38) + 1);

  for (bool per_row : {false, true}) {
    check_walk(3 * 5 * 7, 3, per_row);
    check_walk(2 * 1001, 2, per_row);
    check_walk(4, 1, per_row);
    check_walk(1, 1, per_row);
    check_walk(0, 4, per_row);
    check_walk(7 * 13, 7, per_row);
    check_walk(64, 16, per_row);
  }
  return pygen_test::finish("test_noise_layout");
}
