//! `postline dlq`: inspect and re-drive dead letters.

use std::time::Duration;

use clap::Subcommand;

use super::parse_ttl;
use crate::queue::audit::{Actor, Origin};
use crate::store;

#[derive(Subcommand)]
pub(super) enum DlqAction {
    /// The newest dead letters, one line each.
    List {
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// One dead letter in full, as JSON.
    Show { id: i64 },
    /// Put dead letters back into their queue (idempotent for messages).
    Replay {
        /// The dead letter to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Replay every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead letters older than a duration (e.g. 7d).
    Purge {
        #[arg(long, value_parser = parse_ttl)]
        older_than: Duration,
    },
}

pub(super) async fn dlq(database_url: &str, action: DlqAction) -> anyhow::Result<()> {
    use crate::queue::dead_letters;
    let pool = store::connect(database_url, 2).await?;
    // Replays and purges are audited as done by whoever runs this; there
    // is no gateway and no client address to name.
    let by = Origin::default().by(Actor::operator_from_env());
    match action {
        DlqAction::List { limit } => {
            let rows = dead_letters::list(&pool, limit).await?;
            println!(
                "{:>8}  {:<20}  {:>10}  {:>8}  {:<25}  error",
                "id", "queue", "msg_id", "attempts", "dead_at"
            );
            for r in &rows {
                let mut error = r.error.replace('\n', " ");
                if error.len() > 80 {
                    let cut = (0..=80)
                        .rev()
                        .find(|i| error.is_char_boundary(*i))
                        .unwrap_or(0);
                    error.truncate(cut);
                    error.push('…');
                }
                println!(
                    "{:>8}  {:<20}  {:>10}  {:>8}  {:<25}  {error}",
                    r.id,
                    r.queue,
                    r.msg_id,
                    r.attempts,
                    r.dead_at.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string(),
                );
            }
            println!("{} dead letter(s)", rows.len());
        }
        DlqAction::Show { id } => match dead_letters::get(&pool, id).await? {
            Some(r) => println!("{}", serde_json::to_string_pretty(&r)?),
            None => anyhow::bail!("no dead letter with id {id}"),
        },
        DlqAction::Replay { id, all } => {
            let n = dead_letters::replay(&pool, if all { None } else { id }, &by).await?;
            if n == 0 && !all {
                anyhow::bail!("no dead letter with id {}", id.unwrap_or_default());
            }
            println!("replayed {n} dead letter(s)");
        }
        DlqAction::Purge { older_than } => {
            let n = dead_letters::purge_older_than(&pool, older_than, &by).await?;
            println!("purged {n} dead letter(s)");
        }
    }
    Ok(())
}
