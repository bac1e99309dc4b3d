//! The binary's own client (`postline chat`) and log formats, as a newcomer
//! runs them: real processes against a real server.

use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::harness::*;

fn chat(app: &TestApp, user: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postline"));
    cmd.arg("chat")
        .args(["--url", &format!("http://{}", app.addr), "--user", user])
        .args(args)
        .env("POSTLINE_JWT_SECRET", SECRET)
        .env_remove("POSTLINE_TOKEN")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Run to the end (bounded); (success, stdout, stderr).
async fn run(mut cmd: Command) -> (bool, String, String) {
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("the command finished")
        .expect("spawn postline");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tour_runs_with_the_binary_alone_new_listen_send() {
    let app = TestApp::spawn().await;
    let (alice, bob) = (uid().0.to_string(), uid().0.to_string());

    let (ok, out, err) = run(chat(
        &app,
        &alice,
        &["new", "--title", "lunch", "--with", &bob],
    ))
    .await;
    assert!(ok, "{err}");
    let conv = out.trim().to_owned();
    uuid::Uuid::parse_str(&conv).unwrap_or_else(|_| panic!("a bare id, got {out:?}"));

    // Bob listens; told on stderr once he has joined.
    let mut listen = chat(&app, &bob, &["listen", &conv]);
    let mut listener = listen
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = BufReader::new(listener.stderr.take().unwrap()).lines();
    let joined = tokio::time::timeout(WAIT, status.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(joined.unwrap_or_default().contains("listening to"));

    let (ok, out, err) = run(chat(&app, &alice, &["send", &conv, "noon?"])).await;
    assert!(ok, "{err}");
    let sent = json_lines(&out);
    assert_eq!(sent[0]["type"], "ack", "{out}");
    assert_eq!(sent[1]["type"], "message_persisted", "{out}");
    assert_eq!(sent[1]["seq"], 1);

    // Every event, one JSON object a line (Alice's presence among them),
    // until the message is stored.
    let mut events = BufReader::new(listener.stdout.take().unwrap()).lines();
    let heard = tokio::time::timeout(WAIT, async {
        let mut heard = Vec::new();
        while let Some(line) = events.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&line).unwrap();
            let done = v["type"] == "message_persisted";
            heard.push(v);
            if done {
                return heard;
            }
        }
        panic!("listen ended early: {heard:?}");
    })
    .await
    .unwrap();
    let message = heard.iter().find(|v| v["type"] == "new_message").unwrap();
    assert_eq!(message["message"]["content"], "noon?");
    assert_eq!(heard.last().unwrap()["message_id"], sent[0]["message_id"]);
    listener.kill().await.unwrap();
    assert_eq!(stored(&app.pool, conv.parse().unwrap()).await.len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_reads_standard_input_one_message_a_line() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::spawn().await;
    let alice = uid();
    let conv = app.conversation(alice, &[]).await;
    let mut cmd = chat(&app, &alice.0.to_string(), &["send", &conv.to_string()]);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"one\n\n  \ntwo\n").await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Blank lines are not messages.
    let texts: Vec<String> = sqlx::query_scalar(
        "select content #>> '{}' from messages where conversation_id = $1 order by seq",
    )
    .bind(conv)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(texts, ["one", "two"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_says_why_when_the_token_server_or_conversation_is_wrong() {
    let app = TestApp::spawn().await;
    let alice = uid();
    let conv = app.conversation(alice, &[]).await.to_string();

    // A token signed with another secret: refused, and the error says 401.
    let mut cmd = chat(&app, &alice.0.to_string(), &["send", &conv, "hi"]);
    cmd.env("POSTLINE_JWT_SECRET", "another-secret-0123456789");
    let (ok, _, err) = run(cmd).await;
    assert!(!ok);
    assert!(err.contains("401"), "{err}");

    // Not a member: the server's refusal, named.
    let (ok, _, err) = run(chat(&app, &uid().0.to_string(), &["send", &conv, "hi"])).await;
    assert!(!ok);
    assert!(err.contains("forbidden"), "{err}");

    // Nobody listening there.
    let mut cmd = chat(&app, &alice.0.to_string(), &["send", &conv, "hi"]);
    cmd.args(["--url", &format!("http://127.0.0.1:{}", free_port())]);
    let (ok, _, err) = run(cmd).await;
    assert!(!ok);
    assert!(err.contains("is the server running?"), "{err}");

    // Neither --user nor --token; an https URL; a bad conversation id.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postline"));
    cmd.args(["chat", "--url", &format!("http://{}", app.addr), "new"])
        .env_remove("POSTLINE_TOKEN");
    let (ok, _, err) = run(cmd).await;
    assert!(!ok);
    assert!(err.contains("--user"), "{err}");
    let mut cmd = chat(&app, &alice.0.to_string(), &["new"]);
    cmd.args(["--url", "https://chat.example.com"]);
    let (ok, _, err) = run(cmd).await;
    assert!(!ok && err.contains("https"), "{err}");
    let (ok, _, err) = run(chat(&app, &alice.0.to_string(), &["listen", "not-a-uuid"])).await;
    assert!(!ok && err.contains("not-a-uuid"), "{err}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_a_line_and_a_bad_format_is_refused() {
    let (db_url, _pool) = fresh_database().await;
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postline"));
    cmd.args(["serve", "--no-worker"])
        .env("DATABASE_URL", &db_url)
        .env("POSTLINE_LISTEN", format!("127.0.0.1:{port}"))
        .env("POSTLINE_JWT_SECRET", SECRET)
        .env("POSTLINE_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, async {
        loop {
            let line = lines.next_line().await.unwrap().expect("a log line");
            if line.contains("postline serving") {
                return line;
            }
        }
    })
    .await
    .unwrap();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["fields"]["message"], "postline serving");
    assert!(v["timestamp"].is_string());
    child.kill().await.unwrap();

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postline"));
    cmd.args(["token", "--user", &uid().0.to_string()])
        .env("POSTLINE_LOG_FORMAT", "xml");
    let (ok, _, err) = run(cmd).await;
    assert!(!ok);
    assert!(err.contains("xml") && err.contains("json"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_names_its_throwaway_database_in_a_file_removed_at_exit() {
    let dir = std::env::temp_dir().join(format!("postline-devenv-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let env_file = dir.join("dev.env");
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postline"));
    cmd.args(["serve", "--dev", "--dev-env-file"])
        .arg(&env_file)
        .env_remove("DATABASE_URL")
        .env_remove("POSTLINE_JWT_SECRET")
        .env("POSTLINE_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, out.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(line.starts_with("dev database: psql \""), "{line}");
    wait_healthy(format!("127.0.0.1:{port}").parse().unwrap()).await;

    // The file is shell syntax naming the same database, and it answers.
    let text = std::fs::read_to_string(&env_file).unwrap();
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("DATABASE_URL="))
        .unwrap();
    assert!(line.contains(url), "{line} vs {text}");
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let queues = count(&pool, "select count(*) from pgmq.list_queues()").await;
    assert!(queues >= 2, "the schema is in place");
    pool.close().await;

    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    assert!(
        !env_file.exists(),
        "a stale file would point at a dead cluster"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
