//! Cold start (`--cold-start`): start `postline serve` against a ready
//! database, time start -> first accepted WebSocket, and read its idle RSS.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use postline::auth::Jwt;
use postline::domain::UserId;
use serde_json::json;
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::connection::Plan;
use crate::rss::rss_kib;
use crate::ws::{frame_type, open_ws};
use crate::Args;

/// Process start -> first accepted WebSocket (hello received), and RSS at
/// idle, over `runs` starts of the real binary against a ready database.
pub(crate) async fn cold_start_benchmark(args: &Args, runs: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?
        .parent()
        .context("bench binary has a directory")?
        .join("postline");
    let cluster =
        tokio::task::spawn_blocking(|| postline::pglocal::Cluster::start(Default::default()))
            .await??;
    let url = cluster.url("postgres");
    // The schema exists before the measured starts, as in any restart.
    let pool = postline::store::connect(&url, 2).await?;
    postline::store::migrate(&pool).await?;
    let jwt = Jwt::new(postline::config::DEV_JWT_SECRET.as_bytes());
    let token = jwt.issue(UserId(Uuid::new_v4()), Duration::from_secs(600));
    let mut startup_ms = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..runs {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let t = Instant::now();
        let mut child = std::process::Command::new(&exe)
            .args(["serve", "--dev"])
            .env("DATABASE_URL", &url)
            .env("POSTLINE_LISTEN", addr.to_string())
            .env("RUST_LOG", "warn")
            .spawn()?;
        let plan = Plan {
            token: token.clone(),
            conversation: Uuid::nil(),
            sender: false,
            observer: false,
            index: 0,
            addr,
            cross: false,
            slow: false,
        };
        let elapsed = loop {
            if t.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                bail!("server did not accept a WebSocket within 30 s");
            }
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    if hello_over(stream, &plan, addr).await.is_ok() {
                        break t.elapsed();
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_micros(500)).await,
            }
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push(rss_kib(child.id()).unwrap_or(0));
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
        startup_ms.push(elapsed.as_secs_f64() * 1000.0);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut rss_f: Vec<f64> = rss.iter().map(|r| *r as f64).collect();
    let report = json!({
        "runs": runs,
        "start_to_first_ws_ms": {"median": median(&mut startup_ms.clone()), "all": startup_ms},
        "idle_rss_kib": {"median": median(&mut rss_f), "all": rss},
    });
    if !args.json {
        println!(
            "postline-bench cold start: {runs} runs, start -> first WebSocket median {:.1} ms, idle RSS median {:.0} KiB",
            report["start_to_first_ws_ms"]["median"].as_f64().unwrap_or(0.0),
            report["idle_rss_kib"]["median"].as_f64().unwrap_or(0.0)
        );
    }
    println!("{report}");
    Ok(())
}

/// Upgrade `stream` and read the hello frame.
async fn hello_over(stream: TcpStream, plan: &Plan, addr: SocketAddr) -> anyhow::Result<()> {
    let mut ws = open_ws(stream, addr, &plan.token).await?;
    let hello = ws.read_frame().await?;
    if frame_type(&hello.payload) != b"hello" {
        bail!("expected hello");
    }
    Ok(())
}
