#pragma once
#include <cstdint>
#include <string>

namespace checksum {
// CRC-32 (IEEE 802.3, as zlib's crc32), bitwise implementation.
uint32_t Crc32(const std::string& data);
// 8 lowercase hex digits.
std::string Hex32(uint32_t v);
}  // namespace checksum
