//! Encryption at rest: with a key, the messages table holds no plaintext
//! while every read path returns it; `keys rotate` moves every row to the
//! new key, resumes after being killed, and loses no concurrent edit; bad
//! key configuration is refused at start; a row under a key no longer
//! configured fails its reads clearly.

use std::process::Stdio;
use std::time::Duration;

use postline::config::{EncryptionArgs, EncryptionConfig};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

use crate::harness::*;

/// `id:fresh-key` for POSTLINE_ENCRYPTION_KEYS.
fn key(id: &str) -> String {
    format!("{id}:{}", postline::crypto::generate_key())
}

fn options(keys: Option<&str>) -> Options {
    let mut opts = Options::default();
    opts.config.encryption = EncryptionConfig::new(&EncryptionArgs {
        encryption_keys: keys.map(str::to_owned),
        encryption_active_key: None,
    })
    .expect("valid test keys");
    opts
}

/// The whole `messages` table as text, ciphertext in hex: what a dump shows.
async fn table_dump(pool: &PgPool) -> String {
    sqlx::query_scalar("select coalesce(string_agg(m::text, E'\\n'), '') from messages m")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Whether `text` appears in `dump`, as text or as the hex of its bytes.
fn leaks(dump: &str, text: &str) -> bool {
    let hex: String = text.bytes().map(|b| format!("{b:02x}")).collect();
    dump.contains(text) || dump.contains(&hex)
}

/// Rows of `conv` per key id (None: plain).
async fn key_ids(pool: &PgPool, conv: Uuid) -> Vec<(Option<String>, i64)> {
    sqlx::query_as(
        "select key_id, count(*) from messages where conversation_id = $1
         group by key_id order by key_id nulls first",
    )
    .bind(conv)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Every message of `conv` by HTTP history, as (seq, content).
async fn history(app: &TestApp, user: postline::domain::UserId, conv: Uuid) -> Vec<(i64, Value)> {
    let (status, v) = app
        .http(
            "GET",
            &format!("/v1/conversations/{conv}/messages?after_seq=0&limit=200"),
            Some(user),
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["seq"].as_i64().unwrap(), m["content"].clone()))
        .collect()
}

/// Send `texts` as `user` on `c` and wait until all are stored.
async fn send_all(app: &TestApp, c: &mut Client, conv: Uuid, prefix: &str, texts: &[String]) {
    for (i, t) in texts.iter().enumerate() {
        let ack = c.send_text(conv, &format!("{prefix}{i}"), t).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let pool = app.pool.clone();
    let want = texts.len();
    eventually("the messages stored", || async {
        let n = count(
            &pool,
            &format!("select count(*) from messages where conversation_id = '{conv}' and client_message_id like '{prefix}%'"),
        )
        .await;
        (n as usize >= want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_key_the_table_holds_no_plaintext_while_history_sync_and_edits_read_it() {
    let app = TestApp::spawn_with(options(Some(&key("k1")))).await;
    let mut p = app.pair().await;
    let secret = "the pelican flies at midnight";
    send_all(&app, &mut p.alice, p.conv, "s", &[secret.to_owned()]).await;
    // An attachment, a SQL publish and an edit take the same path to the table.
    let ack = p
        .alice
        .request(
            json!({"type": "send_message", "conversation_id": p.conv, "client_message_id": "img",
                        "kind": "image", "content": {"url": "https://x.example/secret-photo.png"}}),
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let published: Uuid = sqlx::query_scalar(
        "select postline.publish($1, $2, 'system', '\"order 5512 shipped to Lisbon\"'::jsonb)",
    )
    .bind(p.conv)
    .bind(p.b.0)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let pool = app.pool.clone();
    let conv = p.conv;
    eventually("all three stored", || async {
        (stored(&pool, conv).await.len() == 3).then_some(())
    })
    .await;
    let first = stored(&app.pool, p.conv).await[0].1;
    let ack = p
        .alice
        .request(json!({"type": "edit_message", "message_id": first, "content": "an edited riddle", "version": 1}))
        .await;
    assert_eq!(ack["version"], 2, "{ack}");

    let dump = table_dump(&app.pool).await;
    for text in [secret, "secret-photo", "Lisbon", "edited riddle", "pelican"] {
        assert!(
            !leaks(&dump, text),
            "{text:?} is readable in the table:\n{dump}"
        );
    }
    assert_eq!(
        key_ids(&app.pool, p.conv).await,
        vec![(Some("k1".to_owned()), 3)]
    );
    assert_eq!(
        count(
            &app.pool,
            "select count(*) from messages where content is not null"
        )
        .await,
        0
    );

    let h = history(&app, p.b, p.conv).await;
    assert_eq!(h.len(), 3);
    assert_eq!(h[0].1, json!("an edited riddle"));
    assert_eq!(h[1].1, json!({"url": "https://x.example/secret-photo.png"}));
    assert_eq!(h[2].1, json!("order 5512 shipped to Lisbon"));
    // A fresh connection: what Bob's first one saw live, sync leaves out.
    let mut later = app.ws(p.b).await;
    let page = later
        .request(json!({"type": "sync", "conversation_id": p.conv, "after_seq": 0, "limit": 10}))
        .await;
    assert_eq!(page["type"], "ack", "{page}");
    let synced: Vec<&Value> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["content"])
        .collect();
    assert!(
        synced.contains(&&json!("order 5512 shipped to Lisbon")),
        "{page}"
    );
    assert!(page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == published.to_string()));

    // A deleted message keeps no content at all: a plain null tombstone.
    let ack = p
        .alice
        .request(json!({"type": "delete_message", "message_id": first, "version": 2}))
        .await;
    assert_eq!(ack["version"], 3, "{ack}");
    let (content, key_id): (Option<Value>, Option<String>) =
        sqlx::query_as("select content, key_id from messages where id = $1")
            .bind(first)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((content, key_id), (Some(Value::Null), None));
    app.stop().await;
}

/// Run `postline keys rotate` to the end with `keys`; (success, stdout, stderr).
async fn rotate(db_url: &str, keys: &str, extra: &[&str]) -> (bool, String, String) {
    let out = tokio::time::timeout(WAIT, rotate_command(db_url, keys, extra).output())
        .await
        .expect("keys rotate finished")
        .expect("spawn postline");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn rotate_command(db_url: &str, keys: &str, extra: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_postline"));
    cmd.args(["keys", "rotate"])
        .args(extra)
        .env("DATABASE_URL", db_url)
        .env("POSTLINE_ENCRYPTION_KEYS", keys)
        .env_remove("POSTLINE_ENCRYPTION_ACTIVE_KEY")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_moves_plain_and_old_key_rows_to_the_new_key_and_history_still_reads() {
    let (db_url, pool) = fresh_database().await;
    let (k1, k2) = (key("k1"), key("k2"));
    // Stored before any key was configured: plain.
    let app = TestApp::spawn_on(db_url.clone(), pool.clone(), options(None)).await;
    let mut p = app.pair().await;
    let texts: Vec<String> = (0..5).map(|i| format!("plain era {i}")).collect();
    send_all(&app, &mut p.alice, p.conv, "p", &texts).await;
    app.stop().await;
    // Then under k1; the plain rows stay readable beside them.
    let app = TestApp::spawn_on(db_url.clone(), pool.clone(), options(Some(&k1))).await;
    let mut alice = app.ws(p.a).await;
    alice.join(p.conv).await;
    let texts: Vec<String> = (0..5).map(|i| format!("k1 era {i}")).collect();
    send_all(&app, &mut alice, p.conv, "k", &texts).await;
    assert_eq!(
        key_ids(&pool, p.conv).await,
        vec![(None, 5), (Some("k1".to_owned()), 5)]
    );
    let before = history(&app, p.b, p.conv).await;
    assert_eq!(before.len(), 10);
    assert_eq!(before[0].1, json!("plain era 0"));
    assert_eq!(before[9].1, json!("k1 era 4"));
    app.stop().await;

    // k2 first: the active one; k1 still opens what it sealed.
    let (ok, out, err) = rotate(&db_url, &format!("{k2},{k1}"), &["--batch", "3"]).await;
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("10 message(s) to re-encrypt"), "{out}");
    assert!(out.contains("done"), "{out}");
    assert_eq!(
        key_ids(&pool, p.conv).await,
        vec![(Some("k2".to_owned()), 10)]
    );
    // k1 can now be dropped: everything reads with k2 alone.
    let app = TestApp::spawn_on(db_url.clone(), pool.clone(), options(Some(&k2))).await;
    assert_eq!(history(&app, p.b, p.conv).await, before);
    // Rotating again finds nothing to do.
    let (ok, out, err) = rotate(&db_url, &k2, &[]).await;
    assert!(
        ok && out.contains("0 message(s) to re-encrypt"),
        "{out}\n{err}"
    );
    // Audited once: the run that changed rows, not the one that found none.
    background_drained(&pool, "the background queue drained").await;
    let audited: Vec<(String, serde_json::Value)> =
        sqlx::query_as("select actor_kind, detail from audit_log where action = 'keys.rotate'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(audited[0].0, "operator");
    assert_eq!(audited[0].1["to_key"], "k2", "{audited:?}");
    assert_eq!(audited[0].1["to_rotate"], 10, "{audited:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_killed_midway_resumes_and_loses_no_concurrent_edit() {
    let (db_url, pool) = fresh_database().await;
    let (k1, k2) = (key("k1"), key("k2"));
    let app = TestApp::spawn_on(db_url.clone(), pool.clone(), options(Some(&k1))).await;
    let mut p = app.pair().await;
    let n = 40;
    let texts: Vec<String> = (0..n).map(|i| format!("before rotation {i}")).collect();
    send_all(&app, &mut p.alice, p.conv, "m", &texts).await;
    app.stop().await;

    // The deployment's first step: k2 active everywhere, k1 kept for reading.
    let both = format!("{k2},{k1}");
    let app = TestApp::spawn_on(db_url.clone(), pool.clone(), options(Some(&both))).await;
    let mut alice = app.ws(p.a).await;
    alice.join(p.conv).await;
    let ids: Vec<Uuid> = stored(&pool, p.conv).await.iter().map(|r| r.1).collect();

    // One row per batch, slowly, so it can be killed in the middle.
    let mut slow = rotate_command(&db_url, &both, &["--batch", "1", "--throttle-ms", "40"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut progress = BufReader::new(slow.stdout.take().unwrap()).lines();
    let mut seen = 0;
    while seen < 5 {
        let line = tokio::time::timeout(WAIT, progress.next_line())
            .await
            .expect("progress within the wait")
            .unwrap()
            .expect("still running");
        if line.starts_with("re-encrypted") {
            seen += 1;
        }
    }
    // Chat goes on meanwhile: edits of rows on both sides of the rotation.
    for (i, id) in [ids[1], ids[n - 1], ids[n - 2]].into_iter().enumerate() {
        let ack = alice
            .request(json!({"type": "edit_message", "message_id": id, "content": format!("edited {i}"), "version": 1}))
            .await;
        assert_eq!(ack["version"], 2, "{ack}");
    }
    let sent = alice
        .send_text(p.conv, "during", "sent during rotation")
        .await;
    assert_eq!(sent["type"], "ack");
    slow.start_kill().unwrap();
    assert!(
        !slow.wait().await.unwrap().success(),
        "killed, not finished"
    );
    let rows = key_ids(&pool, p.conv).await;
    let moved = rows
        .iter()
        .find(|(k, _)| k.as_deref() == Some("k2"))
        .map_or(0, |r| r.1);
    assert!(
        moved >= 5 && rows.iter().any(|(k, _)| k.as_deref() == Some("k1")),
        "killed midway: {rows:?}"
    );

    let (ok, out, err) = rotate(&db_url, &both, &["--batch", "7"]).await;
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("done"), "{out}");
    let pool2 = pool.clone();
    let conv = p.conv;
    eventually("the message sent meanwhile stored", || async {
        (stored(&pool2, conv).await.len() == n + 1).then_some(())
    })
    .await;
    assert_eq!(
        key_ids(&pool, p.conv).await,
        vec![(Some("k2".to_owned()), n as i64 + 1)]
    );
    app.stop().await;

    let app = TestApp::spawn_on(db_url, pool.clone(), options(Some(&k2))).await;
    let h = history(&app, p.b, p.conv).await;
    assert_eq!(h.len(), n + 1);
    assert_eq!(h[1].1, json!("edited 0"), "an edit during rotation is kept");
    assert_eq!(h[n - 1].1, json!("edited 1"));
    assert_eq!(h[n - 2].1, json!("edited 2"));
    assert_eq!(h[0].1, json!("before rotation 0"));
    assert_eq!(h[n].1, json!("sent during rotation"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_under_a_key_no_longer_configured_fails_its_reads_clearly() {
    let (db_url, pool) = fresh_database().await;
    let app = TestApp::spawn_on(db_url.clone(), pool.clone(), options(Some(&key("gone")))).await;
    let mut p = app.pair().await;
    send_all(
        &app,
        &mut p.alice,
        p.conv,
        "g",
        &["under a lost key".to_owned()],
    )
    .await;
    app.stop().await;

    let app = TestApp::spawn_on(db_url, pool.clone(), options(Some(&key("k2")))).await;
    let mut alice = app.ws(p.a).await;
    alice.join(p.conv).await;
    send_all(&app, &mut alice, p.conv, "n", &["under k2".to_owned()]).await;
    // A page holding the row fails as a whole (no garbage, no panic)...
    let (status, v) = app
        .http(
            "GET",
            &format!("/v1/conversations/{}/messages?after_seq=0", p.conv),
            Some(p.b),
            None,
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (503, Some("unavailable")),
        "{v}"
    );
    let page = alice
        .request(json!({"type": "sync", "conversation_id": p.conv, "after_seq": 0}))
        .await;
    assert_eq!(page["code"], "unavailable", "{page}");
    // ...and pages past it read as usual; the server carries on.
    let (status, v) = app
        .http(
            "GET",
            &format!("/v1/conversations/{}/messages?after_seq=1", p.conv),
            Some(p.b),
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["messages"][0]["content"], "under k2");
    app.stop().await;
}

/// `postline <args>` with `env`, to the end; (success, stdout, stderr).
async fn postline_once(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_postline"));
    cmd.args(args)
        .env("DATABASE_URL", "postgres://127.0.0.1:1/never-reached")
        .env("POSTLINE_JWT_SECRET", SECRET)
        .env_remove("POSTLINE_ENCRYPTION_KEYS")
        .env_remove("POSTLINE_ENCRYPTION_ACTIVE_KEY")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("finished")
        .expect("spawn postline");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_key_configuration_is_refused_at_start_naming_the_problem_not_the_key() {
    let (ok, out, _) = postline_once(&["keys", "generate"], &[]).await;
    assert!(ok);
    let good = out.trim().to_owned();
    assert_eq!(good.len(), 44, "32 bytes in base64: {good:?}");
    let short = "c2hvcnQ=";
    for (args, keys, active, says) in [
        (&["serve"][..], format!("k1:{short}"), None, "is 5 bytes"),
        (
            &["worker"][..],
            "k1:***".to_owned(),
            None,
            "not valid base64",
        ),
        (
            &["serve"][..],
            format!("k1:{good},k1:{good}"),
            None,
            "two keys",
        ),
        (
            &["serve"][..],
            format!("k1:{good}"),
            Some("k3"),
            "no key has that id",
        ),
        (
            &["keys", "rotate"][..],
            String::new(),
            None,
            "needs a key to rotate to",
        ),
    ] {
        let mut env = vec![("POSTLINE_ENCRYPTION_KEYS", keys.as_str())];
        if let Some(a) = active {
            env.push(("POSTLINE_ENCRYPTION_ACTIVE_KEY", a));
        }
        let (ok, out, err) = postline_once(args, &env).await;
        assert!(!ok, "{args:?} {keys} accepted: {out}");
        assert!(err.contains("POSTLINE_ENCRYPTION_"), "{err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(
            !err.contains(&good) && !err.contains(short),
            "a key leaked: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_the_worker_warns_at_start_that_content_is_stored_plain() {
    let (db_url, _pool) = fresh_database().await;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_postline"));
    cmd.arg("worker")
        .env("DATABASE_URL", &db_url)
        .env(
            "POSTLINE_WORKER_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env_remove("POSTLINE_ENCRYPTION_KEYS")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("a log line")
        .unwrap()
        .unwrap_or_default();
    assert!(
        line.contains("WARN") && line.contains("plain text"),
        "{line}"
    );
    child.start_kill().unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
}
