//! Every default valid, every bad value refused by name.
use super::*;

/// `serve`'s arguments from `extra` alone (never from the environment
/// of the test process), with a valid secret and database URL.
fn args(extra: &[&str]) -> ServerArgs {
    let mut a: ServerArgs = parse_ignoring_env(extra).unwrap();
    a.http.jwt_secret = Some("0123456789abcdef".into());
    a.database.url.database_url = Some("postgres://localhost/x".into());
    a
}

fn refused(extra: &[&str]) -> ConfigError {
    match Config::from_args(&args(extra), None) {
        Ok(_) => panic!("{extra:?} was accepted"),
        Err(e) => e,
    }
}

#[test]
fn every_default_is_valid_and_matches_the_settings_defaults() {
    let cfg = Config::from_args(&args(&[]), None).unwrap();
    let d = Config::with_secret("0123456789abcdef");
    assert_eq!(format!("{:?}", cfg.gateway), format!("{:?}", d.gateway));
    assert_eq!(format!("{:?}", cfg.enqueue), format!("{:?}", d.enqueue));
    assert_eq!(format!("{:?}", cfg.worker), format!("{:?}", d.worker));
    assert_eq!(cfg.db_max_connections, d.db_max_connections);
    assert_eq!(cfg.shutdown_grace, d.shutdown_grace);
    assert_eq!(format!("{:?}", cfg.admission), format!("{:?}", d.admission));
    assert_eq!(format!("{:?}", cfg.limits), format!("{:?}", d.limits));
    // Spot checks against the README's table.
    assert_eq!(d.gateway.max_frame_bytes, 65536);
    assert_eq!(d.gateway.outbox_bytes, 256 * 1024);
    assert_eq!(d.worker.retry.cap, Duration::from_secs(300));
    assert_eq!(d.worker.retention, Duration::from_secs(168 * 3600));
    assert_eq!(
        d.worker.audit_retention,
        Some(Duration::from_secs(90 * 86_400))
    );
    assert_eq!(d.shutdown_grace, Duration::from_secs(10));
    assert_eq!(cfg.max_token_ttl, d.max_token_ttl);
    assert_eq!(d.max_token_ttl, Duration::from_secs(86_400));
    assert_eq!(RuntimeConfig::default().threads, None);
    assert_eq!(d.limits.send_per_user.per_second.get(), 20);
    assert_eq!(d.limits.upgrade_per_ip.burst.get(), 50);
    assert_eq!(d.limits.max_refusals.get(), 100);
}

#[test]
fn the_persist_flush_gives_up_within_half_the_shutdown_grace() {
    let cfg = Config::from_args(&args(&["--shutdown-grace-secs", "4"]), None).unwrap();
    assert_eq!(cfg.enqueue.flush_timeout, Duration::from_secs(2));
    let cfg = Config::from_args(&args(&["--shutdown-grace-secs", "60"]), None).unwrap();
    assert_eq!(cfg.enqueue.flush_timeout, Duration::from_secs(5));
}

#[test]
fn secret_is_required_outside_dev() {
    let mut a = args(&[]);
    a.http.jwt_secret = None;
    assert!(matches!(
        Config::from_args(&a, None),
        Err(ConfigError::MissingSecret)
    ));
    a.dev = true;
    assert_eq!(
        Config::from_args(&a, None).unwrap().jwt_secret,
        DEV_JWT_SECRET
    );
    a.http.jwt_secret = Some("short".into());
    assert!(matches!(
        Config::from_args(&a, None),
        Err(ConfigError::WeakSecret)
    ));
}

#[test]
fn database_url_is_required_outside_dev() {
    let mut a = args(&[]);
    a.database.url.database_url = None;
    assert!(matches!(
        Config::from_args(&a, None),
        Err(ConfigError::MissingDatabaseUrl)
    ));
    a.dev = true;
    assert!(Config::from_args(&a, None).is_ok());
}

#[test]
fn port_env_is_honoured_and_checked() {
    let a = args(&[]);
    assert_eq!(
        Config::from_args(&a, Some("9000")).unwrap().listen.port(),
        9000
    );
    assert!(matches!(
        Config::from_args(&a, Some("http")),
        Err(ConfigError::BadPort(_))
    ));
    assert_eq!(Config::from_args(&a, None).unwrap().listen.port(), 8080);
}

#[test]
fn zero_where_zero_makes_no_sense_is_refused_by_name() {
    for (flag, var) in [
        ("--max-content-bytes", "POSTLINE_MAX_CONTENT_BYTES"),
        ("--max-frame-bytes", "POSTLINE_MAX_FRAME_BYTES"),
        ("--outbox-bytes", "POSTLINE_OUTBOX_BYTES"),
        ("--typing-ttl-ms", "POSTLINE_TYPING_TTL_MS"),
        ("--db-max-connections", "POSTLINE_DB_MAX_CONNECTIONS"),
        ("--enqueue-capacity", "POSTLINE_ENQUEUE_CAPACITY"),
        ("--enqueue-max-batch", "POSTLINE_ENQUEUE_MAX_BATCH"),
        ("--worker-batch", "POSTLINE_WORKER_BATCH"),
        (
            "--worker-visibility-timeout-secs",
            "POSTLINE_WORKER_VISIBILITY_TIMEOUT",
        ),
        ("--worker-poll-ms", "POSTLINE_WORKER_POLL_MS"),
        ("--retry-base-ms", "POSTLINE_RETRY_BASE_MS"),
        ("--max-attempts", "POSTLINE_MAX_ATTEMPTS"),
        ("--starvation-limit", "POSTLINE_STARVATION_LIMIT"),
        ("--cleanup-interval-secs", "POSTLINE_CLEANUP_INTERVAL_SECS"),
        ("--shutdown-grace-secs", "POSTLINE_SHUTDOWN_GRACE"),
        ("--threads", "POSTLINE_THREADS"),
        ("--ping-interval-ms", "POSTLINE_PING_INTERVAL_MS"),
        (
            "--max-connections-per-user",
            "POSTLINE_MAX_CONNECTIONS_PER_USER",
        ),
        (
            "--max-joined-per-connection",
            "POSTLINE_MAX_JOINED_PER_CONNECTION",
        ),
        ("--max-token-ttl-secs", "POSTLINE_MAX_TOKEN_TTL"),
        ("--send-rate", "POSTLINE_SEND_RATE"),
        ("--send-burst", "POSTLINE_SEND_BURST"),
        (
            "--conversation-send-rate",
            "POSTLINE_CONVERSATION_SEND_RATE",
        ),
        (
            "--conversation-send-burst",
            "POSTLINE_CONVERSATION_SEND_BURST",
        ),
        ("--join-rate", "POSTLINE_JOIN_RATE"),
        ("--join-burst", "POSTLINE_JOIN_BURST"),
        ("--history-rate", "POSTLINE_HISTORY_RATE"),
        ("--history-burst", "POSTLINE_HISTORY_BURST"),
        ("--http-user-rate", "POSTLINE_HTTP_USER_RATE"),
        ("--http-user-burst", "POSTLINE_HTTP_USER_BURST"),
        ("--http-ip-rate", "POSTLINE_HTTP_IP_RATE"),
        ("--http-ip-burst", "POSTLINE_HTTP_IP_BURST"),
        ("--upgrade-ip-rate", "POSTLINE_UPGRADE_IP_RATE"),
        ("--upgrade-ip-burst", "POSTLINE_UPGRADE_IP_BURST"),
        ("--max-refusals", "POSTLINE_MAX_REFUSALS"),
    ] {
        let e = if flag == "--threads" {
            RuntimeConfig::try_from(&args(&[flag, "0"]).runtime).unwrap_err()
        } else {
            refused(&[flag, "0"])
        };
        assert!(
            matches!(e, ConfigError::NotPositive(v) if v == var),
            "{flag}: {e}"
        );
        assert!(e.to_string().contains(var), "{e}");
    }
    let e = refused(&["--worker-batch=-5"]);
    assert!(matches!(
        e,
        ConfigError::NotPositive("POSTLINE_WORKER_BATCH")
    ));
}

#[test]
fn zero_where_zero_means_something_is_kept() {
    let a = args(&[
        "--presence-grace-ms",
        "0",
        "--drain-window-ms",
        "0",
        "--enqueue-linger-us",
        "0",
        "--worker-linger-ms",
        "0",
        "--archive-retention-hours",
        "0",
        "--audit-retention-hours",
        "0",
    ]);
    let cfg = Config::from_args(&a, None).unwrap();
    assert!(cfg.gateway.presence_grace.is_zero());
    assert!(cfg.worker.retention.is_zero());
    // Zero audit retention is "forever", not "nothing".
    assert_eq!(cfg.worker.audit_retention, None);
}

#[test]
fn out_of_range_values_are_refused_not_clamped() {
    // The LISTEN connection is one of the pool's: a pool of one serves nothing else.
    let e = refused(&["--db-max-connections", "1"]);
    assert!(matches!(
        e,
        ConfigError::TooSmall {
            var: "POSTLINE_DB_MAX_CONNECTIONS",
            min: 2,
            got: 1
        }
    ));
    let e = refused(&["--presence-heartbeat-ms", "5"]);
    assert!(matches!(
        e,
        ConfigError::TooSmall {
            var: "POSTLINE_PRESENCE_HEARTBEAT_MS",
            min: 10,
            got: 5
        }
    ));
    let e = refused(&["--ping-interval-ms", "1000", "--ws-read-timeout-ms", "1000"]);
    assert!(matches!(
        e,
        ConfigError::TooSmall {
            var: "POSTLINE_WS_READ_TIMEOUT_MS",
            min: 1001,
            got: 1000
        }
    ));
    let e = refused(&["--retry-base-ms", "2000", "--retry-cap-secs", "1"]);
    assert!(matches!(e, ConfigError::RetryCapBelowBase { .. }), "{e}");
    assert!(e.to_string().contains("POSTLINE_RETRY_CAP_SECS"));
    // A cap equal to the base is a constant delay: fine.
    assert!(Config::from_args(
        &args(&["--retry-base-ms", "1000", "--retry-cap-secs", "1"]),
        None
    )
    .is_ok());
    let e = refused(&["--archive-retention-hours", &u64::MAX.to_string()]);
    assert!(matches!(
        e,
        ConfigError::TooLarge {
            var: "POSTLINE_ARCHIVE_RETENTION_HOURS"
        }
    ));
    let e = refused(&["--audit-retention-hours", &u64::MAX.to_string()]);
    assert!(matches!(
        e,
        ConfigError::TooLarge {
            var: "POSTLINE_AUDIT_RETENTION_HOURS"
        }
    ));
    let e = refused(&["--shutdown-grace-secs", &u64::MAX.to_string()]);
    assert!(matches!(
        e,
        ConfigError::TooLarge {
            var: "POSTLINE_SHUTDOWN_GRACE"
        }
    ));
}

#[test]
fn the_old_outbox_capacity_is_accepted_with_a_warning() {
    let a = args(&["--outbox-capacity", "1024"]);
    assert!(Config::from_args(&a, None).is_ok());
    let w = a.warnings();
    assert!(
        w.iter().any(|w| w.contains("POSTLINE_OUTBOX_BYTES")),
        "{w:?}"
    );
    assert!(args(&[]).warnings().is_empty());
}

#[test]
fn allowed_origins_are_parsed_checked_and_permissive_only_in_dev() {
    let cfg = Config::from_args(&args(&[]), None).unwrap();
    assert_eq!(cfg.allowed_origins, Origins::List(vec![]));
    assert!(!cfg.allowed_origins.allows("https://a.example"));
    let cfg = Config::from_args(
        &args(&[
            "--allowed-origins",
            " https://Chat.example/, http://localhost:3000",
        ]),
        None,
    )
    .unwrap();
    assert!(cfg.allowed_origins.allows("https://chat.example"));
    assert!(cfg.allowed_origins.allows("http://localhost:3000"));
    assert!(!cfg.allowed_origins.allows("http://localhost:3001"));
    assert!(!cfg.allowed_origins.allows("https://chat.example.evil"));
    for bad in [
        "chat.example",
        "https://a.example/path",
        "ftp://x",
        "https://",
    ] {
        let e = refused(&["--allowed-origins", bad]);
        assert!(matches!(e, ConfigError::BadOrigin(_)), "{bad}: {e}");
        assert!(e.to_string().contains("POSTLINE_ALLOWED_ORIGINS"));
    }
    let mut a = args(&[]);
    a.dev = true;
    assert_eq!(
        Config::from_args(&a, None).unwrap().allowed_origins,
        Origins::Any
    );
    a.http.allowed_origins = Some("https://only.example".into());
    assert!(!Config::from_args(&a, None)
        .unwrap()
        .allowed_origins
        .allows("https://other.example"));
}

#[test]
fn dev_against_a_real_database_is_warned_about_loudly() {
    let mut a = args(&[]);
    a.dev = true;
    a.http.jwt_secret = None;
    let w = a.warnings();
    assert!(
        w.iter().any(|w| w.contains("PUBLIC dev JWT secret")),
        "{w:?}"
    );
    // A real secret given with --dev is the one used.
    a.http.jwt_secret = Some("a-real-secret-0123456789".into());
    assert_eq!(
        Config::from_args(&a, None).unwrap().jwt_secret,
        "a-real-secret-0123456789"
    );
    assert!(!a.warnings().iter().any(|w| w.contains("PUBLIC")));
    // --dev on its own throwaway database: nothing to warn about.
    a.database.url.database_url = None;
    assert!(a.warnings().is_empty());
}

#[test]
fn demo_tokens_are_minted_only_in_dev_with_the_public_secret() {
    let mut a = args(&[]);
    assert_eq!(
        Config::from_args(&a, None).unwrap().dev_login,
        DevLogin::Off
    );
    a.dev = true;
    // --dev with a real secret: a token minted for a demo user would be a
    // real token, so none is.
    assert_eq!(
        Config::from_args(&a, None).unwrap().dev_login,
        DevLogin::Off
    );
    a.http.jwt_secret = None;
    assert_eq!(
        Config::from_args(&a, None).unwrap().dev_login,
        DevLogin::DemoUsers
    );
    assert_eq!(DevLogin::for_server(false, DEV_JWT_SECRET), DevLogin::Off);
    assert_eq!(Config::with_secret(DEV_JWT_SECRET).dev_login, DevLogin::Off);
}

#[test]
fn secret_is_redacted() {
    let cfg = Config::from_args(&args(&[]), None).unwrap();
    assert!(!format!("{cfg:?}").contains("0123456789abcdef"));
}

#[test]
fn the_operator_token_is_checked_and_compared_whole() {
    let ops = |token: Option<&str>, dev: bool| {
        let mut a = args(&[]);
        a.ops.operator_token = token.map(str::to_owned);
        a.dev = dev;
        Config::from_args(&a, None).map(|c| c.ops.operator)
    };
    assert!(matches!(
        ops(None, false).unwrap(),
        OperatorAuth::NotConfigured
    ));
    assert!(matches!(ops(None, true).unwrap(), OperatorAuth::Open));
    assert!(matches!(
        ops(Some("short"), true),
        Err(ConfigError::WeakOperatorToken)
    ));
    let OperatorAuth::Token(t) = ops(Some("0123456789abcdef"), false).unwrap() else {
        panic!("a token was given")
    };
    assert!(t.matches("0123456789abcdef"));
    assert!(!t.matches("0123456789abcde"));
    assert!(!t.matches("0123456789abcdefg"));
    assert!(!t.matches(""));
    assert_eq!(format!("{t:?}"), "<redacted>");
}

#[test]
fn alert_settings_have_valid_defaults_and_refuse_https_webhooks() {
    let cfg = Config::from_args(&args(&[]), None).unwrap();
    let a = &cfg.ops.alerts;
    assert_eq!(a.interval, Duration::from_secs(5));
    assert_eq!(a.window, Duration::from_secs(300));
    assert_eq!(a.oldest_job, Duration::from_secs(60));
    assert_eq!(a.dead_letters, 0);
    assert_eq!(a.persist_p99, Duration::from_millis(1000));
    assert_eq!(a.errors_per_min, 10);
    assert!(a.webhook.is_none());
    let hook = |url: &str| {
        let mut a = args(&[]);
        a.ops.alert_webhook_url = Some(url.to_owned());
        Config::from_args(&a, None).map(|c| c.ops.alerts.webhook)
    };
    assert_eq!(
        hook("http://alerts.internal:9000/hook?x=1").unwrap(),
        Some(WebhookUrl {
            authority: "alerts.internal:9000".into(),
            path: "/hook?x=1".into()
        })
    );
    assert_eq!(hook("http://relay").unwrap().unwrap().authority, "relay:80");
    assert!(matches!(
        hook("https://hooks.example.com/x"),
        Err(ConfigError::HttpsWebhook {
            var: "POSTLINE_ALERT_WEBHOOK_URL"
        })
    ));
    for bad in ["ftp://x/", "relay:80", "http://user:pw@relay/", "http:///x"] {
        assert!(
            matches!(hook(bad), Err(ConfigError::BadWebhookUrl { .. })),
            "{bad} was accepted"
        );
    }
    assert!(matches!(
        refused(&["--alert-interval-secs", "0"]),
        ConfigError::NotPositive("POSTLINE_ALERT_INTERVAL_SECS")
    ));
}

#[test]
fn webhooks_need_http_urls_and_a_strong_secret_and_name_the_variable() {
    assert!(Config::from_args(&args(&[]), None)
        .unwrap()
        .webhooks
        .is_none());
    let secret = "0123456789abcdef";
    let cfg = Config::from_args(
        &args(&[
            "--webhook-urls",
            "http://a.internal:9000/hooks, http://b.internal/x,",
            "--webhook-secret",
            secret,
        ]),
        None,
    )
    .unwrap();
    let w = cfg.webhooks.expect("configured");
    assert_eq!(
        w.endpoints
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["http://a.internal:9000/hooks", "http://b.internal:80/x"]
    );
    assert_eq!(w.timeout, Duration::from_secs(10));
    assert_eq!(w.concurrency, 16);
    assert!(!format!("{w:?}").contains(secret));

    let with = |url: &str, secret: Option<&str>| {
        let mut a = vec!["--webhook-urls", url];
        if let Some(s) = secret {
            a.extend(["--webhook-secret", s]);
        }
        refused(&a)
    };
    let e = with("https://hooks.example.com/x", Some(secret));
    assert!(matches!(
        e,
        ConfigError::HttpsWebhook {
            var: "POSTLINE_WEBHOOK_URLS"
        }
    ));
    assert!(e.to_string().contains("POSTLINE_WEBHOOK_URLS"));
    let e = with("not a url", Some(secret));
    assert!(matches!(
        e,
        ConfigError::BadWebhookUrl {
            var: "POSTLINE_WEBHOOK_URLS",
            ..
        }
    ));
    let e = with("http://a/x", None);
    assert!(matches!(e, ConfigError::MissingWebhookSecret));
    assert!(e.to_string().contains("POSTLINE_WEBHOOK_SECRET"));
    let e = with("http://a/x", Some("short"));
    assert!(matches!(e, ConfigError::WeakWebhookSecret));
    assert!(e.to_string().contains("POSTLINE_WEBHOOK_SECRET"));
    let e = refused(&[
        "--webhook-urls",
        "http://a/x",
        "--webhook-secret",
        secret,
        "--webhook-timeout-ms",
        "0",
    ]);
    assert!(matches!(
        e,
        ConfigError::NotPositive("POSTLINE_WEBHOOK_TIMEOUT_MS")
    ));
}

#[test]
fn moderation_is_off_by_default_and_its_settings_are_checked_by_name() {
    let cfg = Config::from_args(&args(&[]), None).unwrap();
    assert!(cfg.moderation.words.is_none());
    assert!(cfg.moderation.hook.is_none());

    let cfg = Config::from_args(
        &args(&["--moderation-file", "/etc/postline/words.txt"]),
        None,
    )
    .unwrap();
    let words = cfg.moderation.words.unwrap();
    assert_eq!(words.action, ModerationAction::Reject);
    assert_eq!(words.poll, Some(Duration::from_secs(2)));
    let cfg = Config::from_args(
        &args(&[
            "--moderation-file",
            "w.txt",
            "--moderation-action",
            "mask",
            "--moderation-poll-ms",
            "0",
        ]),
        None,
    )
    .unwrap();
    let words = cfg.moderation.words.unwrap();
    assert_eq!(words.action, ModerationAction::Mask);
    assert_eq!(words.poll, None, "0: SIGHUP only");
    assert!(
        parse_ignoring_env::<ServerArgs>(&["--moderation-action", "shout"]).is_err(),
        "only reject or mask"
    );

    let secret = "moderation-secret-0123";
    let cfg = Config::from_args(
        &args(&[
            "--moderation-hook-url",
            "http://review.internal:7000/review",
            "--moderation-hook-secret",
            secret,
        ]),
        None,
    )
    .unwrap();
    let hook = cfg.moderation.hook.unwrap();
    assert_eq!(hook.url.to_string(), "http://review.internal:7000/review");
    assert_eq!(hook.timeout, Duration::from_secs(5));
    assert_eq!(hook.concurrency, 8);
    assert!(!format!("{hook:?}").contains(secret));
    let e = refused(&["--moderation-hook-url", "https://review.example.com/x"]);
    assert!(
        e.to_string().contains("POSTLINE_MODERATION_HOOK_URL"),
        "{e}"
    );
    let e = refused(&["--moderation-hook-url", "http://a/x"]);
    assert!(matches!(e, ConfigError::MissingModerationHookSecret));
    let e = refused(&[
        "--moderation-hook-url",
        "http://a/x",
        "--moderation-hook-secret",
        "short",
    ]);
    assert!(matches!(e, ConfigError::WeakModerationHookSecret));
    let e = refused(&[
        "--moderation-hook-url",
        "http://a/x",
        "--moderation-hook-secret",
        secret,
        "--moderation-hook-concurrency",
        "0",
    ]);
    assert!(matches!(
        e,
        ConfigError::NotPositive("POSTLINE_MODERATION_HOOK_CONCURRENCY")
    ));
}
