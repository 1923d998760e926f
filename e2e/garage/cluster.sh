#!/usr/bin/env bash
# A real Garage cluster on loopback, for tests: N nodes (default 3), replication factor 3,
# one bucket and one read/write key. The Rust tests (lre-store/tests/garage.rs) and the
# e2e scripts both use this one script.
#
#   cluster.sh up DIR [N]      start N nodes under DIR, wait until healthy, make the bucket
#   cluster.sh stop-node DIR I kill node I (1-based) with SIGKILL
#   cluster.sh start-node DIR I...  start nodes again on their old ports and data, and
#                              wait until the whole cluster is healthy
#   cluster.sh down DIR        stop every node (the data stays in DIR)
#
# `up` writes DIR/env (shell syntax) with GARAGE_ENDPOINT (node 1's S3 API),
# GARAGE_ENDPOINTS (all nodes, space separated), GARAGE_BUCKET, GARAGE_KEY_ID and
# GARAGE_SECRET_FILE. GARAGE (default: `garage` on PATH, then ~/.cargo/bin/garage) is the
# binary.
set -euo pipefail

GARAGE="${GARAGE:-$(command -v garage || echo "${CARGO_HOME:-$HOME/.cargo}/bin/garage")}"
[[ -x "$GARAGE" ]] || { echo "cluster.sh: no garage binary (set GARAGE, or: cargo install garage --locked)" >&2; exit 2; }

cmd="${1:?usage: cluster.sh up|down|stop-node|start-node DIR [N|I]}"
dir="${2:?cluster.sh: DIR missing}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

g() { local i="$1"; shift; "$GARAGE" -c "$dir/n$i/garage.toml" "$@"; }

start_node() {
  local i="$1"
  (cd "$dir/n$i" && exec "$GARAGE" -c "$dir/n$i/garage.toml" server >>"$dir/n$i/log" 2>&1) &
  echo $! >"$dir/n$i/pid"
  local t=0 s3
  s3="$(sed -n '/^\[s3_api\]/,/^\[/ s/^api_bind_addr = "\(.*\)"/\1/p' "$dir/n$i/garage.toml")"
  # Up once its S3 API answers at all (any HTTP status).
  until [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$s3/")" != 000 ]]; do
    sleep 0.2; t=$((t + 1))
    if [[ $t -gt 150 ]]; then echo "cluster.sh: node $i did not start; its log:" >&2; tail -20 "$dir/n$i/log" >&2; exit 1; fi
  done
}

stop_node() {
  local i="$1" sig="${2:-KILL}" pid
  [[ -f "$dir/n$i/pid" ]] || return 0
  pid="$(cat "$dir/n$i/pid")"
  kill "-$sig" "$pid" 2>/dev/null || true
  local t=0
  while kill -0 "$pid" 2>/dev/null; do
    sleep 0.1; t=$((t + 1)); [[ $t -lt 100 ]] || { kill -KILL "$pid" 2>/dev/null || true; }
  done
  rm -f "$dir/n$i/pid"
}

# Every running node's admin /health says 200: it has quorum for all partitions, so
# reads and writes through it work.
wait_healthy() {
  local t=0 p j addr ok
  while :; do
    ok=1
    for p in "$dir"/n*/pid; do
      j="$(basename "$(dirname "$p")")"
      addr="$(sed -n '/^\[admin\]/,$ s/^api_bind_addr = "\(.*\)"/\1/p' "$dir/$j/garage.toml")"
      [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$addr/health")" == 200 ]] || { ok=0; break; }
    done
    [[ $ok == 1 ]] && return 0
    sleep 0.25; t=$((t + 1))
    [[ $t -lt 480 ]] || { echo "cluster.sh: node $j is not healthy; its log:" >&2; tail -5 "$dir/$j/log" >&2; exit 1; }
  done
}

case "$cmd" in
up)
  n="${3:-3}"
  secret="$(openssl rand -hex 32)"
  endpoints=()
  for i in $(seq 1 "$n"); do
    mkdir -p "$dir/n$i/meta" "$dir/n$i/data"
    rpc="$(free_port)"; s3="$(free_port)"; admin="$(free_port)"
    cat >"$dir/n$i/garage.toml" <<EOF
metadata_dir = "$dir/n$i/meta"
data_dir = "$dir/n$i/data"
db_engine = "sqlite"
replication_factor = $(( n < 3 ? n : 3 ))
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"

[admin]
api_bind_addr = "127.0.0.1:$admin"
EOF
    endpoints+=("http://127.0.0.1:$s3")
    start_node "$i"
  done
  first="$(g 1 node id -q)"
  for i in $(seq 2 "$n"); do g "$i" node connect "$first" >/dev/null; done
  for i in $(seq 1 "$n"); do
    id="$(g "$i" node id -q | cut -d@ -f1)"
    g 1 layout assign -z "dc$i" -c 1G "$id" >/dev/null
  done
  g 1 layout apply --version 1 >/dev/null
  wait_healthy
  g 1 bucket create lre >/dev/null
  key_out="$(g 1 key create lre-key)"
  key_id="$(sed -n 's/^Key ID: *//p' <<<"$key_out")"
  sed -n 's/^Secret key: *//p' <<<"$key_out" >"$dir/secret"
  chmod 600 "$dir/secret"
  g 1 bucket allow --read --write --owner lre --key lre-key >/dev/null
  {
    echo "GARAGE_ENDPOINT=${endpoints[0]}"
    echo "GARAGE_ENDPOINTS=\"${endpoints[*]}\""
    echo "GARAGE_BUCKET=lre"
    echo "GARAGE_REGION=garage"
    echo "GARAGE_KEY_ID=$key_id"
    echo "GARAGE_SECRET_FILE=$dir/secret"
    echo "GARAGE_NODES=$n"
  } >"$dir/env"
  ;;
stop-node) stop_node "${3:?node}" KILL ;;
start-node)
  shift 2
  for i in "$@"; do start_node "$i"; done
  # Garage reconnects to its saved peers by itself, but slowly after a whole-cluster
  # restart: introduce every restarted node to every running one.
  for i in "$@"; do
    for p in "$dir"/n*/pid; do
      j="$(basename "$(dirname "$p")")"; j="${j#n}"
      [[ "$j" != "$i" ]] || continue
      g "$i" node connect "$(g "$j" node id -q)" >/dev/null 2>&1 || true
    done
  done
  wait_healthy
  ;;
down)
  for p in "$dir"/n*/pid; do
    [[ -f "$p" ]] || continue
    i="$(basename "$(dirname "$p")")"; stop_node "${i#n}" TERM
  done
  ;;
*) echo "cluster.sh: unknown command $cmd" >&2; exit 2 ;;
esac
