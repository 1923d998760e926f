#include <cstdio>

#include "lib/checksum.h"
#include "lib/numbers.h"

int main() {
  int fails = 0;
  if (numbers::SumTo(10) != 55) { std::puts("FAIL SumTo"); ++fails; }
  if (numbers::PrimesBelow(100) != 25) { std::puts("FAIL PrimesBelow"); ++fails; }
  // Standard CRC-32 check value.
  if (checksum::Crc32("123456789") != 0xCBF43926u) { std::puts("FAIL Crc32"); ++fails; }
  if (checksum::Hex32(0xab) != "000000ab") { std::puts("FAIL Hex32"); ++fails; }
  std::printf("numbers_checksum_test: %d failures\n", fails);
  return fails == 0 ? 0 : 1;
}
