//! The outbox published to NATS JetStream, at least once, deduplicated by event id.
//!
//! Page by page: claim the consumer position `nats` (an advisory lock held by an open
//! transaction, so one node publishes at a time), read the next page after it, publish every event with `Nats-Msg-Id` = its
//! eventId, await every PubAck, and only then move the position past the page and
//! release the claim. A node that dies or is cut off between publishing and moving the
//! position leaves the page to be published again, by itself or another node; JetStream
//! drops the copies it stored within its duplicate window. NATS being down stops this
//! loop only: the ledger's writes never wait for it. See docs/design.md, "NATS JetStream".

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage, stream};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use super::metrics::{EventsMetrics, Published};
use super::{EventTail, StoredEvent};
use crate::config::NatsConfig;
use crate::error_chain;
use crate::store::{ClaimOutcome, Store, StoreError};

/// The consumer's row in `event_consumers`.
pub const CONSUMER: &str = "nats";

/// A node that saw no change of the outbox still tries the claim this often: another
/// node may have dropped it mid-page without anything new arriving.
const RECHECK: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("connecting to NATS failed")]
    Connect(#[from] async_nats::ConnectError),
    #[error("creating or reading the JetStream stream failed")]
    Stream(#[from] jetstream::context::CreateStreamError),
    #[error("publishing to JetStream failed")]
    Publish(#[from] jetstream::context::PublishError),
    #[error("no PubAck for a page within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SinkError {
    /// Whether the NATS connection is suspect: start over with a new one, which also
    /// discards whatever the old one still buffered of the failed page.
    fn reconnect(&self) -> bool {
        !matches!(self, Self::Store(_))
    }
}

/// The subject of an event: `<prefix>.<tenant>.<event type>`. Tenants may contain `.`,
/// which would split them into two tokens: it becomes `~`, which no tenant contains, so
/// the mapping is one to one (`acme.eu` → `wallet.events.acme~eu.operation.applied`).
pub fn subject(prefix: &str, event: &StoredEvent) -> String {
    format!(
        "{prefix}.{}.{}",
        event.tenant.as_str().replace('.', "~"),
        event.event_type.as_str()
    )
}

pub struct NatsSink {
    pub config: NatsConfig,
    pub store: Store,
    pub tail: EventTail,
    pub metrics: EventsMetrics,
    pub node_id: String,
    /// The longest a page read takes (the store's read timeout).
    pub read_timeout: Duration,
}

/// How a round went.
enum Round {
    /// A full page went out: there may be more right away.
    More,
    /// Caught up, or another node holds the claim.
    Idle,
}

impl NatsSink {
    /// Publishes until `stop` fires.
    pub async fn run(self, stop: CancellationToken) {
        tracing::info!(
            stream = %self.config.stream,
            prefix = %self.config.subject_prefix,
            "publishing the outbox to NATS JetStream"
        );
        let mut backoff = BACKOFF_MIN;
        // The position exists from the node's start, NATS reachable or not: what commits
        // from then on is published, however late NATS comes.
        loop {
            let registered = tokio::select! {
                () = stop.cancelled() => return,
                result = self.store.register_consumer(CONSUMER) => result,
            };
            match registered {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), retry_in = ?backoff, "NATS sink: registering its position");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        backoff = BACKOFF_MIN;
        loop {
            let error = tokio::select! {
                () = stop.cancelled() => return,
                result = self.session(&mut backoff) => result,
            };
            tracing::warn!(error = %error_chain(&error), retry_in = ?backoff, "NATS sink");
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection: ends with the error that makes a new one necessary.
    async fn session(&self, backoff: &mut Duration) -> SinkError {
        let client = match async_nats::ConnectOptions::new()
            .name(format!("wallet {}", self.node_id))
            .connection_timeout(self.config.timeout)
            .request_timeout(Some(self.config.timeout))
            .connect(self.config.url.expose_secret())
            .await
        {
            Ok(client) => client,
            Err(error) => return error.into(),
        };
        let js = jetstream::ContextBuilder::new()
            .timeout(self.config.timeout)
            // A page's acks at most are in flight; never an error for waiting on one.
            .max_ack_inflight(self.config.batch.max(1))
            .backpressure_on_inflight(true)
            .build(client);
        if let Err(error) = self.ensure_stream(&js).await {
            return error;
        }
        let mut wake = self.tail.subscribe();
        loop {
            match self.round(&js).await {
                Ok(round) => {
                    *backoff = BACKOFF_MIN;
                    if matches!(round, Round::Idle) {
                        self.tail.changed(&mut wake, RECHECK).await;
                    }
                }
                Err(error) if error.reconnect() => return error,
                Err(error) => {
                    // PostgreSQL trouble: the connection to NATS is fine, keep it.
                    tracing::warn!(error = %error_chain(&error), retry_in = ?*backoff, "NATS sink");
                    tokio::time::sleep(*backoff).await;
                    *backoff = (*backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Creates the stream if it is missing; an existing one is left as it is (an
    /// operator may have tuned it), with a warning where it cannot do its job as set.
    async fn ensure_stream(&self, js: &jetstream::Context) -> Result<(), SinkError> {
        let subjects = format!("{}.>", self.config.subject_prefix);
        let stream = js
            .get_or_create_stream(stream::Config {
                name: self.config.stream.clone(),
                subjects: vec![subjects.clone()],
                duplicate_window: self.config.duplicate_window,
                max_age: self.config.max_age,
                num_replicas: self.config.replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await?;
        let found = &stream.cached_info().config;
        if !found.subjects.contains(&subjects) {
            tracing::warn!(stream = %found.name, subjects = ?found.subjects, expected = %subjects,
                "the JetStream stream does not take the sink's subjects: publishing will fail");
        }
        if found.duplicate_window != self.config.duplicate_window {
            tracing::warn!(stream = %found.name, duplicate_window = ?found.duplicate_window,
                configured = ?self.config.duplicate_window,
                "the JetStream stream's duplicate window differs from WALLET_EVENTS_NATS_DUPLICATE_WINDOW_MS");
        }
        Ok(())
    }

    /// Claims the position, publishes the page after it, and moves the position on.
    async fn round(&self, js: &jetstream::Context) -> Result<Round, SinkError> {
        // The claim idles while the page is read and published, each bounded.
        let hold = self.read_timeout + self.config.timeout + Duration::from_secs(2);
        let claim = match self.store.claim_consumer(CONSUMER, hold).await? {
            ClaimOutcome::Claimed(claim) => claim,
            ClaimOutcome::Held => return Ok(Round::Idle),
            ClaimOutcome::Missing => {
                self.store.register_consumer(CONSUMER).await?;
                return Ok(Round::More);
            }
        };
        let page = self
            .store
            .all_events_after(claim.position, self.config.batch)
            .await?;
        if page.events.is_empty() {
            if page.next > claim.position {
                claim.advance(page.next).await?;
            }
            return Ok(Round::Idle);
        }
        let full = page.events.len() == self.config.batch;
        match tokio::time::timeout(self.config.timeout, self.publish(js, &page.events)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error),
            Err(_) => return Err(SinkError::Timeout(self.config.timeout)),
        }
        claim.advance(page.next).await?;
        Ok(if full { Round::More } else { Round::Idle })
    }

    /// Publishes `events` in order and waits for every acknowledgement. The publishes
    /// are pipelined: the acks are awaited after the last one went out.
    async fn publish(
        &self,
        js: &jetstream::Context,
        events: &[StoredEvent],
    ) -> Result<(), SinkError> {
        let mut acks = Vec::with_capacity(events.len());
        let mut outcome = Ok(());
        for event in events {
            let message = PublishMessage::build()
                .message_id(event.event_id.to_string())
                .payload(event.to_json().into());
            match js
                .send_publish(subject(&self.config.subject_prefix, event), message)
                .await
            {
                Ok(ack) => acks.push(ack),
                Err(error) => {
                    outcome = Err(error);
                    break;
                }
            }
        }
        let (mut stored, mut duplicates) = (0, 0);
        for ack in acks {
            match ack.await {
                Ok(ack) if ack.duplicate => duplicates += 1,
                Ok(_) => stored += 1,
                Err(error) => {
                    if outcome.is_ok() {
                        outcome = Err(error);
                    }
                }
            }
        }
        self.metrics.published(Published::Stored, stored);
        self.metrics.published(Published::Duplicate, duplicates);
        self.metrics
            .published(Published::Failed, events.len() as u64 - stored - duplicates);
        outcome.map_err(|error| {
            if error.kind() == PublishErrorKind::StreamNotFound {
                tracing::warn!(stream = %self.config.stream, "the JetStream stream is gone; creating it again");
            }
            error.into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Tenant;
    use crate::events::{EventCursor, EventType};

    fn event(tenant: &str, event_type: EventType) -> StoredEvent {
        StoredEvent {
            cursor: EventCursor::START,
            event_id: uuid::Uuid::nil(),
            tenant: Tenant::parse(tenant).expect("tenant"),
            wallet_id: uuid::Uuid::nil(),
            sequence: 0,
            event_type,
            occurred_at: chrono::Utc::now(),
            data: serde_json::value::RawValue::from_string("{}".to_owned()).expect("json"),
        }
    }

    #[test]
    fn subjects_are_one_token_per_tenant_and_never_ambiguous() {
        assert_eq!(
            subject("wallet.events", &event("acme", EventType::OperationApplied)),
            "wallet.events.acme.operation.applied"
        );
        let dotted = subject("wallet.events", &event("acme.eu", EventType::HoldCreated));
        assert_eq!(dotted, "wallet.events.acme~eu.hold.created");
        assert_eq!(dotted.split('.').count(), 5, "the tenant stays one token");
        // Every character a tenant may have maps to itself but `.`: distinct tenants,
        // distinct subjects.
        assert_ne!(
            subject("p", &event("a.b", EventType::WalletCreated)),
            subject("p", &event("a_b", EventType::WalletCreated))
        );
        assert_ne!(
            subject("p", &event("a.b", EventType::WalletCreated)),
            subject("p", &event("a-b", EventType::WalletCreated))
        );
    }
}
