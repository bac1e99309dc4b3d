//! sync and resume: history after a seq, then live delivery, with no gap,
//! no duplicate, and never holding up the connection.

use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::Duration;

use crate::harness::*;
use crate::realtime::{send_n, wait_stored};

fn ids_of(page: &Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_missed_100_messages_recovers_them_all_in_order_once() {
    let app = TestApp::spawn().await;
    let (a, b) = (uid(), uid());
    let conv = app.conversation(a, &[b]).await;
    let mut alice = app.ws(a).await;
    alice.join(conv).await;
    let mut bob = app.ws(b).await;
    bob.join(conv).await;
    let before = send_n(&mut alice, conv, "early", 3).await;
    for _ in 0..3 {
        bob.recv_type("new_message").await;
    }
    drop(bob); // offline
    let missed = send_n(&mut alice, conv, "missed", 100).await;
    wait_stored(&app, conv, 103).await;

    let mut bob = app.ws(b).await;
    let r = bob
        .request(
            json!({"type": "resume", "conversations": [{"conversation_id": conv, "after_seq": 3}]}),
        )
        .await;
    assert_eq!(r["type"], "ack", "{r}");
    let first = &r["conversations"][0];
    assert_eq!(first["has_more"], true);
    let mut got = ids_of(first);
    assert_eq!(got.len(), 50);
    let mut after = first["last_seq"].as_i64().unwrap();
    loop {
        let page = bob
            .request(
                json!({"type": "sync", "conversation_id": conv, "after_seq": after, "limit": 30}),
            )
            .await;
        got.extend(ids_of(&page));
        after = page["last_seq"].as_i64().unwrap();
        if page["has_more"] == false {
            break;
        }
    }
    assert_eq!(got, missed, "all 100, in order, once");
    assert!(!got.iter().any(|id| before.contains(id)));
    // And live delivery goes on after the resume.
    let live = alice.send_text(conv, "after", "welcome back").await;
    let m = bob.recv_type("new_message").await;
    assert_eq!(m["message"]["id"], live["message_id"]);
    wait_stored(&app, conv, 104).await;
    // resume reports per-conversation errors without failing the rest.
    let r = bob
        .request(json!({"type": "resume", "conversations": [{"conversation_id": uuid::Uuid::now_v7()}, {"conversation_id": conv, "after_seq": 103}]}))
        .await;
    assert_eq!(r["conversations"][0]["error"]["code"], "not_found");
    // The one message after 103 already reached this connection live: not repeated.
    assert!(ids_of(&r["conversations"][1]).is_empty());
    assert_eq!(r["conversations"][1]["last_seq"], 104);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_racing_live_sends_has_no_gap_and_no_duplicate() {
    let app = TestApp::spawn().await;
    let (a, b) = (uid(), uid());
    let conv = app.conversation(a, &[b]).await;
    let mut alice = app.ws(a).await;
    alice.join(conv).await;
    let total = 300;
    let sender = tokio::spawn(async move {
        for i in 0..total {
            alice
                .send(json!({"type": "send_message", "conversation_id": conv, "client_message_id": format!("r{i}"), "content": format!("race {i}")}))
                .await;
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        alice
    });
    // Bob arrives mid-stream and syncs from the start while messages keep coming.
    tokio::time::sleep(Duration::from_millis(15)).await;
    let mut bob = app.ws(b).await;
    let mut seen: Vec<String> = Vec::new();
    let mut after = 0;
    loop {
        let page = bob
            .request(
                json!({"type": "sync", "conversation_id": conv, "after_seq": after, "limit": 40}),
            )
            .await;
        assert_eq!(page["type"], "ack", "{page}");
        seen.extend(ids_of(&page));
        after = page["last_seq"].as_i64().unwrap();
        if page["has_more"] == false {
            break;
        }
    }
    let _alice = sender.await.unwrap();
    // Everything not in history arrives live.
    while seen.len() < total {
        let m = bob.recv_type("new_message").await;
        seen.push(m["message"]["id"].as_str().unwrap().to_owned());
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no duplicate");
    assert_eq!(seen.len(), total, "no gap");
    wait_stored(&app, conv, total).await;
    let stored_ids: HashSet<String> = stored(&app.pool, conv)
        .await
        .iter()
        .map(|r| r.1.to_string())
        .collect();
    assert_eq!(stored_ids, seen.iter().cloned().collect::<HashSet<_>>());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_resume_does_not_hold_up_pings_or_sends() {
    let app = TestApp::spawn().await;
    let Pair {
        a, conv, mut alice, ..
    } = app.pair().await;
    let first = alice.send_text(conv, "m1", "before").await;
    assert_eq!(first["type"], "ack", "{first}");
    eventually("the first message stored", || async {
        (!stored(&app.pool, conv).await.is_empty()).then_some(())
    })
    .await;
    // Another device of Alice's: "before" did not reach it live, so its
    // resume must bring it.
    let mut alice = {
        let mut device = app.ws(a).await;
        device.join(conv).await;
        device
    };

    // History reads now block behind a lock held by another transaction.
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("lock table messages in access exclusive mode")
        .execute(&mut *lock)
        .await
        .unwrap();
    alice
        .send(
            json!({"type": "resume", "ref": "slow", "conversations": [{"conversation_id": conv}]}),
        )
        .await;

    // The connection still answers while the resume waits on Postgres.
    let pong = alice.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "ack", "{pong}");
    assert!(pong["server_time"].is_string(), "{pong}");
    let sent = alice.send_text(conv, "m2", "during").await;
    assert_eq!(sent["type"], "ack", "{sent}");
    assert!(
        !alice.pending_has(|v| v["ref"] == "slow"),
        "the resume cannot have answered while history is locked"
    );

    lock.rollback().await.unwrap();
    let resumed = alice.recv_where(|v| v["ref"] == "slow").await;
    assert_eq!(resumed["type"], "ack", "{resumed}");
    let page = &resumed["conversations"][0];
    assert_eq!(page["conversation_id"], conv.to_string(), "{resumed}");
    assert_eq!(page["messages"][0]["content"], "before", "{resumed}");
    app.stop().await;
}
