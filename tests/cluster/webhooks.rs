//! kill -9 of a node in the middle of webhook deliveries: nothing is lost, and what the
//! dead node had in flight is sent again by the other, with the same event and delivery
//! ids.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::StatusCode;
use wallet_tests::eventually;
use wallet_tests::webhooks::{self, Mode, Receiver, verify_signature};

use crate::harness::{SETTLE, TestCluster};

/// At most this many attempts in flight per node, so that more requests held at the
/// receiver than this means both nodes are in the middle of a delivery.
const IN_FLIGHT: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_deliveries_loses_no_event_and_redelivers_with_the_same_ids()
-> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    // Requests are held open: every attempt is in the middle when the node dies.
    receiver.set_mode(Mode::Hold);
    let mut cluster = TestCluster::start(2, |options| {
        options.extra.extend(
            [
                ("WALLET_WEBHOOK_ALLOW_PRIVATE", "true"),
                ("WALLET_WEBHOOK_MAX_IN_FLIGHT", "4"),
                // Longer than the test holds a request; the claim lease is this + 20 s.
                ("WALLET_WEBHOOK_TIMEOUT_MS", "15000"),
                ("WALLET_WEBHOOK_BACKOFF_BASE_MS", "200"),
                ("WALLET_WEBHOOK_BACKOFF_MAX_MS", "1000"),
            ]
            .map(|(name, value)| (name.to_owned(), value.to_owned())),
        );
    })
    .await?;
    let api = cluster.nodes[1].api.clone();
    let hook = webhooks::create(
        &api,
        &receiver.url("/hook"),
        &["wallet.created", "operation.applied"],
    )
    .await?;
    let wallet = api.create_wallet().await?;
    for _ in 0..20 {
        assert_eq!(
            api.operate(wallet, "DEPOSIT", "1.00", None).await?.status,
            StatusCode::OK
        );
    }
    let both_busy = eventually(SETTLE, || async { receiver.received().len() > IN_FLIGHT }).await;
    assert!(
        both_busy,
        "only {} requests held: is node-0 delivering?",
        receiver.received().len()
    );
    cluster.nodes[0].kill().await?;
    let held_at_kill = receiver.received().len();
    receiver.set_mode(Mode::Status(200));

    // node-0's claims lapse (timeout + 20 s) and node-1 sends them again.
    let outbox = webhooks::outbox(&cluster.db.pool, "test").await?;
    assert_eq!(outbox.len(), 21, "wallet.created and 20 deposits");
    let all_delivered = eventually(Duration::from_secs(120), || async {
        webhooks::deliveries(&api, hook.id, Some("delivered"), 200)
            .await
            .is_ok_and(|delivered| delivered.len() == outbox.len())
    })
    .await;
    assert!(
        all_delivered,
        "not every delivery was DELIVERED: {:?}",
        webhooks::deliveries(&api, hook.id, None, 200).await?
    );
    let mut by_event: BTreeMap<String, Vec<webhooks::Received>> = BTreeMap::new();
    for request in receiver.received() {
        verify_signature(
            &hook.secret,
            request.header("wallet-signature"),
            &request.body,
            Duration::from_secs(300),
        )
        .map_err(|error| anyhow::anyhow!(error))?;
        by_event
            .entry(request.event_id())
            .or_default()
            .push(request);
    }
    for (id, _) in &outbox {
        assert!(
            by_event.contains_key(&id.to_string()),
            "event {id} never arrived"
        );
    }
    assert_eq!(by_event.len(), outbox.len(), "{:?}", by_event.keys());
    let redelivered: Vec<&String> = by_event
        .iter()
        .filter(|(_, requests)| requests.len() > 1)
        .map(|(id, _)| id)
        .collect();
    for requests in by_event.values() {
        let first = &requests[0];
        assert!(requests.iter().all(|request| {
            request.header("wallet-delivery-id") == first.header("wallet-delivery-id")
                && request.header("wallet-event-id") == first.header("wallet-event-id")
                && request.json()["data"] == first.json()["data"]
        }));
    }
    // What node-0 held when it died, and nothing else, came twice.
    assert!(
        !redelivered.is_empty() && redelivered.len() <= IN_FLIGHT,
        "redelivered {redelivered:?} ({held_at_kill} requests were held at the kill)"
    );
    Ok(())
}
