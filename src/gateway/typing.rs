//! Typing indicators: at most one refresh per interval (the `typing` limit
//! of [`crate::limits`], per connection and conversation), relayed to the
//! room, and turned off by the server when not refreshed in time or when
//! the connection leaves or closes. Turning one off is never limited.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::error::HandlerError;
use super::session::Session;
use crate::domain::ConversationId;
use crate::protocol::server;
use crate::telemetry::RateLimit;

#[derive(Debug, Clone, Copy)]
struct Typing {
    /// Bumped by every change, so a pending expiry knows if it is stale.
    generation: u64,
    on: bool,
}

/// A connection's typing indicators, shared with their expiry timers.
#[derive(Clone, Default)]
pub(super) struct TypingStates(Arc<Mutex<HashMap<ConversationId, Typing>>>);

impl TypingStates {
    fn lock(&self) -> MutexGuard<'_, HashMap<ConversationId, Typing>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a `typing` event changes.
enum Change {
    /// Already off: nothing for the others to hear.
    None,
    /// On or off, with the generation an expiry must match.
    Set { generation: u64 },
}

impl Session {
    pub(super) fn typing(
        &self,
        conv: ConversationId,
        on: bool,
    ) -> Result<server::Done, HandlerError> {
        self.require_joined(conv)?;
        let change = {
            let mut states = self.typing.lock();
            let state = states.entry(conv).or_insert(Typing {
                generation: 0,
                on: false,
            });
            if on {
                // Every `true` uses the interval's one cell, so a refresh
                // right after turning on waits too; only a refresh is
                // refused, though: turning on after off always shows.
                let decision = self.gw.limits.typing.check(&(self.id.0, conv));
                if state.on {
                    self.allowed(
                        RateLimit::Typing,
                        decision,
                        "typing: at most one refresh per interval",
                    )?;
                }
            }
            if !on && !state.on {
                Change::None
            } else {
                state.generation += 1;
                state.on = on;
                Change::Set {
                    generation: state.generation,
                }
            }
        };
        let Change::Set { generation } = change else {
            return Ok(server::Done {});
        };
        self.gw
            .publish_to_room(conv, &server::typing(conv, self.user, on), Some(self.id));
        if on {
            self.expire_typing(conv, generation);
        }
        Ok(server::Done {})
    }

    /// Not refreshed in time: the server turns it off for everyone.
    fn expire_typing(&self, conv: ConversationId, generation: u64) {
        let session = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(session.gw.cfg.typing_ttl).await;
            let expired = {
                let mut states = session.typing.lock();
                match states.get_mut(&conv) {
                    Some(s) if s.on && s.generation == generation => {
                        s.on = false;
                        s.generation += 1;
                        true
                    }
                    _ => false,
                }
            };
            if expired {
                let frame = server::typing(conv, session.user, false);
                session.gw.publish_to_room(conv, &frame, Some(session.id));
            }
        });
    }

    pub(super) fn stop_typing(&self, conv: ConversationId) {
        let was_on = self.typing.lock().remove(&conv).is_some_and(|s| s.on);
        if was_on {
            let frame = server::typing(conv, self.user, false);
            self.gw.publish_to_room(conv, &frame, Some(self.id));
        }
    }

    /// On close: whoever was shown this connection typing sees it stop.
    pub(super) fn stop_all_typing(&self) {
        let convs: Vec<ConversationId> = self.typing.lock().keys().copied().collect();
        for conv in convs {
            self.stop_typing(conv);
        }
    }
}
