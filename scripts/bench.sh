#!/usr/bin/env bash
# Run one benchmark scenario of BENCHMARKS.md against a release build:
#   scripts/bench.sh S1|S2|S3|S4|S5|S6|SQL [extra postline-bench flags]
#   scripts/bench.sh compare [flags]   (scripts/compare.sh: S1 against Node + Socket.IO + BullMQ)
# S1-S3 start `postline serve --dev` (a throwaway local Postgres, fsync off:
# they measure the gateway, not the disk); S4 starts its own cluster with
# fsync on; S5 restarts the server against a ready database.
set -euo pipefail
cd "$(dirname "$0")/.."
# S1 beside the original design's stack (Node + Socket.IO + BullMQ/Redis):
# its own script, which builds what it runs and sets up its own servers.
if [ "${1:-}" = compare ]; then
  shift
  exec bash scripts/compare.sh "$@"
fi
bash scripts/ensure-postgres.sh
# The server and the load generator (its own crate in bench/; one target dir).
cargo build --release --locked -p postline -p postline-bench >&2
scenario=${1:?usage: scripts/bench.sh S1|S2|S3|S4|S5|S6 [postline-bench flags]}
shift
bench=./target/release/postline-bench
port=${POSTLINE_BENCH_PORT:-18090}
# The load generator opens thousands of connections from one address and
# sends far faster than people do: lift the rate limits for the servers it
# measures (the limiter's own cost is `cargo bench --bench hot_paths -- limits`).
for v in SEND CONVERSATION_SEND JOIN HISTORY HTTP_USER HTTP_IP UPGRADE_IP; do
  export "POSTLINE_${v}_RATE=1000000" "POSTLINE_${v}_BURST=1000000"
done
export POSTLINE_MAX_REFUSALS=1000000
addr=127.0.0.1:$port

wait_up() {
  for _ in $(seq 1 300); do
    curl -sf "http://$1/healthz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server on $1 did not come up" >&2
  exit 1
}
# The load generator is one or four addresses standing in for thousands of
# clients, connecting hundreds at once: the per-address allowance for
# connections without a token yet is lifted. Its receivers never answer
# pings (they only read), so the WebSocket read timeout is an hour.
export POSTLINE_MAX_PENDING_PER_IP=1000000
export POSTLINE_WS_READ_TIMEOUT_MS=3600000
start_server() {
  log=$(mktemp)
  RUST_LOG=info POSTLINE_LISTEN=$addr ./target/release/postline serve --dev >"$log" 2>&1 &
  server=$!
  wait_up "$addr"
}
second=""
stop_server() {
  [ -n "$second" ] && kill -TERM "$second" 2>/dev/null && wait "$second" 2>/dev/null
  kill -TERM "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
}
trap stop_server EXIT

case "$scenario" in
  S1)
    start_server
    $bench --addr "$addr" --server-pid "$server" --connections 1000 --conversations 100 \
      --senders-per-conversation 1 --rate 10 --payload 64 --duration 60 --warmup 5 "$@"
    ;;
  S2)
    start_server
    # Conversations of 100; raise --rate until p99 passes 10 ms.
    $bench --addr "$addr" --server-pid "$server" --connections 10000 --conversations 100 \
      --senders-per-conversation 1 --rate "${RATE:-20}" --payload 64 --duration 20 --warmup 5 \
      --connect-concurrency 512 "$@"
    ;;
  S3)
    start_server
    # Idle connections; the per-process open-file limit (ulimit -n) bounds N.
    $bench --addr "$addr" --server-pid "$server" --connections "${CONNECTIONS:-19000}" \
      --conversations "${CONVERSATIONS:-190}" --rate 0 --duration 5 --warmup 1 \
      --connect-concurrency 512 --source-ips 4 "$@"
    ;;
  S6)
    # Two gateways on one Postgres: senders on the first, receivers spread
    # over both; latency reported for same-gateway and cross-gateway deliveries.
    start_server
    url=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -o 'postgres://[^ "]*' | head -1)
    addr2=127.0.0.1:$((port + 1))
    RUST_LOG=warn DATABASE_URL=$url POSTLINE_LISTEN=$addr2 ./target/release/postline serve --dev --no-worker --no-migrate &
    second=$!
    wait_up "$addr2"
    $bench --addr "$addr" --also "$addr2" --connections 1000 --conversations 100 \
      --senders-per-conversation 1 --rate 10 --payload 64 --duration "${DURATION:-30}" --warmup 5 "$@"
    ;;
  SQL)
    # Publish from SQL: commit -> new_message / message_persisted on a member's socket.
    start_server
    url=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -o 'postgres://[^ "]*' | head -1)
    $bench --addr "$addr" --database-url "$url" --connections 1 --conversations 1 \
      --sql-publish "${PUBLISHES:-500}" "$@"
    ;;
  S4)
    trap - EXIT
    $bench --persist-jobs "${JOBS:-100000}" --conversations 100 --workers "${WORKERS:-1}" "$@"
    ;;
  S5)
    trap - EXIT
    $bench --cold-start "${RUNS:-9}" "$@"
    ;;
  *)
    echo "unknown scenario $scenario (S1..S6)" >&2
    exit 2
    ;;
esac
