#!/usr/bin/env bash
# Run the server. Without DATABASE_URL a throwaway local Postgres is started
# (and removed at exit); without POSTLINE_JWT_SECRET the public dev secret is used.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-postgres.sh
args=(serve)
if [ -z "${POSTLINE_JWT_SECRET:-}" ] || [ -z "${DATABASE_URL:-}" ]; then
  args+=(--dev)
  # `. target/dev.env` then gives psql the throwaway database (sql/ queries).
  if [ -z "${DATABASE_URL:-}" ]; then args+=(--dev-env-file target/dev.env); fi
fi
exec cargo run --release --locked --bin postline -- "${args[@]}" "$@"
