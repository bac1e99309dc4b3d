//! Setup over the HTTP API: one user per connection, tokens signed with the
//! shared secret, and the conversations the connections join.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use postline::auth::Jwt;
use postline::domain::UserId;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::Args;

/// What the connections need: the token signer, one user per connection,
/// and the conversations (user i is a member of conversation
/// i % conversations).
pub(crate) struct Setup {
    pub(crate) jwt: Jwt,
    pub(crate) ttl: Duration,
    pub(crate) users: Vec<UserId>,
    pub(crate) conversations: Vec<Uuid>,
}

/// The token signer (the shared secret, or the --dev one), one user per
/// connection, and their conversations, created through `args.addr`.
pub(crate) async fn prepare(args: &Args) -> anyhow::Result<Setup> {
    let secret = args
        .secret
        .clone()
        .unwrap_or_else(|| postline::config::DEV_JWT_SECRET.to_owned());
    let jwt = Jwt::new(secret.as_bytes());
    let ttl = Duration::from_secs(3600);
    // Users and conversations.
    let users: Vec<UserId> = (0..args.connections)
        .map(|_| UserId(Uuid::new_v4()))
        .collect();
    let mut conversations = Vec::with_capacity(args.conversations);
    for c in 0..args.conversations {
        let members: Vec<UserId> = users
            .iter()
            .skip(c)
            .step_by(args.conversations)
            .copied()
            .collect();
        let owner = members[0];
        let first: Vec<UserId> = members[1..].iter().take(999).copied().collect();
        let v = http_json(
            args.addr,
            "POST",
            "/v1/conversations",
            &jwt.issue(owner, ttl),
            &json!({"title": format!("bench {c}"), "member_ids": first}),
        )
        .await?;
        let id: Uuid = v["id"].as_str().context("conversation id")?.parse()?;
        for m in members.iter().skip(1000) {
            http_json(
                args.addr,
                "POST",
                &format!("/v1/conversations/{id}/members"),
                &jwt.issue(owner, ttl),
                &json!({"user_id": m}),
            )
            .await?;
        }
        conversations.push(id);
    }
    Ok(Setup {
        jwt,
        ttl,
        users,
        conversations,
    })
}

async fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    let mut s = TcpStream::connect(addr).await?;
    let body = body.to_string();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 2") {
        bail!("{method} {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(serde_json::from_str(body)?)
}
