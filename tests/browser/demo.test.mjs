// The demo client at `/`, in real headless Chromium: Alice and Bob, each in
// a browser context of their own, chat through one real server. Steps run
// in order and build on each other; every wait is bounded (WAIT_MS).

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { launchChromium, newPerson, screenshotPath, startServer } from './server.mjs';

let server;
let browser;
let alice;
let bob;

/** A service key, so a test can post as the application does (docs/INTEGRATION.md). */
const SERVICE_KEY = 'browser-tests-service-key-0123';

before(async () => {
  server = await startServer({ env: { POSTLINE_SERVICE_KEYS: `app=${SERVICE_KEY}` } });
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  const result = await server?.stop();
  if (process.env.SHOW_SERVER_LOG === '1' && server) console.log(server.log());
  return result;
});

/** Sign in as a demo user and wait until the socket says hello. */
async function signIn(who) {
  const person = await newPerson(browser);
  await person.page.goto(server.url);
  await person.page.getByTestId(`pick-user-${who}`).click();
  await person.page.locator('[data-testid="conn-status"][data-state="online"]').waitFor();
  return person;
}

const message = (page, text) => page.locator('[data-testid="message"]', {
  has: page.locator('[data-testid="message-content"]', { hasText: text }),
});

async function openConversation(page, title) {
  await page.locator(`[data-testid="conversation-item"][data-title="${title}"]`).click();
  await page.locator('#chat-pane[data-joined="true"]').waitFor();
}

async function sendText(page, text) {
  await page.getByTestId('composer-input').fill(text);
  await page.getByTestId('composer-input').press('Enter');
}

/** Contents and seqs of the messages `page` shows, in page order. */
function shown(page) {
  return page.locator('[data-testid="message"]').evaluateAll((items) => items.map((li) => ({
    text: li.querySelector('[data-testid="message-content"]').textContent,
    seq: Number(li.dataset.seq) || null,
  })));
}

test('the page is served with the demo users to pick from', async () => {
  const res = await fetch(server.url);
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-security-policy'), /default-src 'none'/);
  alice = await signIn('alice');
  bob = await signIn('bob');
  assert.equal(await alice.page.getByTestId('me-name').textContent(), 'Alice');
  assert.equal(await bob.page.getByTestId('me-name').textContent(), 'Bob');
});

test('Alice starts a conversation with Bob; he finds it with an unread badge', async () => {
  const { page } = alice;
  await page.getByTestId('new-conversation').click();
  await page.getByTestId('new-conv-title').fill('Lunch plans');
  await page.getByTestId('new-conv-member-bob').check();
  await page.getByTestId('new-conv-create').click();
  await page.locator('#chat-pane[data-joined="true"]').waitFor();
  assert.equal(await page.getByTestId('chat-title').textContent(), 'Lunch plans');
  await sendText(page, 'Hi Bob!');
  // Stored: two grey ticks (Bob has not read it yet).
  await message(page, 'Hi Bob!').and(page.locator('[data-status="persisted"], [data-status="delivered"]')).waitFor();

  // Bob's list is refreshed every few seconds: the conversation appears,
  // with one unread message.
  const item = bob.page.locator('[data-testid="conversation-item"][data-title="Lunch plans"]');
  await item.locator('[data-testid="unread-badge"]', { hasText: '1' }).waitFor();
});

test('Bob opens it and reads: Alice sees blue ticks, and his badge is gone', async () => {
  await openConversation(bob.page, 'Lunch plans');
  await message(bob.page, 'Hi Bob!').waitFor();
  await message(alice.page, 'Hi Bob!').and(alice.page.locator('[data-status="read"]')).waitFor();
  const item = bob.page.locator('[data-testid="conversation-item"][data-title="Lunch plans"]');
  await item.locator('[data-testid="unread-badge"]').waitFor({ state: 'detached' });
  // Both see each other online.
  await alice.page.locator('[data-testid="presence-dot"][data-status="online"]').nth(1).waitFor();
});

test('Alice types: Bob sees "Alice is typing…"; she sends: he sees it once', async () => {
  await alice.page.getByTestId('composer-input').pressSequentially('Noon at the usual place?', { delay: 10 });
  await bob.page.getByTestId('typing-indicator').filter({ hasText: 'Alice is typing…' }).waitFor();
  await alice.page.getByTestId('composer-input').press('Enter');
  await message(bob.page, 'Noon at the usual place?').waitFor();
  // A new message from Alice ends her indicator.
  await bob.page.locator('[data-testid="typing-indicator"][data-active="false"]').waitFor();
  await message(alice.page, 'Noon at the usual place?').and(alice.page.locator('[data-status="read"]')).waitFor();
  assert.equal(await message(bob.page, 'Noon at the usual place?').count(), 1);
});

test('Alice edits her message: Bob sees the new text, marked edited', async () => {
  const mine = message(alice.page, 'Noon at the usual place?');
  await mine.hover();
  await mine.getByTestId('message-edit').click();
  await alice.page.getByTestId('edit-banner').waitFor();
  await sendText(alice.page, 'Noon at the usual place? Or 12:30?');
  const edited = message(bob.page, 'Noon at the usual place? Or 12:30?');
  await edited.getByTestId('message-edited').waitFor();
  assert.equal(await message(bob.page, 'Noon at the usual place?').count(), 1, 'edited in place, not added');
});

test('Bob goes offline while Alice sends two messages: back online, he sees both once, in seq order', async () => {
  await bob.context.setOffline(true);
  await bob.page.locator('[data-testid="conn-status"][data-state="offline"]').waitFor();
  await sendText(alice.page, 'First, while you were away');
  await sendText(alice.page, 'Second, while you were away');
  // Both stored before Bob comes back, so only sync can bring them.
  for (const text of ['First, while you were away', 'Second, while you were away']) {
    await message(alice.page, text).and(alice.page.locator('[data-seq]:not([data-seq=""])')).waitFor();
  }
  assert.equal(await message(bob.page, 'while you were away').count(), 0, 'nothing reached Bob offline');

  await bob.context.setOffline(false);
  await bob.page.locator('[data-testid="conn-status"][data-state="online"]').waitFor();
  await message(bob.page, 'Second, while you were away').waitFor();
  const messages = await shown(bob.page);
  const texts = messages.map((m) => m.text);
  assert.deepEqual(texts, [
    'Hi Bob!',
    'Noon at the usual place? Or 12:30?',
    'First, while you were away',
    'Second, while you were away',
  ]);
  const seqs = messages.map((m) => m.seq);
  assert.deepEqual(seqs, [1, 2, 3, 4], 'each once, in seq order');
  // And reading them turns Alice's ticks blue again.
  await message(alice.page, 'Second, while you were away').and(alice.page.locator('[data-status="read"]')).waitFor();
});

test('a system message posted by the application shows as a notice, not a bubble', async () => {
  const item = bob.page.locator('[data-testid="conversation-item"][data-title="Lunch plans"]');
  const conv = await item.getAttribute('data-conversation-id');
  const res = await fetch(`${server.url}/v1/service/conversations/${conv}/messages`, {
    method: 'POST',
    headers: {
      authorization: `Bearer ${SERVICE_KEY}`,
      'idempotency-key': 'lunch-reminder',
      'content-type': 'application/json',
    },
    body: JSON.stringify({ sender_id: '00000000-0000-0000-0000-00000000b071', content: 'Reminder: the table is booked for 12:30' }),
  });
  assert.equal(res.status, 201, await res.text());
  for (const page of [alice.page, bob.page]) {
    const notice = page.locator('[data-testid="message"][data-kind="system"]', { hasText: 'table is booked' });
    await notice.waitFor();
    assert.equal(await notice.locator('.bubble').count(), 0, 'a notice, not a bubble');
  }
});

test('screenshots of the demo (docs/img with UPDATE_SCREENSHOTS=1)', async () => {
  // A second conversation, so the sidebar shows an unread badge for Bob.
  await alice.page.getByTestId('new-conversation').click();
  await alice.page.getByTestId('new-conv-title').fill('Weekend hike');
  await alice.page.getByTestId('new-conv-member-bob').check();
  await alice.page.getByTestId('new-conv-member-carol').check();
  await alice.page.getByTestId('new-conv-create').click();
  await alice.page.locator('#chat-pane[data-joined="true"]').waitFor();
  await sendText(alice.page, 'Who is in for Saturday?');
  await bob.page.locator('[data-testid="conversation-item"][data-title="Weekend hike"] [data-testid="unread-badge"]').waitFor();
  await openConversation(alice.page, 'Lunch plans');
  await sendText(bob.page, '12:30 works, see you there!');
  await message(alice.page, '12:30 works').waitFor();
  // Bob starts typing again, so Alice's picture shows the indicator.
  await bob.page.getByTestId('composer-input').pressSequentially('Shall I book', { delay: 10 });
  await alice.page.getByTestId('typing-indicator').filter({ hasText: 'Bob is typing…' }).waitFor();
  await alice.page.screenshot({ path: screenshotPath('demo-alice.png') });
  await bob.page.screenshot({ path: screenshotPath('demo-bob.png') });
  assert.deepEqual(alice.errors, [], 'no script errors on Alice\'s page');
  assert.deepEqual(bob.errors, [], 'no script errors on Bob\'s page');
});

test('the live dashboard shows this run: connections, messages, latency plots (docs/img with UPDATE_SCREENSHOTS=1)', async () => {
  const operator = await newPerson(browser);
  // --dev without POSTLINE_OPERATOR_TOKEN: the stats are open.
  await operator.page.goto(`${server.url}/dashboard`);
  await operator.page.locator('body[data-ready="1"]').waitFor();
  // Alice's and Bob's sockets are open; the chat above sent messages.
  const connections = Number(await operator.page.locator('#connections').textContent());
  assert.ok(connections >= 2, `connections ${connections}`);
  const total = Number((await operator.page.locator('#messages-total').textContent()).replace(/\D/g, ''));
  assert.ok(total >= 6, `messages total ${total}`);
  // A few more messages while it watches, so the plots have a shape.
  for (const text of ['one more', 'and another', 'last one']) {
    await sendText(alice.page, text);
    await message(bob.page, text).waitFor();
  }
  await operator.page.waitForTimeout(3000);
  for (const id of ['plot-messages', 'plot-send-latency', 'plot-persist-latency', 'plot-queues']) {
    assert.equal(await operator.page.locator(`#${id}`).count(), 1, id);
  }
  assert.notEqual((await operator.page.locator('#send-p50').textContent()).trim(), '');
  await operator.page.screenshot({ path: screenshotPath('dashboard.png'), fullPage: true });
  assert.deepEqual(operator.errors, [], 'no script errors on the dashboard');
  await operator.context.close();
});
