# lre-worker and bubblewrap made self-contained for a worker image, the way nixpkgs
# packages are: their shared libraries beside them, the ELF interpreter and RUNPATH pointing
# into this store path. `raw` is a store path (from bundle-worker.sh) holding the host's
# binaries and libraries unchanged; patchelf is the host's.
{ inputs ? import ./inputs.nix, raw, patchelf ? "/usr/bin/patchelf" }:
derivation {
  name = "lre-worker-bundle";
  system = "x86_64-linux";
  builder = "${inputs.busybox}/bin/sh";
  PATH = "${inputs.busybox}/bin";
  raw = builtins.storePath raw;
  inherit patchelf;
  args = [ "-e" "-c" ''
    mkdir -p $out/bin $out/lib
    cp $raw/lib/* $out/lib/
    cp $raw/bin/* $out/bin/
    chmod -R u+w $out
    interp=$(ls $out/lib/ld-linux-*.so.*)
    for b in $out/bin/*; do
      $patchelf --set-interpreter $interp --set-rpath $out/lib $b
    done
    for l in $out/lib/*.so*; do
      case $l in */ld-linux-*) ;; *) $patchelf --set-rpath $out/lib $l ;; esac
    done
    $out/bin/lre-worker --version
  '' ];
}
