use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Membership;
use crate::{ClusterError, Member};

/// Name of the container port members talk to each other on.
pub const INTERNAL_PORT_NAME: &str = "internal";

/// Members from the EndpointSlices of the headless Service, watched through a kube-rs
/// reflector. Kubernetes decides liveness (readiness probes, termination), so there
/// is nothing to register or leave.
pub struct EndpointSliceMembership {
    client: kube::Client,
    namespace: String,
    service: String,
    synced: AtomicBool,
}

impl EndpointSliceMembership {
    pub fn new(client: kube::Client, namespace: &str, service: &str) -> Self {
        Self {
            client,
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            synced: AtomicBool::new(false),
        }
    }
}

/// The members behind `slices`: endpoints that serve and are not terminating, named
/// after their pod, reached on the port named [`INTERNAL_PORT_NAME`]. Sorted by id.
pub fn members_from_slices<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> Vec<Member> {
    let mut by_id: BTreeMap<String, Member> = BTreeMap::new();
    for slice in slices {
        let port = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(INTERNAL_PORT_NAME))
            .and_then(|p| p.port);
        let Some(port) = port else { continue };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.as_ref();
            // `serving` is `ready` without the terminating override; old servers only set `ready`.
            let serving = conditions.and_then(|c| c.serving.or(c.ready)) == Some(true);
            let terminating = conditions.and_then(|c| c.terminating) == Some(true);
            if !serving || terminating {
                continue;
            }
            let Some(id) = endpoint.target_ref.as_ref().and_then(|r| r.name.clone()) else {
                continue;
            };
            let Some(address) = endpoint.addresses.first() else {
                continue;
            };
            let internal_addr = if address.contains(':') {
                format!("[{address}]:{port}")
            } else {
                format!("{address}:{port}")
            };
            // A dual-stack pod sits in two slices; keep the smallest address (IPv4) so
            // every node picks the same one.
            let candidate = Member {
                id: id.clone(),
                internal_addr,
            };
            match by_id.get(&id) {
                Some(existing) if existing.internal_addr <= candidate.internal_addr => {}
                _ => {
                    by_id.insert(id, candidate);
                }
            }
        }
    }
    by_id.into_values().collect()
}

#[async_trait::async_trait]
impl Membership for EndpointSliceMembership {
    async fn run(
        &self,
        tx: watch::Sender<Vec<Member>>,
        shutdown: CancellationToken,
        _eligible: watch::Receiver<bool>,
    ) -> Result<(), ClusterError> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &self.namespace);
        let config = watcher::Config::default()
            .labels(&format!("kubernetes.io/service-name={}", self.service));
        let (store, writer) = reflector::store();
        let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
        let mut stream = std::pin::pin!(stream);
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                event = stream.next() => event,
            };
            match event {
                Some(Ok(event)) => {
                    if matches!(event, watcher::Event::InitDone)
                        && !self.synced.swap(true, Ordering::SeqCst)
                    {
                        tracing::info!(service = %self.service, "endpoint slices synced");
                    }
                    if !self.synced.load(Ordering::SeqCst) {
                        continue;
                    }
                    let members = members_from_slices(store.state().iter().map(|s| s.as_ref()));
                    tx.send_if_modified(|view| {
                        if *view == members {
                            return false;
                        }
                        tracing::info!(members = ?members.iter().map(|m| &m.id).collect::<Vec<_>>(), "membership changed");
                        *view = members;
                        true
                    });
                }
                // The watcher retries with backoff by itself; the last view stays.
                Some(Err(error)) => tracing::warn!(%error, "endpoint slice watch failed"),
                None => break,
            }
        }
        Ok(())
    }

    /// A pod only becomes a serving endpoint once it is ready, so requiring to be in
    /// the view would never let it become ready: a synced view is enough.
    fn is_registered(&self, _view: &[Member], _node_id: &str) -> bool {
        self.synced.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn slice(name: &str, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": "wallet",
                "resourceVersion": "1",
                "labels": { "kubernetes.io/service-name": "wallet-headless" }
            },
            "addressType": "IPv4",
            "ports": [
                { "name": "http", "port": 8080, "protocol": "TCP" },
                { "name": "internal", "port": 8090, "protocol": "TCP" }
            ],
            "endpoints": endpoints
        }))
        .expect("valid EndpointSlice")
    }

    fn endpoint(pod: &str, ip: &str, serving: bool, terminating: bool) -> serde_json::Value {
        serde_json::json!({
            "addresses": [ip],
            "conditions": { "ready": serving && !terminating, "serving": serving, "terminating": terminating },
            "targetRef": { "kind": "Pod", "name": pod, "namespace": "wallet" }
        })
    }

    #[test]
    fn keeps_serving_non_terminating_endpoints_on_the_internal_port() {
        let a = slice(
            "wallet-headless-a",
            serde_json::json!([
                endpoint("wallet-1", "10.0.0.2", true, false),
                endpoint("wallet-0", "10.0.0.1", true, false),
                endpoint("wallet-2", "10.0.0.3", false, false),
                endpoint("wallet-3", "10.0.0.4", true, true),
                { "addresses": ["10.0.0.5"], "conditions": { "serving": true } }
            ]),
        );
        let b = slice(
            "wallet-headless-b",
            serde_json::json!([endpoint("wallet-4", "fd00::4", true, false)]),
        );
        let members = members_from_slices([&a, &b]);
        assert_eq!(
            members,
            vec![
                Member {
                    id: "wallet-0".into(),
                    internal_addr: "10.0.0.1:8090".into()
                },
                Member {
                    id: "wallet-1".into(),
                    internal_addr: "10.0.0.2:8090".into()
                },
                Member {
                    id: "wallet-4".into(),
                    internal_addr: "[fd00::4]:8090".into()
                },
            ]
        );
    }

    #[test]
    fn a_slice_without_the_internal_port_contributes_nothing() {
        let mut s = slice(
            "x",
            serde_json::json!([endpoint("wallet-0", "10.0.0.1", true, false)]),
        );
        s.ports = Some(vec![]);
        assert!(members_from_slices([&s]).is_empty());
    }

    #[test]
    fn a_dual_stack_pod_is_one_member_whatever_the_slice_order() {
        let v4 = slice(
            "v4",
            serde_json::json!([endpoint("wallet-0", "10.0.0.1", true, false)]),
        );
        let v6 = slice(
            "v6",
            serde_json::json!([endpoint("wallet-0", "fd00::1", true, false)]),
        );
        let expected = vec![Member {
            id: "wallet-0".into(),
            internal_addr: "10.0.0.1:8090".into(),
        }];
        assert_eq!(members_from_slices([&v4, &v6]), expected);
        assert_eq!(members_from_slices([&v6, &v4]), expected);
    }
}
