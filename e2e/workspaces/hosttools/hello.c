#include <stdio.h>

int main(void) {
  printf("hello from the host toolchain\n");
  return 0;
}
