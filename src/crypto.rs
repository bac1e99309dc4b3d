//! Message content at rest: AES-256-GCM (RustCrypto's `aes-gcm`) under the
//! configured keys (`POSTLINE_ENCRYPTION_KEYS`).
//!
//! A sealed content is `version (1 byte) || nonce (12 bytes) || ciphertext
//! and tag`, stored in `messages.ciphertext` beside the id of its key in
//! `messages.key_id`. The nonce is random per seal (96 bits: with one key,
//! 2^32 seals keep the collision chance under 2^-32, NIST SP 800-38D; rotate
//! well before). The associated data binds the ciphertext to its row (message
//! id and conversation id), so a ciphertext copied to another row, or a row
//! moved to another conversation, fails to open instead of showing the wrong
//! text.
//!
//! No I/O; imports only `config` and `domain`.

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};

use crate::config::EncryptionConfig;
use crate::domain::{ConversationId, MessageId};

/// Format of what [`Keyring::seal`] returns; the first byte of every blob,
/// so a later format can be told apart from this one.
const FORMAT_V1: u8 = 1;
const NONCE_BYTES: usize = 12;
const TAG_BYTES: usize = 16;
/// Prefix of the associated data: a blob sealed for another purpose (or
/// another format) never opens as message content.
const AAD_DOMAIN: &[u8] = b"postline/messages.content/v1";

/// Why a sealed content could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("it is sealed under key {0:?}, which is not configured (POSTLINE_ENCRYPTION_KEYS)")]
    UnknownKey(String),
    #[error("the ciphertext is malformed (too short, or an unknown format)")]
    Malformed,
    /// Wrong key bytes under the right id, or the row was altered or moved.
    #[error("authentication failed under key {0:?}: wrong key material for that id, or the row was altered")]
    Forged(String),
}

/// The row a content belongs to, bound into its seal.
#[derive(Debug, Clone, Copy)]
pub struct RowBinding {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
}

impl RowBinding {
    fn aad(&self) -> [u8; AAD_DOMAIN.len() + 32] {
        let mut out = [0u8; AAD_DOMAIN.len() + 32];
        out[..AAD_DOMAIN.len()].copy_from_slice(AAD_DOMAIN);
        out[AAD_DOMAIN.len()..AAD_DOMAIN.len() + 16].copy_from_slice(self.message_id.0.as_bytes());
        out[AAD_DOMAIN.len() + 16..].copy_from_slice(self.conversation_id.0.as_bytes());
        out
    }
}

/// The configured keys, ready to use; cheap to share behind an `Arc`.
#[derive(Default)]
pub struct Keyring {
    keys: Vec<(String, Aes256Gcm)>,
    /// Index of the key new content is sealed under; None: stored plain.
    active: Option<usize>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field(
                "keys",
                &self.keys.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .field("active", &self.active_id())
            .finish()
    }
}

impl Keyring {
    pub fn new(cfg: &EncryptionConfig) -> Keyring {
        let keys: Vec<(String, Aes256Gcm)> = cfg
            .keys()
            .iter()
            .map(|k| {
                (
                    k.id.clone(),
                    Aes256Gcm::new(&Key::<Aes256Gcm>::from(*k.secret())),
                )
            })
            .collect();
        let active = cfg
            .active_id()
            .and_then(|a| keys.iter().position(|(id, _)| id == a));
        Keyring { keys, active }
    }

    /// No keys: everything is stored and read plain.
    pub fn plain() -> Keyring {
        Keyring::default()
    }

    pub fn active_id(&self) -> Option<&str> {
        self.active.map(|i| self.keys[i].0.as_str())
    }

    /// Whether a row under `key_id` (None: plain) is already where the
    /// active key would put it.
    pub fn is_current(&self, key_id: Option<&str>) -> bool {
        key_id == self.active_id()
    }

    /// `plaintext` sealed under the active key for `row`: the key's id and
    /// the blob. None when no key is active (store it plain).
    pub fn seal(&self, row: RowBinding, plaintext: &[u8]) -> Option<(&str, Vec<u8>)> {
        let (id, cipher) = &self.keys[self.active?];
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = row.aad();
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            // aes-gcm fails only past 2^36 bytes of plaintext; content is
            // bounded far below (POSTLINE_MAX_CONTENT_BYTES).
            .expect("AES-GCM seals any content of bounded size");
        let mut blob = Vec::with_capacity(1 + NONCE_BYTES + sealed.len());
        blob.push(FORMAT_V1);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        Some((id.as_str(), blob))
    }

    /// The plaintext of `blob`, sealed under `key_id` for `row`.
    pub fn open(&self, key_id: &str, row: RowBinding, blob: &[u8]) -> Result<Vec<u8>, OpenError> {
        let (_, cipher) = self
            .keys
            .iter()
            .find(|(id, _)| id == key_id)
            .ok_or_else(|| OpenError::UnknownKey(key_id.to_owned()))?;
        if blob.len() < 1 + NONCE_BYTES + TAG_BYTES || blob[0] != FORMAT_V1 {
            return Err(OpenError::Malformed);
        }
        let (nonce, sealed) = blob[1..].split_at(NONCE_BYTES);
        let nonce: [u8; NONCE_BYTES] = nonce.try_into().map_err(|_| OpenError::Malformed)?;
        let aad = row.aad();
        cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| OpenError::Forged(key_id.to_owned()))
    }
}

/// A fresh random key, base64 as `POSTLINE_ENCRYPTION_KEYS` takes it
/// (`postline keys generate`).
pub fn generate_key() -> String {
    use base64::Engine;
    let key = Aes256Gcm::generate_key(&mut OsRng);
    base64::engine::general_purpose::STANDARD.encode(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EncryptionArgs, EncryptionConfig};
    use uuid::Uuid;

    fn ring(keys: &str, active: Option<&str>) -> Keyring {
        Keyring::new(
            &EncryptionConfig::new(&EncryptionArgs {
                encryption_keys: Some(keys.to_owned()),
                encryption_active_key: active.map(str::to_owned),
            })
            .unwrap(),
        )
    }

    fn row() -> RowBinding {
        RowBinding {
            message_id: MessageId(Uuid::now_v7()),
            conversation_id: ConversationId(Uuid::new_v4()),
        }
    }

    #[test]
    fn sealed_content_opens_with_its_key_and_row_and_hides_the_text() {
        let (k1, k2) = (generate_key(), generate_key());
        let r = ring(&format!("k1:{k1},k2:{k2}"), None);
        let at = row();
        let (id, blob) = r.seal(at, br#""meet at noon""#).unwrap();
        assert_eq!(id, "k1");
        assert_eq!(blob.len(), 1 + NONCE_BYTES + 14 + TAG_BYTES);
        assert!(!blob.windows(4).any(|w| w == b"noon"));
        assert_eq!(r.open("k1", at, &blob).unwrap(), br#""meet at noon""#);
        // Random nonces: the same text seals differently every time.
        assert_ne!(r.seal(at, br#""meet at noon""#).unwrap().1, blob);
    }

    #[test]
    fn an_older_key_still_opens_what_it_sealed() {
        let (k1, k2) = (generate_key(), generate_key());
        let old = ring(&format!("k1:{k1}"), None);
        let at = row();
        let (_, blob) = old.seal(at, b"\"x\"").unwrap();
        let rotated = ring(&format!("k2:{k2},k1:{k1}"), None);
        assert_eq!(rotated.active_id(), Some("k2"));
        assert!(!rotated.is_current(Some("k1")));
        assert!(rotated.is_current(Some("k2")));
        assert_eq!(rotated.open("k1", at, &blob).unwrap(), b"\"x\"");
    }

    #[test]
    fn a_ciphertext_moved_to_another_row_or_altered_does_not_open() {
        let k1 = generate_key();
        let r = ring(&format!("k1:{k1}"), None);
        let at = row();
        let (_, blob) = r.seal(at, b"\"secret\"").unwrap();
        let other_message = RowBinding {
            message_id: MessageId(Uuid::now_v7()),
            ..at
        };
        let other_conversation = RowBinding {
            conversation_id: ConversationId(Uuid::new_v4()),
            ..at
        };
        for moved in [other_message, other_conversation] {
            assert_eq!(
                r.open("k1", moved, &blob),
                Err(OpenError::Forged("k1".into()))
            );
        }
        let mut flipped = blob.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(
            r.open("k1", at, &flipped),
            Err(OpenError::Forged("k1".into()))
        );
        assert_eq!(r.open("k1", at, &blob[..10]), Err(OpenError::Malformed));
        let mut future = blob.clone();
        future[0] = 2;
        assert_eq!(r.open("k1", at, &future), Err(OpenError::Malformed));
    }

    #[test]
    fn an_unknown_key_or_the_wrong_bytes_under_an_id_is_a_clear_error() {
        let (k1, k2) = (generate_key(), generate_key());
        let at = row();
        let (_, blob) = ring(&format!("k1:{k1}"), None).seal(at, b"\"x\"").unwrap();
        let e = ring(&format!("k2:{k2}"), None)
            .open("k1", at, &blob)
            .unwrap_err();
        assert_eq!(e, OpenError::UnknownKey("k1".into()));
        assert!(e.to_string().contains("POSTLINE_ENCRYPTION_KEYS"));
        let e = ring(&format!("k1:{k2}"), None)
            .open("k1", at, &blob)
            .unwrap_err();
        assert_eq!(e, OpenError::Forged("k1".into()));
    }

    #[test]
    fn without_keys_nothing_is_sealed() {
        let r = Keyring::plain();
        assert_eq!(r.active_id(), None);
        assert!(r.is_current(None));
        assert!(r.seal(row(), b"\"x\"").is_none());
        assert_eq!(
            r.open("k1", row(), &[1; 40]),
            Err(OpenError::UnknownKey("k1".into()))
        );
    }

    #[test]
    fn generated_keys_are_32_random_bytes_in_base64() {
        use base64::Engine;
        let (a, b) = (generate_key(), generate_key());
        assert_ne!(a, b);
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&a)
            .unwrap();
        assert_eq!(raw.len(), 32);
    }
}
