//! The remote implementation of [`Submit`]: the client side of the internal port.
//!
//! Commands for the same owner are coalesced: one task per peer sends whatever queued
//! while its previous requests were in flight as ONE request, so a hot wallet reached
//! through any node costs one internal round trip per batch, not per operation. Each
//! command keeps its own deadline and trace context. Every queue is bounded; a full one
//! refuses the command at once. Every request is signed (`crate::internal_auth`).
//!
//! Balance reads go the same way on their own route and queue, never in a batch with
//! commands: a node of an earlier build answers the unknown route 404, and the reader
//! falls back to PostgreSQL, while a read inside a command batch would fail its commands.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use wallet_cluster::{Member, SigningKeys};

use crate::auth::Tenant;
use crate::domain::{CommandOutcome, OperationCommand};
use crate::store::WalletState;
use crate::submit::{MayExist, NotApplied, Submit, Undelivered};

pub const INTERNAL_OPERATIONS_PATH: &str = "/internal/v1/operations";
pub const INTERNAL_READS_PATH: &str = "/internal/v1/reads";
/// Longest wait for the owner's answer to a batch of reads; a reader that does not get
/// one in time reads PostgreSQL instead.
const READ_ATTEMPT: Duration = Duration::from_millis(500);
/// Most commands in one internal request.
pub const MAX_FORWARD_BATCH: usize = 256;
/// Internal requests in flight to one peer at a time.
const MAX_IN_FLIGHT_PER_PEER: usize = 8;
/// Commands waiting for one peer; beyond it a command is refused as overloaded.
const PEER_QUEUE_MAX: usize = 4096;

/// One forwarded command with the trace context of the request it came from.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ForwardedCommand {
    pub command: OperationCommand,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub trace: HashMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ForwardBatch {
    pub operations: Vec<ForwardedCommand>,
}

/// The owner's answer for one command of a batch, in the batch's order.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "result", content = "outcome")]
pub enum ForwardResult {
    Done(CommandOutcome),
    Undelivered(Undelivered),
}

impl From<Result<CommandOutcome, Undelivered>> for ForwardResult {
    fn from(result: Result<CommandOutcome, Undelivered>) -> Self {
        match result {
            Ok(outcome) => Self::Done(outcome),
            Err(undelivered) => Self::Undelivered(undelivered),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ForwardReply {
    pub results: Vec<ForwardResult>,
}

/// A balance read sent to the wallet's owner.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WalletRead {
    pub tenant: Tenant,
    pub wallet_id: uuid::Uuid,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReadBatch {
    pub reads: Vec<WalletRead>,
}

/// The owner's answer to one read, from its memory only.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "result", content = "wallet")]
pub enum ReadResult {
    Found(WalletState),
    /// No such wallet of this tenant (the owner has the wallet, of another tenant).
    NotFound,
    /// The owner cannot answer from memory (not cached, lease not fresh, not the
    /// owner any more); PostgreSQL can.
    NotFromMemory,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadReply {
    pub results: Vec<ReadResult>,
}

/// How a whole internal request failed, and what that says about its commands.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("the peer could not be reached: {0}")]
    Unreachable(String),
    #[error("the peer refused the request's signature")]
    Unauthorized,
    #[error("the batch could not be encoded: {0}")]
    Encoding(#[from] serde_json::Error),
    #[error("no answer before the timeout")]
    Timeout,
    #[error("the request failed midway: {0}")]
    Interrupted(String),
    #[error("the peer answered {0}")]
    UnexpectedStatus(StatusCode),
}

impl RequestError {
    fn undelivered(&self) -> Undelivered {
        match self {
            // Nothing reached the owner's executors.
            Self::Unreachable(_) | Self::Unauthorized | Self::Encoding(_) => {
                Undelivered::NotApplied(NotApplied::Unreachable)
            }
            Self::Timeout => Undelivered::MayExist(MayExist::OwnerSilent),
            Self::Interrupted(_) | Self::UnexpectedStatus(_) => {
                Undelivered::MayExist(MayExist::AnswerLost)
            }
        }
    }
}

struct Job {
    item: ForwardedCommand,
    reply: oneshot::Sender<Result<CommandOutcome, Undelivered>>,
}

struct ReadJob {
    read: WalletRead,
    reply: oneshot::Sender<ReadResult>,
}

/// Bounds of one forward.
#[derive(Clone, Copy, Debug)]
pub struct ForwardTimeouts {
    /// How long after a command's deadline its owner may still be answering: the
    /// batch it is in commits and, if ambiguous, is looked up.
    pub answer_grace: Duration,
    /// Longest wait for one internal request: a paused or silently dead owner loses its
    /// shards after a lease TTL, so waiting longer for it only delays the retry.
    pub attempt: Duration,
}

/// The peers of this node, one [`Peer`] per member (id and internal address).
#[derive(Clone)]
pub struct Forwarder {
    client: reqwest::Client,
    keys: SigningKeys,
    timeouts: ForwardTimeouts,
    peers: Arc<Mutex<HashMap<Member, Arc<Peer>>>>,
}

impl Forwarder {
    pub fn new(keys: SigningKeys, timeouts: ForwardTimeouts) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(MAX_IN_FLIGHT_PER_PEER * 2)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(1))
            .build()?;
        Ok(Self {
            client,
            keys,
            timeouts,
            peers: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Drops the peers of members that left, whenever the view changes (needs a
    /// Tokio runtime). A dropped peer's task ends once its requests in flight are answered.
    pub fn follow(&self, mut members: watch::Receiver<Vec<Member>>) {
        let peers = Arc::downgrade(&self.peers);
        tokio::spawn(async move {
            while members.changed().await.is_ok() {
                let Some(peers) = peers.upgrade() else {
                    return;
                };
                let live: std::collections::HashSet<Member> =
                    members.borrow_and_update().iter().cloned().collect();
                peers
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .retain(|member, _| live.contains(member));
            }
        });
    }

    /// Peers with a forwarding task now.
    pub fn peer_count(&self) -> usize {
        self.peers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    /// The peer `member`, its task started on first use. Its requests are signed for
    /// the member's id: a request only the intended node accepts.
    pub fn peer(&self, member: &Member) -> Arc<Peer> {
        let mut peers = self
            .peers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(peer) = peers
            .get(member)
            .filter(|peer| !peer.queue.is_closed() && !peer.reads.is_closed())
        {
            return peer.clone();
        }
        let (queue, jobs) = mpsc::channel(PEER_QUEUE_MAX);
        let (reads, read_jobs) = mpsc::channel(PEER_QUEUE_MAX);
        let target = Arc::new(Target {
            base: format!("http://{}", member.internal_addr),
            node: member.id.clone(),
            keys: self.keys.clone(),
        });
        let (client, timeouts) = (self.client.clone(), self.timeouts);
        tokio::spawn(batch_loop(jobs, {
            let (client, target) = (client.clone(), target.clone());
            move |batch| {
                let (client, target) = (client.clone(), target.clone());
                async move { send_batch(&client, &target, batch, timeouts).await }
            }
        }));
        tokio::spawn(batch_loop(read_jobs, move |batch| {
            let (client, target) = (client.clone(), target.clone());
            async move { send_reads(&client, &target, batch).await }
        }));
        let peer = Arc::new(Peer { queue, reads });
        peers.insert(member.clone(), peer.clone());
        peer
    }
}

/// One other node, reached over its internal port.
pub struct Peer {
    queue: mpsc::Sender<Job>,
    reads: mpsc::Sender<ReadJob>,
}

impl Peer {
    /// The owner's committed state of a wallet, from its memory; `NotFromMemory` for
    /// anything short of an answer (a full queue, a peer that does not answer in time or
    /// does not know the route), so the caller reads PostgreSQL.
    pub async fn read(&self, tenant: &Tenant, wallet_id: uuid::Uuid) -> ReadResult {
        let (reply, answer) = oneshot::channel();
        let job = ReadJob {
            read: WalletRead {
                tenant: tenant.clone(),
                wallet_id,
            },
            reply,
        };
        if self.reads.try_send(job).is_err() {
            return ReadResult::NotFromMemory;
        }
        answer.await.unwrap_or(ReadResult::NotFromMemory)
    }
}

#[async_trait::async_trait]
impl Submit for Peer {
    async fn submit(
        &self,
        _shard: u32,
        command: OperationCommand,
    ) -> Result<CommandOutcome, Undelivered> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            item: ForwardedCommand {
                command,
                trace: trace_context(),
            },
            reply,
        };
        self.queue.try_send(job).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => Undelivered::NotApplied(NotApplied::Overloaded),
            mpsc::error::TrySendError::Closed(_) => {
                Undelivered::NotApplied(NotApplied::Unreachable)
            }
        })?;
        // The task answers every job it took; a lost reply means it stopped mid-request.
        answer
            .await
            .unwrap_or(Err(Undelivered::MayExist(MayExist::AnswerLost)))
    }
}

/// Where a peer's requests go, and what signs them.
struct Target {
    /// `http://` and the peer's internal address.
    base: String,
    /// The member id the requests are signed for.
    node: String,
    keys: SigningKeys,
}

/// Sends whatever queued for one peer while its earlier requests were in flight as one
/// request (`send`), with at most `MAX_IN_FLIGHT_PER_PEER` requests in flight.
async fn batch_loop<J, F, Fut>(mut jobs: mpsc::Receiver<J>, send: F)
where
    J: Send + 'static,
    F: Fn(Vec<J>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_PEER));
    loop {
        // Wait for a free slot first, so jobs keep queueing (and batching) meanwhile.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = jobs.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_FORWARD_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let sending = send(batch);
        tokio::spawn(async move {
            sending.await;
            drop(permit);
        });
    }
}

async fn send_reads(client: &reqwest::Client, target: &Target, batch: Vec<ReadJob>) {
    let (reads, replies): (Vec<WalletRead>, Vec<_>) =
        batch.into_iter().map(|job| (job.read, job.reply)).unzip();
    let result: Result<ReadReply, RequestError> = request(
        client,
        target,
        INTERNAL_READS_PATH,
        &ReadBatch { reads },
        READ_ATTEMPT,
    )
    .await;
    match result {
        Ok(reply) if reply.results.len() == replies.len() => {
            for (result, reply_to) in reply.results.into_iter().zip(replies) {
                let _ = reply_to.send(result);
            }
        }
        other => {
            if let Err(error) = other {
                tracing::debug!(node = %target.node, %error, "internal read failed; reading PostgreSQL");
            }
            for reply_to in replies {
                let _ = reply_to.send(ReadResult::NotFromMemory);
            }
        }
    }
}

async fn send_batch(
    client: &reqwest::Client,
    target: &Target,
    batch: Vec<Job>,
    timeouts: ForwardTimeouts,
) {
    // The owner would drop these unplanned; commands that may exist still go, for
    // their look-up.
    let (live, expired): (Vec<Job>, Vec<Job>) = batch
        .into_iter()
        .partition(|job| job.item.command.may_exist || !job.item.command.deadline.has_passed());
    for job in expired {
        let _ = job
            .reply
            .send(Err(Undelivered::NotApplied(NotApplied::Expired)));
    }
    // Wait as long as the latest command may still be answered, and no longer than
    // one attempt: an owner that stays silent that long is replaced.
    let Some(latest) = live.iter().map(|job| job.item.command.deadline).max() else {
        return;
    };
    let timeout = (latest.remaining() + timeouts.answer_grace).min(timeouts.attempt);
    let (items, replies): (Vec<ForwardedCommand>, Vec<_>) =
        live.into_iter().map(|job| (job.item, job.reply)).unzip();
    let result: Result<ForwardReply, RequestError> = request(
        client,
        target,
        INTERNAL_OPERATIONS_PATH,
        &ForwardBatch { operations: items },
        timeout,
    )
    .await;
    match result {
        Ok(reply) if reply.results.len() == replies.len() => {
            for (result, reply_to) in reply.results.into_iter().zip(replies) {
                let _ = reply_to.send(match result {
                    ForwardResult::Done(outcome) => Ok(outcome),
                    ForwardResult::Undelivered(undelivered) => Err(undelivered),
                });
            }
        }
        Ok(reply) => {
            tracing::error!(
                sent = replies.len(),
                answered = reply.results.len(),
                "peer answered a different number of results"
            );
            for reply_to in replies {
                let _ = reply_to.send(Err(Undelivered::MayExist(MayExist::AnswerLost)));
            }
        }
        Err(error) => {
            tracing::debug!(node = %target.node, %error, "internal request failed");
            let undelivered = error.undelivered();
            for reply_to in replies {
                let _ = reply_to.send(Err(undelivered));
            }
        }
    }
}

async fn request<B: Serialize, R: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    target: &Target,
    path: &'static str,
    batch: &B,
    timeout: Duration,
) -> Result<R, RequestError> {
    let body = serde_json::to_vec(batch)?;
    let signed = crate::internal_auth::sign(
        &target.keys,
        "POST",
        path,
        &target.node,
        &body,
        crate::internal_auth::now_ms(),
    );
    let mut request = client
        .post(format!("{}{path}", target.base))
        .header(CONTENT_TYPE, "application/json")
        .timeout(timeout);
    for (name, value) in signed.pairs() {
        request = request.header(name, value);
    }
    let response = request.body(body).send().await.map_err(classify)?;
    match response.status() {
        StatusCode::OK => response.json::<R>().await.map_err(classify),
        StatusCode::UNAUTHORIZED => {
            // Nothing ran. A peer with other secrets, or clocks apart by more than the
            // replay window; the peer's log says which.
            tracing::error!(
                url = %format!("{}{path}", target.base),
                node = %target.node,
                "peer refused the request's signature: check WALLET_INTERNAL_SECRET(_PREVIOUS) and the clocks"
            );
            Err(RequestError::Unauthorized)
        }
        status => Err(RequestError::UnexpectedStatus(status)),
    }
}

fn classify(error: reqwest::Error) -> RequestError {
    // Connect first: a connect timeout is also a timeout, but nothing was sent.
    if error.is_connect() {
        RequestError::Unreachable(error.to_string())
    } else if error.is_timeout() {
        RequestError::Timeout
    } else {
        RequestError::Interrupted(error.to_string())
    }
}

/// W3C `traceparent` (and `tracestate`) of the current span.
fn trace_context() -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier
}
