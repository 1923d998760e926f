#include <iostream>

#include "lib/banner.h"

int main() {
  std::cout << banner::Line() << std::endl;
  return 0;
}
