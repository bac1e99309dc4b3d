//! Room presence: who is in a conversation right now, across devices and
//! gateways, announced as `user_joined` / `user_left` and listed in the
//! join ack; no announcement for a reconnect within the grace period.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

const GRACE: Duration = Duration::from_millis(300);

async fn app() -> TestApp {
    let mut o = Options::default();
    o.config.gateway.presence_grace = GRACE;
    TestApp::spawn_with(o).await
}

/// Alice and Bob in one conversation, each joined on one connection, and
/// Alice told that Bob came in.
struct Room {
    app: TestApp,
    conv: uuid::Uuid,
    alice: postline::domain::UserId,
    bob: postline::domain::UserId,
    a: Client,
    b: Client,
}

async fn room_with_both_in() -> Room {
    let app = app().await;
    let (alice, bob) = (uid(), uid());
    let conv = app.conversation(alice, &[bob]).await;
    let mut a = app.ws(alice).await;
    a.join(conv).await;
    let mut b = app.ws(bob).await;
    b.join(conv).await;
    a.recv_where(is("user_joined", bob)).await;
    Room {
        app,
        conv,
        alice,
        bob,
        a,
        b,
    }
}

fn present(ack: &Value) -> Vec<String> {
    let mut v: Vec<String> = ack["present"]
        .as_array()
        .unwrap_or_else(|| panic!("no present list: {ack}"))
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn is(ty: &'static str, user: postline::domain::UserId) -> impl Fn(&Value) -> bool {
    move |f: &Value| f["type"] == ty && f["user_id"] == user.0.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entering_and_leaving_are_announced_and_the_join_ack_lists_who_is_in() {
    let app = app().await;
    let (alice, bob) = (uid(), uid());
    let conv = app.conversation(alice, &[bob]).await;
    let mut a = app.ws(alice).await;
    assert_eq!(present(&a.join(conv).await), [alice.0.to_string()]);

    let mut b = app.ws(bob).await;
    let ack = b.join(conv).await;
    assert_eq!(
        present(&ack),
        sorted(vec![alice.0.to_string(), bob.0.to_string()])
    );
    let entered = a.recv_where(is("user_joined", bob)).await;
    assert_eq!(entered["conversation_id"], conv.to_string());

    // A second device of Bob's: he was in already, nothing to announce.
    let mut b2 = app.ws(bob).await;
    b2.join(conv).await;
    // One device leaves, the other stays: still in.
    b2.request(json!({"type": "leave_conversation", "conversation_id": conv}))
        .await;
    // Leaving on purpose with the last device: at once.
    b.request(json!({"type": "leave_conversation", "conversation_id": conv}))
        .await;
    let frames = a.frames_for(Duration::from_millis(200)).await;
    let joins = frames.iter().filter(|f| is("user_joined", bob)(f)).count();
    let lefts = frames.iter().filter(|f| is("user_left", bob)(f)).count();
    assert_eq!((joins, lefts), (0, 1), "{frames:?}");
    let ack = a.join(conv).await;
    assert_eq!(present(&ack), [alice.0.to_string()]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_within_the_grace_period_announces_nothing_and_a_real_departure_does() {
    let Room {
        app,
        conv,
        alice,
        bob,
        mut a,
        b,
    } = room_with_both_in().await;

    // The connection drops and comes back at once: no flapping.
    drop(b);
    let mut b = app.ws(bob).await;
    b.join(conv).await;
    let frames = a.frames_for(GRACE * 3).await;
    assert!(
        !frames
            .iter()
            .any(|f| is("user_left", bob)(f) || is("user_joined", bob)(f)),
        "{frames:?}"
    );

    // Gone for good: announced once the grace period is over.
    drop(b);
    let left = a.recv_where(is("user_left", bob)).await;
    assert_eq!(left["conversation_id"], conv.to_string());
    assert_eq!(present(&a.join(conv).await), [alice.0.to_string()]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_leaves_the_room_presence_too() {
    let Room {
        app,
        conv,
        alice,
        bob,
        mut a,
        b,
    } = room_with_both_in().await;
    let (status, _) = app
        .http(
            "DELETE",
            &format!("/v1/conversations/{conv}/members/{}", bob.0),
            Some(alice),
            None,
        )
        .await;
    assert_eq!(status, 200);
    a.recv_where(is("member_left", bob)).await;
    a.recv_where(is("user_left", bob)).await;
    // Bob's socket closing later announces nothing more.
    drop(b);
    let frames = a.frames_for(GRACE * 3).await;
    assert!(
        !frames.iter().any(|f| is("user_left", bob)(f)),
        "{frames:?}"
    );
    app.stop().await;
}
