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
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
