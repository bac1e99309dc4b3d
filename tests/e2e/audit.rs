//! The audit log, end to end: each audited action taken through the real
//! server (HTTP, WebSocket, the service API) leaves exactly one row naming
//! who did it, from which address and on which gateway; what changed
//! nothing leaves none. The command line, duplicates, append-only and
//! retention: audit_log.rs.

use std::process::Command;

use chrono::{DateTime, Utc};
use postline::config::ServiceKeys;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::*;

/// One `audit_log` row, as the tests read it.
#[derive(Debug, sqlx::FromRow)]
pub struct AuditRow {
    pub action: String,
    pub actor_kind: String,
    pub actor_id: String,
    pub conversation_id: Option<Uuid>,
    pub message_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub dead_letter_id: Option<i64>,
    pub detail: Value,
    pub ip: Option<String>,
    pub gateway_id: Option<Uuid>,
    pub at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
}

/// Every row, oldest first.
pub async fn rows(pool: &sqlx::PgPool) -> Vec<AuditRow> {
    sqlx::query_as(
        "select action, actor_kind, actor_id, conversation_id, message_id, user_id,
                dead_letter_id, detail, host(ip) as ip, gateway_id, at, recorded_at
         from audit_log order by id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The rows once the server's worker has applied every audit job: each job
/// is in the queue by the time its action answered.
async fn settled_rows(app: &TestApp) -> Vec<AuditRow> {
    background_drained(&app.pool, "the background queue drained").await;
    rows(&app.pool).await
}

/// An app whose gateway id the test knows, with the service key `shop`.
async fn app() -> (TestApp, Uuid) {
    let mut o = Options::default();
    o.config.service_keys = ServiceKeys::parse(&format!("shop={KEY}")).unwrap();
    let gateway = o.config.gateway_id;
    (TestApp::spawn_with(o).await, gateway)
}

const KEY: &str = "shop-secret-0123456789";

/// Who and where, as every row of a request to `app` names them.
fn assert_from_here(r: &AuditRow, gateway: Uuid) {
    assert_eq!(r.ip.as_deref(), Some("127.0.0.1"), "{r:?}");
    assert_eq!(r.gateway_id, Some(gateway), "{r:?}");
    assert!(
        r.at <= r.recorded_at,
        "the action's time, not the worker's: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_membership_change_over_http_leaves_one_row_naming_who_and_from_where() {
    let (app, gateway) = app().await;
    let (alice, bob, carol, mallory) = (uid(), uid(), uid(), uid());
    let conv = app.conversation(alice, &[bob]).await;
    let members = format!("/v1/conversations/{conv}/members");
    let add = json!({"user_id": carol.0}).to_string();
    assert_eq!(
        app.http("POST", &members, Some(alice), Some(&add)).await.0,
        201
    );
    // What changes nothing records nothing: a repeat, a stranger, a non-member.
    assert_eq!(
        app.http("POST", &members, Some(bob), Some(&add)).await.0,
        200
    );
    assert_eq!(
        app.http("POST", &members, Some(mallory), Some(&add))
            .await
            .0,
        403
    );
    let carol_path = format!("{members}/{}", carol.0);
    assert_eq!(
        app.http("DELETE", &carol_path, Some(bob), None).await.0,
        200
    );
    assert_eq!(
        app.http("DELETE", &carol_path, Some(bob), None).await.0,
        404
    );

    let rows = settled_rows(&app).await;
    let actions: Vec<&str> = rows.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        ["conversation.create", "member.add", "member.remove"]
    );
    for r in &rows {
        assert_from_here(r, gateway);
        assert_eq!(
            (r.actor_kind.as_str(), r.conversation_id),
            ("user", Some(conv))
        );
    }
    assert_eq!(rows[0].actor_id, alice.to_string());
    assert_eq!(rows[0].detail["member_ids"], json!([alice.0, bob.0]));
    assert_eq!(
        (rows[1].actor_id.as_str(), rows[1].user_id),
        (alice.to_string().as_str(), Some(carol.0))
    );
    assert_eq!(
        (rows[2].actor_id.as_str(), rows[2].user_id),
        (bob.to_string().as_str(), Some(carol.0))
    );

    // The operators' file answers "who removed carol from this conversation".
    let out = psql_audit(&app.db_url, &[("user", carol.0), ("conversation", conv)]);
    let answer = out
        .lines()
        .find(|l| l.contains("member.remove"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        answer.contains(&bob.to_string()) && answer.contains("127.0.0.1"),
        "{answer}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_deleted_over_websocket_leaves_one_row_and_an_edit_or_refusal_none() {
    let (app, gateway) = app().await;
    let mut p = app.pair().await;
    let ack = p.alice.send_text(p.conv, "m1", "hello").await;
    let id = ack["message_id"].as_str().unwrap().to_owned();
    p.alice
        .recv_where(|f| f["type"] == "message_persisted" && f["message_id"] == id.as_str())
        .await;
    let edit = json!({"type": "edit_message", "message_id": id, "content": "hi", "version": 1});
    assert_eq!(p.alice.request(edit).await["version"], 2);
    let delete =
        |version: i64| json!({"type": "delete_message", "message_id": id, "version": version});
    assert_eq!(p.alice.request(delete(1)).await["code"], "conflict");
    assert_eq!(p.bob.request(delete(2)).await["code"], "forbidden");
    assert_eq!(p.alice.request(delete(2)).await["version"], 3);
    assert_eq!(p.alice.request(delete(3)).await["type"], "error");

    let rows = settled_rows(&app).await;
    let actions: Vec<&str> = rows.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(actions, ["conversation.create", "message.delete"]);
    let d = &rows[1];
    assert_from_here(d, gateway);
    assert_eq!(
        (d.actor_kind.as_str(), d.actor_id.clone()),
        ("user", p.a.to_string())
    );
    assert_eq!(d.message_id.map(|m| m.to_string()), Some(id.clone()));
    assert_eq!((d.conversation_id, d.user_id), (Some(p.conv), Some(p.a.0)));
    assert_eq!(d.detail["version"], 3);
    let out = psql_audit(&app.db_url, &[("message", id.parse().unwrap())]);
    assert!(
        out.lines()
            .any(|l| l.contains("message.delete") && l.contains(&p.a.to_string())),
        "{out}"
    );
    app.stop().await;
}

/// A service request: (status, body).
async fn call(
    app: &TestApp,
    method: &str,
    path: &str,
    idem: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let mut headers = format!("Authorization: Bearer {KEY}\r\n");
    if let Some(k) = idem {
        headers.push_str(&format!("Idempotency-Key: {k}\r\n"));
    }
    let (status, _, v) =
        raw_http_with_head(app.addr, method, path, &headers, Some(&body.to_string())).await;
    (status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_call_leaves_one_row_and_each_membership_change_its_own() {
    let (app, gateway) = app().await;
    let (alice, bob, carol, bot) = (uid(), uid(), uid(), uid());
    let create = json!({"member_ids": [alice.0, bob.0], "created_by": bot.0});
    let (status, conv) = call(
        &app,
        "POST",
        "/v1/service/conversations",
        Some("c1"),
        create,
    )
    .await;
    assert_eq!(status, 201, "{conv}");
    let conv: Uuid = conv["id"].as_str().unwrap().parse().unwrap();
    let members = format!("/v1/service/conversations/{conv}/members");
    let add = json!({"user_id": carol.0});
    assert_eq!(
        call(&app, "POST", &members, Some("add-carol"), add.clone())
            .await
            .0,
        201
    );
    assert_eq!(
        call(&app, "POST", &members, Some("add-carol"), add.clone())
            .await
            .0,
        201,
        "replayed"
    );
    let bob_path = format!("{members}/{}", bob.0);
    assert_eq!(
        call(&app, "DELETE", &bob_path, Some("rm-bob"), json!(null))
            .await
            .0,
        200
    );
    let post = json!({"sender_id": bot.0, "content": "ticket received"});
    let messages = format!("/v1/service/conversations/{conv}/messages");
    let (status, posted) = call(&app, "POST", &messages, Some("post-1"), post).await;
    assert_eq!(status, 201, "{posted}");
    assert_eq!(
        call(&app, "POST", &members, Some("bad"), json!({"who": 1}))
            .await
            .0,
        422
    );
    assert_eq!(call(&app, "POST", &members, None, add.clone()).await.0, 400);
    assert_eq!(
        call(
            &app,
            "GET",
            "/v1/service/conversations",
            Some("g"),
            json!({})
        )
        .await
        .0,
        405
    );
    // No valid key: no one to name, nothing recorded.
    let (status, _, _) = raw_http_with_head(
        app.addr,
        "POST",
        &members,
        "Authorization: Bearer not-a-key-0123456789\r\nIdempotency-Key: x\r\n",
        Some(&add.to_string()),
    )
    .await;
    assert_eq!(status, 401);

    let rows = settled_rows(&app).await;
    for r in &rows {
        assert_from_here(r, gateway);
        assert_eq!(
            (r.actor_kind.as_str(), r.actor_id.as_str()),
            ("service", "shop"),
            "{r:?}"
        );
    }
    let changes: Vec<(&str, Option<Uuid>)> = rows
        .iter()
        .filter(|r| r.action != "service.call")
        .map(|r| (r.action.as_str(), r.user_id))
        .collect();
    assert_eq!(
        changes,
        [
            ("conversation.create", None),
            ("member.add", Some(carol.0)),
            ("member.remove", Some(bob.0))
        ]
    );
    assert_eq!(rows[0].detail["created_by"], json!(bot.0));
    let calls: Vec<(Value, Value, Value)> = rows
        .iter()
        .filter(|r| r.action == "service.call")
        .map(|r| {
            (
                r.detail["idempotency_key"].clone(),
                r.detail["status"].clone(),
                r.detail["replayed"].clone(),
            )
        })
        .collect();
    let want = [
        (json!("c1"), json!(201), json!(false)),
        (json!("add-carol"), json!(201), json!(false)),
        (json!("add-carol"), json!(201), json!(true)),
        (json!("rm-bob"), json!(200), json!(false)),
        (json!("post-1"), json!(201), json!(false)),
        (json!("bad"), json!(422), json!(false)),
        (Value::Null, json!(400), json!(false)),
        (Value::Null, json!(405), json!(false)),
    ];
    assert_eq!(calls, want);
    let call_of = |key: &str| {
        rows.iter()
            .find(|r| r.action == "service.call" && r.detail["idempotency_key"] == key)
            .unwrap()
    };
    assert_eq!(call_of("c1").conversation_id, Some(conv));
    assert_eq!(call_of("rm-bob").user_id, Some(bob.0));
    assert_eq!(
        call_of("post-1").message_id.map(|m| json!(m)),
        Some(posted["message_id"].clone())
    );
    assert_eq!(call_of("post-1").detail["path"], json!(messages));
    let out = psql_audit(&app.db_url, &[]);
    let per_key = out
        .lines()
        .find(|l| l.trim_start().starts_with("shop"))
        .unwrap_or_else(|| panic!("{out}"));
    let cells: Vec<&str> = per_key.split('|').map(str::trim).collect();
    assert_eq!(
        &cells[..5],
        ["shop", "8", "5", "3", "1"],
        "calls, ok, refused, replays: {per_key}"
    );
    app.stop().await;
}

/// `psql -f sql/audit.sql` with `vars` set; its output, which must be a success.
pub fn psql_audit(db_url: &str, vars: &[(&str, Uuid)]) -> String {
    let psql = postline::pglocal::find_bin_dir()
        .expect("PostgreSQL binaries")
        .join("psql");
    let mut cmd = Command::new(psql);
    cmd.args(["-X", "-v", "ON_ERROR_STOP=1", "-d", db_url, "-f"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/audit.sql"));
    for (name, value) in vars {
        cmd.args(["-v", &format!("{name}={value}")]);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "sql/audit.sql failed: {text}");
    text
}
