//! Socket.IO v4 on `/socket.io/`: Engine.IO v4 framing and Socket.IO
//! protocol v5 packets, over the WebSocket transport only, for the default
//! namespace `/`. Written from the published protocol documents
//! (engine.io-protocol v4, socket.io-protocol v5).
//!
//! It is a codec in front of the native protocol, not a second protocol:
//! an incoming `42N["send_message",{...}]` becomes the native frame
//! `{"type":"send_message","ref":"N",...}` and enters the session like any
//! other; every outgoing native frame — encoded once for all its recipients
//! — is wrapped on its way out: a push `{"type":"X",...}` as
//! `42["X",{...}]`, the reply to ref N as `43N[{...}]`. Wrapping copies the
//! shared bytes between a prefix and a bracket, so a broadcast is never
//! serialized per Socket.IO connection.
//!
//! Each WebSocket message is one Engine.IO packet; a Socket.IO packet rides
//! in an Engine.IO `4` (message), so every Socket.IO string starts with `4`.

use serde::Serialize;
use serde_json::{Map, Value};

/// The Engine.IO protocol version spoken (`EIO=4` in the query).
pub const ENGINE_IO_VERSION: &str = "4";

/// Engine.IO ping: the server sends it every `pingInterval`; the client
/// answers [`PONG`].
pub const PING: &[u8] = b"2";
pub const PONG: &[u8] = b"3";
/// Socket.IO DISCONNECT of namespace `/`: the server ended the session on
/// purpose; socket.io-client does not reconnect by itself after it.
pub const DISCONNECT: &[u8] = b"41";

/// The Engine.IO `open` packet, the first thing the server sends.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Open<'a> {
    pub sid: &'a str,
    /// Always empty: the WebSocket transport is the only one, nothing to
    /// upgrade to.
    pub upgrades: [&'a str; 0],
    pub ping_interval: u64,
    pub ping_timeout: u64,
    pub max_payload: usize,
}

pub fn open(o: &Open<'_>) -> Vec<u8> {
    prefixed(b"0", o)
}

/// Socket.IO CONNECT accepted for namespace `/`.
pub fn connected(sid: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Sid<'a> {
        sid: &'a str,
    }
    prefixed(b"40", &Sid { sid })
}

/// Socket.IO CONNECT_ERROR: socket.io-client raises `connect_error` with
/// `err.message` = `message` and `err.data` = `data`.
pub fn connect_error(message: &str, data: Option<&Value>) -> Vec<u8> {
    #[derive(Serialize)]
    struct Refused<'a> {
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a Value>,
    }
    prefixed(b"44", &Refused { message, data })
}

fn prefixed<T: Serialize>(prefix: &[u8], body: &T) -> Vec<u8> {
    let mut out = prefix.to_vec();
    // Serializing these plain structs into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, body);
    out
}

/// What one incoming WebSocket text message says.
#[derive(Debug, PartialEq)]
pub enum Packet {
    /// Engine.IO pong: proof of life, nothing else.
    Pong,
    /// Engine.IO ping from the client (v3 style, or a probe): answered with
    /// a pong carrying the same data.
    Ping(Vec<u8>),
    /// Engine.IO close, or Socket.IO DISCONNECT: the client is leaving.
    Close,
    /// Socket.IO CONNECT to `/`, with its `auth` payload (if any).
    Connect(Option<Value>),
    /// Socket.IO CONNECT to another namespace: answered with
    /// [`invalid_namespace`].
    ForeignNamespace(String),
    /// A Socket.IO EVENT, translated into a native client frame.
    Event(Vec<u8>),
}

/// An incoming message that is not a packet we accept. A malformed packet
/// (`fatal`) closes the connection, as Socket.IO's own server does; a
/// well-formed event we cannot map is answered, to its acknowledgement id
/// (`ack`) when it has one, and the connection stays.
#[derive(Debug, PartialEq)]
pub struct Refused {
    pub ack: Option<u64>,
    pub reason: String,
    pub fatal: bool,
}

/// A malformed packet.
fn malformed(reason: impl Into<String>) -> Refused {
    Refused {
        ack: None,
        reason: reason.into(),
        fatal: true,
    }
}

/// A well-formed event we do not map.
fn refused(ack: Option<u64>, reason: impl Into<String>) -> Refused {
    Refused {
        ack,
        reason: reason.into(),
        fatal: false,
    }
}

/// A CONNECT to a namespace other than `/`: refused with the reply Socket.IO
/// servers give, and the connection stays.
pub fn invalid_namespace(namespace: &str) -> Vec<u8> {
    let mut out = format!("44{namespace},").into_bytes();
    out.extend_from_slice(br#"{"message":"Invalid namespace"}"#);
    out
}

/// Decode one incoming text message.
pub fn decode(text: &[u8]) -> Result<Packet, Refused> {
    match text {
        [] => Err(malformed("empty Engine.IO packet")),
        b"3" => Ok(Packet::Pong),
        [b'2', rest @ ..] => Ok(Packet::Ping(rest.to_vec())),
        [b'1'] => Ok(Packet::Close),
        [b'4', rest @ ..] => decode_socket_io(rest),
        [b'5' | b'6', ..] => Err(malformed(
            "Engine.IO upgrade/noop: only the WebSocket transport is served, nothing to upgrade",
        )),
        _ => Err(malformed("unknown Engine.IO packet type")),
    }
}

/// A Socket.IO packet: `<type>[<attachments>-][<namespace>,][<ack id>][<json>]`.
fn decode_socket_io(p: &[u8]) -> Result<Packet, Refused> {
    let (&kind, rest) = p
        .split_first()
        .ok_or_else(|| malformed("empty Socket.IO packet"))?;
    if rest.first() == Some(&b'/') {
        let ns_end = rest.iter().position(|&b| b == b',').unwrap_or(rest.len());
        if &rest[..ns_end] != b"/" {
            let namespace = String::from_utf8_lossy(&rest[..ns_end]).into_owned();
            return match kind {
                b'0' => Ok(Packet::ForeignNamespace(namespace)),
                _ => Err(malformed("only the namespace \"/\" is served")),
            };
        }
    }
    match kind {
        b'0' => {
            let json = rest.strip_prefix(b"/,").unwrap_or(rest);
            if json.is_empty() {
                return Ok(Packet::Connect(None));
            }
            let auth: Value = serde_json::from_slice(json)
                .map_err(|_| malformed("CONNECT payload is not JSON"))?;
            if !auth.is_object() {
                return Err(malformed("CONNECT payload (auth) must be an object"));
            }
            Ok(Packet::Connect(Some(auth)))
        }
        b'1' => Ok(Packet::Close),
        b'2' => {
            let rest = rest.strip_prefix(b"/,").unwrap_or(rest);
            let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
            let ack = match digits {
                0 => None,
                // More than u64 holds is no ack id we could answer.
                n => Some(
                    std::str::from_utf8(&rest[..n])
                        .ok()
                        .and_then(|d| d.parse().ok())
                        .ok_or_else(|| malformed("acknowledgement id out of range"))?,
                ),
            };
            event(ack, &rest[digits..]).map(Packet::Event)
        }
        b'3' => Err(malformed(
            "ACK from the client: the server never asks for acknowledgements",
        )),
        b'5' | b'6' => Err(malformed("binary attachments are not supported; send JSON")),
        _ => Err(malformed("unknown Socket.IO packet type")),
    }
}

/// `["name", {fields}]` into the native `{"type":"name","ref":"N",...fields}`.
/// A `ref` inside the fields is dropped: replies go to acknowledgement ids
/// only, which are numbers this connection chose.
fn event(ack: Option<u64>, json: &[u8]) -> Result<Vec<u8>, Refused> {
    let args: Vec<Value> = serde_json::from_slice(json)
        .map_err(|_| malformed("EVENT payload must be a JSON array [name, data]"))?;
    let mut args = args.into_iter();
    let Some(Value::String(name)) = args.next() else {
        return Err(malformed("EVENT needs a name: [\"send_message\", {...}]"));
    };
    let mut fields = match args.next() {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(refused(ack, "the event's data must be one JSON object")),
    };
    if args.next().is_some() {
        return Err(refused(
            ack,
            "one data object per event, no further arguments",
        ));
    }
    fields.remove("ref");
    fields.insert("type".into(), Value::String(name));
    if let Some(id) = ack {
        fields.insert("ref".into(), Value::String(id.to_string()));
    }
    serde_json::to_vec(&fields).map_err(|_| refused(ack, "cannot re-encode the event"))
}

/// How a native frame goes out: everything but the native bytes themselves,
/// which are written between `head` and `TAIL` unchanged.
pub fn wrap(native: &[u8], head: &mut Vec<u8>) {
    head.clear();
    match native_head(native) {
        Some(("ack" | "error", Some(r))) => {
            head.extend_from_slice(b"43");
            head.extend_from_slice(r.as_bytes());
            head.push(b'[');
        }
        Some((name, _)) => {
            head.extend_from_slice(b"42[\"");
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b"\",");
        }
        // Every native frame starts with its type; should one not, it is
        // still delivered, as an event named "message".
        None => head.extend_from_slice(b"42[\"message\","),
    }
}

/// Closes what [`wrap`] opened.
pub const TAIL: &[u8] = b"]";

/// The `type` of a native frame and, for replies, their `ref` (a number on
/// a Socket.IO connection). Reads only the frame's first bytes: the server
/// encodes `type` first and `ref` second.
fn native_head(native: &[u8]) -> Option<(&str, Option<&str>)> {
    let rest = native.strip_prefix(b"{\"type\":\"")?;
    let end = rest.iter().position(|&b| b == b'"')?;
    let name = std::str::from_utf8(&rest[..end]).ok()?;
    let after = &rest[end + 1..];
    let r = after.strip_prefix(b",\"ref\":\"").and_then(|r| {
        let n = r.iter().take_while(|b| b.is_ascii_digit()).count();
        (n > 0 && r.get(n) == Some(&b'"'))
            .then(|| std::str::from_utf8(&r[..n]).ok())
            .flatten()
    });
    Some((name, r))
}

/// The JWT a CONNECT's `auth` carries: `{"token": "..."}`.
pub fn auth_token(auth: Option<&Value>) -> Option<&str> {
    auth?.get("token")?.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn native(p: Packet) -> Value {
        match p {
            Packet::Event(v) => serde_json::from_slice(&v).unwrap(),
            other => panic!("not an event: {other:?}"),
        }
    }

    #[test]
    fn engine_io_control_packets() {
        assert_eq!(decode(b"3"), Ok(Packet::Pong));
        assert_eq!(decode(b"2probe"), Ok(Packet::Ping(b"probe".to_vec())));
        assert_eq!(decode(b"1"), Ok(Packet::Close));
        assert_eq!(decode(b"41"), Ok(Packet::Close));
        assert!(decode(b"").is_err());
        assert!(decode(b"5").is_err());
        assert!(decode(b"9").is_err());
        assert!(decode(b"x").is_err());
    }

    #[test]
    fn connect_with_and_without_auth_and_other_namespaces_refused() {
        assert_eq!(decode(b"40"), Ok(Packet::Connect(None)));
        let p = decode(br#"40{"token":"abc"}"#).unwrap();
        let Packet::Connect(auth) = p else { panic!() };
        assert_eq!(auth_token(auth.as_ref()), Some("abc"));
        assert_eq!(
            decode(br#"40/admin,{"token":"abc"}"#),
            Ok(Packet::ForeignNamespace("/admin".into()))
        );
        assert_eq!(
            decode(b"40/random"),
            Ok(Packet::ForeignNamespace("/random".into()))
        );
        assert_eq!(
            invalid_namespace("/random"),
            br#"44/random,{"message":"Invalid namespace"}"#
        );
        assert!(decode(br#"42/admin,["x"]"#).unwrap_err().fatal);
        assert!(decode(b"40[1]").is_err());
        assert!(decode(b"40{nope").is_err());
    }

    #[test]
    fn an_event_becomes_the_native_frame_with_its_ack_id_as_ref() {
        let v = native(
            decode(br#"4212["send_message",{"conversation_id":"c","content":"hi","ref":"x"}]"#)
                .unwrap(),
        );
        assert_eq!(v["type"], "send_message");
        assert_eq!(v["ref"], "12");
        assert_eq!(v["content"], "hi");
        // Without an ack id no ref: the client's own `ref` never survives.
        let v = native(decode(br#"42["typing",{"ref":"7","is_typing":true}]"#).unwrap());
        assert_eq!(v.get("ref"), None);
        let v = native(decode(br#"42["ping"]"#).unwrap());
        assert_eq!(v["type"], "ping");
        let v = native(decode(br#"42/,3["ping",null]"#).unwrap());
        assert_eq!(v["ref"], "3");
    }

    #[test]
    fn events_we_cannot_map_are_answered_to_their_ack_id() {
        for bad in [
            &br#"427["x",1]"#[..],
            br#"427["x",{},{}]"#,
            br#"427["x","text"]"#,
        ] {
            let e = decode(bad).unwrap_err();
            assert_eq!((e.ack, e.fatal), (Some(7), false), "{e:?}");
        }
    }

    #[test]
    fn malformed_packets_are_fatal_as_in_socket_io_s_own_conformance_suite() {
        // The suite's cases: unknown packet type, invalid payload, invalid ack id.
        for bad in [
            &b"4abc"[..],
            b"42{}",
            br#"42abc["message-with-ack",1,"2",{"3":[false]}]"#,
            br#"427[1,2]"#,
            br#"42[]"#,
            b"4299999999999999999999999[\"x\"]",
            br#"451-["x",{"_placeholder":true,"num":0}]"#,
            br#"431[]"#,
            b"",
            b"9",
            b"5",
        ] {
            let e = decode(bad).unwrap_err();
            assert!(e.fatal, "{:?}: {e:?}", String::from_utf8_lossy(bad));
        }
    }

    fn wrapped(native: &[u8]) -> Value {
        let mut head = Vec::new();
        wrap(native, &mut head);
        let mut whole = head.clone();
        whole.extend_from_slice(native);
        whole.extend_from_slice(TAIL);
        let s = String::from_utf8(whole).unwrap();
        if let Some(rest) = s.strip_prefix("42") {
            serde_json::json!({"event": serde_json::from_str::<Value>(rest).unwrap()})
        } else {
            let rest = s.strip_prefix("43").unwrap();
            let n = rest.find('[').unwrap();
            serde_json::json!({"ack": &rest[..n], "args": serde_json::from_str::<Value>(&rest[n..]).unwrap()})
        }
    }

    #[test]
    fn pushes_become_events_and_replies_acks() {
        let push = br#"{"type":"new_message","message":{"id":"m"}}"#;
        let v = wrapped(push);
        assert_eq!(v["event"][0], "new_message");
        assert_eq!(v["event"][1]["message"]["id"], "m");
        let v = wrapped(br#"{"type":"ack","ref":"42","message_id":"m"}"#);
        assert_eq!(v["ack"], "42");
        assert_eq!(v["args"][0]["message_id"], "m");
        let v = wrapped(br#"{"type":"error","ref":"5","code":"invalid","message":"no"}"#);
        assert_eq!(v["ack"], "5");
        assert_eq!(v["args"][0]["code"], "invalid");
        // An error to a frame without ref is an event named "error".
        let v = wrapped(br#"{"type":"error","code":"bad_request","message":"no"}"#);
        assert_eq!(v["event"][0], "error");
    }

    #[test]
    fn handshake_packets() {
        let o = open(&Open {
            sid: "s1",
            upgrades: [],
            ping_interval: 25000,
            ping_timeout: 20000,
            max_payload: 65536,
        });
        let s = String::from_utf8(o).unwrap();
        assert!(s.starts_with("0{"));
        let v: Value = serde_json::from_str(&s[1..]).unwrap();
        assert_eq!(v["pingInterval"], 25000);
        assert_eq!(v["upgrades"], serde_json::json!([]));
        assert_eq!(connected("a"), br#"40{"sid":"a"}"#);
        assert_eq!(
            connect_error("bad token", None),
            br#"44{"message":"bad token"}"#
        );
    }
}
