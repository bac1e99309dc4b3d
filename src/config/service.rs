//! Service credentials (`POSTLINE_SERVICE_KEYS`): what an application's
//! backend presents on `/v1/service/...`. Not user tokens: a key acts for
//! no user and may do what no user may (post `system` messages, manage any
//! conversation). Several at once, so a key is rotated by adding the new one,
//! moving callers, then removing the old one.

use super::ops::constant_time_eq;
use super::{ConfigError, MIN_SECRET_BYTES};

/// One named key. The name is what the server records (idempotency keys
/// are scoped by it, logs show it); the secret is never printed.
#[derive(Clone)]
pub struct ServiceKey {
    pub name: String,
    secret: String,
}

/// Every configured key; empty: the service API is off (403).
#[derive(Clone, Default)]
pub struct ServiceKeys(Vec<ServiceKey>);

impl std::fmt::Debug for ServiceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|k| &k.name))
            .finish()
    }
}

impl ServiceKeys {
    /// `name=secret,name=secret`: names of 1-32 letters, digits, `-`, `_`;
    /// secrets of at least 16 bytes, no commas.
    pub fn parse(list: &str) -> Result<ServiceKeys, ConfigError> {
        let mut keys: Vec<ServiceKey> = Vec::new();
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = |why: &str| ConfigError::BadServiceKeys(why.to_owned());
            let (name, secret) = part
                .split_once('=')
                .ok_or_else(|| bad("each entry is name=secret"))?;
            if name.is_empty()
                || name.len() > 32
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(bad("a key's name is 1-32 letters, digits, - or _"));
            }
            if secret.len() < MIN_SECRET_BYTES {
                return Err(bad("a key's secret is at least 16 bytes"));
            }
            if keys.iter().any(|k| k.name == name) {
                return Err(bad("two keys have the same name"));
            }
            keys.push(ServiceKey {
                name: name.to_owned(),
                secret: secret.to_owned(),
            });
        }
        Ok(ServiceKeys(keys))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The name of the key `given` is. Every key is compared, each in
    /// constant time, so timing says neither which nor how much matched.
    pub fn find(&self, given: &str) -> Option<&str> {
        let mut found = None;
        for k in &self.0 {
            if constant_time_eq(k.secret.as_bytes(), given.as_bytes()) {
                found = Some(k.name.as_str());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_find_and_refuse_what_is_malformed() {
        let keys = ServiceKeys::parse("shop=0123456789abcdef, next=fedcba9876543210x").unwrap();
        assert_eq!(keys.find("0123456789abcdef"), Some("shop"));
        assert_eq!(keys.find("fedcba9876543210x"), Some("next"));
        assert_eq!(keys.find("0123456789abcdeF"), None);
        assert_eq!(keys.find(""), None);
        assert!(ServiceKeys::parse("").unwrap().is_empty());
        assert!(
            !format!("{keys:?}").contains("0123"),
            "secrets are never printed"
        );
        for bad in [
            "shop",
            "shop=short",
            "=0123456789abcdef",
            "sh op=0123456789abcdef",
            "a=0123456789abcdef,a=0123456789abcdef",
        ] {
            let e = ServiceKeys::parse(bad).unwrap_err().to_string();
            assert!(e.contains("POSTLINE_SERVICE_KEYS"), "{bad}: {e}");
        }
    }
}
