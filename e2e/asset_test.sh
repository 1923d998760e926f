#!/usr/bin/env bash
# e2e/asset_test.sh [SCENARIO...]
#
# End-to-end test of the Remote Asset API with Bazel 4.2.3's
# --experimental_remote_downloader. An upstream (python3 -m http.server on
# 127.0.0.1) serves a small tar.gz; a workspace made at test time imports it
# with http_archive (sha256 given) and a genrule reads a file of it. The server
# allows downloads from 127.0.0.1 only (allowed_hosts, allowed_private_ranges).
#
# Scenarios (default: all, in this order; pass names or numbers to pick):
#   1 fetch     A builds through the downloader (the upstream log shows the
#               GET, the CAS holds the archive); with the upstream stopped, B
#               (fresh output root, fresh --repository_cache) still builds,
#               answered from the server's memory
#   2 checksum  a WORKSPACE with a wrong sha256 fails with a checksum error;
#               the server fetched the archive but stored nothing: neither the
#               wrong nor the real hash is in the CAS
#   3 refused   with allowed_hosts = ["mirror.example.com"] the build fails
#               with PERMISSION_DENIED and no request reaches the upstream
#
# Prints one PASS/FAIL line per check and, last, exactly one line
# "N passed, M failed"; exits 1 if any check failed. Progress goes to stderr.
# Environment: see e2e/lib.sh (LRE_SERVER, BAZEL, KEEP, E2E_WORK_DIR, ...).
set -uo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BAZEL_VERB=build
BAZEL_TARGETS=(//:greet)
GREETING="hello from the asset e2e archive"
# The server logs every Remote Asset request (with its qualifiers) at debug level.
export LRE_LOG="${LRE_LOG:-info,lre_server::asset=debug}"

# ---------------------------------------------------------------- helpers
alloc_ports() {
  local p
  p="$(free_ports 3)"
  GRPC_PORT="$(sed -n 1p <<<"$p")"
  HTTP_PORT="$(sed -n 2p <<<"$p")"
  UP_PORT="$(sed -n 3p <<<"$p")"
}

# write_config FILE ALLOWED_HOSTS (a TOML array body, e.g. '"127.0.0.1"')
write_config() {
  cat >"$1" <<EOF
grpc_listen = "127.0.0.1:$GRPC_PORT"
http_listen = "127.0.0.1:$HTTP_PORT"

[store]
kind = "filesystem"
path = "$STORE"
max_size = "1GiB"

[asset]
allowed_hosts = [$2]
allowed_private_ranges = ["127.0.0.1/32"]
download_timeout_seconds = 60
EOF
}

# make_archive: $SCEN/upstream/pkg-1.0.tar.gz (a BUILD file and greeting.txt
# under pkg-1.0/); sets ARCHIVE_SHA.
make_archive() {
  local d="$SCEN/archive-src/pkg-1.0"
  mkdir -p "$d" "$SCEN/upstream"
  printf '%s\n' "$GREETING" >"$d/greeting.txt"
  printf 'exports_files(["greeting.txt"])\n' >"$d/BUILD.bazel"
  tar -C "$SCEN/archive-src" -czf "$SCEN/upstream/pkg-1.0.tar.gz" pkg-1.0
  ARCHIVE_SHA="$(sha256sum "$SCEN/upstream/pkg-1.0.tar.gz" | cut -d' ' -f1)"
}

# upstream_up: python3's http.server on UP_PORT serving $SCEN/upstream; its
# request log is $SCEN/upstream.log. Sets UP_PID.
upstream_up() {
  local deadline=$((SECONDS + 20))
  start_bg upstream python3 -m http.server --bind 127.0.0.1 --directory "$SCEN/upstream" "$UP_PORT"
  UP_PID="$BG_PID"
  while [ "$SECONDS" -lt "$deadline" ]; do
    tcp_open "$UP_PORT" && return 0
    sleep 0.2
  done
  return 1
}

# archive_gets: how many GETs of the archive the upstream logged.
archive_gets() { grep -c '"GET /pkg-1.0.tar.gz HTTP' "$SCEN/upstream.log" 2>/dev/null || true; }

# new_ws NAME SHA256: a fresh workspace in its own directory with its own
# output root and repository cache. Sets CL_WS, CL_OUR, CL_REPO_CACHE.
new_ws() {
  local base="$SCEN/$1"
  CL_WS="$base/checkout-$1-$(random_hex 3)/src"
  CL_OUR="$base/bazel-root"
  CL_REPO_CACHE="$base/repository-cache"
  mkdir -p "$CL_WS"
  cat >"$CL_WS/WORKSPACE" <<EOF
workspace(name = "asset_e2e")

load("@bazel_tools//tools/build_defs/repo:http.bzl", "http_archive")

http_archive(
    name = "pkg",
    urls = ["http://127.0.0.1:$UP_PORT/pkg-1.0.tar.gz"],
    sha256 = "$2",
    strip_prefix = "pkg-1.0",
)
EOF
  cat >"$CL_WS/BUILD.bazel" <<'EOF'
genrule(
    name = "greet",
    srcs = ["@pkg//:greeting.txt"],
    outs = ["greet.txt"],
    cmd = "cat $< > $@",
)
EOF
}

# build_ws: bazel build //:greet in CL_WS through the server's downloader.
build_ws() {
  bazel_run "$CL_WS" "$CL_OUR" \
    "--experimental_remote_downloader=grpc://127.0.0.1:$GRPC_PORT" \
    "--remote_cache=grpc://127.0.0.1:$GRPC_PORT" \
    "--repository_cache=$CL_REPO_CACHE" "$@"
}

greeting_ok() { [ "$BZ_RC" = 0 ] && [ "$(cat "$CL_WS/bazel-bin/greet.txt" 2>/dev/null)" = "$GREETING" ]; }
build_failed_with() { [ "$BZ_RC" != 0 ] && grep -qiE "$1" "$BZ_LOG"; }

http_status() {
  curl -sS -o /dev/null -w '%{http_code}' --max-time 10 "$1" 2>/dev/null || true
}
cas_status() { http_status "http://127.0.0.1:$HTTP_PORT/cas/$1"; }

# asset_requests: the server's "remote asset request" log lines.
asset_requests() { grep 'remote asset request' "$SERVER_LOG" 2>/dev/null || true; }
asset_request_count() { asset_requests | grep -c 'method="\?FetchBlob' || true; }

server_runs() { "$LRE_SERVER" --help >/dev/null 2>&1; }
tools_present() { command -v "$BAZEL" && command -v curl && command -v python3 && command -v tar; } >/dev/null

server_up() {
  local rc=0
  start_server "$2" || rc=1
  check "$1: server starts and answers /healthz" "pid $SERVER_PID, log ${SERVER_LOG#"$RUN_DIR"/}" [ "$rc" = 0 ]
}
server_down() {
  local rc=0
  stop_server || rc=$?
  check "$1: server exits on SIGTERM" "exit status ${SERVER_EXIT_RC:-?}" [ "$rc" = 0 ]
  check "$1: server log has no panic" "${SERVER_LOG#"$RUN_DIR"/}" server_log_clean "$SERVER_LOG"
}

# ---------------------------------------------------------------- scenarios
scenario_fetch() {
  local n="1 fetch" s
  new_scenario fetch
  alloc_ports
  make_archive
  write_config "$SCEN/server.toml" '"127.0.0.1"'
  server_up "$n" "$SCEN/server.toml" || return 0
  check "$n: upstream http.server serves on 127.0.0.1:$UP_PORT" "" upstream_up || return 0

  new_ws A "$ARCHIVE_SHA"
  build_ws
  check "$n: A builds //:greet through --experimental_remote_downloader" \
    "exit $BZ_RC; log ${BZ_LOG#"$RUN_DIR"/}" greeting_ok || show_misses
  check "$n: the upstream served the archive once (to the server)" \
    "$(archive_gets) GET(s) in upstream.log" [ "$(archive_gets)" = 1 ]
  check "$n: Bazel asked the server (FetchBlob)" "$(asset_request_count) request(s)" \
    [ "$(asset_request_count)" -ge 1 ]
  local sent
  sent="$(asset_requests | head -n 1 | grep -oE 'qualifiers=\[[^]]*\]' || true)"
  log "  Bazel's FetchBlob: ${sent:-no qualifiers logged}"
  check "$n: Bazel sent the sha256 as a checksum.sri qualifier" "$sent" has_sri "$sent"
  s="$(cas_status "$ARCHIVE_SHA")"
  check "$n: the server's CAS holds the archive (GET /cas/SHA)" "status $s" [ "$s" = 200 ]

  stop_server "$UP_PID" >/dev/null 2>&1 || true
  check "$n: upstream stopped" "port $UP_PORT" not_listening "$UP_PORT"
  new_ws B "$ARCHIVE_SHA"
  build_ws
  check "$n: B (fresh output root and repository cache, upstream down) still builds" \
    "exit $BZ_RC; log ${BZ_LOG#"$RUN_DIR"/}" greeting_ok || show_misses
  check "$n: B was answered from the server's memory" \
    "$(grep -c 'answered from memory' "$SERVER_LOG") memory answer(s), $(archive_gets) upstream GET(s)" \
    grep -q 'answered from memory' "$SERVER_LOG"
  server_down "$n"
}

not_listening() { ! tcp_open "$1"; }
has_sri() { grep -q "checksum.sri=sha256-" <<<"$1"; }

scenario_checksum() {
  local n="2 checksum" s wrong
  new_scenario checksum
  alloc_ports
  make_archive
  write_config "$SCEN/server.toml" '"127.0.0.1"'
  server_up "$n" "$SCEN/server.toml" || return 0
  check "$n: upstream http.server serves on 127.0.0.1:$UP_PORT" "" upstream_up || return 0
  wrong="$(printf 'not the archive %s' "$(random_hex 4)" | sha256sum | cut -d' ' -f1)"
  new_ws C "$wrong"
  build_ws
  # The server's INVALID_ARGUMENT, which Bazel reports as the fetch error.
  check "$n: a wrong sha256 fails the build with a checksum error" \
    "exit $BZ_RC; $(grep -oE 'INVALID_ARGUMENT: .*checksum mismatch[^;]*' "$BZ_LOG" | head -n 1 | sed 's/^INVALID_ARGUMENT: invalid argument: //' | cut -c1-220)" \
    build_failed_with "INVALID_ARGUMENT: .*checksum mismatch"
  check "$n: the server did fetch the archive" "$(archive_gets) GET(s)" [ "$(archive_gets)" -ge 1 ]
  s="$(cas_status "$wrong")"
  check "$n: no blob with the wrong hash in the CAS" "GET /cas/WRONG: $s" [ "$s" = 404 ]
  s="$(cas_status "$ARCHIVE_SHA")"
  check "$n: the mismatching download was not stored either" "GET /cas/REAL: $s" [ "$s" = 404 ]
  stop_server "$UP_PID" >/dev/null 2>&1 || true
  server_down "$n"
}

scenario_refused() {
  local n="3 refused"
  new_scenario refused
  alloc_ports
  make_archive
  write_config "$SCEN/server.toml" '"mirror.example.com"'
  server_up "$n" "$SCEN/server.toml" || return 0
  check "$n: upstream http.server serves on 127.0.0.1:$UP_PORT" "" upstream_up || return 0
  new_ws D "$ARCHIVE_SHA"
  build_ws
  check "$n: a host outside asset.allowed_hosts fails the build with PERMISSION_DENIED" \
    "exit $BZ_RC; log ${BZ_LOG#"$RUN_DIR"/}" build_failed_with "PERMISSION_DENIED.*asset.allowed_hosts"
  check "$n: no request reached the upstream" "$(archive_gets) GET(s)" [ "$(archive_gets)" = 0 ]
  stop_server "$UP_PID" >/dev/null 2>&1 || true
  server_down "$n"
}

# ---------------------------------------------------------------- main
summary() { echo "$E2E_PASSED passed, $E2E_FAILED failed"; }

main() {
  local -a want=("$@") all=(fetch checksum refused) run=()
  local w
  [ "${#want[@]}" = 0 ] && want=("${all[@]}")
  for w in "${want[@]}"; do
    case "$w" in
      1|fetch) run+=(fetch) ;;
      2|checksum) run+=(checksum) ;;
      3|refused) run+=(refused) ;;
      -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
      *) echo "unknown scenario '$w' (want: ${all[*]} or 1-3)" >&2; exit 2 ;;
    esac
  done

  e2e_init
  log "run directory $RUN_DIR; server $LRE_SERVER; bazel $(command -v "$BAZEL" || echo "$BAZEL missing")"
  check "preflight: $LRE_SERVER runs (--help)" "" server_runs
  check "preflight: bazel, curl, python3, tar available" "" tools_present
  if [ "$E2E_FAILED" != 0 ]; then
    summary; exit 1
  fi
  for w in "${run[@]}"; do
    "scenario_$w"
    # A scenario that bailed out early may have left its processes running.
    if [ -n "${UP_PID:-}" ] && pid_alive "$UP_PID"; then stop_server "$UP_PID" >/dev/null 2>&1 || true; fi
    if [ -n "${SERVER_PID:-}" ] && pid_alive "$SERVER_PID"; then stop_server >/dev/null 2>&1 || true; fi
  done
  if [ "$E2E_FAILED" != 0 ]; then
    printf 'failed: %s\n' "${E2E_FAILED_NAMES[@]}" >&2
  fi
  summary
  [ "$E2E_FAILED" = 0 ]
}

main "$@"
