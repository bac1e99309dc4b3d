//! A webhook receiver on 127.0.0.1 that answers as each test scripts it
//! (the moderation tests use it as their review hook too).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use postline::config::WebhookUrl;
use postline::webhooks::sign;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub const HOOK_SECRET: &str = "webhook-secret-0123456789";

/// How the receiver answers its n-th request (from 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    Status(u16),
    /// 200 with this JSON body.
    Json(&'static str),
    /// Read the request and never answer.
    Hang,
}

/// One request as received, and what it was answered.
pub struct Received {
    pub timestamp: i64,
    pub signature: String,
    pub event_id: String,
    pub body: String,
    pub json: Value,
    pub answered: Reply,
}

impl Received {
    pub fn signed_correctly(&self) -> bool {
        sign::verify(
            HOOK_SECRET.as_bytes(),
            self.timestamp,
            self.body.as_bytes(),
            &self.signature,
        )
    }
}

/// A webhook endpoint on a local port, answering by `script(n)`.
pub async fn receiver(
    script: impl Fn(usize) -> Reply + Send + Sync + 'static,
) -> (WebhookUrl, mpsc::UnboundedReceiver<Received>) {
    receiver_by(move |n, _| script(n)).await
}

/// A webhook endpoint answering by `script(n, body)`: what the n-th
/// request (from 0) carried decides the answer.
pub async fn receiver_by(
    script: impl Fn(usize, &Value) -> Reply + Send + Sync + 'static,
) -> (WebhookUrl, mpsc::UnboundedReceiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let script = Arc::new(script);
    let count = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (tx, script, count) = (tx.clone(), script.clone(), count.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
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
                    let header = |name: &str| {
                        head.lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                            })
                            .unwrap_or_default()
                    };
                    let len: usize = header("content-length").parse().unwrap_or(0);
                    if body.len() < len {
                        continue;
                    }
                    assert!(head.starts_with("POST /hooks "), "{head}");
                    let json: Value = serde_json::from_str(body).expect("a JSON body");
                    let answered = script(count.fetch_add(1, Ordering::SeqCst), &json);
                    let _ = tx.send(Received {
                        timestamp: header("postline-timestamp").parse().unwrap_or(0),
                        signature: header("postline-signature"),
                        event_id: header("postline-event-id"),
                        body: body.to_owned(),
                        json,
                        answered,
                    });
                    match answered {
                        Reply::Status(code) => {
                            let head = format!(
                                "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            );
                            let _ = s.write_all(head.as_bytes()).await;
                        }
                        Reply::Json(answer) => {
                            let head = format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                                answer.len()
                            );
                            let _ = s.write_all(head.as_bytes()).await;
                        }
                        Reply::Hang => {
                            // Hold the socket open, unanswered, for the test's life.
                            tokio::time::sleep(Duration::from_secs(600)).await;
                        }
                    }
                    return;
                }
            });
        }
    });
    let url = WebhookUrl {
        authority: addr.to_string(),
        path: "/hooks".into(),
    };
    (url, rx)
}
