//! `postline keys`: make an encryption key, and move stored content to the
//! active one (docs/OPERATIONS.md, "Encryption at rest").

use std::io::Write;
use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use uuid::Uuid;

use crate::config::{DatabaseUrl, EncryptionArgs};
use crate::crypto::Keyring;
use crate::queue::audit::{Action, Actor, Origin};
use crate::store;

/// Passes over the table before `rotate` gives up on rows that keep
/// arriving under another key (a process still sealing with an old active
/// key): each pass after the first only picks up what the last one could
/// not (rows an edit held, rows stored meanwhile).
const MAX_PASSES: usize = 5;

#[derive(Subcommand)]
pub(super) enum KeysCommand {
    /// Print a fresh random key (32 bytes, base64) for POSTLINE_ENCRYPTION_KEYS.
    Generate,
    /// Re-encrypt every stored message that is not under the active key
    /// (older keys, or plain from before a key was set), in small batches,
    /// one short transaction each, while chat goes on. Stopped anywhere, it
    /// resumes by running it again.
    Rotate {
        #[command(flatten)]
        database: DatabaseUrl,
        #[command(flatten)]
        encryption: EncryptionArgs,
        /// Messages per batch (one transaction, its rows locked until it
        /// commits: an edit of one of them waits that long).
        #[arg(long, default_value_t = 500)]
        batch: u32,
        /// Pause between batches, in milliseconds, to leave the database
        /// more room for chat.
        #[arg(long, default_value_t = 0)]
        throttle_ms: u64,
    },
}

/// What `keys rotate` was asked to do, validated.
pub(super) struct Rotation {
    pub database_url: String,
    pub keyring: Keyring,
    pub batch: u32,
    pub throttle: Duration,
}

pub(super) fn generate() {
    println!("{}", crate::crypto::generate_key());
}

pub(super) async fn rotate(r: Rotation) -> anyhow::Result<()> {
    let Some(active) = r.keyring.active_id() else {
        bail!("no active key: set POSTLINE_ENCRYPTION_KEYS");
    };
    let pool = store::connect(&r.database_url, 2).await?;
    let total = store::rows_to_rotate(&pool, &r.keyring).await?;
    say(format_args!(
        "{total} message(s) to re-encrypt under key {active:?}, {} per batch",
        r.batch
    ));
    // One audit row per run that re-seals anything, written with its first batch.
    let mut audit = Some(
        Origin::default()
            .by(Actor::operator_from_env())
            .did(Action::KeysRotate)
            .detail(serde_json::json!({"to_key": active, "batch": r.batch, "to_rotate": total})),
    );
    let mut rotated = 0usize;
    let mut failed: Vec<(Uuid, String)> = Vec::new();
    for pass in 1..=MAX_PASSES {
        let mut after = Uuid::nil();
        let mut this_pass = 0usize;
        loop {
            let b =
                store::rotate_batch(&pool, &r.keyring, after, i64::from(r.batch), audit.as_ref())
                    .await?;
            if b.rotated > 0 {
                audit = None;
            }
            let Some(last) = b.last_id else { break };
            after = last;
            this_pass += b.rotated;
            rotated += b.rotated;
            for (id, why) in b.failed {
                eprintln!("postline: message {id} left as it is: {why}");
                failed.push((id, why));
            }
            say(format_args!("re-encrypted {rotated} of {total}"));
            if !r.throttle.is_zero() {
                tokio::time::sleep(r.throttle).await;
            }
        }
        let left = store::rows_to_rotate(&pool, &r.keyring).await? - failed.len() as i64;
        if left <= 0 {
            break;
        }
        if this_pass == 0 || pass == MAX_PASSES {
            bail!(
                "{left} message(s) are still not under key {active:?} after {pass} pass(es): \
                 does every `serve` and `worker` run with this POSTLINE_ENCRYPTION_ACTIVE_KEY?"
            );
        }
        say(format_args!(
            "{left} message(s) were busy or arrived meanwhile: another pass"
        ));
    }
    if !failed.is_empty() {
        bail!(
            "{} message(s) could not be decrypted and were left as they are (listed above); \
             the rest are under key {active:?}",
            failed.len()
        );
    }
    say(format_args!(
        "done: every message is under key {active:?} ({rotated} re-encrypted)"
    ));
    Ok(())
}

/// One progress line, flushed at once (stdout may be a pipe).
fn say(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
