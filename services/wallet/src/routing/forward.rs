//! The client side of the internal port. Commands for the same owner are coalesced:
//! one task per peer sends whatever queued while its previous requests were in
//! flight as ONE request, so a hot wallet reached through any node costs one internal
//! round trip per batch, not per operation. Each command keeps its own trace context.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use reqwest::StatusCode;
use reqwest::header::AUTHORIZATION;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use wallet_cluster::Member;

use crate::domain::{CommandOutcome, OperationCommand};

pub const INTERNAL_OPERATIONS_PATH: &str = "/internal/v1/operations";
/// Most commands in one internal request.
const MAX_FORWARD_BATCH: usize = 256;
/// Internal requests in flight to one peer at a time.
const MAX_IN_FLIGHT_PER_PEER: usize = 8;

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
    /// The shard is not served by this node (the HTTP 421 of a single command).
    NotOwner,
    /// The batch could not be committed; the operation may or may not be in.
    Unavailable,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ForwardReply {
    pub results: Vec<ForwardResult>,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("the peer no longer owns the shard")]
    Misdirected,
    #[error("the peer could not be reached: {0}")]
    Unreachable(String),
    #[error("the request to the peer failed midway: {0}")]
    Interrupted(String),
    #[error("the peer could not commit the operation")]
    PeerUnavailable,
    #[error("the peer refused the shared secret")]
    Unauthorized,
    #[error("the peer answered {0}")]
    UnexpectedStatus(StatusCode),
    #[error("the deadline passed before the peer answered")]
    Timeout,
}

impl ForwardError {
    /// Whether the peer may have committed the operation before the failure.
    pub fn maybe_applied(&self) -> bool {
        matches!(
            self,
            Self::Interrupted(_)
                | Self::PeerUnavailable
                | Self::Timeout
                | Self::UnexpectedStatus(_)
        )
    }
}

struct Job {
    item: ForwardedCommand,
    deadline: Instant,
    reply: oneshot::Sender<Result<CommandOutcome, ForwardError>>,
}

#[derive(Clone)]
pub struct Forwarder {
    client: reqwest::Client,
    secret: SecretString,
    peers: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Job>>>>,
}

impl Forwarder {
    pub fn new(secret: SecretString) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(MAX_IN_FLIGHT_PER_PEER * 2)
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(1))
            .build()?;
        Ok(Self {
            client,
            secret,
            peers: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    pub async fn forward(
        &self,
        owner: &Member,
        command: &OperationCommand,
        deadline: Instant,
    ) -> Result<CommandOutcome, ForwardError> {
        if deadline <= Instant::now() {
            return Err(ForwardError::Timeout);
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            item: ForwardedCommand {
                command: command.clone(),
                trace: trace_context(),
            },
            deadline,
            reply,
        };
        self.peer(&owner.internal_addr)
            .send(job)
            .map_err(|_| ForwardError::Unreachable("peer queue closed".into()))?;
        answer.await.unwrap_or(Err(ForwardError::Interrupted(
            "forwarding task stopped".into(),
        )))
    }

    /// The queue of the task that talks to `addr`, started on first use.
    fn peer(&self, addr: &str) -> mpsc::UnboundedSender<Job> {
        let mut peers = self
            .peers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(queue) = peers.get(addr).filter(|queue| !queue.is_closed()) {
            return queue.clone();
        }
        let (queue, jobs) = mpsc::unbounded_channel();
        let url = format!("http://{addr}{INTERNAL_OPERATIONS_PATH}");
        tokio::spawn(peer_loop(
            url,
            jobs,
            self.client.clone(),
            self.secret.clone(),
        ));
        peers.insert(addr.to_owned(), queue.clone());
        queue
    }
}

async fn peer_loop(
    url: String,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    client: reqwest::Client,
    secret: SecretString,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_PEER));
    let authorization = format!("Bearer {}", secret.expose_secret());
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
        let client = client.clone();
        let url = url.clone();
        let authorization = authorization.clone();
        tokio::spawn(async move {
            send_batch(&client, &url, &authorization, batch).await;
            drop(permit);
        });
    }
}

async fn send_batch(client: &reqwest::Client, url: &str, authorization: &str, batch: Vec<Job>) {
    let now = Instant::now();
    let (live, expired): (Vec<Job>, Vec<Job>) =
        batch.into_iter().partition(|job| job.deadline > now);
    for job in expired {
        let _ = job.reply.send(Err(ForwardError::Timeout));
    }
    let Some(deadline) = live.iter().map(|job| job.deadline).min() else {
        return;
    };
    let (items, replies): (Vec<ForwardedCommand>, Vec<_>) =
        live.into_iter().map(|job| (job.item, job.reply)).unzip();
    let result = request(
        client,
        url,
        authorization,
        ForwardBatch { operations: items },
        deadline,
    )
    .await;
    match result {
        Ok(reply) if reply.results.len() == replies.len() => {
            for (result, reply_to) in reply.results.into_iter().zip(replies) {
                let _ = reply_to.send(match result {
                    ForwardResult::Done(outcome) => Ok(outcome),
                    ForwardResult::NotOwner => Err(ForwardError::Misdirected),
                    ForwardResult::Unavailable => Err(ForwardError::PeerUnavailable),
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
                let _ = reply_to.send(Err(ForwardError::Interrupted(
                    "malformed peer answer".into(),
                )));
            }
        }
        Err(error) => {
            for reply_to in replies {
                let _ = reply_to.send(Err(error.duplicate()));
            }
        }
    }
}

impl ForwardError {
    /// The same error for every command of a failed batch.
    fn duplicate(&self) -> Self {
        match self {
            Self::Misdirected => Self::Misdirected,
            Self::Unreachable(text) => Self::Unreachable(text.clone()),
            Self::Interrupted(text) => Self::Interrupted(text.clone()),
            Self::PeerUnavailable => Self::PeerUnavailable,
            Self::Unauthorized => Self::Unauthorized,
            Self::UnexpectedStatus(status) => Self::UnexpectedStatus(*status),
            Self::Timeout => Self::Timeout,
        }
    }
}

async fn request(
    client: &reqwest::Client,
    url: &str,
    authorization: &str,
    batch: ForwardBatch,
    deadline: Instant,
) -> Result<ForwardReply, ForwardError> {
    let timeout = deadline.saturating_duration_since(Instant::now());
    let response = client
        .post(url)
        .header(AUTHORIZATION, authorization)
        .json(&batch)
        .timeout(timeout)
        .send()
        .await
        .map_err(classify)?;
    match response.status() {
        StatusCode::OK => response.json::<ForwardReply>().await.map_err(classify),
        StatusCode::UNAUTHORIZED => {
            tracing::error!(%url, "peer refused the internal secret: check WALLET_INTERNAL_SECRET");
            Err(ForwardError::Unauthorized)
        }
        status => Err(ForwardError::UnexpectedStatus(status)),
    }
}

fn classify(error: reqwest::Error) -> ForwardError {
    if error.is_timeout() {
        ForwardError::Timeout
    } else if error.is_connect() {
        ForwardError::Unreachable(error.to_string())
    } else {
        ForwardError::Interrupted(error.to_string())
    }
}

/// W3C `traceparent` (and `tracestate`) of the current span.
fn trace_context() -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier
}
