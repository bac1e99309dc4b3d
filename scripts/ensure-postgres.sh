#!/usr/bin/env bash
# Make sure PostgreSQL server binaries exist under /usr/lib/postgresql/*/bin
# (the throwaway clusters of `serve --dev` and of the tests need initdb and
# pg_ctl). Installs Debian's postgresql package when they are absent.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || [ -n "${POSTLINE_PG_BIN:-}" ]; then
  exit 0
fi
echo "PostgreSQL server binaries not found; installing the postgresql package" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
# Debian's package starts a system cluster; Postline does not use it.
$SUDO service postgresql stop >/dev/null 2>&1 || true
