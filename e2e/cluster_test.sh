#!/usr/bin/env bash
# e2e/cluster_test.sh
#
# Several lre-server replicas sharing one S3 tier, with real engines and real Bazel:
#   - Garage, 3 nodes, replication factor 3 (e2e/garage/cluster.sh);
#   - 3 lre-server replicas, each a fast-slow store: its own filesystem tier in front of
#     Garage, reached through HAProxy so that one Garage node's loss is invisible;
#   - Redis (e2e/redis/redis.sh, over TLS, append-only file on) holding the action cache
#     all replicas share;
#   - HAProxy in front of the replicas (gRPC over h2c, and the HTTP cache) and in front
#     of Garage's S3 API.
#
# Steps, in order (each builds from a fresh checkout and output root):
#   A  uploads through HAProxy; every replica takes part
#   B  100% hits through HAProxy
#   C  a replica is SIGKILLed mid-build: Bazel's retries land on the others, 100% hits
#   D  a Garage node is SIGKILLed and every replica restarts with an empty fast tier:
#      everything is served from Garage, 100% hits
#   E  the linked binary is deleted from Garage (fast tiers empty again): its action
#      result is incomplete, so that one action, and only it, misses
#   F  all of Garage goes away: UNAVAILABLE (HTTP 502), never a miss or wrong bytes;
#      back, the same blob is served again
#   G  a replica whose S3 endpoint, or whose Redis, answers nothing refuses to start,
#      naming it
#   H  Redis is SIGKILLed: the HTTP action cache is 502 (UNAVAILABLE) on every replica,
#      a Bazel build still succeeds (Bazel runs the actions itself, warning); Redis back
#      (replaying its append-only file), the next build is 100% hits again
#
# Prints PASS/FAIL per check and, last, "N passed, M failed". Needs garage
# (cargo install garage), haproxy, redis-server and redis-cli, curl >= 7.75 (--aws-sigv4),
# Bazel 4.2.3.
set -uo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CLUSTER="$E2E_DIR/garage/cluster.sh"
REDIS="$E2E_DIR/redis/redis.sh"
HAPROXY="${HAPROXY:-$(command -v haproxy || echo /usr/sbin/haproxy)}"
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin" # where `cargo install garage` put it
REPLICAS=3

summary() { echo "$E2E_PASSED passed, $E2E_FAILED failed"; }
h_ok() { [ "$BZ_RC" = 0 ] && [ "$HITS" = 0 ] && [ "$BIN_OUT" = "$EXPECTED_OUTPUT" ]; }
one_miss_ok() { [ "$BZ_RC" = 0 ] && [ "$CACHEABLE" = "$A_CACHEABLE" ] && [ "$HITS" = $((A_CACHEABLE - 1)) ]; }
# served_again STATUS BODY HASH
served_again() { [ "$1" = 200 ] && [ "$(sha256sum <"$2" | cut -d' ' -f1)" = "$3" ]; }
# refused_naming RC WHAT LOG: exited on its own, with an error, naming WHAT.
refused_naming() { [ "$1" != 0 ] && [ "$1" != 124 ] && grep -qF "$2" "$3"; }

# replica_config I FAST_DIR: replica I's config, its slow tier Garage behind HAProxy.
replica_config() {
  local i="$1" fast="$2"
  cat >"$SCEN/r$i.toml" <<EOF
grpc_listen = "127.0.0.1:${R_GRPC[$i]}"
http_listen = "127.0.0.1:${R_HTTP[$i]}"

[store]
kind = "fast-slow"

[store.fast]
kind = "filesystem"
path = "$fast"
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
tls_ca_file = "$SCEN/pki/ca.crt"
request_timeout_seconds = 5
EOF
}

# start_replica I FAST_DIR
start_replica() {
  local i="$1"
  replica_config "$i" "$2"
  SERVER_LOG="$SCEN/r$i.log"
  start_server "$SCEN/r$i.toml" || return 1
  R_PID[$i]="$SERVER_PID"
}

restart_all_empty() {
  local i tag="$1"
  for i in $(seq 1 $REPLICAS); do stop_server "${R_PID[$i]}" >/dev/null 2>&1 || true; done
  for i in $(seq 1 $REPLICAS); do start_replica "$i" "$SCEN/r$i-fast-$tag" || return 1; done
}

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
frontend http_in
  bind 127.0.0.1:$LB_HTTP
  default_backend replicas_http
frontend s3_in
  bind 127.0.0.1:$LB_S3
  default_backend garage_s3
backend replicas_grpc
  balance roundrobin
EOF
    for i in $(seq 1 $REPLICAS); do
      echo "  server r$i 127.0.0.1:${R_GRPC[$i]} proto h2 check inter 300ms fall 1 rise 2"
    done
    echo "backend replicas_http"
    echo "  balance roundrobin"
    for i in $(seq 1 $REPLICAS); do
      echo "  server r$i 127.0.0.1:${R_HTTP[$i]} check inter 300ms fall 1 rise 2"
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

# requests I: how many gRPC/HTTP requests replica I has served.
requests() {
  curl -fsS --max-time 5 "http://127.0.0.1:${R_HTTP[$1]}/metrics" 2>/dev/null |
    awk '/^lre_request_duration_seconds_count/ { s += $2 } END { print s + 0 }'
}

# ac_http METHOD HASH [BODY_FILE]: the HTTP action cache through HAProxy; prints the status.
ac_http() {
  local -a body=()
  [ -n "${3:-}" ] && body=(--data-binary "@$3")
  curl -sS -o /dev/null -w '%{http_code}' --max-time 30 -X "$1" "${body[@]}" \
    "http://127.0.0.1:$LB_HTTP/ac/$2" 2>/dev/null || true
}

# on_every_replica METHOD HASH WANT: WANT from every replica directly, not through HAProxy.
on_every_replica() {
  local i got
  for i in $(seq 1 $REPLICAS); do
    got="$(curl -sS -o /dev/null -w '%{http_code}' --max-time 30 -X "$1" \
      "http://127.0.0.1:${R_HTTP[$i]}/ac/$2" 2>/dev/null || true)"
    [ "$got" = "$3" ] || { echo "replica $i: HTTP $got"; return 1; }
  done
}

redis_ac_keys() {
  redis-cli --tls --cacert "$SCEN/pki/ca.crt" -p "$REDIS_PORT" --scan --pattern 'lre:ac/*' 2>/dev/null | wc -l
}

# s3 METHOD KEY: a signed request to Garage (through HAProxy); prints the HTTP status.
s3() {
  local -a verb=(-X "$1")
  [ "$1" = HEAD ] && verb=(-I) # -X HEAD would wait for a body
  curl -sS -o /dev/null -w '%{http_code}' --max-time 20 "${verb[@]}" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
    --aws-sigv4 "aws:amz:$GARAGE_REGION:s3" --user "$GARAGE_KEY_ID:$(cat "$GARAGE_SECRET_FILE")" \
    "http://127.0.0.1:$LB_S3/$GARAGE_BUCKET/$2" 2>/dev/null || true
}

main() {
  e2e_init
  log "run directory $RUN_DIR; server $LRE_SERVER"
  new_scenario cluster
  check "preflight: garage, haproxy, redis, bazel, curl with --aws-sigv4" "" \
    bash -c '[ -x "$1" ] && command -v "$0" && command -v "${GARAGE:-garage}" && command -v redis-server && command -v redis-cli && curl --help all | grep -q aws-sigv4' "$BAZEL" "$HAPROXY" >/dev/null ||
    { summary; exit 1; }

  # ---- engines
  local garage_dir="$SCEN/garage"
  E2E_CLEANUP_HOOKS+=("bash '$CLUSTER' down '$garage_dir'")
  check "garage: a 3-node cluster, replication factor 3, bucket and key" "${garage_dir#"$RUN_DIR"/}" \
    bash "$CLUSTER" up "$garage_dir" 3 || { summary; exit 1; }
  # shellcheck disable=SC1091
  . "$garage_dir/env"
  local redis_dir="$SCEN/redis"
  E2E_CLEANUP_HOOKS+=("bash '$REDIS' down '$redis_dir'")
  # TLS (the replicas verify it against the test CA), and append-only, fsynced per write: a
  # Redis that is killed comes back with what it held.
  make_pki "$SCEN/pki"
  check "redis: started, over TLS, with an append-only file" "${redis_dir#"$RUN_DIR"/}" \
    bash "$REDIS" up "$redis_dir" --appendonly yes --appendfsync always --port 0 --tls-port '{port}' \
    --tls-cert-file "$SCEN/pki/server.crt" --tls-key-file "$SCEN/pki/server.key" \
    --tls-ca-cert-file "$SCEN/pki/ca.crt" --tls-auth-clients no || { summary; exit 1; }
  # shellcheck disable=SC1091
  . "$redis_dir/env"

  local ports; ports="$(free_ports $((2 * REPLICAS + 3)))"
  mapfile -t P <<<"$ports"
  R_GRPC=() R_HTTP=() R_PID=()
  local i
  for i in $(seq 1 $REPLICAS); do
    R_GRPC[$i]="${P[$((2 * i - 2))]}"
    R_HTTP[$i]="${P[$((2 * i - 1))]}"
  done
  LB_GRPC="${P[$((2 * REPLICAS))]}" LB_HTTP="${P[$((2 * REPLICAS + 1))]}" LB_S3="${P[$((2 * REPLICAS + 2))]}"
  haproxy_config
  check "haproxy: the configuration is valid" "" "$HAPROXY" -c -q -f "$SCEN/haproxy.cfg"
  "$HAPROXY" -db -f "$SCEN/haproxy.cfg" >"$SCEN/haproxy.log" 2>&1 &
  E2E_SERVER_PIDS+=("$!")
  local t=0
  until tcp_open "$LB_S3" && tcp_open "$LB_GRPC"; do sleep 0.2; t=$((t + 1)); [ $t -lt 50 ] || break; done

  local up=0
  for i in $(seq 1 $REPLICAS); do start_replica "$i" "$SCEN/r$i-fast" && up=$((up + 1)); done
  check "replicas: $REPLICAS lre-server replicas start on fast-slow stores over Garage" "$up up" [ "$up" = $REPLICAS ] ||
    { summary; exit 1; }
  sleep 1 # HAProxy's health checks see them up (rise 2, every 300 ms)

  local -a remote=("--remote_cache=grpc://127.0.0.1:$LB_GRPC" --remote_timeout=30 --remote_retries=5)
  local before=() after=()
  for i in $(seq 1 $REPLICAS); do before[$i]="$(requests "$i")"; done

  # ---- A, B
  new_client "$SCEN" A; build_a "A through haproxy" "$CL_WS" "$CL_OUR" "${remote[@]}"
  local hello_hash; hello_hash="$(sha256sum "$CL_WS/bazel-bin/app/hello" 2>/dev/null | cut -d' ' -f1)"
  local served=0 detail=""
  for i in $(seq 1 $REPLICAS); do
    after[$i]="$(requests "$i")"
    detail+="r$i: $((after[i] - before[i])) "
    [ $((after[i] - before[i])) -gt 0 ] && served=$((served + 1))
  done
  check "A: every replica served part of the build" "$detail" [ "$served" = $REPLICAS ]
  local ac_keys; ac_keys="$(redis_ac_keys)"
  check "A: the action results are in Redis" "$ac_keys keys lre:ac/*" [ "$ac_keys" -ge "$A_CACHEABLE" ]
  new_client "$SCEN" B; build_b "B through haproxy" "$CL_WS" "$CL_OUR" "${remote[@]}"

  # ---- C: kill -9 a replica while Bazel is reading from it
  new_client "$SCEN" C
  local base; base="$(requests 2)"
  ( bazel_run "$CL_WS" "$CL_OUR" "${remote[@]}"; declare -p BZ_RC HITS CACHEABLE SUM_LINE >"$SCEN/c.result" ) &
  local bz=$! killed_mid=0
  t=0
  while [ "$(requests 2)" -le "$base" ] && [ $t -lt 600 ]; do sleep 0.1; t=$((t + 1)); done
  if pid_alive "$bz"; then killed_mid=1; fi
  kill -KILL "${R_PID[2]}" 2>/dev/null; forget_pid "${R_PID[2]}"
  wait "$bz"
  check "C: replica 2 got SIGKILL while the build was running" "" [ "$killed_mid" = 1 ]
  # shellcheck disable=SC1091
  . "$SCEN/c.result"
  check "C: with replica 2 killed mid-build, still 100% hits through the others" "$(hit_detail)" \
    full_hits_ok "$A_CACHEABLE"
  start_replica 2 "$SCEN/r2-fast"

  # ---- D: a Garage node dies, every replica restarts with an empty fast tier
  bash "$CLUSTER" stop-node "$garage_dir" 3
  check "D: every replica restarts with an empty fast tier (Garage node 3 is down)" "" restart_all_empty d
  sleep 1
  new_client "$SCEN" D; build_b "D from Garage with a node down" "$CL_WS" "$CL_OUR" "${remote[@]}"
  local fast_files; fast_files="$(find "$SCEN"/r*-fast-d -type f -path '*cas*' 2>/dev/null | wc -l)"
  check "D: the fast tiers were refilled from Garage" "$fast_files files" [ "$fast_files" -gt 0 ]
  bash "$CLUSTER" start-node "$garage_dir" 3

  # ---- E: completeness across tiers
  check "E: the linked binary is deleted from Garage" "cas/$hello_hash: HTTP $(s3 DELETE "cas/$hello_hash")" \
    [ "$(s3 HEAD "cas/$hello_hash")" = 404 ]
  restart_all_empty e
  sleep 1
  new_client "$SCEN" E
  bazel_run "$CL_WS" "$CL_OUR" "${remote[@]}"
  check "E: only the action whose output is gone misses; everything else hits" "$(hit_detail)" \
    one_miss_ok
  BIN_OUT="$(run_binary "$CL_WS")"
  check "E: bazel-bin/app/hello prints the expected line" "got '$BIN_OUT'" output_ok
  check "E: the rebuilt binary was uploaded to Garage again" "" [ "$(s3 HEAD "cas/$hello_hash")" = 200 ]

  # ---- F: Garage goes away while running, and comes back
  local url="http://127.0.0.1:$LB_HTTP/cas/$hello_hash"
  restart_all_empty f
  sleep 1
  for i in 1 2 3; do bash "$CLUSTER" stop-node "$garage_dir" "$i"; done
  local down; down="$(curl -sS -o "$SCEN/f.body" -w '%{http_code}' --max-time 60 "$url" || true)"
  check "F: with all of Garage down, a blob only Garage had is 502 (UNAVAILABLE), not 404" "HTTP $down" [ "$down" = 502 ]
  bash "$CLUSTER" start-node "$garage_dir" 1 2 3
  local back="" tries=0
  while [ $tries -lt 60 ]; do
    back="$(curl -sS -o "$SCEN/f.body" -w '%{http_code}' --max-time 30 "$url" || true)"
    [ "$back" = 200 ] && break
    sleep 1; tries=$((tries + 1))
  done
  check "F: Garage back: the blob is served again, with the right content" "HTTP $back after ${tries}s" \
    served_again "$back" "$SCEN/f.body" "$hello_hash"

  # ---- G: unreachable at start
  local dead; dead="$(free_port)"
  sed "s|endpoint = \".*\"|endpoint = \"http://127.0.0.1:$dead\"|; s|grpc_listen = .*|grpc_listen = \"127.0.0.1:$(free_port)\"|; s|http_listen = .*|http_listen = \"127.0.0.1:$(free_port)\"|; s|path = .*|path = \"$SCEN/dead-fast\"|" \
    "$SCEN/r1.toml" >"$SCEN/dead.toml"
  timeout 60 "$LRE_SERVER" --config "$SCEN/dead.toml" >"$SCEN/dead.log" 2>&1
  local rc=$?
  check "G: a replica whose S3 endpoint answers nothing refuses to start, naming it" \
    "exit $rc: $(grep -m1 "^Error" "$SCEN/dead.log")" \
    refused_naming "$rc" "127.0.0.1:$dead" "$SCEN/dead.log"

  local dead_redis; dead_redis="$(free_port)"
  sed "s|rediss://127.0.0.1:[0-9]*|rediss://127.0.0.1:$dead_redis|; s|grpc_listen = .*|grpc_listen = \"127.0.0.1:$(free_port)\"|; s|http_listen = .*|http_listen = \"127.0.0.1:$(free_port)\"|; s|path = .*|path = \"$SCEN/dead-fast2\"|" \
    "$SCEN/r1.toml" >"$SCEN/dead-redis.toml"
  timeout 60 "$LRE_SERVER" --config "$SCEN/dead-redis.toml" >"$SCEN/dead-redis.log" 2>&1
  rc=$?
  check "G: a replica whose Redis is not there refuses to start, naming it" \
    "exit $rc: $(grep -m1 "^Error" "$SCEN/dead-redis.log")" \
    refused_naming "$rc" "rediss://127.0.0.1:$dead_redis" "$SCEN/dead-redis.log"

  # ---- H: Redis goes away while running, and comes back
  local probe; probe="$(printf 'cluster-h' | sha256sum | cut -d' ' -f1)"
  : >"$SCEN/empty-result" # an ActionResult with exit code 0 and no outputs: zero bytes
  local put; put="$(ac_http PUT "$probe" "$SCEN/empty-result")"
  check "H: an action result stored through HAProxy" "PUT HTTP $put" [ "$put" = 200 ]
  check "H: ... every replica serves it" "" on_every_replica GET "$probe" 200
  bash "$REDIS" kill "$redis_dir"
  check "H: Redis killed: every replica answers 502 (UNAVAILABLE) for it, not 404" "" \
    on_every_replica GET "$probe" 502
  check "H: ... and refuses to store a result (502)" "" [ "$(ac_http PUT "$probe" "$SCEN/empty-result")" = 502 ]
  new_client "$SCEN" H
  bazel_run "$CL_WS" "$CL_OUR" "--remote_cache=grpc://127.0.0.1:$LB_GRPC" --remote_timeout=30 --remote_retries=0
  BIN_OUT="$(run_binary "$CL_WS")"
  check "H: with Redis down, a build still succeeds (Bazel runs the actions itself)" "$(hit_detail); got '$BIN_OUT'" \
    h_ok
  check "H: Bazel was told why" "" grep -q "UNAVAILABLE" "$BZ_LOG"
  bash "$REDIS" start "$redis_dir"
  local tries=0
  until on_every_replica GET "$probe" 200 >/dev/null || [ $tries -ge 30 ]; do sleep 1; tries=$((tries + 1)); done
  check "H: Redis back: every replica serves the result again" "after ${tries}s" on_every_replica GET "$probe" 200
  new_client "$SCEN" H2; build_b "H2 after Redis came back" "$CL_WS" "$CL_OUR" "${remote[@]}"

  local clean=0
  for i in $(seq 1 $REPLICAS); do
    stop_server "${R_PID[$i]}" >/dev/null 2>&1 || true
  done
  grep -l "panicked at" "$SCEN"/r*.log >/dev/null 2>&1 || clean=1
  check "no replica log has a panic" "" [ "$clean" = 1 ]
  summary
  [ "$E2E_FAILED" = 0 ]
}

main "$@"
