//! Which connections `serve` admits and how long it lets them idle: the
//! HTTP timeouts, TCP keepalive, the cap on open connections and the per-IP
//! cap on connections that have not shown a valid token yet.

use std::time::Duration;

use clap::Args;

use super::{defaults, millis, positive, secs, ConfigError};

/// Descriptors kept back from the connection cap for everything else the
/// process opens: the listener, stdio, epoll and its eventfds, log files,
/// and the slack a short-lived file (a --dev cluster's, a panic's backtrace)
/// needs. Generous on purpose: running out of descriptors is what the cap is
/// there to prevent.
pub const FILES_RESERVE: u64 = 64;

/// Connections over a cap held for at most about a second each, to answer
/// health probes (`/healthz`, `/readyz`) and refuse everything else with a
/// 503. Not a flag: a few probers at a time is all it is for; its
/// descriptors are kept back from the cap like [`FILES_RESERVE`].
pub const TRIAGE_SLOTS: u64 = 32;

/// The cap never derives to more than this, whatever RLIMIT_NOFILE says
/// (RLIM_INFINITY included): each connection holds buffers and tasks worth
/// tens of KiB, so a million is already more memory than a gateway has.
const MAX_DERIVED_CONNECTIONS: u64 = 1 << 20;

#[derive(Debug, Clone, Args)]
pub struct AdmissionArgs {
    /// Milliseconds a client has to send a request's complete head, counted
    /// from the connection or from its previous response: a slowloris
    /// sender, or a keep-alive connection left silent, is closed after this.
    #[arg(
        long,
        env = "POSTLINE_HEADER_READ_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub header_read_timeout_ms: u64,
    /// Milliseconds from a request's head to its response (a body sent too
    /// slowly included); past it the answer is 408 and the connection closes.
    #[arg(long, env = "POSTLINE_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// Seconds a connection may be silent before TCP keepalive probes it, so
    /// a peer that vanished without a FIN is found (0: no keepalive).
    #[arg(long, env = "POSTLINE_TCP_KEEPALIVE_SECS", default_value_t = 60)]
    pub tcp_keepalive_secs: u64,
    /// Open connections (HTTP and WebSocket) before new ones are refused with
    /// 503 (default: RLIMIT_NOFILE minus the database pool, the LISTEN
    /// connection, 64 for files and 32 for health probes at the cap).
    #[arg(long, env = "POSTLINE_MAX_CONNECTIONS")]
    pub max_connections: Option<u64>,
    /// Connections from one IP address that have not (yet) made a request
    /// with a valid token; more are refused with 503.
    #[arg(long, env = "POSTLINE_MAX_PENDING_PER_IP", default_value_t = 64)]
    pub max_pending_per_ip: usize,
}

impl Default for AdmissionArgs {
    fn default() -> Self {
        defaults()
    }
}

/// The validated [`AdmissionArgs`].
#[derive(Debug, Clone, Copy)]
pub struct AdmissionConfig {
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    /// None: no TCP keepalive.
    pub tcp_keepalive: Option<Duration>,
    /// Open connections served normally; beyond it, health probes are
    /// answered in `triage_slots` more and everything else gets 503.
    pub max_connections: usize,
    pub triage_slots: usize,
    pub max_pending_per_ip: usize,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig::new(
            &AdmissionArgs::default(),
            super::DatabaseArgs::default().db_max_connections,
            open_file_limit(),
        )
        .expect("the admission defaults are valid under this process's open-file limit")
    }
}

impl AdmissionConfig {
    /// `nofile` is the process's open-file limit ([`open_file_limit`]); the
    /// connection cap is derived from it, or checked against it when given.
    pub fn new(
        a: &AdmissionArgs,
        db_max_connections: u32,
        nofile: u64,
    ) -> Result<Self, ConfigError> {
        let reserved = u64::from(db_max_connections) + 1 + FILES_RESERVE + TRIAGE_SLOTS;
        let room = nofile.saturating_sub(reserved).min(MAX_DERIVED_CONNECTIONS);
        let max_connections = match a.max_connections {
            None if room == 0 => return Err(ConfigError::TooFewFiles { nofile, reserved }),
            None => room,
            Some(n) => {
                let n = positive("POSTLINE_MAX_CONNECTIONS", n)?;
                if n > room {
                    return Err(ConfigError::AboveFileLimit {
                        var: "POSTLINE_MAX_CONNECTIONS",
                        got: n,
                        room,
                        nofile,
                    });
                }
                n
            }
        };
        Ok(AdmissionConfig {
            // Zero would close every connection before its first byte.
            header_read_timeout: millis(
                "POSTLINE_HEADER_READ_TIMEOUT_MS",
                positive("POSTLINE_HEADER_READ_TIMEOUT_MS", a.header_read_timeout_ms)?,
            )?,
            request_timeout: millis(
                "POSTLINE_REQUEST_TIMEOUT_MS",
                positive("POSTLINE_REQUEST_TIMEOUT_MS", a.request_timeout_ms)?,
            )?,
            // Zero is meaningful: no keepalive.
            tcp_keepalive: match a.tcp_keepalive_secs {
                0 => None,
                s => Some(secs("POSTLINE_TCP_KEEPALIVE_SECS", s)?),
            },
            // Fits: at most MAX_DERIVED_CONNECTIONS, or checked against room,
            // itself at most that.
            max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
            triage_slots: TRIAGE_SLOTS as usize,
            max_pending_per_ip: positive("POSTLINE_MAX_PENDING_PER_IP", a.max_pending_per_ip)?,
        })
    }
}

/// The soft RLIMIT_NOFILE of this process: how many descriptors it may hold.
pub fn open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass, which outlives the call.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if ok {
        lim.rlim_cur
    } else {
        // Cannot fail on Linux for this resource; if it did, assume the
        // common default rather than no limit.
        1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(argv: &[&str]) -> AdmissionArgs {
        super::super::parse_ignoring_env(argv).unwrap()
    }

    #[test]
    fn the_cap_is_derived_from_the_file_limit_minus_what_else_needs_descriptors() {
        let c = AdmissionConfig::new(&args(&[]), 16, 1024).unwrap();
        assert_eq!(c.max_connections, 1024 - 16 - 1 - 64 - 32);
        assert_eq!(c.max_pending_per_ip, 64);
        assert_eq!(c.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert_eq!(c.tcp_keepalive, Some(Duration::from_secs(60)));
        let huge = AdmissionConfig::new(&args(&[]), 16, u64::MAX).unwrap();
        assert_eq!(huge.max_connections, 1 << 20);
    }

    #[test]
    fn a_cap_the_file_limit_cannot_hold_is_refused_by_name() {
        let e = AdmissionConfig::new(&args(&["--max-connections", "2000"]), 16, 1024).unwrap_err();
        assert!(e.to_string().contains("POSTLINE_MAX_CONNECTIONS"), "{e}");
        assert!(e.to_string().contains("1024"), "{e}");
        let e = AdmissionConfig::new(&args(&[]), 16, 100).unwrap_err();
        assert!(matches!(e, ConfigError::TooFewFiles { nofile: 100, .. }));
        let ok = AdmissionConfig::new(&args(&["--max-connections", "10"]), 16, 1024).unwrap();
        assert_eq!(ok.max_connections, 10);
    }

    #[test]
    fn zero_keepalive_turns_it_off_and_zero_elsewhere_is_refused() {
        let c = AdmissionConfig::new(&args(&["--tcp-keepalive-secs", "0"]), 16, 1024).unwrap();
        assert_eq!(c.tcp_keepalive, None);
        for (flag, var) in [
            (
                "--header-read-timeout-ms",
                "POSTLINE_HEADER_READ_TIMEOUT_MS",
            ),
            ("--request-timeout-ms", "POSTLINE_REQUEST_TIMEOUT_MS"),
            ("--max-connections", "POSTLINE_MAX_CONNECTIONS"),
            ("--max-pending-per-ip", "POSTLINE_MAX_PENDING_PER_IP"),
        ] {
            let e = AdmissionConfig::new(&args(&[flag, "0"]), 16, 1024).unwrap_err();
            assert!(matches!(e, ConfigError::NotPositive(v) if v == var), "{e}");
        }
    }
}
