#!/usr/bin/env bash
# What the browser tests (tests/browser/) need: Debian's chromium, driven
# through playwright-core (no browser download), and that package from npm.
# Installs chromium with apt-get when /usr/bin/chromium (or $CHROMIUM) is
# missing, and runs `npm ci` when tests/browser/node_modules is. Idempotent;
# safe to run in the background next to cargo: it touches neither target/
# nor anything cargo reads, runs at low priority, and waits for apt's lock
# (scripts/ensure-postgres.sh may hold it) instead of failing.
set -euo pipefail
cd "$(dirname "$0")/.."

chromium=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$chromium" ]; then
  echo "browser-setup: $chromium not found; installing Debian's chromium package" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "browser-setup: run as root, or install chromium" >&2; exit 1; }
    SUDO="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  lock=(-o DPkg::Lock::Timeout=600)
  nice -n 10 $SUDO apt-get "${lock[@]}" update -qq
  nice -n 10 $SUDO apt-get "${lock[@]}" install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
fi
"$chromium" --version >/dev/null 2>&1 || { echo "browser-setup: $chromium does not run" >&2; exit 1; }

command -v node >/dev/null || { echo "browser-setup: node (>= 20) is required" >&2; exit 1; }
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
  echo "browser-setup: node >= 20 is required (playwright-core), found $(node --version)" >&2
  exit 1
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  nice -n 10 npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
fi
echo "browser-setup: ready ($("$chromium" --version 2>/dev/null | head -1), node $(node --version))"
