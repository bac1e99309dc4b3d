use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_see_each_others_messages_in_order() {
    let app = TestApp::spawn().await;
    let (a, b, c) = (uid(), uid(), uid());
    let conv = app.conversation(a, &[b, c]).await;
    let mut clients = [app.ws(a).await, app.ws(b).await, app.ws(c).await];
    for cl in clients.iter_mut() {
        let ack = cl.join(conv).await;
        assert_eq!(ack["conversation_id"], conv.to_string());
        assert_eq!(ack["last_seq"], 0);
    }
    // Each client sends 5 messages, interleaved.
    let mut sent = Vec::new();
    for round in 0..5 {
        for (i, cl) in clients.iter_mut().enumerate() {
            let cmid = format!("c{i}-{round}");
            let ack = cl
                .send_text(conv, &cmid, &format!("hello {round} from {i}"))
                .await;
            assert_eq!(ack["type"], "ack", "{ack}");
            assert_eq!(ack["duplicate"], false);
            assert_eq!(ack["client_message_id"], cmid.as_str());
            sent.push(ack["message_id"].as_str().unwrap().to_owned());
        }
    }
    // Every client, the senders included, sees all 15 new_message in send order.
    for cl in clients.iter_mut() {
        let mut seen = Vec::new();
        while seen.len() < sent.len() {
            let ev = cl.recv_type("new_message").await;
            let m = &ev["message"];
            assert_eq!(m["conversation_id"], conv.to_string());
            assert_eq!(m["kind"], "text");
            assert!(m["content"].as_str().unwrap().starts_with("hello"));
            seen.push(m["id"].as_str().unwrap().to_owned());
        }
        assert_eq!(seen, sent);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_persisted_arrives_with_gap_free_seqs_and_history_returns_them() {
    let app = TestApp::spawn().await;
    let Pair {
        a,
        b,
        conv,
        mut alice,
        mut bob,
    } = app.pair().await;
    let n = 30;
    let mut ids = Vec::new();
    for i in 0..n {
        let ack = alice
            .send_text(conv, &format!("m{i}"), &format!("text {i}"))
            .await;
        ids.push(ack["message_id"].as_str().unwrap().to_owned());
    }
    for client in [&mut alice, &mut bob] {
        let mut seqs = Vec::new();
        for _ in 0..n {
            let p = client.recv_type("message_persisted").await;
            assert_eq!(p["conversation_id"], conv.to_string());
            seqs.push((
                p["seq"].as_i64().unwrap(),
                p["message_id"].as_str().unwrap().to_owned(),
            ));
        }
        seqs.sort();
        let expected: Vec<(i64, String)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (i as i64 + 1, id.clone()))
            .collect();
        assert_eq!(seqs, expected, "seq 1..n in send order");
    }

    // History: the newest page by default, then paging forward and backward.
    let path = format!("/v1/conversations/{conv}/messages");
    let (status, v) = app
        .http("GET", &format!("{path}?limit=10"), Some(b), None)
        .await;
    assert_eq!(status, 200, "{v}");
    let msgs = v["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 10);
    assert_eq!(msgs[0]["seq"], 21);
    assert_eq!(msgs[9]["seq"], 30);
    assert_eq!(v["has_more"], true);
    assert_eq!(msgs[9]["content"], "text 29");
    assert_eq!(msgs[9]["sender_id"], a.to_string());
    assert_eq!(msgs[9]["client_message_id"], "m29");

    let (_, v) = app
        .http("GET", &format!("{path}?after_seq=25"), Some(a), None)
        .await;
    let seqs: Vec<i64> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![26, 27, 28, 29, 30]);
    assert_eq!(v["has_more"], false);

    let (_, v) = app
        .http("GET", &format!("{path}?before_seq=4"), Some(a), None)
        .await;
    let seqs: Vec<i64> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);

    let (_, v) = app
        .http(
            "GET",
            &format!("{path}?after_seq=2&before_seq=6&limit=2"),
            Some(a),
            None,
        )
        .await;
    let seqs: Vec<i64> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![3, 4]);
    assert_eq!(v["has_more"], true);

    // A later join reports the last persisted seq.
    let mut late = app.ws(b).await;
    assert_eq!(late.join(conv).await["last_seq"], 30);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_persisted_waits_for_the_connection_s_next_write_and_keeps_its_place() {
    // A hold no test outlasts: a confirmation held can only leave with the
    // connection's next write.
    let mut opts = Options::default();
    opts.config.gateway.persisted_hold = Duration::from_secs(3600);
    let app = TestApp::spawn_with(opts).await;
    let Pair {
        conv,
        mut alice,
        mut bob,
        ..
    } = app.pair().await;
    // A message a second gives bob's connection a rhythm: the next message
    // is expected within the hold, so the last one's confirmation waits.
    let mut last = serde_json::Value::Null;
    for (i, text) in ["one", "two", "three"].into_iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        last = alice.send_text(conv, &format!("m{i}"), text).await["message_id"].clone();
        assert_eq!(bob.recv_type("new_message").await["message"]["id"], last);
    }
    // The gateway has heard that all three are stored and queued their
    // confirmations.
    eventually(
        "the worker's confirmations to reach the gateway",
        || async {
            let (_, _, text) = crate::ops::get_text(app.addr, "/metrics", "").await;
            text.contains("postline_messages_persisted_notified_total 3\n")
                .then_some(())
        },
    )
    .await;
    let quiet = bob.frames_for(Duration::from_millis(300)).await;
    assert!(
        !quiet
            .iter()
            .any(|f| f["type"] == "message_persisted" && f["message_id"] == last),
        "held, not written alone: {quiet:?}"
    );

    // The next write carries it, ahead of what was queued after it.
    let next = alice.send_text(conv, "m3", "four").await["message_id"].clone();
    let chat = |f: &serde_json::Value| {
        f["type"] == "new_message" || (f["type"] == "message_persisted" && f["message_id"] == last)
    };
    let p = bob.recv_where(chat).await;
    assert_eq!(p["type"], "message_persisted", "{p}");
    assert_eq!(p["seq"], 3);
    assert_eq!(bob.recv_where(chat).await["message"]["id"], next);

    // A confirmation held when the client closes is written before the
    // close, not dropped with the connection.
    eventually("the confirmation of the fourth message", || async {
        let (_, _, text) = crate::ops::get_text(app.addr, "/metrics", "").await;
        text.contains("postline_messages_persisted_notified_total 4\n")
            .then_some(())
    })
    .await;
    bob.send_raw(WsMessage::Close(None)).await;
    let rest = bob.frames_for(Duration::from_secs(5)).await;
    assert!(
        rest.iter()
            .any(|f| f["type"] == "message_persisted" && f["message_id"] == next),
        "{rest:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_client_message_id_is_acked_not_rebroadcast_nor_stored_twice() {
    let app = TestApp::spawn().await;
    let Pair {
        conv,
        mut alice,
        mut bob,
        ..
    } = app.pair().await;

    let first = alice.send_text(conv, "same-id", "once").await;
    assert_eq!(first["duplicate"], false);
    let again = alice.send_text(conv, "same-id", "once, retried").await;
    assert_eq!(again["type"], "ack");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["message_id"], first["message_id"]);
    // Another user may use the same client id: it is their own message.
    let bobs = bob.send_text(conv, "same-id", "mine").await;
    assert_eq!(bobs["duplicate"], false);
    // A marker proves nothing else was broadcast in between.
    alice.send_text(conv, "marker", "end").await;

    let mut contents = Vec::new();
    loop {
        let m = bob.recv_type("new_message").await;
        let text = m["message"]["content"].as_str().unwrap().to_owned();
        if text == "end" {
            break;
        }
        contents.push(text);
    }
    assert_eq!(contents, vec!["once", "mine"]);

    let rows = eventually("three stored messages", || async {
        let rows = stored(&app.pool, conv).await;
        (rows.len() == 3).then_some(rows)
    })
    .await;
    let ids: Vec<String> = rows.iter().map(|r| r.2.clone()).collect();
    assert_eq!(ids, vec!["same-id", "same-id", "marker"]);
    assert_eq!(rows[0].1.to_string(), first["message_id"].as_str().unwrap());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_members_and_unjoined_connections_are_refused() {
    let app = TestApp::spawn().await;
    let (a, stranger) = (uid(), uid());
    let conv = app.conversation(a, &[]).await;
    let mut s = app.ws(stranger).await;

    let r = s
        .request(json!({"type": "join_conversation", "conversation_id": conv}))
        .await;
    assert_eq!(
        (r["type"].as_str(), r["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{r}"
    );
    let r = s
        .request(json!({"type": "join_conversation", "conversation_id": uuid::Uuid::now_v7()}))
        .await;
    assert_eq!(r["code"], "not_found", "{r}");
    let r = s.send_text(conv, "x", "let me in").await;
    assert_eq!(r["code"], "not_joined", "{r}");
    let r = s
        .request(json!({"type": "typing", "conversation_id": conv, "is_typing": true}))
        .await;
    assert_eq!(r["code"], "not_joined", "{r}");
    let r = s
        .request(json!({"type": "leave_conversation", "conversation_id": conv}))
        .await;
    assert_eq!(r["code"], "not_joined", "{r}");

    // The history API refuses too.
    let (status, v) = app.history(stranger, conv).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    // Nothing was stored.
    assert!(stored(&app.pool, conv).await.is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_stops_delivery_and_typing_reaches_the_others() {
    let app = TestApp::spawn().await;
    let Pair {
        a,
        conv,
        mut alice,
        mut bob,
        ..
    } = app.pair().await;

    let ack = alice
        .request(json!({"type": "typing", "conversation_id": conv, "is_typing": true}))
        .await;
    assert_eq!(ack["type"], "ack");
    let t = bob.recv_type("typing").await;
    assert_eq!(t["user_id"], a.to_string());
    assert_eq!(t["is_typing"], true);

    let ack = bob
        .request(json!({"type": "leave_conversation", "conversation_id": conv}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    alice.send_text(conv, "after-leave", "you left").await;
    // Bob's connection is alive but gets nothing for the conversation.
    let pong = bob.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "ack");
    assert!(pong["server_time"].is_string());
    let r = bob.send_text(conv, "b1", "still here?").await;
    assert_eq!(r["code"], "not_joined");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_are_announced_and_a_removed_user_is_evicted() {
    let app = TestApp::spawn().await;
    let (a, b, c) = (uid(), uid(), uid());
    let conv = app.conversation(a, &[b]).await;
    let mut alice = app.ws(a).await;
    let mut bob = app.ws(b).await;
    alice.join(conv).await;
    bob.join(conv).await;

    let body = json!({"user_id": c}).to_string();
    let (status, v) = app
        .http(
            "POST",
            &format!("/v1/conversations/{conv}/members"),
            Some(a),
            Some(&body),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let ev = bob.recv_type("member_joined").await;
    assert_eq!(ev["user_id"], c.to_string());
    // Adding again is not an error, and not announced twice.
    let (status, v) = app
        .http(
            "POST",
            &format!("/v1/conversations/{conv}/members"),
            Some(a),
            Some(&body),
        )
        .await;
    assert_eq!((status, v["added"].as_bool()), (200, Some(false)));

    let (status, _) = app
        .http(
            "DELETE",
            &format!("/v1/conversations/{conv}/members/{b}"),
            Some(a),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let ev = alice.recv_type("member_left").await;
    assert_eq!(ev["user_id"], b.to_string());
    let ev = bob.recv_type("member_left").await;
    assert_eq!(ev["user_id"], b.to_string());
    let r = bob.send_text(conv, "b-after", "am I out?").await;
    assert_eq!(r["code"], "not_joined", "{r}");
    let r = bob
        .request(json!({"type": "join_conversation", "conversation_id": conv}))
        .await;
    assert_eq!(r["code"], "forbidden", "{r}");
    let (status, v) = app
        .http(
            "DELETE",
            &format!("/v1/conversations/{conv}/members/{b}"),
            Some(a),
            None,
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_round_trip_through_broadcast_and_history() {
    let app = TestApp::spawn().await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    let mut alice = app.ws(a).await;
    alice.join(conv).await;
    let content = json!({"url": "https://cdn.example/cat.png", "name": "cat.png", "size": 1234, "mime": "image/png"});
    let ack = alice
        .request(
            json!({"type": "send_message", "conversation_id": conv, "client_message_id": "img",
                        "kind": "image", "content": content}),
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let m = alice.recv_type("new_message").await;
    assert_eq!(m["message"]["kind"], "image");
    assert_eq!(m["message"]["content"], content);
    alice.recv_type("message_persisted").await;
    let (_, v) = app.history(a, conv).await;
    assert_eq!(v["messages"][0]["content"], content);
    assert_eq!(v["messages"][0]["created_at"], m["message"]["created_at"]);
    app.stop().await;
}
