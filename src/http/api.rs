//! `/v1`: conversations, members, history.

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use uuid::Uuid;

use super::{authenticate, json, limited, ApiError, Body, HttpContext};
use crate::domain::{ConversationId, UserId};
use crate::protocol::http as wire;
use crate::queue::audit::Origin;
use crate::store::{HistoryPage, MAX_INITIAL_MEMBERS};
use crate::telemetry::RateLimit;

/// Request bodies are small JSON documents.
const MAX_BODY: usize = 64 * 1024;
const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 200;
const MAX_TITLE: usize = 200;

/// `from`: where the request came from, for the audit rows of membership changes.
pub(super) async fn handle(
    ctx: &HttpContext,
    req: Request<Incoming>,
    path: &[&str],
    from: Origin,
) -> Result<Response<Body>, ApiError> {
    let user = authenticate(ctx, &req)?;
    limited(
        &ctx.metrics,
        RateLimit::HttpPerUser,
        ctx.limits.http_per_user.check(&user),
        "too many requests from you",
    )?;
    match (req.method().clone(), path) {
        (Method::POST, ["conversations"]) => create_conversation(ctx, user, req, from).await,
        (Method::GET, ["conversations"]) => {
            let list = ctx.store.list_conversations(user).await?;
            let conversations = list
                .iter()
                .map(|c| wire::ConversationSummary {
                    id: c.id,
                    title: c.title.as_deref(),
                    member_ids: &c.member_ids,
                    created_at: c.created_at,
                    last_message_at: c.last_message_at,
                    last_seq: c.last_seq,
                    last_delivered_seq: c.last_delivered_seq,
                    last_read_seq: c.last_read_seq,
                    unread_count: c.unread_count,
                })
                .collect();
            Ok(json(StatusCode::OK, &wire::Conversations { conversations }))
        }
        (Method::GET, ["presence"]) => presence(ctx, user, req.uri().query().unwrap_or("")).await,
        (Method::POST, ["conversations", conv, "members"]) => {
            let conv = parse_conversation(conv)?;
            add_member(ctx, user, conv, req, from).await
        }
        (Method::DELETE, ["conversations", conv, "members", member]) => {
            let conv = parse_conversation(conv)?;
            let member =
                UserId(Uuid::parse_str(member).map_err(|_| {
                    ApiError::BadRequest("user id in the path must be a UUID".into())
                })?);
            ctx.store.remove_member(conv, user, member, from).await?;
            ctx.gateway.on_membership(conv, member, false).await;
            Ok(json(
                StatusCode::OK,
                &wire::MemberRemoved {
                    conversation_id: conv,
                    user_id: member,
                    removed: true,
                },
            ))
        }
        (Method::GET, ["conversations", conv, "messages"]) => {
            let conv = parse_conversation(conv)?;
            let page = parse_page(req.uri().query().unwrap_or(""))?;
            // Counted with `sync` and `resume`: the same reads, the same budget.
            limited(
                &ctx.metrics,
                RateLimit::HistoryPerUser,
                ctx.limits.history_per_user.check(&user),
                "too many history reads (sync, resume, GET messages)",
            )?;
            ctx.store.access(conv, user).await?.require_member()?;
            let (messages, has_more) = ctx.store.history(conv, page).await?;
            let history = wire::History {
                messages: messages.iter().map(Into::into).collect(),
                has_more,
            };
            Ok(json(StatusCode::OK, &history))
        }
        (_, ["conversations"])
        | (_, ["presence"])
        | (_, ["conversations", _, "members"])
        | (_, ["conversations", _, "members", _])
        | (_, ["conversations", _, "messages"]) => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::NotFound("no such route".into())),
    }
}

fn parse_conversation(s: &str) -> Result<ConversationId, ApiError> {
    Uuid::parse_str(s)
        .map(ConversationId)
        .map_err(|_| ApiError::BadRequest("conversation id in the path must be a UUID".into()))
}

pub(super) async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| ApiError::TooLarge(MAX_BODY))?
        .to_bytes();
    parse_body(&body)
}

/// A request body as `T`: nesting checked before serde recurses, then
/// not-JSON (`bad_request`) told apart from wrong fields (`invalid`).
fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let max = crate::protocol::depth::MAX_DEPTH;
    crate::protocol::depth::check(body, max)
        .map_err(|_| ApiError::BadRequest(format!("JSON nested deeper than {max} levels")))?;
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::Invalid(e.to_string()),
        _ => ApiError::BadRequest(format!("body is not valid JSON: {e}")),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateConversation {
    #[serde(default)]
    title: Option<String>,
    member_ids: Vec<Uuid>,
}

async fn create_conversation(
    ctx: &HttpContext,
    user: UserId,
    req: Request<Incoming>,
    from: Origin,
) -> Result<Response<Body>, ApiError> {
    let body: CreateConversation = read_json(req).await?;
    if let Some(t) = &body.title {
        if t.contains('\0') {
            return Err(ApiError::Invalid(
                "title must not contain NUL characters".into(),
            ));
        }
        if t.chars().count() > MAX_TITLE {
            return Err(ApiError::Invalid(format!(
                "title is longer than {MAX_TITLE} characters"
            )));
        }
    }
    if body.member_ids.len() > MAX_INITIAL_MEMBERS {
        return Err(ApiError::Invalid(format!(
            "at most {MAX_INITIAL_MEMBERS} member_ids at creation; add more afterwards"
        )));
    }
    let members: Vec<UserId> = body.member_ids.into_iter().map(UserId).collect();
    let created = ctx
        .store
        .create_conversation(user, body.title, &members, from)
        .await?;
    Ok(json(
        StatusCode::CREATED,
        &wire::Conversation {
            id: created.id,
            title: created.title.as_deref(),
            member_ids: &created.member_ids,
            created_at: created.created_at,
        },
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddMember {
    user_id: Uuid,
}

async fn add_member(
    ctx: &HttpContext,
    user: UserId,
    conv: ConversationId,
    req: Request<Incoming>,
    from: Origin,
) -> Result<Response<Body>, ApiError> {
    let body: AddMember = read_json(req).await?;
    let member = UserId(body.user_id);
    let added = ctx.store.add_member(conv, user, member, from).await?;
    if added {
        ctx.gateway.on_membership(conv, member, true).await;
    }
    Ok(json(
        if added {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        &wire::MemberAdded {
            conversation_id: conv,
            user_id: member,
            added,
        },
    ))
}

/// Most users one presence query names.
const MAX_PRESENCE_IDS: usize = 200;

/// `GET /v1/presence?user_ids=a,b,c`: online or offline, across gateways.
async fn presence(
    ctx: &HttpContext,
    caller: UserId,
    query: &str,
) -> Result<Response<Body>, ApiError> {
    let ids = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "user_ids")
        .map(|(_, v)| v)
        .ok_or_else(|| ApiError::Invalid("user_ids is required: ?user_ids=<uuid>,<uuid>".into()))?;
    let ids: Vec<&str> = ids.split(',').filter(|s| !s.is_empty()).collect();
    if ids.is_empty() || ids.len() > MAX_PRESENCE_IDS {
        return Err(ApiError::Invalid(format!(
            "user_ids must name 1 to {MAX_PRESENCE_IDS} users"
        )));
    }
    let mut users = Vec::with_capacity(ids.len());
    for id in ids {
        users.push(UserId(
            Uuid::parse_str(id).map_err(|_| ApiError::Invalid(format!("not a UUID: {id:?}")))?,
        ));
    }
    // Only people the caller shares a conversation with, as for pushed
    // presence; anyone else reads as offline.
    let contacts = ctx.store.contacts(caller).await?;
    let visible: Vec<UserId> = users
        .iter()
        .copied()
        .filter(|u| contacts.contains(u) || *u == caller)
        .collect();
    let online_visible = ctx.gateway.online(&visible).await?;
    let online: Vec<bool> = users
        .iter()
        .map(|u| {
            visible
                .iter()
                .position(|v| v == u)
                .is_some_and(|i| online_visible[i])
        })
        .collect();
    let presence = users
        .iter()
        .zip(online)
        .map(|(u, on)| wire::UserPresence {
            user_id: *u,
            status: if on {
                wire::Status::Online
            } else {
                wire::Status::Offline
            },
        })
        .collect();
    Ok(json(StatusCode::OK, &wire::Presence { presence }))
}

fn parse_page(query: &str) -> Result<HistoryPage, ApiError> {
    let mut page = HistoryPage {
        after_seq: None,
        before_seq: None,
        limit: DEFAULT_PAGE,
    };
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        let n = || {
            v.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                ApiError::Invalid(format!("{k} must be a non-negative integer, got {v:?}"))
            })
        };
        match k {
            "after_seq" => page.after_seq = Some(n()?),
            "before_seq" => page.before_seq = Some(n()?),
            "limit" => {
                let l = n()?;
                if !(1..=MAX_PAGE).contains(&l) {
                    return Err(ApiError::Invalid(format!(
                        "limit must be between 1 and {MAX_PAGE}"
                    )));
                }
                page.limit = l;
            }
            _ => {}
        }
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::fuzz::{self, json_like};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(fuzz::config())]

        /// Whatever arrives as a body, the parser answers with a value or a
        /// 400/422, and never panics or recurses without bound.
        #[test]
        fn any_body_is_parsed_or_refused(body in json_like()) {
            for result in [
                parse_body::<CreateConversation>(&body).map(|_| ()),
                parse_body::<AddMember>(&body).map(|_| ()),
            ] {
                if let Err(e) = result {
                    prop_assert!(matches!(e, ApiError::BadRequest(_) | ApiError::Invalid(_)), "{e:?}");
                }
            }
        }
    }

    #[test]
    fn page_parsing_checks_numbers_and_bounds() {
        let p = parse_page("after_seq=5&limit=10").unwrap();
        assert_eq!((p.after_seq, p.before_seq, p.limit), (Some(5), None, 10));
        let p = parse_page("").unwrap();
        assert_eq!(p.limit, DEFAULT_PAGE);
        assert!(matches!(
            parse_page("after_seq=x"),
            Err(ApiError::Invalid(_))
        ));
        assert!(matches!(
            parse_page("before_seq=-1"),
            Err(ApiError::Invalid(_))
        ));
        assert!(matches!(parse_page("limit=0"), Err(ApiError::Invalid(_))));
        assert!(matches!(parse_page("limit=201"), Err(ApiError::Invalid(_))));
    }
}
