// Shared by every browser test: the real server binary, in --dev (so it
// starts its own throwaway Postgres), on a free loopback port; and headless
// Chromium, Debian's, through playwright-core (no browser download).
//
//   const server = await startServer();   // waits for /readyz
//   const browser = await launchChromium();
//   ... server.url ...
//   await browser.close(); await server.stop();

import { spawn } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

/** Every wait in these tests is bounded by this. */
export const WAIT_MS = 15_000;

/** The browser window: what the README's screenshots show. */
export const VIEWPORT = { width: 1200, height: 750 };

/** The server binary: POSTLINE_BIN, else the debug build in CARGO_TARGET_DIR or target/. */
export function serverBinary() {
  if (process.env.POSTLINE_BIN) return process.env.POSTLINE_BIN;
  const targetDir = process.env.CARGO_TARGET_DIR
    ? path.resolve(ROOT, process.env.CARGO_TARGET_DIR)
    : path.join(ROOT, 'target');
  return path.join(targetDir, 'debug', 'postline');
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Children still running when node exits (a failed assertion, ^C) are
// killed, so no server or Postgres is left behind.
const children = new Set();
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => process.exit(130));
}

/**
 * Start `postline serve --dev` and wait until /readyz answers 200.
 * `env`: extra environment for the server. Returns { url, stop, log }.
 */
export async function startServer({ env = {}, args = [], readyWithinMs = 60_000 } = {}) {
  const bin = serverBinary();
  if (!existsSync(bin)) {
    throw new Error(`no server binary at ${bin}: run cargo build (or set POSTLINE_BIN)`);
  }
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  // Its own throwaway database and the public dev secret, whatever the
  // caller's environment says: the demo users' sign-in exists only then.
  const base = { ...process.env };
  delete base.DATABASE_URL;
  delete base.POSTLINE_JWT_SECRET;
  const child = spawn(bin, ['serve', '--dev', ...args], {
    cwd: ROOT,
    env: {
      ...base,
      POSTLINE_LISTEN: `127.0.0.1:${port}`,
      RUST_LOG: process.env.RUST_LOG || 'warn',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.add(child);
  let log = '';
  const keep = (chunk) => {
    log += chunk;
    if (log.length > 200_000) log = log.slice(-100_000);
  };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => {
    children.delete(child);
    resolve({ code, signal });
  }));

  const deadline = Date.now() + readyWithinMs;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`the server exited before it was ready:\n${log}`);
    }
    try {
      const res = await fetch(`${url}/readyz`, { signal: AbortSignal.timeout(2000) });
      if (res.status === 200) break;
    } catch (_) { /* not listening yet */ }
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`the server was not ready within ${readyWithinMs} ms:\n${log}`);
    }
    await sleep(100);
  }

  return {
    url,
    log: () => log,
    /** SIGTERM (a clean shutdown removes the throwaway Postgres), SIGKILL after 15 s. */
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return exited;
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), WAIT_MS);
      const result = await exited;
      clearTimeout(timer);
      return result;
    },
  };
}

/** Headless Chromium: CHROMIUM, else Debian's /usr/bin/chromium. */
export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox'],
    timeout: WAIT_MS,
  });
}

/** A fresh browser context (its own storage: one person) with bounded waits. */
export async function newPerson(browser) {
  const context = await browser.newContext({ viewport: VIEWPORT });
  context.setDefaultTimeout(WAIT_MS);
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e));
  return { context, page, errors };
}

/**
 * Where a screenshot goes: docs/img/<name> with UPDATE_SCREENSHOTS=1 (the
 * README's pictures), else a temporary directory, so a test run leaves the
 * tree clean.
 */
export function screenshotPath(name) {
  const dir = process.env.UPDATE_SCREENSHOTS === '1'
    ? path.join(ROOT, 'docs', 'img')
    : path.join(process.env.TMPDIR || '/tmp', 'postline-screenshots');
  mkdirSync(dir, { recursive: true });
  return path.join(dir, name);
}
