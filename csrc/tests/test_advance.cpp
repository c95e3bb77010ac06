// csrc/tests/test_advance.cpp — ctest for the in-kernel advance encoding of csrc/include/pygen/step.h
// (no torch, no GPU).
//
// Plays the blocks of one launch on the host, in order: each block reads the index word (which
// may carry the units added by the blocks before it), decodes the index, adds its unit and checks
// whether it is the last. Every block must decode the original index, exactly one block (the
// last) must see itself last, and the stored result must be index + 1, for indices over the whole
// supported range [-2^39, 2^39) and launches up to kMaxAdvanceBlocks blocks.
#include <cstdint>

#include "check.h"
#include "pygen/step.h"

using namespace pygen::step;

static void play(int64_t index, int64_t blocks) {
  uint64_t word = static_cast<uint64_t>(index);
  int64_t last_seen = 0, wrong_decode = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t read = decode_advancing_index(static_cast<int64_t>(word));
    if (read != index) ++wrong_decode;
    const uint64_t old = word;
    word += uint64_t(1) << kAdvanceShift;  // atomicAdd
    if (advance_count(static_cast<int64_t>(old), read) == blocks - 1) {
      ++last_seen;
      word = static_cast<uint64_t>(read + 1);  // the last block's store
    }
  }
  PYGEN_CHECK(wrong_decode == 0, "index ", index, " blocks ", blocks, ": ", wrong_decode, " wrong decodes");
  PYGEN_CHECK(last_seen == 1, "index ", index, " blocks ", blocks, ": ", last_seen, " blocks saw themselves last");
  PYGEN_CHECK_EQ(static_cast<int64_t>(word), index + 1);
}

int main() {
  const int64_t lim = int64_t(1) << (kAdvanceShift - 1);
  const int64_t indices[] = {0, 1, 7, 999, -1, -2, -(int64_t(1) << 31), int64_t(1) << 31, lim - 2, -lim};
  for (int64_t index : indices) {
    for (int64_t blocks : {int64_t(1), int64_t(2), int64_t(3), int64_t(257), int64_t(100000)}) play(index, blocks);
  }
  play(5, kMaxAdvanceBlocks);
  play(-1, kMaxAdvanceBlocks);
  // plain indices (no units in flight) decode to themselves over the whole range
  for (int64_t v : indices) PYGEN_CHECK_EQ(decode_advancing_index(v), v);
  return pygen_test::finish("test_advance");
}
