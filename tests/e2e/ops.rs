//! The operator surface: the dashboard and its data, the operator token,
//! rate-limit counts, the standalone worker's `/metrics`, and the
//! Prometheus rules file checked against a real scrape. Alerts: alerts.rs.

use std::net::SocketAddr;

use postline::config::{OpsArgs, OpsConfig};
use serde_json::Value;

use crate::harness::*;

pub const OPERATOR: &str = "operator-token-0123456789";

pub fn operator_auth(token: Option<&str>, dev: bool) -> OpsConfig {
    let args = OpsArgs {
        operator_token: token.map(str::to_owned),
        ..OpsArgs::default()
    };
    OpsConfig::new(&args, dev).unwrap()
}

/// A GET over a fresh connection: status, head, body as text.
pub async fn get_text(addr: SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
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

pub fn bearer(token: &str) -> String {
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
