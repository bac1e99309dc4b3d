//! Threshold alerts evaluated in the process: every `interval`, observe
//! (queues, dead letters and gateways from Postgres; latency and errors from
//! this process's counters over the window), evaluate the [`rules`], and
//! for each alert that changes state log it (WARN on fire, INFO on resolve)
//! and queue it for the [`webhook`]. `GET /alerts` shows the state.
//!
//! [`Alerts::evaluate`] is pure over an [`Observation`] and
//! [`Alerts::tick`] is one whole round, so tests drive either without
//! sleeping. Each process evaluates on its own: database-wide rules fire in
//! every process that runs an evaluator (`source` says which).

pub mod rules;
mod webhook;

pub use rules::{Measure, Observation, Rule};
pub use webhook::Webhook;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::AlertConfig;
use crate::protocol::http::{self as wire, Alert, AlertState};
use crate::telemetry::{Metrics, Recorder};

/// Each Postgres read of an evaluation gives up after this: a slow database
/// must not stall the evaluator (the measure is then unread, see
/// [`Observation`]).
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// What a process evaluates from.
pub struct Sources {
    pub pool: PgPool,
    pub metrics: Arc<Metrics>,
    pub recorder: Arc<Recorder>,
}

#[derive(Default)]
struct State {
    evaluated_at: Option<DateTime<Utc>>,
    /// By (rule, subject): every alert that fired since start.
    alerts: BTreeMap<(&'static str, Option<String>), Alert>,
}

pub struct Alerts {
    cfg: AlertConfig,
    rules: Vec<Rule>,
    source: String,
    sources: Sources,
    webhook: Option<Webhook>,
    state: Mutex<State>,
}

impl Alerts {
    /// `source` names this process in `/alerts` and webhook bodies.
    pub fn new(
        cfg: AlertConfig,
        source: String,
        sources: Sources,
        webhook: Option<Webhook>,
    ) -> Self {
        Alerts {
            rules: rules::rules(&cfg),
            cfg,
            source,
            sources,
            webhook,
            state: Mutex::default(),
        }
    }

    pub fn config(&self) -> &AlertConfig {
        &self.cfg
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Poisoned only by a panic mid-update of plain data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Compare `obs` with the rules; update the state and return what
    /// changed (fired or resolved), in rule order.
    pub fn evaluate(&self, obs: &Observation) -> Vec<Alert> {
        let now = Utc::now();
        let mut state = self.state();
        state.evaluated_at = Some(now);
        let mut changed = Vec::new();
        for rule in &self.rules {
            let Some(values) = rule.values(obs) else {
                continue; // unread: keep every alert of this rule as it is
            };
            let mut seen = Vec::new();
            for (subject, value) in values {
                let key = (rule.name, subject.clone());
                let firing = rule.fires(value);
                seen.push(subject.clone());
                match state.alerts.get_mut(&key) {
                    Some(a) => {
                        a.value = Some(value);
                        if (a.state == AlertState::Firing) != firing {
                            a.state = if firing {
                                AlertState::Firing
                            } else {
                                AlertState::Resolved
                            };
                            a.since = now;
                            changed.push(a.clone());
                        }
                    }
                    None if firing => {
                        let a = Alert {
                            name: rule.name,
                            subject,
                            state: AlertState::Firing,
                            since: now,
                            value: Some(value),
                            threshold: rule.threshold,
                            unit: rule.unit,
                            summary: rule.summary,
                        };
                        state.alerts.insert(key, a.clone());
                        changed.push(a);
                    }
                    None => {}
                }
            }
            // Subjects no longer reported (a queue empty of stats, a
            // gateway back or forgotten) resolve.
            for ((name, subject), a) in state.alerts.iter_mut() {
                if *name == rule.name && a.state == AlertState::Firing && !seen.contains(subject) {
                    a.state = AlertState::Resolved;
                    a.since = now;
                    a.value = None;
                    changed.push(a.clone());
                }
            }
        }
        let firing = state
            .alerts
            .values()
            .filter(|a| a.state == AlertState::Firing)
            .count();
        self.sources.metrics.set_alerts_firing(firing);
        changed
    }

    /// Read what the rules need. A read that fails or times out leaves its
    /// measure unread.
    pub async fn observe(&self) -> Observation {
        let Sources {
            pool,
            metrics,
            recorder,
        } = &self.sources;
        let (queues, dead, gateways) = tokio::join!(
            tokio::time::timeout(READ_TIMEOUT, crate::queue::stats(pool)),
            tokio::time::timeout(
                READ_TIMEOUT,
                crate::queue::dead_letters::counts(pool, self.cfg.window)
            ),
            tokio::time::timeout(READ_TIMEOUT, crate::store::gateways(pool)),
        );
        let window = recorder.window(metrics, self.cfg.window);
        let now = Utc::now();
        Observation {
            oldest_job_age: queues.ok().and_then(Result::ok).map(|qs| {
                qs.into_iter()
                    .map(|q| (q.queue_name, f64::from(q.oldest_msg_age_sec.unwrap_or(0))))
                    .collect()
            }),
            dead_letters_in_window: dead
                .ok()
                .and_then(Result::ok)
                .map(|(_, recent)| recent as f64),
            persist_p99: window.as_ref().map(|w| w.persist_latency.quantile(0.99)),
            // Over the configured window, not the span recorded so far: a
            // fresh process does not fire on its first error.
            errors_per_min: window
                .as_ref()
                .map(|w| w.errors() as f64 * 60.0 / self.cfg.window.as_secs_f64()),
            missing_gateways: gateways.ok().and_then(Result::ok).map(|gs| {
                gs.into_iter()
                    .filter(|g| !g.alive)
                    .map(|g| (g.id, (now - g.last_seen).num_milliseconds() as f64 / 1000.0))
                    .collect()
            }),
        }
    }

    /// One round: observe, evaluate, log and notify. Returns what changed.
    pub async fn tick(&self) -> Vec<Alert> {
        let obs = self.observe().await;
        let changed = self.evaluate(&obs);
        for a in &changed {
            let subject = a.subject.as_deref().unwrap_or("");
            match a.state {
                AlertState::Firing => tracing::warn!(
                    alert = a.name, subject, value = ?a.value, threshold = a.threshold,
                    unit = a.unit, "alert firing: {}", a.summary
                ),
                AlertState::Resolved => tracing::info!(
                    alert = a.name, subject, value = ?a.value, "alert resolved"
                ),
            }
            if let Some(hook) = &self.webhook {
                let body = wire::AlertEvent {
                    source: &self.source,
                    alert: a,
                };
                if let Ok(bytes) = serde_json::to_vec(&body) {
                    hook.send(bytes.into());
                }
            }
        }
        changed
    }

    /// Tick every `interval` until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut every = tokio::time::interval(self.cfg.interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => { self.tick().await; }
            }
        }
    }

    /// Alerts currently firing.
    pub fn firing(&self) -> usize {
        self.state()
            .alerts
            .values()
            .filter(|a| a.state == AlertState::Firing)
            .count()
    }

    /// The body of `GET /alerts`: firing first, then the most recent.
    pub fn view(&self) -> Vec<Alert> {
        let mut alerts: Vec<Alert> = self.state().alerts.values().cloned().collect();
        alerts.sort_by(|a, b| {
            (b.state == AlertState::Firing)
                .cmp(&(a.state == AlertState::Firing))
                .then(b.since.cmp(&a.since))
        });
        alerts
    }

    pub fn evaluated_at(&self) -> Option<DateTime<Utc>> {
        self.state().evaluated_at
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn rules(&self) -> impl Iterator<Item = wire::AlertRule> + '_ {
        self.rules.iter().map(|r| wire::AlertRule {
            name: r.name,
            threshold: r.threshold,
            unit: r.unit,
            summary: r.summary,
        })
    }
}

#[cfg(test)]
mod tests;
