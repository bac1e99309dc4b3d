// Shared by every browser test: the real server binary, in --dev (so it
// starts its own throwaway Postgres and offers the demo users), on a free
// loopback port; and headless Chromium, Debian's, through playwright-core
// (no browser download).
//
//   const server = await startServer();   // waits for /readyz
//   const browser = await launchChromium();
//   ... server.url ...
//   await browser.close(); await server.stop();

import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

import { ROOT, WAIT_MS } from '../node/server.mjs';

// The server side is the JavaScript tests' own helper (node built-ins only,
// so it needs nothing from tests/node's node_modules).
export { ROOT, WAIT_MS, serverBinary, sleep, startServer, within } from '../node/server.mjs';

/** The browser window: what the README's screenshots show. */
export const VIEWPORT = { width: 1200, height: 750 };

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
