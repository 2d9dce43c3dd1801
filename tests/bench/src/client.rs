//! A lean HTTP/1.1 client: one keep-alive connection per worker, driven by hyper's
//! low-level connection API, so a request costs a header map and a `Bytes` clone.

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid target url {0:?} (expected http://host:port)")]
    BadUrl(String),
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connect to {0}: timed out")]
    ConnectTimeout(String),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] http::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("idempotency key is not a valid header value")]
    BadKey,
}

const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

impl ClientError {
    /// True when no byte of the request left this process: the server cannot
    /// have acted on it, so it may be sent elsewhere and is not "unknown".
    pub fn never_sent(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. }
                | ClientError::ConnectTimeout(_)
                | ClientError::BadUrl(_)
                | ClientError::BadKey
        )
    }
}

/// A base URL such as `http://127.0.0.1:8080`.
#[derive(Debug, Clone)]
pub struct Target {
    pub base: String,
    pub addr: String,
    host: HeaderValue,
    /// `Bearer <token>` sent with every request, when the API needs one.
    authorization: Option<HeaderValue>,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self, ClientError> {
        let bad = || ClientError::BadUrl(url.to_owned());
        let rest = url.trim().strip_prefix("http://").ok_or_else(bad)?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(bad());
        }
        let addr = if authority.contains(':') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let host = HeaderValue::from_str(authority).map_err(|_| bad())?;
        Ok(Self {
            base: format!("http://{authority}"),
            addr,
            host,
            authorization: None,
        })
    }

    pub fn authorization(&self) -> Option<&str> {
        self.authorization
            .as_ref()
            .and_then(|value| value.to_str().ok())
    }

    /// The same target, sending `token` as the bearer token.
    pub fn with_token(mut self, token: &str) -> Result<Self, ClientError> {
        let value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| ClientError::BadUrl("(token is not a header value)".to_owned()))?;
        self.authorization = Some(value);
        Ok(self)
    }
}

pub const OPERATION_PATH: &str = "/api/v1/wallet";
pub const WALLETS_PATH: &str = "/api/v1/wallets";

pub struct Conn {
    target: Arc<Target>,
    sender: Option<SendRequest<Full<Bytes>>>,
    pub connects: u64,
}

impl Conn {
    pub fn new(target: Arc<Target>) -> Self {
        Self {
            target,
            sender: None,
            connects: 0,
        }
    }

    /// Points the connection at another target (closing the current one).
    pub fn retarget(&mut self, target: Arc<Target>) {
        self.target = target;
        self.sender = None;
    }

    async fn connect(&mut self) -> Result<(), ClientError> {
        let addr = &self.target.addr;
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(ClientError::Connect {
                    addr: addr.clone(),
                    source,
                });
            }
            Err(_) => return Err(ClientError::ConnectTimeout(addr.clone())),
        };
        stream
            .set_nodelay(true)
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let (sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
        {
            Ok(pair) => pair,
            Err(e) => return Err(ClientError::Http(e)),
        };
        // The connection task ends by itself when either side closes.
        tokio::spawn(conn);
        self.sender = Some(sender);
        self.connects += 1;
        Ok(())
    }

    /// A sender that is ready for the next request, reconnecting when the old
    /// connection was closed (idle timeout, server restart): that is not an error.
    async fn ready(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, ClientError> {
        let reusable = match self.sender.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            self.sender = None;
            self.connect().await?;
        }
        match self.sender.as_mut() {
            Some(s) => Ok(s),
            // connect() either set the sender or returned an error.
            None => Err(ClientError::ConnectTimeout(self.target.addr.clone())),
        }
    }

    pub async fn send(
        &mut self,
        method: Method,
        uri: Uri,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(u16, Bytes), ClientError> {
        self.send_keyed(method, uri, body, None, timeout).await
    }

    async fn send_keyed(
        &mut self,
        method: Method,
        uri: Uri,
        body: Bytes,
        idempotency_key: Option<HeaderValue>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), ClientError> {
        let host = self.target.host.clone();
        let authorization = self.target.authorization.clone();
        let fut = async {
            let sender = self.ready().await?;
            let mut builder = Request::builder()
                .method(method)
                .uri(uri)
                .header(header::HOST, host);
            if let Some(authorization) = authorization {
                builder = builder.header(header::AUTHORIZATION, authorization);
            }
            if let Some(key) = idempotency_key {
                builder = builder.header(IDEMPOTENCY_KEY, key);
            }
            if !body.is_empty() {
                builder = builder.header(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            let req = builder.body(Full::new(body))?;
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok::<_, ClientError>((status, bytes))
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            Err(_) => {
                // The connection is in an unknown state mid-response: drop it.
                self.sender = None;
                Err(ClientError::Timeout(timeout))
            }
        }
    }

    /// POSTs an operation, with an `Idempotency-Key` header when `key` is given
    /// (a retry with the same key gets the first answer instead of a second operation).
    pub async fn post_operation(
        &mut self,
        body: Bytes,
        key: Option<&str>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), ClientError> {
        let key = match key.map(HeaderValue::from_str) {
            None => None,
            Some(Ok(v)) => Some(v),
            Some(Err(_)) => return Err(ClientError::BadKey),
        };
        self.send_keyed(
            Method::POST,
            Uri::from_static(OPERATION_PATH),
            body,
            key,
            timeout,
        )
        .await
    }

    pub async fn get(
        &mut self,
        path: &str,
        timeout: Duration,
    ) -> Result<(u16, Bytes), ClientError> {
        let uri = Uri::try_from(path).map_err(|e| ClientError::Request(e.into()))?;
        self.send(Method::GET, uri, Bytes::new(), timeout).await
    }
}

/// Finds `"<field>":"<text>"` in a JSON body and returns the text (no escapes in it):
/// the status of a transfer or hold answer, read without parsing the document.
pub fn extract_str<'a>(body: &'a [u8], field: &str) -> Option<&'a str> {
    let mut pat = Vec::with_capacity(field.len() + 4);
    pat.push(b'"');
    pat.extend_from_slice(field.as_bytes());
    pat.extend_from_slice(b"\":");
    let at = memchr::memmem::find(body, &pat)? + pat.len();
    let rest = &body[at..];
    let start = rest.iter().position(|&b| b != b' ')?;
    let rest = rest[start..].strip_prefix(b"\"")?;
    let end = memchr::memchr2(b'"', b'\\', rest)?;
    if rest[end] != b'"' {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok()
}

/// Finds `"<field>":"<uuid>"` in a JSON body without parsing the whole document:
/// the hot path reads one id per response.
pub fn extract_uuid(body: &[u8], field: &str) -> Option<uuid::Uuid> {
    let mut pat = Vec::with_capacity(field.len() + 4);
    pat.push(b'"');
    pat.extend_from_slice(field.as_bytes());
    pat.extend_from_slice(b"\":");
    let at = memchr::memmem::find(body, &pat)? + pat.len();
    let rest = &body[at..];
    let start = rest.iter().position(|&b| b != b' ')?;
    let rest = &rest[start..];
    if rest.first() != Some(&b'"') || rest.len() < 38 {
        return None;
    }
    uuid::Uuid::try_parse_ascii(&rest[1..37]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_base_urls() {
        let t = Target::parse("http://127.0.0.1:8080/").expect("target");
        assert_eq!(t.addr, "127.0.0.1:8080");
        assert_eq!(t.base, "http://127.0.0.1:8080");
        assert_eq!(
            Target::parse("http://localhost").expect("target").addr,
            "localhost:80"
        );
        assert!(Target::parse("https://x:1").is_err());
        assert!(Target::parse("http://x:1/api").is_err());
        assert!(Target::parse("http://").is_err());
    }

    #[test]
    fn extracts_ids_from_json_bodies() {
        let id = uuid::Uuid::from_u128(0x1234);
        let body = format!(
            r#"{{"operationId":"{id}","walletId":"{}","status":"APPLIED"}}"#,
            uuid::Uuid::nil()
        );
        assert_eq!(extract_uuid(body.as_bytes(), "operationId"), Some(id));
        assert_eq!(
            extract_uuid(body.as_bytes(), "walletId"),
            Some(uuid::Uuid::nil())
        );
        let spaced = format!(r#"{{ "operationId": "{id}" }}"#);
        assert_eq!(extract_uuid(spaced.as_bytes(), "operationId"), Some(id));
        assert_eq!(
            extract_uuid(br#"{"operationId":null}"#, "operationId"),
            None
        );
        assert_eq!(
            extract_uuid(br#"{"operationId":"nope"}"#, "operationId"),
            None
        );
        assert_eq!(extract_uuid(b"", "operationId"), None);
    }

    #[test]
    fn extracts_strings_from_json_bodies() {
        let body = br#"{"transferId":"x","status":"POSTED","amount":"1.00"}"#;
        assert_eq!(extract_str(body, "status"), Some("POSTED"));
        assert_eq!(extract_str(body, "amount"), Some("1.00"));
        assert_eq!(
            extract_str(br#"{ "status": "PENDING" }"#, "status"),
            Some("PENDING")
        );
        assert_eq!(extract_str(br#"{"status":null}"#, "status"), None);
        assert_eq!(extract_str(br#"{"status":"a\"b"}"#, "status"), None);
        assert_eq!(extract_str(b"", "status"), None);
    }
}
