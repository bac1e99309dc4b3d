// The original design's stack, for `scripts/bench.sh compare`: a Node
// Socket.IO v4 chat server that speaks the subset of Postline's protocol
// `postline-bench --socketio` uses, so the same load generator drives both.
//
//   node server.mjs --port P                       # broadcast only, no persistence
//   node server.mjs --port P --persist             # + enqueue each message to BullMQ (Redis)
//   node server.mjs --worker                       # the BullMQ worker: Redis -> Postgres
//
// --persist and --worker read DATABASE_URL and REDIS_URL. Tokens are HS256
// JWTs signed with POSTLINE_JWT_SECRET (default: Postline's public --dev
// secret, which postline-bench signs with by default).
//
// What it serves (docs/PROTOCOL.md, the same names and shapes):
//   GET  /healthz
//   POST /v1/conversations              {title, member_ids} -> 201 {id, ...}
//   POST /v1/conversations/:id/members  {user_id}           -> 201
//   /socket.io/ (websocket only): CONNECT with auth {token}, then `hello`;
//   join_conversation -> ack {conversation_id, last_seq};
//   send_message -> `new_message` to the room at once (sender included), then
//   the ack: at once without persistence, once the BullMQ job is in Redis with
//   it (as Postline acks once the pgmq job is committed). The worker stores
//   the message with the next per-conversation seq and PUBLISHes the fact on
//   a Redis channel; the gateway, subscribed, sends `message_persisted` to
//   the room. (BullMQ's QueueEvents would do it too, but it streams every
//   job's added/waiting/active/completed/removed events to the gateway, four
//   or five reads and parses per message where one PUBLISH is enough.)
//
// Not implemented (the benchmark does not use them): presence, typing,
// receipts, sync/history, edits, rate limits, and the gateway's in-memory
// duplicate cache (a resent client_message_id is caught by the database's
// unique constraint when stored, not before the broadcast).

import http from 'node:http';
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { Server } from 'socket.io';

const args = process.argv.slice(2);
const flag = (name) => args.includes(name);
const option = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt;
};

const DEV_JWT_SECRET = 'postline-dev-secret-do-not-use-in-production';
const SECRET = process.env.POSTLINE_JWT_SECRET || DEV_JWT_SECRET;
const QUEUE = 'persist';
const PERSISTED = 'postline-compare:persisted';
const MAX_CONTENT_BYTES = 4096;

// ---------------------------------------------------------------- helpers

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** A UUIDv7 (time-ordered), as Postline's gateway mints message ids. */
function uuidv7() {
  const b = randomBytes(16);
  b.writeUIntBE(Date.now(), 0, 6);
  b[6] = (b[6] & 0x0f) | 0x70;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The user id of a valid HS256 token, or null. */
function verify(token) {
  if (typeof token !== 'string') return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  const want = createHmac('sha256', SECRET).update(`${parts[0]}.${parts[1]}`).digest();
  const got = Buffer.from(parts[2], 'base64url');
  if (got.length !== want.length || !timingSafeEqual(got, want)) return null;
  try {
    const head = JSON.parse(Buffer.from(parts[0], 'base64url'));
    const claims = JSON.parse(Buffer.from(parts[1], 'base64url'));
    if (head.alg !== 'HS256') return null;
    if (typeof claims.exp !== 'number' || claims.exp * 1000 <= Date.now()) return null;
    return typeof claims.sub === 'string' && UUID_RE.test(claims.sub) ? claims.sub.toLowerCase() : null;
  } catch {
    return null;
  }
}

const err = (code, message) => ({ type: 'error', code, message });

// ------------------------------------------------------------- the schema

// The part of Postline's migrations/0001_schema.sql this server uses, so the
// worker writes the same rows into the same indexes.
const SCHEMA = `
CREATE TABLE IF NOT EXISTS conversations (
    id              uuid PRIMARY KEY,
    title           text CHECK (title IS NULL OR length(title) <= 200),
    created_by      uuid NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_message_at timestamptz,
    last_seq        bigint NOT NULL DEFAULT 0 CHECK (last_seq >= 0)
);
CREATE TABLE IF NOT EXISTS conversation_members (
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id         uuid NOT NULL,
    joined_at       timestamptz NOT NULL DEFAULT now(),
    last_read_seq   bigint NOT NULL DEFAULT 0 CHECK (last_read_seq >= 0),
    PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX IF NOT EXISTS conversation_members_user_idx ON conversation_members (user_id);
CREATE TABLE IF NOT EXISTS messages (
    id                uuid PRIMARY KEY,
    conversation_id   uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq               bigint NOT NULL CHECK (seq > 0),
    sender_id         uuid NOT NULL,
    client_message_id text NOT NULL CHECK (length(client_message_id) BETWEEN 1 AND 64),
    kind              text NOT NULL CHECK (kind IN ('text', 'image', 'file', 'system')),
    content           jsonb NOT NULL,
    created_at        timestamptz NOT NULL,
    persisted_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT messages_conversation_seq_key UNIQUE (conversation_id, seq),
    CONSTRAINT messages_client_dedup_key UNIQUE (conversation_id, sender_id, client_message_id)
);`;

// One statement, one round trip: the next seq under the conversation's row
// lock (gap-free: a duplicate takes none, and a racing duplicate fails on the
// unique key, rolls the increment back and is retried by BullMQ).
const STORE = `
WITH dup AS (
  SELECT seq FROM messages WHERE conversation_id = $2 AND sender_id = $3 AND client_message_id = $4
), s AS (
  UPDATE conversations SET last_seq = last_seq + 1, last_message_at = $7
   WHERE id = $2 AND NOT EXISTS (SELECT 1 FROM dup)
  RETURNING last_seq
)
INSERT INTO messages (id, conversation_id, seq, sender_id, client_message_id, kind, content, created_at)
SELECT $1, $2, s.last_seq, $3, $4, $5, to_jsonb($6::text), $7 FROM s
RETURNING seq`;

function redisConnection() {
  const u = new URL(process.env.REDIS_URL || 'redis://127.0.0.1:6379');
  return { host: u.hostname, port: Number(u.port || 6379), maxRetriesPerRequest: null };
}

async function pgPool(max) {
  const { default: pg } = await import('pg');
  if (!process.env.DATABASE_URL) throw new Error('DATABASE_URL is not set');
  return new pg.Pool({ connectionString: process.env.DATABASE_URL, max });
}

// ------------------------------------------------------------ the worker

async function runWorker() {
  const { Worker } = await import('bullmq');
  const { Redis } = await import('ioredis');
  const publisher = new Redis(redisConnection());
  const concurrency = Number(process.env.COMPARE_WORKER_CONCURRENCY || 8);
  const pool = await pgPool(concurrency);
  const worker = new Worker(
    QUEUE,
    async (job) => {
      const m = job.data;
      const r = await pool.query(STORE, [
        m.id, m.conversation_id, m.sender_id, m.client_message_id, m.kind, m.content, m.created_at,
      ]);
      // A duplicate is stored once: no second message_persisted.
      if (!r.rowCount) return null;
      const done = { conversation_id: m.conversation_id, message_id: m.id, seq: Number(r.rows[0].seq) };
      await publisher.publish(PERSISTED, JSON.stringify(done));
      return done;
    },
    { connection: redisConnection(), concurrency },
  );
  worker.on('failed', (job, e) => console.error(`job ${job?.id} failed: ${e.message}`));
  await worker.waitUntilReady();
  console.error(`worker: concurrency ${concurrency}`);
  const stop = async () => {
    await worker.close(true).catch(() => {});
    await pool.end().catch(() => {});
    publisher.disconnect();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

// ----------------------------------------------------------- the gateway

/** Conversations and members: in Postgres with --persist, in memory without. */
function memoryStore() {
  const members = new Map(); // conversation id -> Set of user ids
  return {
    async create(id, title, owner, memberIds) {
      members.set(id, new Set([owner, ...memberIds]));
    },
    async addMember(id, caller, user) {
      const m = members.get(id);
      if (!m) return 'not_found';
      if (!m.has(caller)) return 'forbidden';
      m.add(user);
      return null;
    },
    async lastSeqIfMember(id, user) {
      const m = members.get(id);
      if (!m) return 'not_found';
      return m.has(user) ? 0 : 'forbidden';
    },
  };
}

function pgStore(pool) {
  return {
    async create(id, title, owner, memberIds) {
      await pool.query(
        `WITH c AS (INSERT INTO conversations (id, title, created_by) VALUES ($1, $2, $3) RETURNING id)
         INSERT INTO conversation_members (conversation_id, user_id)
         SELECT c.id, u FROM c, unnest($4::uuid[]) u ON CONFLICT DO NOTHING`,
        [id, title, owner, [owner, ...memberIds]],
      );
    },
    async addMember(id, caller, user) {
      const r = await pool.query(
        `SELECT EXISTS (SELECT 1 FROM conversations WHERE id = $1) AS c,
                EXISTS (SELECT 1 FROM conversation_members WHERE conversation_id = $1 AND user_id = $2) AS m`,
        [id, caller],
      );
      if (!r.rows[0].c) return 'not_found';
      if (!r.rows[0].m) return 'forbidden';
      await pool.query(
        'INSERT INTO conversation_members (conversation_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING',
        [id, user],
      );
      return null;
    },
    async lastSeqIfMember(id, user) {
      const r = await pool.query(
        `SELECT c.last_seq, EXISTS (SELECT 1 FROM conversation_members m
                                     WHERE m.conversation_id = c.id AND m.user_id = $2) AS member
           FROM conversations c WHERE c.id = $1`,
        [id, user],
      );
      if (!r.rowCount) return 'not_found';
      return r.rows[0].member ? Number(r.rows[0].last_seq) : 'forbidden';
    },
  };
}

function readJson(req) {
  return new Promise((resolve) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      try {
        resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')));
      } catch {
        resolve(undefined);
      }
    });
  });
}

function send(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

async function runGateway() {
  const port = Number(option('--port', process.env.PORT || 18091));
  const persist = flag('--persist');
  let store = memoryStore();
  let queue = null;
  let subscriber = null;
  if (persist) {
    const { Queue } = await import('bullmq');
    const { Redis } = await import('ioredis');
    const pool = await pgPool(10);
    await pool.query(SCHEMA);
    store = pgStore(pool);
    queue = new Queue(QUEUE, { connection: redisConnection() });
    await queue.waitUntilReady();
    subscriber = new Redis(redisConnection());
    await subscriber.subscribe(PERSISTED);
  }

  const server = http.createServer(async (req, res) => {
    try {
      const url = new URL(req.url, 'http://x');
      if (req.method === 'GET' && (url.pathname === '/healthz' || url.pathname === '/readyz')) {
        res.writeHead(200, { 'content-type': 'text/plain' });
        return res.end('ok');
      }
      const m = url.pathname.match(/^\/v1\/conversations(?:\/([^/]+)\/members)?$/);
      if (!m) return send(res, 404, err('not_found', 'no such route'));
      if (req.method !== 'POST') return send(res, 405, err('method_not_allowed', 'POST only'));
      const auth = req.headers.authorization || '';
      const user = verify(auth.startsWith('Bearer ') ? auth.slice(7) : null);
      if (!user) return send(res, 401, err('unauthorized', 'bad or missing token'));
      const body = await readJson(req);
      if (!body || typeof body !== 'object') return send(res, 400, err('bad_request', 'not JSON'));
      if (!m[1]) {
        const ids = Array.isArray(body.member_ids) ? body.member_ids : [];
        if (!ids.every((u) => typeof u === 'string' && UUID_RE.test(u))) {
          return send(res, 422, err('invalid', 'member_ids must be UUIDs'));
        }
        const id = uuidv7();
        const title = typeof body.title === 'string' ? body.title.slice(0, 200) : null;
        const members = ids.map((u) => u.toLowerCase()).filter((u) => u !== user);
        await store.create(id, title, user, members);
        return send(res, 201, {
          id, title, created_by: user, created_at: new Date().toISOString(), member_ids: [user, ...members],
        });
      }
      if (!UUID_RE.test(m[1]) || typeof body.user_id !== 'string' || !UUID_RE.test(body.user_id)) {
        return send(res, 400, err('bad_request', 'bad ids'));
      }
      const refused = await store.addMember(m[1].toLowerCase(), user, body.user_id.toLowerCase());
      if (refused) return send(res, refused === 'not_found' ? 404 : 403, err(refused, refused));
      return send(res, 201, { conversation_id: m[1], user_id: body.user_id });
    } catch (e) {
      console.error(e);
      return send(res, 503, err('unavailable', 'try again'));
    }
  });

  // postline-bench's handshake (hyper) sends the request target in absolute
  // form (`GET http://host/socket.io/?...`), which HTTP/1.1 servers must
  // accept; Engine.IO matches the path on req.url as given, so make it the
  // origin form before Engine.IO's own upgrade listener sees it.
  server.prependListener('upgrade', (req) => {
    if (!req.url.startsWith('/')) {
      const u = new URL(req.url);
      req.url = u.pathname + u.search;
    }
  });
  // As `postline-bench`'s receivers never answer pings, the pong wait is an
  // hour, as scripts/bench.sh sets POSTLINE_WS_READ_TIMEOUT_MS for Postline.
  const pingInterval = 25_000;
  const io = new Server(server, {
    transports: ['websocket'],
    serveClient: false,
    pingInterval,
    pingTimeout: Number(process.env.COMPARE_WS_READ_TIMEOUT_MS || 3_600_000) - pingInterval,
    maxHttpBufferSize: 64 * 1024,
  });
  io.use((socket, next) => {
    const user = verify(socket.handshake.auth?.token);
    if (!user) return next(new Error('unauthorized: bad or missing token'));
    socket.data.user = user;
    next();
  });
  // The worker's stored messages, through Redis: message_persisted to the room.
  subscriber?.on('message', (_channel, text) => {
    const r = JSON.parse(text);
    io.to(r.conversation_id).emit('message_persisted', { type: 'message_persisted', ...r });
  });
  let connections = 0;
  io.on('connection', (socket) => {
    const user = socket.data.user;
    socket.emit('hello', {
      type: 'hello', user_id: user, connection_id: String(++connections), server_time: new Date().toISOString(),
    });
    // A reply to the event's callback, or (no callback) an error as an event.
    const replier = (cb) => (typeof cb === 'function' ? cb : (r) => r.type === 'error' && socket.emit('error', r));

    socket.on('join_conversation', async (d, cb) => {
      const reply = replier(cb);
      const id = typeof d?.conversation_id === 'string' ? d.conversation_id.toLowerCase() : '';
      if (!UUID_RE.test(id)) return reply(err('invalid', 'conversation_id must be a UUID'));
      try {
        const seq = await store.lastSeqIfMember(id, user);
        if (typeof seq === 'string') return reply(err(seq, seq === 'forbidden' ? 'not a member' : 'no such conversation'));
        socket.join(id);
        reply({ type: 'ack', conversation_id: id, last_seq: seq });
      } catch (e) {
        reply(err('unavailable', e.message));
      }
    });

    socket.on('leave_conversation', (d, cb) => {
      const reply = replier(cb);
      const id = typeof d?.conversation_id === 'string' ? d.conversation_id.toLowerCase() : '';
      if (!socket.rooms.has(id)) return reply(err('not_joined', 'not joined'));
      socket.leave(id);
      reply({ type: 'ack', conversation_id: id });
    });

    socket.on('send_message', (d, cb) => {
      const reply = replier(cb);
      const id = typeof d?.conversation_id === 'string' ? d.conversation_id.toLowerCase() : '';
      if (!socket.rooms.has(id)) return reply(err('not_joined', 'join the conversation first'));
      const cmid = d.client_message_id;
      if (typeof cmid !== 'string' || cmid.length < 1 || Buffer.byteLength(cmid) > 64) {
        return reply(err('invalid', 'client_message_id must be 1-64 bytes'));
      }
      if (typeof d.content !== 'string' || !d.content.trim()) return reply(err('invalid', 'content must be text'));
      if (Buffer.byteLength(d.content) > MAX_CONTENT_BYTES) return reply(err('too_large', 'content too large'));
      const message = {
        id: uuidv7(), conversation_id: id, sender_id: user, client_message_id: cmid,
        kind: 'text', content: d.content, created_at: new Date().toISOString(),
      };
      io.to(id).emit('new_message', { type: 'new_message', message });
      const ack = { type: 'ack', message_id: message.id, client_message_id: cmid, duplicate: false };
      if (!queue) return reply(ack);
      queue
        .add('m', message, { removeOnComplete: true, removeOnFail: 1000, attempts: 5, backoff: { type: 'exponential', delay: 100 } })
        .then(() => reply(ack), (e) => reply(err('unavailable', e.message)));
    });
  });

  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
  console.error(`gateway on 127.0.0.1:${port} (${persist ? 'persist: BullMQ -> Postgres' : 'no persistence'})`);
  const stop = () => {
    io.close();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

if (flag('--worker')) await runWorker();
else await runGateway();
