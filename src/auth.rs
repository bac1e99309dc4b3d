//! HS256 JWTs: verify a bearer token into a [`UserId`], or issue one (`postline token`).

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::domain::UserId;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// Keys derived from the shared secret. Cheap to clone.
#[derive(Clone)]
pub struct Jwt {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Jwt { secret: <redacted> }")
    }
}

impl Jwt {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // Clocks of clients and servers drift a little; a minute is the usual allowance
        // but chat tokens are short-lived, so keep it small.
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Jwt {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })?;
        data.claims
            .sub
            .parse::<UserId>()
            .map_err(|_| AuthError::Invalid("sub must be a UUID".into()))
    }

    pub fn issue(&self, user: UserId, ttl: Duration) -> String {
        let now = unix_now();
        self.issue_with_exp(user, now, now + ttl.as_secs())
    }

    /// Sign a token with explicit times (tests use this to make expired tokens).
    pub fn issue_with_exp(&self, user: UserId, iat: u64, exp: u64) -> String {
        let claims = Claims {
            sub: user.to_string(),
            exp,
            iat: Some(iat),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing with an in-memory key does not fail")
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The token in an `Authorization: Bearer` header value, if it has that form.
pub fn bearer(header_value: &str) -> Option<&str> {
    let (scheme, token) = header_value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The `token` parameter of a query string. JWTs use only URL-safe
/// characters, so no percent-decoding is needed for a well-formed one.
pub fn query_token(query: &str) -> Option<&str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "token")
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> UserId {
        UserId(uuid::Uuid::new_v4())
    }

    #[test]
    fn issued_token_verifies() {
        let jwt = Jwt::new(b"secret");
        let u = user();
        assert_eq!(
            jwt.verify(&jwt.issue(u, Duration::from_secs(60))).unwrap(),
            u
        );
    }

    #[test]
    fn missing_token_is_refused() {
        assert_eq!(Jwt::new(b"s").verify(""), Err(AuthError::Missing));
    }

    #[test]
    fn bad_signature_is_refused() {
        let token = Jwt::new(b"one").issue(user(), Duration::from_secs(60));
        assert!(matches!(
            Jwt::new(b"two").verify(&token),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn expired_token_is_refused() {
        let jwt = Jwt::new(b"s");
        let now = unix_now();
        let token = jwt.issue_with_exp(user(), now - 3600, now - 600);
        assert_eq!(jwt.verify(&token), Err(AuthError::Expired));
    }

    #[test]
    fn garbage_and_non_uuid_subject_are_refused() {
        let jwt = Jwt::new(b"s");
        assert!(matches!(jwt.verify("a.b.c"), Err(AuthError::Invalid(_))));
        let claims = Claims {
            sub: "alice".into(),
            exp: unix_now() + 60,
            iat: None,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        assert!(matches!(jwt.verify(&token), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn token_is_found_in_header_and_query() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(query_token("a=1&token=xyz"), Some("xyz"));
        assert_eq!(query_token("a=1"), None);
    }
}
