#include <cstdio>

#include "lib/text.h"

int main() {
  int fails = 0;
  if (text::Join({"a", "b", "c"}, "-") != "a-b-c") { std::puts("FAIL Join"); ++fails; }
  if (text::Join({}, "-") != "") { std::puts("FAIL Join empty"); ++fails; }
  if (text::Upper("abc1") != "ABC1") { std::puts("FAIL Upper"); ++fails; }
  std::printf("text_test: %d failures\n", fails);
  return fails == 0 ? 0 : 1;
}
