//! `edit_message` and `delete_message`: applied with optimistic concurrency
//! in one conditional UPDATE, then published to the room. An edit's text is
//! moderated as a send's is.

use super::error::HandlerError;
use super::messages::Moderated;
use super::session::Session;
use crate::domain::{Content, MessageId, MessageKind};
use crate::protocol::server;

impl Session {
    /// An edit (`Some(content)`) or a delete (`None`) of one of the user's messages.
    pub(super) async fn change(
        &self,
        id: MessageId,
        content: Option<Content>,
        version: i32,
    ) -> Result<server::Changed, HandlerError> {
        let gw = &self.gw;
        let editing = content.is_some();
        // Only text is edited (the store refuses other kinds).
        let content = content
            .map(|c| self.moderate(MessageKind::Text, c, Moderated::Edit { message: id }))
            .transpose()?;
        let row = gw
            .store
            .change_message(
                id,
                self.user,
                version,
                content.as_ref().map(Content::as_json),
                self.from,
            )
            .await
            .map_err(|e| HandlerError::database("changing a message", e))??;
        let conv = row.message.conversation_id;
        let frame = if editing {
            server::message_updated(&row)
        } else {
            server::message_deleted(conv, id, row.version, None)
        };
        gw.publish_to_room(conv, &frame, None);
        Ok(server::Changed {
            message_id: id,
            version: row.version,
        })
    }
}
