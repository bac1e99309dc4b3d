//! Raw sockets and child processes: what a test needs below the client library.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{eventually, SECRET, WAIT};

pub async fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra_headers: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let (status, _, v) = raw_http_with_head(addr, method, path, extra_headers, body).await;
    (status, v)
}

/// As [`raw_http`], with the response head (status line and headers) too.
pub async fn raw_http_with_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra_headers: &str,
    body: Option<&str>,
) -> (u16, String, Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra_headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("http timed out")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    (
        status,
        head.to_owned(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// A WebSocket upgraded by hand over a raw TCP stream, for frames no client
/// library will send (unmasked, malformed). The 101 response is consumed.
pub async fn raw_ws(addr: SocketAddr, token: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .expect("upgrade response timed out")
            .unwrap();
        assert_eq!(n, 1, "connection closed during the upgrade");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// One unmasked server frame from a raw stream: (opcode, payload).
pub async fn read_server_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    tokio::time::timeout(WAIT, s.read_exact(&mut h))
        .await
        .expect("frame timed out")
        .unwrap();
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).await.unwrap();
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).await.unwrap();
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    (h[0] & 0x0f, body)
}

/// A TCP connection to `addr` from the loopback address `from` (all of
/// 127.0.0.0/8 is loopback), so a test can play several client addresses.
pub async fn connect_from(from: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((from, 0)))?;
    sock.connect(addr).await
}

/// Send `request` on `s` and read until the server closes: the whole
/// response as text (head and body), bounded by WAIT.
pub async fn exchange(s: &mut TcpStream, request: &str) -> String {
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    // A reset after the response still leaves what was read.
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("the server neither answered nor closed");
    String::from_utf8_lossy(&buf).into_owned()
}

/// Whether the server closed `s` (EOF or reset) within `within`; anything it
/// sent first is skipped.
pub async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let until = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// A free loopback port (racy in theory, fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process that is killed if the test ends (or panics) while it
/// still runs, so no server outlives its test (and holds CI's output open).
pub struct Proc(pub Option<std::process::Child>);

impl Proc {
    pub fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, |c| c.id())
    }

    pub fn take(mut self) -> std::process::Child {
        self.0.take().expect("process already taken")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The real `postline` binary with test settings, plus `env`.
pub fn spawn_postline(args: &[&str], db_url: &str, port: u16, env: &[(&str, &str)]) -> Proc {
    Proc(Some(
        postline_command(args, db_url, port, env)
            .spawn()
            .expect("spawn postline"),
    ))
}

/// [`spawn_postline`] with its open-file limit (soft and hard) set to
/// `nofile`, as `ulimit -n` would before exec.
pub fn spawn_postline_with_nofile(
    args: &[&str],
    db_url: &str,
    port: u16,
    env: &[(&str, &str)],
    nofile: u64,
) -> Proc {
    use std::os::unix::process::CommandExt;
    let mut cmd = postline_command(args, db_url, port, env);
    // SAFETY: between fork and exec only setrlimit runs, which is
    // async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    Proc(Some(cmd.spawn().expect("spawn postline")))
}

/// Raise this (test) process's soft open-file limit to its hard limit, for
/// tests that hold many sockets; returns the limit now in force.
pub fn raise_own_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

fn postline_command(
    args: &[&str],
    db_url: &str,
    port: u16,
    env: &[(&str, &str)],
) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_postline"));
    cmd.args(args)
        .env("DATABASE_URL", db_url)
        .env("POSTLINE_LISTEN", format!("127.0.0.1:{port}"))
        .env("POSTLINE_JWT_SECRET", SECRET)
        .env("POSTLINE_WORKER_BATCH", "10")
        .env("POSTLINE_WORKER_VISIBILITY_TIMEOUT", "1")
        .env("POSTLINE_WORKER_POLL_MS", "20")
        .env("RUST_LOG", "warn")
        // A port of the OS's choosing: tests run side by side, and two
        // workers on the default 9091 left one without its listener, exiting.
        .env("POSTLINE_WORKER_LISTEN", "127.0.0.1:0")
        .stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

pub fn signal(child: &Proc, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

pub async fn wait_exit(child: Proc) -> std::process::ExitStatus {
    let mut child = child.take();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "process did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until the server on `addr` answers /healthz.
pub async fn wait_healthy(addr: SocketAddr) {
    eventually("healthz answers", || async {
        match TcpStream::connect(addr).await {
            Ok(_) => (raw_http(addr, "GET", "/healthz", "", None).await.0 == 200).then_some(()),
            Err(_) => None,
        }
    })
    .await;
}
