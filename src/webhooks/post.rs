//! One HTTP/1.1 POST over a fresh connection, bounded in time: what the
//! alert webhook, chat-event webhooks and the moderation review hook all
//! send with (the review hook also reads the answer's body).
//!
//! No pool: a connection per POST keeps no state between attempts, and a
//! hung endpoint costs one socket until the timeout. No TLS: a TLS stack
//! would add minutes to a fresh build for what a relay on the local network
//! covers (config refuses https:// at start).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::config::WebhookUrl;

/// The response body read at most, so a chatty endpoint cannot hold an
/// attempt open (or fill memory).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("the endpoint answered {0}")]
    Status(hyper::StatusCode),
    #[error("reading the answer: {0}")]
    Body(String),
}

/// POST `body` as JSON with `headers`; Ok on a 2xx within `timeout`
/// (connect, send, response head and a small body, discarded).
pub async fn post(
    url: &WebhookUrl,
    user_agent: &'static str,
    headers: &[(&'static str, String)],
    body: Bytes,
    timeout: Duration,
) -> Result<(), PostError> {
    tokio::time::timeout(
        timeout,
        post_unbounded(url, user_agent, headers, body, false),
    )
    .await
    .unwrap_or(Err(PostError::TimedOut(timeout)))
    .map(drop)
}

/// [`post`], and the 2xx answer's body (at most 64 KiB, else an error), all
/// within `timeout`.
pub async fn post_for_answer(
    url: &WebhookUrl,
    user_agent: &'static str,
    headers: &[(&'static str, String)],
    body: Bytes,
    timeout: Duration,
) -> Result<Bytes, PostError> {
    tokio::time::timeout(
        timeout,
        post_unbounded(url, user_agent, headers, body, true),
    )
    .await
    .unwrap_or(Err(PostError::TimedOut(timeout)))
}

async fn post_unbounded(
    url: &WebhookUrl,
    user_agent: &'static str,
    headers: &[(&'static str, String)],
    body: Bytes,
    want_answer: bool,
) -> Result<Bytes, PostError> {
    let stream = tokio::net::TcpStream::connect(&url.authority).await?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection future drives the socket; it ends with this function.
    let conn = tokio::spawn(conn);
    let mut req = hyper::Request::post(url.path.as_str())
        .header(hyper::header::HOST, url.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, user_agent);
    for (name, value) in headers {
        req = req.header(*name, value.as_str());
    }
    let res = sender.send_request(req.body(Full::new(body))?).await;
    let outcome = match res {
        Ok(res) if res.status().is_success() => {
            // Read a small body: the answer, or (discarded) so the endpoint
            // sees a clean end.
            let read = http_body_util::Limited::new(res.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await;
            match read {
                Ok(b) => Ok(b.to_bytes()),
                Err(e) if want_answer => Err(PostError::Body(e.to_string())),
                Err(_) => Ok(Bytes::new()),
            }
        }
        Ok(res) => Err(PostError::Status(res.status())),
        Err(e) => Err(e.into()),
    };
    conn.abort();
    outcome
}
