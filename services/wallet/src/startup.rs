//! `Application::build(config)` binds every listener and starts the cluster layer;
//! `run_until_stopped()` serves until SIGTERM/Ctrl-C (or `shutdown_token()` fires)
//! and then hands the shards over before returning.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus::Registry;
use salvo::conn::tcp::TcpAcceptor;
use salvo::prelude::*;
use salvo::server::ServerHandle;
use secrecy::ExposeSecret;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wallet_cluster::{
    Cluster, ClusterConfig, ClusterMetrics, EndpointSliceMembership, Membership, RedisMembership,
    SigningKeys,
};

use crate::auth::{Authenticator, Principal};
use crate::config::{AuthMode, Config, ListenerLimits, MembershipSource};
use crate::error_chain;
use crate::events::{EventTail, EventsMetrics, NatsSink, PruneSettings};
use crate::executor::{ExecutorMetrics, ExecutorPool, ExecutorSettings};
use crate::health;
use crate::http::{self, AppState, Authentication, HttpMetrics, RateLimiters};
use crate::internal_auth::Verifier;
use crate::routing::{ForwardTimeouts, Forwarder, OperationRouter, RoutingMetrics};
use crate::store::{Pools, Store, Timeouts};
use salvo::fuse::FuseConfig;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("could not bind the {what} listener on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("could not load the token signing keys")]
    Keys(#[from] crate::auth::KeysError),
    #[error("TLS to {what} failed: {detail}")]
    Tls { what: &'static str, detail: String },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Authentication as configured; the keys are loaded now, so a wrong source fails the
/// start instead of every request.
async fn authentication(config: &Config) -> Result<Authentication, StartupError> {
    Ok(match &config.auth {
        AuthMode::Jwt(auth) => Authentication::Jwt(Authenticator::new(auth).await?),
        AuthMode::Off(tenant) => {
            tracing::warn!(
                tenant = %tenant,
                "AUTHENTICATION IS OFF (WALLET_AUTH=off): anyone who reaches the public port acts for this tenant with every scope"
            );
            Authentication::Off(Principal::unauthenticated(tenant.clone()))
        }
    })
}

pub struct Application {
    public: tokio::net::TcpListener,
    internal: tokio::net::TcpListener,
    admin: tokio::net::TcpListener,
    state: AppState,
    http_metrics: HttpMetrics,
    limits: ListenerLimits,
    shutdown_grace: Duration,
    webhooks: crate::webhooks::Workers,
    stop: CancellationToken,
}

/// The node's pools (see `Pools`), lazy: a node starts, and reports not ready,
/// while the database is still coming up.
pub fn database_pools(config: &Config) -> Result<Pools, StartupError> {
    // No transaction of the node idles between its statements, so a session idle in a
    // transaction for a commit timeout belongs to a paused or cut-off node: PostgreSQL
    // ends it, releasing its fence lock, so the next owner's claim goes through and the
    // old owner's commit fails (and is then refused by the fence). No statement waits on
    // a lock longer than a lease TTL either, so a claim cannot stall the ownership loop.
    // The server's keepalive probes find a silently vanished node sooner still.
    let lease_ttl_ms = format!("{}ms", config.lease_ttl.as_millis().max(1));
    let commit_ms = format!("{}ms", config.commit_timeout.as_millis().max(1));
    let connect = PgConnectOptions::from_str(config.database_url.expose_secret())
        .context("DATABASE_URL is not a valid PostgreSQL URL")?
        .options([
            ("idle_in_transaction_session_timeout", commit_ms.as_str()),
            ("lock_timeout", lease_ttl_ms.as_str()),
            ("statement_timeout", lease_ttl_ms.as_str()),
            ("tcp_keepalives_idle", "5"),
            ("tcp_keepalives_interval", "2"),
            ("tcp_keepalives_count", "3"),
            ("tcp_user_timeout", "10000"),
            // Every statement here is a short OLTP one. Generic plans of a few (the webhook
            // fan-out's EXISTS over the outbox) are estimated above jit_above_cost, and
            // compiling them took ~1.7 ms of PostgreSQL's CPU per call to save nothing.
            ("jit", "off"),
        ]);
    let pool = |size: u32| {
        PgPoolOptions::new()
            .max_connections(size.max(1))
            // Establishing a connection (TLS, SCRAM) can take a while; work on the
            // connection has its own bounds.
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy_with(connect.clone())
    };
    // The webhook workers' statements commit asynchronously: a crash of PostgreSQL can
    // lose their last fraction of a second, which only means a delivery is sent again
    // (with the same ids), as after a node's crash. They then never wait for a WAL flush,
    // and never make the executors' commits queue behind their flushes.
    let deliveries = PgPoolOptions::new()
        .max_connections(config.database_delivery_connections.max(1))
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy_with(connect.clone().options([("synchronous_commit", "off")]));
    Ok(Pools {
        reads: pool(config.database_max_connections),
        commits: pool(config.database_commit_connections),
        control: pool(config.database_control_connections),
        deliveries,
    })
}

fn redis_pool(config: &Config) -> Result<deadpool_redis::Pool, StartupError> {
    let url = config.redis_url.expose_secret();
    let manager = match &config.redis_ca_file {
        // rediss:// with our own CA: the TLS parameters travel in the connection info.
        Some(path) => {
            let root_cert = std::fs::read(path)
                .with_context(|| format!("reading REDIS_CA_FILE {}", path.display()))?;
            let client = redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )
            .context("REDIS_CA_FILE needs a rediss:// REDIS_URL")?;
            deadpool_redis::Manager::new(client.get_connection_info().clone())
        }
        None => deadpool_redis::Manager::new(url),
    }
    .context("REDIS_URL is not a valid Redis URL")?;
    Ok(deadpool_redis::Pool::builder(manager)
        .max_size(32)
        .wait_timeout(Some(Duration::from_secs(2)))
        .create_timeout(Some(Duration::from_secs(2)))
        .recycle_timeout(Some(Duration::from_secs(2)))
        .runtime(deadpool_redis::Runtime::Tokio1)
        .build()
        .context("Redis pool")?)
}

/// One connection to each server at start: a certificate that does not verify (a wrong
/// CA, a wrong name) is a configuration error that waiting will not fix, so the node
/// refuses to start and says so. Anything else (a server still starting) is left to the
/// pools, which retry, while the node reports not ready.
async fn refuse_tls_failures(
    database: &sqlx::PgPool,
    redis: &deadpool_redis::Pool,
) -> Result<(), StartupError> {
    let bound = Duration::from_secs(3);
    if let Ok(Err(error)) = tokio::time::timeout(bound, database.acquire()).await
        && (matches!(error, sqlx::Error::Tls(_)) || is_tls_failure(&error))
    {
        return Err(StartupError::Tls {
            what: "PostgreSQL",
            detail: error_chain(&error),
        });
    }
    if let Ok(Err(deadpool_redis::PoolError::Backend(error))) =
        tokio::time::timeout(bound, redis.get()).await
        && is_redis_tls_failure(&error)
    {
        return Err(StartupError::Tls {
            what: "Redis",
            detail: error_chain(&error),
        });
    }
    Ok(())
}

/// Whether a rustls error is somewhere in the chain (also inside an `io::Error`).
fn is_tls_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if error.is::<rustls::Error>()
            || error
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        next = error.source();
    }
    false
}

/// The redis crate keeps the handshake's `io::Error` to itself (no `source`), so this
/// reads what rustls' errors say: a failed verification or a fatal alert.
fn is_redis_tls_failure(error: &redis::RedisError) -> bool {
    let text = error.to_string();
    error.is_io_error()
        && [
            "invalid peer certificate",
            "received fatal alert",
            "peer is incompatible",
        ]
        .iter()
        .any(|sign| text.contains(sign))
}

async fn membership(
    config: &Config,
    cluster_config: &ClusterConfig,
    redis: &deadpool_redis::Pool,
    metrics: &ClusterMetrics,
) -> Result<Arc<dyn Membership>, StartupError> {
    Ok(match config.membership {
        MembershipSource::Redis => Arc::new(
            RedisMembership::new(cluster_config, redis.clone(), metrics.clone())
                .context("Redis membership")?,
        ),
        MembershipSource::Kubernetes => {
            let client = kube::Client::try_default()
                .await
                .context("Kubernetes client")?;
            let namespace = config
                .kubernetes_namespace
                .clone()
                .context("POD_NAMESPACE must be set")?;
            let service = config
                .kubernetes_service
                .clone()
                .context("WALLET_K8S_SERVICE must be set")?;
            Arc::new(EndpointSliceMembership::new(client, &namespace, &service))
        }
    })
}

async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, StartupError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind { what, addr, source })
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        let registry = Registry::new();
        let authentication = authentication(&config).await?;
        let public = bind("public", config.public_addr).await?;
        let internal = bind("internal", config.internal_addr).await?;
        let admin = bind("admin", config.admin_addr).await?;
        let internal_addr = internal.local_addr().context("internal listener address")?;
        let advertise_addr = config
            .advertise_addr
            .clone()
            .unwrap_or_else(|| advertised(internal_addr));

        let pools = database_pools(&config)?;
        let redis = redis_pool(&config)?;
        refuse_tls_failures(&pools.control, &redis).await?;
        let store = Store::new(
            pools.clone(),
            Timeouts {
                commit: config.commit_timeout,
                read: config.read_timeout,
            },
        )
        .with_events(config.events.enabled);

        let cluster_metrics = ClusterMetrics::register(&registry).context("cluster metrics")?;
        let executor_metrics =
            ExecutorMetrics::register(&registry, cluster_metrics.fence_rejections().clone())
                .context("executor metrics")?;
        let routing_metrics = RoutingMetrics::register(&registry).context("routing metrics")?;
        let http_metrics = HttpMetrics::register(&registry).context("HTTP metrics")?;
        let events_metrics = EventsMetrics::register(&registry).context("events metrics")?;
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .context("process metrics")?;

        // One message per shard at most is in flight: a bound that never blocks.
        let (fence_lost_tx, fence_lost_rx) = mpsc::channel(config.shards as usize);
        let executors = ExecutorPool::new(
            store.clone(),
            ExecutorSettings {
                batch_max: config.batch_max,
                queue_max: config.shard_queue_max,
                commit_lanes: config.commit_lanes,
                cache_wallets: config.cache_wallets,
                stall_after: config.commit_stall,
                shards: config.shards,
                events: config.events.enabled,
            },
            executor_metrics,
            fence_lost_tx,
        );
        let stop = CancellationToken::new();
        tokio::spawn(crate::executor::sweep_until_stopped(
            executors.clone(),
            store.clone(),
            crate::executor::SweepSettings {
                interval: config.sweep_interval,
                // The fast path's credit has its wait, and a little more to commit.
                pending_after: config.transfer_credit_wait + Duration::from_millis(500),
                batch: 256,
            },
            stop.child_token(),
        ));
        let event_tail = if config.events.enabled {
            EventTail::start(
                store.clone(),
                config.events.poll_interval,
                stop.child_token(),
            )
        } else {
            EventTail::idle()
        };
        let webhook_metrics =
            crate::webhooks::WebhookMetrics::register(&registry).context("webhook metrics")?;
        if config.webhooks.allow_private {
            tracing::warn!(
                "WALLET_WEBHOOK_ALLOW_PRIVATE is on: webhooks may point at loopback and private networks"
            );
        }
        let webhook_sender =
            crate::webhooks::Sender::new(config.webhooks.allow_private, config.webhooks.timeout)
                .context("webhook HTTP client")?;
        if config.events.enabled {
            start_event_consumers(&config, &store, &event_tail, events_metrics, &stop);
        } else if config.events.nats.is_some() {
            tracing::warn!(
                "WALLET_EVENTS_NATS_URL is set but WALLET_EVENTS_ENABLED=false: nothing to publish"
            );
        }
        let health = health::start(
            store.clone(),
            config.database_unusable_after,
            executors.clone(),
            stop.child_token(),
        );
        // The internal secret(s) sign node-to-node requests and the Redis member entries.
        let keys = SigningKeys::new(
            config.internal_secret.clone(),
            config.internal_secret_previous.clone(),
        );
        let internal_auth = Arc::new(
            Verifier::new(
                keys.clone(),
                config.node_id.clone(),
                config.internal_replay_window,
                &registry,
            )
            .context("internal auth metrics")?,
        );
        let cluster_config = ClusterConfig {
            node_id: config.node_id.clone(),
            advertise_addr,
            shards: config.shards,
            lease_ttl: config.lease_ttl,
            heartbeat_ttl: config.heartbeat_ttl,
            redis_prefix: config.redis_prefix.clone(),
            keys: keys.clone(),
        };
        let membership = membership(&config, &cluster_config, &redis, &cluster_metrics).await?;
        let cluster = Arc::new(
            Cluster::start(
                cluster_config,
                redis,
                pools.control,
                membership,
                executors.clone(),
                fence_lost_rx,
                health.usable.clone(),
                cluster_metrics,
            )
            .context("cluster layer")?,
        );
        let forwarder = Forwarder::new(
            keys,
            ForwardTimeouts {
                answer_grace: config.lease_ttl + config.commit_timeout,
                attempt: config.lease_ttl,
            },
        )
        .context("HTTP client")?;
        let router = Arc::new(OperationRouter::new(
            cluster.clone(),
            executors.clone(),
            forwarder,
            config.resolve_window(),
            routing_metrics,
        ));
        // Last, after everything that can fail: a node that does not start delivers nothing.
        let webhooks = crate::webhooks::start(
            store.clone(),
            event_tail.clone(),
            webhook_sender,
            config.webhooks.clone(),
            webhook_metrics,
            stop.child_token(),
        );
        let state = AppState {
            store,
            router,
            executors,
            cluster,
            health: health.report,
            max_body_bytes: config.max_body_bytes,
            request_deadline: config.request_deadline,
            transfer_credit_wait: config.transfer_credit_wait,
            handler_timeout: config.handler_timeout,
            internal_auth,
            authentication: Arc::new(authentication),
            rate_limiters: Arc::new(RateLimiters::new(config.rate_limits)),
            registry,
            event_tail,
            webhooks: config.webhooks.clone(),
        };
        Ok(Self {
            public,
            internal,
            admin,
            state,
            http_metrics,
            limits: config.listeners,
            shutdown_grace: config.shutdown_grace,
            webhooks,
            stop,
        })
    }

    pub fn public_addr(&self) -> SocketAddr {
        self.public
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn internal_addr(&self) -> SocketAddr {
        self.internal
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Cancelling it stops the node as SIGTERM would (used by tests).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self {
            public,
            internal,
            admin,
            state,
            http_metrics,
            limits,
            shutdown_grace,
            webhooks,
            stop,
        } = self;
        let webhook_timeout = state.webhooks.timeout;
        let cluster = state.cluster.clone();
        let executors = state.executors.clone();
        let (public_server, public_handle) = server(
            public,
            http::public_service(state.clone(), http_metrics.clone()),
            &limits,
            limits.public_connections,
        )?;
        let (internal_server, internal_handle) = server(
            internal,
            http::internal_service(state.clone(), http_metrics.clone()),
            &limits,
            limits.internal_connections,
        )?;
        let (admin_server, admin_handle) = server(
            admin,
            http::admin_service(state, http_metrics),
            &limits,
            limits.admin_connections,
        )?;
        let public_server = tokio::spawn(public_server);
        let other_servers =
            tokio::spawn(async move { tokio::join!(internal_server, admin_server) });

        tokio::select! {
            () = stop.cancelled() => {}
            () = shutdown_signal() => {}
        }
        tracing::info!("shutting down: draining public requests, then handing shards over");
        // Stop accepting; requests in flight still complete on this node's executors,
        // and peers still reach the internal port until the handoff below.
        public_handle.stop_graceful(shutdown_grace);
        if tokio::time::timeout(shutdown_grace + Duration::from_secs(1), public_server)
            .await
            .is_err()
        {
            tracing::warn!("public requests still in flight after the shutdown grace period");
        }
        // Leave the membership, finish and stop each shard, release its lease.
        cluster.shutdown().await;
        executors.stop_all().await;
        internal_handle.stop_graceful(Duration::from_secs(2));
        admin_handle.stop_graceful(Duration::from_secs(1));
        stop.cancel();
        // Attempts in flight end within their timeout and are recorded, so no claim is
        // left to lapse (and no receiver gets a delivery twice) after a clean stop.
        if tokio::time::timeout(webhook_timeout + Duration::from_secs(5), webhooks.stopped())
            .await
            .is_err()
        {
            tracing::warn!(
                "webhook deliveries still in flight at shutdown; their claims will lapse"
            );
        }
        let _ = other_servers.await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// What every node runs on the outbox: pruning and the lag gauge, and the NATS sink
/// when it is configured (one node publishes at a time; the others stand by).
fn start_event_consumers(
    config: &Config,
    store: &Store,
    tail: &EventTail,
    metrics: EventsMetrics,
    stop: &CancellationToken,
) {
    tokio::spawn(crate::events::prune_until_stopped(
        store.clone(),
        PruneSettings {
            retention: config.events.retention,
            interval: config.events.prune_interval,
            batch: config.events.prune_batch,
        },
        metrics.clone(),
        stop.child_token(),
    ));
    tokio::spawn(crate::events::lag_until_stopped(
        store.clone(),
        metrics.clone(),
        stop.child_token(),
    ));
    if let Some(nats) = &config.events.nats {
        let sink = NatsSink {
            config: nats.clone(),
            store: store.clone(),
            tail: tail.clone(),
            metrics,
            node_id: config.node_id.clone(),
            read_timeout: config.read_timeout,
        };
        tokio::spawn(sink.run(stop.child_token()));
    }
}

/// Peers cannot reach 0.0.0.0: advertise loopback for a wildcard bind.
fn advertised(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

type Serving = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A listener's server with its bounds: header, body and idle timeouts (a slow or
/// silent client is closed, never kept), and a connection cap (beyond it the accept
/// loop waits, leaving new connections in the kernel's backlog).
fn server(
    listener: tokio::net::TcpListener,
    service: Service,
    limits: &ListenerLimits,
    max_connections: usize,
) -> anyhow::Result<(Serving, ServerHandle)> {
    let acceptor = TcpAcceptor::try_from(listener).context("listener")?;
    let fuse = FuseConfig::default()
        .with_http1_header_timeout(limits.header_timeout)
        .with_request_body_timeout(limits.body_timeout)
        .with_connection_idle_timeout(limits.idle_timeout)
        .with_write_stall_timeout(limits.body_timeout);
    let server = Server::new(acceptor)
        .fuse_config(fuse)
        .max_connections(max_connections.max(1));
    let handle = server.handle();
    Ok((Box::pin(server.serve(service)), handle))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %error, "Ctrl-C handler failed");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(error = %error, "SIGTERM handler failed");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
