//! Publish from SQL (`--sql-publish N`): how long after an application's
//! transaction commits does a connected member see the message live
//! (`new_message`, relayed by NOTIFY at commit) and stored
//! (`message_persisted`, after the worker's transaction)?

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fastwebsockets::{Frame, OpCode, Payload};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::setup::{self, Setup};
use crate::ws::{frame_type, open_ws};
use crate::Args;

pub(crate) async fn sql_publish_benchmark(args: &Args, n: usize) -> anyhow::Result<()> {
    let url = args
        .database_url
        .as_deref()
        .context("--sql-publish needs DATABASE_URL: the server's database")?;
    let pool = postline::store::connect(url, 2).await?;
    let Setup {
        jwt,
        ttl,
        users,
        conversations,
    } = setup::prepare(args).await?;
    let (user, conv) = (users[0], conversations[0]);
    let stream = TcpStream::connect(args.addr).await?;
    stream.set_nodelay(true)?;
    let mut ws = open_ws(stream, args.addr, &jwt.issue(user, ttl)).await?;
    let join = json!({"type": "join_conversation", "ref": "j", "conversation_id": conv});
    ws.write_frame(Frame::text(Payload::Owned(join.to_string().into_bytes())))
        .await?;
    let hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3);
    let (mut live, mut stored) = (hist()?, hist()?);
    let deadline = Duration::from_secs(10);
    for i in 0..n {
        let mut tx = pool.begin().await?;
        let id: Uuid = sqlx::query_scalar("select postline.publish($1, $2, 'text', $3)")
            .bind(conv)
            .bind(user.0)
            .bind(json!(format!("sql {i}")))
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        let committed = Instant::now();
        let id = id.to_string();
        let mut seen_live = false;
        loop {
            let frame = tokio::time::timeout(deadline, ws.read_frame())
                .await
                .with_context(|| format!("message {i} not delivered within {deadline:?}"))??;
            if frame.opcode != OpCode::Text {
                continue;
            }
            let text = std::str::from_utf8(&frame.payload)?;
            if !text.contains(&id) {
                continue;
            }
            match frame_type(&frame.payload) {
                b"new_message" => {
                    live.record(committed.elapsed().as_micros().max(1) as u64)?;
                    seen_live = true;
                }
                b"message_persisted" => {
                    stored.record(committed.elapsed().as_micros().max(1) as u64)?;
                    if !seen_live {
                        bail!("message {i}: message_persisted before new_message");
                    }
                    break;
                }
                _ => {}
            }
        }
    }
    let line = |h: &Histogram<u64>| json!({"p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99), "max": h.max(), "samples": h.len()});
    let report = json!({
        "sql_publish": n,
        "commit_to_new_message_us": line(&live),
        "commit_to_message_persisted_us": line(&stored),
    });
    if !args.json {
        println!(
            "postline-bench: {n} postline.publish() calls, one transaction each, one at a time"
        );
        println!(
            "  commit -> new_message (us)        p50 {:>8}  p99 {:>8}  max {:>8}",
            live.value_at_quantile(0.5),
            live.value_at_quantile(0.99),
            live.max()
        );
        println!(
            "  commit -> message_persisted (us)  p50 {:>8}  p99 {:>8}  max {:>8}",
            stored.value_at_quantile(0.5),
            stored.value_at_quantile(0.99),
            stored.max()
        );
    }
    println!("{report}");
    Ok(())
}
