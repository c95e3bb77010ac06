// pygen/noise_layout.h — how elements map onto Philox counters (CPU and CUDA).
//
// An op's elements are split into "noise rows". With an int seed and no
// per-row steps there is one noise row (the whole tensor, flat index); with
// per-row seeds or per-row steps each batch row is its own noise row and
// elements are numbered within the row. Work item w covers element group g of
// noise row r: elements r*row_len + 4g + j for j < 4 and 4g + j < row_len.
#pragma once
#include <cstdint>

#include "pygen/common.h"

namespace pygen {

struct NoiseLayout {
  int64_t rows;           // noise rows
  int64_t row_len;        // elements per noise row
  int64_t groups_per_row; // ceil(row_len / 4)

  PYGEN_HD int64_t work_items() const { return rows * groups_per_row; }
};

inline NoiseLayout make_noise_layout(int64_t numel, int64_t batch, bool per_row) {
  NoiseLayout l;
  l.rows = per_row ? (batch > 0 ? batch : 1) : 1;
  l.row_len = per_row ? (batch > 0 ? numel / batch : 0) : numel;
  l.groups_per_row = (l.row_len + kGroup - 1) / kGroup;
  return l;
}

}  // namespace pygen
