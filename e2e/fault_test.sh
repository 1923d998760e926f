#!/usr/bin/env bash
# e2e/fault_test.sh [SCENARIO...]
#
# Faults under a real Bazel 4.2.3 building the fixture with remote execution through
# lre-server and lre-worker. Scenarios (default: all):
#   1 kill9     lre-server is SIGKILLed while actions run and restarted on the same ports
#               and store: the build completes through Bazel's retries, or fails with a
#               clear error; the next build from a fresh checkout hits; every CAS file
#               still hashes to its name
#   2 fulldisk  the store lives on a small tmpfs that fills mid-build: Bazel is told
#               RESOURCE_EXHAUSTED (a warning; the build still succeeds locally), the
#               server stays up and serves nothing corrupt; once the disk grows, the
#               next build uploads and the one after hits
#   3 load      4 Bazel clients at once, each with its own checkout and output root, all
#               executing remotely on one server with two workers: 0 failed builds; the
#               server's peak RSS is reported and bounded
# Prints PASS/FAIL lines and, last, "N passed, M failed". Scenario 2 needs root (mount).
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LRE_WORKER="${LRE_WORKER:-$REPO_ROOT/target/debug/lre-worker}"
# The load scenario's bound on the server's resident memory (MiB).
LOAD_RSS_LIMIT_MIB="${LOAD_RSS_LIMIT_MIB:-1024}"

start_worker() { # NAME CAPACITY
  start_bg "$1" "$LRE_WORKER" --server "http://127.0.0.1:$GRPC_PORT" --id "$1" --capacity "$2" \
    --token-file "$SCEN/worker.token" --work-dir "$SCEN/$1"
}

# Genrules that sleep, so that a fault lands while actions run.
slow_package() {
  mkdir -p "$CL_WS/slow"
  cat >"$CL_WS/slow/BUILD" <<'EOT'
[genrule(
    name = "slow_%d" % i,
    outs = ["slow_%d.txt" % i],
    cmd = "sleep 3; echo slow %d > $@" % i,
) for i in range(6)]
EOT
}

# cas_intact STORE: every CAS file hashes to its own name (nothing corrupt to serve).
cas_intact() {
  local bad=0 f
  while IFS= read -r -d '' f; do
    [ "$(sha256sum "$f" | cut -d' ' -f1)" = "$(basename "$f")" ] || { echo "corrupt: $f" >&2; bad=$((bad + 1)); }
  done < <(find "$1/cas" -type f -name '[0-9a-f]*' -print0 2>/dev/null)
  [ "$bad" = 0 ]
}
cas_count() { find "$1/cas" -type f -name '[0-9a-f]*' 2>/dev/null | wc -l; }

built_and_hit() { [ "$BZ_RC" = 0 ] && [ "$SUM_HITS" -gt 0 ]; }
clean_build() { [ "$BZ_RC" = 0 ] && [ "$REMOTE_WARNINGS" = 0 ]; }
disk_full() { [ "$(df --output=avail -k "$1" | tail -1)" -lt 64 ]; }
all_ok() { # "RC REMOTE" pairs: every client exited 0 and ran actions remotely
  local c
  for c in "$@"; do [ "${c%% *}" = 0 ] && [ "${c##* }" -gt 0 ] || return 1; done
}
# Blobs the worker fetched: its cache's cas/ and cas-x/ entries (not the store's LOCK file).
both_ran() { [ "$(find "$1/cas/cas" "$1/cas/cas-x" -type f | wc -l)" -gt 0 ] && [ "$(find "$2/cas/cas" "$2/cas/cas-x" -type f | wc -l)" -gt 0 ]; }
rss_bounded() { [ "$1" -gt 0 ] && [ "$1" -lt $((LOAD_RSS_LIMIT_MIB * 1024)) ]; }
# Every cacheable spawn hit (the execution log's count; test-XML and no-cache spawns aside).
all_hits() { [ "$BZ_RC" = 0 ] && [ "$CACHEABLE" -gt 0 ] && [ "$HITS" = "$CACHEABLE" ]; }
hits_line() { echo "exit $BZ_RC; $HITS/$CACHEABLE cacheable spawns hit; '$SUM_LINE'"; }
ok_or_clear() { [ "$BZ_RC" = 0 ] || grep -qE 'ERROR: .*(UNAVAILABLE|NOT_FOUND|io exception|Connection refused)' "$BZ_LOG"; }

REMOTE_EXEC=()
remote_flags() {
  REMOTE_EXEC=("--remote_executor=grpc://127.0.0.1:$GRPC_PORT" --remote_retries=10 --remote_timeout=120)
}

scenario_kill9() {
  local n="1 kill9"
  new_scenario kill9
  alloc
  server_config
  start_bg server "$LRE_SERVER" --config "$SCEN/server.toml"
  local server="$BG_PID"
  check "$n: server up" "" wait_healthy "$HTTP_PORT" || return 0
  start_worker w 2
  check "$n: worker registered" "" wait_log "$SCEN/server.log" "worker connected" 1 || return 0
  remote_flags

  new_client "$SCEN" A
  slow_package
  # SIGKILL the server once a sleep runs in the worker's sandbox; restart it at once.
  (
    deadline=$((SECONDS + 300))
    while [ "$SECONDS" -lt "$deadline" ]; do
      for p in $(pgrep -x sleep); do
        case "$(readlink "/proc/$p/cwd" 2>/dev/null)" in
          "$SCEN/w"/*)
            kill -KILL "$server"
            echo "killed lre-server (pid $server) while sleep pid $p ran" >>"$SCEN/kill.log"
            while pid_alive "$server"; do sleep 0.1; done
            "$LRE_SERVER" --config "$SCEN/server.toml" >>"$SCEN/server.log" 2>&1 &
            echo "$!" >"$SCEN/restarted.pid"
            exit 0 ;;
        esac
      done
      sleep 0.1
    done
  ) &
  local killer=$!
  bazel_run "$CL_WS" "$CL_OUR" "${REMOTE_EXEC[@]}"
  wait "$killer" 2>/dev/null
  forget_pid "$server"
  [ -s "$SCEN/restarted.pid" ] && E2E_SERVER_PIDS+=("$(cat "$SCEN/restarted.pid")")
  check "$n: lre-server was SIGKILLed mid-build and restarted" "$(cat "$SCEN/kill.log" 2>/dev/null)" \
    [ -s "$SCEN/restarted.pid" ]
  local first_rc="$BZ_RC"
  check "$n: the build completes through Bazel's retries, or fails with a clear error" \
    "exit $BZ_RC; '$SUM_LINE'; $(grep -m1 '^ERROR' "$BZ_LOG")" ok_or_clear
  check "$n: the restarted server is healthy, the worker back" "" \
    wait_log "$SCEN/server.log" "worker connected" 2
  check "$n: every CAS file hashes to its name after the SIGKILL" "$(cas_count "$SCEN/store") files" \
    cas_intact "$SCEN/store"

  new_client "$SCEN" B
  slow_package
  bazel_run "$CL_WS" "$CL_OUR" "${REMOTE_EXEC[@]}"
  if [ "$first_rc" = 0 ]; then
    check "$n: the next build, from a fresh checkout, is all hits" "$(hits_line)" all_hits
  else
    check "$n: the next build, from a fresh checkout, succeeds and hits" "exit $BZ_RC; '$SUM_LINE'" built_and_hit
  fi
  check "$n: no panic in the server log" "" server_log_clean "$SCEN/server.log"
}

scenario_fulldisk() {
  local n="2 fulldisk"
  new_scenario fulldisk
  check "$n: runs as root (it mounts a small tmpfs for the store)" "uid $(id -u)" [ "$(id -u)" = 0 ] || return 0
  alloc
  server_config
  mount -t tmpfs -o size=256k lre-e2e-full "$SCEN/store" ||
    { check "$n: mount a 256 KiB tmpfs" "" false; return 0; }
  E2E_CLEANUP_HOOKS+=("umount -l '$SCEN/store'")
  # The store believes it has room: the disk, not the LRU, is what runs out.
  sed -i 's|^path = .*|&\nmax_size = "1GiB"|' "$SCEN/server.toml"
  start_bg server "$LRE_SERVER" --config "$SCEN/server.toml"
  check "$n: server up on a 256 KiB disk" "" wait_healthy "$HTTP_PORT" || return 0

  new_client "$SCEN" A
  # Without --verbose_failures Bazel 4.2.3 folds several failed uploads into "N errors
  # during bulk transfer" and drops their status; with it, the causes are printed.
  bazel_run "$CL_WS" "$CL_OUR" "--remote_cache=grpc://127.0.0.1:$GRPC_PORT" --verbose_failures
  check "$n: the build succeeds; uploads that did not fit are warnings" "exit $BZ_RC; $REMOTE_WARNINGS warnings" \
    [ "$BZ_RC" = 0 ]
  check "$n: Bazel was told RESOURCE_EXHAUSTED (the disk, not a server bug)" \
    "$(grep -m1 -oE '.{0,60}RESOURCE_EXHAUSTED.{0,100}' "$BZ_LOG")" grep -q RESOURCE_EXHAUSTED "$BZ_LOG"
  check "$n: the disk really filled" "$(df -h "$SCEN/store" | tail -1)" disk_full "$SCEN/store"
  check "$n: the server is still up" "" curl -fsS -o /dev/null --max-time 5 "http://127.0.0.1:$HTTP_PORT/healthz"
  check "$n: every CAS file hashes to its name" "$(cas_count "$SCEN/store") files" cas_intact "$SCEN/store"

  mount -o remount,size=512m "$SCEN/store"
  new_client "$SCEN" B
  bazel_run "$CL_WS" "$CL_OUR" "--remote_cache=grpc://127.0.0.1:$GRPC_PORT"
  check "$n: with room again, the next build uploads without warnings" "exit $BZ_RC; $REMOTE_WARNINGS warnings" \
    clean_build
  new_client "$SCEN" C
  bazel_run "$CL_WS" "$CL_OUR" "--remote_cache=grpc://127.0.0.1:$GRPC_PORT"
  check "$n: and the one after is all hits" "$(hits_line)" all_hits
  check "$n: every CAS file hashes to its name" "$(cas_count "$SCEN/store") files" cas_intact "$SCEN/store"
  check "$n: no panic in the server log" "" server_log_clean "$SCEN/server.log"
}

scenario_load() {
  local n="3 load"
  new_scenario load
  alloc
  server_config
  start_bg server "$LRE_SERVER" --config "$SCEN/server.toml"
  local server="$BG_PID"
  check "$n: server up" "" wait_healthy "$HTTP_PORT" || return 0
  start_worker w1 2
  start_worker w2 2
  check "$n: both workers registered" "" wait_log "$SCEN/server.log" "worker connected" 2 || return 0
  remote_flags

  # Peak resident memory, sampled while the clients run (VmHWM is the kernel's own peak).
  ( while pid_alive "$server"; do grep VmHWM "/proc/$server/status" >"$SCEN/hwm" 2>/dev/null; sleep 0.5; done ) &
  local sampler=$! i pids=() rcs=() c
  for i in 1 2 3 4; do
    new_client "$SCEN" "C$i"
    echo "$CL_WS|$CL_OUR" >"$SCEN/client$i"
    # Each client runs every action itself (no cache lookups), so the server sees 4
    # builds' worth of Execute calls, identical actions among them.
    ( bazel_run "$CL_WS" "$CL_OUR" "${REMOTE_EXEC[@]}" --noremote_accept_cached
      echo "$BZ_RC $(remote_count)" >"$SCEN/client$i.rc" ) &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do wait "${pids[$i]}"; done
  for i in 1 2 3 4; do
    c="$(cat "$SCEN/client$i.rc" 2>/dev/null || echo "none 0")"
    rcs+=("$c")
  done
  local hwm_kb; hwm_kb="$(awk '{ print $2 }' "$SCEN/hwm" 2>/dev/null || echo 0)"
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  log "load: client exit codes and remote counts: ${rcs[*]}; server peak RSS $((hwm_kb / 1024)) MiB"
  check "$n: 4 parallel clients, 0 failed builds, each executing remotely" "exit, remote: ${rcs[*]}" \
    all_ok "${rcs[@]}"
  check "$n: both workers ran actions" "" both_ran "$SCEN/w1" "$SCEN/w2"
  check "$n: the server's peak RSS stays under $LOAD_RSS_LIMIT_MIB MiB" "peak $((hwm_kb / 1024)) MiB" \
    rss_bounded "$hwm_kb"
  echo "load: server peak RSS $((hwm_kb / 1024)) MiB with 4 parallel remote-execution clients" >&2
  check "$n: no panic in the server log" "" server_log_clean "$SCEN/server.log"
}

main() {
  e2e_init
  local -a which=("$@")
  [ "${#which[@]}" -gt 0 ] || which=(kill9 fulldisk load)
  local w
  for w in "${which[@]}"; do
    case "$w" in
      1|kill9) scenario_kill9 ;;
      2|fulldisk) scenario_fulldisk ;;
      3|load) scenario_load ;;
      *) echo "unknown scenario $w" >&2; exit 2 ;;
    esac
  done
  echo "$E2E_PASSED passed, $E2E_FAILED failed"
  [ "$E2E_FAILED" = 0 ]
}

main "$@"
