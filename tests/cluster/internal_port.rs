//! The internal (node-to-node) port serves only requests signed with the internal
//! secret (or the previous one, during a rotation), for this node, fresh and never seen
//! before; the public port does not serve the internal route at all.

use std::time::Duration;

use reqwest::StatusCode;
use uuid::Uuid;
use wallet::auth::Tenant;
use wallet::domain::{Action, Amount, Deadline, OperationCommand};
use wallet::internal_auth::{self, SignedHeaders};
use wallet::routing::{ForwardBatch, ForwardReply, ForwardResult, ForwardedCommand};
use wallet_cluster::SigningKeys;

use crate::harness::TestCluster;
use wallet_tests::node::NodeProcess;

const INTERNAL_OPERATIONS: &str = "/internal/v1/operations";
const INTERNAL_READS: &str = "/internal/v1/reads";
const PREVIOUS_SECRET: &str = "the-secret-being-rotated-out";

fn deposit(wallet: Uuid, amount: &str) -> anyhow::Result<Vec<u8>> {
    let amount: Amount = amount.parse()?;
    let batch = ForwardBatch {
        operations: vec![ForwardedCommand {
            command: OperationCommand {
                operation_id: Uuid::now_v7(),
                wallet_id: wallet,
                // The tenant the tests' API client creates wallets for.
                tenant: Tenant::parse(wallet_tests::auth::TENANT)
                    .ok_or_else(|| anyhow::anyhow!("test tenant"))?,
                action: Action::Deposit { amount },
                idempotency_key: None,
                request_hash: Action::Deposit { amount }.fingerprint(wallet),
                deadline: Deadline::after(Duration::from_secs(10)),
                may_exist: false,
            },
            trace: Default::default(),
        }],
    };
    Ok(serde_json::to_vec(&batch)?)
}

struct Internal {
    http: reqwest::Client,
    url: String,
}

impl Internal {
    async fn post(
        &self,
        headers: Option<&SignedHeaders>,
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<(StatusCode, serde_json::Value)> {
        let mut request = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body.to_vec());
        for (name, value) in headers.map(SignedHeaders::pairs).into_iter().flatten() {
            request = request.header(name, value);
        }
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        let answer = request.send().await?;
        let status = answer.status();
        Ok((status, answer.json().await.unwrap_or_default()))
    }
}

#[tokio::test]
async fn the_internal_port_refuses_unsigned_stale_replayed_and_tampered_requests()
-> anyhow::Result<()> {
    let cluster = TestCluster::start(1, |options| {
        options.extra.push((
            "WALLET_INTERNAL_SECRET_PREVIOUS".into(),
            PREVIOUS_SECRET.into(),
        ));
    })
    .await?;
    let node = &cluster.nodes[0];
    let wallet = cluster.funded_wallets(1, "10.00").await?[0];
    let keys = SigningKeys::new(cluster.options.internal_secret.clone().into(), None);
    let internal = Internal {
        http: reqwest::Client::new(),
        url: format!("{}{INTERNAL_OPERATIONS}", node.internal_url()),
    };
    let sign = |keys: &SigningKeys, node: &str, body: &[u8], at: i64| {
        internal_auth::sign(keys, "POST", INTERNAL_OPERATIONS, node, body, at)
    };
    let now = internal_auth::now_ms;
    let body = deposit(wallet, "5.00")?;
    let refused = |(status, problem): (StatusCode, serde_json::Value), what: &str| {
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {problem}");
        assert_eq!(
            problem["type"], "https://wallet.dev/problems/unauthorized",
            "{what}: {problem}"
        );
    };

    refused(internal.post(None, &[], &body).await?, "unsigned");
    // Reads have their own route, signed like commands.
    let reads = Internal {
        http: reqwest::Client::new(),
        url: format!("{}{INTERNAL_READS}", node.internal_url()),
    };
    let read = serde_json::to_vec(&serde_json::json!({
        "reads": [{"tenant": wallet_tests::auth::TENANT, "walletId": wallet}]
    }))?;
    refused(reads.post(None, &[], &read).await?, "unsigned read");
    let signed = internal_auth::sign(&keys, "POST", INTERNAL_READS, &node.node_id, &read, now());
    let (status, answer) = reads.post(Some(&signed), &[], &read).await?;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["results"][0]["result"], "found", "{answer}");
    assert_eq!(
        answer["results"][0]["wallet"]["balance"], "10.00",
        "{answer}"
    );
    // The shared secret itself, as the old scheme sent it, is no signature.
    let bearer = format!("Bearer {}", cluster.options.internal_secret);
    refused(
        internal
            .post(None, &[("authorization", &bearer)], &body)
            .await?,
        "bearer secret",
    );
    let guessed = SigningKeys::new("guessed-secret".into(), None);
    refused(
        internal
            .post(Some(&sign(&guessed, "node-0", &body, now())), &[], &body)
            .await?,
        "another secret",
    );
    for (what, at) in [
        ("stale", now() - 31_000),
        ("from the future", now() + 31_000),
    ] {
        refused(
            internal
                .post(Some(&sign(&keys, "node-0", &body, at)), &[], &body)
                .await?,
            what,
        );
    }
    refused(
        internal
            .post(Some(&sign(&keys, "node-1", &body, now())), &[], &body)
            .await?,
        "meant for another node",
    );
    let signed = sign(&keys, "node-0", &body, now());
    let tampered = String::from_utf8(body.clone())?.replace("\"5.00\"", "\"500.00\"");
    assert_ne!(tampered.as_bytes(), body.as_slice());
    refused(
        internal
            .post(Some(&signed), &[], tampered.as_bytes())
            .await?,
        "body changed",
    );

    // The genuine request runs once; the same request again is a replay.
    let (status, reply) = internal.post(Some(&signed), &[], &body).await?;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let reply: ForwardReply = serde_json::from_value(reply)?;
    assert!(
        matches!(reply.results.as_slice(), [ForwardResult::Done(_)]),
        "{reply:?}"
    );
    refused(internal.post(Some(&signed), &[], &body).await?, "replayed");

    // During a rotation the previous secret is accepted too.
    let previous = SigningKeys::new(PREVIOUS_SECRET.into(), None);
    let body_previous = deposit(wallet, "1.00")?;
    let (status, reply) = internal
        .post(
            Some(&sign(&previous, "node-0", &body_previous, now())),
            &[],
            &body_previous,
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "previous secret: {reply}");

    let public = node
        .api
        .post_raw(
            INTERNAL_OPERATIONS,
            String::from_utf8(body.clone())?,
            &signed
                .pairs()
                .iter()
                .map(|(name, value)| (*name, value.as_str()))
                .collect::<Vec<_>>(),
        )
        .await?;
    assert_eq!(public.status, StatusCode::NOT_FOUND, "{public:?}");

    // Only the two genuine deposits touched the wallet.
    assert_eq!(node.api.balance(wallet).await?, "16.00".parse()?);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM operations WHERE wallet_id = $1")
        .bind(wallet)
        .fetch_one(&cluster.db.pool)
        .await?;
    assert_eq!(rows, 3);
    let metrics = reqwest::get(format!("{}/metrics", node.admin_url))
        .await?
        .text()
        .await?;
    for (reason, count) in [
        // The two commands and the read above.
        ("unsigned", 3),
        ("bad_signature", 2),
        ("stale", 2),
        ("wrong_node", 1),
        ("replayed", 1),
    ] {
        let line = format!("wallet_internal_auth_failures_total{{reason=\"{reason}\"}} {count}");
        assert!(metrics.contains(&line), "{line} missing from\n{metrics}");
    }
    Ok(())
}

/// At least two wallets, funded with 1.00, owned by each node of a 2-node cluster.
async fn two_wallets_on_each_node(cluster: &TestCluster) -> anyhow::Result<[Vec<Uuid>; 2]> {
    let mut owned: [Vec<Uuid>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..64 {
        if owned.iter().all(|wallets| wallets.len() >= 2) {
            break;
        }
        let wallet = cluster.funded_wallets(1, "1.00").await?[0];
        if let Some((_, owner)) = cluster.agreed_owner(wallet).await? {
            owned[owner].push(wallet);
        }
    }
    anyhow::ensure!(
        owned.iter().all(|wallets| wallets.len() >= 2),
        "no wallets on both nodes: {owned:?}"
    );
    Ok(owned)
}

/// Step 2 of a rotation, half done: node-0 already signs with the new secret, node-1 still
/// with the old one, each accepting the other's as its previous secret.
#[tokio::test]
async fn nodes_halfway_through_a_rotation_still_trust_each_other_and_forward_both_ways()
-> anyhow::Result<()> {
    let (old, new) = ("rotation-old-secret", "rotation-new-secret");
    let secrets = |current: &str, previous: &str| {
        vec![
            ("WALLET_INTERNAL_SECRET".to_owned(), current.to_owned()),
            (
                "WALLET_INTERNAL_SECRET_PREVIOUS".to_owned(),
                previous.to_owned(),
            ),
        ]
    };
    // Settling needs each node to accept the other's member entry.
    let cluster = TestCluster::start(2, |options| {
        options.per_node.insert("node-0".into(), secrets(new, old));
        options.per_node.insert("node-1".into(), secrets(old, new));
    })
    .await?;
    // Wallets owned by each node, so that each node forwards to the other.
    let owned = two_wallets_on_each_node(&cluster).await?;
    for wallet in owned.iter().flatten() {
        for node in &cluster.nodes {
            let answer = node.api.operate(*wallet, "DEPOSIT", "1.00", None).await?;
            assert_eq!(
                answer.status,
                StatusCode::OK,
                "{}: {answer:?}",
                node.node_id
            );
        }
    }
    for wallet in owned.iter().flatten() {
        assert_eq!(
            cluster.nodes[0].api.balance(*wallet).await?,
            "3.00".parse()?
        );
    }
    for node in &cluster.nodes {
        let metrics = reqwest::get(format!("{}/metrics", node.admin_url))
            .await?
            .text()
            .await?;
        let forwarded: f64 = metrics
            .lines()
            .find_map(|line| line.strip_prefix("wallet_forwards_total{outcome=\"ok\"} "))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0.0);
        assert!(
            forwarded > 0.0,
            "{} forwarded nothing:\n{metrics}",
            node.node_id
        );
        let refused: Vec<&str> = metrics
            .lines()
            .filter(|line| {
                line.starts_with("wallet_internal_auth_failures_total") && !line.ends_with(" 0")
            })
            .collect();
        assert!(refused.is_empty(), "{}: {refused:?}", node.node_id);
    }
    Ok(())
}

/// A credit sent again for a transfer already POSTED, without the look-up a retry makes
/// (as a fast path racing a sweep would): the commit refuses it as stale, the retry finds
/// the first, and the money moves once.
#[tokio::test]
async fn a_second_credit_of_a_posted_transfer_is_found_and_not_applied() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1, |_| {}).await?;
    let node = &cluster.nodes[0];
    let wallets = cluster.funded_wallets(2, "10.00").await?;
    let api = &node.api;
    let posted = api
        .post_raw(
            "/api/v1/transfers",
            serde_json::json!({"fromWalletId": wallets[0], "toWalletId": wallets[1], "amount": "3.00"})
                .to_string(),
            &[],
        )
        .await?;
    assert_eq!(posted.body["status"], "POSTED", "{posted:?}");
    let transfer_id: Uuid = posted.body["transferId"]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    let amount: Amount = "3.00".parse()?;
    let action = Action::TransferIn {
        transfer_id,
        from_wallet_id: wallets[0],
        amount,
    };
    let batch = ForwardBatch {
        operations: vec![ForwardedCommand {
            command: OperationCommand {
                operation_id: wallet::domain::transfer_credit_id(transfer_id),
                wallet_id: wallets[1],
                tenant: Tenant::parse(wallet_tests::auth::TENANT)
                    .ok_or_else(|| anyhow::anyhow!("test tenant"))?,
                request_hash: action.fingerprint(wallets[1]),
                action,
                idempotency_key: None,
                deadline: Deadline::after(Duration::from_secs(10)),
                may_exist: false,
            },
            trace: Default::default(),
        }],
    };
    let body = serde_json::to_vec(&batch)?;
    let keys = SigningKeys::new(cluster.options.internal_secret.clone().into(), None);
    let node_id = node.node_id.clone();
    let headers = internal_auth::sign(
        &keys,
        "POST",
        INTERNAL_OPERATIONS,
        &node_id,
        &body,
        internal_auth::now_ms(),
    );
    let internal = Internal {
        http: reqwest::Client::new(),
        url: format!("{}{INTERNAL_OPERATIONS}", node.internal_url()),
    };
    let (status, reply) = internal.post(Some(&headers), &[], &body).await?;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let reply: ForwardReply = serde_json::from_value(reply)?;
    match &reply.results[..] {
        [ForwardResult::Done(wallet::domain::CommandOutcome::Recorded(record))] => {
            assert_eq!(record.transfer_id, Some(transfer_id));
        }
        other => anyhow::bail!("expected the first credit, got {other:?}"),
    }
    let credits: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM operations WHERE transfer_id = $1 AND operation_type = 'TRANSFER_IN'",
    )
    .bind(transfer_id)
    .fetch_one(&cluster.db.pool)
    .await?;
    assert_eq!(credits, 1);
    assert_eq!(api.balance(wallets[1]).await?, "13.00".parse()?);
    Ok(())
}

/// Balance reads `node` answered from `source`: its own memory as the owner, the owner's
/// memory through the internal port, or PostgreSQL.
async fn reads_from(node: &NodeProcess, source: &str) -> anyhow::Result<f64> {
    node.metric(&format!("wallet_wallet_reads_total{{source=\"{source}\"}}"))
        .await
}

/// A balance read on a node that does not own the wallet asks the owner (its reads go on
/// their own internal route, coalesced), and shows every acknowledged write; a wallet the
/// owner has not cached is read from PostgreSQL; another tenant's wallet is 404 either way.
#[tokio::test]
async fn a_balance_read_on_any_node_comes_from_the_owners_memory_with_every_acknowledged_write()
-> anyhow::Result<()> {
    let cluster = TestCluster::start(2, |_| {}).await?;
    let owned = two_wallets_on_each_node(&cluster).await?;
    for (owner, wallets) in owned.iter().enumerate() {
        let other = &cluster.nodes[1 - owner];
        for wallet in wallets {
            let mut expected: rust_decimal::Decimal = "1.00".parse()?;
            for round in 0..10 {
                // Written through either node, read through the one that does not own it.
                let writer = &cluster.nodes[round % 2];
                let answer = writer.api.operate(*wallet, "DEPOSIT", "0.25", None).await?;
                assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
                expected += rust_decimal::Decimal::new(25, 2);
                assert_eq!(
                    other.api.balance(*wallet).await?,
                    expected,
                    "{}: a read after an acknowledged deposit",
                    other.node_id
                );
            }
        }
    }
    for node in &cluster.nodes {
        assert!(
            reads_from(node, "owner").await? >= 20.0,
            "{} answered its reads of the other node's wallets without asking it",
            node.node_id
        );
    }

    // Never written since its creation, so not in the owner's cache: PostgreSQL answers.
    let fresh = cluster.nodes[0].api.create_wallet().await?;
    let (_, owner) = cluster
        .agreed_owner(fresh)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no agreed owner"))?;
    let other = &cluster.nodes[1 - owner];
    let before = reads_from(other, "database").await?;
    assert!(other.api.balance(fresh).await?.is_zero());
    assert_eq!(reads_from(other, "database").await? - before, 1.0);

    // The owner's memory keeps tenants apart.
    let stranger = wallet_tests::api::ApiClient::with_token(
        &other.api.url(""),
        Some(&wallet_tests::auth::token(
            "another",
            &wallet_tests::auth::ALL_SCOPES,
        )),
    );
    let foreign = owned[owner][0];
    let answer = stranger.get(&format!("/api/v1/wallets/{foreign}")).await?;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{answer:?}");
    Ok(())
}
