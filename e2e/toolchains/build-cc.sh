# Builder for cc.nix, run by busybox sh. Writes `zig cc` wrappers and a pre-built zig cache
# holding musl and libc++ for x86_64-linux-musl, so actions never compile the C runtime.
mkdir -p "$out/bin" "$out/share"
target=x86_64-linux-musl
sh="$busybox/bin/sh"

# zig needs a writable cache. Its manifests (h/) must be writable files, its artifacts (o/)
# may be read-only, so each fresh temporary directory gets a copy of h/ and links to o/.
# The directories of both are made writable (chmod -R skips the links), since actions do
# not run as root: zig adds its new artifacts under o/.
cat > "$out/bin/.zig-env" <<ENV
cache="\${TMPDIR:-/tmp}/lre-zig-$(basename "$out")"
if [ ! -d "\$cache/o" ]; then
  tmp="\$cache.\$\$"
  mkdir -p "\$tmp" && cp -r "$out/share/zig-cache/h" "\$tmp/h" \
    && cp -rs "$out/share/zig-cache/o" "\$tmp/o" && chmod -R u+w "\$tmp" \
    && mv "\$tmp" "\$cache" 2>/dev/null || rm -rf "\$tmp"
fi
export ZIG_GLOBAL_CACHE_DIR="\$cache" ZIG_LOCAL_CACHE_DIR="\$cache"
ENV

wrap() { # name, command
  printf '#!%s\n. %s\nexec %s "$@"\n' "$sh" "$out/bin/.zig-env" "$2" > "$out/bin/$1"
  chmod 555 "$out/bin/$1"
}
wrap c++ "$zig/zig c++ -target $target"
# Bazel drives C and C++ through one `gcc` tool. clang picks the language per file, but
# `zig cc` never adds libc++, so this driver switches to `zig c++` when it sees C++:
# a C++ source, `-x c++`, or libc++ on the link line (also inside an @params file).
cat > "$out/bin/cc" <<CC
#!$sh
. $out/bin/.zig-env
mode=cc
prev=
for a in "\$@"; do
  case "\$a" in
    *.cc|*.cpp|*.cxx|*.c++|*.C|-lstdc++|-lc++) mode=c++ ;;
    @*) $busybox/bin/grep -qE '^(-lstdc\+\+|-lc\+\+|.*\.(cc|cpp|cxx))\$' "\${a#@}" 2>/dev/null && mode=c++ ;;
  esac
  [ "\$prev" = -x ] && [ "\$a" = c++ ] && mode=c++
  prev=\$a
done
exec $zig/zig \$mode -target $target "\$@"
CC
chmod 555 "$out/bin/cc"
wrap ar "$zig/zig ar"
wrap ld "$zig/zig ld.lld"
wrap objcopy "$zig/zig objcopy"
printf '#!%s\nexec %s objcopy --strip-all "$@"\n' "$sh" "$zig/zig" > "$out/bin/strip"
for tool in nm objdump gcov; do
  printf '#!%s\necho "%s: not part of the zig toolchain" >&2\nexit 1\n' "$sh" "$tool" > "$out/bin/$tool"
done
chmod 555 "$out/bin/strip" "$out/bin/nm" "$out/bin/objdump" "$out/bin/gcov"
echo "$variant" > "$out/share/variant"

# Warm the cache the way Bazel links: zig keys its C/C++ runtime libraries on the link's
# options, and Bazel strips (-Wl,-S) in fastbuild but not in dbg, so both are built; the
# C++ links cover the C runtime as well. The two run side by side.
export TMPDIR="${TMPDIR:-/tmp}" HOME="$TMPDIR"
export ZIG_GLOBAL_CACHE_DIR="$TMPDIR/zig-cache" ZIG_LOCAL_CACHE_DIR="$TMPDIR/zig-cache"
cd "$TMPDIR"
printf '#include <stdio.h>\nint main(void){puts("c");return 0;}\n' > warm.c
printf '#include <iostream>\nint main(){std::cout<<"c++"<<std::endl;}\n' > warm.cc
"$zig/zig" c++ -target $target warm.cc -o warm-cc &
"$zig/zig" c++ -target $target warm.cc -o warm-cc-stripped -Wl,-S &
wait
"$zig/zig" cc -target $target warm.c -o warm-c
./warm-c && ./warm-cc && ./warm-cc-stripped
rm -rf "$ZIG_GLOBAL_CACHE_DIR/tmp"
cp -r "$ZIG_GLOBAL_CACHE_DIR" "$out/share/zig-cache"
