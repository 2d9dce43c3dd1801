//! Kubernetes membership: the EndpointSlice reflector against a mocked API server
//! (kube's tower-test pattern): the initial list, then watch events.

use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower_test::mock;
use wallet_cluster::{EndpointSliceMembership, Member, Membership};

const SLICES_PATH: &str = "/apis/discovery.k8s.io/v1/namespaces/wallet/endpointslices";

fn endpoint(pod: &str, ip: &str, serving: bool, terminating: bool) -> serde_json::Value {
    json!({
        "addresses": [ip],
        "conditions": { "ready": serving && !terminating, "serving": serving, "terminating": terminating },
        "targetRef": { "kind": "Pod", "name": pod, "namespace": "wallet" }
    })
}

fn slice(name: &str, version: &str, endpoints: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "wallet",
            "resourceVersion": version,
            "labels": { "kubernetes.io/service-name": "wallet-headless" }
        },
        "addressType": "IPv4",
        "ports": [{ "name": "internal", "port": 8090, "protocol": "TCP" }],
        "endpoints": endpoints
    })
}

fn member(id: &str, ip: &str) -> Member {
    Member {
        id: id.to_owned(),
        internal_addr: format!("{ip}:8090"),
    }
}

/// Answers the reflector's calls like an API server would, checking what it asks.
/// The watch is answered only once `checked` fires, so the test sees the listed state.
async fn api_server(
    handle: mock::Handle<Request<Body>, Response<Body>>,
    checked: tokio::sync::oneshot::Receiver<()>,
    rewatched: tokio::sync::oneshot::Sender<()>,
) {
    let mut handle = std::pin::pin!(handle);

    let (request, send) = handle.next_request().await.expect("initial list");
    assert_eq!(request.method(), http::Method::GET);
    assert_eq!(request.uri().path(), SLICES_PATH);
    let query = request.uri().query().unwrap_or_default().to_owned();
    assert!(
        query.contains("labelSelector=kubernetes.io%2Fservice-name%3Dwallet-headless"),
        "list must select the service's slices: {query}"
    );
    assert!(
        !query.contains("watch=true"),
        "first call is a list: {query}"
    );
    let list = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSliceList",
        "metadata": { "resourceVersion": "10" },
        "items": [slice("wallet-headless-a", "9", json!([
            endpoint("wallet-0", "10.0.0.1", true, false),
            endpoint("wallet-1", "10.0.0.2", true, false),
            endpoint("wallet-2", "10.0.0.3", false, false)
        ]))]
    });
    send.send_response(Response::new(Body::from(
        serde_json::to_vec(&list).expect("json"),
    )));

    let (request, send) = handle.next_request().await.expect("watch");
    checked.await.expect("test checked the listed state");
    assert_eq!(request.uri().path(), SLICES_PATH);
    let query = request.uri().query().unwrap_or_default().to_owned();
    assert!(
        query.contains("watch=true") && query.contains("resourceVersion=10"),
        "{query}"
    );
    assert!(query.contains("labelSelector=kubernetes.io%2Fservice-name%3Dwallet-headless"));
    // wallet-1 starts terminating, wallet-2 became ready, a second slice appears.
    let events = [
        json!({ "type": "MODIFIED", "object": slice("wallet-headless-a", "11", json!([
            endpoint("wallet-0", "10.0.0.1", true, false),
            endpoint("wallet-1", "10.0.0.2", true, true),
            endpoint("wallet-2", "10.0.0.3", true, false)
        ])) }),
        json!({ "type": "ADDED", "object": slice("wallet-headless-b", "12", json!([
            endpoint("wallet-3", "10.0.0.4", true, false)
        ])) }),
    ];
    let mut body = Vec::new();
    for event in events {
        body.extend(serde_json::to_vec(&event).expect("json"));
        body.push(b'\n');
    }
    send.send_response(Response::new(Body::from(body)));

    // The watch stream ended; the reflector watches again from where it was. Hold
    // that call open, like an idle API server, until the test is over.
    let (request, _send) = handle.next_request().await.expect("re-watch");
    let query = request.uri().query().unwrap_or_default().to_owned();
    assert!(
        query.contains("watch=true") && query.contains("resourceVersion=12"),
        "{query}"
    );
    let _ = rewatched.send(());
    std::future::pending::<()>().await;
}

async fn wait_for(view: &mut watch::Receiver<Vec<Member>>, want: &[Member]) {
    let reached = tokio::time::timeout(Duration::from_secs(10), view.wait_for(|v| v == want))
        .await
        .map(|r| r.is_ok());
    assert_eq!(
        reached,
        Ok(true),
        "view never became {want:?}; last {:?}",
        *view.borrow()
    );
}

#[tokio::test]
async fn reflector_follows_serving_endpoints_of_the_headless_service() {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let (checked, checked_rx) = tokio::sync::oneshot::channel();
    let (rewatched_tx, rewatched) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(api_server(handle, checked_rx, rewatched_tx));
    let client = kube::Client::new(service, "wallet");
    let membership = std::sync::Arc::new(EndpointSliceMembership::new(
        client,
        "wallet",
        "wallet-headless",
    ));
    assert!(
        !membership.is_registered(&[], "wallet-0"),
        "not ready before the first list"
    );

    let (tx, mut view) = watch::channel(Vec::new());
    let stop = CancellationToken::new();
    let task = {
        let (m, stop) = (membership.clone(), stop.clone());
        let (_eligible, eligible) = watch::channel(true);
        tokio::spawn(async move { m.run(tx, stop, eligible).await })
    };

    wait_for(
        &mut view,
        &[
            member("wallet-0", "10.0.0.1"),
            member("wallet-1", "10.0.0.2"),
        ],
    )
    .await;
    // A pod is only a serving endpoint once ready, so a synced view is enough.
    assert!(membership.is_registered(&view.borrow(), "wallet-9"));
    checked.send(()).expect("api server waiting");

    wait_for(
        &mut view,
        &[
            member("wallet-0", "10.0.0.1"),
            member("wallet-2", "10.0.0.3"),
            member("wallet-3", "10.0.0.4"),
        ],
    )
    .await;

    // The reflector resumes from the last resourceVersion after the stream ends.
    tokio::time::timeout(Duration::from_secs(10), rewatched)
        .await
        .expect("reflector watched again")
        .expect("api server checked the re-watch");
    stop.cancel();
    task.await.expect("join").expect("membership ends cleanly");
    assert!(
        !server.is_finished(),
        "api server saw an unexpected call: {server:?}"
    );
    server.abort();
}
