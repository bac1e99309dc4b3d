//! Who gets a connection, decided at accept, before a byte is read.
//!
//! - At most `max_connections` sockets are served. Each holds a [`Slot`]
//!   that travels inside its IO, so an upgraded WebSocket keeps counting
//!   until its socket is dropped, not just until hyper lets go of it.
//! - At most `max_pending_per_ip` of them per IP address may be *pending*:
//!   not yet having made a request with a valid token. One address cannot
//!   hold every slot with idle, token-less sockets.
//! - A connection over either cap is refused with 503 + `Retry-After`. If a
//!   triage slot is free it is first read for up to a second and answered
//!   normally if it is a health probe (`GET /healthz` or `/readyz`), so
//!   probes keep working at the cap; with triage full it gets the 503 at once.
//! - The default cap is RLIMIT_NOFILE minus the database pool, the LISTEN
//!   connection, the triage slots and a reserve for files (config), so the
//!   process refuses connections instead of running out of descriptors.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::AdmissionConfig;

/// What a refused client is told to wait before trying again: long enough
/// that a refused crowd does not come straight back, short enough for a
/// page reload to work once the load has passed.
pub(super) const RETRY_AFTER_SECS: u64 = 5;

/// A health probe sends its request as soon as it connects; a connection
/// at the cap that has not sent one within this is not a probe.
pub(super) const TRIAGE_HEAD_TIMEOUT: Duration = Duration::from_secs(1);

/// A whole triage connection, `/readyz`'s database ping (2 s) included.
pub(super) const TRIAGE_BOUND: Duration = Duration::from_secs(4);

/// The accept loop's first pause after a failure, and its longest.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// While accept keeps failing, one log line this often at most.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// The connection counts and caps of one listener.
pub(super) struct Admission {
    cfg: AdmissionConfig,
    open: AtomicUsize,
    /// Pending connections per IP. An entry exists only while its count is
    /// above zero, so the map holds at most `max_connections` entries.
    pending: Mutex<HashMap<IpAddr, usize>>,
    triage: Arc<Semaphore>,
}

/// The decision about one accepted socket.
pub(super) enum Admit {
    Serve(Slot, Arc<Pending>),
    /// Over a cap: answer health probes, refuse the rest.
    Triage(OwnedSemaphorePermit),
    /// Over a cap with triage full: refuse at once.
    Refuse,
}

impl Admission {
    pub(super) fn new(cfg: AdmissionConfig) -> Arc<Self> {
        Arc::new(Admission {
            cfg,
            open: AtomicUsize::new(0),
            pending: Mutex::default(),
            triage: Arc::new(Semaphore::new(cfg.triage_slots)),
        })
    }

    pub(super) fn admit(self: &Arc<Self>, ip: IpAddr) -> Admit {
        match self.try_serve(ip) {
            Some((slot, pending)) => Admit::Serve(slot, pending),
            None => match self.triage.clone().try_acquire_owned() {
                Ok(permit) => Admit::Triage(permit),
                Err(_) => Admit::Refuse,
            },
        }
    }

    fn try_serve(self: &Arc<Self>, ip: IpAddr) -> Option<(Slot, Arc<Pending>)> {
        // Only the accept loop adds, so load-then-add cannot overshoot.
        if self.open.load(Ordering::Acquire) >= self.cfg.max_connections {
            return None;
        }
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let n = pending.entry(ip).or_default();
            if *n >= self.cfg.max_pending_per_ip {
                return None;
            }
            *n += 1;
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        Some((
            Slot(self.clone()),
            Arc::new(Pending {
                admission: self.clone(),
                ip,
                released: AtomicBool::new(false),
            }),
        ))
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// One of the `max_connections`; given back when dropped (with the socket).
pub(super) struct Slot(Arc<Admission>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's place in its IP's pending count, until it makes a
/// request with a valid token ([`Pending::release`]) or closes.
pub(super) struct Pending {
    admission: Arc<Admission>,
    ip: IpAddr,
    released: AtomicBool,
}

impl Pending {
    pub(super) fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    pub(super) fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut pending = self
            .admission
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = pending.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                pending.remove(&self.ip);
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.release();
    }
}

/// A served socket and its [`Slot`]: the slot lives exactly as long as the
/// socket, through hyper's upgrade and the WebSocket session after it.
pub(super) struct Counted {
    stream: TcpStream,
    _slot: Slot,
}

impl Counted {
    pub(super) fn new(stream: TcpStream, slot: Slot) -> Self {
        Counted {
            stream,
            _slot: slot,
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Socket options of every accepted connection. Failures are ignored: the
/// connection works without them, just less well.
pub(super) fn tune(stream: &TcpStream, keepalive: Option<Duration>) {
    // Without this an ack waits behind the previous frame for Nagle's delay.
    let _ = stream.set_nodelay(true);
    if let Some(idle) = keepalive {
        // After `idle` of silence, probe every 10 s; 3 unanswered probes and
        // the kernel resets the socket: a vanished peer is found in
        // idle + 30 s, not the kernel default of two hours.
        let ka = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&ka);
    }
}

/// Refuse without spawning anything: the 503 is written in one
/// non-blocking call (it fits an empty socket buffer) and the socket closed.
pub(super) fn refuse_now(stream: TcpStream) {
    // Take what the client already sent: closing with unread bytes would
    // reset the connection and could lose the 503 on its way out.
    let mut sink = [0u8; 4096];
    let _ = stream.try_read(&mut sink);
    let _ = stream.try_write(&at_capacity_bytes());
}

/// The raw HTTP/1.1 503 of a refused connection.
fn at_capacity_bytes() -> Vec<u8> {
    let body = super::ApiError::AtCapacity.body();
    let mut out = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: {RETRY_AFTER_SECS}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// The accept loop's pause after a failure (usually EMFILE or ENFILE):
/// doubles per failure in a row up to a second, and logs at most one line
/// per [`ACCEPT_LOG_EVERY`], with how many it left out.
#[derive(Default)]
pub(super) struct AcceptBackoff {
    delay: Option<Duration>,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl AcceptBackoff {
    pub(super) fn succeeded(&mut self) {
        // The log timer is kept: accept alternating between success and
        // failure must not log every failure.
        self.delay = None;
    }

    /// How long to pause after this failure.
    pub(super) fn failed(&mut self, e: &io::Error, now: Instant) -> Duration {
        let delay = match self.delay {
            None => ACCEPT_BACKOFF_MIN,
            Some(d) => (d * 2).min(ACCEPT_BACKOFF_MAX),
        };
        self.delay = Some(delay);
        if self
            .last_log
            .is_none_or(|at| now.duration_since(at) >= ACCEPT_LOG_EVERY)
        {
            tracing::warn!(error = %e, pause = ?delay, failures_not_logged = self.unlogged,
                "accept failed; pausing (at the open-file limit? see POSTLINE_MAX_CONNECTIONS)");
            self.last_log = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_connections: usize, max_pending_per_ip: usize) -> AdmissionConfig {
        AdmissionConfig {
            max_connections,
            max_pending_per_ip,
            triage_slots: 1,
            ..AdmissionConfig::default()
        }
    }

    #[test]
    fn over_either_cap_goes_to_triage_then_is_refused() {
        let a = Admission::new(cfg(3, 2));
        let ip1: IpAddr = [127, 0, 0, 2].into();
        let ip2: IpAddr = [127, 0, 0, 1].into();
        let Admit::Serve(s1, p1) = a.admit(ip1) else {
            panic!("first is served")
        };
        let Admit::Serve(_s2, _p2) = a.admit(ip1) else {
            panic!("second is served")
        };
        let Admit::Triage(t) = a.admit(ip1) else {
            panic!("a third pending from one IP is over its cap")
        };
        assert!(matches!(a.admit(ip1), Admit::Refuse), "triage is full");
        drop(t);
        // An authenticated connection no longer counts against its IP.
        p1.release();
        let Admit::Serve(_s3, _p3) = a.admit(ip1) else {
            panic!("released pending slot is reused")
        };
        assert_eq!(a.open(), 3);
        assert!(matches!(a.admit(ip2), Admit::Triage(_)), "the total cap");
        drop(s1);
        assert!(
            matches!(a.admit(ip2), Admit::Serve(..)),
            "a closed socket frees its slot"
        );
    }

    #[test]
    fn pending_counts_are_given_back_once_and_leave_no_entries() {
        let a = Admission::new(cfg(10, 10));
        let ip: IpAddr = [127, 0, 0, 2].into();
        let Admit::Serve(_s, p) = a.admit(ip) else {
            panic!()
        };
        p.release();
        p.release();
        drop(p);
        assert!(a.pending.lock().unwrap().is_empty());
    }

    #[test]
    fn accept_failures_back_off_exponentially_and_log_rarely() {
        let mut b = AcceptBackoff::default();
        let e = io::Error::from_raw_os_error(24);
        let t = Instant::now();
        let pauses: Vec<_> = (0..9).map(|_| b.failed(&e, t)).collect();
        assert_eq!(pauses[0], Duration::from_millis(10));
        assert_eq!(pauses[1], Duration::from_millis(20));
        assert_eq!(pauses[8], Duration::from_secs(1));
        assert_eq!(b.unlogged, 8, "one line for nine failures");
        b.succeeded();
        assert_eq!(b.failed(&e, t), Duration::from_millis(10));
        assert_eq!(b.unlogged, 9, "still within the log interval");
        b.failed(&e, t + ACCEPT_LOG_EVERY);
        assert_eq!(b.unlogged, 0);
    }

    #[tokio::test]
    async fn keepalive_is_set_on_accepted_sockets() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        tune(&s, Some(Duration::from_secs(60)));
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().unwrap());
        assert!(s.nodelay().unwrap());
    }

    #[test]
    fn the_refusal_is_a_complete_503_with_retry_after_and_a_json_body() {
        let text = String::from_utf8(at_capacity_bytes()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains("retry-after: 5"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "unavailable");
    }
}
