//! Event lag: how long after an operation was recorded its event reaches a consumer of
//! the event stream (GET /api/v1/events/stream) and a webhook receiver (a local HTTP
//! server registered with POST /api/v1/webhooks), measured during the constant scenario.
//! The lag is receipt time minus the event's `occurredAt` (the moment the owner planned
//! the operation, just before its commit), so it includes the commit itself.

use crate::client::Target;
use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The target for the p99 of commit-to-receipt.
pub const TARGET_P99_MS: f64 = 1_000.0;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LagFigures {
    /// Events that arrived, of the operations the load got a 200 or 409 for.
    pub received: u64,
    pub expected: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventLagReport {
    pub stream: LagFigures,
    /// None when the build under test has no webhooks.
    #[serde(default)]
    pub webhook: Option<LagFigures>,
    pub target_p99_ms: f64,
    /// Every expected event arrived and the p99 is within the target.
    pub target_met: bool,
}

/// A consumer of one wallet's stream, recording the lag of every event after `since`.
pub struct LagProbe {
    task: JoinHandle<Vec<f64>>,
    stop: CancellationToken,
    received: Arc<AtomicU64>,
    webhook: Option<WebhookProbe>,
}

/// A local receiver of one webhook, and the lags of the wallet's deliveries.
struct WebhookProbe {
    target: Arc<Target>,
    webhook_id: String,
    server: JoinHandle<()>,
    lags: Arc<std::sync::Mutex<Vec<f64>>>,
}

/// The lag of one event body (JSON) of `wallet`, if it happened after `since`.
fn lag_of(body: &str, wallet: Uuid, since: f64, now: f64) -> Option<f64> {
    let value = serde_json::from_str::<serde_json::Value>(body).ok()?;
    if value["walletId"].as_str()? != wallet.to_string() {
        return None;
    }
    let occurred = chrono::DateTime::parse_from_rfc3339(value["occurredAt"].as_str()?).ok()?;
    let occurred_ms = occurred.timestamp_micros() as f64 / 1000.0;
    // Events from before the probe (the seed deposit) say nothing of lag.
    (occurred_ms >= since).then(|| (now - occurred_ms).max(0.0))
}

/// Serves webhook deliveries on a port of 127.0.0.1 and registers it for the tenant's
/// operation events. `None`, said loudly, when registering fails (no webhooks in this build,
/// or private URLs not allowed).
async fn start_webhook(target: Arc<Target>, wallet: Uuid, since: f64) -> Option<WebhookProbe> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.ok()?;
    let port = listener.local_addr().ok()?.port();
    let lags: Arc<std::sync::Mutex<Vec<f64>>> = Arc::default();
    let server = {
        let lags = lags.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let lags = lags.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let lags = lags.clone();
                            async move {
                                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                                let now = unix_ms_now();
                                if let Some(lag) = body.ok().and_then(|b| {
                                    lag_of(&String::from_utf8_lossy(&b), wallet, since, now)
                                }) {
                                    lags.lock().unwrap_or_else(|p| p.into_inner()).push(lag);
                                }
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(Empty::<
                                    Bytes,
                                >::new(
                                )))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        })
    };
    let body = serde_json::json!({
        "url": format!("http://127.0.0.1:{port}/"),
        "eventTypes": ["operation.applied", "operation.rejected"],
    });
    let mut conn = crate::client::Conn::new(target.clone());
    let answer = conn
        .send(
            http::Method::POST,
            http::Uri::from_static("/api/v1/webhooks"),
            Bytes::from(body.to_string()),
            Duration::from_secs(10),
        )
        .await;
    let webhook_id = match &answer {
        Ok((201, body)) => crate::client::extract_str(body, "webhookId").map(str::to_owned),
        _ => None,
    };
    let Some(webhook_id) = webhook_id else {
        eprintln!(
            "[bench] WEBHOOK LAG NOT MEASURED: registering a webhook answered {:?}",
            answer.map(|(status, body)| (status, String::from_utf8_lossy(&body).into_owned()))
        );
        server.abort();
        return None;
    };
    Some(WebhookProbe {
        target,
        webhook_id,
        server,
        lags,
    })
}

fn unix_ms_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Opens the stream of `wallet`'s operation events on `target`. `None` (said loudly)
/// when the build under test has no event stream, e.g. an older revision in a comparison.
pub async fn start(target: Arc<Target>, wallet: Uuid) -> anyhow::Result<Option<LagProbe>> {
    let stream = TcpStream::connect(&target.addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut request = Request::builder()
        .uri(format!(
            "/api/v1/events/stream?walletId={wallet}&types=operation.applied,operation.rejected"
        ))
        .header(header::HOST, HeaderValue::from_str(&target.addr)?);
    if let Some(authorization) = target.authorization() {
        request = request.header(header::AUTHORIZATION, authorization);
    }
    let response = sender
        .send_request(request.body(Empty::<Bytes>::new())?)
        .await?;
    if !response.status().is_success() {
        eprintln!(
            "[bench] EVENT LAG NOT MEASURED: the event stream answered {} (a build without events?)",
            response.status()
        );
        return Ok(None);
    }
    let since = unix_ms_now();
    let webhook = start_webhook(target.clone(), wallet, since).await;
    let stop = CancellationToken::new();
    let received = Arc::new(AtomicU64::new(0));
    let task = {
        let stop = stop.clone();
        let received = received.clone();
        tokio::spawn(async move {
            let mut body = response.into_body();
            let mut buffer = String::new();
            let mut lags = Vec::new();
            loop {
                let frame = tokio::select! {
                    () = stop.cancelled() => break,
                    frame = body.frame() => frame,
                };
                let Some(Ok(frame)) = frame else { break };
                let Some(chunk) = frame.data_ref() else {
                    continue;
                };
                let now = unix_ms_now();
                buffer.push_str(&String::from_utf8_lossy(chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let event: String = buffer.drain(..end + 2).collect();
                    for data in event.lines().filter_map(|line| line.strip_prefix("data:")) {
                        if let Some(lag) = lag_of(data.trim_start(), wallet, since, now) {
                            lags.push(lag);
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            lags
        })
    };
    Ok(Some(LagProbe {
        task,
        stop,
        received,
        webhook,
    }))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn figures(mut lags: Vec<f64>, expected: u64) -> LagFigures {
    lags.sort_by(f64::total_cmp);
    LagFigures {
        received: lags.len() as u64,
        expected,
        p50_ms: round2(percentile(&lags, 0.50)),
        p99_ms: round2(percentile(&lags, 0.99)),
        max_ms: round2(lags.last().copied().unwrap_or(0.0)),
    }
}

impl LagProbe {
    /// Waits up to `settle` for `expected` events on every consumer, then stops,
    /// removes the webhook and summarizes.
    pub async fn finish(self, expected: u64, settle: Duration) -> EventLagReport {
        let deadline = tokio::time::Instant::now() + settle;
        let delivered =
            |w: &WebhookProbe| w.lags.lock().unwrap_or_else(|p| p.into_inner()).len() as u64;
        while (self.received.load(Ordering::Relaxed) < expected
            || self
                .webhook
                .as_ref()
                .is_some_and(|w| delivered(w) < expected))
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stop.cancel();
        let stream = figures(self.task.await.unwrap_or_default(), expected);
        let webhook = match self.webhook {
            Some(w) => {
                let uri = http::Uri::try_from(format!("/api/v1/webhooks/{}", w.webhook_id));
                if let Ok(uri) = uri {
                    let mut conn = crate::client::Conn::new(w.target.clone());
                    let _ = conn
                        .send(
                            http::Method::DELETE,
                            uri,
                            Bytes::new(),
                            Duration::from_secs(10),
                        )
                        .await;
                }
                w.server.abort();
                let lags = std::mem::take(&mut *w.lags.lock().unwrap_or_else(|p| p.into_inner()));
                Some(figures(lags, expected))
            }
            None => None,
        };
        let met = |f: &LagFigures| f.received >= expected && f.p99_ms <= TARGET_P99_MS;
        EventLagReport {
            target_met: met(&stream) && webhook.as_ref().is_none_or(met),
            stream,
            webhook,
            target_p99_ms: TARGET_P99_MS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.50), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.99), 0.0);
    }
}
