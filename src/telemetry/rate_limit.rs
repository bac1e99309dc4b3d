//! The limits whose refusals `Metrics` counts, one label value each.

/// The limits whose refusals are counted (a 429 or a `rate_limited` reply),
/// one label value each on `postline_rate_limited_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimit {
    SendPerUser,
    SendPerConversation,
    /// A sender's share of the persist buffer, while Postgres lags.
    PersistShare,
    JoinPerUser,
    HistoryPerUser,
    /// `sync`/`resume` requests in flight on one connection.
    SyncInFlight,
    Typing,
    HttpPerUser,
    HttpPerIp,
    UpgradePerIp,
    /// Open WebSockets per user (`POSTLINE_MAX_CONNECTIONS_PER_USER`).
    ConnectionsPerUser,
}

impl RateLimit {
    pub const ALL: [RateLimit; 11] = [
        RateLimit::SendPerUser,
        RateLimit::SendPerConversation,
        RateLimit::PersistShare,
        RateLimit::JoinPerUser,
        RateLimit::HistoryPerUser,
        RateLimit::SyncInFlight,
        RateLimit::Typing,
        RateLimit::HttpPerUser,
        RateLimit::HttpPerIp,
        RateLimit::UpgradePerIp,
        RateLimit::ConnectionsPerUser,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            RateLimit::SendPerUser => "send_per_user",
            RateLimit::SendPerConversation => "send_per_conversation",
            RateLimit::PersistShare => "persist_share",
            RateLimit::JoinPerUser => "join_per_user",
            RateLimit::HistoryPerUser => "history_per_user",
            RateLimit::SyncInFlight => "sync_in_flight",
            RateLimit::Typing => "typing",
            RateLimit::HttpPerUser => "http_per_user",
            RateLimit::HttpPerIp => "http_per_ip",
            RateLimit::UpgradePerIp => "upgrade_per_ip",
            RateLimit::ConnectionsPerUser => "connections_per_user",
        }
    }
}
