#!/usr/bin/env bash
# e2e/exec_test.sh [SCENARIO...]
#
# End-to-end remote execution: a real Bazel 4.2.3 with --remote_executor against lre's
# scheduler and lre-worker (bubblewrap sandbox). Scenarios (default: all):
#   1 up        `lre up` (cache + scheduler + 2 local workers in one process): every
#               spawn of `bazel test //...` runs remotely, the cc_tests pass remotely,
#               the binary prints the expected line, and its bytes equal a local build's
#   2 kill      lre-server + two lre-worker processes; one worker is SIGKILLed while it
#               runs an action; the build still succeeds (the action is requeued)
#   3 routing   workers with pool=a and pool=b; genrules with exec_properties pool=b run
#               only on the pool=b worker; pool=nope fails naming the property
#   4 hosttools `lre up` with no flags beyond ports on a second, ordinary workspace whose
#               genrules run awk, cc and java through Debian's /etc/alternatives, and a
#               cc_binary on the host toolchain; the sandbox shows no host secrets
#   5 status    `lre up` and headless Chromium on its status page during and after remote
#               builds: workers listed, a non-zero hit rate after a second checkout's
#               build, a failed action's stderr one click away; `lre status --json` agrees
# Prints PASS/FAIL lines and, last, "N passed, M failed".
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LRE="${LRE:-$REPO_ROOT/target/debug/lre}"
LRE_WORKER="${LRE_WORKER:-$REPO_ROOT/target/debug/lre-worker}"

start_worker() { # NAME PROPERTY...
  local name="$1"; shift
  local -a props=()
  local p; for p in "$@"; do props+=(--property "$p"); done
  start_bg "$name" "$LRE_WORKER" --server "http://127.0.0.1:$GRPC_PORT" --id "$name" --capacity 1 \
    --token-file "$SCEN/worker.token" --work-dir "$SCEN/$name" "${props[@]}"
}

# The fixture plus a package of genrules for these scenarios.
exec_workspace() {
  mkdir -p "$CL_WS/exec"
  cat >"$CL_WS/exec/BUILD" <<'EOT'
[genrule(
    name = "slow_%d" % i,
    outs = ["slow_%d.txt" % i],
    cmd = "sleep 6; echo slow %d > $@" % i,
) for i in range(4)]

# pwd names the worker's exec root, which lives in that worker's --work-dir.
[genrule(
    name = "where_%d" % i,
    outs = ["where_%d.txt" % i],
    cmd = "echo %d $$(pwd) > $@" % i,
    exec_properties = {"pool": "b"},
) for i in range(3)]

genrule(
    name = "nowhere",
    outs = ["nowhere.txt"],
    cmd = "echo never > $@",
    exec_properties = {"pool": "nope"},
)
EOT
}

scenario_up() {
  local n="1 up"
  new_scenario up
  alloc
  start_bg lre "$LRE" up --grpc-listen "127.0.0.1:$GRPC_PORT" --http-listen "127.0.0.1:$HTTP_PORT" \
    --store-dir "$SCEN/store" --work-dir "$SCEN/workers" --capacity 2
  local lre_pid="$BG_PID"
  check "$n: lre up serves /healthz" "log up/lre.log" wait_up "$HTTP_PORT" "$SCEN/lre.log" || return 0
  check "$n: lre up prints the --remote_executor flag" "" grep -q -- "--remote_executor=grpc://127.0.0.1:$GRPC_PORT" "$SCEN/lre.log"

  new_client "$SCEN" R
  bazel_run "$CL_WS" "$CL_OUR" "--remote_executor=grpc://127.0.0.1:$GRPC_PORT"
  local remote; remote="$(remote_count)"
  check "$n: every spawn ran remotely, tests passed" \
    "exit $BZ_RC; '$SUM_LINE'; $remote remote of $((SUM_TOTAL - SUM_INTERNAL)) spawns" \
    all_remote "$remote"
  BIN_OUT="$(run_binary "$CL_WS")"
  check "$n: the remotely built binary prints the expected line" "got '$BIN_OUT'" output_is_expected
  local remote_sums="$SCEN/remote.sha256"
  output_sums "$CL_WS" >"$remote_sums"

  new_client "$SCEN" L
  bazel_run "$CL_WS" "$CL_OUR"
  local local_sums="$SCEN/local.sha256"
  output_sums "$CL_WS" >"$local_sums"
  check "$n: every build output is byte-identical to a local build's" \
    "$(wc -l <"$remote_sums") files (objects, archives, binaries, genrule outputs); diff: $(diff "$remote_sums" "$local_sums" | grep -c '^[<>]')" \
    same_files "$remote_sums" "$local_sums"
  kill -TERM "$lre_pid" 2>/dev/null
  local deadline=$((SECONDS + 20))
  while pid_alive "$lre_pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
  check "$n: lre up exits on SIGTERM" "" not_alive "$lre_pid"
  forget_pid "$lre_pid"
}

same_nonempty() { [ -n "$1" ] && [ "$1" = "$2" ]; }

scenario_kill() {
  local n="2 kill"
  new_scenario kill
  alloc
  server_config
  start_bg server "$LRE_SERVER" --config "$SCEN/server.toml"
  check "$n: server up" "" wait_healthy "$HTTP_PORT" || return 0
  start_worker wa; local wa="$BG_PID"
  start_worker wb
  check "$n: both workers registered" "" wait_log "$SCEN/server.log" "worker connected" 2 || return 0

  new_client "$SCEN" K
  exec_workspace
  local -a saved=("${BAZEL_TARGETS[@]}")
  BAZEL_TARGETS=(//exec:slow_0 //exec:slow_1 //exec:slow_2 //exec:slow_3)
  BAZEL_VERB=build
  # Kill worker wa with SIGKILL once it is running a sleep inside its sandbox.
  (
    deadline=$((SECONDS + 120))
    while [ "$SECONDS" -lt "$deadline" ]; do
      for p in $(pgrep -x sleep); do
        case "$(readlink "/proc/$p/cwd" 2>/dev/null)" in
          "$SCEN/wa"/*) kill -KILL "$wa"; echo "killed worker wa (pid $wa) while it ran sleep pid $p" >>"$SCEN/kill.log"; exit 0 ;;
        esac
      done
      sleep 0.1
    done
  ) &
  local killer=$!
  bazel_run "$CL_WS" "$CL_OUR" "--remote_executor=grpc://127.0.0.1:$GRPC_PORT"
  wait "$killer" 2>/dev/null
  BAZEL_TARGETS=("${saved[@]}")
  BAZEL_VERB=test
  check "$n: worker wa was SIGKILLed mid-action" "$(cat "$SCEN/kill.log" 2>/dev/null)" [ -s "$SCEN/kill.log" ]
  check "$n: the build still succeeds, all remotely" "exit $BZ_RC; '$SUM_LINE'" all_remote "$(remote_count)"
  check "$n: the server requeued the lost worker's action" "" grep -qE "requeued a lost action.*why=Worker" "$SCEN/server.log"
  forget_pid "$wa"
}

scenario_routing() {
  local n="3 routing"
  new_scenario routing
  alloc
  server_config
  start_bg server "$LRE_SERVER" --config "$SCEN/server.toml"
  check "$n: server up" "" wait_healthy "$HTTP_PORT" || return 0
  start_worker wa pool=a
  start_worker wb pool=b
  check "$n: both workers registered" "" wait_log "$SCEN/server.log" "worker connected" 2 || return 0

  new_client "$SCEN" P
  exec_workspace
  local -a saved=("${BAZEL_TARGETS[@]}")
  BAZEL_TARGETS=(//exec:where_0 //exec:where_1 //exec:where_2)
  BAZEL_VERB=build
  bazel_run "$CL_WS" "$CL_OUR" "--remote_executor=grpc://127.0.0.1:$GRPC_PORT"
  local on_b=0 f
  for f in "$CL_WS"/bazel-bin/exec/where_*.txt; do grep -q "$SCEN/wb/" "$f" && on_b=$((on_b + 1)); done
  check "$n: all 3 pool=b actions ran on the pool=b worker" "exit $BZ_RC; $on_b of 3 on wb" same_nonempty "$BZ_RC:$on_b" "0:3"

  BAZEL_TARGETS=(//exec:nowhere)
  bazel_run "$CL_WS" "$CL_OUR" "--remote_executor=grpc://127.0.0.1:$GRPC_PORT"
  BAZEL_TARGETS=("${saved[@]}")
  BAZEL_VERB=test
  check "$n: an action no worker can run fails, naming pool=nope" "exit $BZ_RC" \
    failed_naming "pool=nope"
}

scenario_hosttools() {
  local n="4 hosttools"
  new_scenario hosttools
  alloc
  start_bg lre "$LRE" up --grpc-listen "127.0.0.1:$GRPC_PORT" --http-listen "127.0.0.1:$HTTP_PORT" \
    --store-dir "$SCEN/store" --work-dir "$SCEN/worker"
  local lre_pid="$BG_PID"
  check "$n: lre up serves /healthz" "" wait_up "$HTTP_PORT" "$SCEN/lre.log" || return 0
  check "$n: lre up runs one worker with a slot per CPU" "$(grep 'lre up:' "$SCEN/lre.log")" \
    grep -q "a local worker with $(nproc) slot(s)" "$SCEN/lre.log"
  check "$n: the sandbox shows /etc/alternatives but not /etc" "$(grep 'sandbox shows' "$SCEN/lre.log")" \
    shows_alternatives_not_etc "$SCEN/lre.log"
  local saved_ws="$WS_SRC"
  WS_SRC="$E2E_DIR/workspaces/hosttools"
  new_client "$SCEN" H
  WS_SRC="$saved_ws"
  local -a saved=("${BAZEL_TARGETS[@]}")
  BAZEL_TARGETS=(//:awk //:sed_python //:cc_version //:java_version //:secrets //:hello)
  BAZEL_VERB=build
  bazel_run "$CL_WS" "$CL_OUR" "--remote_executor=grpc://127.0.0.1:$GRPC_PORT"
  BAZEL_TARGETS=("${saved[@]}")
  BAZEL_VERB=test
  local out="$CL_WS/bazel-bin"
  check "$n: every spawn ran remotely" "exit $BZ_RC; '$SUM_LINE'" all_remote "$(remote_count)" || show_misses
  check "$n: awk (via /etc/alternatives) ran" "$(cat "$out/awk.txt" 2>/dev/null)" [ "$(cat "$out/awk.txt" 2>/dev/null)" = two ]
  check "$n: sed piped into python3 ran" "$(cat "$out/sed_python.txt" 2>/dev/null)" \
    [ "$(cat "$out/sed_python.txt" 2>/dev/null)" = "HELLO LRE" ]
  check "$n: cc (via /etc/alternatives) ran" "$(cat "$out/cc.txt" 2>/dev/null)" grep -qE '^(cc|gcc) ' "$out/cc.txt"
  check "$n: java (via /etc/alternatives and /etc/java-*) ran" "$(head -n1 "$out/java.txt" 2>/dev/null)" \
    grep -qi 'openjdk' "$out/java.txt"
  check "$n: no host secret or home is visible to actions" "$(tr '\n' ' ' <"$out/secrets.txt" 2>/dev/null)" \
    no_visible "$out/secrets.txt"
  check "$n: the host-toolchain binary runs" "" grep -qx 'hello from the host toolchain' <(cd "$CL_WS" && ./bazel-bin/hello)
  kill -TERM "$lre_pid" 2>/dev/null
  local deadline=$((SECONDS + 20))
  while pid_alive "$lre_pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
  forget_pid "$lre_pid"
}
shows_alternatives_not_etc() {
  local line; line="$(grep 'sandbox shows' "$1")"
  line="${line#*: }"        # the list of paths
  line="${line%% and *}"    # without the count of single files
  [[ " $line " == *" /etc/alternatives "* ]] && [[ " $line " != *" /etc "* ]] && [[ " $line " == *" /usr "* ]]
}
no_visible() { [ -s "$1" ] && ! grep -q '^visible' "$1"; }

failed_naming() { [ "$BZ_RC" != 0 ] && grep -q "$1" "$BZ_LOG"; }

# dom_has FILE PATTERN...: the saved DOM matches every extended regex.
built_with_hits() { [ "$BZ_RC" = 0 ] && [ "$SUM_HITS" -gt 0 ]; }
hit_rate_of() { grep -oE 'id="hit-rate">[0-9.]+%' "$1" | grep -oE '[0-9.]+' || echo 0; }
nonzero() { python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) > 0 else 1)' "$1"; }
stderr_href() { grep -oE '<tr class="action failed">.*' "$1" | grep -oE 'href="/api/actions/[0-9]+/stderr"' | head -n1 | cut -d'"' -f2; }

scenario_status() {
  local n="5 status"
  new_scenario status
  alloc
  start_bg lre "$LRE" up --grpc-listen "127.0.0.1:$GRPC_PORT" --http-listen "127.0.0.1:$HTTP_PORT" \
    --store-dir "$SCEN/store" --work-dir "$SCEN/workers" --capacity 2
  local lre_pid="$BG_PID" page="http://127.0.0.1:$HTTP_PORT/"
  check "$n: lre up serves /healthz" "" wait_up "$HTTP_PORT" "$SCEN/lre.log" || return 0
  check "$n: before any build the page loads in Chromium and lists the worker" "" \
    browse_has "$page" "$SCEN/before.html" '<tr class="worker"><td class="worker-id">lre-up-worker/local</td>'

  # While the first build runs, load the page until it shows an action a worker executed.
  new_client "$SCEN" S1
  rm -f "$SCEN/build-done"
  (
    deadline=$((SECONDS + 300))
    while [ "$SECONDS" -lt "$deadline" ] && [ ! -e "$SCEN/build-done" ]; do
      if browse "$page" "$SCEN/during.tmp" && grep -q '<tr class="action executed">' "$SCEN/during.tmp"; then
        # Only a page captured before Bazel returned counts as "during".
        [ -e "$SCEN/build-done" ] || mv "$SCEN/during.tmp" "$SCEN/during.html"
        exit 0
      fi
      sleep 1
    done
  ) &
  local watcher=$!
  bazel_run "$CL_WS" "$CL_OUR" "--remote_executor=grpc://127.0.0.1:$GRPC_PORT"
  touch "$SCEN/build-done"
  wait "$watcher" 2>/dev/null
  check "$n: the first checkout builds and tests everything remotely" "exit $BZ_RC; '$SUM_LINE'" \
    all_remote "$(remote_count)"
  check "$n: during that build the page showed the worker and actions it had executed" \
    "$(grep -c '<tr class="action executed">' "$SCEN/during.html" 2>/dev/null) executed rows" \
    dom_has "$SCEN/during.html" 'class="worker-id">lre-up-worker/local<' '<tr class="action executed">'

  new_client "$SCEN" S2
  bazel_run "$CL_WS" "$CL_OUR" "--remote_executor=grpc://127.0.0.1:$GRPC_PORT"
  check "$n: a second checkout with a fresh output root hits the cache" "exit $BZ_RC; '$SUM_LINE'" \
    built_with_hits

  mkdir -p "$CL_WS/broken"
  cat >"$CL_WS/broken/BUILD" <<'EOT'
genrule(
    name = "broken",
    outs = ["broken.txt"],
    cmd = "echo lre-e2e-broken-action-says-why >&2; exit 3",
)
EOT
  local -a saved=("${BAZEL_TARGETS[@]}")
  BAZEL_TARGETS=(//broken:broken)
  BAZEL_VERB=build
  bazel_run "$CL_WS" "$CL_OUR" "--remote_executor=grpc://127.0.0.1:$GRPC_PORT"
  BAZEL_TARGETS=("${saved[@]}")
  BAZEL_VERB=test
  check "$n: a failing action fails the build" "exit $BZ_RC" [ "$BZ_RC" != 0 ]

  browse "$page" "$SCEN/after.html" "$SCEN/status.png"
  local rate; rate="$(hit_rate_of "$SCEN/after.html")"
  check "$n: after the second build the page's hit rate is non-zero" "hit rate $rate%" nonzero "$rate"
  check "$n: the page lists the worker and the invocations" \
    "$(grep -c '<tr class="invocation">' "$SCEN/after.html") invocations" \
    dom_has "$SCEN/after.html" 'class="worker-id">lre-up-worker/local<' '<tr class="invocation">.*<td>bazel( [^<]*)?</td>'
  local href; href="$(stderr_href "$SCEN/after.html")"
  browse "http://127.0.0.1:$HTTP_PORT$href" "$SCEN/stderr.html"
  check "$n: the failed action's row links to its stderr, which says why" "link '${href:-none}'" \
    dom_has "$SCEN/stderr.html" 'lre-e2e-broken-action-says-why'
  check "$n: a screenshot of the page was saved" "$SCEN/status.png ($(stat -c %s "$SCEN/status.png" 2>/dev/null) bytes)" \
    test -s "$SCEN/status.png"
  "$LRE" status --server "http://127.0.0.1:$HTTP_PORT" --json >"$SCEN/status.json" 2>"$SCEN/status.err"
  check "$n: lre status --json reports the worker, the hit rate and the failed action" "$(head -c 300 "$SCEN/status.err")" \
    python3 - "$SCEN/status.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["status"]
workers = [w["id"] for w in s["execution"]["workers"]]
failed = [r for r in s["recent"] if r["outcome"] == "failed"]
ok = "lre-up-worker/local" in workers and (s["hit_rate_percent"] or 0) > 0 and failed and failed[0]["exit_code"] == 3
sys.exit(0 if ok else 1)
PY
  kill -TERM "$lre_pid" 2>/dev/null
  local deadline=$((SECONDS + 20))
  while pid_alive "$lre_pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
  forget_pid "$lre_pid"
}

main() {
  local -a want=("$@")
  [ "${#want[@]}" = 0 ] && want=(up kill routing hosttools status)
  e2e_init
  check "preflight: lre, lre-server, lre-worker, bwrap and bazel present" "" \
    test -x "$LRE" -a -x "$LRE_SERVER" -a -x "$LRE_WORKER" -a -n "$(command -v bwrap)" -a -n "$(command -v "$BAZEL")"
  local w
  for w in "${want[@]}"; do
    case "$w" in
      1|up) scenario_up ;;
      2|kill) scenario_kill ;;
      3|routing) scenario_routing ;;
      4|hosttools) scenario_hosttools ;;
      5|status) scenario_status ;;
      *) echo "unknown scenario $w" >&2; exit 2 ;;
    esac
  done
  echo "$E2E_PASSED passed, $E2E_FAILED failed"
  [ "$E2E_FAILED" = 0 ]
}

main "$@"
