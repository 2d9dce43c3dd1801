//! One attempt at one delivery: a signed POST, bounded in every way a receiver could
//! abuse.
//!
//! hyper's client over rustls (ring), as kube's client is, rather than reqwest: the
//! workspace's reqwest carries no TLS (its forwarding is plain HTTP), and giving it rustls
//! would make every reqwest client in the process need a crypto provider installed
//! first. hyper follows no redirects (a 3xx is a failed attempt), uses no proxy from the
//! environment, and connects only to what [`GuardedResolver`] lets through.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, USER_AGENT};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::ClaimedDelivery;
use super::target::{self, GuardedResolver};

/// The most of a response body that is read (and kept, for the error of a non-2xx).
const RESPONSE_LIMIT: usize = 1024;
/// The most of a receiver's answer kept in `last_error`.
const ERROR_LIMIT: usize = 300;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// How an attempt ended.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// A 2xx answer.
    pub delivered: bool,
    pub status_code: Option<u16>,
    /// What went wrong, for `last_error`; none when delivered.
    pub error: Option<String>,
    pub elapsed: Duration,
}

type HttpsClient = Client<HttpsConnector<HttpConnector<GuardedResolver>>, Full<Bytes>>;

/// The node's one delivery client (connections are pooled per host).
#[derive(Clone)]
pub struct Sender {
    client: HttpsClient,
    allow_private: bool,
    timeout: Duration,
}

impl Sender {
    pub fn new(allow_private: bool, timeout: Duration) -> Result<Self, SenderError> {
        let mut http = HttpConnector::new_with_resolver(GuardedResolver { allow_private });
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT.min(timeout)));
        http.set_nodelay(true);
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let https = match hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider.clone())
        {
            Ok(builder) => builder,
            Err(error) => {
                // http:// URLs still work; https:// ones fail their attempts, saying why.
                tracing::warn!(error = %error, "no CA certificates found: webhook deliveries over https will fail");
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                    rustls::ClientConfig::builder_with_provider(provider)
                        .with_safe_default_protocol_versions()?
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth(),
                )
            }
        }
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4)
            // A receiver's headers are bounded too (hyper's minimum is 8 KiB).
            .http1_max_buf_size(64 * 1024)
            .build(https);
        Ok(Self {
            client,
            allow_private,
            timeout,
        })
    }

    /// POSTs the delivery's event, signed now, and reports how it went. Never fails:
    /// every way an attempt can go wrong is an outcome to record.
    pub async fn send(&self, delivery: &ClaimedDelivery) -> Attempt {
        let started = Instant::now();
        let (delivered, status_code, error) = match self.try_send(delivery).await {
            Ok((status, _)) if status.is_success() => (true, Some(status.as_u16()), None),
            Ok((status, body)) => {
                let mut error = format!("HTTP {status}");
                if status.is_redirection() {
                    error.push_str(" (redirects are not followed)");
                }
                let text = String::from_utf8_lossy(&body);
                let text: String = text
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                let text = text.trim();
                if !text.is_empty() {
                    error.push_str(": ");
                    error.push_str(text);
                }
                (false, Some(status.as_u16()), Some(error))
            }
            Err(error) => (false, None, Some(error)),
        };
        Attempt {
            delivered,
            status_code,
            error: error.map(|error| truncate(error, ERROR_LIMIT)),
            elapsed: started.elapsed(),
        }
    }

    async fn try_send(
        &self,
        delivery: &ClaimedDelivery,
    ) -> Result<(http::StatusCode, Vec<u8>), String> {
        let url = target::parse(&delivery.url).map_err(|error| error.to_string())?;
        // IP literals never reach the resolver: checked here (a webhook created while
        // private targets were allowed, delivered after they no longer are).
        let literal = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
            _ => None,
        };
        if let Some(ip) = literal.filter(|ip| !self.allow_private && target::is_forbidden(*ip)) {
            return Err(format!("refused: {ip} is not a public address"));
        }
        let uri: http::Uri = url
            .as_str()
            .parse()
            .map_err(|error| format!("url: {error}"))?;
        let timestamp = chrono::Utc::now().timestamp();
        let request = http::Request::post(uri)
            .header(CONTENT_TYPE, "application/json")
            .header(
                USER_AGENT,
                concat!("wallet-webhooks/", env!("CARGO_PKG_VERSION")),
            )
            .header("wallet-event-id", delivery.event_id.to_string())
            .header("wallet-event-type", delivery.event_type.as_str())
            .header("wallet-delivery-id", delivery.id.to_string())
            .header(
                "wallet-signature",
                super::signature(&delivery.secret, timestamp, &delivery.body),
            )
            .body(Full::new(Bytes::from(delivery.body.clone())))
            .map_err(|error| format!("request: {error}"))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| crate::error_chain(&error))?;
            let status = response.status();
            // Only the first bytes: the status decides; a huge or endless body is not read.
            let mut body = response.into_body();
            let mut kept = Vec::new();
            while kept.len() < RESPONSE_LIMIT {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            let room = RESPONSE_LIMIT - kept.len();
                            kept.extend_from_slice(&data[..data.len().min(room)]);
                        }
                    }
                    // The answer's status already arrived; a broken body changes nothing.
                    Some(Err(_)) | None => break,
                }
            }
            Ok((status, kept))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        }
    }
}

fn truncate(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_errors_are_cut_at_a_character_boundary() {
        assert_eq!(truncate("short".to_owned(), 10), "short");
        let cut = truncate("é".repeat(200), 301);
        assert!(cut.ends_with('…') && cut.len() <= 304, "{cut}");
    }
}
