//! Where frames leave for clients: [`Gateway::publish`] delivers to the
//! connections here and relays to every other gateway, so no caller pairs
//! the two by hand; [`Gateway::on_hint`] delivers what Postgres told us
//! (other gateways' events, persisted confirmations) to the connections here.

use bytes::Bytes;

use super::Gateway;
use crate::domain::{ConversationId, Persisted, UserId};
use crate::notify::{Hint, Target, NO_GATEWAY};
use crate::protocol::server;
use crate::rooms::ConnectionId;

impl Gateway {
    /// Deliver `frame` to `target` here (but `except`) and on every other gateway.
    pub(super) fn publish(&self, target: Target, frame: &Bytes, except: Option<ConnectionId>) {
        self.deliver(&target, frame, except);
        self.relay.publish(target, frame);
    }

    pub(super) fn publish_to_room(
        &self,
        conv: ConversationId,
        frame: &Bytes,
        except: Option<ConnectionId>,
    ) {
        self.publish(Target::Room(conv), frame, except);
    }

    pub(super) fn publish_to_user(
        &self,
        user: UserId,
        frame: &Bytes,
        except: Option<ConnectionId>,
    ) {
        self.publish(Target::User(user), frame, except);
    }

    /// One frame for many users (a presence change to all contacts): the
    /// relay carries the frame once per few hundred users, not once each.
    pub(super) fn publish_to_users(&self, users: &[UserId], frame: &Bytes) {
        for user in users {
            self.users.push(*user, frame, None);
        }
        self.relay.publish_users(users, frame);
    }

    /// A receipt: the room (but the sender's connection) and the user's other
    /// devices that are not in the room, so every device converges.
    pub(super) fn publish_receipt(
        &self,
        conv: ConversationId,
        user: UserId,
        frame: &Bytes,
        from: ConnectionId,
    ) {
        self.publish_to_room(conv, frame, Some(from));
        for other in self.users.connections(user, from) {
            if !self.rooms.is_joined(conv, other) {
                self.users.push_to(user, other, frame);
            }
        }
        self.relay.publish(Target::User(user), frame);
    }

    /// Delivery to the connections of this process only.
    fn deliver(&self, target: &Target, frame: &Bytes, except: Option<ConnectionId>) {
        match *target {
            Target::Room(conv) => {
                self.rooms.broadcast(conv, frame, except);
            }
            Target::Message(conv, id) => {
                self.rooms.broadcast_message(conv, id, frame);
            }
            Target::User(user) => {
                self.users.push(user, frame, except);
            }
            Target::Users(ref users) => {
                for user in users {
                    self.users.push(*user, frame, except);
                }
            }
            Target::Evict(conv, user) => {
                self.rooms.evict_user(conv, user);
            }
        }
    }

    /// Say this gateway is here (see [`crate::notify::Peers`]): called
    /// once, listening already, before connections are accepted.
    pub async fn announce_to_peers(&self) -> Result<(), sqlx::Error> {
        self.relay.announce().await
    }

    /// What the LISTEN connection heard.
    pub fn on_hint(&self, hint: Hint) {
        match hint {
            Hint::Persisted(entries) => self.on_persisted(&entries),
            Hint::Relay(batch) if batch.gateway == self.id => {}
            Hint::Relay(batch) => {
                // SQL's postline.publish() and the workers speak as no
                // gateway: nobody to relay to.
                if batch.gateway != NO_GATEWAY {
                    self.relay.peers().heard();
                }
                for e in batch.events {
                    self.deliver(&e.target, &e.frame, None);
                }
            }
            Hint::Reconnected => {
                // Another gateway's announcement may have been missed.
                self.relay.peers().doubt();
                self.users.push_all(&server::resync());
            }
            Hint::Missed => self.users.push_all(&server::resync()),
        }
    }

    /// Tell each room that these messages are durable. Every gateway hears
    /// the worker's NOTIFY itself, so this is never relayed.
    fn on_persisted(&self, entries: &[Persisted]) {
        for p in entries {
            let frame = server::message_persisted(p.conversation_id, p.message_id, p.seq);
            self.rooms
                .confirm_persisted(p.conversation_id, p.message_id, &frame);
        }
        self.metrics.add_persisted_notified(entries.len() as u64);
    }

    /// Membership changed through the HTTP API: tell the room, and take a
    /// removed user's connections out of it, on every gateway.
    pub async fn on_membership(&self, conv: ConversationId, user: UserId, joined: bool) {
        let frame: Bytes = if joined {
            server::member_joined(conv, user)
        } else {
            server::member_left(conv, user)
        };
        self.publish_to_room(conv, &frame, None);
        if !joined {
            self.publish(Target::Evict(conv, user), &Bytes::new(), None);
            self.removed_from_room(conv, user).await;
        }
    }
}
