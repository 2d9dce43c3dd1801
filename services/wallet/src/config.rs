//! Settings from the environment, each with a documented default (see README).

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

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
    /// Client-side bound of one batch transaction; also the server's statement timeout.
    pub commit_timeout: std::time::Duration,
    /// Client-side bound of one read.
    pub read_timeout: std::time::Duration,
    /// A shard whose batch has been committing this long stops renewing its lease.
    pub commit_stall: std::time::Duration,
    /// Health checks failing for this long make the database unusable for the node.
    pub database_unusable_after: std::time::Duration,
    pub redis_url: SecretString,
    pub internal_secret: SecretString,
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

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup`, so tests can pass a map instead of the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &'static str| lookup(name).filter(|value| !value.trim().is_empty());
        let required = |name: &'static str| get(name).ok_or(ConfigError::Missing(name));
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
        let listeners = ListenerLimits {
            header_timeout: millis(&get, "WALLET_HEADER_TIMEOUT_MS", 5_000)?,
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
            database_url: SecretString::from(required("DATABASE_URL")?),
            database_max_connections: parse(&get, "DATABASE_MAX_CONNECTIONS", 16)?,
            database_commit_connections: parse(&get, "DATABASE_COMMIT_CONNECTIONS", 8)?,
            database_control_connections: parse(&get, "DATABASE_CONTROL_CONNECTIONS", 4)?,
            commit_timeout,
            read_timeout: millis(&get, "WALLET_READ_TIMEOUT_MS", 5_000)?,
            commit_stall,
            database_unusable_after: millis(&get, "WALLET_DB_UNUSABLE_AFTER_MS", 2_000)?,
            redis_url: SecretString::from(required("REDIS_URL")?),
            internal_secret: SecretString::from(required("WALLET_INTERNAL_SECRET")?),
            shards,
            lease_ttl,
            heartbeat_ttl: millis(&get, "WALLET_HEARTBEAT_TTL_MS", 5_000)?,
            request_deadline,
            batch_max,
            shard_queue_max: parse(&get, "WALLET_SHARD_QUEUE_MAX", 1_024)?,
            cache_wallets: parse(&get, "WALLET_CACHE_WALLETS", 500_000)?,
            commit_lanes,
            max_body_bytes: parse(&get, "WALLET_MAX_BODY_BYTES", 16 * 1024)?,
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

    const REQUIRED: [(&str, &str); 3] = [
        ("DATABASE_URL", "postgres://localhost/wallet"),
        ("REDIS_URL", "redis://localhost"),
        ("WALLET_INTERNAL_SECRET", "s3cret"),
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
    }

    #[test]
    fn a_missing_secret_or_a_bad_number_is_named() {
        let error = config(&REQUIRED[..2]).expect_err("secret missing");
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
    }
}
