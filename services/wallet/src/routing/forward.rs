//! The client side of the internal port: one shared HTTP client, the shared secret,
//! and the W3C trace context of the request.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use wallet_cluster::Member;

use crate::domain::{CommandOutcome, OperationCommand};

pub const INTERNAL_OPERATIONS_PATH: &str = "/internal/v1/operations";

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("the peer no longer owns the shard")]
    Misdirected,
    #[error("the peer could not be reached: {0}")]
    Unreachable(#[source] reqwest::Error),
    #[error("the request to the peer failed midway: {0}")]
    Interrupted(#[source] reqwest::Error),
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

#[derive(Clone)]
pub struct Forwarder {
    client: reqwest::Client,
    secret: SecretString,
}

impl Forwarder {
    pub fn new(secret: SecretString) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(1))
            .build()?;
        Ok(Self { client, secret })
    }

    pub async fn forward(
        &self,
        owner: &Member,
        command: &OperationCommand,
        deadline: Instant,
    ) -> Result<CommandOutcome, ForwardError> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        if timeout.is_zero() {
            return Err(ForwardError::Timeout);
        }
        let response = self
            .client
            .post(format!(
                "http://{}{INTERNAL_OPERATIONS_PATH}",
                owner.internal_addr
            ))
            .headers(trace_headers())
            .header(
                AUTHORIZATION,
                format!("Bearer {}", self.secret.expose_secret()),
            )
            .json(command)
            .timeout(timeout)
            .send()
            .await
            .map_err(classify)?;
        match response.status() {
            StatusCode::OK => response.json::<CommandOutcome>().await.map_err(classify),
            StatusCode::MISDIRECTED_REQUEST => Err(ForwardError::Misdirected),
            StatusCode::SERVICE_UNAVAILABLE => Err(ForwardError::PeerUnavailable),
            StatusCode::UNAUTHORIZED => {
                tracing::error!(peer = %owner.id, "peer refused the internal secret: check WALLET_INTERNAL_SECRET");
                Err(ForwardError::Unauthorized)
            }
            status => Err(ForwardError::UnexpectedStatus(status)),
        }
    }
}

fn classify(error: reqwest::Error) -> ForwardError {
    if error.is_timeout() {
        ForwardError::Timeout
    } else if error.is_connect() {
        ForwardError::Unreachable(error)
    } else {
        ForwardError::Interrupted(error)
    }
}

/// `traceparent` (and `tracestate`) of the current span, plus its request id.
fn trace_headers() -> HeaderMap {
    let mut carrier = std::collections::HashMap::new();
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier
        .into_iter()
        .filter_map(|(name, value)| {
            Some((
                HeaderName::from_bytes(name.as_bytes()).ok()?,
                HeaderValue::from_str(&value).ok()?,
            ))
        })
        .collect()
}
