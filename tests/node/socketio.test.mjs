// A Socket.IO v4 front-end, unchanged: the real socket.io-client (pinned in
// package.json) against /socket.io/ of the real server. Then the cases of
// the socket.io-protocol repository's own conformance suite that apply to
// the WebSocket transport, over a bare WebSocket.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { io } from 'socket.io-client';
import WebSocket from 'ws';

import { devToken, newUser, sleep, startServer, within, WAIT_MS } from './server.mjs';

let server;

before(async () => {
  server = await startServer({
    // Short pings, so the heartbeat cases run in a second, not 25.
    env: { POSTLINE_PING_INTERVAL_MS: '300', POSTLINE_WS_READ_TIMEOUT_MS: '1500' },
  });
});

after(async () => {
  await server?.stop();
});

/** A connected socket.io-client socket for `user` (auth.token, websocket only). */
function connect(user, opts = {}) {
  const socket = io(server.url, {
    transports: ['websocket'],
    auth: { token: devToken(user) },
    reconnection: false,
    ...opts,
  });
  return socket;
}

async function connected(user, opts) {
  const socket = connect(user, opts);
  await within(new Promise((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('connect_error', reject);
  }), 'connect');
  return socket;
}

/** emit with an acknowledgement; the ack's one argument. */
const call = (socket, event, data) => within(socket.emitWithAck(event, data), `ack of ${event}`);

/** The next `event` pushed to `socket` that satisfies `pred`. */
function next(socket, event, pred = () => true) {
  return within(new Promise((resolve) => {
    const handler = (data) => {
      if (pred(data)) {
        socket.off(event, handler);
        resolve(data);
      }
    };
    socket.on(event, handler);
  }), `event ${event}`);
}

async function conversationOf(owner, members) {
  const conv = await server.api(owner, 'POST', '/v1/conversations', { title: 'sio', member_ids: members });
  return conv.id;
}

describe('socket.io-client v4', () => {
  test('connects with auth.token and is greeted as on /ws', async () => {
    const user = newUser();
    const socket = connect(user);
    const hello = await next(socket, 'hello');
    assert.equal(hello.user_id, user);
    assert.ok(socket.connected);
    socket.disconnect();
  });

  test('a bad or missing token is refused with connect_error naming why', async () => {
    for (const auth of [{ token: 'not-a-jwt' }, { token: devToken(newUser(), { secret: 'another-secret-0123456789' }) }, {}]) {
      const socket = connect(newUser(), { auth });
      const err = await within(new Promise((resolve) => socket.once('connect_error', resolve)), 'connect_error');
      assert.match(err.message, /^unauthorized: /, err.message);
      assert.equal(socket.connected, false);
      socket.close();
    }
  });

  test('join, send, leave with acknowledgements; pushes in order; duplicates; errors', async () => {
    const [alice, bob] = [newUser(), newUser()];
    const conv = await conversationOf(alice, [bob]);
    const a = await connected(alice);
    const b = await connected(bob);

    const joined = await call(a, 'join_conversation', { conversation_id: conv });
    assert.equal(joined.type, 'ack');
    assert.equal(joined.conversation_id, conv);
    assert.equal(joined.last_seq, 0);
    assert.deepEqual(joined.present, [alice]);
    // Room presence, the original front-end's "user joined" notice.
    const entered = next(a, 'user_joined', (p) => p.user_id === bob);
    const bobJoined = await call(b, 'join_conversation', { conversation_id: conv });
    assert.deepEqual([...bobJoined.present].sort(), [alice, bob].sort());
    assert.equal((await entered).conversation_id, conv);

    const received = [];
    b.on('new_message', (m) => received.push(m.message.content));
    const persisted = [];
    b.on('message_persisted', (m) => persisted.push(m.seq));

    for (let i = 1; i <= 5; i++) {
      const ack = await call(a, 'send_message', { conversation_id: conv, client_message_id: `m${i}`, content: `hello ${i}` });
      assert.equal(ack.type, 'ack');
      assert.equal(ack.duplicate, false);
      assert.ok(ack.message_id);
    }
    const dup = await call(a, 'send_message', { conversation_id: conv, client_message_id: 'm1', content: 'hello 1' });
    assert.equal(dup.duplicate, true);

    await within((async () => { while (persisted.length < 5) await sleep(20); })(), 'five message_persisted');
    assert.deepEqual(received, ['hello 1', 'hello 2', 'hello 3', 'hello 4', 'hello 5']);
    assert.deepEqual(persisted, [1, 2, 3, 4, 5]);

    // Errors come back to the callback with the native error object.
    const notJoined = await call(a, 'send_message', { conversation_id: newUser(), client_message_id: 'x', content: 'x' });
    assert.equal(notJoined.type, 'error');
    assert.equal(notJoined.code, 'not_joined');
    const invalid = await call(a, 'send_message', { conversation_id: conv, client_message_id: 'y', content: '   ' });
    assert.equal(invalid.code, 'invalid');
    const unknown = await call(a, 'no_such_event', {});
    assert.equal(unknown.type, 'error');
    const notAnObject = await call(a, 'send_message', 'just text');
    assert.equal(notAnObject.code, 'bad_request');
    // An error without a callback arrives as an `error` event.
    const pushed = next(a, 'error');
    a.emit('send_message', { conversation_id: conv, client_message_id: 'z' });
    assert.equal((await pushed).code, 'invalid');

    const gone = next(b, 'user_left', (p) => p.user_id === alice);
    const left = await call(a, 'leave_conversation', { conversation_id: conv });
    assert.equal(left.type, 'ack');
    assert.equal((await gone).conversation_id, conv);
    const afterLeave = await call(a, 'send_message', { conversation_id: conv, client_message_id: 'late', content: 'late' });
    assert.equal(afterLeave.code, 'not_joined');
    a.disconnect();
    b.disconnect();
  });

  test('typing reaches the others; sync pages history by seq', async () => {
    const [alice, bob] = [newUser(), newUser()];
    const conv = await conversationOf(alice, [bob]);
    const a = await connected(alice);
    const b = await connected(bob);
    await call(a, 'join_conversation', { conversation_id: conv });
    await call(b, 'join_conversation', { conversation_id: conv });

    const typing = next(b, 'typing', (t) => t.user_id === alice);
    a.emit('typing', { conversation_id: conv, is_typing: true });
    const t = await typing;
    assert.equal(t.is_typing, true);
    assert.equal(t.conversation_id, conv);

    const stored = next(b, 'message_persisted', (m) => m.seq === 3);
    for (const n of [1, 2, 3]) {
      await call(a, 'send_message', { conversation_id: conv, client_message_id: `s${n}`, content: `s${n}` });
    }
    await stored;
    // Bob's second device pages what it has not seen live.
    const b2 = await connected(bob);
    const page = await call(b2, 'sync', { conversation_id: conv, after_seq: 1, limit: 10 });
    assert.equal(page.type, 'ack');
    assert.deepEqual(page.messages.map((m) => m.content), ['s2', 's3']);
    assert.deepEqual(page.messages.map((m) => m.seq), [2, 3]);
    assert.equal(page.last_seq, 3);
    a.disconnect();
    b.disconnect();
    b2.disconnect();
  });

  test('reconnects after the server drops the socket, then catches up with sync', async () => {
    const [alice, bob] = [newUser(), newUser()];
    const conv = await conversationOf(alice, [bob]);
    const a = await connected(alice);
    await call(a, 'join_conversation', { conversation_id: conv });
    const b = await connected(bob, { reconnection: true, reconnectionDelay: 100, reconnectionDelayMax: 200 });
    await call(b, 'join_conversation', { conversation_id: conv });
    await call(a, 'send_message', { conversation_id: conv, client_message_id: 'r1', content: 'before' });
    let lastSeen = (await next(b, 'message_persisted')).seq;

    // The transport breaks (as a network would): the client reconnects by itself.
    const reconnected = within(new Promise((resolve) => b.io.once('reconnect', resolve)), 'reconnect');
    b.io.engine.close();
    await call(a, 'send_message', { conversation_id: conv, client_message_id: 'r2', content: 'while away 1' });
    await call(a, 'send_message', { conversation_id: conv, client_message_id: 'r3', content: 'while away 2' });
    await reconnected;
    await call(b, 'join_conversation', { conversation_id: conv });
    // What it missed, exactly once, in seq order.
    let missed = [];
    for (let tries = 0; missed.length < 2 && tries < 50; tries++) {
      const page = await call(b, 'sync', { conversation_id: conv, after_seq: lastSeen });
      missed = page.messages.map((m) => m.content);
      if (missed.length < 2) await sleep(50);
    }
    assert.deepEqual(missed, ['while away 1', 'while away 2']);
    a.disconnect();
    b.disconnect();
  });

  test('the same rate limits as /ws: a typing flood is refused to its callback', async () => {
    const alice = newUser();
    const conv = await conversationOf(alice, []);
    const a = await connected(alice);
    await call(a, 'join_conversation', { conversation_id: conv });
    const first = await call(a, 'typing', { conversation_id: conv, is_typing: true });
    assert.equal(first.type, 'ack');
    const second = await call(a, 'typing', { conversation_id: conv, is_typing: true });
    assert.equal(second.code, 'rate_limited');
    assert.ok(second.retry_after_ms > 0);
    a.disconnect();
  });
});

// ---- socket.io-protocol's conformance cases (WebSocket transport) ----------

function raw(query = 'EIO=4&transport=websocket') {
  const ws = new WebSocket(`${server.url.replace('http', 'ws')}/socket.io/?${query}`);
  ws.on('error', () => {});
  const inbox = [];
  const waiters = [];
  ws.on('message', (data) => {
    const text = data.toString();
    const w = waiters.shift();
    if (w) w(text); else inbox.push(text);
  });
  const closed = new Promise((resolve) => ws.on('close', (code) => resolve(code)));
  return {
    ws,
    closed: () => within(closed, 'close'),
    send: (text) => ws.send(text),
    /** The next message, skipping pings unless asked for. */
    async next({ pings = false } = {}) {
      for (;;) {
        const text = inbox.length ? inbox.shift() : await within(new Promise((r) => waiters.push(r)), 'a message');
        if (pings || text !== '2') return text;
      }
    },
  };
}

async function socketIoConnection(user = newUser()) {
  const c = raw();
  await c.next(); // Engine.IO open
  c.send(`40${JSON.stringify({ token: devToken(user) })}`);
  return c;
}

describe('socket.io-protocol conformance (WebSocket transport)', () => {
  test('Engine.IO handshake: open packet with sid, no upgrades, ping settings, maxPayload', async () => {
    const c = raw();
    const open = await c.next();
    assert.ok(open.startsWith('0'));
    const value = JSON.parse(open.slice(1));
    assert.deepEqual(Object.keys(value).sort(), ['maxPayload', 'pingInterval', 'pingTimeout', 'sid', 'upgrades']);
    assert.equal(typeof value.sid, 'string');
    assert.deepEqual(value.upgrades, []);
    assert.equal(value.pingInterval, 300);
    assert.equal(value.pingTimeout, 1200);
    assert.equal(value.maxPayload, 65536);
    c.ws.close();
  });

  test('an invalid EIO or transport is refused before the upgrade', async () => {
    for (const query of ['transport=websocket', 'EIO=abc&transport=websocket', 'EIO=3&transport=websocket', 'EIO=4', 'EIO=4&transport=abc', 'EIO=4&transport=polling']) {
      const res = await fetch(`${server.url}/socket.io/?${query}`);
      assert.equal(res.status, 400, query);
      const body = await res.json();
      assert.equal(body.error.code, 'bad_request', query);
      assert.ok(body.error.message.length > 0);
      const c = raw(query);
      assert.ok(await c.closed(), query);
    }
    // Long-polling's POST: not served either.
    const post = await fetch(`${server.url}/socket.io/?EIO=4&transport=polling`, { method: 'POST', body: '1' });
    assert.equal(post.status, 405);
  });

  // The suite pings before CONNECT; here a connection must CONNECT within
  // the handshake timeout (shorter than a production ping interval), so the
  // heartbeat is checked on a connected session.
  test('heartbeat: the server pings, a client that answers stays', async () => {
    const c = await socketIoConnection();
    await c.next(); // 40
    await c.next(); // hello
    for (let i = 0; i < 3; i++) {
      assert.equal(await c.next({ pings: true }), '2');
      c.send('3');
    }
    c.ws.close();
  });

  test('heartbeat: a client that never answers is closed (no CONNECT: sooner)', async () => {
    const c = raw();
    await c.next();
    assert.ok(await c.closed());
  });

  test('Engine.IO close packet closes the session', async () => {
    const c = raw();
    await c.next();
    c.send('1');
    assert.ok(await c.closed());
  });

  test('CONNECT to the main namespace (with the auth payload) is answered with a sid', async () => {
    const c = await socketIoConnection();
    const reply = await c.next();
    assert.ok(reply.startsWith('40'), reply);
    assert.deepEqual(Object.keys(JSON.parse(reply.slice(2))), ['sid']);
    const hello = await c.next();
    assert.ok(hello.startsWith('42["hello",'), hello);
    c.ws.close();
  });

  test('CONNECT to an unknown namespace is refused, and the main one still works after', async () => {
    const c = raw();
    await c.next();
    c.send('40/random');
    assert.equal(await c.next(), '44/random,{"message":"Invalid namespace"}');
    c.send(`40${JSON.stringify({ token: devToken(newUser()) })}`);
    assert.ok((await c.next()).startsWith('40{'));
    c.ws.close();
  });

  test('an invalid handshake closes the connection', async () => {
    const c = raw();
    await c.next();
    c.send('4abc');
    assert.ok(await c.closed());
  });

  test('a plain-text event with an ack id is answered on that id', async () => {
    const c = await socketIoConnection();
    await c.next(); // 40
    await c.next(); // hello
    c.send('42456["ping",{}]');
    const reply = await c.next();
    assert.ok(reply.startsWith('43456[{"type":"ack","ref":"456"'), reply);
    c.ws.close();
  });

  for (const [what, packet] of [
    ['unknown packet type', '4abc'],
    ['invalid payload format', '42{}'],
    ['invalid ack id', '42abc["message-with-ack",1,"2",{"3":[false]}]'],
    ['binary attachments', '451-["message",{"_placeholder":true,"num":0}]'],
  ]) {
    test(`an invalid packet closes the connection (${what})`, async () => {
      const c = await socketIoConnection();
      await c.next();
      c.send(packet);
      assert.ok(await c.closed());
    });
  }

  test('DISCONNECT from the main namespace ends the connection', async () => {
    const c = await socketIoConnection();
    await c.next();
    c.send('41');
    assert.ok(await c.closed());
  });
});

// Keep node from waiting on sockets a failed test left open.
setTimeout(() => {}, WAIT_MS).unref();
