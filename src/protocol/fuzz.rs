//! Generators for property-based fuzzing of everything that parses client
//! input: random bytes, valid frames mutated byte by byte, deep nesting,
//! extreme numbers and odd Unicode. `POSTLINE_FUZZ_CASES` sets how many
//! cases each property runs (CI uses the default; set it higher for a long run).

use proptest::prelude::*;

/// Cases per property: 512 unless `POSTLINE_FUZZ_CASES` says otherwise.
pub fn config() -> ProptestConfig {
    let cases = std::env::var("POSTLINE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    ProptestConfig {
        cases,
        // Failures are reported with the input; no files written in the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const CONV: &str = "0190f3a4-3b1c-7cc2-9d1e-1a2b3c4d5e6f";

/// One well-formed example of every client event, and HTTP bodies.
fn valid_frames() -> Vec<String> {
    [
        r#"{"type":"join_conversation","ref":"1","conversation_id":"C"}"#,
        r#"{"type":"leave_conversation","conversation_id":"C"}"#,
        r#"{"type":"send_message","ref":"a","conversation_id":"C","client_message_id":"c1","content":"hi"}"#,
        r#"{"type":"send_message","conversation_id":"C","client_message_id":"c2","kind":"image","content":{"url":"u","size":10,"mime":"image/png"}}"#,
        r#"{"type":"typing","conversation_id":"C","is_typing":true}"#,
        r#"{"type":"delivered","conversation_id":"C","seq":3}"#,
        r#"{"type":"read","conversation_id":"C","seq":3}"#,
        r#"{"type":"sync","conversation_id":"C","after_seq":0,"limit":50}"#,
        r#"{"type":"resume","conversations":[{"conversation_id":"C","after_seq":2}],"limit":10}"#,
        r#"{"type":"edit_message","message_id":"C","content":"new","version":1}"#,
        r#"{"type":"delete_message","message_id":"C","version":2}"#,
        r#"{"type":"ping","ref":"p"}"#,
        r#"{"title":"t","member_ids":["C"]}"#,
        r#"{"user_id":"C"}"#,
    ]
    .iter()
    .map(|f| f.replace('C', CONV))
    .collect()
}

/// A valid frame with a few bytes flipped, inserted or removed.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    let frames = valid_frames();
    (
        0..frames.len(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    )
        .prop_map(move |(i, edits)| {
            let mut b = frames[i].clone().into_bytes();
            for (at, byte, op) in edits {
                let n = b.len();
                match op {
                    0 if n > 0 => b[at.index(n)] = byte,
                    1 => b.insert(at.index(n + 1), byte),
                    _ if n > 0 => {
                        b.remove(at.index(n));
                    }
                    _ => {}
                }
            }
            b
        })
}

/// A valid frame with one of its values replaced by something extreme.
fn extreme_values() -> impl Strategy<Value = Vec<u8>> {
    let values = prop_oneof![
        Just("1e999".to_owned()),
        Just("-1e999".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("-9223372036854775809".to_owned()),
        Just("9223372036854775807".to_owned()),
        Just("-0".to_owned()),
        Just("0.5".to_owned()),
        Just("null".to_owned()),
        Just(r#""\ud800""#.to_owned()),
        Just(r#""\u0000""#.to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:e}")),
        any::<String>().prop_map(|s| serde_json::Value::String(s).to_string()),
    ];
    let frames = valid_frames();
    (0..frames.len(), values, any::<prop::sample::Index>()).prop_map(move |(i, v, at)| {
        // Replace the value after one of the frame's colons.
        let f = &frames[i];
        let colons: Vec<usize> = f.match_indices(':').map(|(p, _)| p).collect();
        let c = colons[at.index(colons.len())];
        let rest = &f[c + 1..];
        let end = rest.find([',', '}']).map_or(f.len(), |e| c + 1 + e);
        format!("{}{}{}", &f[..=c], v, &f[end..]).into_bytes()
    })
}

/// Nesting from shallow to far past any limit, bare or inside a field.
fn deep() -> impl Strategy<Value = Vec<u8>> {
    (0usize..20_000, prop::bool::ANY, prop::bool::ANY).prop_map(|(n, arrays, inside)| {
        let open = if arrays { "[" } else { r#"{"a":"# };
        let nest = open.repeat(n);
        let s = if inside {
            format!(
                r#"{{"type":"send_message","conversation_id":"{CONV}","client_message_id":"d","content":{nest}"#
            )
        } else {
            nest
        };
        s.into_bytes()
    })
}

/// Anything a client might send as JSON text, valid or not.
pub fn json_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2048),
        any::<String>().prop_map(String::into_bytes),
        mutated(),
        extreme_values(),
        deep(),
    ]
}
