//! One HTTP/1.1 POST over a fresh connection, bounded in time: what the
//! alert webhook and chat-event webhooks both send with.
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

/// The response body read (and discarded) at most, so a chatty endpoint
/// cannot hold an attempt open.
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
}

/// POST `body` as JSON with `headers`; Ok on a 2xx within `timeout`
/// (connect, send, response head and a small body).
pub async fn post(
    url: &WebhookUrl,
    user_agent: &'static str,
    headers: &[(&'static str, String)],
    body: Bytes,
    timeout: Duration,
) -> Result<(), PostError> {
    tokio::time::timeout(timeout, post_unbounded(url, user_agent, headers, body))
        .await
        .unwrap_or(Err(PostError::TimedOut(timeout)))
}

async fn post_unbounded(
    url: &WebhookUrl,
    user_agent: &'static str,
    headers: &[(&'static str, String)],
    body: Bytes,
) -> Result<(), PostError> {
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
            // Read (and discard) a small body so the endpoint sees a clean end.
            let _ = http_body_util::Limited::new(res.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await;
            Ok(())
        }
        Ok(res) => Err(PostError::Status(res.status())),
        Err(e) => Err(e.into()),
    };
    conn.abort();
    outcome
}
