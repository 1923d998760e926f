#include "lib/banner.h"

#include <string>

#include "gen/version.h"
#include "lib/checksum.h"
#include "lib/numbers.h"
#include "lib/text.h"

namespace banner {

std::string Line() {
  const std::string words = text::Join({"hello", "from", "the", "remote", "cache"}, " ");
  return "lre-e2e " LRE_E2E_VERSION ": " + words +
         " sum(1..100)=" + std::to_string(numbers::SumTo(100)) +
         " primes<1000=" + std::to_string(numbers::PrimesBelow(1000)) +
         " crc32=" + checksum::Hex32(checksum::Crc32(text::Upper(words)));
}

}  // namespace banner
