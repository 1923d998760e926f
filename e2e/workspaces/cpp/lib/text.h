#pragma once
#include <string>
#include <vector>

namespace text {
// Joins parts with sep between them.
std::string Join(const std::vector<std::string>& parts, const std::string& sep);
// ASCII upper-casing.
std::string Upper(std::string s);
}  // namespace text
