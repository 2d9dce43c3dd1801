//! The outbox as an API: pages with an optional long poll, and a Server-Sent Events
//! stream. Both start after a cursor and never skip an event: see `Store::events_after`.

use std::time::Duration;

use salvo::prelude::*;
use salvo::sse::{SseEvent, SseKeepAlive};
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use super::guard::principal;
use super::input;
use super::wallets::{Reply, state};
use crate::events::{EventCursor, EventFilter, EventType, EventView, StoredEvent};
use crate::store::ReadEventsError;

/// The longest long poll.
pub const MAX_WAIT_SECONDS: u64 = 30;
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1_000;
/// The stream's keep-alive comment, so proxies and clients see a live connection.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// A waiting stream looks again at least this often, even if the tail says nothing.
const STREAM_RECHECK: Duration = Duration::from_secs(5);

/// A read of the outbox, as the query string asks for it.
struct EventQuery {
    filter: EventFilter,
    after: EventCursor,
    limit: usize,
    wait: Duration,
}

/// The query parameters of both event routes: a misspelt filter (`type=`) must not
/// silently widen the read to every event.
const PARAMETERS: [&str; 5] = ["after", "limit", "walletId", "types", "wait"];

fn event_query(req: &Request, depot: &Depot, resume: Option<&str>) -> Result<EventQuery, ApiError> {
    let tenant = principal(depot)?.tenant.clone();
    if let Some(unknown) = req
        .queries()
        .keys()
        .find(|name| !PARAMETERS.contains(&name.as_str()))
    {
        return Err(ApiError::MalformedRequest(format!(
            "unknown query parameter {unknown:?}; known: {}",
            PARAMETERS.join(", ")
        )));
    }
    let text = |name: &str| req.query::<String>(name);
    let after = match resume.map(str::to_owned).or_else(|| text("after")) {
        None => EventCursor::START,
        Some(cursor) => EventCursor::decode(&cursor).ok_or_else(|| {
            ApiError::MalformedRequest("after is not a cursor this API returned".to_owned())
        })?,
    };
    let limit = match text("limit") {
        None => DEFAULT_LIMIT,
        Some(limit) => limit
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=MAX_LIMIT).contains(limit))
            .ok_or_else(|| ApiError::MalformedRequest(format!("limit must be 1 to {MAX_LIMIT}")))?,
    };
    let wallet_id = text("walletId")
        .map(|id| input::uuid(&id, "walletId"))
        .transpose()?;
    let types = match text("types") {
        None => Vec::new(),
        Some(types) => types
            .split(',')
            .map(|name| {
                EventType::parse(name.trim()).ok_or_else(|| {
                    ApiError::MalformedRequest(format!(
                        "unknown event type {name:?}; known: {}",
                        EventType::ALL.map(EventType::as_str).join(", ")
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let wait = match text("wait") {
        None => 0,
        Some(wait) => wait
            .parse::<u64>()
            .ok()
            .filter(|wait| *wait <= MAX_WAIT_SECONDS)
            .ok_or_else(|| {
                ApiError::MalformedRequest(format!(
                    "wait must be a whole number of seconds from 0 to {MAX_WAIT_SECONDS}"
                ))
            })?,
    };
    Ok(EventQuery {
        filter: EventFilter {
            tenant,
            wallet_id,
            types,
        },
        after,
        limit,
        wait: Duration::from_secs(wait),
    })
}

impl From<ReadEventsError> for ApiError {
    fn from(error: ReadEventsError) -> Self {
        match error {
            ReadEventsError::Pruned => Self::CursorExpired,
            ReadEventsError::Store(error) => error.into(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EventPageView<'a> {
    /// Oldest first; a wallet's events in sequence order.
    items: Vec<EventView<'a>>,
    /// Pass as `after` to continue; also when `items` is empty.
    next_cursor: String,
}

/// The tenant's events after a cursor, oldest first.
///
/// With `wait`, an empty page is held until an event arrives or the wait is over.
/// Saving `nextCursor` and resuming from it sees every event at least once.
#[endpoint(
    tags("events"),
    parameters(
        ("after" = Option<String>, Query, description = "nextCursor (or an event's cursor) to continue after; the oldest retained event when absent"),
        ("limit" = Option<u32>, Query, description = "1 to 1000, default 100"),
        ("walletId" = Option<String>, Query, description = "Only this wallet's events"),
        ("types" = Option<String>, Query, description = "Comma-separated event types, e.g. operation.applied,transfer.posted"),
        ("wait" = Option<u32>, Query, description = "Seconds (0 to 30) to hold an empty page for new events"),
    ),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 200, description = "A page of events and the cursor to continue from"),
        (status_code = 400, description = "Malformed cursor, UUID, limit, wait, or an unknown event type", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 410, description = "The cursor is older than the outbox's retention", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 503, description = "The database did not answer in time", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_events(req: &mut Request, depot: &mut Depot) -> Result<Reply, ApiError> {
    let state = state(depot)?;
    let query = event_query(req, depot, None)?;
    let deadline = tokio::time::Instant::now() + query.wait;
    let mut subscription = state.event_tail.subscribe();
    let page = loop {
        let page = state
            .store
            .events_after(&query.filter, query.after, query.limit)
            .await?;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !page.events.is_empty() || left.is_zero() {
            break page;
        }
        state.event_tail.changed(&mut subscription, left).await;
    };
    Reply::new(
        StatusCode::OK,
        &EventPageView {
            items: page.events.iter().map(StoredEvent::view).collect(),
            next_cursor: page.next.encode(),
        },
    )
}

/// The tenant's events as Server-Sent Events, from a cursor on, for as long as the
/// client stays connected.
///
/// Each event's `id:` is its cursor, so a client that reconnects with `Last-Event-ID`
/// continues right after the last event it got. A keep-alive comment goes out every 15 s.
#[endpoint(
    tags("events"),
    parameters(
        ("after" = Option<String>, Query, description = "Cursor to start after; Last-Event-ID wins"),
        ("Last-Event-ID" = Option<String>, Header, description = "The id of the last event received"),
        ("walletId" = Option<String>, Query, description = "Only this wallet's events"),
        ("types" = Option<String>, Query, description = "Comma-separated event types"),
    ),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 200, description = "text/event-stream: `id:` cursor, `event:` type, `data:` the event's JSON"),
        (status_code = 400, description = "Malformed cursor or UUID, or an unknown event type", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 410, description = "The cursor is older than the outbox's retention", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn stream_events(
    req: &mut Request,
    depot: &mut Depot,
    res: &mut Response,
) -> Result<(), ApiError> {
    let state = state(depot)?.clone();
    let resume = req
        .headers()
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty())
        .map(str::to_owned);
    let query = event_query(req, depot, resume.as_deref())?;
    // The first page here, so that a pruned cursor or a database fault is a status code.
    let first = state
        .store
        .events_after(&query.filter, query.after, MAX_LIMIT)
        .await?;
    let stream = futures::stream::unfold(
        Streaming {
            subscription: state.event_tail.subscribe(),
            state,
            filter: query.filter,
            next: first.next,
            buffered: first.events.into(),
        },
        Streaming::next_event,
    );
    SseKeepAlive::new(stream)
        .max_interval(KEEP_ALIVE)
        .comment("keep-alive")
        .stream(res);
    Ok(())
}

/// Where a stream is: the events read but not sent yet, and the cursor after them.
struct Streaming {
    state: AppState,
    filter: EventFilter,
    next: EventCursor,
    buffered: std::collections::VecDeque<StoredEvent>,
    subscription: tokio::sync::watch::Receiver<Option<crate::store::Horizon>>,
}

impl Streaming {
    async fn next_event(mut self) -> Option<(Result<SseEvent, std::convert::Infallible>, Self)> {
        loop {
            if let Some(event) = self.buffered.pop_front() {
                let sse = SseEvent::default()
                    .id(event.cursor.encode())
                    .name(event.event_type.as_str())
                    .text(event.to_json());
                return Some((Ok(sse), self));
            }
            match self
                .state
                .store
                .events_after(&self.filter, self.next, MAX_LIMIT)
                .await
            {
                Ok(page) => {
                    self.next = page.next;
                    if page.events.is_empty() {
                        self.state
                            .event_tail
                            .changed(&mut self.subscription, STREAM_RECHECK)
                            .await;
                    }
                    self.buffered.extend(page.events);
                }
                Err(error) => {
                    // The client reconnects with Last-Event-ID and misses nothing.
                    tracing::warn!(error = %error, "an event stream ends: reading the outbox failed");
                    return None;
                }
            }
        }
    }
}
