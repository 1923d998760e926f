#!/usr/bin/env bash
# e2e/setups_test.sh [SCENARIO...]
#
# The four setups users run, each on separate simulated machines: Linux network
# namespaces joined by veth links to a bridge in a namespace of their own, addresses
# 10.77.0.0/24 that exist only inside them (nothing here reaches the machine's own
# network). Hosts: a server (10.77.0.1), two worker hosts (.11, .12), a CI host (.21) and
# a contributor host (.22). Bazel 4.2.3 runs on the client hosts with the fixture and the
# generated --config=lre Nix toolchain (the zig toolchain of e2e/toolchains).
#
# Between hosts every connection is TLS. Debian's Bazel 4.2.3 cannot speak grpcs:// (its
# netty lacks ALPN on this JDK), so each client host runs Debian's nginx on its own
# loopback as a TLS-originating proxy (`grpc_pass grpcs://…`), and Bazel dials it with
# grpc://127.0.0.1. Workers and curl speak TLS to the server directly.
#
# Scenarios (default: all, in this order):
#   1 local      loopback, anonymous read-write, no config: a second checkout hits 100%
#   2 personal   TLS and one read-write token, Bazel on another host; with no token or a
#                wrong one nothing is read or written; the right token hits 100% elsewhere
#   3 team       two client hosts, each its own read-write token: the second hits 100%
#   4 open       instance "main" is executed-only: CI builds with --remote_executor and a
#                read-write token, workers on both worker hosts run the actions with worker
#                tokens over TLS; the contributor (read token,
#                --noremote_upload_local_results) hits 100% and writes nothing; its Execute
#                is refused; CI's token cannot write a result (Bazel's upload of a local
#                result and a direct PUT are refused); a no-remote-exec action stays out of
#                the cache;
#                every result of "main" was written by a worker (the admin's listing); a
#                worker of instance "other" gets no job of "main" and all of "other"'s;
#                killing a worker host mid-build still succeeds; expired, wrong and
#                other-instance tokens are refused and store nothing; a worker with a
#                client token logs one clear line and retries
# Needs root (ip netns), nginx, bwrap, Nix and Bazel. Prints PASS/FAIL lines and, last,
# "N passed, M failed".
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LRE="${LRE:-$REPO_ROOT/target/debug/lre}"
LRE_WORKER="${LRE_WORKER:-$REPO_ROOT/target/debug/lre-worker}"
NGINX="${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}"
BAZEL_VERB=build
NET=10.77.0
SRV_IP="$NET.1"
NS_PREFIX="lre$$"
declare -A HOST_IP=([srv]="$NET.1" [w1]="$NET.11" [w2]="$NET.12" [ci]="$NET.21" [dev]="$NET.22")
GRPC=8980
HTTPS=8981

# ---------------------------------------------------------------- hosts
ns() { echo "$NS_PREFIX-$1"; }
on() { local h="$1"; shift; ip netns exec "$(ns "$h")" "$@"; }
# bg_on HOST NAME CMD...: start_bg on HOST (ip netns exec execs CMD, so BG_PID is CMD's pid).
bg_on() { local h="$1" name="$2"; shift 2; start_bg "$name" ip netns exec "$(ns "$h")" "$@"; }
PROXY_PIDS=()
stop_proxies() { local p; for p in "${PROXY_PIDS[@]}"; do stop_server "$p" >/dev/null; done; PROXY_PIDS=(); }
# fresh NAME: a new scenario, with whatever an earlier one left running stopped first.
fresh() {
  stop_proxies
  [ -n "${SERVER_PID:-}" ] && stop_server "$SERVER_PID" >/dev/null
  SERVER_PID=""
  new_scenario "$1"
}

hosts_up() {
  local lan; lan="$(ns lan)"
  E2E_CLEANUP_HOOKS+=("hosts_down")
  ip netns add "$lan" || return 1
  ip -n "$lan" link add br0 type bridge || return 1
  ip -n "$lan" link set br0 up
  local h
  for h in srv w1 w2 ci dev; do
    ip netns add "$(ns "$h")" || return 1
    ip -n "$lan" link add "p-$h" type veth peer name eth0 netns "$(ns "$h")" || return 1
    ip -n "$lan" link set "p-$h" master br0 up
    ip -n "$(ns "$h")" addr add "${HOST_IP[$h]}/24" dev eth0
    ip -n "$(ns "$h")" link set eth0 up
    ip -n "$(ns "$h")" link set lo up
  done
}

# Kills every process on a host (the host "dies").
host_kill() { ip netns pids "$(ns "$1")" 2>/dev/null | xargs -r kill -KILL 2>/dev/null; return 0; }

hosts_down() {
  local h
  for h in dev ci w2 w1 srv; do host_kill "$h"; done
  sleep 0.5
  for h in dev ci w2 w1 srv lan; do ip netns del "$(ns "$h")" 2>/dev/null; done
  return 0
}

no_host_route() { ! on ci ip route get 1.1.1.1 >/dev/null 2>&1; }

# ---------------------------------------------------------------- TLS and tokens
pki() {
  PKI="$RUN_DIR/pki"
  mkdir -p "$PKI"
  (
    set -e
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 2 -keyout ca.key -out ca.crt \
      -subj "/CN=lre setups test CA" -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey rsa:2048 -nodes -sha256 -keyout server.key -out server.csr -subj "/CN=lre-server"
    printf '%s\n' "basicConstraints = critical, CA:FALSE" "keyUsage = critical, digitalSignature, keyEncipherment" \
      "extendedKeyUsage = serverAuth" "subjectAltName = IP:$SRV_IP, DNS:lre-server" >server.ext
    openssl x509 -req -sha256 -days 2 -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -extfile server.ext -out server.crt
  ) >"$PKI/openssl.log" 2>&1
}

# new_token NAME: a fresh secret in $SCEN/NAME.token; prints it.
new_token() { local t; t="$(random_hex 32)"; printf '%s\n' "$t" >"$SCEN/$1.token"; chmod 600 "$SCEN/$1.token"; echo "$t"; }
# token_entry NAME SECRET SCOPE [INSTANCES_TOML] [EXPIRES]
token_entry() {
  printf '\n[[auth.tokens]]\nname = "%s"\nsha256 = "%s"\nscope = "%s"\n' "$1" "$(sha256_hex "$2")" "$3"
  [ -n "${4:-}" ] && printf 'instances = %s\n' "$4"
  [ -n "${5:-}" ] && printf 'expires = "%s"\n' "$5"
  return 0
}

# remote_config [EXECUTION]: the server config of setups 2-4 (TLS on both ports, no
# anonymous access) in $SCEN/server.toml, tokens to be appended.
remote_config() {
  cat >"$SCEN/server.toml" <<EOT
grpc_listen = "$SRV_IP:$GRPC"
http_listen = "$SRV_IP:$HTTPS"

[store]
path = "$SCEN/store"

[tls]
cert = "$PKI/server.crt"
key = "$PKI/server.key"

[auth]
anonymous = "none"
EOT
  if [ "${1:-}" = execution ]; then
    printf '\n[execution]\nenabled = true\nkeepalive_seconds = 2\n' >>"$SCEN/server.toml"
  fi
}

# start_remote_server: lre-server on the server host; waits for https /healthz from CI.
start_remote_server() {
  bg_on srv server "$LRE_SERVER" --config "$SCEN/server.toml"
  SERVER_PID="$BG_PID"
  local deadline=$((SECONDS + 30))
  while [ "$SECONDS" -lt "$deadline" ]; do
    on ci curl -fsS -o /dev/null --max-time 2 --cacert "$PKI/ca.crt" "https://$SRV_IP:$HTTPS/healthz" 2>/dev/null && return 0
    pid_alive "$SERVER_PID" || { tail -n 5 "$SCEN/server.log" >&2; return 1; }
    sleep 0.2
  done
  return 1
}

# proxy HOST: nginx on HOST's loopback, plaintext h2 in, TLS to the server out. Sets PROXY.
proxy() {
  local h="$1" dir="$SCEN/nginx-$1"
  mkdir -p "$dir"
  cat >"$dir/nginx.conf" <<EOT
user root;
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 512; }
http {
  access_log off;
  client_body_temp_path $dir/body;
  client_max_body_size 0;
  grpc_read_timeout 1h;
  grpc_send_timeout 1h;
  server {
    listen 127.0.0.1:18980 http2;
    location / {
      grpc_pass grpcs://$SRV_IP:$GRPC;
      grpc_ssl_trusted_certificate $PKI/ca.crt;
      grpc_ssl_verify on;
      grpc_ssl_name lre-server;
      grpc_ssl_server_name on;
    }
  }
}
EOT
  bg_on "$h" "nginx-$h" "$NGINX" -p "$dir" -c "$dir/nginx.conf"
  PROXY_PIDS+=("$BG_PID")
  PROXY="grpc://127.0.0.1:18980"
  local deadline=$((SECONDS + 10))
  while [ "$SECONDS" -lt "$deadline" ]; do
    on "$h" python3 -c 'import socket; socket.create_connection(("127.0.0.1", 18980), timeout=1)' 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}

# The server's blobs and entries: file names and sizes under the store (atimes aside).
# A missing store prints a fresh random line, so that no comparison of two states passes.
store_state() {
  [ -d "$SCEN/store" ] || { echo "no store: $(random_hex 8)"; return; }
  (cd "$SCEN/store" && find . -path ./tmp -prune -o -type f ! -name '*.lock' -printf '%p %s\n' | sort | sha256sum)
}
store_files() { find "$SCEN/store" -path "$SCEN/store/tmp" -prune -o -type f ! -name '*.lock' -print | wc -l; }

# ---------------------------------------------------------------- clients
# client HOST NAME [GEN_ARGS...]: an LRE checkout with .bazelrc.lre for a proxy on HOST.
client() {
  local h="$1" name="$2"; shift 2
  lre_client "$SCEN" "$name"
  (cd "$CL_WS" && "$LRE" generate --cc "$TC_DIR/cc.nix" --java "$TC_DIR/java.nix" --prefix lre \
    --bazel-version 4.2.3 "$@") >"$SCEN/gen-$name.log" 2>&1
}

# build_on HOST WS OUR FLAGS...: bazel_run inside HOST's network namespace.
build_on() {
  local h="$1"; shift
  E2E_NETNS="$(ns "$h")" bazel_run "$@"
}

all_hit() { [ "$BZ_RC" = 0 ] && [ "$CACHEABLE" -gt 0 ] && [ "$HITS" = "$CACHEABLE" ]; }
built_ok() { [ "$BZ_RC" = 0 ] && [ "$SPAWNS" -gt 0 ]; }
refused_build() { [ "$BZ_RC" != 0 ] && grep -qE "$1" "$BZ_LOG"; }
nothing_remote() { [ "$HITS" = 0 ] && [ "$(remote_count)" = 0 ]; }

# http_status HOST TOKEN METHOD PATH [DATA]: the status of an HTTPS request to the server.
http_status() {
  local -a auth=()
  [ -n "$2" ] && auth=(-H "Authorization: Bearer $2")
  on "$1" curl -s -o /dev/null -w '%{http_code}' --max-time 10 --cacert "$PKI/ca.crt" "${auth[@]}" \
    -X "$3" ${5:+--data-binary "$5"} "https://$SRV_IP:$HTTPS$4"
}

# ---------------------------------------------------------------- 1 local
scenario_local() {
  local n="1 local"
  fresh local
  cat >"$SCEN/server.toml" <<EOT
grpc_listen = "127.0.0.1:8980"
http_listen = "127.0.0.1:8981"
[store]
path = "$SCEN/store"
EOT
  # Everything on the CI host's loopback; the config only moves the store into the test.
  bg_on ci server "$LRE_SERVER" --config "$SCEN/server.toml"
  SERVER_PID="$BG_PID"
  local deadline=$((SECONDS + 30))
  while [ "$SECONDS" -lt "$deadline" ] && ! on ci curl -fsS -o /dev/null http://127.0.0.1:8981/healthz 2>/dev/null; do sleep 0.2; done
  check "$n: lre-server with defaults answers on the host's loopback" "" on ci curl -fsS -o /dev/null http://127.0.0.1:8981/healthz || return 0
  client ci A --endpoint grpc://127.0.0.1:8980 --cache-only
  local a="$CL_WS"
  build_on ci "$a" "$CL_OUR" --config=lre
  check "$n: A builds with the Nix toolchain and uploads, anonymously" "exit $BZ_RC; '$SUM_LINE'" built_ok
  client ci B --endpoint grpc://127.0.0.1:8980 --cache-only
  build_on ci "$CL_WS" "$CL_OUR" --config=lre
  check "$n: B, another checkout and output root, hits 100%" "$HITS/$CACHEABLE; '$SUM_LINE'" all_hit || show_misses
  stop_server "$SERVER_PID" >/dev/null
}

# ---------------------------------------------------------------- 2 personal
scenario_personal() {
  local n="2 personal"
  fresh personal
  local me; me="$(new_token me)"
  remote_config
  token_entry me "$me" read-write >>"$SCEN/server.toml"
  check "$n: the server starts with TLS and one token" "" start_remote_server || return 0
  check "$n: the CI host's proxy speaks TLS to the server" "" proxy ci || return 0

  client ci A --endpoint "$PROXY" --cache-only
  local a="$CL_WS"
  local before; before="$(store_state)"
  build_on ci "$a" "$SCEN/A-none" --config=lre
  check "$n: with no token Bazel gets nothing and stores nothing" "exit $BZ_RC" \
    refused_then_unchanged UNAUTHENTICATED "$before"
  build_on ci "$a" "$SCEN/A-wrong" --config=lre "--remote_header=authorization=Bearer $(random_hex 32)"
  check "$n: with a wrong token Bazel gets nothing and stores nothing" "exit $BZ_RC" \
    refused_then_unchanged UNAUTHENTICATED "$before"
  check "$n: HTTP with no token or a wrong one is 401, and stores nothing" "" \
    http_refused_unchanged "$before"

  build_on ci "$a" "$CL_OUR" --config=lre "--remote_header=authorization=Bearer $me"
  check "$n: with the token, a build on the CI host uploads over TLS" "exit $BZ_RC; $(store_files) files stored" \
    uploaded "$before"
  check "$n: the contributor host's proxy" "" proxy dev || return 0
  client dev B --endpoint "$PROXY" --cache-only
  build_on dev "$CL_WS" "$CL_OUR" --config=lre "--remote_header=authorization=Bearer $me"
  check "$n: the same token on another host hits 100%" "$HITS/$CACHEABLE; '$SUM_LINE'" all_hit || show_misses
  stop_server "$SERVER_PID" >/dev/null
  stop_proxies
}
refused_then_unchanged() {
  [ "$BZ_RC" != 0 ] || nothing_remote || return 1
  grep -q "$1" "$BZ_LOG" && [ "$(store_state)" = "$2" ]
}
uploaded() { built_ok && [ "$(store_state)" != "$1" ]; }
http_refused_unchanged() {
  local h; h="$(printf x | sha256sum | cut -d' ' -f1)"
  [ "$(http_status ci "" PUT "/cas/$h" x)" = 401 ] &&
    [ "$(http_status ci "$(random_hex 32)" PUT "/cas/$h" x)" = 401 ] &&
    [ "$(http_status ci "" GET "/cas/$h")" = 401 ] &&
    [ "$(store_state)" = "$1" ]
}

# ---------------------------------------------------------------- 3 team
scenario_team() {
  local n="3 team"
  fresh team
  local alice bob; alice="$(new_token alice)"; bob="$(new_token bob)"
  remote_config
  { token_entry alice "$alice" read-write; token_entry bob "$bob" read-write; } >>"$SCEN/server.toml"
  check "$n: the server starts with a token per member" "" start_remote_server || return 0
  proxy ci && proxy dev || { check "$n: proxies" "" false; return 0; }
  client ci A --endpoint "$PROXY" --cache-only
  build_on ci "$CL_WS" "$CL_OUR" --config=lre "--remote_header=authorization=Bearer $alice"
  check "$n: alice builds on the CI host and uploads" "exit $BZ_RC; '$SUM_LINE'" built_ok
  client dev B --endpoint "$PROXY" --cache-only
  build_on dev "$CL_WS" "$CL_OUR" --config=lre "--remote_header=authorization=Bearer $bob"
  check "$n: bob, on the contributor host with his own token, hits 100% of alice's results" \
    "$HITS/$CACHEABLE; '$SUM_LINE'" all_hit || show_misses
  stop_server "$SERVER_PID" >/dev/null
  stop_proxies
}

# ---------------------------------------------------------------- 4 open
# start_worker HOST NAME TOKEN_NAME: lre-worker on HOST, over TLS, with its token file.
start_worker() {
  mkdir -p "$SCEN/$2"
  LRE_LOG="info,lre_worker=debug" bg_on "$1" "$2" "$LRE_WORKER" --server "https://$SRV_IP:$GRPC" \
    --tls-ca "$PKI/ca.crt" --token-file "$SCEN/$3.token" --id "$2" --capacity 2 --work-dir "$SCEN/$2" \
    --property OSFamily=Linux --property "container-image=$IMAGE"
}
ran() { grep -c "running action operation=" "$SCEN/$1.log" 2>/dev/null || true; }
# Each by its credential-bound id, TOKEN/ID.
all_attached() {
  wait_log "$SCEN/server.log" "worker connected worker=wk1/w1 " 1 &&
    wait_log "$SCEN/server.log" "worker connected worker=wk2/w2 " 1 &&
    wait_log "$SCEN/server.log" "worker connected worker=wk-other/w-other " 1
}

scenario_open() {
  local n="4 open"
  fresh open
  local ci dev wk1 wk2 wko cio old ops
  ci="$(new_token ci)"; dev="$(new_token dev)"; wk1="$(new_token wk1)"; wk2="$(new_token wk2)"
  wko="$(new_token wk-other)"; cio="$(new_token ci-other)"; old="$(new_token old)"; ops="$(new_token ops)"
  remote_config execution
  {
    echo 'instances = ["main", "other"]'
  } | cat - "$SCEN/server.toml" >"$SCEN/server.toml.new" && mv "$SCEN/server.toml.new" "$SCEN/server.toml"
  # The setup the README recommends for open remote execution: results of "main" come only
  # from actions its workers ran, so no client token (CI's included) can poison it.
  printf '\n[instance_settings.main]\nexecuted_only = true\n' >>"$SCEN/server.toml"
  {
    token_entry ops "$ops" admin
    token_entry ci "$ci" read-write '["main"]'
    token_entry dev "$dev" read
    token_entry wk1 "$wk1" worker '["main"]'
    token_entry wk2 "$wk2" worker '["main"]'
    token_entry wk-other "$wko" worker '["other"]'
    token_entry ci-other "$cio" read-write '["other"]'
    token_entry old "$old" read-write "" "2020-01-01T00:00:00Z"
  } >>"$SCEN/server.toml"
  check "$n: the server starts: TLS, no anonymous access, execution on" "" start_remote_server || return 0

  proxy ci || { check "$n: proxy" "" false; return 0; }
  # --read-only: CI never uploads a result itself (its builds write through execution).
  client ci C --endpoint "$PROXY" --instance-name main --read-only
  local c="$CL_WS" c_our="$CL_OUR"
  IMAGE="$(grep -oE '"container-image": "[^"]+"' "$c/.lre/local-remote-execution/generated/config/BUILD.bazel" | cut -d'"' -f4)"
  start_worker w1 w1 wk1; local w1pid="$BG_PID"
  start_worker w2 w2 wk2
  start_worker w2 w-other wk-other
  check "$n: three workers attach over TLS with worker tokens" "" all_attached || {
    tail -n 3 "$SCEN"/w1.log >&2; return 0; }

  local before; before="$(store_state)"
  build_on ci "$c" "$c_our" --config=lre --jobs=8 "--remote_header=authorization=Bearer $ci"
  local remote; remote="$(remote_count)"
  check "$n: CI builds everything with --remote_executor and its read-write token" \
    "exit $BZ_RC; '$SUM_LINE'" all_remote "$remote"
  check "$n: workers on both worker hosts ran actions" "w1 $(ran w1), w2 $(ran w2)" \
    [ "$(ran w1)" -gt 0 -a "$(ran w2)" -gt 0 ]
  check "$n: the worker of instance \"other\" got no job of \"main\"" "$(ran w-other) jobs" [ "$(ran w-other)" = 0 ]
  BIN_OUT="$(run_binary "$c")"
  check "$n: the remotely built binary runs on the CI host" "got '$BIN_OUT'" output_is_expected

  proxy dev || { check "$n: proxy" "" false; return 0; }
  client dev D --endpoint "$PROXY" --instance-name main --read-only --cache-only
  local d="$CL_WS"
  check "$n: the contributor's .bazelrc.lre says --noremote_upload_local_results" "" \
    grep -q -- "--noremote_upload_local_results" "$d/.bazelrc.lre"
  before="$(store_state)"
  build_on dev "$d" "$CL_OUR" --config=lre "--remote_header=authorization=Bearer $dev"
  check "$n: the contributor with a read token hits 100%" "$HITS/$CACHEABLE; '$SUM_LINE'" all_hit || show_misses
  check "$n: the contributor wrote nothing: the store is unchanged" "$(store_files) files" [ "$(store_state)" = "$before" ]

  # CI's token cannot write a result. With --remote_executor, Bazel uploads the results of
  # the actions it runs itself (here one tagged no-remote-exec): the server refuses them
  # (PERMISSION_DENIED naming executed_only), Bazel warns and goes on, and the result stays
  # out of the cache; a direct PUT is refused too.
  local local_rule
  local_rule="$(printf 'genrule(name = "x", outs = ["x.txt"], cmd = "echo local %s > $@", tags = ["no-remote-exec"])' "$(random_hex 8)")"
  mkdir -p "$c/local" "$d/local"
  echo "$local_rule" >"$c/local/BUILD"; echo "$local_rule" >"$d/local/BUILD"
  local -a saved_targets=("${BAZEL_TARGETS[@]}")
  BAZEL_TARGETS=(//local:x)
  build_on ci "$c" "$SCEN/C-local" --config=lre --remote_upload_local_results \
    "--remote_header=authorization=Bearer $ci"
  check "$n: CI's no-remote-exec action runs on its host; Bazel's upload of its result is refused" \
    "exit $BZ_RC; '$SUM_LINE'; $REMOTE_WARNINGS remote warnings" \
    local_upload_refused
  build_on dev "$d" "$SCEN/D-local" --config=lre "--remote_header=authorization=Bearer $dev"
  check "$n: ... so it stays out of the cache: the contributor's build of it misses and runs it" \
    "exit $BZ_RC; $HITS hits of $CACHEABLE; '$SUM_LINE'" [ "$BZ_RC" = 0 -a "$HITS" = 0 -a "$CACHEABLE" = 1 ]
  BAZEL_TARGETS=("${saved_targets[@]}")
  before="$(store_state)"
  local h_ac; h_ac="$(printf 'poison' | sha256sum | cut -d' ' -f1)"
  local s_put; s_put="$(http_status ci "$ci" PUT "/main/ac/$h_ac" "$(printf '\x20\x01')")"
  check "$n: CI's token writing a result directly is 403 (executed_only), and nothing is stored" \
    "status $s_put" [ "$s_put" = 403 -a "$(store_state)" = "$before" ]

  # Every result "main" holds was written by a worker, and says which: the admin's view.
  local prov_ci prov_w
  prov_ci="$(on ci "$LRE" provenance list --server "https://$SRV_IP:$HTTPS" --tls-ca "$PKI/ca.crt" \
    --token-file "$SCEN/ops.token" --writer token:ci --instance main --json 2>&1)"
  prov_w="$(on ci "$LRE" provenance list --server "https://$SRV_IP:$HTTPS" --tls-ca "$PKI/ca.crt" \
    --token-file "$SCEN/ops.token" --writer token:wk1 --instance main --json 2>&1)"
  check "$n: no result of \"main\" was written by CI's token; worker w1's are listed as executed" \
    "ci: $(echo "$prov_ci" | tr -d '\n' | cut -c1-200); wk1: $(echo "$prov_w" | tr -d '\n' | cut -c1-200)" \
    provenance_ok "$prov_ci" "$prov_w"

  # Execute with the read token, for an action CI has already uploaded (so the refusal is
  # Execute's, not an upload's), skipping the cache so that no hit can answer instead.
  local salt_rule; salt_rule="$(printf 'genrule(name = "x", outs = ["x.txt"], cmd = "echo %s > $@")' "$(random_hex 8)")"
  mkdir -p "$c/salt" "$d/salt"
  echo "$salt_rule" >"$c/salt/BUILD"; echo "$salt_rule" >"$d/salt/BUILD"
  local -a saved=("${BAZEL_TARGETS[@]}")
  BAZEL_TARGETS=(//salt:x)
  build_on ci "$c" "$SCEN/C-salt" --config=lre "--remote_header=authorization=Bearer $ci"
  before="$(store_state)"
  build_on dev "$d" "$SCEN/D-exec" --config=lre --remote_cache= "--remote_executor=$PROXY" --noremote_accept_cached \
    "--remote_header=authorization=Bearer $dev"
  check "$n: the contributor's Execute is refused (PERMISSION_DENIED), and nothing is stored" "exit $BZ_RC" \
    refused_unchanged "PERMISSION_DENIED.*may not execute" "$before"

  # Instance "other": only its own worker may run it.
  local w1n w2n; w1n="$(ran w1)"; w2n="$(ran w2)"
  printf 'genrule(name = "x", outs = ["x.txt"], cmd = "echo other %s > $@")\n' "$(random_hex 8)" >"$c/salt/BUILD"
  build_on ci "$c" "$SCEN/C-other" --config=lre --remote_instance_name=other "--remote_header=authorization=Bearer $cio"
  check "$n: an action of instance \"other\" runs on its worker only" \
    "exit $BZ_RC; w-other $(ran w-other), w1 +$(($(ran w1) - w1n)), w2 +$(($(ran w2) - w2n))" \
    [ "$BZ_RC" = 0 -a "$(ran w-other)" -gt 0 -a "$(ran w1)" = "$w1n" -a "$(ran w2)" = "$w2n" ]

  # Bad credentials on the wire, over HTTPS: nothing is stored.
  before="$(store_state)"
  local h; h="$(printf y | sha256sum | cut -d' ' -f1)"
  local s_old s_wrong s_inst s_read s_worker
  s_old="$(http_status dev "$old" PUT "/main/cas/$h" y)"
  s_wrong="$(http_status dev "$(random_hex 32)" PUT "/main/cas/$h" y)"
  s_inst="$(http_status dev "$cio" PUT "/main/cas/$h" y)"
  s_read="$(http_status dev "$dev" PUT "/main/cas/$h" y)"
  s_worker="$(http_status dev "$wk1" PUT "/main/ac/$h" y)"
  check "$n: expired 401, wrong 401, other-instance 403, read 403, worker writing the AC 403; nothing stored" \
    "$s_old $s_wrong $s_inst $s_read $s_worker" \
    [ "$s_old $s_wrong $s_inst $s_read $s_worker" = "401 401 403 403 403" -a "$(store_state)" = "$before" ]

  # A worker holding a client token: refused, said once, retried with backoff.
  mkdir -p "$SCEN/w-bad"
  bg_on w2 w-bad "$LRE_WORKER" --server "https://$SRV_IP:$GRPC" --tls-ca "$PKI/ca.crt" \
    --token-file "$SCEN/ci.token" --id w-bad --work-dir "$SCEN/w-bad"
  local badpid="$BG_PID"
  sleep 8
  check "$n: a worker with a client token logs one clear refusal and keeps retrying" \
    "$(grep -c 'refused this worker' "$SCEN/w-bad.log") line(s); $(grep -c "refused a worker's Attach" "$SCEN/server.log") refusals at the server" \
    refused_once "$badpid"
  stop_server "$badpid" >/dev/null

  # Kill worker host 1 while it runs an action: the build completes on worker host 2.
  mkdir -p "$c/slow"
  local salt; salt="$(random_hex 4)"
  printf '[genrule(name = "s%%d" %% i, outs = ["s%%d.txt" %% i], cmd = "sleep 4; echo %s %%d > $@" %% i) for i in range(6)]\n' \
    "$salt" >"$c/slow/BUILD"
  BAZEL_TARGETS=(//slow:all)
  (
    deadline=$((SECONDS + 120))
    while [ "$SECONDS" -lt "$deadline" ]; do
      # Actions run in network namespaces of their own: find them by their exec root.
      for p in $(pgrep -x sleep); do
        if [[ "$(readlink "/proc/$p/cwd" 2>/dev/null)" == "$SCEN/w1/"* ]]; then
          host_kill w1; echo "killed every process on worker host 1 while it ran sleep pid $p" >"$SCEN/kill.log"; exit 0
        fi
      done
      sleep 0.1
    done
  ) &
  local killer=$!
  build_on ci "$c" "$SCEN/C-kill" --config=lre --jobs=8 "--remote_header=authorization=Bearer $ci"
  wait "$killer" 2>/dev/null
  BAZEL_TARGETS=("${saved[@]}")
  check "$n: worker host 1 was killed mid-action" "$(cat "$SCEN/kill.log" 2>/dev/null)" [ -s "$SCEN/kill.log" ]
  check "$n: the build still succeeds, on worker host 2" "exit $BZ_RC; '$SUM_LINE'" all_remote "$(remote_count)"
  check "$n: the server requeued the lost worker's actions" "" grep -qE "requeued a lost action.*why=Worker" "$SCEN/server.log"
  forget_pid "$w1pid"
  check "$n: no panic in the server log" "" server_log_clean "$SCEN/server.log"
  stop_server "$SERVER_PID" >/dev/null
  stop_proxies
}
refused_unchanged() { [ "$BZ_RC" != 0 ] && grep -q "$1" "$BZ_LOG" && [ "$(store_state)" = "$2" ]; }
local_upload_refused() {
  [ "$BZ_RC" = 0 ] && [ "$(remote_count)" = 0 ] && [ "$REMOTE_WARNINGS" -gt 0 ] &&
    grep -q "executed_only" "$BZ_LOG"
}
# provenance_ok CI_JSON WORKER_JSON: CI wrote nothing; the worker wrote results, all executed.
provenance_ok() {
  python3 - "$1" "$2" <<'PY'
import json, sys
ci, w = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ok = ci["count"] == 0 and w["count"] > 0 and all(
    e["source"] == "executed" and e["worker"] == "wk1/w1" and e["token"] == "wk1" for e in w["entries"])
sys.exit(0 if ok else 1)
PY
}
refused_once() {
  pid_alive "$1" && [ "$(grep -c 'refused this worker' "$SCEN/w-bad.log")" = 1 ] &&
    [ "$(grep -c "refused a worker's Attach" "$SCEN/server.log")" -ge 3 ]
}

main() {
  local -a want=("$@")
  [ "${#want[@]}" = 0 ] && want=(local personal team open)
  e2e_init
  check "preflight: root, ip, nginx, bwrap, nix-build, bazel, and the binaries" "" \
    test "$(id -u)" = 0 -a -n "$(command -v ip)" -a -x "$NGINX" -a -n "$(command -v bwrap)" \
    -a -n "$(command -v nix-build)" -a -n "$(command -v "$BAZEL")" -a -x "$LRE" -a -x "$LRE_SERVER" -a -x "$LRE_WORKER" || {
    echo "$E2E_PASSED passed, $E2E_FAILED failed"; exit 1; }
  check "the test toolchains are built with Nix" "" bash -c "{ bash '$E2E_DIR/toolchains/prepare.sh' '$TC_DIR' &&
    nix-build '$TC_DIR/cc.nix' --no-out-link && nix-build '$TC_DIR/java.nix' --no-out-link; } >'$RUN_DIR/prepare.log' 2>&1" || {
    echo "$E2E_PASSED passed, $E2E_FAILED failed"; exit 1; }
  check "five hosts in their own network namespaces, joined by a bridge" "" hosts_up || {
    echo "$E2E_PASSED passed, $E2E_FAILED failed"; exit 1; }
  check "no host has a route out of the test network" "" no_host_route
  pki || { check "test PKI" "$(tail -n 3 "$RUN_DIR/pki/openssl.log")" false; exit 1; }
  local w
  for w in "${want[@]}"; do
    case "$w" in
      1|local) scenario_local ;;
      2|personal) scenario_personal ;;
      3|team) scenario_team ;;
      4|open) scenario_open ;;
      *) echo "unknown scenario $w" >&2; exit 2 ;;
    esac
  done
  hosts_down
  check "every namespace the test made is gone" "" no_namespaces_left
  echo "$E2E_PASSED passed, $E2E_FAILED failed"
  [ "$E2E_FAILED" = 0 ]
}
no_namespaces_left() { ! ip netns list | grep -q "^$NS_PREFIX-"; }

main "$@"
