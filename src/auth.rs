//! HS256 JWTs: verify a bearer token into a [`UserId`], or issue one (`postline token`).

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::domain::UserId;

/// Clock drift allowed between whoever issued a token and this server, on
/// `exp` and `nbf` alike. Chat tokens are short-lived, so a few seconds, not
/// the usual minute.
pub const LEEWAY_SECS: u64 = 5;

/// Why a token was refused; each message names the problem in words a
/// client developer can act on, never a library's internal error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (its nbf is in the future)")]
    NotYetValid,
    #[error("bad signature")]
    BadSignature,
    #[error("malformed token: expected a JWT (three base64url parts)")]
    Malformed,
    #[error("unsupported token algorithm: tokens must be HS256")]
    Algorithm,
    #[error("token is missing the {0} claim")]
    MissingClaim(String),
    #[error("the token's {0} claim is malformed")]
    BadClaim(String),
    #[error("the token's sub must be a user id (a UUID)")]
    BadSubject,
    #[error(
        "token lifetime of {lifetime} s is over this server's maximum of {max} s: \
         use a shorter-lived token"
    )]
    TooLong { lifetime: u64, max: u64 },
}

impl From<jsonwebtoken::errors::Error> for AuthError {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::ExpiredSignature => AuthError::Expired,
            K::ImmatureSignature => AuthError::NotYetValid,
            K::InvalidSignature => AuthError::BadSignature,
            K::InvalidAlgorithm | K::MissingAlgorithm | K::InvalidAlgorithmName => {
                AuthError::Algorithm
            }
            K::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
            K::InvalidClaimFormat(c) => AuthError::BadClaim(c.clone()),
            // A claim of the wrong type fails in serde, after the signature
            // was checked: still a malformed token from the client's view.
            _ => AuthError::Malformed,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
}

/// A token that passed every check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub user: UserId,
    /// `exp`, in seconds since the Unix epoch.
    pub expires_at: u64,
}

impl Verified {
    /// How long from now until the token no longer counts, leeway included:
    /// an open socket is closed then.
    pub fn remaining(&self) -> Duration {
        Duration::from_secs((self.expires_at + LEEWAY_SECS).saturating_sub(unix_now()))
    }
}

/// Keys derived from the shared secret. Cheap to clone.
#[derive(Clone)]
pub struct Jwt {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// Longest lifetime accepted (`exp - iat`, or `exp - now` without `iat`).
    max_ttl: Option<Duration>,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Jwt { secret: <redacted> }")
    }
}

impl Jwt {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        // Off by default in jsonwebtoken: a token meant for later must not
        // work now.
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Jwt {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            max_ttl: None,
        }
    }

    /// Refuse tokens that live longer than `max` (a leaked long-lived token
    /// would otherwise work for as long as its issuer chose).
    pub fn with_max_ttl(mut self, max: Duration) -> Self {
        self.max_ttl = Some(max);
        self
    }

    /// The longest lifetime accepted, if any: what a token issued here for
    /// this server may live at most.
    pub fn max_ttl(&self) -> Option<Duration> {
        self.max_ttl
    }

    pub fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        self.verify_token(token).map(|v| v.user)
    }

    /// Every check, and what the token grants: whose it is and until when.
    pub fn verify_token(&self, token: &str) -> Result<Verified, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let claims =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)?.claims;
        if let Some(max) = self.max_ttl {
            // From the earlier of iat and now: an iat in the future must not
            // stretch what a token may claim.
            let from = claims.iat.map_or(unix_now(), |iat| iat.min(unix_now()));
            let lifetime = claims.exp.saturating_sub(from);
            if lifetime > max.as_secs() {
                return Err(AuthError::TooLong {
                    lifetime,
                    max: max.as_secs(),
                });
            }
        }
        let user = claims
            .sub
            .parse::<UserId>()
            .map_err(|_| AuthError::BadSubject)?;
        Ok(Verified {
            user,
            expires_at: claims.exp,
        })
    }

    pub fn issue(&self, user: UserId, ttl: Duration) -> String {
        let now = unix_now();
        self.issue_with_exp(user, now, now + ttl.as_secs())
    }

    /// Sign a token with explicit times (tests use this to make expired tokens).
    pub fn issue_with_exp(&self, user: UserId, iat: u64, exp: u64) -> String {
        self.sign(&Claims {
            sub: user.to_string(),
            exp,
            iat: Some(iat),
            nbf: None,
        })
    }

    /// Sign a token valid from `nbf` (tests of the not-before check).
    pub fn issue_not_before(&self, user: UserId, nbf: u64, exp: u64) -> String {
        self.sign(&Claims {
            sub: user.to_string(),
            exp,
            iat: Some(unix_now()),
            nbf: Some(nbf),
        })
    }

    fn sign(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing with an in-memory key does not fail")
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
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
        let e = Jwt::new(b"two").verify(&token).unwrap_err();
        assert_eq!(e, AuthError::BadSignature);
        assert_eq!(e.to_string(), "bad signature");
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
        let e = jwt.verify("a.b.c").unwrap_err();
        assert_eq!(e, AuthError::Malformed);
        assert!(!e.to_string().contains("Invalid"), "{e}");
        assert_eq!(jwt.verify("not-a-jwt"), Err(AuthError::Malformed));
        let claims = Claims {
            sub: "alice".into(),
            exp: unix_now() + 60,
            iat: None,
            nbf: None,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        assert_eq!(jwt.verify(&token), Err(AuthError::BadSubject));
    }

    #[test]
    fn a_token_not_valid_yet_is_refused_within_the_leeway_accepted() {
        let jwt = Jwt::new(b"s");
        let now = unix_now();
        let later = jwt.issue_not_before(user(), now + 60, now + 120);
        let e = jwt.verify(&later).unwrap_err();
        assert_eq!(e, AuthError::NotYetValid);
        assert_eq!(
            e.to_string(),
            "token not valid yet (its nbf is in the future)"
        );
        let drift = jwt.issue_not_before(user(), now + 2, now + 120);
        assert!(jwt.verify(&drift).is_ok());
    }

    #[test]
    fn a_token_living_longer_than_the_maximum_is_refused() {
        let jwt = Jwt::new(b"s").with_max_ttl(Duration::from_secs(3600));
        let now = unix_now();
        let u = user();
        assert!(jwt.verify(&jwt.issue(u, Duration::from_secs(3600))).is_ok());
        let e = jwt
            .verify(&jwt.issue(u, Duration::from_secs(7200)))
            .unwrap_err();
        assert_eq!(
            e,
            AuthError::TooLong {
                lifetime: 7200,
                max: 3600
            }
        );
        assert!(e.to_string().contains("maximum of 3600 s"), "{e}");
        // An iat in the future does not stretch it; without iat, exp - now counts.
        let sneaky = jwt.issue_with_exp(u, now + 86_400, now + 86_400 + 60);
        assert!(matches!(
            jwt.verify(&sneaky),
            Err(AuthError::TooLong { .. })
        ));
        let bare = jwt.sign(&Claims {
            sub: u.to_string(),
            exp: now + 7200,
            iat: None,
            nbf: None,
        });
        assert!(matches!(jwt.verify(&bare), Err(AuthError::TooLong { .. })));
        let v = jwt
            .verify_token(&jwt.issue(u, Duration::from_secs(60)))
            .unwrap();
        assert_eq!(v.user, u);
        assert!((now + 60..=now + 61).contains(&v.expires_at));
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
