//! Settings from the environment, each with a documented default (see README).

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;
use wallet_cluster::trust::{SecretSourceError, secret_from_env};

use crate::auth::{AuthConfig, KeySource, Tenant};
use crate::http::RateLimits;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} must be set")]
    Missing(&'static str),
    #[error("{name} has an invalid value {value:?}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error(transparent)]
    Secret(#[from] SecretSourceError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MembershipSource {
    Redis,
    Kubernetes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Limits of the three listeners.
#[derive(Clone, Copy, Debug)]
pub struct ListenerLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub public_connections: usize,
    pub internal_connections: usize,
    pub admin_connections: usize,
}

/// How callers of the public API are authenticated.
#[derive(Clone, Debug)]
pub enum AuthMode {
    /// Bearer JWTs, checked against the issuer's keys.
    Jwt(AuthConfig),
    /// No authentication: every caller acts for this tenant with every scope. For
    /// benchmarks of the authentication's cost only; the node warns at start.
    Off(Tenant),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub node_id: String,
    pub public_addr: SocketAddr,
    pub internal_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Internal `host:port` peers use; `None` means "the bound internal address".
    pub advertise_addr: Option<String>,
    pub database_url: SecretString,
    /// Connections of the API's reads and wallet creation.
    pub database_max_connections: u32,
    /// Connections of the executors' batch transactions and their planning reads.
    pub database_commit_connections: u32,
    /// Connections of fence claims, the health check and the schema check.
    pub database_control_connections: u32,
    /// Connections of the webhook workers' bookkeeping (fan-out, claims, outcomes).
    pub database_delivery_connections: u32,
    /// Client-side bound of one batch transaction; also the server's statement timeout.
    pub commit_timeout: std::time::Duration,
    /// Client-side bound of one read.
    pub read_timeout: std::time::Duration,
    /// A shard whose batch has been committing this long stops renewing its lease.
    pub commit_stall: std::time::Duration,
    /// Health checks failing for this long make the database unusable for the node.
    pub database_unusable_after: std::time::Duration,
    /// How often the owner expires due holds and posts PENDING transfers of its shards.
    pub sweep_interval: std::time::Duration,
    /// How long a transfer's answer waits for its credit before it says PENDING.
    pub transfer_credit_wait: std::time::Duration,
    pub events: EventsConfig,
    pub webhooks: WebhooksConfig,
    pub redis_url: SecretString,
    /// PEM CA bundle that a `rediss://` server's certificate must chain to (instead of
    /// the system's roots).
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// Signs and verifies internal requests and member entries.
    pub internal_secret: SecretString,
    /// Verifies only: the secret being rotated in or out.
    pub internal_secret_previous: Option<SecretString>,
    /// How far an internal request's timestamp may be from this node's clock.
    pub internal_replay_window: Duration,
    pub shards: u32,
    pub lease_ttl: Duration,
    pub heartbeat_ttl: Duration,
    pub request_deadline: Duration,
    pub batch_max: usize,
    /// Commands waiting in one shard's queue before more are refused as overloaded.
    pub shard_queue_max: usize,
    /// Wallets whose committed state the node caches, across all its shards.
    pub cache_wallets: usize,
    /// Transactions a node commits at once; each takes the batches of many shards.
    pub commit_lanes: usize,
    pub max_body_bytes: usize,
    pub auth: AuthMode,
    /// Per-tenant token buckets of this node, by scope class.
    pub rate_limits: RateLimits,
    pub listeners: ListenerLimits,
    /// The last bound on any request's handler.
    pub handler_timeout: std::time::Duration,
    pub redis_prefix: String,
    pub membership: MembershipSource,
    pub kubernetes_service: Option<String>,
    pub kubernetes_namespace: Option<String>,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
}

/// The outbox and what reads it.
#[derive(Clone, Debug)]
pub struct EventsConfig {
    /// Whether commits write events. Off, nothing is written (for measuring its cost).
    pub enabled: bool,
    /// How often each node looks for new events, for long polls, streams and its consumers.
    pub poll_interval: Duration,
    /// Delivered events older than this are deleted from the outbox.
    pub retention: Duration,
    /// How often a node tries to prune (one node at a time does it).
    pub prune_interval: Duration,
    /// Rows one pruning transaction deletes at most.
    pub prune_batch: usize,
    /// The JetStream sink; `None` without `WALLET_EVENTS_NATS_URL`.
    pub nats: Option<NatsConfig>,
}

/// Where and how the outbox is published to NATS JetStream.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// `nats://[user:password@]host:port[,...]`: may carry credentials.
    pub url: SecretString,
    /// Subjects are `<prefix>.<tenant>.<event type>`.
    pub subject_prefix: String,
    pub stream: String,
    /// JetStream drops a message whose `Nats-Msg-Id` it stored this recently.
    pub duplicate_window: Duration,
    /// Age limit of the stream's messages when this node creates it (zero: none).
    pub max_age: Duration,
    /// Replicas of the stream when this node creates it.
    pub replicas: usize,
    /// Events published per page: every one acknowledged before the position moves.
    pub batch: usize,
    /// Bound on one page's acknowledgements and on each JetStream API request.
    pub timeout: Duration,
}

/// Webhook deliveries (see `webhooks`).
#[derive(Clone, Debug)]
pub struct WebhooksConfig {
    /// Whether a webhook may point at (and deliveries may connect to) loopback, private,
    /// link-local, unique-local, multicast or unspecified addresses. Off in production:
    /// a tenant must not reach into the cluster's own network.
    pub allow_private: bool,
    /// The first retry waits up to this (full jitter), doubling per attempt...
    pub backoff_base: Duration,
    /// ...up to this.
    pub backoff_max: Duration,
    /// Retries stop this long after the delivery was created: then it is FAILED.
    pub retry_for: Duration,
    /// Bound on one attempt: connect, TLS, request and the (capped) response.
    pub timeout: Duration,
    /// Deliveries in flight at once on this node.
    pub max_in_flight: usize,
    /// A delivery is deleted once its last activity (delivery, last attempt or creation)
    /// is older than this, unless it is PENDING for a live webhook.
    pub retention: Duration,
    /// How often a node tries to prune deliveries (one node at a time does it).
    pub prune_interval: Duration,
}

impl WebhooksConfig {
    /// How long a claimed delivery is left to its node before another node may take it:
    /// longer than an attempt can last, with room to record its outcome.
    pub fn claim_lease(&self) -> Duration {
        self.timeout + Duration::from_secs(20)
    }
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup`, so tests can pass a map instead of the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &'static str| lookup(name).filter(|value| !value.trim().is_empty());
        // Secrets may also come from the file `<NAME>_FILE` names (a mounted Secret).
        let secret = |name: &'static str| secret_from_env(&lookup, name);
        let required = |name: &'static str| secret(name)?.ok_or(ConfigError::Missing(name));
        let membership = match get("WALLET_MEMBERSHIP").as_deref() {
            None | Some("redis") => MembershipSource::Redis,
            Some("kubernetes") => MembershipSource::Kubernetes,
            Some(other) => {
                return Err(invalid(
                    "WALLET_MEMBERSHIP",
                    other,
                    "expected redis or kubernetes",
                ));
            }
        };
        let log_format = match get("WALLET_LOG_FORMAT").as_deref() {
            None | Some("json") => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some(other) => {
                return Err(invalid(
                    "WALLET_LOG_FORMAT",
                    other,
                    "expected json or pretty",
                ));
            }
        };
        let node_id = get("WALLET_NODE_ID")
            .or_else(|| get("POD_NAME"))
            .or_else(|| get("HOSTNAME"))
            .unwrap_or_else(|| format!("node-{}", uuid::Uuid::new_v4().simple()));
        let shards: u32 = parse(&get, "WALLET_SHARDS", 1024)?;
        if shards == 0 {
            return Err(invalid("WALLET_SHARDS", "0", "must be at least 1"));
        }
        let batch_max: usize = parse(&get, "WALLET_BATCH_MAX", 512)?;
        let commit_lanes: usize = parse(&get, "WALLET_COMMIT_LANES", 1)?;
        if commit_lanes == 0 {
            return Err(invalid("WALLET_COMMIT_LANES", "0", "must be at least 1"));
        }
        if batch_max == 0 {
            return Err(invalid("WALLET_BATCH_MAX", "0", "must be at least 1"));
        }
        let lease_ttl = millis(&get, "WALLET_LEASE_TTL_MS", 5_000)?;
        let request_deadline = millis(&get, "WALLET_REQUEST_DEADLINE_MS", 10_000)?;
        let default_commit = (lease_ttl * 3 / 5).min(Duration::from_secs(2));
        let commit_timeout = millis(
            &get,
            "WALLET_COMMIT_TIMEOUT_MS",
            default_commit.as_millis() as u64,
        )?;
        if commit_timeout.is_zero() || commit_timeout >= lease_ttl {
            return Err(invalid(
                "WALLET_COMMIT_TIMEOUT_MS",
                &commit_timeout.as_millis().to_string(),
                "must be above 0 and below WALLET_LEASE_TTL_MS",
            ));
        }
        let default_stall = (lease_ttl / 2).min(Duration::from_millis(1_500));
        let commit_stall = millis(
            &get,
            "WALLET_COMMIT_STALL_MS",
            default_stall.as_millis() as u64,
        )?;
        // A write is answered (or given up on) by the router within its deadline plus
        // the resolution window; the handler timeout is only a last bound behind that.
        let write_bound = request_deadline + resolve_window(lease_ttl, commit_timeout);
        let handler_timeout = millis(
            &get,
            "WALLET_HANDLER_TIMEOUT_MS",
            (write_bound + Duration::from_secs(5)).as_millis() as u64,
        )?;
        if handler_timeout <= write_bound {
            return Err(invalid(
                "WALLET_HANDLER_TIMEOUT_MS",
                &handler_timeout.as_millis().to_string(),
                &format!(
                    "must be above the request deadline plus the resolution window ({} ms)",
                    write_bound.as_millis()
                ),
            ));
        }
        let internal_replay_window = millis(&get, "WALLET_INTERNAL_REPLAY_WINDOW_MS", 30_000)?;
        // Below a second, ordinary clock differences and queueing would refuse honest peers.
        if internal_replay_window < Duration::from_secs(1) {
            return Err(invalid(
                "WALLET_INTERNAL_REPLAY_WINDOW_MS",
                &internal_replay_window.as_millis().to_string(),
                "must be at least 1000",
            ));
        }
        let webhooks = WebhooksConfig {
            allow_private: parse(&get, "WALLET_WEBHOOK_ALLOW_PRIVATE", false)?,
            backoff_base: millis(&get, "WALLET_WEBHOOK_BACKOFF_BASE_MS", 1_000)?,
            backoff_max: millis(&get, "WALLET_WEBHOOK_BACKOFF_MAX_MS", 3_600_000)?,
            retry_for: millis(&get, "WALLET_WEBHOOK_RETRY_FOR_MS", 24 * 3_600_000)?,
            timeout: millis(&get, "WALLET_WEBHOOK_TIMEOUT_MS", 10_000)?,
            max_in_flight: parse(&get, "WALLET_WEBHOOK_MAX_IN_FLIGHT", 16)?,
            retention: millis(&get, "WALLET_WEBHOOK_RETENTION_MS", 7 * 24 * 3_600_000)?,
            prune_interval: millis(&get, "WALLET_WEBHOOK_PRUNE_INTERVAL_MS", 60_000)?,
        };
        for (name, value) in [
            ("WALLET_WEBHOOK_BACKOFF_BASE_MS", webhooks.backoff_base),
            ("WALLET_WEBHOOK_RETRY_FOR_MS", webhooks.retry_for),
            ("WALLET_WEBHOOK_TIMEOUT_MS", webhooks.timeout),
            ("WALLET_WEBHOOK_RETENTION_MS", webhooks.retention),
            ("WALLET_WEBHOOK_PRUNE_INTERVAL_MS", webhooks.prune_interval),
        ] {
            if value.is_zero() {
                return Err(invalid(name, "0", "must be above 0"));
            }
        }
        if webhooks.backoff_max < webhooks.backoff_base {
            return Err(invalid(
                "WALLET_WEBHOOK_BACKOFF_MAX_MS",
                &webhooks.backoff_max.as_millis().to_string(),
                "must be at least WALLET_WEBHOOK_BACKOFF_BASE_MS",
            ));
        }
        if !(1..=1024).contains(&webhooks.max_in_flight) {
            return Err(invalid(
                "WALLET_WEBHOOK_MAX_IN_FLIGHT",
                &webhooks.max_in_flight.to_string(),
                "must be 1 to 1024",
            ));
        }
        let listeners = ListenerLimits {
            // hyper also applies it to the wait for the next request on a kept-alive
            // connection: shorter than clients keep idle connections, it closes them as
            // they send, and a POST gets no answer.
            header_timeout: millis(&get, "WALLET_HEADER_TIMEOUT_MS", 30_000)?,
            body_timeout: millis(&get, "WALLET_BODY_TIMEOUT_MS", 10_000)?,
            idle_timeout: millis(&get, "WALLET_IDLE_TIMEOUT_MS", 60_000)?,
            public_connections: parse(&get, "WALLET_MAX_CONNECTIONS", 4_096)?,
            internal_connections: parse(&get, "WALLET_INTERNAL_MAX_CONNECTIONS", 1_024)?,
            admin_connections: 64,
        };
        Ok(Self {
            node_id,
            public_addr: parse(
                &get,
                "WALLET_PUBLIC_ADDR",
                SocketAddr::from(([0, 0, 0, 0], 8080)),
            )?,
            internal_addr: parse(
                &get,
                "WALLET_INTERNAL_ADDR",
                SocketAddr::from(([0, 0, 0, 0], 8090)),
            )?,
            admin_addr: parse(
                &get,
                "WALLET_ADMIN_ADDR",
                SocketAddr::from(([0, 0, 0, 0], 9090)),
            )?,
            advertise_addr: get("WALLET_ADVERTISE_ADDR"),
            database_url: required("DATABASE_URL")?,
            database_max_connections: parse(&get, "DATABASE_MAX_CONNECTIONS", 16)?,
            database_commit_connections: parse(&get, "DATABASE_COMMIT_CONNECTIONS", 8)?,
            database_control_connections: parse(&get, "DATABASE_CONTROL_CONNECTIONS", 4)?,
            database_delivery_connections: parse(&get, "DATABASE_DELIVERY_CONNECTIONS", 4)?,
            commit_timeout,
            read_timeout: millis(&get, "WALLET_READ_TIMEOUT_MS", 5_000)?,
            commit_stall,
            database_unusable_after: millis(&get, "WALLET_DB_UNUSABLE_AFTER_MS", 2_000)?,
            sweep_interval: millis(&get, "WALLET_SWEEP_INTERVAL_MS", 250)?,
            transfer_credit_wait: millis(&get, "WALLET_TRANSFER_CREDIT_WAIT_MS", 1_000)?,
            events: EventsConfig {
                enabled: parse(&get, "WALLET_EVENTS_ENABLED", true)?,
                poll_interval: millis(&get, "WALLET_EVENTS_POLL_MS", 100)?,
                retention: millis(&get, "WALLET_EVENTS_RETENTION_MS", 7 * 24 * 3_600_000)?,
                prune_interval: millis(&get, "WALLET_EVENTS_PRUNE_INTERVAL_MS", 60_000)?,
                prune_batch: at_least_one(&get, "WALLET_EVENTS_PRUNE_BATCH", 5_000)?,
                nats: nats_config(&get, &secret)?,
            },
            webhooks,
            redis_url: required("REDIS_URL")?,
            redis_ca_file: get("REDIS_CA_FILE").map(std::path::PathBuf::from),
            internal_secret: required("WALLET_INTERNAL_SECRET")?,
            internal_secret_previous: secret("WALLET_INTERNAL_SECRET_PREVIOUS")?,
            internal_replay_window,
            shards,
            lease_ttl,
            heartbeat_ttl: millis(&get, "WALLET_HEARTBEAT_TTL_MS", 5_000)?,
            request_deadline,
            batch_max,
            shard_queue_max: parse(&get, "WALLET_SHARD_QUEUE_MAX", 1_024)?,
            cache_wallets: parse(&get, "WALLET_CACHE_WALLETS", 500_000)?,
            commit_lanes,
            max_body_bytes: parse(&get, "WALLET_MAX_BODY_BYTES", 16 * 1024)?,
            auth: auth_mode(&get)?,
            rate_limits: RateLimits {
                read: rate(&get, "WALLET_RATE_LIMIT_READ", (20_000, 40_000))?,
                write: rate(&get, "WALLET_RATE_LIMIT_WRITE", (20_000, 40_000))?,
                create: rate(&get, "WALLET_RATE_LIMIT_CREATE", (2_000, 10_000))?,
            },
            listeners,
            handler_timeout,
            redis_prefix: get("WALLET_REDIS_PREFIX").unwrap_or_else(|| "wallet".to_owned()),
            membership,
            kubernetes_service: get("WALLET_K8S_SERVICE"),
            kubernetes_namespace: get("POD_NAMESPACE"),
            shutdown_grace: millis(&get, "WALLET_SHUTDOWN_GRACE_MS", 20_000)?,
            log_format,
            otlp_endpoint: get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            service_name: get("OTEL_SERVICE_NAME").unwrap_or_else(|| "wallet".to_owned()),
        })
    }
}

/// How long after its deadline a write that may have committed is still looked up: a
/// silent owner is replaced within about a lease TTL, its successor's claim waits for the
/// old transaction (another TTL at most), and the look-up is one more commit.
pub fn resolve_window(lease_ttl: Duration, commit_timeout: Duration) -> Duration {
    lease_ttl * 2 + commit_timeout
}

impl Config {
    pub fn resolve_window(&self) -> Duration {
        resolve_window(self.lease_ttl, self.commit_timeout)
    }
}

fn auth_mode(get: &impl Fn(&'static str) -> Option<String>) -> Result<AuthMode, ConfigError> {
    match get("WALLET_AUTH").as_deref() {
        None | Some("jwt") => {}
        Some("off") => {
            let tenant = get("WALLET_AUTH_OFF_TENANT").unwrap_or_else(|| "default".to_owned());
            return Tenant::parse(&tenant).map(AuthMode::Off).ok_or_else(|| {
                invalid(
                    "WALLET_AUTH_OFF_TENANT",
                    &tenant,
                    "1-64 letters, digits, '.', '_', '-'",
                )
            });
        }
        Some(other) => return Err(invalid("WALLET_AUTH", other, "expected jwt or off")),
    }
    let sources = [
        get("WALLET_AUTH_JWKS_FILE").map(|path| KeySource::File(path.into())),
        get("WALLET_AUTH_JWKS_URL").map(KeySource::Url),
        get("WALLET_AUTH_OIDC_ISSUER_URL").map(KeySource::Discovery),
    ];
    let mut given = sources.into_iter().flatten();
    let source = match (given.next(), given.next()) {
        (Some(source), None) => source,
        (None, _) => {
            return Err(ConfigError::Missing(
                "one of WALLET_AUTH_JWKS_FILE, WALLET_AUTH_JWKS_URL or WALLET_AUTH_OIDC_ISSUER_URL (or WALLET_AUTH=off)",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(invalid(
                "WALLET_AUTH_JWKS_FILE",
                "(several key sources)",
                "set only one of WALLET_AUTH_JWKS_FILE, WALLET_AUTH_JWKS_URL and WALLET_AUTH_OIDC_ISSUER_URL",
            ));
        }
    };
    let issuers: Vec<String> = match (get("WALLET_AUTH_ISSUER"), &source) {
        (Some(list), _) => list
            .split(',')
            .map(|issuer| issuer.trim().to_owned())
            .filter(|issuer| !issuer.is_empty())
            .collect(),
        // A discovered issuer is its own `iss`.
        (None, KeySource::Discovery(url)) => vec![url.clone()],
        (None, _) => return Err(ConfigError::Missing("WALLET_AUTH_ISSUER")),
    };
    Ok(AuthMode::Jwt(AuthConfig {
        source,
        issuers,
        audience: get("WALLET_AUTH_AUDIENCE").unwrap_or_else(|| "wallet".to_owned()),
        leeway: Duration::from_secs(parse(get, "WALLET_AUTH_LEEWAY_SECONDS", 30)?),
        tenant_claim: get("WALLET_AUTH_TENANT_CLAIM").unwrap_or_else(|| "tenant".to_owned()),
        cache_tokens: parse(get, "WALLET_AUTH_TOKEN_CACHE", 10_000)?,
        refresh_interval: millis(get, "WALLET_AUTH_REFRESH_INTERVAL_MS", 30_000)?,
        fetch_timeout: millis(get, "WALLET_AUTH_FETCH_TIMEOUT_MS", 5_000)?,
    }))
}

/// `rate/burst` in requests per second, e.g. `500/1000`; `0` turns the limit off.
fn rate(
    get: &impl Fn(&'static str) -> Option<String>,
    name: &'static str,
    default: (u32, u32),
) -> Result<Option<crate::http::Rate>, ConfigError> {
    let (per_second, burst) = match get(name) {
        None => default,
        Some(value) if value.trim() == "0" => return Ok(None),
        Some(value) => {
            let parsed = value.trim().split_once('/').and_then(|(rate, burst)| {
                Some((rate.trim().parse().ok()?, burst.trim().parse().ok()?))
            });
            match parsed {
                Some((rate, burst)) if rate > 0 && burst > 0 => (rate, burst),
                _ => {
                    return Err(invalid(
                        name,
                        &value,
                        "expected rate/burst in requests per second, e.g. 500/1000, or 0 for none",
                    ));
                }
            }
        }
    };
    Ok(crate::http::Rate::new(per_second, burst))
}

fn nats_config(
    get: &impl Fn(&'static str) -> Option<String>,
    secret: &impl Fn(&'static str) -> Result<Option<SecretString>, SecretSourceError>,
) -> Result<Option<NatsConfig>, ConfigError> {
    let Some(url) = secret("WALLET_EVENTS_NATS_URL")? else {
        return Ok(None);
    };
    let subject_prefix =
        get("WALLET_EVENTS_NATS_SUBJECT_PREFIX").unwrap_or_else(|| "wallet.events".to_owned());
    if !is_subject_prefix(&subject_prefix) {
        return Err(invalid(
            "WALLET_EVENTS_NATS_SUBJECT_PREFIX",
            &subject_prefix,
            "dot-separated tokens of letters, digits, '_', '-' and '~' (no wildcards, no '$' first)",
        ));
    }
    let stream = get("WALLET_EVENTS_NATS_STREAM").unwrap_or_else(|| "WALLET_EVENTS".to_owned());
    if stream.is_empty()
        || !stream
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(invalid(
            "WALLET_EVENTS_NATS_STREAM",
            &stream,
            "letters, digits, '_' and '-' only",
        ));
    }
    let duplicate_window = millis(get, "WALLET_EVENTS_NATS_DUPLICATE_WINDOW_MS", 120_000)?;
    if duplicate_window < Duration::from_secs(1) {
        return Err(invalid(
            "WALLET_EVENTS_NATS_DUPLICATE_WINDOW_MS",
            &duplicate_window.as_millis().to_string(),
            "must be at least 1000",
        ));
    }
    let timeout = millis(get, "WALLET_EVENTS_NATS_TIMEOUT_MS", 5_000)?;
    if timeout.is_zero() {
        return Err(invalid(
            "WALLET_EVENTS_NATS_TIMEOUT_MS",
            "0",
            "must be above 0",
        ));
    }
    Ok(Some(NatsConfig {
        url,
        subject_prefix,
        stream,
        duplicate_window,
        max_age: millis(get, "WALLET_EVENTS_NATS_MAX_AGE_MS", 7 * 24 * 3_600_000)?,
        replicas: at_least_one(get, "WALLET_EVENTS_NATS_REPLICAS", 1)?,
        batch: at_least_one(get, "WALLET_EVENTS_NATS_BATCH", 256)?,
        timeout,
    }))
}

/// Literal subject tokens the sink can put in front of `<tenant>.<event type>`.
fn is_subject_prefix(prefix: &str) -> bool {
    !prefix.starts_with('$')
        && prefix.split('.').all(|token| {
            !token.is_empty()
                && token
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '~'))
        })
}

fn at_least_one(
    get: &impl Fn(&'static str) -> Option<String>,
    name: &'static str,
    default: usize,
) -> Result<usize, ConfigError> {
    let value: usize = parse(get, name, default)?;
    if value == 0 {
        return Err(invalid(name, "0", "must be at least 1"));
    }
    Ok(value)
}

fn invalid(name: &'static str, value: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        name,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

fn parse<T>(
    get: &impl Fn(&'static str) -> Option<String>,
    name: &'static str,
    default: T,
) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    match get(name) {
        None => Ok(default),
        Some(value) => value
            .trim()
            .parse()
            .map_err(|error: T::Err| invalid(name, &value, &error.to_string())),
    }
}

fn millis(
    get: &impl Fn(&'static str) -> Option<String>,
    name: &'static str,
    default: u64,
) -> Result<Duration, ConfigError> {
    parse(get, name, default).map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    const REQUIRED: [(&str, &str); 5] = [
        ("DATABASE_URL", "postgres://localhost/wallet"),
        ("REDIS_URL", "redis://localhost"),
        ("WALLET_INTERNAL_SECRET", "s3cret"),
        ("WALLET_AUTH_JWKS_FILE", "/keys/jwks.json"),
        ("WALLET_AUTH_ISSUER", "https://issuer.example"),
    ];

    #[test]
    fn defaults_apply_when_only_the_secrets_are_set() {
        let config = config(&REQUIRED).expect("valid config");
        assert_eq!(config.public_addr.port(), 8080);
        assert_eq!(config.internal_addr.port(), 8090);
        assert_eq!(config.admin_addr.port(), 9090);
        assert_eq!(config.shards, 1024);
        assert_eq!(config.request_deadline, Duration::from_secs(10));
        assert_eq!(config.membership, MembershipSource::Redis);
        assert!(config.internal_secret_previous.is_none());
        assert_eq!(config.internal_replay_window, Duration::from_secs(30));
    }

    /// A file of its own under the system's temp directory, removed on drop.
    struct SecretFile(std::path::PathBuf);

    impl SecretFile {
        fn new(contents: &str) -> Self {
            let path = std::env::temp_dir().join(format!("wallet-config-{}", uuid::Uuid::new_v4()));
            std::fs::write(&path, contents).expect("write secret file");
            Self(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().expect("utf-8 path")
        }
    }

    impl Drop for SecretFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn every_secret_can_come_from_a_file_without_its_trailing_newline() {
        use secrecy::ExposeSecret;
        let files: Vec<(&str, SecretFile)> = [
            ("DATABASE_URL_FILE", "postgres://u:pw-from-file@db/wallet\n"),
            ("REDIS_URL_FILE", "redis://:pw-from-file@redis\n"),
            ("WALLET_INTERNAL_SECRET_FILE", "current-from-file\n"),
            (
                "WALLET_INTERNAL_SECRET_PREVIOUS_FILE",
                "previous-from-file\r\n",
            ),
        ]
        .into_iter()
        .map(|(name, contents)| (name, SecretFile::new(contents)))
        .collect();
        let mut pairs: Vec<(&str, &str)> = files
            .iter()
            .map(|(name, file)| (*name, file.path()))
            .collect();
        pairs.extend_from_slice(&REQUIRED[3..]);
        let loaded = config(&pairs).expect("config from files");
        assert_eq!(
            loaded.database_url.expose_secret(),
            "postgres://u:pw-from-file@db/wallet"
        );
        assert_eq!(
            loaded.redis_url.expose_secret(),
            "redis://:pw-from-file@redis"
        );
        assert_eq!(loaded.internal_secret.expose_secret(), "current-from-file");
        assert_eq!(
            loaded
                .internal_secret_previous
                .as_ref()
                .map(|s| s.expose_secret().to_owned())
                .as_deref(),
            Some("previous-from-file")
        );

        // The variable and its file together is an error, naming the variable.
        let mut both = REQUIRED.to_vec();
        both.push(("WALLET_INTERNAL_SECRET_FILE", files[2].1.path()));
        let error = config(&both).expect_err("both set");
        assert_eq!(
            error.to_string(),
            "set either WALLET_INTERNAL_SECRET or WALLET_INTERNAL_SECRET_FILE, not both"
        );
        // A file that cannot be read is named, and its contents are not.
        let mut missing: Vec<(&str, &str)> = REQUIRED
            .iter()
            .copied()
            .filter(|(name, _)| *name != "WALLET_INTERNAL_SECRET")
            .collect();
        missing.push(("WALLET_INTERNAL_SECRET_FILE", "/nonexistent/wallet-secret"));
        let error = config(&missing).expect_err("unreadable file");
        assert!(
            error
                .to_string()
                .starts_with("WALLET_INTERNAL_SECRET_FILE names /nonexistent/wallet-secret"),
            "{error}"
        );
    }

    #[test]
    fn the_config_formats_without_any_secret() {
        let mut pairs = vec![
            ("DATABASE_URL", "postgres://wallet:db-password-1@db/wallet"),
            ("REDIS_URL", "redis://:redis-password-2@redis:6379"),
            ("WALLET_INTERNAL_SECRET", "internal-secret-3"),
            ("WALLET_INTERNAL_SECRET_PREVIOUS", "previous-secret-4"),
            (
                "WALLET_EVENTS_NATS_URL",
                "nats://sink:nats-password-5@nats:4222",
            ),
        ];
        pairs.push(("WALLET_NODE_ID", "node-0"));
        pairs.extend_from_slice(&REQUIRED[3..]);
        let config = config(&pairs).expect("valid config");
        let formatted = [format!("{config:?}"), format!("{config:#?}")];
        for text in &formatted {
            for secret in [
                "db-password-1",
                "redis-password-2",
                "internal-secret-3",
                "previous-secret-4",
                "nats-password-5",
            ] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
            assert!(text.contains("node-0"), "the rest is still there: {text}");
        }
    }

    #[test]
    fn a_missing_secret_or_a_bad_number_is_named() {
        let error = config(&[REQUIRED[0], REQUIRED[1], REQUIRED[3], REQUIRED[4]])
            .expect_err("secret missing");
        assert_eq!(error.to_string(), "WALLET_INTERNAL_SECRET must be set");
        let mut pairs = REQUIRED.to_vec();
        pairs.push(("WALLET_SHARDS", "many"));
        let error = config(&pairs).expect_err("bad number");
        assert!(
            error
                .to_string()
                .starts_with("WALLET_SHARDS has an invalid value \"many\""),
            "{error}"
        );
        let mut pairs = REQUIRED.to_vec();
        pairs.push(("WALLET_INTERNAL_REPLAY_WINDOW_MS", "10"));
        let error = config(&pairs).expect_err("window too short");
        assert!(
            error
                .to_string()
                .starts_with("WALLET_INTERNAL_REPLAY_WINDOW_MS has an invalid value"),
            "{error}"
        );
    }

    #[test]
    fn authentication_needs_one_key_source_and_an_issuer() {
        let without = |names: &[&str]| {
            let pairs: Vec<(&str, &str)> = REQUIRED
                .iter()
                .copied()
                .filter(|(name, _)| !names.contains(name))
                .collect();
            config(&pairs)
        };
        let error = without(&["WALLET_AUTH_JWKS_FILE"]).expect_err("no key source");
        assert!(
            error.to_string().contains("WALLET_AUTH_JWKS_FILE"),
            "{error}"
        );
        let error = without(&["WALLET_AUTH_ISSUER"]).expect_err("no issuer");
        assert_eq!(error.to_string(), "WALLET_AUTH_ISSUER must be set");
        let mut pairs = REQUIRED.to_vec();
        pairs.push(("WALLET_AUTH_JWKS_URL", "http://keys"));
        assert!(config(&pairs).is_err(), "two key sources");
        let mut pairs = REQUIRED[..3].to_vec();
        pairs.push(("WALLET_AUTH", "off"));
        let config = config(&pairs).expect("off needs no keys");
        assert!(matches!(config.auth, AuthMode::Off(tenant) if tenant.as_str() == "default"));
    }

    #[test]
    fn webhook_settings_default_and_refuse_nonsense() {
        let webhooks = config(&REQUIRED).expect("valid").webhooks;
        assert!(
            !webhooks.allow_private,
            "private targets are refused by default"
        );
        assert_eq!(webhooks.backoff_base, Duration::from_secs(1));
        assert_eq!(webhooks.backoff_max, Duration::from_secs(3600));
        assert_eq!(webhooks.retry_for, Duration::from_secs(24 * 3600));
        assert_eq!(webhooks.timeout, Duration::from_secs(10));
        assert!(webhooks.claim_lease() > webhooks.timeout);
        assert_eq!(webhooks.retention, Duration::from_secs(7 * 24 * 3_600));
        assert_eq!(webhooks.prune_interval, Duration::from_secs(60));
        for bad in [
            ("WALLET_WEBHOOK_TIMEOUT_MS", "0"),
            ("WALLET_WEBHOOK_RETENTION_MS", "0"),
            ("WALLET_WEBHOOK_PRUNE_INTERVAL_MS", "0"),
            ("WALLET_WEBHOOK_BACKOFF_MAX_MS", "10"),
            ("WALLET_WEBHOOK_MAX_IN_FLIGHT", "0"),
            ("WALLET_WEBHOOK_MAX_IN_FLIGHT", "100000"),
            ("WALLET_WEBHOOK_ALLOW_PRIVATE", "yes"),
        ] {
            let mut pairs = REQUIRED.to_vec();
            pairs.push(bad);
            let error = config(&pairs).expect_err(bad.0);
            assert!(error.to_string().starts_with(bad.0), "{error}");
        }
    }

    #[test]
    fn the_nats_sink_is_off_without_a_url_and_checks_its_names() {
        let events = config(&REQUIRED).expect("valid").events;
        assert!(events.nats.is_none());
        assert_eq!(events.retention, Duration::from_secs(7 * 24 * 3_600));
        assert_eq!(events.prune_interval, Duration::from_secs(60));
        let mut pairs = REQUIRED.to_vec();
        pairs.push(("WALLET_EVENTS_NATS_URL", "nats://127.0.0.1:54222"));
        let nats = config(&pairs).expect("valid").events.nats.expect("on");
        assert_eq!(nats.subject_prefix, "wallet.events");
        assert_eq!(nats.stream, "WALLET_EVENTS");
        assert_eq!(nats.duplicate_window, Duration::from_secs(120));
        for (name, value) in [
            ("WALLET_EVENTS_NATS_SUBJECT_PREFIX", "wallet.>"),
            ("WALLET_EVENTS_NATS_SUBJECT_PREFIX", "wallet..events"),
            ("WALLET_EVENTS_NATS_SUBJECT_PREFIX", "$JS.events"),
            ("WALLET_EVENTS_NATS_STREAM", "wallet.events"),
            ("WALLET_EVENTS_NATS_DUPLICATE_WINDOW_MS", "10"),
            ("WALLET_EVENTS_NATS_BATCH", "0"),
        ] {
            let mut bad = pairs.clone();
            bad.push((name, value));
            let error = config(&bad).expect_err(value);
            assert!(error.to_string().starts_with(name), "{error}");
        }
    }

    #[test]
    fn rate_limits_are_rate_and_burst_or_off() {
        let mut pairs = REQUIRED.to_vec();
        pairs.push(("WALLET_RATE_LIMIT_WRITE", "50/100"));
        pairs.push(("WALLET_RATE_LIMIT_READ", "0"));
        let limits = config(&pairs).expect("valid").rate_limits;
        assert!(limits.read.is_none());
        assert!(limits.write.is_some());
        pairs.push(("WALLET_RATE_LIMIT_CREATE", "fast"));
        assert!(config(&pairs).is_err());
    }
}
