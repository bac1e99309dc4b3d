#!/usr/bin/env bash
# The whole test suite, over the whole workspace (the server and bench/):
# formatting, lints (clippy --all-targets type-checks the criterion benches
# too, without the release build `cargo bench` would add), then unit and
# integration tests (the integration tests start their own throwaway
# Postgres cluster). Ends with one line: "tests: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-postgres.sh
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked --workspace --lib --bins --tests 2>&1 | tee "$log"
# Real JavaScript clients (socket.io-client) against the debug binary that
# cargo test just built.
npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
node --test --test-concurrency=1 --test-reporter=tap tests/node/ 2>&1 | tee -a "$log"
awk '/^test result:/ { p += $4; f += $6 }
     /^# pass / { p += $3 } /^# fail / { f += $3 }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
