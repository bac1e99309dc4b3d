#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests (the
# integration tests start their own throwaway Postgres cluster), and a build
# of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-postgres.sh
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
cargo bench --locked --no-run
