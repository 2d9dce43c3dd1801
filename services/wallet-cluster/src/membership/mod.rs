//! Who is in the cluster. One trait, two sources: Redis heartbeats (default, works
//! everywhere) and the headless Service's EndpointSlices (Kubernetes only).

mod endpoints;
mod redis;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{ClusterError, Member};

pub use self::endpoints::{EndpointSliceMembership, INTERNAL_PORT_NAME, members_from_slices};
pub use self::redis::RedisMembership;

/// A source of the live member list.
#[async_trait::async_trait]
pub trait Membership: Send + Sync + 'static {
    /// Publishes the live members, sorted by id, into `tx` whenever they change, until
    /// `shutdown` fires; then leaves the membership where the source allows it and
    /// returns. Transient failures are logged and retried, keeping the last view.
    ///
    /// While `eligible` is false (this node cannot reach its database) the node is not
    /// a member, so the others take its shards; sources driven by readiness (Kubernetes)
    /// get that from the readiness probe instead.
    async fn run(
        &self,
        tx: watch::Sender<Vec<Member>>,
        shutdown: CancellationToken,
        eligible: watch::Receiver<bool>,
    ) -> Result<(), ClusterError>;

    /// Asks for a re-read as soon as possible (a peer answered "not owner"). Push-based
    /// sources need nothing.
    fn refresh(&self) {}

    /// Whether this node is registered well enough to take traffic. By default: the
    /// view lists it.
    fn is_registered(&self, view: &[Member], node_id: &str) -> bool {
        view.iter().any(|m| m.id == node_id)
    }
}
