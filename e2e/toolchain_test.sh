#!/usr/bin/env bash
# e2e/toolchain_test.sh [SCENARIO...]
#
# The LRE toolchain end to end, with real Nix 2.8, real Bazel 4.2.3, `lre up` (lre-server
# plus bubblewrap workers) and the zig C/C++ toolchain and jlink'ed Java runtime of
# e2e/toolchains, built offline into /nix/store. Scenarios (default: all, in this order):
#   1 nix        the toolchains build with Nix; their closures are store paths only
#   2 generate   lre generate writes .bazelrc.lre and @local-remote-execution; a second run
#                is byte-identical and touches nothing; a hand edit is refused; host
#                paths are refused, each listed; the flake module's installation script
#                leaves an unchanged file alone, refuses a hand-edited one, warns outside git
#   3 aquery     compile and link commands use only /nix/store tools; the binary runs
#   4 cache      local build uploads, a remote-execution build elsewhere hits 100%; the
#                other way round too; the Java genrule runs `java -version` from the store
#                locally and remotely with identical keys; lre doctor passes
#   5 change     a changed toolchain derivation gives new keys (0 hits), and lre explain
#                names the changed store path
# Prints PASS/FAIL lines and, last, "N passed, M failed".
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LRE="${LRE:-$REPO_ROOT/target/debug/lre}"
BAZEL_VERB=build

# gen WS [ARGS...]: lre generate for the test toolchains, as the e2e clients use it.
gen() {
  local ws="$1"; shift
  (cd "$ws" && "$LRE" generate --cc "$TC_DIR/cc.nix" --java "$TC_DIR/java.nix" --prefix lre \
    --bazel-version 4.2.3 --endpoint "grpc://127.0.0.1:${GRPC_PORT:-1}" "$@") >"$SCEN/gen.log" 2>&1
}

generated_files() { (cd "$1" && find .bazelrc.lre .lre -type f | sort); }
sums_and_mtimes() { (cd "$1" && generated_files . | xargs stat -c '%Y %n' && generated_files . | xargs sha256sum); }

# Every absolute path in the generated files is under /nix/store (the repository's own
# labels and the workspace-relative repo path are not absolute).
only_store_paths() {
  local bad
  bad="$(cd "$1" && generated_files . | xargs grep -ohE '(^|[="[:space:]:])/[A-Za-z0-9_.+-][^":[:space:]]*' |
    sed -E 's/^[="[:space:]:]//' | grep -vE '^/nix/store/[0-9a-z]{32}-|^/nix/store[,.]?$' | sort -u)"
  [ -z "$bad" ] || { echo "host paths: $bad" >&2; return 1; }
}

scenario_nix() {
  local n="1 nix"
  new_scenario nix
  log "preparing the toolchains in $TC_DIR"
  check "$n: zig, busybox and a Java runtime imported with nix-store --add" "" \
    bash "$E2E_DIR/toolchains/prepare.sh" "$TC_DIR" || return 1
  CC1="$(nix-build "$TC_DIR/cc.nix" --no-out-link 2>"$SCEN/nix-build.log")"
  JAVA1="$(nix-build "$TC_DIR/java.nix" --no-out-link 2>>"$SCEN/nix-build.log")"
  check "$n: nix-build builds the C/C++ toolchain derivation" "$CC1" test -x "$CC1/bin/cc" || return 1
  check "$n: nix-build builds the Java runtime derivation" "$JAVA1" test -x "$JAVA1/bin/java" || return 1
  local closure; closure="$(nix-store -qR "$CC1" "$JAVA1")"
  check "$n: the closure is zig, busybox, the JRE and the two wrappers" "$(echo "$closure" | wc -l) paths" \
    closure_is "$closure" ziglang busybox jre lre-cc-zig lre-java
}
closure_is() {
  local closure="$1" name; shift
  [ "$(echo "$closure" | wc -l)" = "$#" ] || return 1
  for name in "$@"; do echo "$closure" | grep -qE "^/nix/store/[a-z0-9]{32}-$name\$" || return 1; done
}

scenario_generate() {
  local n="2 generate"
  new_scenario generate
  lre_client "$SCEN" G
  local ws="$CL_WS"
  check "$n: lre generate writes .bazelrc.lre and the toolchain repository" "$(tail -n1 "$SCEN/gen.log" 2>/dev/null)" \
    gen "$ws" || { cat "$SCEN/gen.log" >&2; return 1; }
  check "$n: the repository has the cc toolchain, Java runtime, platform and manifest" "" \
    test -f "$ws/.lre/local-remote-execution/generated/cc/BUILD.bazel" -a \
    -f "$ws/.lre/local-remote-execution/generated/java/BUILD.bazel" -a \
    -f "$ws/.lre/local-remote-execution/generated/config/BUILD.bazel" -a \
    -f "$ws/.lre/local-remote-execution/lre.json"
  check "$n: every absolute path in the generated files is in /nix/store" "" only_store_paths "$ws"
  check "$n: the platform pins the toolchain closure as container-image" "" \
    grep -qE '"container-image": "lre-closure:sha256:[0-9a-f]{64}"' "$ws/.lre/local-remote-execution/generated/config/BUILD.bazel"

  local before after; before="$(sums_and_mtimes "$ws")"
  sleep 1.1
  gen "$ws"; after="$(sums_and_mtimes "$ws")"
  check "$n: a second run writes byte-identical files and touches none" \
    "$(generated_files "$ws" | wc -l) files; $(tail -n1 "$SCEN/gen.log")" [ "$before" = "$after" ]

  echo "build:lre --jobs=1  # mine" >>"$ws/.bazelrc.lre"
  local edited; edited="$(sha256sum <"$ws/.bazelrc.lre")"
  gen "$ws"; local rc=$?
  check "$n: a hand-edited .bazelrc.lre is refused with a clear error, and kept" "exit $rc: $(head -n1 "$SCEN/gen.log")" \
    refused_and_kept "$rc" "$ws/.bazelrc.lre" "$edited"
  gen "$ws" --force
  check "$n: --force restores it" "" [ "$(sums_and_mtimes "$ws" | grep -v '^[0-9]* ')" = "$(echo "$before" | grep -v '^[0-9]* ')" ]

  local host="$SCEN/host"; mkdir -p "$host"
  (cd "$host" && "$LRE" generate --env CC=/usr/bin/gcc --env PATH=/usr/bin --bazel-version 4.2.3) >"$SCEN/host.log" 2>&1
  rc=$?
  check "$n: a host toolchain is refused, listing each offending path" "exit $rc; $(grep -c '^  - ' "$SCEN/host.log") paths listed" \
    host_refused "$rc" "$SCEN/host.log" "$host"
  (cd "$host" && "$LRE" generate --env CC=/usr/bin/gcc --env PATH=/usr/bin --bazel-version 4.2.3 --allow-host-path) >>"$SCEN/host.log" 2>&1
  check "$n: --allow-host-path accepts it" "" test -f "$host/.bazelrc.lre"

  local sp="$SCEN/storepath"; mkdir -p "$sp"
  (cd "$sp" && "$LRE" generate --cc "$CC1" --bazel-version 4.2.3) >"$SCEN/storepath.log" 2>&1
  check "$n: a bare store path works as the toolchain (CC and PATH from its bin/)" "$(tail -n1 "$SCEN/storepath.log")" \
    grep -q "^#   CC=$CC1/bin/cc\$" "$sp/.bazelrc.lre"

  installation_script "$n"
}
refused_and_kept() { [ "$1" != 0 ] && grep -q "edited by hand" "$SCEN/gen.log" && [ "$(sha256sum <"$2")" = "$3" ]; }
host_refused() {
  [ "$1" != 0 ] && grep -q -- '--allow-host-path' "$2" && grep -q 'tool gcc: /usr/bin/gcc' "$2" &&
    grep -q 'Env PATH: /usr/bin' "$2" && grep -qE 'include directory: /usr/' "$2" && [ ! -e "$3/.bazelrc.lre" ]
}

# The flake module's installation script, from modules/lre-core.nix evaluated by plain
# `nix eval` (the flake-parts wrapper needs nixpkgs' lib, which can't be fetched here).
installation_script() {
  local n="$1" script="$SCEN/install.sh" pkg="$SCEN/lre-pkg"
  mkdir -p "$pkg/bin" && ln -sf "$LRE" "$pkg/bin/lre"
  nix eval --raw --impure --expr "(import $REPO_ROOT/modules/lre-core.nix {
      lre = \"$pkg\";
      cc = import $TC_DIR/cc.nix {};
      java = import $TC_DIR/java.nix {};
      bazelVersion = \"4.2.3\";
    }).installationScript" >"$script" 2>"$SCEN/nix-eval.log"
  check "$n: nix eval renders the module's installation script" "" grep -q 'generate --workspace' "$script" || return 0
  lre_client "$SCEN" S
  local repo="$CL_WS"
  git -C "$repo" init -q && mkdir -p "$repo/app"
  (cd "$repo/app" && bash "$script") >"$SCEN/hook1.log" 2>&1
  check "$n: in a git checkout the script writes .bazelrc.lre at the top level" "run from app/" \
    test -f "$repo/.bazelrc.lre"
  local before; before="$(sums_and_mtimes "$repo")"
  sleep 1.1
  (cd "$repo" && bash "$script") >"$SCEN/hook2.log" 2>&1
  check "$n: run again, it leaves the unchanged files untouched" "" [ "$before" = "$(sums_and_mtimes "$repo")" ]
  echo "# my note" >>"$repo/.bazelrc.lre"
  local edited; edited="$(sha256sum <"$repo/.bazelrc.lre")"
  (cd "$repo" && bash "$script") >"$SCEN/hook3.log" 2>&1; local rc=$?
  check "$n: it refuses to overwrite a hand-edited file, without failing the shell" "exit $rc" \
    hook_refused "$rc" "$repo/.bazelrc.lre" "$edited"
  local nogit="$SCEN/nogit"; mkdir -p "$nogit"
  (cd "$nogit" && GIT_CEILING_DIRECTORIES="$SCEN" bash "$script") >"$SCEN/hook4.log" 2>&1; rc=$?
  check "$n: outside a git repository it warns and succeeds" "exit $rc: $(cat "$SCEN/hook4.log")" \
    hook_warned "$rc" "$nogit"
}
hook_refused() { [ "$1" = 0 ] && grep -q "edited by hand" "$SCEN/hook3.log" && [ "$(sha256sum <"$2")" = "$3" ]; }
hook_warned() { [ "$1" = 0 ] && grep -q "not inside a git repository" "$SCEN/hook4.log" && [ ! -e "$2/.bazelrc.lre" ]; }

scenario_aquery() {
  local n="3 aquery"
  new_scenario aquery
  lre_client "$SCEN" Q
  gen "$CL_WS" || { check "$n: lre generate" "$(cat "$SCEN/gen.log")" false; return 0; }
  bazel_startup_flags; bazel_common_flags
  E2E_BAZEL_ROOTS+=("$CL_OUR|$CL_WS")
  (cd "$CL_WS" && timeout "$BAZEL_TIMEOUT" "$BAZEL" "${BZ_STARTUP[@]}" --output_user_root="$CL_OUR" aquery \
    "${BZ_COMMON[@]}" --config=lre --remote_executor= --output=jsonproto 'mnemonic("CppCompile|CppLink|CppArchive", deps(//app:hello))') \
    >"$SCEN/aquery.json" 2>"$SCEN/aquery.log"
  local summary
  summary="$(python3 - "$SCEN/aquery.json" <<'PYEOF'
import json, sys
actions = json.load(open(sys.argv[1])).get("actions", [])
tools = sorted({a["arguments"][0] for a in actions})
host = sorted({x for a in actions for x in a["arguments"] if x.startswith(("/usr", "/bin", "/lib", "/opt"))})
print(f"{len(actions)} actions; tools {' '.join(tools)}; host paths: {' '.join(host) or 'none'}")
ok = actions and all(t.startswith("/nix/store/") for t in tools) and not host
sys.exit(0 if ok else 1)
PYEOF
)"
  local rc=$?
  check "$n: every compile, archive and link command runs a /nix/store tool, with no host path" "$summary" \
    [ "$rc" = 0 ]
  local q="$CL_WS" q_our="$CL_OUR"
  workspace_macro "$n" "$q"
  bazel_run "$q" "$q_our" --config=lre --remote_executor=
  BIN_OUT="$(run_binary "$q")"
  check "$n: the locally built binary runs and prints the expected line" "exit $BZ_RC; got '$BIN_OUT'" output_is_expected
  check "$n: it is a static musl binary from the zig toolchain" "" \
    static_binary "$q/bazel-bin/app/hello"
}
# The bazel/ module's WORKSPACE macro registers the same platform and toolchains, for
# builds that don't use .bazelrc.lre: a checkout whose WORKSPACE calls lre_register().
workspace_macro() {
  local n="$1" src="$2"
  new_client "$SCEN" W
  (cd "$src" && tar --exclude='./bazel-*' -cf - WORKSPACE .lre) | (cd "$CL_WS" && tar -xf -)
  printf '\nload("@local-remote-execution//:defs.bzl", "lre_register")\n\nlre_register(java = False)\n' >>"$CL_WS/WORKSPACE"
  E2E_BAZEL_ROOTS+=("$CL_OUR|$CL_WS")
  (cd "$CL_WS" && timeout "$BAZEL_TIMEOUT" "$BAZEL" "${BZ_STARTUP[@]}" --output_user_root="$CL_OUR" aquery \
    "${BZ_COMMON[@]}" --incompatible_enable_cc_toolchain_resolution --output=text 'mnemonic("CppCompile", //lib:text)') \
    >"$SCEN/aquery-macro.txt" 2>"$SCEN/aquery-macro.log"
  check "$n: without .bazelrc.lre, lre_register() in WORKSPACE selects the pinned toolchain" \
    "$(grep -oE 'exec /nix/store/[^ ]*' "$SCEN/aquery-macro.txt" | head -n1)" \
    grep -qE "exec /nix/store/[a-z0-9]{32}-lre-cc-zig/bin/cc" "$SCEN/aquery-macro.txt"
}

# An ELF executable with no program interpreter (statically linked, runs without host libc).
static_binary() { [ -x "$1" ] && [ "$(python3 - "$1" <<'PYEOF'
import struct, sys
d = open(sys.argv[1], "rb").read()
if d[:4] != b"\x7fELF" or d[4] != 2:
    print("not a 64-bit ELF"); sys.exit()
phoff, = struct.unpack_from("<Q", d, 0x20); size, num = struct.unpack_from("<HH", d, 0x36)
interp = any(struct.unpack_from("<I", d, phoff + i * size)[0] == 3 for i in range(num))
print("dynamic" if interp else "static")
PYEOF
)" = static ]; }

# start_up WS: `lre up` on GRPC_PORT/HTTP_PORT with WS's toolchain platform; sets UP_PID.
start_up() {
  start_bg lre "$LRE" up --grpc-listen "127.0.0.1:$GRPC_PORT" --http-listen "127.0.0.1:$HTTP_PORT" \
    --store-dir "$SCEN/store" --work-dir "$SCEN/workers" --capacity 2 \
    --toolchain "$1/.lre/local-remote-execution/lre.json"
  UP_PID="$BG_PID"
  wait_up "$HTTP_PORT" "$SCEN/lre.log"
}
stop_up() { stop_server "$UP_PID"; }

all_hit() { [ "$BZ_RC" = 0 ] && [ "$CACHEABLE" -gt 0 ] && [ "$HITS" = "$CACHEABLE" ]; }
java_said_version() { grep -q 'openjdk version' "$1/bazel-bin/java/java_version.txt"; }
# genrule_hit LOG: the java genrule's spawn was a remote cache hit.
java_genrule_hit() {
  python3 - "$1" <<'PYEOF'
import json, sys
s = open(sys.argv[1]).read(); dec = json.JSONDecoder(); i = 0; found = False
while i < len(s):
    while i < len(s) and s[i].isspace(): i += 1
    if i >= len(s): break
    o, i = dec.raw_decode(s, i)
    if any(p.endswith("java/java_version.txt") for p in o.get("listedOutputs", [])):
        found = o.get("remoteCacheHit", False)
sys.exit(0 if found else 1)
PYEOF
}

scenario_cache() {
  local n="4 cache"
  new_scenario cache
  lre_client "$SCEN" A
  local a="$CL_WS" a_our="$CL_OUR"
  alloc
  gen "$a" || { check "$n: lre generate" "$(cat "$SCEN/gen.log")" false; return 0; }
  check "$n: lre up starts, offering the toolchain's platform" "" start_up "$a" || return 0
  check "$n: lre up checked the closure and offers its container-image" "" \
    grep -q "container-image" "$SCEN/lre.log"

  bazel_run "$a" "$a_our" --config=lre --remote_executor= "--remote_cache=grpc://127.0.0.1:$GRPC_PORT" \
    "--execution_log_binary_file=$SCEN/A.execlog.bin"
  A_EXECLOG="$BZ_EXECLOG"
  BIN_OUT="$(run_binary "$a")"
  check "$n: A builds locally with the pinned toolchain and uploads" "exit $BZ_RC; '$SUM_LINE'; got '$BIN_OUT'" \
    local_ok
  check "$n: A's Java genrule ran java -version from /nix/store" "" java_said_version "$a"

  lre_client "$SCEN" B
  local b="$CL_WS"
  gen "$b"
  check "$n: B, another checkout, gets the same .bazelrc.lre" "" cmp -s "$a/.bazelrc.lre" "$b/.bazelrc.lre"
  bazel_run "$b" "$CL_OUR" --config=lre
  B_EXECLOG="$BZ_EXECLOG"
  check "$n: B, with --remote_executor and a fresh output root, hits the cache for every action" \
    "exit $BZ_RC; $HITS/$CACHEABLE cacheable hits; '$SUM_LINE'" all_hit || show_misses
  check "$n: the Java genrule has identical keys locally and remotely (B hit A's entry)" "" java_genrule_hit "$B_EXECLOG"
  "$LRE" explain "$A_EXECLOG" "$B_EXECLOG" >"$SCEN/explain-ab.txt" 2>&1
  check "$n: lre explain finds no key differences between A and B" "$(head -n1 "$SCEN/explain-ab.txt")" \
    grep -q ' 0 with different keys' "$SCEN/explain-ab.txt"
  (cd "$b" && "$LRE" doctor) >"$SCEN/doctor.txt" 2>&1
  check "$n: lre doctor passes every check, a worker running the pinned compiler" "$(grep -c '^ok' "$SCEN/doctor.txt") ok" \
    grep -q "all checks passed" "$SCEN/doctor.txt" || sed 's/^/        /' "$SCEN/doctor.txt"

  scenario_change "$a"
  stop_up

  # The other way round: a remote build first, on a fresh cache, then a local build elsewhere.
  new_scenario cache-reverse
  lre_client "$SCEN" C
  local c="$CL_WS"
  alloc
  gen "$c"
  check "$n: lre up restarts on a fresh store" "" start_up "$c" || return 0
  bazel_run "$c" "$CL_OUR" --config=lre
  local remote; remote="$(remote_count)"
  check "$n: C builds everything remotely on the lre workers" "exit $BZ_RC; '$SUM_LINE'" all_remote "$remote"
  BIN_OUT="$(run_binary "$c")"
  check "$n: C's remotely built binary runs" "got '$BIN_OUT'" output_is_expected
  check "$n: C's Java genrule ran java -version on a worker" "" java_said_version "$c"
  lre_client "$SCEN" D
  local d="$CL_WS"
  gen "$d"
  bazel_run "$d" "$CL_OUR" --config=lre --remote_executor= "--remote_cache=grpc://127.0.0.1:$GRPC_PORT"
  check "$n: D, local execution elsewhere, hits the cache for every action" \
    "exit $BZ_RC; $HITS/$CACHEABLE cacheable hits; '$SUM_LINE'" all_hit || show_misses
  stop_up
  (cd "$d" && "$LRE" doctor) >"$SCEN/doctor-down.txt" 2>&1; local rc=$?
  check "$n: with the server down, lre doctor fails and says how to fix it" "exit $rc" \
    doctor_down "$rc" "$SCEN/doctor-down.txt"
}
local_ok() { [ "$BZ_RC" = 0 ] && output_is_expected && ! grep -qE '[0-9]+ remote[ ,.]' <<<"$SUM_LINE"; }
doctor_down() { [ "$1" != 0 ] && grep -q "unreachable" "$2" && grep -q "fix: start it" "$2"; }

# A changed toolchain (new derivation, new store path) against the cache A filled.
scenario_change() {
  local a="$1" n="5 change"
  printf 'import ./cc.nix { variant = "2"; }\n' >"$TC_DIR/cc-variant.nix"
  local cc2; cc2="$(nix-build "$TC_DIR/cc-variant.nix" --no-out-link 2>"$SCEN/nix-build2.log")"
  check "$n: the changed toolchain derivation builds to a new store path" "$cc2" \
    test -x "$cc2/bin/cc" -a "$cc2" != "${CC1:-}"
  lre_client "$SCEN" E
  local e="$CL_WS"
  (cd "$e" && "$LRE" generate --cc "$TC_DIR/cc-variant.nix" --java "$TC_DIR/java.nix" --prefix lre \
    --bazel-version 4.2.3 --endpoint "grpc://127.0.0.1:$GRPC_PORT") >"$SCEN/gen-e.log" 2>&1
  bazel_run "$e" "$CL_OUR" --config=lre --remote_executor= "--remote_cache=grpc://127.0.0.1:$GRPC_PORT" \
    "--execution_log_binary_file=$SCEN/E.execlog.bin"
  check "$n: every action gets a new key: 0 cache hits, and the build succeeds" \
    "exit $BZ_RC; $HITS/$CACHEABLE cacheable hits" no_hits
  "$LRE" explain "$A_EXECLOG" "$BZ_EXECLOG" >"$SCEN/explain-ae.txt" 2>&1; local rc=$?
  local old="${CC1##*/}" new="${cc2##*/}"
  check "$n: lre explain reports the differing actions and names the changed store path" \
    "exit $rc; $(head -n1 "$SCEN/explain-ae.txt")" explained "$rc" "$old" "$new"
  "$LRE" explain "$SCEN/A.execlog.bin" "$SCEN/E.execlog.bin" >"$SCEN/explain-ae-bin.txt" 2>&1
  check "$n: lre explain says the same from Bazel's binary execution logs" "" \
    cmp -s "$SCEN/explain-ae.txt" "$SCEN/explain-ae-bin.txt"

  # The server's own history explains E's misses (against B, the invocation before it):
  # no execution log involved.
  "$LRE" status --server "http://127.0.0.1:$HTTP_PORT" --json >"$SCEN/status-e.json" 2>"$SCEN/status-e.err"
  check "$n: lre status --json names the changed store path for E's missed actions" \
    "$(server_explained "$SCEN/status-e.json" "$old" "$new" 2>&1 | tail -n1)" \
    server_explained_quietly "$SCEN/status-e.json" "$old" "$new"
  curl -fsS "http://127.0.0.1:$HTTP_PORT/explain" >"$SCEN/explain-e.html" 2>"$SCEN/explain-e.err"
  check "$n: the status page's explanation names the old and the new store path" \
    "$(grep -c 'class="difference"' "$SCEN/explain-e.html") differences listed" \
    page_explained "$SCEN/explain-e.html" "$old" "$new"
}
server_explained() {
  python3 - "$@" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1])); old, new = sys.argv[2], sys.argv[3]
e = doc.get("explanation") or {}
diff = e.get("differing", [])
print(f"{len(diff)} differing of {e.get('missed')} missed; new paths {e.get('store_paths_new')}; "
      f"not compared {len(e.get('unexplained', []))}; inputs not compared {e.get('inputs_not_compared')}; "
      f"error {doc.get('explanation_error')}")
ok = (diff and any(p.endswith("/" + new) for p in e.get("store_paths_new", []))
      and any(p.endswith("/" + old) for p in e.get("store_paths_base", []))
      and any(f'argument 0: "/nix/store/{old}' in d for x in diff for d in x["differences"]))
sys.exit(0 if ok else 1)
PY
}
server_explained_quietly() { server_explained "$@" >/dev/null; }
page_explained() {
  grep -q "<li class=\"store-path base\">− <code>/nix/store/$2</code>" "$1" &&
    grep -q "<li class=\"store-path new\">+ <code>/nix/store/$3</code>" "$1" &&
    grep -q 'class="difference"' "$1"
}
no_hits() { [ "$BZ_RC" = 0 ] && [ "$CACHEABLE" -gt 0 ] && [ "$HITS" = 0 ]; }
explained() {
  local f="$SCEN/explain-ae.txt"
  [ "$1" = 1 ] && grep -q "^  - /nix/store/$2  (A only)" "$f" && grep -q "^  + /nix/store/$3  (B only)" "$f" &&
    grep -q 'argument 0: "/nix/store/'"$2" "$f"
}

main() {
  local -a want=("$@")
  [ "${#want[@]}" = 0 ] && want=(generate aquery cache)
  want=(nix "${want[@]}")   # every scenario needs the toolchains
  e2e_init
  check "preflight: lre, nix, bwrap and bazel present" "" \
    test -x "$LRE" -a -n "$(command -v nix-build)" -a -n "$(command -v bwrap)" -a -n "$(command -v "$BAZEL")"
  local w
  for w in "${want[@]}"; do
    case "$w" in
      1|nix) [ -n "${CC1:-}" ] || scenario_nix || break ;;
      2|generate) scenario_generate ;;
      3|aquery) scenario_aquery ;;
      4|cache|5|change) scenario_cache ;;
      *) echo "unknown scenario $w" >&2; exit 2 ;;
    esac
  done
  echo "$E2E_PASSED passed, $E2E_FAILED failed"
  [ "$E2E_FAILED" = 0 ]
}

main "$@"
