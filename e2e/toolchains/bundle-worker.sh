#!/usr/bin/env bash
# Builds the worker bundle of worker.nix: copies lre-worker, bubblewrap and the shared
# libraries they load (as ldd lists them) into DIR/raw, imports that with nix-store --add,
# and builds worker.nix around it. Prints the bundle's store path.
# Usage: bundle-worker.sh TOOLCHAIN_DIR LRE_WORKER
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tc="$1" worker="$2" raw="$1/worker-raw"
rm -rf "$raw" && mkdir -p "$raw/bin" "$raw/lib"
cp "$worker" "$raw/bin/lre-worker"
cp "$(command -v bwrap)" "$raw/bin/bwrap"
for bin in "$raw"/bin/*; do
  ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*ld-linux/ {print $1}'
done | sort -u | while read -r lib; do cp -L "$lib" "$raw/lib/"; done
raw_path=$(nix-store --add "$raw")
nix-build "$here/worker.nix" --arg inputs "import $tc/inputs.nix" --argstr raw "$raw_path" --no-out-link
