//! The operator surface: the dashboard and its data, `/alerts` and the
//! webhook, the standalone worker's `/metrics`, and the Prometheus rules
//! file checked against a real scrape.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postline::alerts::{Alerts, Sources};
use postline::config::{AlertConfig, OpsArgs, OpsConfig, WebhookUrl};
use postline::telemetry::{Metrics, Recorder};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::harness::*;

const OPERATOR: &str = "operator-token-0123456789";

fn operator_auth(token: Option<&str>, dev: bool) -> OpsConfig {
    let args = OpsArgs {
        operator_token: token.map(str::to_owned),
        ..OpsArgs::default()
    };
    OpsConfig::new(&args, dev).unwrap()
}

/// A GET over a fresh connection: status, head, body as text.
async fn get_text(addr: SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let text = exchange(
        &mut s,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\r\n"),
    )
    .await;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

async fn stats(addr: SocketAddr) -> Value {
    let (status, v) = raw_http(addr, "GET", "/dashboard/stats", &bearer(OPERATOR), None).await;
    assert_eq!(status, 200, "{v}");
    v
}

#[tokio::test]
async fn the_dashboard_page_is_self_contained_html_served_without_a_token() {
    let mut opts = Options::default();
    opts.config.ops = operator_auth(Some(OPERATOR), false);
    let app = TestApp::spawn_with(opts).await;
    let (status, head, body) = get_text(app.addr, "/dashboard", "").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/html"),
        "{head}"
    );
    for id in [
        "id=\"connections\"",
        "id=\"plot-messages\"",
        "dataset.ready",
    ] {
        assert!(body.contains(id), "the page lacks {id}");
    }
    // Nothing from the network: no external script, style or font.
    assert!(!body.contains("http://") && !body.contains("https://"));
    let (status, _) = raw_http(app.addr, "POST", "/dashboard", "", Some("{}")).await;
    assert_eq!(status, 405);
    app.stop().await;
}

#[tokio::test]
async fn stats_and_alerts_need_the_operator_token_outside_dev() {
    let mut opts = Options::default();
    opts.config.ops = operator_auth(Some(OPERATOR), false);
    let app = TestApp::spawn_with(opts).await;
    for path in ["/dashboard/stats", "/alerts"] {
        let wrong = [
            String::new(),
            bearer("operator-token-012345678"), // a prefix
            bearer("operator-token-0123456789x"),
            bearer(&app.token(uid())), // a user's token is not an operator's
            format!("Authorization: Basic {OPERATOR}\r\n"),
            "Authorization: Bearer\r\n".to_owned(),
        ];
        for h in &wrong {
            let (status, head, _) = raw_http_with_head(app.addr, "GET", path, h, None).await;
            assert_eq!(status, 401, "{path} with {h:?}");
            assert!(head
                .to_ascii_lowercase()
                .contains("www-authenticate: bearer"));
        }
        let (status, v) = raw_http(app.addr, "GET", path, &bearer(OPERATOR), None).await;
        assert_eq!(status, 200, "{path}: {v}");
        let (status, _) = raw_http(app.addr, "DELETE", path, &bearer(OPERATOR), None).await;
        assert_eq!(status, 405, "{path}");
    }
    app.stop().await;

    // No token configured outside --dev: refused, and the answer says why.
    let app = TestApp::spawn().await;
    let (status, v) = raw_http(app.addr, "GET", "/alerts", &bearer(OPERATOR), None).await;
    assert_eq!(status, 403);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("POSTLINE_OPERATOR_TOKEN"));
    app.stop().await;

    // --dev without a token: open.
    let mut opts = Options::default();
    opts.config.ops = operator_auth(None, true);
    let app = TestApp::spawn_with(opts).await;
    let (status, _) = raw_http(app.addr, "GET", "/dashboard/stats", "", None).await;
    assert_eq!(status, 200);
    app.stop().await;
}

#[tokio::test]
async fn stats_follow_real_traffic_from_socket_to_postgres() {
    let mut opts = Options::default();
    opts.config.ops = operator_auth(Some(OPERATOR), false);
    let gateway_id = opts.config.gateway_id;
    let app = TestApp::spawn_with(opts).await;
    let mut p = app.pair().await;
    for i in 0..5 {
        let ack = p.alice.send_text(p.conv, &format!("m{i}"), "hello").await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    eventually("all five stored", || async {
        (stored(&app.pool, p.conv).await.len() == 5).then_some(())
    })
    .await;
    let s = eventually("the stats to show the traffic", || async {
        let s = stats(app.addr).await;
        (s["persist_ms"]["count"].as_u64() >= Some(5)).then_some(s)
    })
    .await;
    assert_eq!(s["connections"], 2, "{s}");
    assert_eq!(s["messages_sent_total"], 5);
    assert!(s["messages_per_sec"].as_f64().unwrap() > 0.0);
    assert_eq!(s["send_broadcast_ms"]["count"], 5);
    let (p50, p99) = (
        s["send_broadcast_ms"]["p50"].as_f64().unwrap(),
        s["send_broadcast_ms"]["p99"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99, "{s}");
    assert!(s["persist_ms"]["p99"].as_f64().unwrap() > 0.0);
    let queues = s["queues"].as_array().unwrap();
    assert!(
        queues.iter().any(|q| q["queue"] == "postline_persist"),
        "{s}"
    );
    assert_eq!(s["dead_letters"]["total"], 0);
    assert_eq!(s["gateways_alive"], 1);
    assert_eq!(s["gateways"][0]["id"], gateway_id.to_string());
    assert_eq!(s["gateway_id"], gateway_id.to_string());
    let pool = app.pool.clone();
    app.stop().await;
    // A clean shutdown removes the gateway's heartbeat row: not "missing".
    assert_eq!(count(&pool, "select count(*) from gateways").await, 0);
}

#[tokio::test]
async fn rate_limit_refusals_are_counted_by_limiter() {
    let mut opts = Options::default();
    opts.config.ops = operator_auth(Some(OPERATOR), false);
    opts.config.limits.send_per_user = rate(1, 1);
    let app = TestApp::spawn_with(opts).await;
    let mut p = app.pair().await;
    assert_eq!(p.alice.send_text(p.conv, "a", "one").await["type"], "ack");
    let refused = p.alice.send_text(p.conv, "b", "two").await;
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    let s = stats(app.addr).await;
    let send = s["rate_limited"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["limiter"] == "send_per_user")
        .unwrap()
        .clone();
    assert_eq!(send["total"], 1, "{s}");
    let (_, _, text) = get_text(app.addr, "/metrics", "").await;
    assert!(text.contains("postline_rate_limited_total{limiter=\"send_per_user\"} 1\n"));
    app.stop().await;
}

/// A webhook endpoint on a local port: every POST body, as JSON, on the channel.
async fn webhook_receiver() -> (WebhookUrl, mpsc::UnboundedReceiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read the head, then exactly Content-Length bytes of body.
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        assert!(head.starts_with("POST /hook "), "{head}");
                        let _ = tx.send(serde_json::from_str(body).unwrap());
                        let _ = s
                            .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                            .await;
                        return;
                    }
                }
            });
        }
    });
    let url = WebhookUrl {
        authority: addr.to_string(),
        path: "/hook".into(),
    };
    (url, rx)
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a webhook POST")
        .expect("the receiver runs")
}

async fn alert_state(addr: SocketAddr, name: &str) -> Option<(String, Value)> {
    let (status, v) = raw_http(addr, "GET", "/alerts", &bearer(OPERATOR), None).await;
    assert_eq!(status, 200, "{v}");
    v["alerts"]
        .as_array()?
        .iter()
        .find(|a| a["name"] == name)
        .map(|a| (a["state"].as_str().unwrap().to_owned(), v.clone()))
}

#[tokio::test]
async fn a_stuck_queue_fires_oldest_job_age_then_resolves_and_the_webhook_hears_both() {
    let (url, mut hook) = webhook_receiver().await;
    // Nothing drains the queue: its oldest job ages.
    let mut opts = Options {
        run_worker: false,
        ..Options::default()
    };
    opts.config.ops = operator_auth(Some(OPERATOR), false);
    opts.config.ops.alerts.oldest_job = Duration::ZERO;
    opts.config.ops.alerts.interval = Duration::from_millis(100);
    opts.config.ops.alerts.webhook = Some(url);
    let app = TestApp::spawn_with(opts).await;
    sqlx::query("select pgmq.send('postline_persist', '{\"stuck\": true}'::jsonb)")
        .execute(&app.pool)
        .await
        .unwrap();
    // pgmq counts age in whole seconds: firing within about one.
    let (_, v) = eventually("oldest_job_age to fire", || async {
        alert_state(app.addr, "oldest_job_age")
            .await
            .filter(|(s, _)| s == "firing")
    })
    .await;
    assert_eq!(v["firing"], 1, "{v}");
    assert_eq!(v["alerts"][0]["subject"], "postline_persist");
    assert!(v["source"].as_str().unwrap().starts_with("gateway "));
    let fired = next_event(&mut hook).await;
    assert_eq!(fired["alert"]["name"], "oldest_job_age", "{fired}");
    assert_eq!(fired["alert"]["state"], "firing");

    sqlx::query("select pgmq.purge_queue('postline_persist')")
        .execute(&app.pool)
        .await
        .unwrap();
    eventually("oldest_job_age to resolve", || async {
        alert_state(app.addr, "oldest_job_age")
            .await
            .filter(|(s, _)| s == "resolved")
    })
    .await;
    let resolved = next_event(&mut hook).await;
    assert_eq!(resolved["alert"]["state"], "resolved", "{resolved}");
    let (_, _, text) = get_text(app.addr, "/metrics", "").await;
    assert!(
        text.contains("postline_alert_webhook_total{outcome=\"sent\"} 2\n"),
        "{text}"
    );
    app.stop().await;
}

/// An evaluator on `pool`, driven by the test through `tick()`.
fn evaluator(
    pool: &sqlx::PgPool,
    webhook: Option<WebhookUrl>,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> (Alerts, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let cfg = AlertConfig {
        webhook: None,
        ..AlertConfig::default()
    };
    let hook =
        webhook.map(|u| postline::alerts::Webhook::spawn(u, metrics.clone(), stop.clone(), tasks));
    let sources = Sources {
        pool: pool.clone(),
        metrics: metrics.clone(),
        recorder: Arc::new(Recorder::new(Duration::from_secs(1), cfg.window)),
    };
    (Alerts::new(cfg, "test".into(), sources, hook), metrics)
}

async fn silent_gateway(pool: &sqlx::PgPool) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    sqlx::query(
        "insert into gateways (id, last_seen, heartbeat_interval_ms)
         values ($1, now() - interval '1 minute', 1000)",
    )
    .bind(id)
    .execute(pool)
    .await
    .unwrap();
    id
}

#[tokio::test]
async fn a_gateway_that_stops_heartbeating_is_reported_missing_until_it_is_gone() {
    let (_, pool) = fresh_database().await;
    let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
    let (alerts, _) = evaluator(&pool, None, &tasks, &stop);
    assert!(alerts.tick().await.is_empty(), "a fresh database is quiet");
    let id = silent_gateway(&pool).await;
    let fired = alerts.tick().await;
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(fired[0].name, "gateway_missing");
    assert_eq!(fired[0].subject, Some(id.to_string()));
    assert!(
        alerts.tick().await.is_empty(),
        "still missing: no new transition"
    );
    // It comes back (a heartbeat under the same id).
    sqlx::query("update gateways set last_seen = now() where id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let resolved = alerts.tick().await;
    assert_eq!(resolved.len(), 1);
    assert_eq!(
        resolved[0].state,
        postline::protocol::http::AlertState::Resolved
    );
}

#[tokio::test]
async fn a_webhook_that_hangs_or_refuses_never_stalls_the_evaluator() {
    let (_, pool) = fresh_database().await;
    // One endpoint accepts and never answers; the other refuses connections.
    let hang = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_addr = hang.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let refused = format!("127.0.0.1:{}", free_port());
    for authority in [hang_addr.to_string(), refused] {
        let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
        let url = WebhookUrl {
            authority,
            path: "/".into(),
        };
        let (alerts, metrics) = evaluator(&pool, Some(url), &tasks, &stop);
        let started = tokio::time::Instant::now();
        // Twice the queue's worth of transitions (fire, resolve, ...).
        for _ in 0..70 {
            let id = silent_gateway(&pool).await;
            assert_eq!(alerts.tick().await.len(), 1);
            sqlx::query("delete from gateways where id = $1")
                .bind(id)
                .execute(&pool)
                .await
                .unwrap();
            assert_eq!(alerts.tick().await.len(), 1);
        }
        assert!(
            started.elapsed() < WAIT,
            "ticks were held up by the webhook"
        );
        let text = metrics.render(&[]);
        let dropped = text
            .lines()
            .find_map(|l| l.strip_prefix("postline_alert_webhook_total{outcome=\"dropped\"} "))
            .unwrap();
        assert!(dropped.parse::<u64>().unwrap() > 0, "{text}");
        stop.cancel();
        tasks.close();
        tokio::time::timeout(WAIT, tasks.wait())
            .await
            .expect("the delivery task stops at once");
    }
}

#[tokio::test]
async fn the_standalone_worker_serves_metrics_healthz_and_alerts_and_counts_its_work() {
    let (db_url, pool) = fresh_database().await;
    let opts = Options {
        run_worker: false,
        ..Options::default()
    };
    let app = TestApp::spawn_on(db_url.clone(), pool, opts).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let worker = spawn_postline(
        &["worker"],
        &db_url,
        free_port(),
        &[
            ("POSTLINE_WORKER_LISTEN", listen.as_str()),
            ("POSTLINE_OPERATOR_TOKEN", OPERATOR),
        ],
    );
    let addr: SocketAddr = listen.parse().unwrap();
    wait_healthy(addr).await;
    let mut p = app.pair().await;
    assert_eq!(
        p.alice.send_text(p.conv, "w1", "via the worker").await["type"],
        "ack"
    );
    p.bob.recv_type("message_persisted").await;
    let text = eventually("the worker's metrics to count the job", || async {
        let (_, _, text) = get_text(addr, "/metrics", "").await;
        text.contains("postline_jobs_processed_total{queue=\"postline_persist\"} 1\n")
            .then_some(text)
    })
    .await;
    assert!(
        text.contains("postline_persist_latency_seconds_count 1\n"),
        "{text}"
    );
    assert!(text.contains("postline_gateways_alive 1\n"), "{text}");
    let (status, _) = raw_http(addr, "GET", "/alerts", "", None).await;
    assert_eq!(status, 401);
    let (status, v) = raw_http(addr, "GET", "/alerts", &bearer(OPERATOR), None).await;
    assert_eq!(status, 200);
    assert!(v["source"].as_str().unwrap().starts_with("worker "), "{v}");
    assert_eq!(v["rules"].as_array().unwrap().len(), 5);
    let (status, _) = raw_http(addr, "POST", "/metrics", "", None).await;
    assert_eq!(status, 405);
    let (status, _) = raw_http(addr, "GET", "/v1/conversations", "", None).await;
    assert_eq!(status, 404);
    signal(&worker, "-TERM");
    assert!(wait_exit(worker).await.success());
    app.stop().await;
}

#[tokio::test]
async fn the_prometheus_rules_use_only_metrics_that_a_scrape_shows() {
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/postline-alerts.yml"
    ))
    .unwrap();
    let mut names: Vec<&str> = Vec::new();
    let mut rest = rules.as_str();
    while let Some(i) = rest.find("postline_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if end > "postline_".len() {
            names.push(&tail[..end]);
        }
        rest = &tail[end..];
    }
    assert!(names.len() >= 6, "{names:?}");
    let app = TestApp::spawn().await;
    let (_, _, scrape) = get_text(app.addr, "/metrics", "").await;
    for name in names {
        let present = scrape.lines().any(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with([' ', '{']))
        });
        assert!(present, "{name} is in the rules file but not on /metrics");
    }
    app.stop().await;
}
