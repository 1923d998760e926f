#!/usr/bin/env bash
# e2e/cluster_exec_test.sh
#
# Remote execution across lre-server replicas whose scheduler state is shared in Redis
# (`execution.redis`), with real engines and real Bazel:
#   - Garage, 3 nodes, replication factor 3, as every replica's shared CAS tier (behind
#     each replica's own filesystem tier, through HAProxy);
#   - Redis (append-only) holding the action cache, the execution queue, operations,
#     leases, in-flight deduplication and worker registrations;
#   - 3 replicas behind HAProxy (gRPC over h2c); Bazel talks only to HAProxy;
#   - two lre-worker processes, w1 attached to replica 1 and w2 to replica 2 (replica 3
#     has none: whatever HAProxy sends it runs on the others' workers).
#
# Bazel builds with the toolchain `lre generate` writes (`--config=lre`: zig and a Java
# runtime from /nix/store, see e2e/toolchains), its endpoint HAProxy; the workers offer that
# toolchain's platform (its container-image), as `lre up --toolchain` does.
#
# Steps, in order (each a fresh checkout and output root):
#   A  `bazel build //...` with --config=lre through HAProxy: every spawn runs remotely,
#      both workers ran actions, the binary prints its line
#   B  a second checkout: 100% remote cache hits
#   C  replica 2 is SIGKILLed while its worker runs one of four slow actions: its lease
#      runs out, another replica's worker runs it, the build succeeds, all remotely
#   D  every replica and worker restarts (Redis and Garage stay): 100% hits
#   E  Execute with no worker anywhere, then every replica restarts: the queued action
#      is still there and runs when a worker attaches (WaitExecution on another replica)
#   F  the whole cluster on replica 3's status page (it has no worker of its own), in
#      headless Chromium: every replica's workers, each with its replica, and the number
#      of replicas sharing the queue; `lre status` says the same
#
# Prints PASS/FAIL per check and, last, "N passed, M failed".
set -uo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CLUSTER="$E2E_DIR/garage/cluster.sh"
REDIS="$E2E_DIR/redis/redis.sh"
HAPROXY="${HAPROXY:-$(command -v haproxy || echo /usr/sbin/haproxy)}"
LRE_WORKER="${LRE_WORKER:-$REPO_ROOT/target/debug/lre-worker}"
LRE="${LRE:-$REPO_ROOT/target/debug/lre}"
BAZEL_VERB=build
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin" # where `cargo install garage` put it
REPLICAS=3

summary() { echo "$E2E_PASSED passed, $E2E_FAILED failed"; }
both_ran() { [ "$1" -gt 0 ] && [ "$2" -gt 0 ]; }
c_ok() { all_remote "$1" && [ "$2" = 4 ]; }
d_ok() { [ "$1" = "$REPLICAS" ] && registered 2; }

# replica_config I: replica I's config.
replica_config() {
  local i="$1"
  cat >"$SCEN/r$i.toml" <<EOF
grpc_listen = "127.0.0.1:${R_GRPC[$i]}"
http_listen = "127.0.0.1:${R_HTTP[$i]}"
shutdown_grace_seconds = 2

[store]
kind = "fast-slow"

[store.fast]
kind = "filesystem"
path = "$SCEN/r$i-fast"
max_size = "2GiB"

[store.slow]
kind = "s3"
endpoint = "http://127.0.0.1:$LB_S3"
bucket = "$GARAGE_BUCKET"
region = "$GARAGE_REGION"
allow_http = true
access_key_id = "$GARAGE_KEY_ID"
secret_access_key_file = "$GARAGE_SECRET_FILE"
request_timeout_seconds = 30

[action_cache_store]
kind = "redis"
url = "$REDIS_URL"
request_timeout_seconds = 5

[execution]
enabled = true
keepalive_seconds = 2
lease_seconds = 6
# Workers may all be away for a moment (a restart): actions wait for them, not fail.
known_platforms = [{}]

[execution.redis]
url = "$REDIS_URL"
request_timeout_seconds = 5

[[auth.tokens]]
name = "e2e-worker"
sha256 = "$(sha256_hex "$(cat "$SCEN/worker.token")")"
scope = "worker"
EOF
}

start_replica() {
  local i="$1"
  replica_config "$i"
  SERVER_LOG="$SCEN/r$i.log"
  start_server "$SCEN/r$i.toml" || return 1
  R_PID[$i]="$SERVER_PID"
}

# start_worker NAME REPLICA: offering the generated toolchain's platform (WORKER_PROPS).
start_worker() {
  start_bg "$1" "$LRE_WORKER" --server "http://127.0.0.1:${R_GRPC[$2]}" --id "$1" --capacity 2 \
    --token-file "$SCEN/worker.token" --work-dir "$SCEN/$1" "${WORKER_PROPS[@]}"
  W_PID[$2]="$BG_PID"
}

# lre_checkout NAME: a fresh checkout of the LRE fixture (CL_WS, CL_OUR) with its
# .bazelrc.lre and toolchain repository generated for HAProxy's address.
lre_checkout() {
  lre_client "$SCEN" "$1"
  (cd "$CL_WS" && "$LRE" generate --cc "$TC_DIR/cc.nix" --java "$TC_DIR/java.nix" --prefix lre \
    --bazel-version 4.2.3 --endpoint "grpc://127.0.0.1:$LB_GRPC") >"$SCEN/gen-$1.log" 2>&1
}

# toolchain_props MANIFEST: --property flags for the platform lre.json describes.
toolchain_props() {
  python3 - "$1" <<'PYEOF'
import json, sys
props = {"OSFamily": "Linux", **json.load(open(sys.argv[1]))["exec_properties"]}
for k, v in sorted(props.items()):
    print(f"--property={k}={v}")
PYEOF
}

# The scheduler's shared keys, for the checks.
rcli() { redis-cli -p "$REDIS_PORT" "$@" 2>/dev/null; }

haproxy_config() {
  {
    cat <<EOF
global
  maxconn 2000
defaults
  mode http
  timeout connect 2s
  timeout client 600s
  timeout server 600s
  retries 3
  option redispatch
  retry-on conn-failure empty-response response-timeout
frontend grpc_in
  bind 127.0.0.1:$LB_GRPC proto h2
  default_backend replicas_grpc
frontend s3_in
  bind 127.0.0.1:$LB_S3
  default_backend garage_s3
backend replicas_grpc
  balance roundrobin
EOF
    for i in $(seq 1 $REPLICAS); do
      echo "  server r$i 127.0.0.1:${R_GRPC[$i]} proto h2 check inter 300ms fall 1 rise 2"
    done
    echo "backend garage_s3"
    echo "  balance roundrobin"
    local n=1 e
    for e in $GARAGE_ENDPOINTS; do
      echo "  server g$n ${e#http://} check inter 300ms fall 1 rise 2"
      n=$((n + 1))
    done
  } >"$SCEN/haproxy.cfg"
}

# ran_on NAME: how many actions worker NAME ran (its log says each).
ran_on() { grep -c 'action ran' "$SCEN/$1.log" 2>/dev/null || echo 0; }

slow_workspace() {
  mkdir -p "$CL_WS/slow"
  cat >"$CL_WS/slow/BUILD" <<'EOT'
[genrule(
    name = "slow_%d" % i,
    outs = ["slow_%d.txt" % i],
    cmd = "sleep 5; echo slow %d > $@" % i,
) for i in range(4)]
EOT
}

# registered N: until every replica has read N worker registrations (30 s at most).
registered() {
  local deadline=$((SECONDS + 30)) n
  while [ "$SECONDS" -lt "$deadline" ]; do
    n=0
    for k in $(rcli --scan --pattern 'lre:sched:workers:*'); do n=$((n + $(rcli HLEN "$k"))); done
    [ "$n" -ge "$1" ] && { sleep 3; return 0; } # replicas re-read every 2 s
    sleep 0.5
  done
  return 1
}

main() {
  e2e_init
  log "run directory $RUN_DIR; server $LRE_SERVER; worker $LRE_WORKER"
  new_scenario cluster-exec
  check "preflight: garage, haproxy, redis, bazel, nix, lre and lre-worker" "" \
    bash -c '[ -x "$1" ] && [ -x "$2" ] && [ -x "$3" ] && command -v "$0" && command -v "${GARAGE:-garage}" && command -v redis-server && command -v redis-cli && command -v nix-build' \
    "$HAPROXY" "$BAZEL" "$LRE_WORKER" "$LRE" >/dev/null || { summary; exit 1; }
  check "toolchain: zig, busybox and a Java runtime imported into /nix/store" "" \
    bash "$E2E_DIR/toolchains/prepare.sh" "$TC_DIR" || { summary; exit 1; }

  local garage_dir="$SCEN/garage"
  E2E_CLEANUP_HOOKS+=("bash '$CLUSTER' down '$garage_dir'")
  check "garage: a 3-node cluster, replication factor 3" "" bash "$CLUSTER" up "$garage_dir" 3 ||
    { summary; exit 1; }
  # shellcheck disable=SC1091
  . "$garage_dir/env"
  local redis_dir="$SCEN/redis"
  E2E_CLEANUP_HOOKS+=("bash '$REDIS' down '$redis_dir'")
  check "redis: started, append-only" "" bash "$REDIS" up "$redis_dir" --appendonly yes --appendfsync always ||
    { summary; exit 1; }
  # shellcheck disable=SC1091
  . "$redis_dir/env"
  random_hex 32 >"$SCEN/worker.token"
  chmod 600 "$SCEN/worker.token"

  local ports; ports="$(free_ports $((2 * REPLICAS + 2)))"
  mapfile -t P <<<"$ports"
  R_GRPC=() R_HTTP=() R_PID=() W_PID=()
  local i
  for i in $(seq 1 $REPLICAS); do
    R_GRPC[$i]="${P[$((2 * i - 2))]}"
    R_HTTP[$i]="${P[$((2 * i - 1))]}"
  done
  LB_GRPC="${P[$((2 * REPLICAS))]}" LB_S3="${P[$((2 * REPLICAS + 1))]}"
  lre_checkout A
  local manifest="$CL_WS/.lre/local-remote-execution/lre.json"
  check "lre generate: .bazelrc.lre and the toolchain for HAProxy's address" "$(tail -n1 "$SCEN/gen-A.log")" \
    grep -q "grpc://127.0.0.1:$LB_GRPC" "$CL_WS/.bazelrc.lre" || { summary; exit 1; }
  mapfile -t WORKER_PROPS < <(toolchain_props "$manifest")
  check "the workers offer the toolchain's container-image" "${WORKER_PROPS[*]}" \
    grep -q -- "--property=container-image=lre-closure:sha256:" <<<"${WORKER_PROPS[*]}"
  local a_ws="$CL_WS" a_our="$CL_OUR"
  haproxy_config
  "$HAPROXY" -db -f "$SCEN/haproxy.cfg" >"$SCEN/haproxy.log" 2>&1 &
  E2E_SERVER_PIDS+=("$!")
  local t=0
  until tcp_open "$LB_S3" && tcp_open "$LB_GRPC"; do sleep 0.2; t=$((t + 1)); [ $t -lt 50 ] || break; done

  local up=0
  for i in $(seq 1 $REPLICAS); do start_replica "$i" && up=$((up + 1)); done
  check "replicas: $REPLICAS replicas start, scheduling through Redis" "$up up" [ "$up" = $REPLICAS ] ||
    { summary; exit 1; }
  start_worker w1 1
  start_worker w2 2
  check "workers: w1 on replica 1 and w2 on replica 2 are registered in Redis" "" registered 2 ||
    { summary; exit 1; }
  sleep 1

  # The endpoint comes from .bazelrc.lre; Bazel retries what a killed replica dropped.
  local -a remote=(--config=lre --remote_timeout=60 --remote_retries=5)

  # ---- A
  bazel_run "$a_ws" "$a_our" "${remote[@]}"
  A_CACHEABLE="$CACHEABLE"
  check "A: bazel build //... --config=lre through HAProxy runs every spawn remotely" "exit $BZ_RC; '$SUM_LINE'" \
    all_remote "$(remote_count)"
  BIN_OUT="$(run_binary "$a_ws")"
  check "A: bazel-bin/app/hello, built with the Nix toolchain on the workers, prints the expected line" "got '$BIN_OUT'" output_ok
  check "A: the Java genrule ran java -version from /nix/store on a worker" "" \
    grep -q 'openjdk version' "$a_ws/bazel-bin/java/java_version.txt"
  check "A: the compile and link commands ran the pinned compiler from /nix/store" "" \
    grep -qE '"/nix/store/[a-z0-9]{32}-lre-cc-zig/bin/[^"]*"' "$BZ_EXECLOG"
  local r1 r2; r1="$(ran_on w1)" r2="$(ran_on w2)"
  check "A: both workers ran actions" "w1 ran $r1, w2 ran $r2" both_ran "$r1" "$r2"

  # ---- B
  lre_checkout B
  check "B: another checkout gets the same .bazelrc.lre" "" cmp -s "$a_ws/.bazelrc.lre" "$CL_WS/.bazelrc.lre"
  build_b "B through haproxy" "$CL_WS" "$CL_OUR" "${remote[@]}"

  # ---- C: kill -9 replica 2 while its worker runs a slow action
  lre_checkout C
  slow_workspace
  local -a saved=("${BAZEL_TARGETS[@]}")
  BAZEL_TARGETS=(//slow:slow_0 //slow:slow_1 //slow:slow_2 //slow:slow_3)
  (
    deadline=$((SECONDS + 120))
    while [ "$SECONDS" -lt "$deadline" ]; do
      # Any process working in one of w2's exec roots (busybox's sh may sleep as a builtin).
      for p in /proc/[0-9]*; do
        case "$(readlink "$p/cwd" 2>/dev/null)" in
          "$SCEN/w2"/*) kill -KILL "${R_PID[2]}"; echo "killed replica 2 (pid ${R_PID[2]}) while w2 ran ${p#/proc/} ($(cat "$p/comm" 2>/dev/null))" >"$SCEN/kill.log"; exit 0 ;;
        esac
      done
      sleep 0.1
    done
  ) &
  local killer=$!
  # --jobs=8: all four at once. Bazel's default (the host's cores, 2 in CI) would send two
  # at a time, and w1 alone could run them all, leaving nothing on w2 to kill (seen in CI).
  bazel_run "$CL_WS" "$CL_OUR" "${remote[@]}" --jobs=8
  wait "$killer" 2>/dev/null
  forget_pid "${R_PID[2]}"
  BAZEL_TARGETS=("${saved[@]}")
  check "C: replica 2 got SIGKILL while its worker ran an action" "$(cat "$SCEN/kill.log" 2>/dev/null)" [ -s "$SCEN/kill.log" ]
  local outs=0 f
  for f in "$CL_WS"/bazel-bin/slow/slow_*.txt; do [ -s "$f" ] && outs=$((outs + 1)); done
  check "C: the build still succeeds, all remotely, all four outputs" "exit $BZ_RC; '$SUM_LINE'; $outs outputs" \
    c_ok "$(remote_count)" "$outs"
  check "C: a surviving replica requeued the dead replica's action when its lease ran out" "" \
    grep -qhE "requeued a lost action.*why=Lease" "$SCEN/r1.log" "$SCEN/r3.log"

  # ---- D: full restart of replicas and workers; Redis and Garage stay
  for i in 1 2; do [ -n "${W_PID[$i]:-}" ] && { kill -TERM "${W_PID[$i]}" 2>/dev/null; wait "${W_PID[$i]}" 2>/dev/null; forget_pid "${W_PID[$i]}"; }; done
  for i in 1 3; do stop_server "${R_PID[$i]}" >/dev/null 2>&1 || true; done
  up=0
  for i in $(seq 1 $REPLICAS); do start_replica "$i" && up=$((up + 1)); done
  start_worker w1 1
  start_worker w2 2
  check "D: every replica and worker restarted" "$up replicas up" d_ok "$up"
  lre_checkout D
  build_b "D after a full restart" "$CL_WS" "$CL_OUR" "${remote[@]}"

  # ---- E: an action queued with no worker anywhere survives a restart of every replica
  for i in 1 2; do kill -TERM "${W_PID[$i]}" 2>/dev/null; wait "${W_PID[$i]}" 2>/dev/null; forget_pid "${W_PID[$i]}"; done
  sleep 3 # the replicas rewrite their (now empty) registrations every 2 s
  new_client "$SCEN" E
  slow_workspace
  sed -i 's/sleep 5; echo slow/echo queued/' "$CL_WS/slow/BUILD"
  BAZEL_TARGETS=(//slow:slow_0)
  ( bazel_run "$CL_WS" "$CL_OUR" "--remote_executor=grpc://127.0.0.1:$LB_GRPC" --remote_timeout=600 --remote_retries=0 --remote_local_fallback=false >/dev/null 2>&1 ) &
  local bz=$! live=0
  t=0
  until [ "${live:-0}" -ge 1 ] || [ $t -ge 300 ]; do sleep 0.2; t=$((t + 1)); live="$(rcli SCARD lre:sched:live)"; done
  check "E: with no worker anywhere, the action waits in Redis" "$live live operation(s)" [ "${live:-0}" -ge 1 ]
  kill -TERM "$bz" 2>/dev/null; wait "$bz" 2>/dev/null
  local op; op="$(rcli SMEMBERS lre:sched:live | head -1)"
  for i in $(seq 1 $REPLICAS); do stop_server "${R_PID[$i]}" >/dev/null 2>&1 || true; done
  up=0
  for i in $(seq 1 $REPLICAS); do start_replica "$i" && up=$((up + 1)); done
  check "E: after every replica restarted, the operation is still queued" "$op: $(rcli HGET "lre:sched:op:$op" stage)" \
    [ "$(rcli HGET "lre:sched:op:$op" stage)" = queued ]
  start_worker w1 1
  t=0
  until [ "$(rcli HGET "lre:sched:op:$op" stage)" = completed ] || [ $t -ge 150 ]; do sleep 0.2; t=$((t + 1)); done
  check "E: a worker attached afterwards ran it" "stage $(rcli HGET "lre:sched:op:$op" stage)" \
    [ "$(rcli HGET "lre:sched:op:$op" stage)" = completed ]
  BAZEL_TARGETS=("${saved[@]}")

  # ---- F: the cluster on one page, from the replica without a worker
  start_worker w2 2
  check "F: w1 and w2 registered again" "" registered 2
  local page="http://127.0.0.1:${R_HTTP[3]}/"
  check "F: replica 3's status page, in Chromium, lists w1 and w2 with their replicas and says 3 replicas share the queue" \
    "" \
    browse_has "$page" "$SCEN/cluster-status.html" \
    'id="replicas">3 replicas share the queue' \
    'class="worker-id">[^<]*/w1</td><td class="replica">[^<]+-[0-9]+-[0-9a-f]{8}</td>' \
    'class="worker-id">[^<]*/w2</td><td class="replica">[^<]+-[0-9]+-[0-9a-f]{8}</td>'
  browse "$page" "$SCEN/cluster-status.tmp" "$SCEN/cluster-status.png" >/dev/null 2>&1 || true
  local w1r w2r
  # A worker's id is TOKEN/ID.
  w1r="$(grep -oE 'class="worker-id">[^<]*/w1</td><td class="replica">[^<]+' "$SCEN/cluster-status.html" | sed 's/.*">//')"
  w2r="$(grep -oE 'class="worker-id">[^<]*/w2</td><td class="replica">[^<]+' "$SCEN/cluster-status.html" | sed 's/.*">//')"
  check "F: w1 and w2 are on different replicas" "w1 on '$w1r', w2 on '$w2r'" \
    bash -c '[ -n "$0" ] && [ -n "$1" ] && [ "$0" != "$1" ]' "$w1r" "$w2r"
  "$LRE" status --server "http://127.0.0.1:${R_HTTP[3]}" >"$SCEN/lre-status.txt" 2>&1
  check "F: lre status on replica 3 lists both workers with their replicas" "$(grep -E 'workers|/w[12] ' "$SCEN/lre-status.txt" | tr '\n' ' ')" \
    dom_has "$SCEN/lre-status.txt" 'workers \(2, on 3 replicas sharing the queue\)' "^  [^ ]*/w1  on $w1r  slots 2" "^  [^ ]*/w2  on $w2r  slots 2"

  local clean=1
  for i in $(seq 1 $REPLICAS); do stop_server "${R_PID[$i]}" >/dev/null 2>&1 || true; done
  grep -l "panicked at" "$SCEN"/r*.log "$SCEN"/w*.log >/dev/null 2>&1 && clean=0
  check "no replica or worker log has a panic" "" [ "$clean" = 1 ]
  summary
  [ "$E2E_FAILED" = 0 ]
}

main "$@"
