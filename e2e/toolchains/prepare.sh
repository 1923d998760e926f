#!/usr/bin/env bash
# Builds the e2e toolchains with real Nix, offline: imports zig (PyPI `ziglang`), a static
# busybox and a jlink'ed Java runtime with `nix-store --add`, then writes DIR/cc.nix and
# DIR/java.nix, which wrap this directory's derivations around those store paths.
# Usage: prepare.sh DIR   (idempotent; a second run reuses what the first imported)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mkdir -p "$1" && cd "$1" && pwd)
ZIGLANG_VERSION=${ZIGLANG_VERSION:-0.14.1}
export NIX_CONFIG=${NIX_CONFIG:-$'experimental-features = nix-command flakes\nsandbox = false\nbuild-users-group =\nsubstituters ='}

if [[ ! -x $dir/src/ziglang/zig ]]; then
  # --target keeps it out of any Python environment, which is why Debian's guard against
  # installing into the system Python does not apply.
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check \
    --root-user-action=ignore --no-deps \
    --target "$dir/src" "ziglang==$ZIGLANG_VERSION"
  # pip's own files (bytecode, metadata) are not part of the compiler.
  rm -rf "$dir/src/ziglang/__pycache__" "$dir"/src/ziglang-*.dist-info
fi
if [[ ! -x $dir/src/busybox/bin/busybox ]]; then
  mkdir -p "$dir/src/busybox/bin"
  cp /bin/busybox "$dir/src/busybox/bin/busybox"
  for applet in $("$dir/src/busybox/bin/busybox" --list); do
    [[ $applet == busybox ]] || ln -sf busybox "$dir/src/busybox/bin/$applet"
  done
fi
if [[ ! -x $dir/src/jre/bin/java ]]; then
  jlink=${JAVA_HOME:+$JAVA_HOME/bin/}jlink
  "$jlink" --add-modules java.base --strip-debug --no-header-files --no-man-pages \
    --output "$dir/src/jre"
fi

zig=$(nix-store --add "$dir/src/ziglang")
busybox=$(nix-store --add "$dir/src/busybox")
jre=$(nix-store --add "$dir/src/jre")
cat > "$dir/inputs.nix" <<NIX
{
  zig = builtins.storePath "$zig";
  busybox = builtins.storePath "$busybox";
  jre = builtins.storePath "$jre";
}
NIX
for t in cc java; do
  printf 'args@{ ... }: import %s/%s.nix ({ inputs = import ./inputs.nix; } // args)\n' \
    "$here" "$t" > "$dir/$t.nix"
done
