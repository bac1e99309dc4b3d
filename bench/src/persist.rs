//! Durable throughput (`--persist-jobs`): persist jobs enqueued straight into
//! pgmq, then timed while workers drain them.

use std::sync::Arc;
use std::time::Instant;

use postline::domain::UserId;
use serde_json::json;
use uuid::Uuid;

use crate::Args;

/// Durable throughput: jobs enqueued with send_batch, then drained by
/// `workers` workers at the default batch settings, synchronous_commit on.
pub(crate) async fn persist_benchmark(args: &Args, jobs: usize) -> anyhow::Result<()> {
    use postline::domain::{ClientMessageId, Content, Message, MessageId, MessageKind};
    use postline::queue::{self, PersistJob, PERSIST_QUEUE};
    use postline::worker::{Outcome, Worker, WorkerConfig};

    let mut cluster = None;
    let url = match &args.database_url {
        Some(u) => u.clone(),
        None => {
            let c = tokio::task::spawn_blocking(|| {
                postline::pglocal::Cluster::start(postline::pglocal::ClusterOptions {
                    fsync: true,
                    ..Default::default()
                })
            })
            .await??;
            let url = c.url("postgres");
            cluster = Some(c);
            url
        }
    };
    let pool = postline::store::connect(&url, (args.workers as u32 + 4).max(8)).await?;
    postline::store::migrate(&pool).await?;
    let store = postline::store::Store::new(pool.clone());
    let sender = UserId(Uuid::new_v4());
    let mut convs = Vec::new();
    for _ in 0..args.conversations {
        convs.push(
            store
                .create_conversation(sender, None, &[], Default::default())
                .await?
                .id,
        );
    }
    let pad = "x".repeat(args.payload.saturating_sub(8));
    let payloads: Vec<serde_json::Value> = (0..jobs)
        .map(|i| {
            let m = Message {
                id: MessageId::new_v7(),
                conversation_id: convs[i % convs.len()],
                sender_id: sender,
                client_message_id: ClientMessageId::parse(&format!("b{i}")).expect("valid id"),
                kind: MessageKind::Text,
                content: Content::from_stored(json!(format!("{i} {pad}"))),
                created_at: postline::domain::now_micros(),
            };
            serde_json::to_value(PersistJob::from_message(&m)).expect("job encodes")
        })
        .collect();
    let t = Instant::now();
    for chunk in payloads.chunks(1000) {
        queue::send_batch(&pool, PERSIST_QUEUE, chunk).await?;
    }
    let enqueue = t.elapsed();

    let keyring = Arc::new(postline::crypto::Keyring::new(
        &postline::config::EncryptionConfig::new(&args.encryption)?,
    ));
    let t = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..args.workers {
        if args.pgmq_only {
            handles.push(tokio::spawn(drain_pgmq(pool.clone())));
            continue;
        }
        let w = Worker::new(
            pool.clone(),
            WorkerConfig::default(),
            Arc::new(tokio::sync::Notify::new()),
        )
        .with_keyring(keyring.clone());
        handles.push(tokio::spawn(async move {
            let mut n = 0usize;
            loop {
                match w.run_once().await {
                    Ok(Outcome::Processed(_, r)) => n += r.persisted,
                    Ok(Outcome::Idle) => return Ok::<usize, anyhow::Error>(n),
                    Err(e) => return Err(e.into()),
                }
            }
        }));
    }
    let mut persisted = 0;
    for h in handles {
        persisted += h.await??;
    }
    let drain = t.elapsed();
    let report = json!({
        "jobs": jobs,
        "workers": args.workers,
        "conversations": args.conversations,
        "payload": args.payload,
        "encryption_key": keyring.active_id(),
        "pgmq_only": args.pgmq_only,
        "throwaway_cluster_fsync_on": cluster.is_some(),
        "enqueue_jobs_per_s": jobs as f64 / enqueue.as_secs_f64(),
        "persisted": persisted,
        "persisted_per_s": persisted as f64 / drain.as_secs_f64(),
        "drain_s": drain.as_secs_f64(),
    });
    if !args.json {
        println!(
            "postline-bench persist{}: {jobs} jobs, {} worker(s), {} conversations, {}: enqueue {:.0} jobs/s (send_batch of 1000), persisted {:.0} msg/s ({persisted} in {:.2} s)",
            if args.pgmq_only { " (pgmq only: read + delete, no chat logic)" } else { "" },
            args.workers,
            args.conversations,
            keyring.active_id().map_or("content plain".to_owned(), |k| format!("content sealed under key {k:?}")),
            report["enqueue_jobs_per_s"].as_f64().unwrap_or(0.0),
            report["persisted_per_s"].as_f64().unwrap_or(0.0),
            drain.as_secs_f64()
        );
    }
    println!("{report}");
    drop(cluster);
    Ok(())
}

/// The queue alone: read a batch (its own commit, as the worker's read is)
/// and delete it (another commit, where the worker's delete shares the
/// transaction that stores the messages). What is left between this and
/// the worker is the chat logic: storing, seqs, NOTIFY.
async fn drain_pgmq(pool: sqlx::PgPool) -> anyhow::Result<usize> {
    use postline::config::WorkerConfig;
    use postline::queue::{self, PERSIST_QUEUE};

    let cfg = WorkerConfig::default();
    let mut n = 0;
    loop {
        let jobs = queue::read(&pool, PERSIST_QUEUE, cfg.vt_secs(), cfg.batch_size).await?;
        if jobs.is_empty() {
            return Ok(n);
        }
        let ids: Vec<i64> = jobs.iter().map(|j| j.msg_id).collect();
        n += queue::delete(&pool, PERSIST_QUEUE, &ids).await?;
    }
}
