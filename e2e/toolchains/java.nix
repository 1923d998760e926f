# The e2e Java runtime: a jlink image prepare.sh imported into the store.
{ inputs ? import ./inputs.nix }:
let
  drv = derivation {
    name = "lre-java";
    system = "x86_64-linux";
    builder = "${inputs.busybox}/bin/sh";
    args = [ "-e" "-c" "mkdir -p $out && ln -s $jre/bin $jre/lib $jre/conf $jre/release $out/" ];
    jre = inputs.jre;
    PATH = "${inputs.busybox}/bin";
  };
in
drv // { passthru.Env = [ "JAVA_HOME=${drv}" "PATH=${drv}/bin" ]; }
