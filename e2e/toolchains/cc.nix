# The e2e C/C++ toolchain: zig's self-contained clang (`zig cc`), wrapped as a plain
# derivation so no nixpkgs is needed. `inputs` holds store paths that prepare.sh imported
# with `nix-store --add`; `variant` lets a test change the toolchain and its closure.
{ inputs ? import ./inputs.nix, variant ? "1" }:
let
  drv = derivation {
    name = "lre-cc-zig";
    system = "x86_64-linux";
    builder = "${inputs.busybox}/bin/sh";
    args = [ "-e" ./build-cc.sh ];
    inherit variant;
    zig = inputs.zig;
    busybox = inputs.busybox;
    PATH = "${inputs.busybox}/bin";
  };
in
drv // {
  passthru.Env = [
    "CC=${drv}/bin/cc"
    "CXX=${drv}/bin/c++"
    "PATH=${drv}/bin:${inputs.busybox}/bin"
  ];
}
