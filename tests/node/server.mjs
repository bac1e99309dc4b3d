// Shared by the JavaScript tests: the real server binary, in --dev (so it
// starts its own throwaway Postgres and accepts tokens signed with the
// public dev secret), on a free loopback port.
//
//   const server = await startServer();   // waits for /readyz
//   const token = devToken(userId);
//   ... server.url ...
//   await server.stop();

import { spawn } from 'node:child_process';
import { createHmac, randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

/** Every wait in these tests is bounded by this. */
export const WAIT_MS = 15_000;

/** The public secret `serve --dev` accepts (src/config/mod.rs, DEV_JWT_SECRET). */
const DEV_JWT_SECRET = 'postline-dev-secret-do-not-use-in-production';

/** The server binary: POSTLINE_BIN, else the debug build in CARGO_TARGET_DIR or target/. */
export function serverBinary() {
  if (process.env.POSTLINE_BIN) return process.env.POSTLINE_BIN;
  const targetDir = process.env.CARGO_TARGET_DIR
    ? path.resolve(ROOT, process.env.CARGO_TARGET_DIR)
    : path.join(ROOT, 'target');
  return path.join(targetDir, 'debug', 'postline');
}

const b64url = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');

/** An HS256 token for `user`, signed with the dev secret (or `secret`). */
export function devToken(user, { ttlSecs = 3600, secret = DEV_JWT_SECRET } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const head = `${b64url({ alg: 'HS256', typ: 'JWT' })}.${b64url({ sub: user, iat: now, exp: now + ttlSecs })}`;
  return `${head}.${createHmac('sha256', secret).update(head).digest('base64url')}`;
}

export const newUser = () => randomUUID();

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

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** `promise`, or a rejection naming `what` after WAIT_MS. */
export function within(promise, what, ms = WAIT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

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
  // caller's environment says.
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
    /** POST /v1/... as `user`; the parsed JSON body. */
    async api(user, method, route, body) {
      const res = await fetch(`${url}${route}`, {
        method,
        headers: { authorization: `Bearer ${devToken(user)}`, 'content-type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(WAIT_MS),
      });
      const text = await res.text();
      if (!res.ok) throw new Error(`${method} ${route}: ${res.status} ${text}`);
      return text ? JSON.parse(text) : null;
    },
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
