//! The evaluator over hand-made observations: fire, stay, resolve, and keep
//! state when a measure is unread.
use super::*;

fn alerts() -> Alerts {
    let cfg = AlertConfig {
        oldest_job: Duration::from_secs(10),
        ..AlertConfig::default()
    };
    let metrics = Arc::new(Metrics::default());
    let sources = Sources {
        // Never connected: evaluate() reads no database.
        pool: sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://localhost/unused")
            .unwrap(),
        metrics,
        recorder: Arc::new(Recorder::new(
            Duration::from_secs(1),
            Duration::from_secs(60),
        )),
    };
    Alerts::new(cfg, "test".into(), sources, None)
}

fn queues(age: f64) -> Observation {
    Observation {
        oldest_job_age: Some(vec![("postline_persist".into(), age)]),
        ..Observation::default()
    }
}

#[tokio::test]
async fn an_alert_fires_once_stays_quiet_while_firing_and_resolves_once() {
    let a = alerts();
    assert!(a.evaluate(&queues(3.0)).is_empty());
    let fired = a.evaluate(&queues(11.0));
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].name, "oldest_job_age");
    assert_eq!(fired[0].subject.as_deref(), Some("postline_persist"));
    assert_eq!(fired[0].state, AlertState::Firing);
    assert!(
        a.evaluate(&queues(12.0)).is_empty(),
        "still firing: no transition"
    );
    assert_eq!(a.firing(), 1);
    // Unread (the database did not answer): no verdict either way.
    assert!(a.evaluate(&Observation::default()).is_empty());
    assert_eq!(a.firing(), 1);
    let resolved = a.evaluate(&queues(0.0));
    assert_eq!(resolved.len(), 1);
    assert_eq!(resolved[0].state, AlertState::Resolved);
    assert_eq!(a.firing(), 0);
    assert_eq!(a.view().len(), 1, "resolved alerts stay listed");
}

#[tokio::test]
async fn a_subject_that_disappears_resolves() {
    let a = alerts();
    let gw = uuid::Uuid::new_v4();
    let missing = |v: Vec<(uuid::Uuid, f64)>| Observation {
        missing_gateways: Some(v),
        ..Observation::default()
    };
    assert_eq!(a.evaluate(&missing(vec![(gw, 20.0)])).len(), 1);
    let back = a.evaluate(&missing(vec![]));
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].state, AlertState::Resolved);
    assert_eq!(back[0].value, None);
}

#[tokio::test]
async fn no_persisted_messages_in_the_window_resolves_persist_p99() {
    let a = alerts();
    let p99 = |v: Option<f64>| Observation {
        persist_p99: Some(v),
        ..Observation::default()
    };
    assert_eq!(a.evaluate(&p99(Some(5.0))).len(), 1);
    assert_eq!(a.evaluate(&p99(None))[0].state, AlertState::Resolved);
}
