//! The service API, `/v1/service/...`: an application's backend managing
//! conversations and posting into them with a service credential
//! (`POSTLINE_SERVICE_KEYS`), not a user's token. Every request carries an
//! `Idempotency-Key`; a repeat (same credential, same key) gets the first
//! result again, marked `Idempotent-Replayed: true`, and does nothing twice.

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;
use uuid::Uuid;

use super::api::read_json;
use super::{bearer_token, json, ApiError, Body, HttpContext};
use crate::domain::{ConversationId, MessageId, UserId};
use crate::protocol::http as wire;
use crate::queue::audit::{Action, Actor, AuditEvent, Caller, Origin};
use crate::store::{PublishRefusal, Store, StoredResponse, MAX_INITIAL_MEMBERS};

/// Longest idempotency key accepted, in bytes.
const MAX_KEY: usize = 200;

/// Namespace of the conversation ids derived from idempotency keys (UUIDv5).
const CONVERSATION_IDS: Uuid = Uuid::from_u128(0x0190_f3a4_5e2f_7c1d_8a6b_9c3d_2e1f_0a4b);

/// `from`: where the request came from. Every call made with a valid key
/// leaves one `service.call` audit row (see [`CallRecord`]); calls without
/// one are not recorded: there is no one to name, and anyone could fill
/// the log.
pub(super) async fn handle(
    ctx: &HttpContext,
    req: Request<Incoming>,
    path: &[&str],
    from: Origin,
) -> Result<Response<Body>, ApiError> {
    if ctx.service_keys.is_empty() {
        return Err(ApiError::ServiceNotConfigured);
    }
    let credential = bearer_token(&req)
        .and_then(|t| ctx.service_keys.find(t))
        .ok_or(ApiError::NotService)?
        .to_owned();
    let by = from.by(Actor::Service(credential.clone()));
    let (method, uri_path) = (req.method().to_string(), req.uri().path().to_owned());
    let mut call = CallRecord {
        event: by.did(Action::ServiceCall),
        method: method.clone(),
        path: uri_path.clone(),
        key: None,
    };
    let route = match Route::of(req.method(), path) {
        Ok(route) => route,
        Err(e) => return Err(call.answered_alone(ctx, e).await),
    };
    if let Some(conv) = route.conversation() {
        call.event = call.event.conversation(conv);
    }
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY && k.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned);
    let Some(key) = key else {
        let e = ApiError::BadRequest(format!(
            "an Idempotency-Key header is required: 1 to {MAX_KEY} visible ASCII characters"
        ));
        return Err(call.answered_alone(ctx, e).await);
    };
    call.key = Some(key.clone());
    // A database failure here is not recorded: the database is what failed.
    let (tx, first) = ctx
        .store
        .idempotency_begin(&credential, &key)
        .await
        .map_err(ApiError::from)?;
    if let Some(first) = first {
        if first.method != method || first.path != uri_path {
            let e = ApiError::Invalid(format!(
                "Idempotency-Key {key:?} was used for {} {}; use a new key for another request",
                first.method, first.path
            ));
            let event = call.finish(e.status_and_code().0, false, None);
            Store::idempotency_audited(tx, &event).await?;
            return Err(e);
        }
        let status = StatusCode::from_u16(first.status).unwrap_or(StatusCode::OK);
        let event = call.finish(status, true, Some(&first.response));
        Store::idempotency_audited(tx, &event).await?;
        let mut res = json(status, &first.response);
        res.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        return Ok(res);
    }
    let (status, body) = match route.run(ctx, req, &credential, &by, &key).await {
        Ok(done) => done,
        // A refusal is a result too: the same request would be refused again.
        Err(e) if !e.status_and_code().0.is_server_error() => (
            e.status_and_code().0,
            serde_json::from_slice(&e.body()).unwrap_or_default(),
        ),
        Err(e) => {
            drop(tx);
            return Err(call.answered_alone(ctx, e).await);
        }
    };
    let event = call.finish(status, false, Some(&body));
    let stored = StoredResponse {
        method,
        path: uri_path,
        status: status.as_u16(),
        response: body,
    };
    Store::idempotency_record(tx, &credential, &key, &stored, &event).await?;
    Ok(json(status, &stored.response))
}

/// The `service.call` audit row of one request, completed once it is
/// answered: `detail` holds the method, path, status, idempotency key and
/// whether the answer was a replay; the targets are the route's
/// conversation and the ids the answer names.
struct CallRecord {
    event: AuditEvent,
    method: String,
    path: String,
    key: Option<String>,
}

impl CallRecord {
    fn finish(&self, status: StatusCode, replayed: bool, answer: Option<&Value>) -> AuditEvent {
        let id = |field: &str| {
            answer
                .and_then(|a| a.get(field))
                .and_then(Value::as_str)
                .and_then(|s| Uuid::parse_str(s).ok())
        };
        let mut event = self.event.clone().detail(serde_json::json!({
            "method": self.method,
            "path": self.path,
            "status": status.as_u16(),
            "idempotency_key": self.key,
            "replayed": replayed,
        }));
        if let Some(c) = id("conversation_id").or_else(|| id("id")) {
            event = event.conversation(ConversationId(c));
        }
        if let Some(u) = id("user_id") {
            event = event.user(UserId(u));
        }
        if let Some(m) = id("message_id") {
            event = event.message(MessageId(m));
        }
        event
    }

    /// Record a call answered with `e` outside any transaction of ours (a
    /// refusal before the idempotency record, or a server error), and
    /// return `e`. If even that fails, the answer is still `e`: logged.
    async fn answered_alone(&self, ctx: &HttpContext, e: ApiError) -> ApiError {
        let event = self.finish(e.status_and_code().0, false, None);
        if let Err(db) = ctx.store.record_audit(&event).await {
            tracing::warn!(error = %db, event_id = %event.event_id, "could not audit a service call");
        }
        e
    }
}

/// What a service request asks for.
enum Route {
    CreateConversation,
    AddMember(ConversationId),
    RemoveMember(ConversationId, UserId),
    PostMessage(ConversationId),
}

impl Route {
    /// The conversation the path names, if any.
    fn conversation(&self) -> Option<ConversationId> {
        match self {
            Route::CreateConversation => None,
            Route::AddMember(c) | Route::RemoveMember(c, _) | Route::PostMessage(c) => Some(*c),
        }
    }

    fn of(method: &Method, path: &[&str]) -> Result<Route, ApiError> {
        let conv = |s: &str| {
            Uuid::parse_str(s)
                .map(ConversationId)
                .map_err(|_| ApiError::BadRequest(format!("{s:?} is not a conversation id")))
        };
        match (method, path) {
            (&Method::POST, ["conversations"]) => Ok(Route::CreateConversation),
            (&Method::POST, ["conversations", c, "members"]) => Ok(Route::AddMember(conv(c)?)),
            (&Method::DELETE, ["conversations", c, "members", u]) => Ok(Route::RemoveMember(
                conv(c)?,
                Uuid::parse_str(u)
                    .map(UserId)
                    .map_err(|_| ApiError::BadRequest(format!("{u:?} is not a user id")))?,
            )),
            (&Method::POST, ["conversations", c, "messages"]) => Ok(Route::PostMessage(conv(c)?)),
            (_, ["conversations"])
            | (_, ["conversations", _, "members"])
            | (_, ["conversations", _, "members", _])
            | (_, ["conversations", _, "messages"]) => Err(ApiError::MethodNotAllowed),
            _ => Err(ApiError::NotFound("no such service route".into())),
        }
    }

    /// `by`: the service key and where the request came from, for the
    /// audit rows of membership changes.
    async fn run(
        self,
        ctx: &HttpContext,
        req: Request<Incoming>,
        credential: &str,
        by: &Caller,
        key: &str,
    ) -> Result<(StatusCode, serde_json::Value), ApiError> {
        match self {
            Route::CreateConversation => {
                let body: wire::ServiceCreateConversation = read_json(req).await?;
                if body.member_ids.is_empty() || body.member_ids.len() > MAX_INITIAL_MEMBERS {
                    return Err(ApiError::Invalid(format!(
                        "member_ids: 1 to {MAX_INITIAL_MEMBERS} users"
                    )));
                }
                if body
                    .title
                    .as_deref()
                    .is_some_and(|t| t.contains('\0') || t.chars().count() > 200)
                {
                    return Err(ApiError::Invalid(
                        "title: at most 200 characters, no NUL".into(),
                    ));
                }
                let id = ConversationId(Uuid::new_v5(
                    &CONVERSATION_IDS,
                    format!("{credential}/{key}").as_bytes(),
                ));
                let members: Vec<UserId> = body.member_ids.into_iter().map(UserId).collect();
                // No creator named: the nil user.
                let created_by = UserId(body.created_by.unwrap_or_default());
                let c = ctx
                    .store
                    .service_create_conversation(id, created_by, body.title, &members, by)
                    .await?;
                Ok((
                    StatusCode::CREATED,
                    value(&wire::Conversation {
                        id: c.id,
                        title: c.title.as_deref(),
                        member_ids: &c.member_ids,
                        created_at: c.created_at,
                    }),
                ))
            }
            Route::AddMember(conv) => {
                let body: wire::ServiceMember = read_json(req).await?;
                let user = UserId(body.user_id);
                let added = ctx.store.service_add_member(conv, user, by).await?;
                if added {
                    ctx.gateway.on_membership(conv, user, true).await;
                }
                Ok((
                    if added {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    },
                    value(&wire::MemberChange {
                        conversation_id: conv,
                        user_id: user,
                        changed: added,
                    }),
                ))
            }
            Route::RemoveMember(conv, user) => {
                ctx.store.service_remove_member(conv, user, by).await?;
                // Out of the room on every gateway at once, as on /v1.
                ctx.gateway.on_membership(conv, user, false).await;
                Ok((
                    StatusCode::OK,
                    value(&wire::MemberChange {
                        conversation_id: conv,
                        user_id: user,
                        changed: true,
                    }),
                ))
            }
            Route::PostMessage(conv) => {
                let body: wire::ServicePost = read_json(req).await?;
                // The idempotency key is the message's dedup key too, so a
                // repeat that lost its record is still stored once.
                let cmid = body
                    .client_message_id
                    .unwrap_or_else(|| format!("svc:{}", &key[..key.len().min(60)]));
                let kind = body.kind.as_deref().unwrap_or("system");
                let id = ctx
                    .store
                    .publish(conv, UserId(body.sender_id), kind, &body.content, &cmid)
                    .await?
                    .map_err(|r| match r {
                        PublishRefusal::Invalid(m) => ApiError::Invalid(m),
                        PublishRefusal::TooLarge(m) => ApiError::Invalid(m),
                        PublishRefusal::NotFound(m) => ApiError::NotFound(m),
                        PublishRefusal::Forbidden(_) => ApiError::Forbidden,
                    })?;
                Ok((
                    StatusCode::CREATED,
                    value(&wire::Posted {
                        message_id: id,
                        conversation_id: conv,
                        client_message_id: &cmid,
                    }),
                ))
            }
        }
    }
}

fn value<T: serde::Serialize>(body: &T) -> serde_json::Value {
    // These plain structs always serialize.
    serde_json::to_value(body).unwrap_or_default()
}
