//! In-process costs of the hot paths: decoding each client event, encoding a
//! broadcast, fanning a frame out to rooms of 10 / 100 / 1000 connections
//! (and to a room mixing native and Socket.IO connections),
//! verifying a JWT, the rate-limit checks of a send, and the moderation
//! check of a send against a 1,000-word list. `cargo bench`; results in
//! BENCHMARKS.md.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use postline::auth::Jwt;
use postline::config::ModerationAction;
use postline::config::{LimitsConfig, Rate};
use postline::domain::{
    ClientMessageId, Content, ConversationId, Message, MessageId, MessageKind, UserId,
};
use postline::limits::Limits;
use postline::moderation::words::WordList;
use postline::moderation::{Filter, Verdict};
use postline::protocol::client::{decode, DecodeLimits};
use postline::protocol::{server, Framing};
use postline::rooms::{ConnectionId, Member, Outbox, OutboxReceiver, Rooms};
use serde_json::json;

const CONV: &str = "0190f3a4-3b1c-7cc2-9d1e-1a2b3c4d5e6f";

fn decoding(c: &mut Criterion) {
    let limits = DecodeLimits {
        max_content_bytes: 4096,
    };
    let text = "x".repeat(100);
    let events = [
        (
            "join_conversation",
            format!(r#"{{"type":"join_conversation","ref":"1","conversation_id":"{CONV}"}}"#),
        ),
        (
            "leave_conversation",
            format!(r#"{{"type":"leave_conversation","ref":"1","conversation_id":"{CONV}"}}"#),
        ),
        (
            "send_message_text_100B",
            format!(
                r#"{{"type":"send_message","ref":"42","conversation_id":"{CONV}","client_message_id":"c-42","content":"{text}"}}"#
            ),
        ),
        (
            "send_message_image",
            format!(
                r#"{{"type":"send_message","ref":"42","conversation_id":"{CONV}","client_message_id":"c-42","kind":"image","content":{{"url":"https://cdn.example/a.png","name":"a.png","size":1234,"mime":"image/png"}}}}"#
            ),
        ),
        (
            "typing",
            format!(r#"{{"type":"typing","conversation_id":"{CONV}","is_typing":true}}"#),
        ),
        ("ping", r#"{"type":"ping","ref":"p"}"#.to_owned()),
        ("not_json", "{this is not json".to_owned()),
    ];
    let mut group = c.benchmark_group("decode");
    for (name, frame) in &events {
        let frame = frame.as_bytes().to_vec();
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(*name, |b| {
            // simd-json parses in place: each iteration gets a fresh copy, as a
            // socket read would. The copy is part of the measured cost.
            b.iter(|| {
                let mut buf = frame.clone();
                black_box(decode(black_box(&mut buf), limits)).ok();
            })
        });
    }
    group.finish();
}

fn message() -> Message {
    Message {
        id: MessageId::new_v7(),
        conversation_id: ConversationId(CONV.parse().unwrap()),
        sender_id: UserId(uuid::Uuid::new_v4()),
        client_message_id: ClientMessageId::parse("c-42").unwrap(),
        kind: MessageKind::Text,
        content: Content::parse(MessageKind::Text, json!("x".repeat(100)), 4096).unwrap(),
        created_at: postline::domain::now_micros(),
    }
}

fn encoding(c: &mut Criterion) {
    let m = message();
    c.bench_function("encode/new_message_100B", |b| {
        b.iter(|| black_box(server::new_message(black_box(&m))))
    });
    c.bench_function("encode/message_persisted", |b| {
        b.iter(|| {
            black_box(server::message_persisted(
                m.conversation_id,
                m.id,
                postline::domain::Seq(7),
            ))
        })
    });
}

/// A room of `size` connections, member i framed as `framing(i)`, and the
/// receiving ends of their outboxes.
fn room(
    size: usize,
    framing: impl Fn(usize) -> Framing,
) -> (Rooms, ConversationId, Vec<OutboxReceiver>) {
    let rooms = Rooms::default();
    let conv = ConversationId::new_v7();
    let mut receivers = Vec::with_capacity(size);
    for i in 0..size {
        let (outbox, rx) = Outbox::new(256 * 1024);
        rooms.join(
            conv,
            Member {
                conn: ConnectionId::next(),
                user: UserId(uuid::Uuid::new_v4()),
                outbox,
                framing: framing(i),
            },
        );
        receivers.push(rx);
    }
    (rooms, conv, receivers)
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("broadcast");
    for size in [10usize, 100, 1000] {
        let (rooms, conv, mut receivers) = room(size, |_| Framing::Native);
        let frame = server::new_message(&message());
        group.throughput(Throughput::Elements(size as u64));
        group.bench_with_input(BenchmarkId::new("room", size), &size, |b, _| {
            b.iter(|| {
                let n = rooms.broadcast(conv, &frame, None);
                // Each connection's writer would take its frame; do it here so
                // outboxes never fill. Included in the measured time.
                for rx in receivers.iter_mut() {
                    black_box(rx.try_recv());
                }
                black_box(n)
            })
        });
    }
    group.finish();
}

fn jwt(c: &mut Criterion) {
    let jwt = Jwt::new(b"bench-secret-0123456789");
    let token = jwt.issue(UserId(uuid::Uuid::new_v4()), Duration::from_secs(3600));
    c.bench_function("jwt/verify_hs256", |b| {
        b.iter(|| black_box(jwt.verify(black_box(&token))).ok())
    });
}

/// What `send_message` checks before anything else: the sender's and the
/// conversation's limits. A hot key (one user sending, always allowed, and
/// the same over its limit, refused), and keys spread over 10,000 users in
/// 1,000 conversations (each map shard contended as in a busy gateway).
fn limits(c: &mut Criterion) {
    let n = |v: u32| v.try_into().unwrap();
    let unlimited = Rate {
        per_second: n(1_000_000_000),
        burst: n(1_000_000_000),
    };
    let loose = LimitsConfig {
        send_per_user: unlimited,
        send_per_conversation: unlimited,
        ..LimitsConfig::default()
    };
    let typing = Duration::from_secs(1);
    let conv = ConversationId(CONV.parse().unwrap());
    let user = UserId(uuid::Uuid::new_v4());
    let check = |l: &Limits, u: &UserId, c: &ConversationId| {
        black_box(l.send_per_user.check(u));
        black_box(l.send_per_conversation.check(c));
    };
    let mut group = c.benchmark_group("limits/check_send");
    let allowed = Limits::new(&loose, typing);
    group.bench_function("hot_key_allowed", |b| {
        b.iter(|| check(&allowed, black_box(&user), black_box(&conv)))
    });
    let refused = Limits::new(&LimitsConfig::default(), typing);
    group.bench_function("hot_key_refused", |b| {
        b.iter(|| check(&refused, black_box(&user), black_box(&conv)))
    });
    let users: Vec<UserId> = (0..10_000).map(|_| UserId(uuid::Uuid::new_v4())).collect();
    let convs: Vec<ConversationId> = (0..1_000)
        .map(|_| ConversationId(uuid::Uuid::new_v4()))
        .collect();
    let spread = Limits::new(&loose, typing);
    let mut i = 0usize;
    group.bench_function("10k_users_1k_conversations", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            check(&spread, &users[i % users.len()], &convs[i % convs.len()]);
        })
    });
    group.finish();
}

/// A room of 1,000 whose connections are all native, half Socket.IO, or
/// all Socket.IO: the broadcast as rooms fan it out (wrapped once for the
/// Socket.IO members), and each receiver's writer taking its frame and
/// copying it into its socket buffer, as `write_frame` does into the
/// BufWriter. The cost per delivery should not move with the mix: nothing
/// is serialized or wrapped per connection.
fn mixed_fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("deliver");
    let size = 1000usize;
    for (name, every_nth_sio) in [("native", 0usize), ("mixed", 2), ("socketio", 1)] {
        let (rooms, conv, receivers) = room(size, |i| {
            if every_nth_sio > 0 && i % every_nth_sio == 0 {
                Framing::SocketIo
            } else {
                Framing::Native
            }
        });
        let mut receivers: Vec<_> = receivers
            .into_iter()
            .map(|rx| (rx, Vec::<u8>::with_capacity(16 * 1024)))
            .collect();
        let frame = server::new_message(&message());
        group.throughput(Throughput::Elements(size as u64));
        group.bench_function(BenchmarkId::new(name, size), |b| {
            b.iter(|| {
                let n = rooms.broadcast(conv, &frame, None);
                for (rx, socket) in receivers.iter_mut() {
                    if let Some(f) = rx.try_recv() {
                        socket.clear();
                        socket.extend_from_slice(&f.frame);
                        black_box(&socket);
                    }
                }
                black_box(n)
            })
        });
    }
    group.finish();
}

/// `n` made-up words of 4 to 10 letters (a fixed sequence, so every run
/// compiles the same list), none of them a word of the benched messages.
fn made_up_words(n: usize) -> Vec<String> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|_| {
            let len = 4 + (next() % 7) as usize;
            (0..len)
                .map(|_| char::from(b'a' + (next() % 26) as u8))
                .collect::<String>()
        })
        .collect()
}

/// The check on a send's path (`Filter::check`): a 100-byte text against
/// 1,000 words (and 10 /patterns/), clean (what almost every message is)
/// or matching, refused or masked.
fn moderation(c: &mut Criterion) {
    let words = made_up_words(1000);
    let mut list = words.join("\n");
    let blocked = &words[500];
    let patterns: String = (0..10)
        .map(|i| format!("\n/fr[e3]{{2}}\\s*m[o0]ney{i}/"))
        .collect();
    let text = |s: &str| Content::parse(MessageKind::Text, json!(s), 4096).unwrap();
    // About 100 bytes of ordinary chat.
    let clean = "Are we still on for lunch at noon tomorrow? I can book the table by the window if you like it, ok?";
    assert_eq!(clean.len(), 98);
    let matching = format!(
        "Are we still on for lunch at noon tomorrow? I can book the {blocked} by the window, ok?"
    );
    let accented =
        "Café à midi demain ? Je réserve la table près de la fenêtre si tu veux, à tout à l'heure.";
    let reject = Filter::new(WordList::parse(&list).unwrap(), ModerationAction::Reject);
    let mask = Filter::new(WordList::parse(&list).unwrap(), ModerationAction::Mask);
    list.push_str(&patterns);
    let with_patterns = Filter::new(WordList::parse(&list).unwrap(), ModerationAction::Reject);
    assert_eq!(
        reject.check(MessageKind::Text, &text(clean)),
        Verdict::Clean
    );
    assert_eq!(
        reject.check(MessageKind::Text, &text(&matching)),
        Verdict::Rejected
    );
    assert_eq!(
        reject.check(MessageKind::Text, &text(accented)),
        Verdict::Clean
    );
    assert_eq!(
        with_patterns.check(MessageKind::Text, &text(clean)),
        Verdict::Clean
    );
    let cases = [
        ("clean_100B_1000_words", &reject, text(clean)),
        ("clean_100B_non_ascii_1000_words", &reject, text(accented)),
        (
            "clean_100B_1000_words_10_patterns",
            &with_patterns,
            text(clean),
        ),
        ("match_100B_reject", &reject, text(&matching)),
        ("match_100B_mask", &mask, text(&matching)),
    ];
    let mut group = c.benchmark_group("moderation");
    for (name, filter, content) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| black_box(filter.check(MessageKind::Text, black_box(content))))
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    decoding,
    encoding,
    fanout,
    mixed_fanout,
    jwt,
    limits,
    moderation
);
criterion_main!(benches);
