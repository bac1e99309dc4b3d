#!/usr/bin/env bash
# The whole test suite, over the whole workspace (the server and bench/):
# formatting, lints (clippy --all-targets type-checks the criterion benches
# too, without the release build `cargo bench` would add), then unit and
# integration tests (the integration tests start their own throwaway
# Postgres cluster), then the JavaScript tests against the server binary the
# cargo tests built: real clients (tests/node/: socket.io-client) and the
# browser tests (tests/browser/: the demo client in headless Chromium).
# Ends with one line: "tests: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-postgres.sh
# A fresh clone (CI) compiles everything once: incremental caches would
# only be written, never read.
if [ -n "${CI:-}" ]; then
  export CARGO_INCREMENTAL=0
  # rustup ships LLVM's lld beside rustc; it links the test binaries in a
  # fraction of GNU ld's time. Only on CI: a local target dir built without
  # these flags would be rebuilt whole.
  gcc_ld="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/gcc-ld"
  if [ -x "$gcc_ld/ld.lld" ]; then
    export RUSTFLAGS="${RUSTFLAGS:-} -Clink-arg=-fuse-ld=lld -Clink-arg=-B$gcc_ld"
  fi
fi
log=$(mktemp)
browser_log=$(mktemp)
setup_log=$(mktemp)
# Chromium and playwright-core are fetched while cargo compiles (network and
# disk, not CPU); waited for after the cargo tests.
bash scripts/browser-setup.sh >"$setup_log" 2>&1 &
setup_pid=$!
trap 'kill "$setup_pid" 2>/dev/null || true; rm -f "$log" "$browser_log" "$setup_log"' EXIT
cargo fmt --all -- --check
# --no-default-features: without the `jemalloc` feature (the shipped
# binary's allocator, Cargo.toml), whose C build was 163 s of a clean
# 2-core run on the way to every test binary. The code tested is the same.
# Clippy is rustc with more lints, so the workspace's own crates are compiled
# once through clippy-driver (what `cargo clippy` itself sets up, with the
# same -D warnings) into the test binaries: `cargo clippy` then `cargo test`
# compiled every dependency twice, once to check and once to build, the
# larger part of a clean run on 2 cores.
if clippy_driver=$(command -v clippy-driver); then
  export RUSTC_WORKSPACE_WRAPPER="$clippy_driver"
  export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
  cargo test --locked --workspace --no-default-features --all-targets --no-run
else
  cargo clippy --locked --workspace --no-default-features --all-targets -- -D warnings
fi
cargo test --locked --workspace --no-default-features --lib --bins --tests 2>&1 | tee "$log"
# Real JavaScript clients (socket.io-client) against the debug binary that
# cargo test just built.
npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
node --test --test-concurrency=1 --test-reporter=tap tests/node/ 2>&1 | tee -a "$log"
if ! wait "$setup_pid"; then
  cat "$setup_log" >&2
  echo "the browser tests' setup failed (scripts/browser-setup.sh)" >&2
  exit 1
fi
browser_status=0
node --test --test-reporter=tap --test-concurrency=1 tests/browser/ 2>&1 | tee "$browser_log" ||
  browser_status=$?
# cargo prints "test result: ok. P passed; F failed; ..." per test binary;
# node's TAP reporter ends with "# pass P" and "# fail F".
awk '
  /^test result:/ { p += $4; f += $6 }
  /^# pass / { p += $3 }
  /^# fail / { f += $3 }
  FILENAME == ARGV[2] && /^# pass / { browser = 1 }
  END {
    if (!browser) f += 1   # the browser tests did not report: count it as a failure
    printf "tests: %d passed, %d failed\n", p, f
  }' "$log" "$browser_log"
if [ "$browser_status" -ne 0 ]; then
  echo "browser tests failed (tests/browser/)" >&2
  exit 1
fi
