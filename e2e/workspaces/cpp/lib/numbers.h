#pragma once
#include <cstdint>

namespace numbers {
// 1 + 2 + ... + n
uint64_t SumTo(uint64_t n);
// Number of primes strictly below limit.
int PrimesBelow(int limit);
}  // namespace numbers
