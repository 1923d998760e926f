#!/usr/bin/env bash
# e2e/cache_test.sh [SCENARIO...]
#
# End-to-end test: a real Bazel 4.2.3 client against lre-server must get 100%
# remote cache hits. For every scenario a fresh server (fresh filesystem store)
# is started, the fixture workspace e2e/workspaces/cpp is copied into unrelated
# directories A, B, ... each with its own fresh --output_user_root, A builds
# and tests (uploading) and B must then get a remote cache hit for every
# cacheable spawn and produce a working //app:hello.
#
# Scenarios (default: all, in this order; pass names or numbers to pick):
#   1 grpc        --remote_cache=grpc://127.0.0.1:PORT
#   2 http        --remote_cache=http://127.0.0.1:PORT/some-prefix
#   3 tls         https:// + CA-signed server cert + read-write bearer token;
#                 anonymous access is "none": no token => no hits.
#                 (Not grpcs://: Debian's Bazel 4.2.3 crashes on any grpcs://
#                 endpoint, exit 37, "JDK provider does not support ALPN
#                 protocol", because Debian's netty lacks JDK ALPN support.
#                 gRPC over TLS is covered by lre-server/tests/auth_tls.rs.)
#   4 read-token  over grpc:// with tokens: a read-scope token gets hits but
#                 cannot store anything
#   5 restart     SIGTERM the server, start it on the same store, still 100%
#
# Prints one PASS/FAIL line per check and, last, exactly one line
# "N passed, M failed"; exits 1 if any check failed. Progress goes to stderr.
# Environment: see e2e/lib.sh (LRE_SERVER, BAZEL, KEEP, E2E_WORK_DIR, ...).
set -uo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------- helpers
# alloc_ports: GRPC_PORT, HTTP_PORT (distinct, currently free).
alloc_ports() {
  local p
  p="$(free_ports 2)"
  GRPC_PORT="${p%%$'\n'*}"
  HTTP_PORT="${p##*$'\n'}"
}

# write_config FILE STORE_DIR ANONYMOUS [PKI_DIR] [TOKENS]
#   Server config on GRPC_PORT/HTTP_PORT with a filesystem store; with PKI_DIR
#   a [tls] table; with PKI_DIR or TOKENS=tokens the tokens RW_TOKEN ("ci",
#   read-write) and RO_TOKEN ("reader", read) are added.
write_config() {
  local f="$1" store="$2" anon="$3" pki="${4:-}" tokens="${5:-}"
  cat >"$f" <<EOF
grpc_listen = "127.0.0.1:$GRPC_PORT"
http_listen = "127.0.0.1:$HTTP_PORT"

[store]
kind = "filesystem"
path = "$store"
max_size = "2GiB"

[auth]
anonymous = "$anon"
EOF
  if [ -n "$pki" ] || [ "$tokens" = tokens ]; then
    cat >>"$f" <<EOF

[[auth.tokens]]
name = "ci"
sha256 = "$RW_TOKEN_SHA"
scope = "read-write"

[[auth.tokens]]
name = "reader"
sha256 = "$RO_TOKEN_SHA"
scope = "read"
EOF
  fi
  if [ -n "$pki" ]; then
    cat >>"$f" <<EOF

[tls]
cert = "$pki/server.crt"
key = "$pki/server.key"
EOF
  fi
}

# no_token_refused REFUSED_IN_LOG: 0 hits, and the build failed or logged the refusal.
no_token_refused() {
  [ "$HITS" = 0 ] && [ "$SUM_HITS" = 0 ] && { [ "$BZ_RC" != 0 ] || [ "$1" = 1 ]; }
}
# refused_to_upload SAID: the build stopped, and Bazel said why.
refused_to_upload() { [ "$BZ_RC" != 0 ] && [ "$1" = 1 ]; }
changed_all_missed() { [ "$BZ_RC" = 0 ] && [ "$CHANGED" -gt 0 ] && [ "$CHANGED_HITS" = 0 ]; }
server_runs() { "$LRE_SERVER" --help >/dev/null 2>&1; }
tools_present() {
  command -v "$BAZEL" && command -v curl && command -v openssl && command -v python3
} >/dev/null

# http_status URL CURL_ARGS...: prints the HTTP status code (000 if none).
http_status() {
  local url="$1"; shift
  curl -sS -o /dev/null -w '%{http_code}' --max-time 10 "$@" "$url" 2>/dev/null || true
}
status_in() { local s="$1"; shift; local x; for x in "$@"; do [ "$s" = "$x" ] && return 0; done; return 1; }

# server_up LABEL CONFIG [CA_CERT]: start first, so the detail names this server's pid.
server_up() {
  local rc=0
  start_server "$2" "${3:-}" || rc=1
  check "$1: server starts and answers /healthz" "pid $SERVER_PID, log ${SERVER_LOG#"$RUN_DIR"/}" [ "$rc" = 0 ]
}
# stopped_cleanly NAME: SIGTERM the server and check it exited on its own.
stopped_cleanly() {
  local rc=0
  stop_server || rc=$?
  check "$1" "exit status ${SERVER_EXIT_RC:-?}" [ "$rc" = 0 ]
}

server_down() {
  stopped_cleanly "$1: server exits on SIGTERM"
  check "$1: server log has no panic" "${SERVER_LOG#"$RUN_DIR"/}" server_log_clean "$SERVER_LOG"
}

# ---------------------------------------------------------------- scenarios
scenario_grpc() {
  local n="1 grpc"
  new_scenario grpc
  alloc_ports
  write_config "$SCEN/server.toml" "$STORE" read-write
  server_up "$n" "$SCEN/server.toml" || return 0
  local -a remote=("--remote_cache=grpc://127.0.0.1:$GRPC_PORT")
  new_client "$SCEN" A; build_a "$n" "$CL_WS" "$CL_OUR" "${remote[@]}"
  new_client "$SCEN" B; build_b "$n" "$CL_WS" "$CL_OUR" "${remote[@]}"
  server_down "$n"
}

scenario_http() {
  local n="2 http"
  new_scenario http
  alloc_ports
  write_config "$SCEN/server.toml" "$STORE" read-write
  server_up "$n" "$SCEN/server.toml" || return 0
  local -a remote=("--remote_cache=http://127.0.0.1:$HTTP_PORT/some-prefix")
  new_client "$SCEN" A; build_a "$n" "$CL_WS" "$CL_OUR" "${remote[@]}"
  new_client "$SCEN" B; build_b "$n" "$CL_WS" "$CL_OUR" "${remote[@]}"
  server_down "$n"
}

# Tokens and certificates shared by scenarios 3 and 4 (each has its own store).
setup_auth() {
  [ -n "${RW_TOKEN:-}" ] && return 0
  PKI="$RUN_DIR/pki"
  check "tls: openssl makes a CA and a server cert (SAN IP:127.0.0.1, DNS:localhost)" \
    "${PKI#"$RUN_DIR"/}/openssl.log" make_pki "$PKI" || return 1
  RW_TOKEN="rw-$(random_hex 16)"
  RO_TOKEN="ro-$(random_hex 16)"
  RW_TOKEN_SHA="$(printf %s "$RW_TOKEN" | sha256sum | cut -d' ' -f1)"
  RO_TOKEN_SHA="$(printf %s "$RO_TOKEN" | sha256sum | cut -d' ' -f1)"
  local via_server
  via_server="$(printf %s "$RW_TOKEN" | "$LRE_SERVER" hash-token 2>/dev/null | tr -d '[:space:]')"
  check "tls: 'lre-server hash-token' prints the token's sha256" "got '$via_server'" \
    [ "$via_server" = "$RW_TOKEN_SHA" ]
}

scenario_tls() {
  local n="3 tls"
  setup_auth || return 0
  new_scenario tls
  alloc_ports
  write_config "$SCEN/server.toml" "$STORE" none "$PKI"
  server_up "$n" "$SCEN/server.toml" "$PKI/ca.crt" || return 0

  # Direct probes of the HTTPS port's auth (no Bazel involved).
  local url="https://127.0.0.1:$HTTP_PORT" blob sha s
  blob="lre-e2e probe $(random_hex 4)"
  sha="$(printf %s "$blob" | sha256sum | cut -d' ' -f1)"
  s="$(http_status "$url/cas/$sha" --cacert "$PKI/ca.crt")"
  check "$n: HTTPS GET without credentials is refused" "status $s, want 401/403" status_in "$s" 401 403
  s="$(http_status "$url/cas/$sha" --cacert "$PKI/ca.crt" -H "Authorization: Bearer wrong-$(random_hex 8)")"
  check "$n: HTTPS GET with an unknown token is refused" "status $s, want 401/403" status_in "$s" 401 403
  s="$(http_status "$url/cas/$sha" --cacert "$PKI/ca.crt" -X PUT --data-binary "$blob" -H "Authorization: Bearer $RW_TOKEN")"
  check "$n: HTTPS PUT with the read-write bearer token is accepted" "status $s, want 2xx" status_in "$s" 200 201 204
  s="$(http_status "https://ci:$RW_TOKEN@127.0.0.1:$HTTP_PORT/cas/$sha" --cacert "$PKI/ca.crt")"
  check "$n: HTTPS GET with basic auth (ci:TOKEN) finds the blob" "status $s, want 200" status_in "$s" 200

  local -a tls=("--remote_cache=https://127.0.0.1:$HTTP_PORT/tls-team")
  # Read by bazel_startup_flags for every Bazel run in this scenario.
  local BAZEL_STARTUP_FLAGS="${BAZEL_STARTUP_FLAGS:-} --host_jvm_args=-Djavax.net.ssl.trustStore=$PKI/truststore.p12 --host_jvm_args=-Djavax.net.ssl.trustStorePassword=changeit"
  local -a rw=("--remote_header=authorization=Bearer $RW_TOKEN")
  new_client "$SCEN" A; build_a "$n" "$CL_WS" "$CL_OUR" "${tls[@]}" "${rw[@]}"

  # No token against a populated cache with anonymous = "none": Bazel must not
  # get a single hit. Bazel 4.2.3 warns on every refused cache read (401) and
  # builds locally, or fails outright; both are accepted, as long as there are
  # 0 hits and the log shows the refusal (or the build failed).
  new_client "$SCEN" N; bazel_run "$CL_WS" "$CL_OUR" "${tls[@]}"
  local refused=0
  grep -qE 'UNAUTHENTICATED|PERMISSION_DENIED|401|403|[Uu]nauthori[sz]ed' "$BZ_LOG" && refused=1
  check "$n: a build without a token gets no hits (anonymous = none)" \
    "exit $BZ_RC, hits $HITS (summary $SUM_HITS), refusal in log: $refused; log ${BZ_LOG#"$RUN_DIR"/}" \
    no_token_refused "$refused"

  new_client "$SCEN" B; build_b "$n" "$CL_WS" "$CL_OUR" "${tls[@]}" "${rw[@]}"
  server_down "$n"
}

scenario_read_token() {
  local n="4 read-token"
  setup_auth || return 0
  new_scenario read-token
  alloc_ports
  # Plain gRPC with tokens (loopback only), so Bazel's gRPC auth path is exercised.
  write_config "$SCEN/server.toml" "$STORE" none "" tokens
  server_up "$n" "$SCEN/server.toml" || return 0

  local url="http://127.0.0.1:$HTTP_PORT" blob sha s
  blob="lre-e2e probe $(random_hex 4)"
  sha="$(printf %s "$blob" | sha256sum | cut -d' ' -f1)"
  s="$(http_status "$url/cas/$sha" -X PUT --data-binary "$blob" -H "Authorization: Bearer $RO_TOKEN")"
  check "$n: HTTP PUT with the read token is forbidden" "status $s, want 403" status_in "$s" 403
  s="$(http_status "$url/cas/$sha" -H "Authorization: Bearer $RO_TOKEN")"
  check "$n: HTTP GET with the read token is allowed (blob absent)" "status $s, want 404" status_in "$s" 404

  local -a grpc=("--remote_cache=grpc://127.0.0.1:$GRPC_PORT")
  local -a http=("--remote_cache=http://127.0.0.1:$HTTP_PORT/")
  local -a rw=("--remote_header=authorization=Bearer $RW_TOKEN")
  local -a ro=("--remote_header=authorization=Bearer $RO_TOKEN" --noremote_upload_local_results)
  new_client "$SCEN" A; build_a "$n" "$CL_WS" "$CL_OUR" "${grpc[@]}" "${rw[@]}"
  new_client "$SCEN" B; build_b "$n (read token)" "$CL_WS" "$CL_OUR" "${grpc[@]}" "${ro[@]}"
  local baseline="$BZ_EXECLOG"

  # Capabilities tells a read token update_enabled=false, and Bazel then refuses
  # to start a build that would upload: the read-only setup must be explicit.
  new_client "$SCEN" R
  bazel_run "$CL_WS" "$CL_OUR" "${grpc[@]}" "--remote_header=authorization=Bearer $RO_TOKEN"
  local said=0
  grep -q "not authorized to write local results" "$BZ_LOG" && said=1
  check "$n: Bazel over gRPC sees update_enabled=false and refuses to upload with a read token" \
    "exit $BZ_RC, message in log: $said; log ${BZ_LOG#"$RUN_DIR"/}" refused_to_upload "$said"

  # C: changed sources (a comment appended to a header most files include) and
  # a salted --action_env (changes every compile/link/genrule key), built with
  # the read token and uploads left ON, over HTTP (where Bazel does not consult
  # Capabilities, so it really tries). The server refuses each upload with 403;
  # Bazel only warns about it, so the build must still succeed.
  local salt; salt="$(random_hex 8)"
  local -a change=("--action_env=LRE_E2E_SALT=$salt")
  new_client "$SCEN" C
  printf '\n// e2e change %s\n' "$salt" >>"$CL_WS/lib/text.h"
  bazel_run "$CL_WS" "$CL_OUR" "${http[@]}" "--remote_header=authorization=Bearer $RO_TOKEN" "${change[@]}"
  check "$n: C (read token over HTTP, changed source, uploads on) builds and tests fine" \
    "exit $BZ_RC; Bazel logged $REMOTE_WARNINGS remote-cache warnings (refused uploads); log ${BZ_LOG#"$RUN_DIR"/}" \
    [ "$BZ_RC" = 0 ]
  check "$n: C's uploads were refused (Bazel logged remote-cache write warnings)" \
    "$REMOTE_WARNINGS warnings" [ "$REMOTE_WARNINGS" -gt 0 ]

  # D: the same change, fresh output root, read-write token. Every action whose
  # key differs from B's (compared spawn by spawn against B's execution log)
  # must miss: nothing C tried to upload was stored.
  new_client "$SCEN" D
  printf '\n// e2e change %s\n' "$salt" >>"$CL_WS/lib/text.h"
  BASELINE_EXECLOG="$baseline" bazel_run "$CL_WS" "$CL_OUR" "${grpc[@]}" "${rw[@]}" "${change[@]}"
  check "$n: D (read-write token, same change) gets 0 hits for the changed actions" \
    "exit $BZ_RC, changed actions: $CHANGED_HITS hits of $CHANGED; unchanged: $UNCHANGED_HITS hits of $UNCHANGED" \
    changed_all_missed || show_misses

  # E: control. D uploaded the changed actions, so the read token now hits
  # 100% for them: D's misses came from C's refused uploads, not from unstable
  # action keys.
  new_client "$SCEN" E
  printf '\n// e2e change %s\n' "$salt" >>"$CL_WS/lib/text.h"
  bazel_run "$CL_WS" "$CL_OUR" "${grpc[@]}" "${ro[@]}" "${change[@]}"
  check "$n: E (read token, same change, after D uploaded) gets 100% hits" "$(hit_detail)" \
    full_hits_ok || show_misses
  server_down "$n"
}

scenario_restart() {
  local n="5 restart"
  new_scenario restart
  alloc_ports
  write_config "$SCEN/server.toml" "$STORE" read-write
  server_up "$n" "$SCEN/server.toml" || return 0
  local -a remote=("--remote_cache=grpc://127.0.0.1:$GRPC_PORT")
  new_client "$SCEN" A; build_a "$n" "$CL_WS" "$CL_OUR" "${remote[@]}"
  stopped_cleanly "$n: server exits on SIGTERM after A's upload"
  # Same config: same ports, same store directory.
  server_up "$n (restart on the same store)" "$SCEN/server.toml" || return 0
  new_client "$SCEN" B; build_b "$n (after restart)" "$CL_WS" "$CL_OUR" "${remote[@]}"
  server_down "$n"
}

# ---------------------------------------------------------------- main
summary() { echo "$E2E_PASSED passed, $E2E_FAILED failed"; }

main() {
  local -a want=("$@") all=(grpc http tls read-token restart) run=()
  local w
  [ "${#want[@]}" = 0 ] && want=("${all[@]}")
  for w in "${want[@]}"; do
    case "$w" in
      1|grpc) run+=(grpc) ;;
      2|http) run+=(http) ;;
      3|tls) run+=(tls) ;;
      4|read-token|read) run+=(read_token) ;;
      5|restart) run+=(restart) ;;
      -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
      *) echo "unknown scenario '$w' (want: ${all[*]} or 1-5)" >&2; exit 2 ;;
    esac
  done

  e2e_init
  log "run directory $RUN_DIR; server $LRE_SERVER; bazel $(command -v "$BAZEL" || echo "$BAZEL missing")"
  # Pre-flight: without a runnable server and Bazel nothing else is meaningful.
  check "preflight: $LRE_SERVER runs (--help)" "" server_runs
  check "preflight: bazel, curl, openssl, python3 available" "" tools_present
  if [ "$E2E_FAILED" != 0 ]; then
    summary; exit 1
  fi
  for w in "${run[@]}"; do
    "scenario_$w"
    # A scenario that bailed out early may have left its server running.
    if [ -n "${SERVER_PID:-}" ] && pid_alive "$SERVER_PID"; then stop_server >/dev/null 2>&1 || true; fi
  done
  if [ "$E2E_FAILED" != 0 ]; then
    printf 'failed: %s\n' "${E2E_FAILED_NAMES[@]}" >&2
  fi
  summary
  [ "$E2E_FAILED" = 0 ]
}

main "$@"
