//! `/dev/...`: the demo users and their tokens, for the page at `/`. These
//! routes exist only when the server signs with the public dev secret
//! ([`DevLogin::DemoUsers`]); otherwise every `/dev` path is 404, as if
//! they did not exist. A token minted here is accepted by no server that
//! set its own `POSTLINE_JWT_SECRET`.

use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use uuid::Uuid;

use super::{api, json, ApiError, Body, HttpContext};
use crate::config::DevLogin;
use crate::domain::UserId;
use crate::protocol::http::{DemoUser, DemoUsers, DevToken, DevTokenRequest};

/// The demo users: fixed ids, so conversations made in one session are
/// found again in the next, and the README's tour can name them.
pub const DEMO_USERS: &[DemoUser] = &[
    demo("Alice", 0x0190f3a4_0000_7000_8000_00000000a11c),
    demo("Bob", 0x0190f3a4_0000_7000_8000_000000000b0b),
    demo("Carol", 0x0190f3a4_0000_7000_8000_00000000ca70),
    demo("Dave", 0x0190f3a4_0000_7000_8000_00000000da7e),
];

const fn demo(name: &'static str, id: u128) -> DemoUser {
    DemoUser {
        user_id: UserId(Uuid::from_u128(id)),
        name,
    }
}

/// How long a demo token lives (less if the server accepts less): a
/// working day, so a demo left open does not have to sign in again.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);

pub(super) async fn handle(
    ctx: &HttpContext,
    req: Request<Incoming>,
    path: &[&str],
) -> Result<Response<Body>, ApiError> {
    if ctx.dev_login != DevLogin::DemoUsers {
        return Err(ApiError::NotFound("no such route".into()));
    }
    match (req.method(), path) {
        (&Method::GET, ["users"]) => Ok(json(StatusCode::OK, &DemoUsers { users: DEMO_USERS })),
        (&Method::POST, ["token"]) => {
            let body: DevTokenRequest = api::read_json(req).await?;
            let user = DEMO_USERS
                .iter()
                .find(|u| u.user_id == body.user_id)
                .ok_or_else(|| ApiError::Invalid(not_a_demo_user(body.user_id)))?;
            let ttl = ctx
                .jwt
                .max_ttl()
                .map_or(DEV_TOKEN_TTL, |m| m.min(DEV_TOKEN_TTL));
            let expires_at = chrono::Utc::now()
                + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(1));
            Ok(json(
                StatusCode::CREATED,
                &DevToken {
                    token: ctx.jwt.issue(user.user_id, ttl),
                    user_id: user.user_id,
                    name: user.name,
                    expires_at,
                },
            ))
        }
        (_, ["users"] | ["token"]) => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::NotFound("no such route".into())),
    }
}

fn not_a_demo_user(id: UserId) -> String {
    let names: Vec<String> = DEMO_USERS
        .iter()
        .map(|u| format!("{} ({})", u.name, u.user_id))
        .collect();
    format!("{id} is not a demo user; they are {}", names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_users_have_distinct_ids_and_names() {
        let mut ids: Vec<_> = DEMO_USERS.iter().map(|u| u.user_id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), DEMO_USERS.len());
        // The README's tour names Alice and Bob by these ids.
        assert_eq!(
            DEMO_USERS[0].user_id.to_string(),
            "0190f3a4-0000-7000-8000-00000000a11c"
        );
        assert_eq!(
            DEMO_USERS[1].user_id.to_string(),
            "0190f3a4-0000-7000-8000-000000000b0b"
        );
    }
}
