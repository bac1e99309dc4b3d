//! Fault injection against a real Postgres that the test stops and restarts.
//! Each test owns its cluster (the shared one of the e2e suite must not be
//! restarted under other tests' feet).

#[path = "e2e/harness.rs"]
#[allow(dead_code)]
mod harness;
#[path = "e2e/raw.rs"]
#[allow(dead_code)]
mod raw;

use std::collections::HashMap;
use std::time::Duration;

use harness::*;
use postline::pglocal::{Cluster, ClusterOptions};
use serde_json::{json, Value};

async fn private_app(tweak: impl FnOnce(&mut Options)) -> (Cluster, TestApp) {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default()))
        .await
        .unwrap()
        .expect("start a private cluster");
    let (url, pool) = fresh_database_on(&cluster).await;
    let mut opts = Options::default();
    tweak(&mut opts);
    let app = TestApp::spawn_on(url, pool, opts).await;
    (cluster, app)
}

/// pg_ctl blocks; let the runtime move other tasks off this thread meanwhile.
async fn stop(cluster: &Cluster) {
    tokio::task::block_in_place(|| cluster.stop_server().expect("stop postgres"));
}

async fn start(cluster: &Cluster) {
    tokio::task::block_in_place(|| cluster.start_server().expect("start postgres"));
}

fn send(conv: uuid::Uuid, i: usize) -> Value {
    json!({"type": "send_message", "ref": format!("s{i}"), "conversation_id": conv,
           "client_message_id": format!("m{i:04}"), "content": format!("message {i}")})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_during_a_stream_of_sends_loses_and_duplicates_nothing() {
    let (cluster, app) = private_app(|_| {}).await;
    let Pair {
        conv,
        mut alice,
        mut bob,
        ..
    } = app.pair().await;

    let n = 150;
    for i in 0..n {
        if i == 50 {
            stop(&cluster).await;
        }
        if i == 100 {
            start(&cluster).await;
        }
        alice.send(send(conv, i)).await;
        if i == 60 {
            // A retry while the original is not yet durable: it must not be
            // acked before the original is.
            let mut again = send(conv, 55);
            again["ref"] = json!("again");
            alice.send(again).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Live chat went on while Postgres was down: bob saw every message at once.
    let mut seen = 0;
    while seen < n {
        bob.recv_type("new_message").await;
        seen += 1;
    }
    // Every send got exactly one reply; with the default buffer, all are acks.
    let mut replies: HashMap<String, Value> = HashMap::new();
    while replies.len() < n + 1 {
        let r = alice
            .recv_where(|v| v["type"] == "ack" || v["type"] == "error")
            .await;
        let key = r["ref"].as_str().unwrap().to_owned();
        assert!(replies.insert(key, r).is_none(), "one reply per ref");
    }
    let errors: Vec<&Value> = replies.values().filter(|r| r["type"] == "error").collect();
    assert!(errors.is_empty(), "{errors:?}");
    let again = replies.remove("again").unwrap();
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["message_id"], replies["s55"]["message_id"]);

    let rows = eventually("every acked message stored", || async {
        let rows = stored(&app.pool, conv).await;
        (rows.len() >= n).then_some(rows)
    })
    .await;
    assert_eq!(rows.len(), n, "stored exactly once");
    let seqs: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(seqs, (1..=n as i64).collect::<Vec<_>>(), "gap-free");
    let cmids: Vec<String> = rows.iter().map(|r| r.2.clone()).collect();
    let mut sorted = cmids.clone();
    sorted.sort();
    assert_eq!(cmids, sorted, "seq order is send order");
    for (i, row) in rows.iter().enumerate() {
        let ack = &replies[&format!("s{i}")];
        assert_eq!(
            ack["message_id"].as_str().unwrap(),
            row.1.to_string(),
            "the acked id is the stored id"
        );
    }

    // The LISTEN connection came back too: a new message is confirmed.
    // Waited for first: the worker may be back (and have stored everything
    // above) before the listener's reconnect backoff runs out, and what is
    // persisted meanwhile is announced by `resync`, not `message_persisted`.
    eventually("the LISTEN connection is back", || async {
        let listening: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity where query ilike 'listen %'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        (listening > 0).then_some(())
    })
    .await;
    let ack = alice.send_text(conv, "after", "still there?").await;
    assert_eq!(ack["type"], "ack");
    let p = bob
        .recv_where(|v| v["type"] == "message_persisted" && v["message_id"] == ack["message_id"])
        .await;
    assert_eq!(p["seq"], n as i64 + 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_persist_buffer_refuses_sends_and_readyz_reports_it() {
    let (cluster, app) = private_app(|o| {
        o.config.enqueue.capacity = 4;
        o.config.enqueue.max_batch = 2;
    })
    .await;
    let Pair {
        conv,
        mut alice,
        mut bob,
        ..
    } = app.pair().await;

    stop(&cluster).await;
    let n = 12;
    for i in 0..n {
        alice.send(send(conv, i)).await;
    }
    // Refusals come at once; acks cannot come while Postgres is down.
    let mut refused = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        let r = tokio::time::timeout(
            Duration::from_millis(300),
            alice.recv_where(|v| v["type"] == "error" || v["type"] == "ack"),
        )
        .await;
        match r {
            Ok(r) => {
                assert_eq!(r["type"], "error", "no ack while the database is down: {r}");
                assert_eq!(r["code"], "unavailable");
                refused.push(r["ref"].as_str().unwrap().to_owned());
            }
            Err(_) => break,
        }
    }
    assert!(
        !refused.is_empty(),
        "the buffer (4) and one batch (2) cannot hold 12"
    );
    assert!(
        refused.len() <= n - 4,
        "what fits in the buffer is kept: {refused:?}"
    );

    let (status, v) = app.http("GET", "/readyz", None, None).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["database"], "unreachable");
    let state = v["persist_buffer"]["state"].as_str().unwrap();
    assert!(state == "retrying" || state == "full", "{v}");
    assert_eq!(v["persist_buffer"]["capacity"], 4);

    start(&cluster).await;
    let accepted = n - refused.len();
    let mut acked = Vec::new();
    while acked.len() < accepted {
        let r = alice
            .recv_where(|v| v["type"] == "error" || v["type"] == "ack")
            .await;
        assert_eq!(r["type"], "ack", "{r}");
        acked.push(r["ref"].as_str().unwrap().to_owned());
    }
    // Refused sends were not broadcast; accepted ones were, and are stored once.
    let mut broadcast = Vec::new();
    while broadcast.len() < accepted {
        let m = bob.recv_type("new_message").await;
        broadcast.push(
            m["message"]["client_message_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let rows = eventually("accepted messages stored", || async {
        let rows = stored(&app.pool, conv).await;
        (rows.len() >= accepted).then_some(rows)
    })
    .await;
    let mut stored_ids: Vec<String> = rows.iter().map(|r| r.2.clone()).collect();
    stored_ids.sort();
    broadcast.sort();
    assert_eq!(stored_ids, broadcast);
    for r in &refused {
        let cmid = format!(
            "m{:04}",
            r.trim_start_matches('s').parse::<usize>().unwrap()
        );
        assert!(
            !stored_ids.contains(&cmid),
            "{cmid} was refused, so it is not stored"
        );
    }
    // A refused message can be sent again with its client_message_id.
    let i: usize = refused[0].trim_start_matches('s').parse().unwrap();
    let ack = alice.request(send(conv, i)).await;
    assert_eq!(
        (ack["type"].as_str(), ack["duplicate"].as_bool()),
        (Some("ack"), Some(false)),
        "{ack}"
    );

    let (status, v) = app.http("GET", "/readyz", None, None).await;
    assert_eq!(
        (status, v["persist_buffer"]["state"].as_str()),
        (200, Some("ok")),
        "{v}"
    );
    app.stop().await;
}
