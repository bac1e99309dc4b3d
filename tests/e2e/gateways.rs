//! Several gateway processes and workers on one Postgres.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use crate::harness::*;

const FAST: &[(&str, &str)] = &[
    ("POSTLINE_PRESENCE_HEARTBEAT_MS", "300"),
    ("POSTLINE_PRESENCE_GRACE_MS", "200"),
    ("POSTLINE_DRAIN_WINDOW_MS", "300"),
];

async fn gateway(db_url: &str) -> (Proc, SocketAddr) {
    gateway_with(db_url, &[]).await
}

/// A gateway with `env` over [`FAST`] (a later setting of a variable wins).
async fn gateway_with(db_url: &str, env: &[(&str, &str)]) -> (Proc, SocketAddr) {
    let port = free_port();
    let env: Vec<(&str, &str)> = FAST
        .iter()
        .chain(LOOSE_LIMITS_ENV)
        .chain(env)
        .copied()
        .collect();
    let child = spawn_postline(
        &["serve", "--no-worker", "--no-migrate"],
        db_url,
        port,
        &env,
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_healthy(addr).await;
    (child, addr)
}

fn worker(db_url: &str) -> Proc {
    spawn_postline(&["worker"], db_url, free_port(), FAST)
}

async fn create_conversation(
    addr: SocketAddr,
    owner: postline::domain::UserId,
    members: &[postline::domain::UserId],
) -> uuid::Uuid {
    let token = jwt().issue(owner, Duration::from_secs(600));
    let body = json!({"member_ids": members}).to_string();
    let (status, v) = raw_http(
        addr,
        "POST",
        "/v1/conversations",
        &format!("Authorization: Bearer {token}\r\n"),
        Some(&body),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    v["id"].as_str().unwrap().parse().unwrap()
}

fn jwt() -> postline::auth::Jwt {
    postline::auth::Jwt::new(SECRET.as_bytes())
}

async fn client(addr: SocketAddr, user: postline::domain::UserId) -> Client {
    Client::connect(addr, &jwt().issue(user, Duration::from_secs(600))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_typing_and_presence_cross_gateways_and_two_workers_keep_seqs_gap_free() {
    let (db_url, pool) = fresh_database().await;
    let (gw_a, a_addr) = gateway(&db_url).await;
    let (_gw_b, b_addr) = gateway(&db_url).await;
    let _w1 = worker(&db_url);
    let _w2 = worker(&db_url);

    let (alice, bob) = (uid(), uid());
    let conv = create_conversation(a_addr, alice, &[bob]).await;
    let mut b = client(b_addr, bob).await;
    b.join(conv).await;
    let mut a = client(a_addr, alice).await;
    let p = b.recv_type("presence").await;
    assert_eq!(
        (p["user_id"].as_str(), p["status"].as_str()),
        (Some(alice.to_string().as_str()), Some("online"))
    );
    a.join(conv).await;

    a.request(json!({"type": "typing", "conversation_id": conv, "is_typing": true}))
        .await;
    let t = b.recv_type("typing").await;
    assert_eq!(t["user_id"], alice.to_string(), "typing crosses gateways");

    let n = 100;
    let mut sent = Vec::new();
    for i in 0..n {
        let ack = a
            .send_text(conv, &format!("x{i}"), &format!("cross {i}"))
            .await;
        sent.push(ack["message_id"].as_str().unwrap().to_owned());
    }
    let mut got = Vec::new();
    while got.len() < n {
        got.push(
            b.recv_type("new_message").await["message"]["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(got, sent, "every message, in order, on the other gateway");
    let rows = eventually("stored by two workers", || async {
        let rows = stored(&pool, conv).await;
        (rows.len() >= n).then_some(rows)
    })
    .await;
    let seqs: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(
        seqs,
        (1..=n as i64).collect::<Vec<_>>(),
        "gap-free with two workers"
    );
    // message_persisted reaches the other gateway's clients too.
    b.recv_type("message_persisted").await;

    // Gateway A dies without a word: its user goes offline, once.
    signal(&gw_a, "-KILL");
    assert!(!wait_exit(gw_a).await.success());
    let p = b.recv_where(|v| v["type"] == "presence").await;
    assert_eq!(
        (p["user_id"].as_str(), p["status"].as_str()),
        (Some(alice.to_string().as_str()), Some("offline"))
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let pong = b.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "ack");
    let mut extra = 0;
    while let Ok(v) = tokio::time::timeout(Duration::from_millis(50), b.recv()).await {
        if v["type"] == "presence" {
            extra += 1;
        }
    }
    assert_eq!(extra, 0, "offline is announced once");
    // B is unaffected.
    let (status, _) = raw_http(b_addr, "GET", "/healthz", "", None).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_gateway_relays_nothing_and_one_that_starts_is_relayed_to_from_its_first_client() {
    let (db_url, pool) = fresh_database().await;
    let mut wire = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    wire.listen(postline::notify::EVENTS_CHANNEL).await.unwrap();
    // A looks at the gateways table once at start, then not for a minute:
    // only B's announcement can tell A that B is there.
    let (_gw_a, a_addr) =
        gateway_with(&db_url, &[("POSTLINE_PRESENCE_HEARTBEAT_MS", "60000")]).await;
    let (alice, bob) = (uid(), uid());
    let conv = create_conversation(a_addr, alice, &[bob]).await;
    let mut a = client(a_addr, alice).await;
    a.join(conv).await;

    // Alone, A's sends (and its presence) leave nothing on the relay channel.
    let deadline = tokio::time::Instant::now() + WAIT;
    for n in 0.. {
        let ack = a.send_text(conv, &format!("alone {n}"), "hello?").await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let mut relayed = false;
        while let Ok(got) = tokio::time::timeout(Duration::from_millis(300), wire.recv()).await {
            let nil = postline::notify::NO_GATEWAY.to_string();
            relayed |= !got.unwrap().payload().contains(&nil);
        }
        if !relayed {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a lone gateway kept relaying"
        );
    }

    // B starts. Before any client of B says a word, its announcement alone
    // turns A's relay on (A's next look at the table is a minute away). B
    // announces before it answers /healthz, but A hears it on its own
    // LISTEN connection, in its own time: on a loaded machine A's first
    // send after that can still come first, so A sends until one is relayed.
    let (_gw_b, b_addr) = gateway(&db_url).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    for n in 0.. {
        let ack = a
            .send_text(conv, &format!("b is up {n}"), "still alone?")
            .await;
        let id = ack["message_id"].as_str().unwrap().to_owned();
        let mut relayed = false;
        while let Ok(got) = tokio::time::timeout(Duration::from_millis(300), wire.recv()).await {
            relayed |= got.unwrap().payload().contains(&id);
        }
        if relayed {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "A relays once B has announced itself"
        );
    }
    // And B's first client hears A's next message.
    let mut b = client(b_addr, bob).await;
    b.join(conv).await;
    let ack = a.send_text(conv, "together", "anyone?").await;
    let m = b.recv_type("new_message").await;
    assert_eq!(
        m["message"]["id"], ack["message_id"],
        "relayed to the newcomer"
    );
    assert_eq!(m["message"]["content"], "anyone?");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_gateway_sends_its_clients_elsewhere_and_they_lose_nothing() {
    let (db_url, pool) = fresh_database().await;
    let (_gw_a, a_addr) = gateway(&db_url).await;
    let (gw_b, b_addr) = gateway(&db_url).await;
    let _w = worker(&db_url);
    let (dave, carol) = (uid(), uid());
    let conv = create_conversation(a_addr, dave, &[carol]).await;
    let mut d = client(a_addr, dave).await;
    d.join(conv).await;
    let mut c = client(b_addr, carol).await;
    c.join(conv).await;

    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(
            d.send_text(conv, &format!("pre{i}"), "before").await["message_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut seen: HashSet<String> = HashSet::new();
    let mut last_seq = 0;
    while seen.len() < 20 {
        let v = c
            .recv_where(|v| v["type"] == "new_message" || v["type"] == "message_persisted")
            .await;
        if v["type"] == "new_message" {
            seen.insert(v["message"]["id"].as_str().unwrap().to_owned());
        } else {
            last_seq = last_seq.max(v["seq"].as_i64().unwrap());
        }
    }

    signal(&gw_b, "-TERM");
    let notice = c.recv_type("reconnect").await;
    let after = notice["after_ms"].as_u64().unwrap();
    assert!(after < 300, "within the drain window: {after}");
    assert_eq!(c.close_or_reset().await, Some(1001));
    assert!(wait_exit(gw_b).await.success(), "drained and exited 0");

    // Meanwhile the conversation goes on.
    for i in 0..20 {
        sent.push(
            d.send_text(conv, &format!("post{i}"), "after").await["message_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    tokio::time::sleep(Duration::from_millis(after)).await;
    let mut c = client(a_addr, carol).await;
    let mut after_seq = last_seq;
    loop {
        let r = c.request(json!({"type": "resume", "conversations": [{"conversation_id": conv, "after_seq": after_seq}]})).await;
        let page = &r["conversations"][0];
        for m in page["messages"].as_array().unwrap() {
            seen.insert(m["id"].as_str().unwrap().to_owned());
        }
        after_seq = page["last_seq"].as_i64().unwrap();
        if page["has_more"] == false && seen.len() >= sent.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent_set: HashSet<String> = sent.iter().cloned().collect();
    assert_eq!(seen, sent_set, "nothing lost across the drain");
    eventually("all stored", || async {
        (stored(&pool, conv).await.len() >= 40).then_some(())
    })
    .await;
    assert_eq!(stored(&pool, conv).await.len(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_told_to_resync_when_the_listen_connection_comes_back() {
    let app = TestApp::spawn().await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    let mut c = app.ws(a).await;
    c.join(conv).await;
    // Kill the gateway's LISTEN backend, as a network blip or a pooler would.
    let killed: Vec<bool> = sqlx::query_scalar(
        "select pg_terminate_backend(pid) from pg_stat_activity
         where datname = current_database() and query ilike 'listen%'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(!killed.is_empty(), "found the LISTEN connection");
    // The listener reconnects at once and the client hears it may have missed some.
    let ack = c.send_text(conv, "m1", "during the blip").await;
    assert_eq!(ack["type"], "ack");
    let v = c.recv_where(|v| v["type"] == "resync").await;
    assert_eq!(v["type"], "resync");
    // And live hints flow again.
    let ack = c.send_text(conv, "m2", "after").await;
    let p = c
        .recv_where(|v| v["type"] == "message_persisted" && v["message_id"] == ack["message_id"])
        .await;
    assert_eq!(p["seq"], 2);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_reaches_many_contacts_elsewhere_in_few_multi_user_events_and_big_frames_go_by_reference(
) {
    let (db_url, pool) = fresh_database().await;
    // Watch the relay channel itself, to see how events travel, not only that they arrive.
    let mut wire = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    wire.listen(postline::notify::EVENTS_CHANNEL).await.unwrap();
    let (_gw_a, a_addr) = gateway(&db_url).await;
    let (_gw_b, b_addr) = gateway(&db_url).await;

    // Alice shares a conversation with 300 users (more than one relay event
    // holds); three of them, spread over the list, are connected to B.
    let alice = uid();
    let alice_s = alice.to_string();
    let contacts: Vec<postline::domain::UserId> = (0..300).map(|_| uid()).collect();
    let conv = create_conversation(a_addr, alice, &contacts).await;
    let mut on_b = Vec::new();
    for u in [contacts[0], contacts[150], contacts[299]] {
        let mut c = client(b_addr, u).await;
        c.join(conv).await;
        on_b.push(c);
    }

    let mut a = client(a_addr, alice).await;
    for c in &mut on_b {
        let p = c
            .recv_where(|v| v["type"] == "presence" && v["user_id"] == alice_s.as_str())
            .await;
        assert_eq!(p["status"], "online", "presence crosses gateways");
    }
    // On the wire: a couple of `users` events, the frame in each once, that
    // together name every contact; no event per contact.
    let mut reached: HashSet<String> = HashSet::new();
    let mut notifies = 0;
    while reached.len() < contacts.len() {
        let n = tokio::time::timeout(WAIT, wire.recv())
            .await
            .expect("alice's presence on the relay channel in time")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(n.payload()).unwrap();
        let mut carried = false;
        for e in v["e"].as_array().into_iter().flatten() {
            let f = &e["f"];
            if f["type"] == "presence" && f["user_id"] == alice_s.as_str() {
                assert_eq!(e["t"], "users", "one event for many users: {e}");
                assert_eq!(f["status"], "online");
                carried = true;
                reached.extend(
                    e["us"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|u| u.as_str().unwrap().to_owned()),
                );
            }
        }
        notifies += usize::from(carried);
    }
    let all: HashSet<String> = contacts.iter().map(|u| u.to_string()).collect();
    assert_eq!(reached, all, "every contact named, none twice over");
    assert!(notifies <= 2, "300 contacts in {notifies} NOTIFYs");

    // A message whose frame exceeds a NOTIFY payload (4000 quotes are 8000
    // bytes once JSON-escaped) still reaches the other gateway, by reference.
    a.join(conv).await;
    let big = "\"".repeat(4000);
    let ack = a.send_text(conv, "big", &big).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let id = ack["message_id"].as_str().unwrap().to_owned();
    for c in &mut on_b {
        let m = c
            .recv_where(|v| v["type"] == "new_message" && v["message"]["id"] == id.as_str())
            .await;
        assert_eq!(m["message"]["content"], big.as_str());
    }
    let row = loop {
        let n = tokio::time::timeout(WAIT, wire.recv())
            .await
            .expect("the big batch's reference on the relay channel in time")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(n.payload()).unwrap();
        if let Some(row) = v["r"].as_i64() {
            break row;
        }
    };
    let payload: String = sqlx::query_scalar("select payload from relay_payloads where id = $1")
        .bind(row)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        payload.contains(&id),
        "the referenced row holds the message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_of_a_drained_gateway_who_do_not_return_go_offline_once_elsewhere() {
    let (db_url, _pool) = fresh_database().await;
    let (_gw_a, a_addr) = gateway(&db_url).await;
    let (gw_b, b_addr) = gateway(&db_url).await;
    let (carol, erin, frank) = (uid(), uid(), uid());
    create_conversation(a_addr, carol, &[erin, frank]).await;
    let mut c = client(a_addr, carol).await;
    let _e = client(b_addr, erin).await;
    let _f = client(b_addr, frank).await;
    for _ in 0..2 {
        let p = c.recv_type("presence").await;
        assert_eq!(p["status"], "online", "{p}");
    }

    signal(&gw_b, "-TERM");
    assert!(wait_exit(gw_b).await.success(), "drained and exited 0");
    // Frank comes back through the other gateway; Erin does not.
    let _f = client(a_addr, frank).await;

    // Three missed heartbeats (300 ms each) and a reap later, and then some.
    let frames = c.frames_for(Duration::from_secs(3)).await;
    let offline = |user: postline::domain::UserId| {
        frames
            .iter()
            .filter(|v| {
                v["type"] == "presence"
                    && v["user_id"] == user.to_string().as_str()
                    && v["status"] == "offline"
            })
            .count()
    };
    assert_eq!(
        offline(erin),
        1,
        "erin announced offline exactly once: {frames:?}"
    );
    assert_eq!(offline(frank), 0, "frank reconnected; no flap: {frames:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_presence_crosses_gateways_and_a_dead_gateway_s_users_leave_once() {
    let (db_url, _pool) = fresh_database().await;
    let (_gw_a, a_addr) = gateway(&db_url).await;
    let (gw_b, b_addr) = gateway(&db_url).await;
    let (alice, bob, carol) = (uid(), uid(), uid());
    let conv = create_conversation(a_addr, alice, &[bob, carol]).await;
    let mut a = client(a_addr, alice).await;
    a.join(conv).await;

    // Bob enters on the other gateway: Alice hears it, Bob's ack lists her.
    let mut b = client(b_addr, bob).await;
    let ack = b.join(conv).await;
    assert_eq!(present(&ack), ids(&[alice, bob]));
    let entered = a
        .recv_where(|f| f["type"] == "user_joined" && f["user_id"] == bob.0.to_string())
        .await;
    assert_eq!(entered["conversation_id"], conv.to_string());

    // Bob also on gateway A (a second device): no second announcement, and
    // leaving there keeps him in through gateway B.
    let mut b_on_a = client(a_addr, bob).await;
    b_on_a.join(conv).await;
    b_on_a
        .request(json!({"type": "leave_conversation", "conversation_id": conv}))
        .await;
    let frames = a.frames_for(Duration::from_millis(500)).await;
    assert!(
        !frames
            .iter()
            .any(|f| f["type"] == "user_joined" || f["type"] == "user_left"),
        "{frames:?}"
    );

    // Gateway B dies without a word: once its heartbeat is overdue, Bob's
    // presence there is reaped and his departure announced, once.
    signal(&gw_b, "-KILL");
    let left = a
        .recv_where(|f| f["type"] == "user_left" && f["user_id"] == bob.0.to_string())
        .await;
    assert_eq!(left["conversation_id"], conv.to_string());
    let frames = a.frames_for(Duration::from_millis(1500)).await;
    assert!(
        !frames.iter().any(|f| f["type"] == "user_left"),
        "announced once: {frames:?}"
    );
    // Carol, arriving now, sees only Alice.
    let mut c = client(a_addr, carol).await;
    let ack = c.join(conv).await;
    assert_eq!(present(&ack), ids(&[alice, carol]));
}

/// The join ack's `present` list, sorted.
fn present(ack: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = ack["present"]
        .as_array()
        .unwrap_or_else(|| panic!("no present list: {ack}"))
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

fn ids(users: &[postline::domain::UserId]) -> Vec<String> {
    let mut v: Vec<String> = users.iter().map(|u| u.0.to_string()).collect();
    v.sort();
    v
}
