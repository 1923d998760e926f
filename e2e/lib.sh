# shellcheck shell=bash disable=SC2034
# (SC2034: many variables here are results read by cache_test.sh.)
# Shared helpers for e2e/cache_test.sh. Sourced, not executed.
#
# Needs bash >= 4.4, python3 (>= 3.11 for tomllib; a regex fallback exists),
# curl, openssl, GNU coreutils, and Bazel 4.2.3 (Debian's bazel-bootstrap
# works offline with the shims in e2e/shims).
#
# Environment knobs (all optional):
#   LRE_SERVER       server binary (default: <repo>/target/debug/lre-server)
#   BAZEL            bazel client (default: bazel)
#   BAZEL_TIMEOUT    seconds per bazel invocation (default 1200)
#   BAZEL_STARTUP_FLAGS / BAZEL_EXTRA_FLAGS
#                    extra startup / command flags (whitespace-split)
#   E2E_WORK_DIR     parent of the per-run directory (default <repo>/e2e/.work)
#   KEEP=1           keep the run directory (workspaces, output roots, logs)
#   SERVER_READY_TIMEOUT, SERVER_STOP_TIMEOUT   seconds (default 30 / 20)

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$E2E_DIR/.." && pwd)"
LRE_SERVER="${LRE_SERVER:-$REPO_ROOT/target/debug/lre-server}"
BAZEL="${BAZEL:-bazel}"
BAZEL_TIMEOUT="${BAZEL_TIMEOUT:-1200}"
SHIMS_DIR="$E2E_DIR/shims"
WS_SRC="$E2E_DIR/workspaces/cpp"
EXPECTED_OUTPUT="$(cat "$WS_SRC/expected_output.txt")"
BAZEL_TARGETS=(//...)
BAZEL_VERB="${BAZEL_VERB:-test}"   # bazel_run's command: test (default) or build
SERVER_READY_TIMEOUT="${SERVER_READY_TIMEOUT:-30}"
SERVER_STOP_TIMEOUT="${SERVER_STOP_TIMEOUT:-20}"

E2E_SERVER_PIDS=()     # servers we started and have not stopped yet
E2E_CLEANUP_HOOKS=()   # commands e2e_cleanup runs first (e.g. removing network namespaces)
E2E_NETNS="${E2E_NETNS:-}"  # when set, Bazel runs inside this network namespace
E2E_BAZEL_ROOTS=()     # "OUTPUT_ROOT|WORKSPACE" pairs whose Bazel server may be up
E2E_PASSED=0
E2E_FAILED=0
E2E_FAILED_NAMES=()

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------- checks
# check NAME DETAIL COMMAND...   PASS if COMMAND succeeds, else FAIL (and return 1, so
# callers can add diagnostics or stop with `check ... || ...`).
check() {
  local name="$1" detail="$2"; shift 2
  if "$@"; then
    E2E_PASSED=$((E2E_PASSED + 1))
    printf 'PASS  %s%s\n' "$name" "${detail:+  ($detail)}"
  else
    E2E_FAILED=$((E2E_FAILED + 1))
    E2E_FAILED_NAMES+=("$name")
    printf 'FAIL  %s%s\n' "$name" "${detail:+  ($detail)}"
    return 1
  fi
}

# ---------------------------------------------------------------- run directory
# e2e_init: creates RUN_DIR under E2E_WORK_DIR and installs the EXIT trap that
# stops every server and Bazel server we started.
e2e_init() {
  local parent="${E2E_WORK_DIR:-$E2E_DIR/.work}"
  mkdir -p "$parent"
  RUN_DIR="$(mktemp -d "$parent/run.XXXXXX")"
  # Searchable by others, as a worker's work dir must be for its action uids (mktemp makes
  # it 0700); nothing secret lives here.
  chmod 755 "$RUN_DIR"
  trap e2e_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

e2e_cleanup() {
  local rc=$? pid e
  for e in "${E2E_BAZEL_ROOTS[@]}"; do
    bazel_shutdown "${e#*|}" "${e%%|*}"
  done
  for e in "${E2E_CLEANUP_HOOKS[@]}"; do
    eval "$e" >/dev/null 2>&1 || true
  done
  for pid in "${E2E_SERVER_PIDS[@]}"; do
    stop_server "$pid" >/dev/null 2>&1 || true
  done
  if [ -n "${RUN_DIR:-}" ] && [ -d "$RUN_DIR" ]; then
    if [ "${KEEP:-0}" = 1 ]; then
      log "kept $RUN_DIR"
    elif [ "$E2E_FAILED" = 0 ] && [ "$rc" = 0 ]; then
      rm_tree "$RUN_DIR"
    else
      # Keep logs for diagnosis; drop the bulky Bazel output roots.
      local d
      for d in "$RUN_DIR"/*/*/bazel-root; do rm_tree "$d"; done
      log "logs kept in $RUN_DIR"
    fi
  fi
  exit "$rc"
}

rm_tree() {
  [ -n "${1:-}" ] && [ -e "$1" ] || return 0
  chmod -R u+w "$1" 2>/dev/null || true
  rm -rf "$1"
}

random_hex() { od -An -N"${1:-16}" -tx1 /dev/urandom | tr -d ' \n'; }

# ---------------------------------------------------------------- ports
# free_ports N: prints N distinct free TCP ports on 127.0.0.1, one per line.
# (All sockets are held open until every port is chosen, so they differ.)
free_ports() {
  python3 - "${1:-1}" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print("\n".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
}

free_port() { free_ports 1; }

# tcp_open PORT: succeeds if something accepts TCP connections on 127.0.0.1:PORT.
tcp_open() {
  python3 - "$1" <<'PY'
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

# ---------------------------------------------------------------- server
# config_value FILE KEY: prints a top-level string KEY ("tls" prints "yes" if a
# [tls] table is present).
config_value() {
  python3 - "$1" "$2" <<'PY'
import re, sys
path, key = sys.argv[1], sys.argv[2]
text = open(path, encoding="utf-8").read()
try:
    import tomllib
    cfg = tomllib.loads(text)
    if key == "tls":
        print("yes" if "tls" in cfg else "")
    else:
        print(cfg.get(key, ""))
except ImportError:
    if key == "tls":
        print("yes" if re.search(r"^\[tls\]", text, re.M) else "")
    else:
        m = re.search(r'^%s\s*=\s*"([^"]*)"' % re.escape(key), text, re.M)
        print(m.group(1) if m else "")
PY
}

# start_server CONFIG_FILE [CA_CERT]
#   Runs "$LRE_SERVER --config CONFIG_FILE" in the background, logging to
#   SERVER_LOG (default: server.log beside the config, appended), and waits
#   until GET /healthz on the config's http_listen answers 200 (https with
#   --cacert CA_CERT when the config has a [tls] table) and its grpc_listen
#   port accepts connections. Sets SERVER_PID, SERVER_HTTP_URL. Returns 1 if
#   the server exits or is not ready within SERVER_READY_TIMEOUT seconds.
start_server() {
  local cfg="$1" ca="${2:-}" http grpc scheme=http deadline
  local -a curl_tls=()
  SERVER_LOG="${SERVER_LOG:-$(dirname "$cfg")/server.log}"
  http="$(config_value "$cfg" http_listen)"
  grpc="$(config_value "$cfg" grpc_listen)"
  if [ -n "$(config_value "$cfg" tls)" ]; then
    scheme=https
    [ -n "$ca" ] && curl_tls=(--cacert "$ca")
  fi
  SERVER_HTTP_URL="$scheme://$http"
  printf '\n==== %s: %s --config %s\n' "$(date '+%F %T')" "$LRE_SERVER" "$cfg" >>"$SERVER_LOG"
  "$LRE_SERVER" --config "$cfg" >>"$SERVER_LOG" 2>&1 &
  SERVER_PID=$!
  E2E_SERVER_PIDS+=("$SERVER_PID")
  deadline=$((SECONDS + SERVER_READY_TIMEOUT))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if ! pid_alive "$SERVER_PID"; then
      wait "$SERVER_PID" 2>/dev/null
      log "server exited during start-up (rc $?); last lines of $SERVER_LOG:"
      tail -n 20 "$SERVER_LOG" >&2
      forget_pid "$SERVER_PID"
      return 1
    fi
    if curl -fsS -o /dev/null --max-time 2 "${curl_tls[@]}" "$SERVER_HTTP_URL/healthz" 2>/dev/null &&
       { [ -z "$grpc" ] || tcp_open "${grpc##*:}"; }; then
      log "server pid $SERVER_PID ready (http $SERVER_HTTP_URL, grpc $grpc)"
      return 0
    fi
    sleep 0.2
  done
  log "server pid $SERVER_PID not ready after ${SERVER_READY_TIMEOUT}s; last lines of $SERVER_LOG:"
  tail -n 20 "$SERVER_LOG" >&2
  return 1
}

# A zombie still answers kill -0, so look at the process state too.
pid_alive() {
  local st
  st="$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

forget_pid() {
  local p out=()
  for p in "${E2E_SERVER_PIDS[@]}"; do [ "$p" = "$1" ] || out+=("$p"); done
  E2E_SERVER_PIDS=("${out[@]}")
}

# stop_server [PID]  (default SERVER_PID)
#   SIGTERM, wait up to SERVER_STOP_TIMEOUT seconds, then SIGKILL. Sets
#   SERVER_EXIT_RC (the server's exit status). Returns 0 if the server exited
#   on its own after SIGTERM, 1 if it had to be killed.
stop_server() {
  local pid="${1:-${SERVER_PID:-}}" deadline rc=0
  SERVER_EXIT_RC=""
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + SERVER_STOP_TIMEOUT))
  while pid_alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
  if pid_alive "$pid"; then
    log "server pid $pid still running ${SERVER_STOP_TIMEOUT}s after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    rc=1
  fi
  wait "$pid" 2>/dev/null
  SERVER_EXIT_RC=$?
  forget_pid "$pid"
  return "$rc"
}

# server_log_clean FILE: no Rust panic in the server log.
server_log_clean() { ! grep -q "panicked at" "$1" 2>/dev/null; }

# ---------------------------------------------------------------- TLS
# make_pki DIR: CA (ca.crt/ca.key) and a server certificate signed by it
# (server.crt/server.key) with SAN IP:127.0.0.1, DNS:localhost, plus a Java
# trust store with the CA (truststore.p12, password changeit).
make_pki() {
  local d="$1"
  mkdir -p "$d"
  (
    set -e
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 2 \
      -keyout ca.key -out ca.crt -subj "/CN=lre-e2e test CA" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey rsa:2048 -nodes -sha256 \
      -keyout server.key -out server.csr -subj "/CN=localhost"
    cat > server.ext <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
EOF
    openssl x509 -req -sha256 -days 2 -in server.csr -CA ca.crt -CAkey ca.key \
      -CAcreateserial -extfile server.ext -out server.crt
    openssl verify -CAfile ca.crt server.crt
    # Bazel 4.2.3's HTTP cache client ignores --tls_certificate (gRPC only) and
    # trusts the JVM's trust store; this one holds just the test CA.
    keytool -importcert -noprompt -alias lre-e2e-ca -file ca.crt \
      -keystore truststore.p12 -storetype PKCS12 -storepass changeit
  ) >"$d/openssl.log" 2>&1
}

# new_scenario NAME: SCEN (its directory) and STORE (fresh, empty store dir).
new_scenario() {
  SCEN="$RUN_DIR/$1"
  STORE="$SCEN/store"
  mkdir -p "$SCEN" "$STORE"
  SERVER_LOG="$SCEN/server.log"
  echo "== scenario $1" >&2
}

# ---------------------------------------------------------------- workspaces
# new_client SCENARIO_DIR NAME: copies the fixture workspace into a directory
# unrelated to any other client's, with its own fresh output root. Sets CL_WS
# (workspace) and CL_OUR (--output_user_root, absent until Bazel creates it).
new_client() {
  local base="$1/$2"
  CL_WS="$base/checkout-$2-$(random_hex 3)/src"
  CL_OUR="$base/bazel-root"
  mkdir -p "$CL_WS"
  (cd "$WS_SRC" && tar --exclude='./bazel-*' -cf - .) | (cd "$CL_WS" && tar -xf -)
}

# ---------------------------------------------------------------- bazel
# Debian's bazel-bootstrap keeps its install base in /usr/share/bazel and
# needs a local JDK as host javabase; it normally reads both from
# /etc/bazel/bazelrc, which --nosystem_rc skips, so pass them explicitly.
bazel_startup_flags() {
  BZ_STARTUP=(--nohome_rc --nosystem_rc --max_idle_secs=300)
  if [ -d /usr/share/bazel/embedded_tools ] && [ "$(readlink -f "$(command -v "$BAZEL")")" = /usr/bin/bazel ]; then
    BZ_STARTUP+=(--install_base=/usr/share/bazel --trust_install_base)
    BZ_DEBIAN=1
  else
    BZ_DEBIAN=0
  fi
  # shellcheck disable=SC2206
  BZ_STARTUP+=(${BAZEL_STARTUP_FLAGS:-})
  BZ_PREFIX=()
  [ -n "$E2E_NETNS" ] && BZ_PREFIX=(ip netns exec "$E2E_NETNS")
}

bazel_common_flags() {
  BZ_COMMON=(
    "--override_repository=rules_cc=$SHIMS_DIR/rules_cc"
    "--override_repository=rules_java=$SHIMS_DIR/rules_java"
    "--override_repository=remote_coverage_tools=$SHIMS_DIR/remote_coverage_tools"
    --color=no --curses=no --show_progress_rate_limit=30
    --test_output=errors
  )
  [ "$BZ_DEBIAN" = 1 ] && BZ_COMMON+=("--host_javabase=@local_jdk//:jdk")
  # shellcheck disable=SC2206
  BZ_COMMON+=(${BAZEL_EXTRA_FLAGS:-})
}

# bazel_shutdown WORKSPACE OUTPUT_ROOT
bazel_shutdown() {
  local ws="$1" our="$2"
  [ -d "$ws" ] && [ -d "$our" ] || return 0
  bazel_startup_flags
  (cd "$ws" && timeout 60 "${BZ_PREFIX[@]}" "$BAZEL" "${BZ_STARTUP[@]}" --output_user_root="$our" shutdown) >/dev/null 2>&1 || true
}

# bazel_run DIR OUTPUT_ROOT FLAGS...
#   `bazel test //...` in workspace DIR with a fresh --output_user_root, the
#   shim overrides and FLAGS (e.g. --remote_cache=...), then `bazel shutdown`.
#   Output goes to OUTPUT_ROOT.log, the execution log to OUTPUT_ROOT.exec.json.
#   Sets:
#     BZ_RC, BZ_LOG, BZ_EXECLOG
#     SUM_LINE, SUM_TOTAL, SUM_INTERNAL, SUM_HITS    from Bazel's summary line
#     SPAWNS, CACHEABLE, HITS, MISSES, NOT_CACHEABLE, XMLGEN, XMLGEN_HITS,
#     FAILED, RUNNERS (and CHANGED*, UNCHANGED* if BASELINE_EXECLOG is set)
#                                                    from the execution log
#     REMOTE_WARNINGS  number of remote-cache WARNING lines in the log
bazel_run() {
  local ws="$1" our="$2"; shift 2
  BZ_LOG="$our.log"
  BZ_EXECLOG="$our.exec.json"
  bazel_startup_flags
  bazel_common_flags
  E2E_BAZEL_ROOTS+=("$our|$ws")
  log "bazel $BAZEL_VERB in ${ws#"$RUN_DIR"/} $(printf '%s\n' "$@" | sed -E 's/(authorization=|Bearer ).*$/\1***/' | tr '\n' ' ')"
  (cd "$ws" && timeout --signal=TERM "$BAZEL_TIMEOUT" \
      "${BZ_PREFIX[@]}" "$BAZEL" "${BZ_STARTUP[@]}" --output_user_root="$our" \
      "$BAZEL_VERB" "${BZ_COMMON[@]}" --execution_log_json_file="$BZ_EXECLOG" "$@" \
      -- "${BAZEL_TARGETS[@]}") >"$BZ_LOG" 2>&1
  BZ_RC=$?
  bazel_shutdown "$ws" "$our"
  parse_summary "$BZ_LOG"
  parse_execlog "$BZ_EXECLOG"
  REMOTE_WARNINGS="$(grep -cE '^WARNING: .*([Rr]emote [Cc]ache|UNAUTHENTICATED|PERMISSION_DENIED|UNAVAILABLE)' "$BZ_LOG" || true)"
  log "  -> exit $BZ_RC; ${SUM_LINE:-no summary line}; exec log: $HITS/$CACHEABLE cacheable hits, $NOT_CACHEABLE not cacheable, $XMLGEN test-xml ($XMLGEN_HITS hit); $REMOTE_WARNINGS remote warnings"
  if [ $((HITS + XMLGEN_HITS)) != "$SUM_HITS" ] || [ "$SPAWNS" != $((SUM_TOTAL - SUM_INTERNAL)) ]; then
    log "  note: summary line and execution log disagree (summary: $SUM_HITS hits, $((SUM_TOTAL - SUM_INTERNAL)) spawns)"
  fi
}

# parse_summary LOG: Bazel 4.2.3 prints e.g.
#   INFO: 43 processes: 19 internal, 24 linux-sandbox.
#   INFO: 43 processes: 21 remote cache hit, 19 internal, 3 linux-sandbox.
#   INFO: 1 process: 1 internal.
# (other runners: processwrapper-sandbox, local, remote, worker). The last such
# line wins. Sets SUM_LINE SUM_TOTAL SUM_INTERNAL SUM_HITS.
parse_summary() {
  eval "$(python3 - "$1" <<'PY'
import re, shlex, sys
total = internal = hits = 0
line = ""
try:
    lines = open(sys.argv[1], encoding="utf-8", errors="replace").read().splitlines()
except OSError:
    lines = []
for l in lines:
    m = re.match(r"^INFO: (\d+) process(?:es)?(?:: (.*))?\.$", l)
    if not m:
        continue
    line, total, internal, hits = l[len("INFO: "):], int(m.group(1)), 0, 0
    for part in (m.group(2) or "").split(","):
        pm = re.match(r"^\s*(\d+) (.+?)\s*$", part)
        if pm and pm.group(2) == "internal":
            internal += int(pm.group(1))
        elif pm and pm.group(2) == "remote cache hit":
            hits += int(pm.group(1))
print("SUM_LINE=%s SUM_TOTAL=%d SUM_INTERNAL=%d SUM_HITS=%d" % (shlex.quote(line), total, internal, hits))
PY
)"
}

# parse_execlog EXECLOG: sets the execution-log counters (see execlog_stats.py;
# it leaves test-XML spawns out of CACHEABLE because their key contains the
# test's duration). The per-spawn breakdown goes to EXECLOG.txt.
parse_execlog() {
  local -a extra=()
  SPAWNS=0 CACHEABLE=0 HITS=0 MISSES=0 NOT_CACHEABLE=0 XMLGEN=0 XMLGEN_HITS=0 FAILED=0 RUNNERS=""
  CHANGED=0 CHANGED_HITS=0 UNCHANGED=0 UNCHANGED_HITS=0
  [ -s "$1" ] || return 0
  [ -n "${BASELINE_EXECLOG:-}" ] && extra=(--baseline "$BASELINE_EXECLOG")
  eval "$(python3 "$E2E_DIR/execlog_stats.py" "$1" "${extra[@]}" 2>"$1.txt")"
}

# show_misses: print the execution-log breakdown of the last bazel_run.
show_misses() {
  [ -s "$BZ_EXECLOG.txt" ] && sed 's/^/        /' "$BZ_EXECLOG.txt" | head -n 40
  grep -E '^(WARNING|ERROR): ' "$BZ_LOG" | grep -v 'rc files are no longer being read' | head -n 10 | cut -c1-300 | sed 's/^/        /'
  return 0
}

# run_binary WS: prints what WS/bazel-bin/app/hello prints.
run_binary() { (cd "$1" && timeout 60 ./bazel-bin/app/hello) 2>&1; }

# ---------------------------------------------------------------- the LRE (Nix) toolchain
OVERLAY="$E2E_DIR/workspaces/lre"
# Kept between runs (and by CI within one run) so zig is downloaded once.
TC_DIR="${E2E_TOOLCHAIN_DIR:-$E2E_DIR/.work/toolchain}"
export NIX_CONFIG="${NIX_CONFIG:-$'experimental-features = nix-command flakes\nsandbox = false\nbuild-users-group =\nsubstituters ='}"

# lre_client SCEN NAME: a fresh checkout of the fixture with the LRE overlay.
lre_client() {
  new_client "$1" "$2"
  (cd "$OVERLAY" && tar --exclude=README.md -cf - .) | (cd "$CL_WS" && tar -xf -)
}

# ---------------------------------------------------------------- shared by exec and toolchain tests
# remote_count: the "N remote" figure of the last summary line.
remote_count() { printf '%s\n' "$SUM_LINE" | grep -oE '[0-9]+ remote[,.]' | grep -oE '[0-9]+' || echo 0; }

# start_bg NAME CMD...: starts a background process logging to $SCEN/NAME.log; sets BG_PID.
start_bg() {
  local name="$1"; shift
  "$@" >>"$SCEN/$name.log" 2>&1 &
  BG_PID=$!
  E2E_SERVER_PIDS+=("$BG_PID")
}

# wait_healthy PORT: until /healthz on 127.0.0.1:PORT answers (30 s at most).
wait_healthy() {
  local deadline=$((SECONDS + 30))
  while [ "$SECONDS" -lt "$deadline" ]; do
    curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$1/healthz" 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}

# wait_up HTTP_PORT LOG: lre up is healthy and has printed its whole banner. Health comes
# before the banner's last line, so a check that reads the banner waits for both.
wait_up() {
  wait_healthy "$1" && wait_log "$2" "sandbox shows" 1
}

# browse URL OUT [SCREENSHOT]: the DOM headless Chromium builds from URL (and, with a
# third argument, a screenshot of the page). Runs as root, hence --no-sandbox.
browse() {
  local -a flags=(--headless --no-sandbox --disable-gpu --user-data-dir="$SCEN/chromium-profile")
  timeout 60 chromium "${flags[@]}" --dump-dom "$1" >"$2" 2>>"$SCEN/chromium.log" || return 1
  if [ -n "${3:-}" ]; then
    timeout 60 chromium "${flags[@]}" --window-size=1280,2200 --screenshot="$3" "$1" >>"$SCEN/chromium.log" 2>&1
  fi
}

# dom_has FILE PATTERN...: FILE (a dumped DOM) matches every extended regex PATTERN.
dom_has() {
  local f="$1" p; shift
  for p in "$@"; do grep -qE -- "$p" "$f" || return 1; done
}

# browse_has URL OUT PATTERN...: the page Chromium builds from URL matches every PATTERN.
browse_has() { local url="$1" out="$2"; shift 2; browse "$url" "$out" && dom_has "$out" "$@"; }

# wait_log FILE PATTERN COUNT: until FILE has COUNT lines matching PATTERN (30 s at most).
wait_log() {
  local deadline=$((SECONDS + 30))
  while [ "$SECONDS" -lt "$deadline" ]; do
    # grep -c prints 0 (and fails) when nothing matches, and nothing for a missing file.
    local n; n="$(grep -cE "$2" "$1" 2>/dev/null)"
    [ "${n:-0}" -ge "$3" ] && return 0
    sleep 0.2
  done
  return 1
}

alloc() { local p; p="$(free_ports 2)"; GRPC_PORT="${p%%$'\n'*}"; HTTP_PORT="${p##*$'\n'}"; }

# output_sums WS: sha256 of every build output except test logs and XML (which hold times).
output_sums() {
  (cd "$1/bazel-bin" && find -L . -type f \( -name '*.o' -o -name '*.a' -o -name '*.so' -o -perm -u+x -o -path './gen/*' \) \
    ! -name '*.runfiles_manifest' ! -path '*.runfiles/*' ! -name '*.sh' -print0 | sort -z | xargs -0 sha256sum)
}

same_files() { [ -s "$1" ] && cmp -s "$1" "$2"; }
not_alive() { ! pid_alive "$1"; }
all_remote() { [ "$BZ_RC" = 0 ] && [ "$1" -gt 0 ] && [ "$1" = $((SUM_TOTAL - SUM_INTERNAL)) ]; }
output_is_expected() { [ "$BIN_OUT" = "$EXPECTED_OUTPUT" ]; }

# sha256_hex STRING: what `lre-server hash-token` prints for STRING.
sha256_hex() { printf %s "$1" | sha256sum | cut -d' ' -f1; }

# server_config: $SCEN/server.toml for an execution-enabled lre-server on GRPC_PORT/HTTP_PORT,
# with a worker token (scope "worker") in $SCEN/worker.token for the workers' --token-file.
server_config() {
  local wt; wt="$(random_hex 32)"
  printf '%s\n' "$wt" >"$SCEN/worker.token"
  chmod 600 "$SCEN/worker.token"
  cat >"$SCEN/server.toml" <<EOT
grpc_listen = "127.0.0.1:$GRPC_PORT"
http_listen = "127.0.0.1:$HTTP_PORT"
[store]
path = "$SCEN/store"
[execution]
enabled = true
keepalive_seconds = 2
[[auth.tokens]]
name = "e2e-worker"
sha256 = "$(sha256_hex "$wt")"
scope = "worker"
EOT
}

# ---------------------------------------------------------------- uploading build, then all hits
# Conditions used by the checks (they read the last bazel_run's results).
cold_upload_ok() {
  [ "$BZ_RC" = 0 ] && [ "$CACHEABLE" -gt 0 ] && [ "$HITS" = 0 ] && [ "$REMOTE_WARNINGS" = 0 ]
}
# full_hits_ok [EXPECTED_CACHEABLE]
full_hits_ok() {
  [ "$BZ_RC" = 0 ] && [ "$CACHEABLE" -gt 0 ] && [ "$HITS" = "$CACHEABLE" ] &&
    { [ -z "${1:-}" ] || [ "$CACHEABLE" = "$1" ]; }
}
output_ok() { [ "$BIN_OUT" = "$EXPECTED_OUTPUT" ]; }
hit_detail() {
  echo "exit $BZ_RC, hits $HITS/$CACHEABLE cacheable spawns; $NOT_CACHEABLE not cacheable, $XMLGEN test-xml ($XMLGEN_HITS hit) and $SUM_INTERNAL internal actions not counted; '$SUM_LINE'"
}

# build_a LABEL WS OUR FLAGS...: the uploading build; records A_CACHEABLE.
build_a() {
  local label="$1" ws="$2" our="$3"; shift 3
  bazel_run "$ws" "$our" "$@"
  A_CACHEABLE="$CACHEABLE"
  check "$label: A cold build+test succeeds, uploads without remote warnings" \
    "exit $BZ_RC, $HITS hits, $CACHEABLE cacheable spawns ran, $REMOTE_WARNINGS remote warnings; log ${BZ_LOG#"$RUN_DIR"/}" \
    cold_upload_ok || show_misses
}

# build_b LABEL WS OUR FLAGS...: must be 100% hits and a working binary.
build_b() {
  local label="$1" ws="$2" our="$3"; shift 3
  bazel_run "$ws" "$our" "$@"
  check "$label: every cacheable spawn is a remote cache hit (100%)" "$(hit_detail)" \
    full_hits_ok "$A_CACHEABLE" || show_misses
  BIN_OUT="$(run_binary "$ws")"
  check "$label: bazel-bin/app/hello prints the expected line" "got '$BIN_OUT'" output_ok
}

