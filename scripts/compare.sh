#!/usr/bin/env bash
# `scripts/bench.sh compare`: BENCHMARKS.md's S1 load against Postline and
# against the original design's stack (Node + Socket.IO + BullMQ/Redis ->
# Postgres, bench/compare/) and a plain Rust Socket.IO server
# (bench/compare/socketioxide/), driven by the same load generator over
# Socket.IO, runs interleaved; prints a markdown table of medians and every
# run.
#
#   scripts/bench.sh compare [--runs 4] [--duration 30] [--warmup 2]
#       [--connections 1000] [--conversations 100] [--rate 10] [--payload 100]
#       [--systems postline,postline-no-worker,node-bullmq,node,socketioxide]
#       [-- extra postline-bench flags]
#
# The same settings as environment variables: RUNS, DURATION, WARMUP,
# CONNECTIONS, CONVERSATIONS, RATE, PAYLOAD, SYSTEMS. POSTLINE_BIN and
# POSTLINE_BENCH_BIN use binaries already built instead of
# `cargo build --release`; COMPARE_SOCKETIOXIDE_BIN uses a
# bench/compare/socketioxide binary already built instead of building it.
# COMPARE_OUT keeps the per-run JSON there; COMPARE_KEEP=1 keeps the whole
# work directory (servers' logs, CPU samples).
#
# Systems (one row each):
#   postline            postline serve --dev (gateway + in-process worker; its own Postgres)
#   postline-no-worker  postline serve --dev --no-worker (enqueue to pgmq only)
#   node-bullmq         node server.mjs --persist + node server.mjs --worker, Redis, Postgres
#   node                node server.mjs (broadcast only, nothing stored)
#   socketioxide        bench/compare/socketioxide: server.mjs's node row in Rust
#                       on socketioxide (broadcast only, nothing stored)
# Every run starts the system from scratch (a fresh Postgres cluster and
# Redis) and stops it after. Postgres for the Node stack is initdb'd and
# started exactly as `serve --dev` starts its own (src/pglocal.rs: fsync=off,
# synchronous_commit=on, max_connections=400, trust auth on 127.0.0.1);
# Redis writes its append-only file without fsync (appendfsync no, no RDB
# snapshots): both write their log and neither flushes it.
#
# Cores used: utime+stime (from /proc/<pid>/stat) of the server's processes
# (postline; or the Node gateway and worker; or the socketioxide server) and
# of its Postgres (the postmaster with its children; the postmaster's
# cutime/cstime counts the backends that exit) and Redis, sampled every
# 0.25 s, over the measured window: the DURATION seconds that end 0.6 s
# before postline-bench exits (it lingers 0.5 s after the window, then
# closes). "server" is the application process(es) alone; postline-bench
# also reports the main process's own CPU over its exact window
# (server_cpu_cores) as a check.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${RUNS:-4} duration=${DURATION:-30} warmup=${WARMUP:-2}
connections=${CONNECTIONS:-1000} conversations=${CONVERSATIONS:-100}
rate=${RATE:-10} payload=${PAYLOAD:-100}
systems=${SYSTEMS:-postline,postline-no-worker,node-bullmq,node,socketioxide}
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    --conversations) conversations=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --payload) payload=$2; shift 2 ;;
    --systems) systems=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; extra+=("$@"); break ;;
    *) extra+=("$1"); shift ;;
  esac
done
IFS=, read -r -a system_list <<<"$systems"
for s in "${system_list[@]}"; do
  case "$s" in
    postline | postline-no-worker | node-bullmq | node | socketioxide) ;;
    *) echo "unknown system $s (postline, postline-no-worker, node-bullmq, node, socketioxide)" >&2; exit 2 ;;
  esac
done

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# ---------------------------------------------------------------- setup
bash scripts/ensure-postgres.sh
if ! command -v redis-server >/dev/null; then
  echo "redis-server not found; installing the redis-server package" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  # Debian's package may start a system instance; this script runs its own.
  $SUDO service redis-server stop >/dev/null 2>&1 || true
fi
if ! command -v node >/dev/null; then
  echo "node not found: install Node.js >= 18 (e.g. apt-get install nodejs npm)" >&2
  exit 1
fi
# The Node stack's pinned dependencies (bench/compare/package-lock.json).
if [ ! -f bench/compare/node_modules/.package-lock.json ] ||
  [ bench/compare/package-lock.json -nt bench/compare/node_modules/.package-lock.json ]; then
  npm ci --prefix bench/compare --no-audit --no-fund --loglevel=error >&2
fi
if [ -z "${POSTLINE_BIN:-}" ] || [ -z "${POSTLINE_BENCH_BIN:-}" ]; then
  cargo build --release --locked -p postline -p postline-bench >&2
fi
postline=${POSTLINE_BIN:-./target/release/postline}
bench=${POSTLINE_BENCH_BIN:-./target/release/postline-bench}
# The socketioxide row: its own Cargo project, versions pinned by its Cargo.lock.
sioxide_dir=bench/compare/socketioxide
sioxide=${COMPARE_SOCKETIOXIDE_BIN:-$sioxide_dir/target/release/compare-socketioxide}
if [ -z "${COMPARE_SOCKETIOXIDE_BIN:-}" ] && [[ ",$systems," == *,socketioxide,* ]]; then
  cargo build --release --locked --manifest-path "$sioxide_dir/Cargo.toml" >&2
fi

pg_bin=${POSTLINE_PG_BIN:-}
if [ -z "$pg_bin" ]; then
  pg_bin=$(find /usr/lib/postgresql -maxdepth 3 -path '*/bin/initdb' 2>/dev/null | sort -V | tail -1)
  pg_bin=${pg_bin%/initdb}
fi
tmp_base=${TMPDIR:-/tmp}
work=$(mktemp -d "$tmp_base/postline-compare-XXXXXX")
chmod 755 "$work" # the Node stack's Postgres runs as `postgres` when we are root
out=${COMPARE_OUT:-$work/results.jsonl}
: >"$out"
clk_tck=$(getconf CLK_TCK)

# As scripts/bench.sh: the load generator is one address standing in for
# a thousand clients and sends faster than people do, so Postline's rate
# limits are lifted, and its receivers never answer pings, so the read
# timeout is an hour (the Node and socketioxide servers get the same pong wait).
for v in SEND CONVERSATION_SEND JOIN HISTORY HTTP_USER HTTP_IP UPGRADE_IP; do
  export "POSTLINE_${v}_RATE=1000000" "POSTLINE_${v}_BURST=1000000"
done
export POSTLINE_MAX_REFUSALS=1000000 POSTLINE_MAX_PENDING_PER_IP=1000000
export POSTLINE_WS_READ_TIMEOUT_MS=3600000 COMPARE_WS_READ_TIMEOUT_MS=3600000

# ------------------------------------------------- starting and stopping
# What the running system is: its address, the application's pids (the first
# one is passed to postline-bench), the other processes whose CPU counts
# (Redis, the postmaster), the postmaster (its children count too), and
# what to stop and remove afterwards.
addr="" app_pids="" other_pids="" postmaster="" stop_pids="" pg_dir="" redis_dir=""
sampler=""

free_port() {
  node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}

wait_up() {
  for _ in $(seq 1 300); do
    curl -sf "http://$1/healthz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server on $1 did not come up" >&2
  return 1
}

# A throwaway cluster as src/pglocal.rs makes it (as root, run as `postgres`).
start_postgres() {
  pg_dir=$(mktemp -d "$work/pg-XXXXXX")
  local as=()
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres:postgres "$pg_dir"
    as=(runuser -u postgres --)
  fi
  "${as[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -A trust -U postgres --no-sync -E UTF8 --locale=C >/dev/null
  local port
  port=$(free_port)
  "${as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w -t 60 \
    -o "-p $port -k $pg_dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=400 -c synchronous_commit=on" \
    start >/dev/null
  postmaster=$(head -1 "$pg_dir/data/postmaster.pid")
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
}

start_redis() {
  redis_dir=$(mktemp -d "$work/redis-XXXXXX")
  local port
  port=$(free_port)
  redis-server --bind 127.0.0.1 --port "$port" --dir "$redis_dir" --save "" \
    --appendonly yes --appendfsync no --daemonize no --logfile "$redis_dir/redis.log" &
  local pid=$!
  for _ in $(seq 1 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  other_pids="$other_pids $pid"
  stop_pids="$stop_pids $pid"
  export REDIS_URL="redis://127.0.0.1:$port"
}

start_system() {
  local port
  port=$(free_port)
  addr=127.0.0.1:$port
  app_pids="" other_pids="" postmaster="" stop_pids="" pg_dir="" redis_dir=""
  case "$1" in
    postline | postline-no-worker)
      local flags=(serve --dev)
      [ "$1" = postline-no-worker ] && flags+=(--no-worker)
      RUST_LOG=warn POSTLINE_LISTEN=$addr "$postline" "${flags[@]}" >>"$work/$1.log" 2>&1 &
      app_pids=$!
      stop_pids=$app_pids
      wait_up "$addr"
      # serve --dev's cluster lives in $TMPDIR/postline-pg-<its pid>-<nanos>/.
      local pidfile
      pidfile=$(compgen -G "$tmp_base/postline-pg-$app_pids-*/data/postmaster.pid" | head -1 || true)
      if [ -z "$pidfile" ]; then
        echo "no $tmp_base/postline-pg-$app_pids-*/data/postmaster.pid: cannot count serve --dev's Postgres" >&2
        return 1
      fi
      postmaster=$(head -1 "$pidfile")
      other_pids=$postmaster
      ;;
    node-bullmq)
      start_postgres
      other_pids=$postmaster
      start_redis
      node bench/compare/server.mjs --port "$port" --persist >>"$work/$1.log" 2>&1 &
      app_pids=$!
      wait_up "$addr"
      node bench/compare/server.mjs --worker >>"$work/$1.log" 2>&1 &
      app_pids="$app_pids $!"
      stop_pids="$app_pids $stop_pids"
      sleep 0.5
      ;;
    node)
      node bench/compare/server.mjs --port "$port" >>"$work/$1.log" 2>&1 &
      app_pids=$!
      stop_pids=$app_pids
      wait_up "$addr"
      ;;
    socketioxide)
      "$sioxide" --port "$port" >>"$work/$1.log" 2>&1 &
      app_pids=$!
      stop_pids=$app_pids
      wait_up "$addr"
      ;;
  esac
}

stop_system() {
  local p
  for p in $stop_pids; do kill -TERM "$p" 2>/dev/null || true; done
  for p in $stop_pids; do wait "$p" 2>/dev/null || true; done
  if [ -n "$pg_dir" ]; then
    local as=()
    [ "$(id -u)" -eq 0 ] && as=(runuser -u postgres --)
    "${as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$pg_dir"
  fi
  if [ -n "$redis_dir" ]; then rm -rf "$redis_dir"; fi
  stop_pids="" pg_dir="" redis_dir=""
  unset DATABASE_URL REDIS_URL
}

stop_sampler() {
  if [ -n "$sampler" ]; then
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    sampler=""
  fi
}

cleanup() {
  stop_sampler
  stop_system
  if [ -n "${COMPARE_KEEP:-}" ]; then
    echo "kept $work" >&2
  elif [ -z "${COMPARE_OUT:-}" ]; then rm -rf "$work"; else
    find "$work" -mindepth 1 -maxdepth 1 ! -name results.jsonl -exec rm -rf {} +
    rmdir "$work" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ----------------------------------------------------------------- CPU
# One line: <time> <ticks of the application> <ticks of everything counted>.
# Roots count their reaped children too (cutime+cstime); the postmaster's
# live children (backends, background workers) are added.
cpu_sample() {
  local kids="" files=() p
  [ -n "$postmaster" ] && kids=$(cat /proc/"$postmaster"/task/*/children 2>/dev/null || true)
  for p in $app_pids $other_pids $kids; do files+=("/proc/$p/stat"); done
  local t
  t=$(date +%s.%N)
  { cat "${files[@]}" 2>/dev/null || true; } | awk -v t="$t" -v app=" $app_pids " -v roots=" $app_pids $other_pids " '
    { pid = $1; sub(/^.*\) /, ""); ticks = $12 + $13
      if (index(roots, " " pid " ")) ticks += $14 + $15
      all += ticks; if (index(app, " " pid " ")) mine += ticks }
    END { printf "%s %d %d\n", t, mine, all }'
}

start_sampler() {
  (
    trap 'exit 0' TERM
    while :; do
      cpu_sample
      sleep 0.25
    done
  ) >"$1" &
  sampler=$!
}

# Cores over [end - duration, end], end = 0.6 s before the bench exited:
# "<app cores> <total cores>".
window_cores() {
  awk -v stop="$2" -v d="$duration" -v hz="$clk_tck" '
    { t[NR] = $1; a[NR] = $2; b[NR] = $3 }
    END {
      e = stop - 0.6; s = e - d; i = 0; j = 0
      for (k = 1; k <= NR; k++) { if (!i && t[k] >= s) i = k; if (t[k] <= e) j = k }
      if (!i || j <= i) { print "null null"; exit }
      span = t[j] - t[i]
      printf "%.3f %.3f\n", (a[j] - a[i]) / hz / span, (b[j] - b[i]) / hz / span
    }' "$1"
}

# ------------------------------------------------------------------ runs
describe() {
  echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), Linux $(uname -r)"
  echo "versions: postline $("$postline" --version 2>/dev/null | awk '{print $2}') ($postline; tree $(git rev-parse --short HEAD 2>/dev/null || echo '?')), node $(node --version), redis $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p'), postgres $("$pg_bin/postgres" --version | awk '{print $3}'), $(cd bench/compare && node -e 'console.log(["socket.io","bullmq","ioredis","pg"].map((p) => p + " " + require("./node_modules/" + p + "/package.json").version).join(", "))'), socketioxide $(awk '/^name = "socketioxide"$/ { getline; gsub(/"/, "", $3); print $3 }' "$sioxide_dir/Cargo.lock")"
}

echo "compare: ${system_list[*]}; $runs runs each, interleaved; $connections connections, $conversations conversations, 1 sender each at $rate msg/s, $payload B, ${duration} s after ${warmup} s warm-up" >&2
n=${#system_list[@]}
for run in $(seq 1 "$runs"); do
  for k in $(seq 0 $((n - 1))); do
    # Each run starts one system later, so no system always goes first.
    sys=${system_list[$(((k + run - 1) % n))]}
    start_system "$sys"
    samples="$work/cpu-$sys-$run.txt"
    start_sampler "$samples"
    set +e
    line=$("$bench" --addr "$addr" --socketio --server-pid "${app_pids%% *}" \
      --connections "$connections" --conversations "$conversations" --senders-per-conversation 1 \
      --rate "$rate" --payload "$payload" --duration "$duration" --warmup "$warmup" --json \
      "${extra[@]}" 2>"$work/bench.err" | grep '^{' | tail -1)
    status=$?
    set -e
    ended=$(date +%s.%N)
    stop_sampler
    read -r cores_app cores_all < <(window_cores "$samples" "$ended")
    stop_system
    if [ -z "$line" ]; then
      echo "run $run $sys: postline-bench failed (exit $status): $(tail -3 "$work/bench.err")" >&2
      line=null
    fi
    echo "{\"system\":\"$sys\",\"run\":$run,\"cores_server\":$cores_app,\"cores_total\":$cores_all,\"bench\":$line}" >>"$out"
    echo "run $run $sys: $(node bench/compare/report.mjs --line "$out")" >&2
  done
done

describe
node bench/compare/report.mjs "$out"
