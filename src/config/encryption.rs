//! Encryption at rest (`serve`, `worker`, `keys rotate`): the keys message
//! content is sealed under before it is stored (docs/OPERATIONS.md,
//! "Encryption at rest"). Several at once: the active one seals new content,
//! the others only open what they sealed earlier, until `postline keys
//! rotate` has moved every row to the active one.
//!
//! Only parsed and checked here; the cipher is `crate::crypto`.

use base64::Engine;
use clap::Args;

use super::ConfigError;

/// Bytes of an AES-256 key.
pub const KEY_BYTES: usize = 32;

/// Longest key id: it is stored in every encrypted row.
const MAX_KEY_ID_LEN: usize = 32;

#[derive(Clone, Default, Args)]
pub struct EncryptionArgs {
    /// Keys for message content at rest, comma-separated `id:base64`: an id
    /// of 1-32 letters, digits, `-` or `_`, and 32 random bytes in standard
    /// base64 (`postline keys generate` prints one). Unset: content is
    /// stored as plain JSON, with a warning at start.
    #[arg(long, env = "POSTLINE_ENCRYPTION_KEYS", hide_env_values = true)]
    pub encryption_keys: Option<String>,
    /// The id of the key that encrypts new content; the others only decrypt.
    /// Default: the first key listed.
    #[arg(long, env = "POSTLINE_ENCRYPTION_ACTIVE_KEY")]
    pub encryption_active_key: Option<String>,
}

impl std::fmt::Debug for EncryptionArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptionArgs")
            .field(
                "encryption_keys",
                &self.encryption_keys.as_ref().map(|_| "<redacted>"),
            )
            .field("encryption_active_key", &self.encryption_active_key)
            .finish()
    }
}

/// One key. The secret is never printed.
#[derive(Clone)]
pub struct EncryptionKey {
    pub id: String,
    secret: [u8; KEY_BYTES],
}

impl EncryptionKey {
    pub fn secret(&self) -> &[u8; KEY_BYTES] {
        &self.secret
    }
}

/// The validated [`EncryptionArgs`]. Empty: content is stored plain.
#[derive(Clone, Default)]
pub struct EncryptionConfig {
    keys: Vec<EncryptionKey>,
    /// Index of the active key in `keys`; None exactly when `keys` is empty.
    active: Option<usize>,
}

impl std::fmt::Debug for EncryptionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptionConfig")
            .field("keys", &self.keys.iter().map(|k| &k.id).collect::<Vec<_>>())
            .field("active", &self.active_id())
            .finish()
    }
}

impl EncryptionConfig {
    pub fn new(a: &EncryptionArgs) -> Result<EncryptionConfig, ConfigError> {
        let bad = |why: String| ConfigError::BadEncryptionKeys(why);
        let mut keys: Vec<EncryptionKey> = Vec::new();
        let list = a.encryption_keys.as_deref().unwrap_or("");
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, b64) = part
                .split_once(':')
                .ok_or_else(|| bad("each entry is id:base64-key".to_owned()))?;
            check_id(id).map_err(bad)?;
            // The error names the key, never a byte of its value.
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| bad(format!("key {id:?} is not valid base64")))?;
            let secret: [u8; KEY_BYTES] = raw.as_slice().try_into().map_err(|_| {
                bad(format!(
                    "key {id:?} is {} bytes, an AES-256 key is {KEY_BYTES} \
                     (`postline keys generate` prints one)",
                    raw.len()
                ))
            })?;
            if keys.iter().any(|k| k.id == id) {
                return Err(bad(format!("two keys have the id {id:?}")));
            }
            keys.push(EncryptionKey {
                id: id.to_owned(),
                secret,
            });
        }
        let active = match a.encryption_active_key.as_deref().map(str::trim) {
            None | Some("") if keys.is_empty() => None,
            None | Some("") => Some(0),
            Some(id) => match keys.iter().position(|k| k.id == id) {
                Some(i) => Some(i),
                None if keys.is_empty() => {
                    return Err(ConfigError::ActiveKeyWithoutKeys(id.to_owned()))
                }
                None => return Err(ConfigError::UnknownActiveKey(id.to_owned())),
            },
        };
        Ok(EncryptionConfig { keys, active })
    }

    /// Every key, the active one among them.
    pub fn keys(&self) -> &[EncryptionKey] {
        &self.keys
    }

    /// The id of the key new content is sealed under; None: stored plain.
    pub fn active_id(&self) -> Option<&str> {
        self.active.map(|i| self.keys[i].id.as_str())
    }

    /// What to log at start when content will be stored plain.
    pub fn warning(&self) -> Option<&'static str> {
        self.active.is_none().then_some(
            "POSTLINE_ENCRYPTION_KEYS is not set: message content is stored in plain text \
             (see docs/OPERATIONS.md, \"Encryption at rest\")",
        )
    }
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > MAX_KEY_ID_LEN
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "a key id is 1-{MAX_KEY_ID_LEN} letters, digits, - or _, got {id:?}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="; // bytes 0..32
    const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="; // bytes 32..64

    fn cfg(keys: Option<&str>, active: Option<&str>) -> Result<EncryptionConfig, ConfigError> {
        EncryptionConfig::new(&EncryptionArgs {
            encryption_keys: keys.map(str::to_owned),
            encryption_active_key: active.map(str::to_owned),
        })
    }

    #[test]
    fn no_keys_means_plain_with_a_warning() {
        let c = cfg(None, None).unwrap();
        assert_eq!(c.active_id(), None);
        assert!(c.warning().is_some());
        let c = cfg(Some(" "), None).unwrap();
        assert_eq!(c.active_id(), None);
    }

    #[test]
    fn the_first_key_is_active_unless_another_is_named() {
        let list = format!("k2:{K2}, k1:{K1}");
        let c = cfg(Some(&list), None).unwrap();
        assert_eq!(c.active_id(), Some("k2"));
        assert!(c.warning().is_none());
        let c = cfg(Some(&list), Some("k1")).unwrap();
        assert_eq!(c.active_id(), Some("k1"));
        assert_eq!(c.keys().len(), 2);
        assert_eq!(c.keys()[1].secret()[31], 31);
    }

    #[test]
    fn malformed_keys_are_refused_by_name_without_their_value() {
        for (keys, active, says) in [
            ("k1", None, "id:base64"),
            (&format!("k1:{K1},k1:{K2}") as &str, None, "two keys"),
            ("k1:not base64!", None, "not valid base64"),
            ("k1:AAEC", None, "3 bytes"),
            (&format!("bad id:{K1}"), None, "key id"),
            (&format!(":{K1}"), None, "key id"),
            (&format!("k1:{K1}"), Some("k9"), "k9"),
        ] {
            let e = cfg(Some(keys), active).unwrap_err().to_string();
            assert!(e.contains(says), "{keys}: {e}");
            assert!(e.contains("POSTLINE_ENCRYPTION_"), "{keys}: {e}");
            assert!(!e.contains(K1) && !e.contains(K2), "a key leaked: {e}");
        }
        let e = cfg(None, Some("k1")).unwrap_err().to_string();
        assert!(e.contains("POSTLINE_ENCRYPTION_KEYS"), "{e}");
    }

    #[test]
    fn secrets_are_never_printed() {
        let c = cfg(Some(&format!("k1:{K1}")), None).unwrap();
        let shown = format!("{c:?}");
        assert!(shown.contains("k1"), "{shown}");
        assert!(
            !shown.contains(K1) && !shown.contains("[0, 1, 2"),
            "{shown}"
        );
    }
}
