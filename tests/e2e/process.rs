//! The real binary, as an operator runs it.

use std::time::Instant;

use crate::harness::*;

fn postline(args: &[&str], db_url: &str, port: u16) -> Proc {
    spawn_postline(args, db_url, port, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_healthz_and_drains_on_sigterm() {
    let (db_url, pool) = fresh_database().await;
    let port = free_port();
    let started = Instant::now();
    let child = postline(&["serve"], &db_url, port);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_healthy(addr).await;
    eprintln!("healthz answered {:?} after spawn", started.elapsed());

    // A client connected to the process is told to go away on SIGTERM.
    let app = TestApp::spawn_on(
        db_url,
        pool,
        Options {
            run_worker: false,
            ..Options::default()
        },
    )
    .await;
    let url = format!("ws://{addr}/ws?token={}", app.token(uid()));
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    signal(&child, "-TERM");
    let status = wait_exit(child).await;
    assert!(status.success(), "exit status {status:?}");
    use futures_util::StreamExt;
    let mut ws = ws;
    let mut code = None;
    while let Some(Ok(msg)) = ws.next().await {
        if let tokio_tungstenite::tungstenite::Message::Close(frame) = msg {
            code = frame.map(|f| u16::from(f.code));
            break;
        }
    }
    assert_eq!(code, Some(1001));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_killed_mid_stream_loses_and_duplicates_nothing() {
    let app = TestApp::spawn_with(Options {
        run_worker: false,
        ..Options::default()
    })
    .await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    let mut alice = app.ws(a).await;
    alice.join(conv).await;
    let n = 300;
    for i in 0..n {
        let ack = alice
            .send_text(conv, &format!("k{i}"), &format!("m{i}"))
            .await;
        assert_eq!(ack["type"], "ack");
    }
    let first = postline(&["worker"], &app.db_url, free_port());
    let pool = app.pool.clone();
    eventually("the first worker stores some", || async {
        (stored(&pool, conv).await.len() >= 20).then_some(())
    })
    .await;
    signal(&first, "-KILL");
    let status = wait_exit(first).await;
    assert!(!status.success(), "killed, not exited");
    let partial = stored(&app.pool, conv).await.len();
    eprintln!("{partial} of {n} stored when the worker was killed");

    let second = postline(&["worker"], &app.db_url, free_port());
    let rows = eventually("every acked message stored", || async {
        let rows = stored(&pool, conv).await;
        (rows.len() >= n).then_some(rows)
    })
    .await;
    signal(&second, "-TERM");
    assert!(wait_exit(second).await.success());
    assert_eq!(rows.len(), n, "exactly once");
    let seqs: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(seqs, (1..=n as i64).collect::<Vec<_>>());
    let mut cmids: Vec<String> = rows.iter().map(|r| r.2.clone()).collect();
    cmids.sort();
    cmids.dedup();
    assert_eq!(cmids.len(), n);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_against_a_real_database_warns_and_prefers_a_real_secret() {
    use std::io::Read;
    let (db_url, _pool) = fresh_database().await;
    let dev_token = postline::auth::Jwt::new(postline::config::DEV_JWT_SECRET.as_bytes())
        .issue(uid(), std::time::Duration::from_secs(60));
    for real_secret in [false, true] {
        let port = free_port();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_postline"));
        cmd.args(["serve", "--dev", "--no-worker"])
            .env("DATABASE_URL", &db_url)
            .env("POSTLINE_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .env_remove("POSTLINE_JWT_SECRET")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped());
        if real_secret {
            cmd.env("POSTLINE_JWT_SECRET", SECRET);
        }
        let child = Proc(Some(cmd.spawn().expect("spawn postline")));
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_healthy(addr).await;
        let auth = format!("Authorization: Bearer {dev_token}\r\n");
        let (status, _) = raw_http(addr, "GET", "/v1/conversations", &auth, None).await;
        // The public dev secret opens a real database only without a real one.
        assert_eq!(status, if real_secret { 401 } else { 200 });
        signal(&child, "-TERM");
        let mut child = child.take();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        child.wait().unwrap();
        assert!(out.contains("WARN"), "{out}");
        assert_eq!(out.contains("PUBLIC dev JWT secret"), !real_secret, "{out}");
        // Not a terminal: plain text, no colour codes in the log.
        assert!(!out.contains('\x1b'), "ANSI codes in piped logs: {out:?}");
    }
}
