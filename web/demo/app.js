// Postline demo client: plain JavaScript against the protocol in
// docs/PROTOCOL.md, no framework and no build step. Everything a user typed
// (or any other value from the server) reaches the page through textContent
// or setAttribute, never innerHTML.
'use strict';

(() => {
  // ---- Settings ----------------------------------------------------------
  const RECONNECT_BASE_MS = 500;
  const RECONNECT_CAP_MS = 10000;
  // The server lets a typing indicator refresh once a second and drops it
  // after 6 s without one: refresh every 3 s while keys are pressed, and
  // say "stopped" after 3 s of silence.
  const TYPING_REFRESH_MS = 3000;
  const TYPING_IDLE_MS = 3000;
  // Someone else's indicator is dropped here if their "stopped" is lost.
  const TYPING_SHOW_MS = 7000;
  // New conversations others put us in are found by listing (there is no
  // push for them).
  const LIST_POLL_MS = 4000;
  // How much history a conversation opens with.
  const INITIAL_HISTORY = 50;
  const RECEIPT_DEBOUNCE_MS = 150;
  // resume takes at most this many conversations per request.
  const RESUME_MAX = 100;

  const $ = (id) => document.getElementById(id);

  // ---- State -------------------------------------------------------------
  const state = {
    mode: null, // 'dev' (demo users from /dev/users) or 'token'
    token: null,
    me: null, // { id, name }
    names: new Map(), // user id -> display name
    demoUsers: [],
    conversations: new Map(), // id -> Conversation
    openId: null,
    presence: new Map(), // user id -> 'online' | 'offline'
    ws: null,
    connected: false,
    attempt: 0,
    reconnectTimer: null,
    nextRef: 1,
    pending: new Map(), // ref -> { resolve, reject }
    outbox: new Map(), // client_message_id -> { convId, content } until acked
    editing: null, // message being edited
    typingSentAt: 0,
    typingIdleTimer: null,
    typingConvId: null,
    pollTimer: null,
  };

  function conversation(summary) {
    return {
      id: summary.id,
      title: summary.title,
      memberIds: summary.member_ids,
      lastSeq: summary.last_seq || 0,
      readSeq: summary.last_read_seq || 0,
      deliveredSeq: summary.last_delivered_seq || 0,
      lastMessageAt: summary.last_message_at || summary.created_at,
      // Messages by id; seqs known, so sync resumes after the last seq up to
      // which nothing is missing.
      messages: new Map(),
      seqs: new Set(),
      contiguous: null, // null until the first load fixes the window
      joined: false,
      receipts: new Map(), // other user id -> { delivered, read }
      typing: new Map(), // user id -> timer
      sentDelivered: 0,
      sentRead: 0,
      receiptTimer: null,
      loading: false,
    };
  }

  // ---- Small DOM helpers ---------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  let toastTimer = null;
  function toast(text) {
    const t = $('toast');
    t.textContent = text;
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, 4000);
  }

  function nameOf(id) {
    if (state.me && id === state.me.id) return state.me.name;
    return state.names.get(id) || `user ${String(id).slice(0, 8)}`;
  }

  function initials(name) {
    return name.split(/\s+/).map((w) => w[0] || '').join('').slice(0, 2).toUpperCase();
  }

  // A stable colour per user, from a small palette (classes in style.css).
  function hue(id) {
    let h = 0;
    for (const ch of String(id)) h = (h * 41 + ch.charCodeAt(0)) >>> 0;
    return `hue-${h % 6}`;
  }

  function avatar(id, extra) {
    return el('span', { class: `avatar ${hue(id)} ${extra || ''}`, 'aria-hidden': 'true', text: initials(nameOf(id)) });
  }

  function formatTime(iso) {
    if (!iso) return '';
    const d = new Date(iso);
    return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  }

  // ---- HTTP --------------------------------------------------------------
  async function api(method, path, body) {
    const headers = { authorization: `Bearer ${state.token}` };
    if (body !== undefined) headers['content-type'] = 'application/json';
    const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const data = await res.json().catch(() => null);
    if (!res.ok) {
      const msg = data && data.error ? data.error.message : `HTTP ${res.status}`;
      const err = new Error(msg);
      err.status = res.status;
      throw err;
    }
    return data;
  }

  // ---- Sign-in -----------------------------------------------------------
  // The token's claims, read (not verified: the server does that) to know
  // who we are and when to get a new token.
  function tokenClaims(token) {
    try {
      const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), '=')));
    } catch (_) {
      return {};
    }
  }

  function tokenSubject(token) {
    const { sub } = tokenClaims(token);
    return typeof sub === 'string' ? sub : null;
  }

  // A browser cannot read the 401 of a refused upgrade, so an expired token
  // is caught here, before trying, rather than by reconnecting forever.
  function tokenExpired() {
    const { exp } = tokenClaims(state.token);
    return typeof exp === 'number' && exp * 1000 <= Date.now();
  }

  function onTokenExpired() {
    const u = state.mode === 'dev' && state.demoUsers.find((d) => d.user_id === state.me.id);
    if (u) return void pickDemoUser(u); // the same demo user, a fresh token
    signOut('Your token expired: sign in again.');
  }

  async function start() {
    // A token in the fragment (never sent to the server in the URL) wins.
    const hash = new URLSearchParams(location.hash.slice(1));
    if (hash.get('token')) {
      sessionStorage.setItem('postline.token', hash.get('token'));
      history.replaceState(null, '', location.pathname + location.search);
    }
    try {
      const res = await fetch('/dev/users');
      if (res.ok) {
        state.mode = 'dev';
        state.demoUsers = (await res.json()).users;
        for (const u of state.demoUsers) state.names.set(u.user_id, u.name);
      } else {
        state.mode = 'token';
      }
    } catch (_) {
      state.mode = 'token';
    }
    const saved = sessionStorage.getItem('postline.token');
    if (saved && tokenSubject(saved)) {
      signIn(saved);
    } else {
      showSignIn();
    }
  }

  function showSignIn(error) {
    $('app').hidden = true;
    $('signin').hidden = false;
    $('signin-dev').hidden = state.mode !== 'dev';
    $('signin-token').hidden = state.mode === 'dev';
    const err = $('signin-error');
    err.hidden = !error;
    err.textContent = error || '';
    if (state.mode === 'dev') {
      const picker = $('user-picker');
      picker.replaceChildren(...state.demoUsers.map((u) => el('button', {
        class: 'user-choice',
        'data-testid': `pick-user-${u.name.toLowerCase()}`,
        onclick: () => pickDemoUser(u),
      }, avatar(u.user_id, 'large'), el('span', { text: u.name }))));
    }
  }

  async function pickDemoUser(u) {
    try {
      const res = await fetch('/dev/token', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ user_id: u.user_id }),
      });
      const data = await res.json();
      if (!res.ok) throw new Error(data.error ? data.error.message : `HTTP ${res.status}`);
      signIn(data.token);
    } catch (e) {
      showSignIn(`Could not sign in: ${e.message}`);
    }
  }

  function signIn(token) {
    const sub = tokenSubject(token);
    if (!sub) {
      showSignIn('That is not a token (expected a JWT with a sub claim).');
      return;
    }
    state.token = token;
    sessionStorage.setItem('postline.token', token);
    state.me = { id: sub, name: state.names.get(sub) || `user ${sub.slice(0, 8)}` };
    $('signin').hidden = true;
    $('app').hidden = false;
    $('me-name').textContent = state.me.name;
    const av = $('me-avatar');
    av.className = `avatar ${hue(sub)}`;
    av.textContent = initials(state.me.name);
    document.title = `${state.me.name} · Postline`;
    loadConversations().then(connect, (e) => {
      if (e.status === 401) return signOut(`Token refused: ${e.message}`);
      toast(`Could not load conversations: ${e.message}`);
      connect();
    });
  }

  function signOut(error) {
    sessionStorage.removeItem('postline.token');
    if (state.ws) {
      state.ws.onclose = null;
      state.ws.close(1000);
    }
    location.hash = '';
    // A clean slate: reload, then show the sign-in with the reason.
    if (error) sessionStorage.setItem('postline.signin-error', error);
    location.reload();
  }

  // ---- Conversations -----------------------------------------------------
  // `resumeNew`: join and sync conversations seen for the first time (not
  // wanted right after a hello, which resumes everything itself).
  async function loadConversations(resumeNew = true) {
    const data = await api('GET', '/v1/conversations');
    const fresh = [];
    for (const s of data.conversations) {
      let c = state.conversations.get(s.id);
      if (!c) {
        c = conversation(s);
        state.conversations.set(s.id, c);
        fresh.push(c);
      } else {
        c.memberIds = s.member_ids;
        c.title = s.title;
        c.lastSeq = Math.max(c.lastSeq, s.last_seq);
        c.readSeq = Math.max(c.readSeq, s.last_read_seq);
        if (s.last_message_at) c.lastMessageAt = s.last_message_at;
      }
    }
    // Gone from the list: we were removed.
    const listed = new Set(data.conversations.map((s) => s.id));
    for (const id of [...state.conversations.keys()]) {
      if (!listed.has(id)) {
        state.conversations.delete(id);
        if (state.openId === id) state.openId = null;
      }
    }
    renderSidebar();
    if (!state.openId || fresh.length) renderChat();
    else renderHeader();
    refreshPresence();
    if (resumeNew && state.connected && fresh.length) resume(fresh);
    return fresh;
  }

  async function refreshPresence() {
    const ids = new Set();
    for (const c of state.conversations.values()) for (const m of c.memberIds) if (m !== state.me.id) ids.add(m);
    const list = [...ids].slice(0, 200);
    if (!list.length) return;
    try {
      const data = await api('GET', `/v1/presence?user_ids=${list.join(',')}`);
      for (const p of data.presence) state.presence.set(p.user_id, p.status);
      renderSidebar();
      renderHeader();
    } catch (_) { /* presence is a nicety; events keep it current */ }
  }

  function sortedConversations() {
    return [...state.conversations.values()].sort((a, b) => String(b.lastMessageAt || '').localeCompare(String(a.lastMessageAt || '')));
  }

  function conversationTitle(c) {
    if (c.title) return c.title;
    const others = c.memberIds.filter((m) => m !== state.me.id).map(nameOf);
    return others.length ? others.join(', ') : 'Just you';
  }

  function unread(c) {
    return Math.max(0, c.lastSeq - c.readSeq);
  }

  function lastMessage(c) {
    let last = null;
    for (const m of c.messages.values()) if (!last || order(m, last) > 0) last = m;
    return last;
  }

  function renderSidebar() {
    const list = $('conversation-list');
    const items = sortedConversations().map((c) => {
      const n = unread(c);
      const last = lastMessage(c);
      const others = c.memberIds.filter((m) => m !== state.me.id);
      const online = others.some((m) => state.presence.get(m) === 'online');
      const preview = last ? `${last.sender_id === state.me.id ? 'You' : nameOf(last.sender_id)}: ${last.deleted ? 'message deleted' : textOf(last)}` : `${c.memberIds.length} members`;
      return el('button', {
        class: `conversation-item${c.id === state.openId ? ' active' : ''}`,
        'data-testid': 'conversation-item',
        'data-conversation-id': c.id,
        'data-title': conversationTitle(c),
        'data-unread': n,
        onclick: () => openConversation(c.id),
      },
      el('span', { class: 'conv-avatar' }, avatar(others[0] || state.me.id), el('span', { class: `dot ${online ? 'online' : 'offline'}` })),
      el('span', { class: 'conv-text' },
        el('span', { class: 'conv-title', text: conversationTitle(c) }),
        el('span', { class: 'conv-preview', text: preview })),
      n > 0 ? el('span', { class: 'badge', 'data-testid': 'unread-badge', text: n > 99 ? '99+' : n }) : null);
    });
    if (!items.length) items.push(el('p', { class: 'muted empty-list', text: 'No conversations yet.' }));
    list.replaceChildren(...items);
  }

  function openConversation(id) {
    cancelEdit();
    stopTyping();
    state.openId = id;
    const c = state.conversations.get(id);
    renderSidebar();
    renderChat(true);
    if (c && !c.joined && state.connected) resume([c]);
    markRead(c);
    $('composer-input').focus();
  }

  async function createConversation(title, memberIds) {
    const created = await api('POST', '/v1/conversations', { title: title || undefined, member_ids: memberIds });
    const c = conversation({ ...created, last_seq: 0, last_read_seq: 0, last_delivered_seq: 0 });
    c.lastMessageAt = created.created_at;
    state.conversations.set(c.id, c);
    refreshPresence();
    openConversation(c.id);
  }

  // ---- WebSocket ---------------------------------------------------------
  function setStatus(s, text) {
    const pill = $('conn-status');
    pill.dataset.state = s;
    pill.textContent = text || s;
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    if (state.ws || !state.token) return;
    if (!navigator.onLine) {
      setStatus('offline', 'offline');
      return;
    }
    if (tokenExpired()) return onTokenExpired();
    setStatus('connecting', state.attempt ? 'reconnecting…' : 'connecting…');
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(`${proto}//${location.host}/ws?token=${encodeURIComponent(state.token)}`);
    state.ws = ws;
    ws.onmessage = (e) => {
      let frame;
      try { frame = JSON.parse(e.data); } catch (_) { return; }
      onFrame(frame);
    };
    ws.onclose = (e) => onClosed(ws, e.code);
    ws.onerror = () => { /* onclose follows and decides */ };
  }

  // Forget the socket: nothing joined, no request will be answered, no
  // typing indicator is current. What was sent and not acked stays in the
  // outbox, to be sent again after the next hello.
  function forgetSocket() {
    const ws = state.ws;
    state.ws = null;
    state.connected = false;
    if (ws) {
      ws.onclose = null;
      ws.onmessage = null;
      if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) ws.close(1000);
    }
    for (const c of state.conversations.values()) {
      c.joined = false;
      for (const t of c.typing.values()) clearTimeout(t);
      c.typing.clear();
    }
    for (const p of state.pending.values()) p.reject(new Error('connection closed'));
    state.pending.clear();
    clearInterval(state.pollTimer);
    renderTyping();
    renderHeader();
  }

  function onClosed(ws, code) {
    if (state.ws !== ws) return;
    forgetSocket();
    if (code === 4001) return onTokenExpired();
    if (!navigator.onLine) {
      setStatus('offline', 'offline');
      return;
    }
    scheduleReconnect();
  }

  function scheduleReconnect(afterMs) {
    clearTimeout(state.reconnectTimer);
    state.attempt += 1;
    const backoff = Math.min(RECONNECT_CAP_MS, RECONNECT_BASE_MS * 2 ** (state.attempt - 1));
    const wait = afterMs !== undefined ? afterMs : backoff / 2 + Math.random() * backoff / 2;
    setStatus('connecting', `reconnecting in ${Math.ceil(wait / 1000)} s`);
    state.reconnectTimer = setTimeout(connect, wait);
  }

  function send(frame) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
    state.ws.send(JSON.stringify(frame));
    return true;
  }

  // A request with a ref: resolves with the ack, rejects with the error.
  function request(frame) {
    return new Promise((resolve, reject) => {
      const ref = String(state.nextRef++);
      if (!send({ ...frame, ref })) return reject(new Error('not connected'));
      state.pending.set(ref, { resolve, reject });
    });
  }

  function onFrame(f) {
    if (f.ref && state.pending.has(f.ref)) {
      const p = state.pending.get(f.ref);
      state.pending.delete(f.ref);
      if (f.type === 'error') {
        const err = new Error(f.message);
        err.code = f.code;
        err.frame = f;
        p.reject(err);
      } else {
        p.resolve(f);
      }
      return;
    }
    switch (f.type) {
      case 'hello': return onHello();
      case 'new_message': return onNewMessage(f.message);
      case 'message_persisted': return onPersisted(f);
      case 'message_updated': return onStored(f.message, true);
      case 'message_deleted': return onDeleted(f);
      case 'typing': return onTyping(f);
      case 'presence':
        state.presence.set(f.user_id, f.status);
        renderSidebar();
        renderHeader();
        return;
      case 'receipt': return onReceipt(f);
      case 'member_joined':
      case 'member_left':
      case 'joined':
      case 'left':
        return void loadConversations().catch(() => {});
      case 'reconnect':
        // The server is going away: come back after the pause it asked for.
        state.attempt = 0;
        forgetSocket();
        return scheduleReconnect(f.after_ms);
      case 'resync':
        return resume([...state.conversations.values()]);
      case 'error':
        if (f.code === 'rate_limited') return;
        return toast(f.message);
      default:
    }
  }

  async function onHello() {
    state.connected = true;
    state.attempt = 0;
    setStatus('online', 'online');
    clearInterval(state.pollTimer);
    state.pollTimer = setInterval(() => loadConversations().catch(() => {}), LIST_POLL_MS);
    // Catch up everywhere (joining each conversation again), then resend
    // what was never acked, with its same client_message_id: a send that did
    // reach the queue is acked as a duplicate, never stored twice.
    await loadConversations(false).catch(() => {});
    await resume([...state.conversations.values()]);
    for (const [cmid, out] of state.outbox) transmit(cmid, out);
    refreshPresence();
  }

  // ---- Sync by seq -------------------------------------------------------
  // Where sync for `c` starts: after the last seq up to which nothing is
  // missing, or, the first time, a page before the end.
  function afterSeq(c) {
    if (c.contiguous === null) c.contiguous = Math.max(0, c.lastSeq - INITIAL_HISTORY);
    return c.contiguous;
  }

  async function resume(convs) {
    for (let i = 0; i < convs.length; i += RESUME_MAX) {
      const batch = convs.slice(i, i + RESUME_MAX);
      let ack;
      try {
        ack = await request({
          type: 'resume',
          conversations: batch.map((c) => ({ conversation_id: c.id, after_seq: afterSeq(c) })),
          limit: INITIAL_HISTORY,
        });
      } catch (e) {
        if (e.code === 'rate_limited') {
          setTimeout(() => resume(batch), e.frame.retry_after_ms || 500);
        }
        continue;
      }
      for (const r of ack.conversations) {
        const c = state.conversations.get(r.conversation_id);
        if (!c) continue;
        if (r.error) continue;
        c.joined = true;
        applyPage(c, r);
        if (r.has_more) syncRest(c, r.last_seq);
      }
    }
    renderSidebar();
    renderChat();
    const open = state.conversations.get(state.openId);
    if (open) markRead(open);
  }

  async function syncRest(c, after) {
    let next = after;
    for (;;) {
      let page;
      try {
        page = await request({ type: 'sync', conversation_id: c.id, after_seq: next, limit: INITIAL_HISTORY });
      } catch (e) {
        if (e.code === 'rate_limited') {
          await new Promise((r) => setTimeout(r, e.frame.retry_after_ms || 500));
          continue;
        }
        return;
      }
      c.joined = true;
      applyPage(c, page);
      renderChat();
      renderSidebar();
      if (!page.has_more) return;
      next = page.last_seq;
    }
  }

  function applyPage(c, page) {
    for (const m of page.messages) onStored(m, false);
    noteSeq(c, page.last_seq, true);
  }

  // Record that `seq` is known. `upTo`: everything up to it is (a page).
  function noteSeq(c, seq, upTo) {
    if (!seq) return;
    if (c.contiguous === null) c.contiguous = Math.max(0, c.lastSeq - INITIAL_HISTORY);
    c.seqs.add(seq);
    if (upTo && seq > c.contiguous) c.contiguous = seq;
    while (c.seqs.has(c.contiguous + 1)) c.contiguous += 1;
    if (seq > c.lastSeq) c.lastSeq = seq;
    scheduleReceipts(c);
  }

  // ---- Messages ----------------------------------------------------------
  // Message order: stored ones by seq, then live ones not yet stored, in
  // arrival order.
  function order(a, b) {
    const sa = a.seq || Infinity;
    const sb = b.seq || Infinity;
    if (sa !== sb) return sa < sb ? -1 : 1;
    return a.arrival - b.arrival;
  }
  let arrivals = 0;

  function findOwnByClientId(c, cmid) {
    for (const m of c.messages.values()) if (m.sender_id === state.me.id && m.client_message_id === cmid) return m;
    return null;
  }

  function onNewMessage(msg) {
    const c = state.conversations.get(msg.conversation_id);
    if (!c) return void loadConversations().catch(() => {});
    let m = c.messages.get(msg.id);
    if (!m && msg.sender_id === state.me.id) {
      // Our own optimistic copy: give it its id.
      m = findOwnByClientId(c, msg.client_message_id);
      if (m && m.id !== msg.id) {
        c.messages.delete(m.id);
        m.id = msg.id;
        c.messages.set(m.id, m);
      }
    }
    if (!m) {
      m = { ...msg, seq: null, version: 1, arrival: arrivals++, status: 'sent' };
      c.messages.set(m.id, m);
    }
    if (msg.sender_id !== state.me.id) stopShowingTyping(c, msg.sender_id);
    bump(c, msg.created_at);
  }

  function onPersisted(f) {
    const c = state.conversations.get(f.conversation_id);
    if (!c) return;
    const m = c.messages.get(f.message_id);
    if (m) {
      m.seq = f.seq;
      if (m.status === 'sent' || m.status === 'pending') m.status = 'persisted';
    }
    noteSeq(c, f.seq, false);
    bump(c);
  }

  function onStored(s, live) {
    const c = state.conversations.get(s.conversation_id);
    if (!c) return;
    let m = c.messages.get(s.id);
    if (!m && s.sender_id === state.me.id) {
      m = findOwnByClientId(c, s.client_message_id);
      if (m) {
        c.messages.delete(m.id);
        m.id = s.id;
      }
    }
    if (!m) {
      m = { arrival: arrivals++ };
    } else if (m.version && s.version < m.version) {
      return; // an older copy than the one shown
    }
    Object.assign(m, s, { status: m.status === 'read' ? 'read' : 'persisted' });
    c.messages.set(m.id, m);
    if (s.sender_id === state.me.id) state.outbox.delete(s.client_message_id);
    if (!live) noteSeq(c, s.seq, false);
    applyReceipts(c);
    if (live) bump(c);
  }

  function onDeleted(f) {
    const c = state.conversations.get(f.conversation_id);
    const m = c && c.messages.get(f.message_id);
    if (!m) return;
    m.deleted = true;
    m.content = null;
    m.version = f.version;
    bump(c);
  }

  function bump(c, at) {
    if (at && String(at) > String(c.lastMessageAt || '')) c.lastMessageAt = at;
    if (c.id === state.openId) renderChat();
    renderSidebar();
    if (c.id === state.openId) markRead(c);
  }

  function textOf(m) {
    if (m.deleted) return '';
    if (typeof m.content === 'string') return m.content;
    if (m.content && m.content.url) return m.content.name || m.content.url;
    return '';
  }

  // ---- Sending -----------------------------------------------------------
  function newClientId() {
    const r = crypto.getRandomValues(new Uint32Array(2));
    return `web-${Date.now().toString(36)}-${r[0].toString(36)}${r[1].toString(36)}`;
  }

  function sendMessage(text) {
    const c = state.conversations.get(state.openId);
    if (!c || !text.trim()) return;
    const cmid = newClientId();
    const m = {
      id: `local:${cmid}`,
      conversation_id: c.id,
      sender_id: state.me.id,
      client_message_id: cmid,
      kind: 'text',
      content: text,
      created_at: new Date().toISOString(),
      seq: null,
      version: 1,
      arrival: arrivals++,
      status: 'pending',
    };
    c.messages.set(m.id, m);
    state.outbox.set(cmid, { convId: c.id, content: text });
    bump(c, m.created_at);
    transmit(cmid, state.outbox.get(cmid));
  }

  async function transmit(cmid, out) {
    const c = state.conversations.get(out.convId);
    if (!c || !state.connected) return; // sent after the next hello
    try {
      const ack = await request({ type: 'send_message', conversation_id: c.id, client_message_id: cmid, kind: 'text', content: out.content });
      state.outbox.delete(cmid);
      const m = findOwnByClientId(c, cmid);
      if (m) {
        if (m.id !== ack.message_id) {
          c.messages.delete(m.id);
          m.id = ack.message_id;
          c.messages.set(m.id, m);
        }
        if (m.status === 'pending') m.status = 'sent';
      }
      bump(c);
    } catch (e) {
      if (e.code === 'rate_limited' || e.code === 'unavailable') {
        setTimeout(() => transmit(cmid, out), (e.frame && e.frame.retry_after_ms) || 1000);
      } else if (e.code === 'not_joined') {
        await resume([c]);
        transmit(cmid, out);
      } else if (e.code) {
        state.outbox.delete(cmid);
        const m = findOwnByClientId(c, cmid);
        if (m) m.status = 'failed';
        bump(c);
        toast(`Not sent: ${e.message}`);
      }
      // Not connected: the outbox is resent after the next hello.
    }
  }

  async function saveEdit(m, text) {
    const c = state.conversations.get(m.conversation_id);
    if (text === textOf(m)) return;
    try {
      const ack = await request({ type: 'edit_message', message_id: m.id, content: text, version: m.version });
      m.content = text;
      m.version = ack.version;
      m.edited_at = m.edited_at || new Date().toISOString();
      bump(c);
    } catch (e) {
      toast(e.code === 'not_found' ? 'Not stored yet: try again in a moment.' : `Not edited: ${e.message}`);
    }
  }

  async function deleteMessage(m) {
    try {
      await request({ type: 'delete_message', message_id: m.id, version: m.version });
    } catch (e) {
      toast(`Not deleted: ${e.message}`);
    }
  }

  function startEdit(m) {
    state.editing = m;
    $('edit-banner').hidden = false;
    const input = $('composer-input');
    input.value = textOf(m);
    input.focus();
    $('composer-send').textContent = 'Save';
  }

  function cancelEdit() {
    if (!state.editing) return;
    state.editing = null;
    $('edit-banner').hidden = true;
    $('composer-input').value = '';
    $('composer-send').textContent = 'Send';
  }

  // ---- Typing ------------------------------------------------------------
  function onComposerInput() {
    const c = state.conversations.get(state.openId);
    if (!c || state.editing) return;
    const now = Date.now();
    if (state.typingConvId !== c.id || now - state.typingSentAt > TYPING_REFRESH_MS) {
      if (send({ type: 'typing', conversation_id: c.id, is_typing: true })) {
        state.typingSentAt = now;
        state.typingConvId = c.id;
      }
    }
    clearTimeout(state.typingIdleTimer);
    state.typingIdleTimer = setTimeout(stopTyping, TYPING_IDLE_MS);
  }

  function stopTyping() {
    clearTimeout(state.typingIdleTimer);
    if (state.typingConvId) send({ type: 'typing', conversation_id: state.typingConvId, is_typing: false });
    state.typingConvId = null;
    state.typingSentAt = 0;
  }

  function onTyping(f) {
    const c = state.conversations.get(f.conversation_id);
    if (!c || f.user_id === state.me.id) return;
    if (f.is_typing) {
      clearTimeout(c.typing.get(f.user_id));
      c.typing.set(f.user_id, setTimeout(() => stopShowingTyping(c, f.user_id), TYPING_SHOW_MS));
    } else {
      stopShowingTyping(c, f.user_id);
      return;
    }
    renderTyping();
  }

  function stopShowingTyping(c, user) {
    if (!c.typing.has(user)) return;
    clearTimeout(c.typing.get(user));
    c.typing.delete(user);
    renderTyping();
  }

  function renderTyping() {
    const box = $('typing-indicator');
    const c = state.conversations.get(state.openId);
    const who = c ? [...c.typing.keys()].map(nameOf) : [];
    box.dataset.active = who.length ? 'true' : 'false';
    box.textContent = who.length === 0 ? ''
      : who.length === 1 ? `${who[0]} is typing…`
        : `${who.slice(0, -1).join(', ')} and ${who[who.length - 1]} are typing…`;
  }

  // ---- Receipts ----------------------------------------------------------
  // Tell the server what reached this device (delivered) and what the user
  // has on screen (read). Debounced: a burst of messages is one receipt.
  function scheduleReceipts(c) {
    clearTimeout(c.receiptTimer);
    c.receiptTimer = setTimeout(() => sendReceipts(c), RECEIPT_DEBOUNCE_MS);
  }

  function markRead(c) {
    if (!c) return;
    scheduleReceipts(c);
  }

  function sendReceipts(c) {
    if (!c.joined || !state.connected) return;
    const seen = c.contiguous || 0;
    const reading = c.id === state.openId && document.visibilityState === 'visible';
    if (reading && seen > c.readSeq && seen > c.sentRead) {
      c.sentRead = seen;
      send({ type: 'read', conversation_id: c.id, seq: seen });
      c.readSeq = seen;
      c.deliveredSeq = Math.max(c.deliveredSeq, seen);
      renderSidebar();
    } else if (seen > c.deliveredSeq && seen > c.sentDelivered) {
      c.sentDelivered = seen;
      send({ type: 'delivered', conversation_id: c.id, seq: seen });
      c.deliveredSeq = seen;
    }
  }

  function onReceipt(f) {
    const c = state.conversations.get(f.conversation_id);
    if (!c) return;
    if (f.user_id === state.me.id) {
      // Another of our devices read it.
      c.readSeq = Math.max(c.readSeq, f.read_seq);
      c.deliveredSeq = Math.max(c.deliveredSeq, f.delivered_seq);
      renderSidebar();
      return;
    }
    const r = c.receipts.get(f.user_id) || { delivered: 0, read: 0 };
    r.delivered = Math.max(r.delivered, f.delivered_seq);
    r.read = Math.max(r.read, f.read_seq);
    c.receipts.set(f.user_id, r);
    applyReceipts(c);
    if (c.id === state.openId) renderChat();
  }

  // Our messages' ticks: read once anyone else read that far, delivered
  // once anyone else's device has it.
  function applyReceipts(c) {
    let read = 0;
    let delivered = 0;
    for (const r of c.receipts.values()) {
      read = Math.max(read, r.read);
      delivered = Math.max(delivered, r.delivered);
    }
    for (const m of c.messages.values()) {
      if (m.sender_id !== state.me.id || !m.seq) continue;
      if (m.seq <= read) m.status = 'read';
      else if (m.seq <= delivered && m.status !== 'read') m.status = 'delivered';
    }
  }

  // ---- Rendering the open conversation -----------------------------------
  function renderHeader() {
    const c = state.conversations.get(state.openId);
    if (!c) return;
    $('chat-title').textContent = conversationTitle(c);
    // For the browser tests: live events for this conversation now arrive.
    $('chat-pane').dataset.joined = c.joined && state.connected ? 'true' : 'false';
    const members = c.memberIds.map((id) => {
      const status = id === state.me.id ? (state.connected ? 'online' : 'offline') : (state.presence.get(id) || 'offline');
      return el('span', { class: 'member', 'data-testid': 'member', 'data-user-id': id },
        el('span', { class: `dot ${status}`, 'data-testid': 'presence-dot', 'data-user-id': id, 'data-status': status, title: status }),
        el('span', { text: id === state.me.id ? `${nameOf(id)} (you)` : nameOf(id) }));
    });
    $('chat-members').replaceChildren(...members);
  }

  const TICKS = {
    pending: ['◷', 'sending'],
    sent: ['✓', 'sent'],
    persisted: ['✓✓', 'stored'],
    delivered: ['✓✓', 'delivered'],
    read: ['✓✓', 'read'],
    failed: ['!', 'not sent'],
  };

  function renderMessage(m, prev) {
    // Posted by the application (postline.publish(), the service API):
    // a notice across the conversation, not anyone's bubble.
    if (m.kind === 'system') {
      return el('li', {
        class: 'message system',
        'data-testid': 'message',
        'data-kind': 'system',
        'data-message-id': m.id,
        'data-seq': m.seq || '',
      },
      el('div', { class: 'system-notice' },
        el('span', { class: 'content', 'data-testid': 'message-content', text: textOf(m) }),
        el('time', { datetime: m.created_at, text: formatTime(m.created_at) })));
    }
    const own = m.sender_id === state.me.id;
    const grouped = prev && prev.sender_id === m.sender_id;
    const [tick, tickLabel] = TICKS[m.status] || TICKS.persisted;
    const actions = own && !m.deleted && m.seq && m.kind === 'text'
      ? el('span', { class: 'msg-actions' },
        el('button', { class: 'link', 'data-testid': 'message-edit', title: 'Edit', onclick: () => startEdit(m) }, 'Edit'),
        el('button', { class: 'link', 'data-testid': 'message-delete', title: 'Delete', onclick: () => deleteMessage(m) }, 'Delete'))
      : null;
    return el('li', {
      class: `message${own ? ' own' : ''}${grouped ? ' grouped' : ''}${m.deleted ? ' deleted' : ''}`,
      'data-testid': 'message',
      'data-message-id': m.id,
      'data-client-message-id': m.client_message_id,
      'data-seq': m.seq || '',
      'data-own': own ? 'true' : 'false',
      'data-status': own ? m.status : '',
      'data-version': m.version || 1,
    },
    !own && !grouped ? avatar(m.sender_id, 'small') : el('span', { class: 'avatar-gap' }),
    el('div', { class: 'bubble' },
      !own && !grouped ? el('div', { class: 'sender', text: nameOf(m.sender_id) }) : null,
      el('div', { class: 'content', 'data-testid': 'message-content', text: m.deleted ? 'This message was deleted' : textOf(m) }),
      el('div', { class: 'meta' },
        actions,
        m.edited_at && !m.deleted ? el('span', { class: 'edited', 'data-testid': 'message-edited', text: 'edited' }) : null,
        el('time', { datetime: m.created_at, text: formatTime(m.created_at) }),
        own ? el('span', { class: `ticks ${m.status}`, 'data-testid': 'message-ticks', title: tickLabel, 'aria-label': tickLabel, text: tick }) : null)));
  }

  function renderChat(scrollToEnd) {
    const c = state.conversations.get(state.openId);
    $('empty-chat').hidden = !!c;
    $('chat-pane').hidden = !c;
    if (!c) return;
    renderHeader();
    renderTyping();
    const list = $('message-list');
    const atEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 60;
    const msgs = [...c.messages.values()].sort(order);
    let prev = null;
    const items = [];
    for (const m of msgs) {
      items.push(renderMessage(m, prev));
      prev = m;
    }
    if (!items.length) items.push(el('li', { class: 'muted no-messages', text: 'No messages yet. Say hello!' }));
    list.replaceChildren(...items);
    if (scrollToEnd || atEnd) list.scrollTop = list.scrollHeight;
  }

  // ---- New-conversation dialog ---------------------------------------------
  function openNewConversation() {
    const dialog = $('new-conversation-dialog');
    $('new-conv-title').value = '';
    $('new-conv-error').hidden = true;
    const picker = $('new-conv-members');
    if (state.mode === 'dev') {
      picker.hidden = false;
      $('new-conv-ids-label').hidden = true;
      picker.replaceChildren(...state.demoUsers.filter((u) => u.user_id !== state.me.id).map((u) => el('label', { class: 'member-choice' },
        el('input', { type: 'checkbox', value: u.user_id, 'data-testid': `new-conv-member-${u.name.toLowerCase()}` }),
        avatar(u.user_id, 'small'), el('span', { text: u.name }))));
    } else {
      picker.hidden = true;
      $('new-conv-ids-label').hidden = false;
      $('new-conv-ids').value = '';
    }
    dialog.showModal();
    $('new-conv-title').focus();
  }

  async function submitNewConversation(e) {
    e.preventDefault();
    let ids;
    if (state.mode === 'dev') {
      ids = [...$('new-conv-members').querySelectorAll('input:checked')].map((i) => i.value);
    } else {
      ids = $('new-conv-ids').value.split(/[\s,]+/).filter(Boolean);
    }
    try {
      await createConversation($('new-conv-title').value.trim(), ids);
      $('new-conversation-dialog').close();
    } catch (err) {
      const p = $('new-conv-error');
      p.textContent = err.message;
      p.hidden = false;
    }
  }

  // ---- Wiring --------------------------------------------------------------
  function wire() {
    $('signin-token').addEventListener('submit', (e) => {
      e.preventDefault();
      signIn($('token-input').value.trim());
    });
    $('sign-out').addEventListener('click', () => signOut());
    $('new-conversation').addEventListener('click', openNewConversation);
    $('new-conversation-form').addEventListener('submit', submitNewConversation);
    $('new-conv-cancel').addEventListener('click', () => $('new-conversation-dialog').close());
    $('edit-cancel').addEventListener('click', cancelEdit);
    const input = $('composer-input');
    $('composer').addEventListener('submit', (e) => {
      e.preventDefault();
      const text = input.value;
      if (!text.trim()) return;
      if (state.editing) {
        saveEdit(state.editing, text);
        cancelEdit();
      } else {
        stopTyping();
        sendMessage(text);
      }
      input.value = '';
      input.focus();
    });
    input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey) {
        e.preventDefault();
        $('composer').requestSubmit();
      } else if (e.key === 'Escape') {
        cancelEdit();
      }
    });
    input.addEventListener('input', onComposerInput);
    // The browser knows before the socket does: close at once when it goes
    // offline, reconnect at once when it comes back.
    window.addEventListener('offline', () => {
      clearTimeout(state.reconnectTimer);
      forgetSocket();
      setStatus('offline', 'offline');
    });
    window.addEventListener('online', () => {
      state.attempt = 0;
      connect();
    });
    document.addEventListener('visibilitychange', () => {
      const c = state.conversations.get(state.openId);
      if (c) markRead(c);
    });
    const err = sessionStorage.getItem('postline.signin-error');
    if (err) {
      sessionStorage.removeItem('postline.signin-error');
      start().then(() => showSignIn(err));
      return;
    }
    start();
  }

  wire();
})();
