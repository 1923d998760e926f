#include "lib/numbers.h"

#include <vector>

namespace numbers {

uint64_t SumTo(uint64_t n) { return n * (n + 1) / 2; }

int PrimesBelow(int limit) {
  if (limit < 3) return 0;
  std::vector<bool> composite(limit, false);
  int count = 0;
  for (int i = 2; i < limit; ++i) {
    if (composite[i]) continue;
    ++count;
    for (long j = static_cast<long>(i) * i; j < limit; j += i) composite[j] = true;
  }
  return count;
}

}  // namespace numbers
