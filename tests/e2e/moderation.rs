//! Moderation: the word list on the send path (reject, mask, reload without
//! a restart) and the review hook (a real HTTP endpoint on 127.0.0.1) that
//! retracts a stored message for every member, on every gateway.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::SinkExt;
use postline::config::{ModerationAction, ModerationHookConfig, SigningSecret, WordListConfig};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use uuid::Uuid;

use crate::harness::*;
use crate::ops::get_text;
use crate::socketio::{connect, engine_io, event, next_text};
use crate::webhooks::receiver::{receiver_by, Received, Reply, HOOK_SECRET};

/// A word list in a file of its own, removed with the test's temp dir.
struct ListFile {
    dir: PathBuf,
    path: PathBuf,
}

impl ListFile {
    fn new(text: &str) -> ListFile {
        let dir = std::env::temp_dir().join(format!("postline-moderation-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("words.txt");
        std::fs::write(&path, text).unwrap();
        ListFile { dir, path }
    }

    /// Replace the list as an operator should: a new file renamed into
    /// place, so a reload never reads half of it.
    fn replace(&self, text: &str) {
        let tmp = self.dir.join("words.txt.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }
}

impl Drop for ListFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const LIST: &str = "# test list\ndarn\nbad phrase\n/fr[e3]{2}\\s*money/\n";

fn with_list(list: &ListFile, action: ModerationAction, poll: Option<Duration>) -> Options {
    let mut o = Options::default();
    o.config.moderation.words = Some(WordListConfig {
        path: list.path.clone(),
        action,
        poll,
    });
    o
}

fn send(conv: Uuid, cmid: &str, text: &str) -> Value {
    json!({"type": "send_message", "conversation_id": conv, "client_message_id": cmid, "content": text})
}

/// What a conversation's history holds, via the public API.
async fn history(app: &TestApp, user: postline::domain::UserId, conv: Uuid) -> Vec<Value> {
    let (status, v) = app
        .http(
            "GET",
            &format!("/v1/conversations/{conv}/messages?after_seq=0"),
            Some(user),
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v["messages"].as_array().unwrap().clone()
}

/// The audit rows of `action`, once the background queue is empty (the
/// worker has applied every audit job written so far).
async fn audited(
    pool: &sqlx::PgPool,
    action: &str,
) -> Vec<(String, Option<Uuid>, Option<Uuid>, Value)> {
    background_drained(pool, "the background queue drained").await;
    sqlx::query_as(
        "select actor_kind, conversation_id, message_id, detail from audit_log
         where action = $1 order by at",
    )
    .bind(action)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_word_is_refused_with_moderated_and_nothing_is_broadcast_or_stored() {
    let list = ListFile::new(LIST);
    let app = TestApp::spawn_with(with_list(&list, ModerationAction::Reject, None)).await;
    let mut p = app.pair().await;

    for (cmid, text) in [
        ("m1", "well DARN it"),
        ("m2", "that is a bad phrase."),
        ("m3", "get FREE  money now"),
    ] {
        let reply = p.alice.request(send(p.conv, cmid, text)).await;
        assert_eq!(reply["type"], "error", "{text}: {reply}");
        assert_eq!(reply["code"], "moderated", "{reply}");
    }
    // Whole words only: these pass, and are the only messages anyone sees.
    let ok = p
        .alice
        .send_text(p.conv, "m4", "darning socks, badphrase")
        .await;
    assert_eq!(ok["type"], "ack", "{ok}");
    let heard = p.bob.recv_type("new_message").await;
    assert_eq!(heard["message"]["client_message_id"], "m4");
    p.bob.recv_type("message_persisted").await;
    let rows = stored(&app.pool, p.conv).await;
    assert_eq!(rows.len(), 1, "only the clean message is stored: {rows:?}");
    assert_eq!(rows[0].2, "m4");
    assert!(
        !p.bob.pending_has(|v| v["type"] == "new_message"),
        "nothing refused was broadcast"
    );
    // A refused client_message_id holds nothing: sent clean, it goes through.
    let again = p.alice.send_text(p.conv, "m1", "well, drat").await;
    assert_eq!(again["type"], "ack", "{again}");
    assert_eq!(again["duplicate"], false);
    // Each refusal audited once, as the sender's, naming the conversation
    // and the client's id (a refused message has no id of its own).
    let rows = eventually("three refusals audited", || async {
        let rows = audited(&app.pool, "moderation.reject").await;
        (rows.len() == 3).then_some(rows)
    })
    .await;
    // Recorded off the send path, each in its own transaction: any order.
    let mut cmids: Vec<&str> = rows
        .iter()
        .map(|r| r.3["client_message_id"].as_str().unwrap_or_default())
        .collect();
    cmids.sort_unstable();
    assert_eq!(cmids, ["m1", "m2", "m3"], "{rows:?}");
    assert!(
        rows.iter().all(|r| r.0 == "user" && r.1 == Some(p.conv)),
        "{rows:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mask_mode_delivers_and_stores_the_masked_text_and_masks_edits() {
    let list = ListFile::new(LIST);
    let app = TestApp::spawn_with(with_list(&list, ModerationAction::Mask, None)).await;
    let mut p = app.pair().await;

    let ack = p
        .alice
        .send_text(p.conv, "m1", "oh Darn, a bad phrase")
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let expected = "oh ****, a *** ******";
    let live = p.bob.recv_type("new_message").await;
    assert_eq!(live["message"]["content"], expected);
    let own = p.alice.recv_type("new_message").await;
    assert_eq!(
        own["message"]["content"], expected,
        "the sender sees it masked too"
    );
    p.bob.recv_type("message_persisted").await;
    let h = history(&app, p.b, p.conv).await;
    assert_eq!(
        h[0]["content"], expected,
        "history matches what was broadcast"
    );

    let id = ack["message_id"].as_str().unwrap();
    let edited = p
        .alice
        .request(json!({"type": "edit_message", "message_id": id, "content": "darn again", "version": 1}))
        .await;
    assert_eq!(edited["type"], "ack", "{edited}");
    let updated = p.bob.recv_type("message_updated").await;
    assert_eq!(updated["message"]["content"], "**** again");
    let h = history(&app, p.b, p.conv).await;
    assert_eq!(h[0]["content"], "**** again");
    // One mask on the send, one on the edit.
    let rows = eventually("two masks audited", || async {
        let rows = audited(&app.pool, "moderation.mask").await;
        (rows.len() == 2).then_some(rows)
    })
    .await;
    let edit = rows
        .iter()
        .find(|r| r.3["on"] == "edit")
        .expect("the edit's mask");
    assert!(rows.iter().any(|r| r.3["on"] == "send"), "{rows:?}");
    assert_eq!(edit.2.map(|m| m.to_string()).as_deref(), Some(id));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_with_a_blocked_word_is_refused_and_the_message_keeps_its_text() {
    let list = ListFile::new(LIST);
    let app = TestApp::spawn_with(with_list(&list, ModerationAction::Reject, None)).await;
    let mut p = app.pair().await;
    let ack = p.alice.send_text(p.conv, "m1", "hello").await;
    p.alice.recv_type("message_persisted").await;
    let id = ack["message_id"].as_str().unwrap();
    let refused = p
        .alice
        .request(
            json!({"type": "edit_message", "message_id": id, "content": "darn you", "version": 1}),
        )
        .await;
    assert_eq!(refused["code"], "moderated", "{refused}");
    let h = history(&app, p.a, p.conv).await;
    assert_eq!(h[0]["content"], "hello");
    assert_eq!(h[0]["version"], 1);
    assert!(
        !p.bob
            .frames_for(Duration::from_millis(200))
            .await
            .iter()
            .any(|v| v["type"] == "message_updated"),
        "a refused edit is not broadcast"
    );
    app.stop().await;
}

/// Whether `text` is refused now (each try sends a new message).
async fn refused(c: &mut Client, conv: Uuid, text: &str) -> bool {
    let reply = c
        .request(send(conv, &Uuid::new_v4().simple().to_string(), text))
        .await;
    match reply["type"].as_str() {
        Some("ack") => false,
        _ => {
            assert_eq!(reply["code"], "moderated", "{reply}");
            true
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_reloads_when_the_file_changes_and_a_bad_file_keeps_the_one_in_use() {
    let list = ListFile::new("alpha\n");
    let app = TestApp::spawn_with(with_list(
        &list,
        ModerationAction::Reject,
        Some(Duration::from_millis(50)),
    ))
    .await;
    let mut p = app.pair().await;
    assert!(refused(&mut p.alice, p.conv, "alpha").await);
    assert!(!refused(&mut p.alice, p.conv, "beta").await);

    list.replace("alpha\nbeta\n");
    let conv = p.conv;
    let alice = &mut p.alice;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !refused(alice, conv, "beta").await {
        assert!(tokio::time::Instant::now() < deadline, "beta never blocked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A broken list (a bad regex on line 2): refused, the list in use stays.
    list.replace("gamma\n/(unclosed/\n");
    let addr = app.addr;
    eventually("the failed reload to be counted", || async move {
        let (_, _, text) = get_text(addr, "/metrics", "").await;
        text.contains("postline_moderation_list_loads_total{outcome=\"failed\"} 1")
            .then_some(())
    })
    .await;
    assert!(
        refused(&mut p.alice, p.conv, "beta").await,
        "the old list stays"
    );
    assert!(!refused(&mut p.alice, p.conv, "gamma").await);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_list_without_a_restart() {
    // Installed here first, so a SIGHUP raised before the server's own
    // handler is registered cannot end the test process.
    let mut _hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
    let list = ListFile::new("alpha\n");
    // No polling: only the signal reloads.
    let app = TestApp::spawn_with(with_list(&list, ModerationAction::Reject, None)).await;
    let mut p = app.pair().await;
    assert!(!refused(&mut p.alice, p.conv, "delta").await);
    list.replace("delta\n");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // Every try raises it again: the server may not listen yet.
        // SAFETY: kill(2) on our own pid, with a signal handled above.
        unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
        tokio::time::sleep(Duration::from_millis(50)).await;
        if refused(&mut p.alice, p.conv, "delta").await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "delta never blocked"
        );
    }
    assert!(
        !refused(&mut p.alice, p.conv, "alpha").await,
        "the new list replaced the old"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_io_clients_get_moderated_from_the_same_send_path() {
    let list = ListFile::new(LIST);
    let app = TestApp::spawn_with(with_list(&list, ModerationAction::Reject, None)).await;
    let (alice, bob) = (uid(), uid());
    let conv = app.conversation(alice, &[bob]).await;
    let mut sio = engine_io(TcpStream::connect(app.addr).await.unwrap(), app.addr).await;
    assert!(connect(&mut sio, &app.token(bob)).await.starts_with("40"));
    event(&mut sio, "hello").await;
    sio.send(WsMessage::text(format!(
        "421{}",
        json!(["join_conversation", {"conversation_id": conv}])
    )))
    .await
    .unwrap();
    assert!(next_text(&mut sio)
        .await
        .starts_with("431[{\"type\":\"ack\""));
    sio.send(WsMessage::text(format!(
        "422{}",
        json!(["send_message", {"conversation_id": conv, "client_message_id": "s1", "content": "darn"}])
    )))
    .await
    .unwrap();
    let reply = next_text(&mut sio).await;
    let args: Value = serde_json::from_str(reply.strip_prefix("432").expect(&reply)).unwrap();
    assert_eq!(args[0]["type"], "error", "{reply}");
    assert_eq!(args[0]["code"], "moderated", "{reply}");
    // Without a callback the error comes as an `error` event.
    sio.send(WsMessage::text(format!(
        "42{}",
        json!(["send_message", {"conversation_id": conv, "client_message_id": "s2", "content": "DARN"}])
    )))
    .await
    .unwrap();
    assert_eq!(event(&mut sio, "error").await["code"], "moderated");
    assert!(stored(&app.pool, conv).await.is_empty());
    app.stop().await;
}

#[test]
fn a_bad_word_list_stops_serve_at_start_naming_the_file_and_line() {
    let list = ListFile::new("fine\n/[unclosed/\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_postline"))
        .arg("serve")
        // Never reached: the list is checked before connecting.
        .env("DATABASE_URL", "postgres://127.0.0.1:1/never-reached")
        .env("POSTLINE_JWT_SECRET", SECRET)
        .env("POSTLINE_MODERATION_FILE", &list.path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started: {err}");
    assert!(err.contains("POSTLINE_MODERATION_FILE"), "{err}");
    assert!(err.contains("line 2: bad /pattern/"), "{err}");
    assert!(
        !err.contains("connecting"),
        "refused before connecting: {err}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_postline"))
        .arg("serve")
        .env("DATABASE_URL", "postgres://127.0.0.1:1/never-reached")
        .env("POSTLINE_JWT_SECRET", SECRET)
        .env("POSTLINE_MODERATION_FILE", list.dir.join("missing.txt"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("missing.txt"), "{err}");
}

/// The server's options with the review hook at `url`, retried fast.
fn with_hook(url: postline::config::WebhookUrl, timeout: Duration) -> Options {
    let mut o = Options::default();
    o.config.worker.retry.base = Duration::from_millis(20);
    o.config.worker.retry.cap = Duration::from_millis(200);
    o.config.moderation.hook = Some(ModerationHookConfig {
        url,
        secret: SigningSecret::new(HOOK_SECRET).unwrap(),
        timeout,
        concurrency: 4,
    });
    o
}

async fn next_review(rx: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a review POST in time")
        .expect("the receiver runs")
}

/// Retract whatever says "buy now", allow the rest.
fn spam_hook(_: usize, body: &Value) -> Reply {
    let text = body["data"]["message"]["content"].as_str().unwrap_or("");
    if text.contains("buy now") {
        Reply::Json(r#"{"action":"retract","reason":"spam"}"#)
    } else {
        Reply::Json(r#"{"action":"allow"}"#)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hook_retracts_a_message_and_every_member_on_every_gateway_sees_message_deleted() {
    let (url, mut reviews) = receiver_by(spam_hook).await;
    let (db_url, pool) = fresh_database().await;
    let one = TestApp::spawn_on(
        db_url.clone(),
        pool.clone(),
        with_hook(url.clone(), Duration::from_secs(5)),
    )
    .await;
    // A second gateway without a worker: it hears of the retraction only
    // through Postgres.
    let mut gateway_only = with_hook(url, Duration::from_secs(5));
    gateway_only.run_worker = false;
    let two = TestApp::spawn_on(db_url, pool, gateway_only).await;
    let (alice, bob) = (uid(), uid());
    let conv = one.conversation(alice, &[bob]).await;
    let mut a = one.ws(alice).await;
    a.join(conv).await;
    let mut b = two.ws(bob).await;
    b.join(conv).await;
    let mut b2 = one.ws(bob).await;
    b2.join(conv).await;

    let hello = a.send_text(conv, "m1", "hello all").await;
    let spam = a.send_text(conv, "m2", "cheap pills, buy now").await;
    let spam_id = spam["message_id"].as_str().unwrap().to_owned();

    for c in [&mut a, &mut b, &mut b2] {
        let deleted = c.recv_type("message_deleted").await;
        assert_eq!(deleted["message_id"], spam_id.as_str(), "{deleted}");
        assert_eq!(deleted["conversation_id"], conv.to_string());
        assert_eq!(deleted["reason"], "spam");
        assert_eq!(deleted["version"], 2);
    }
    // Both were reviewed, signed as webhooks are, with the stored message.
    let mut seen = Vec::new();
    for _ in 0..2 {
        let r = next_review(&mut reviews).await;
        assert!(r.signed_correctly(), "bad signature");
        assert_eq!(r.json["type"], "message.review");
        assert_eq!(r.event_id, r.json["id"].as_str().unwrap());
        assert_eq!(
            r.json["data"]["message"]["conversation_id"],
            conv.to_string()
        );
        assert_eq!(r.json["data"]["message"]["version"], 1);
        seen.push(r.json["data"]["message"]["id"].as_str().unwrap().to_owned());
    }
    seen.sort();
    let mut sent = vec![
        hello["message_id"].as_str().unwrap().to_owned(),
        spam_id.clone(),
    ];
    sent.sort();
    assert_eq!(seen, sent);

    // History keeps the retracted message's place as a tombstone, and the
    // allowed one as it was.
    let h = history(&one, bob, conv).await;
    assert_eq!(h.len(), 2);
    assert_eq!(h[0]["content"], "hello all");
    assert_eq!(h[0]["deleted"], false);
    assert_eq!(h[1]["id"], spam_id.as_str());
    assert_eq!(h[1]["deleted"], true);
    assert_eq!(h[1]["content"], Value::Null);
    let reason: Option<String> =
        sqlx::query_scalar("select deleted_reason from messages where id = $1::uuid")
            .bind(&spam_id)
            .fetch_one(&one.pool)
            .await
            .unwrap();
    assert_eq!(reason.as_deref(), Some("spam"));
    // Every review finished, and the retraction's audit job applied.
    let rows = audited(&one.pool, "moderation.retract").await;
    assert_eq!(rows.len(), 1, "one retraction, one row: {rows:?}");
    assert_eq!(rows[0].0, "system");
    assert_eq!(rows[0].2.map(|m| m.to_string()), Some(spam_id.clone()));
    assert_eq!(rows[0].3["reason"], "spam");
    two.stop().await;
    one.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_that_hangs_then_allows_never_slows_chat_and_leaves_the_message() {
    // The first review hangs past its timeout; the retry is allowed.
    let (url, mut reviews) = receiver_by(|n, _| {
        if n == 0 {
            Reply::Hang
        } else {
            Reply::Json(r#"{"action":"allow"}"#)
        }
    })
    .await;
    let app = TestApp::spawn_with(with_hook(url, Duration::from_secs(2))).await;
    let mut p = app.pair().await;
    p.alice.send_text(p.conv, "m1", "first").await;
    let first = next_review(&mut reviews).await;
    assert_eq!(first.answered, Reply::Hang);
    // While the hook hangs, chat goes on: sent, stored, confirmed.
    let started = tokio::time::Instant::now();
    p.alice.send_text(p.conv, "m2", "second").await;
    loop {
        let persisted = p.bob.recv_type("message_persisted").await;
        if persisted["seq"] == 2 {
            break;
        }
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "chat waited for the hook: {:?}",
        started.elapsed()
    );
    // The hung review is tried again and allowed; the second is allowed too.
    let mut allowed = 0;
    while allowed < 2 {
        if next_review(&mut reviews).await.answered != Reply::Hang {
            allowed += 1;
        }
    }
    background_drained(&app.pool, "every review to finish").await;
    let h = history(&app, p.b, p.conv).await;
    assert!(h.iter().all(|m| m["deleted"] == false), "{h:?}");
    assert!(
        !p.bob.pending_has(|v| v["type"] == "message_deleted"),
        "nothing was retracted"
    );
    app.stop().await;
}
