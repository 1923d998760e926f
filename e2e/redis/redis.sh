#!/usr/bin/env bash
# A throwaway redis-server on a loopback port, for the Rust tests and the e2e scripts alike.
#
#   redis.sh up DIR [redis-server args...]   start it; writes DIR/env (REDIS_URL, REDIS_PORT);
#                                            "{port}" in an argument is the chosen port, so
#                                            `--port 0 --tls-port {port} ...` serves TLS on it
#   redis.sh kill DIR                        SIGKILL, as a crashed machine (data is lost:
#                                            no persistence, as a cache's Redis runs)
#   redis.sh start DIR                       start it again on the same port and arguments
#   redis.sh down DIR                        stop it
set -euo pipefail
cmd=${1:?usage: redis.sh up|kill|start|down DIR} dir=${2:?DIR}
bin=$(command -v redis-server || echo /usr/sbin/redis-server)

wait_up() {
  local port=$1 pid=$2
  for _ in $(seq 1 100); do
    # Our process, not another test's Redis that took the port meanwhile.
    kill -0 "$pid" 2>/dev/null || break
    if [ -s "$dir/tls" ]; then
      # A TLS port cannot be PINGed in the clear: our process logging readiness will do.
      grep -q "Ready to accept connections" "$dir/log" 2>/dev/null && return 0
      sleep 0.1
      continue
    fi
    # No redis-cli needed: a PING over bash's /dev/tcp. NOAUTH also proves it listens.
    if { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
      printf 'PING\r\n' >&3
      if read -r -t 2 reply <&3 && [[ $reply == +PONG* || $reply == -NOAUTH* ]]; then
        exec 3>&-
        return 0
      fi
      exec 3>&-
    fi
    sleep 0.1
  done
  echo "redis.sh: redis-server (pid $pid) on port $port did not answer; its log:" >&2
  tail -20 "$dir/log" >&2
  return 1
}

launch() {
  local port; port=$(cat "$dir/port")
  local -a args=(); mapfile -d '' -t args < "$dir/args"
  args=("${args[@]//\{port\}/$port}")
  : > "$dir/log" # readiness is read from this run's log
  "$bin" --bind 127.0.0.1 --port "$port" --save '' --appendonly no --dir "$dir" \
    --daemonize no "${args[@]}" >>"$dir/log" 2>&1 &
  local pid=$!
  echo "$pid" > "$dir/pid"
  wait_up "$port" "$pid"
}

stop() {
  local sig=$1
  [[ -f $dir/pid ]] || return 0
  local pid; pid=$(cat "$dir/pid")
  kill "-$sig" "$pid" 2>/dev/null || true
  local i
  for i in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    [ "$i" = 60 ] && kill -KILL "$pid" 2>/dev/null # TERM not heeded in 3 s
    sleep 0.05
  done
  rm -f "$dir/pid"
}

case $cmd in
  up)
    shift 2
    mkdir -p "$dir"
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' > "$dir/port"
    # NUL-separated, so an empty argument (--save '') survives.
    if (($#)); then printf '%s\0' "$@" > "$dir/args"; else : > "$dir/args"; fi
    if grep -qz -- '--tls-port' "$dir/args"; then echo 1 > "$dir/tls"; else : > "$dir/tls"; fi
    launch
    port=$(cat "$dir/port")
    scheme=redis; [ -s "$dir/tls" ] && scheme=rediss
    printf 'REDIS_PORT=%s\nREDIS_URL=%s://127.0.0.1:%s/0\n' "$port" "$scheme" "$port" > "$dir/env"
    ;;
  kill) stop KILL ;;
  start) launch ;;
  down) stop TERM ;;
  *) echo "redis.sh: unknown command $cmd" >&2; exit 2 ;;
esac
