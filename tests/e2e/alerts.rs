//! Alerts end to end: a stuck queue fires and resolves on `/alerts` and at
//! a webhook; a silent gateway is reported missing; a webhook that hangs or
//! refuses never holds up the evaluator.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postline::alerts::{Alerts, Sources};
use postline::config::{AlertConfig, WebhookUrl};
use postline::telemetry::{Metrics, Recorder};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::harness::*;
use crate::ops::{bearer, get_text, operator_auth, OPERATOR};

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
