//! The alert rules, as data: a name, what it measures, a threshold from the
//! config. A rule fires for a subject (a queue, a gateway) whose value is
//! above its threshold. Pure: [`Observation`] in, values out.

use uuid::Uuid;

use crate::config::AlertConfig;

/// What one evaluation saw. `None` for a measure that could not be read (the
/// database did not answer): its alerts keep their state rather than
/// resolve on a blind spot.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// Oldest job age, in seconds, per queue.
    pub oldest_job_age: Option<Vec<(String, f64)>>,
    /// Jobs dead-lettered within the window (cluster-wide, from the table).
    pub dead_letters_in_window: Option<f64>,
    /// Enqueue→persisted p99 over the window, in seconds; `Some(None)`:
    /// nothing was stored in the window, so nothing was slow.
    pub persist_p99: Option<Option<f64>>,
    /// Failed job attempts plus HTTP 5xx, per minute over the window.
    pub errors_per_min: Option<f64>,
    /// Gateways silent without a clean shutdown, with seconds since last seen.
    pub missing_gateways: Option<Vec<(Uuid, f64)>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    OldestJobAge,
    DeadLetterGrowth,
    PersistP99,
    ErrorRate,
    GatewayMissing,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: &'static str,
    pub measure: Measure,
    /// Fires when the value is strictly above this.
    pub threshold: f64,
    pub unit: &'static str,
    pub summary: &'static str,
}

/// Every rule, with its threshold from `cfg`.
pub fn rules(cfg: &AlertConfig) -> Vec<Rule> {
    vec![
        Rule {
            name: "oldest_job_age",
            measure: Measure::OldestJobAge,
            threshold: cfg.oldest_job.as_secs_f64(),
            unit: "seconds",
            summary: "a queue's oldest job waits too long: workers are behind, stuck or gone",
        },
        Rule {
            name: "dead_letter_growth",
            measure: Measure::DeadLetterGrowth,
            threshold: cfg.dead_letters as f64,
            unit: "jobs per window",
            summary: "jobs are being dead-lettered: see `postline dlq list`",
        },
        Rule {
            name: "persist_p99",
            measure: Measure::PersistP99,
            threshold: cfg.persist_p99.as_secs_f64(),
            unit: "seconds",
            summary: "enqueue to persisted p99 is high: Postgres or the worker is slow",
        },
        Rule {
            name: "error_rate",
            measure: Measure::ErrorRate,
            threshold: cfg.errors_per_min as f64,
            unit: "errors per minute",
            summary: "failed job attempts and HTTP 5xx responses are frequent",
        },
        Rule {
            name: "gateway_missing",
            measure: Measure::GatewayMissing,
            threshold: 0.0,
            unit: "seconds silent",
            summary: "a gateway stopped heartbeating without a clean shutdown",
        },
    ]
}

impl Rule {
    /// The rule's values by subject, or None when its measure is unread. A
    /// subject absent from a read measure is fine (it resolves).
    pub fn values(&self, obs: &Observation) -> Option<Vec<(Option<String>, f64)>> {
        let one = |v: f64| vec![(None, v)];
        Some(match self.measure {
            Measure::OldestJobAge => obs
                .oldest_job_age
                .as_ref()?
                .iter()
                .map(|(q, age)| (Some(q.clone()), *age))
                .collect(),
            Measure::DeadLetterGrowth => one(obs.dead_letters_in_window?),
            Measure::PersistP99 => obs.persist_p99?.map(one).unwrap_or_default(),
            Measure::ErrorRate => one(obs.errors_per_min?),
            Measure::GatewayMissing => obs
                .missing_gateways
                .as_ref()?
                .iter()
                .map(|(id, silent)| (Some(id.to_string()), *silent))
                .collect(),
        })
    }

    pub fn fires(&self, value: f64) -> bool {
        value > self.threshold
    }
}
