#pragma once
#include <string>

namespace banner {
// The line //app:hello prints (see ../expected_output.txt).
std::string Line();
}  // namespace banner
