//! A webhook receiver for the tests: a tiny HTTP server on 127.0.0.1 (port chosen by the
//! OS) that records every request and answers as the test says: a status, or nothing
//! until told (requests held open), or no connection at all (down). Plus the signature
//! check a receiver would make, and the webhook API's calls.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::ApiClient;

/// How the receiver answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every request gets this status at once.
    Status(u16),
    /// Requests are held open until the mode changes, then answered by the new mode.
    Hold,
}

/// One request as it arrived.
#[derive(Clone, Debug)]
pub struct Received {
    /// The path the webhook's URL named (several webhooks can share a receiver).
    pub path: String,
    /// Lower-case names.
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    pub fn event_id(&self) -> String {
        self.json()["eventId"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

struct Shared {
    received: Mutex<Vec<Received>>,
    mode: watch::Sender<Mode>,
}

pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Stops the accept loop and every connection: the receiver is down.
    listening: Mutex<Option<CancellationToken>>,
}

impl Receiver {
    /// Listening on 127.0.0.1 at a port of the OS's choosing, answering 200.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Status(200));
        let receiver = Self {
            addr,
            shared: Arc::new(Shared {
                received: Mutex::new(Vec::new()),
                mode,
            }),
            listening: Mutex::new(None),
        };
        receiver.serve(listener);
        Ok(receiver)
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
    }

    /// Closes the listener and every connection: connections are refused until `up`.
    pub fn down(&self) {
        if let Some(listening) = self.lock_listening().take() {
            listening.cancel();
        }
    }

    /// Listens again on the same port.
    pub async fn up(&self) -> anyhow::Result<()> {
        // The port was ours a moment ago; binding it again may take a few tries.
        let mut last = None;
        for _ in 0..50 {
            match bind(self.addr) {
                Ok(listener) => {
                    self.serve(listener);
                    return Ok(());
                }
                Err(error) => last = Some(error),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last.map_or_else(|| anyhow::anyhow!("cannot listen again"), Into::into))
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared
            .received
            .lock()
            .map(|received| received.clone())
            .unwrap_or_default()
    }

    /// The requests that came to `path`.
    pub fn received_at(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|request| request.path == path)
            .collect()
    }

    fn lock_listening(&self) -> std::sync::MutexGuard<'_, Option<CancellationToken>> {
        self.listening
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let stop = CancellationToken::new();
        if let Some(previous) = self.lock_listening().replace(stop.clone()) {
            previous.cancel();
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let stream = tokio::select! {
                    () = stop.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let shared = shared.clone();
                        async move { answer(&shared, request).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            // Down: the open connections go too, kept-alive ones included.
            connections.abort_all();
        });
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.down();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

async fn answer(
    shared: &Shared,
    request: hyper::Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let path = request.uri().path().to_owned();
    let headers = request
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                value.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let body = match request.into_body().collect().await {
        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    if let Ok(mut received) = shared.received.lock() {
        received.push(Received {
            path,
            headers,
            body,
        });
    }
    let mut mode = shared.mode.subscribe();
    let status = loop {
        match *mode.borrow_and_update() {
            Mode::Status(status) => break status,
            Mode::Hold => {}
        }
        if mode.changed().await.is_err() {
            break 503;
        }
    };
    let mut response = hyper::Response::new(Full::new(Bytes::from_static(b"{}")));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    Ok(response)
}

/// Checks `Wallet-Signature` as a receiver should: `t=<unix seconds>,v1=<hex HMAC-SHA256
/// of "<t>.<body>" keyed with the secret>`, and `t` within `tolerance` of now.
pub fn verify_signature(
    secret: &str,
    header: &str,
    body: &str,
    tolerance: Duration,
) -> Result<(), String> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp = value.parse::<i64>().ok(),
            Some(("v1", value)) => signatures.push(value.to_owned()),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or_else(|| format!("no t= in {header:?}"))?;
    let now = chrono::Utc::now().timestamp();
    if now.abs_diff(timestamp) > tolerance.as_secs() {
        return Err(format!("t={timestamp} is too far from now ({now})"));
    }
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .map_err(|error| error.to_string())?;
    mac.update(format!("{timestamp}.{body}").as_bytes());
    let expected = hex::encode(mac.finalize().into_bytes());
    if signatures.contains(&expected) {
        Ok(())
    } else {
        Err(format!("no v1= matches in {header:?}"))
    }
}

/// A webhook made through the API: its id and its secret.
pub struct Hook {
    pub id: Uuid,
    pub secret: String,
}

/// `POST /api/v1/webhooks`; fails unless 201.
pub async fn create(api: &ApiClient, url: &str, event_types: &[&str]) -> anyhow::Result<Hook> {
    let answer = api
        .post_raw(
            "/api/v1/webhooks",
            json!({"url": url, "eventTypes": event_types}).to_string(),
            &[],
        )
        .await?;
    anyhow::ensure!(
        answer.status == StatusCode::CREATED,
        "create webhook: {answer:?}"
    );
    Ok(Hook {
        id: answer.body["webhookId"]
            .as_str()
            .unwrap_or_default()
            .parse()?,
        secret: answer.body["secret"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    })
}

/// Every delivery of a webhook (`status` as the API takes it, or all), page by page.
pub async fn deliveries(
    api: &ApiClient,
    webhook: Uuid,
    status: Option<&str>,
    page: usize,
) -> anyhow::Result<Vec<Value>> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/api/v1/webhooks/{webhook}/deliveries?limit={page}");
        if let Some(status) = status {
            path.push_str(&format!("&status={status}"));
        }
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let answer = api.get(&path).await?;
        anyhow::ensure!(answer.status == StatusCode::OK, "deliveries: {answer:?}");
        items.extend(answer.body["items"].as_array().cloned().unwrap_or_default());
        match answer.body["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return Ok(items),
        }
    }
}

/// `POST /api/v1/webhooks/{id}/deliveries/{deliveryId}/retry`.
pub async fn retry(
    api: &ApiClient,
    webhook: Uuid,
    delivery: &str,
) -> anyhow::Result<crate::api::Answer> {
    api.post_raw(
        &format!("/api/v1/webhooks/{webhook}/deliveries/{delivery}/retry"),
        "",
        &[],
    )
    .await
}

/// `DELETE /api/v1/webhooks/{id}`.
pub async fn delete(api: &ApiClient, webhook: &str) -> anyhow::Result<crate::api::Answer> {
    ApiClient::answer(
        api.http
            .delete(api.url(&format!("/api/v1/webhooks/{webhook}")))
            .send()
            .await?,
    )
    .await
}

/// The ids of the tenant's events in the outbox, oldest first, with their type.
pub async fn outbox(pool: &sqlx::PgPool, tenant: &str) -> anyhow::Result<Vec<(Uuid, String)>> {
    use sqlx::Row;
    let rows = sqlx::query(
        "SELECT event_id, event_type FROM events WHERE tenant_id = $1 ORDER BY tx_id, ordinal",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("event_id")?, row.try_get("event_type")?)))
        .collect()
}
