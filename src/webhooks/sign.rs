//! `Postline-Signature: v1=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`.
//! The timestamp is signed with the body so a captured request cannot be
//! replayed later with a fresh `Postline-Timestamp` (receivers reject old
//! timestamps; docs/INTEGRATION.md shows how).

use std::fmt::Write;

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const TIMESTAMP_HEADER: &str = "postline-timestamp";
pub const SIGNATURE_HEADER: &str = "postline-signature";
pub const EVENT_ID_HEADER: &str = "postline-event-id";

/// The `Postline-Signature` value for `body` sent at `timestamp` (unix seconds).
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length; this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let mut out = String::with_capacity(3 + 64);
    out.push_str("v1=");
    for b in mac.finalize().into_bytes() {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Lowercase or uppercase hex to bytes; None if it is not hex.
fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Check a signature in constant time (what a receiver does; tests use it).
pub fn verify(secret: &[u8], timestamp: i64, body: &[u8], header: &str) -> bool {
    let Some(given) = header.strip_prefix("v1=").and_then(from_hex) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_reference_hmac() {
        // python3: hmac.new(b'0123456789abcdef', b'1700000000.{"id":1}', hashlib.sha256).hexdigest()
        assert_eq!(
            signature(b"0123456789abcdef", 1_700_000_000, br#"{"id":1}"#),
            "v1=4bcaced68dfea90a68df035b89cb7fb26692d899d32a1ccb1b0616cf48e4d1ed"
        );
    }

    #[test]
    fn verify_refuses_another_body_timestamp_or_secret() {
        let s = signature(b"0123456789abcdef", 10, b"{}");
        assert!(verify(b"0123456789abcdef", 10, b"{}", &s));
        assert!(!verify(b"0123456789abcdef", 11, b"{}", &s));
        assert!(!verify(b"0123456789abcdef", 10, b"{ }", &s));
        assert!(!verify(b"0123456789abcdeF", 10, b"{}", &s));
        assert!(!verify(b"0123456789abcdef", 10, b"{}", "v2=00"));
        assert!(!verify(b"0123456789abcdef", 10, b"{}", "v1=zz"));
        assert!(!verify(b"0123456789abcdef", 10, b"{}", "v1=0"));
    }
}
