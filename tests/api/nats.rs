//! The outbox published to NATS JetStream (a `nats-server -js` of each test's own): every
//! committed event arrives once, with its eventId as `Nats-Msg-Id`; a page published
//! again (a node restarted before it moved its position) is stored once; a NATS outage
//! leaves the ledger's writes alone and the sink catches up afterwards; a NATS that takes
//! the publishes but never acknowledges them holds no other reader of the outbox back.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::AckPolicy, consumer::DeliverPolicy, consumer::pull};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::Row;
use uuid::Uuid;
use wallet::events::EventCursor;
use wallet_tests::{
    ApiClient, InProcessNode, NatsServer, NodeOptions, TestDatabase, auth, eventually, unique_name,
};

const WAIT: Duration = Duration::from_secs(60);

/// Where one test's events go: a stream and subjects of its own.
struct Sink {
    prefix: String,
    stream: String,
}

impl Sink {
    fn new() -> Self {
        let name = unique_name("t");
        Self {
            prefix: format!("test.{name}"),
            stream: format!("T_{name}"),
        }
    }

    fn options(&self, db: &TestDatabase, nats: &NatsServer) -> NodeOptions {
        let mut options = NodeOptions::new(&db.app_url);
        options.extra.extend(
            [
                ("WALLET_EVENTS_NATS_URL", nats.url.clone()),
                ("WALLET_EVENTS_NATS_SUBJECT_PREFIX", self.prefix.clone()),
                ("WALLET_EVENTS_NATS_STREAM", self.stream.clone()),
                ("WALLET_EVENTS_NATS_TIMEOUT_MS", "2000".to_owned()),
                ("WALLET_EVENTS_POLL_MS", "50".to_owned()),
            ]
            .map(|(name, value)| (name.to_owned(), value)),
        );
        options
    }
}

/// An outbox row, as the tests compare it with what JetStream holds.
#[derive(Clone, Debug, PartialEq)]
struct OutboxEvent {
    cursor: EventCursor,
    event_id: Uuid,
    tenant: String,
    wallet_id: Uuid,
    sequence: i64,
    event_type: String,
    data: Value,
}

/// The whole outbox, in its order.
async fn outbox(db: &TestDatabase) -> anyhow::Result<Vec<OutboxEvent>> {
    let rows = sqlx::query(
        "SELECT tx_id, ordinal, event_id, tenant_id, wallet_id, sequence, event_type, data::text AS data \
         FROM events ORDER BY tx_id, ordinal",
    )
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(OutboxEvent {
                cursor: EventCursor {
                    tx_id: row.try_get("tx_id")?,
                    ordinal: row.try_get("ordinal")?,
                },
                event_id: row.try_get("event_id")?,
                tenant: row.try_get("tenant_id")?,
                wallet_id: row.try_get("wallet_id")?,
                sequence: row.try_get("sequence")?,
                event_type: row.try_get("event_type")?,
                data: serde_json::from_str(row.try_get("data")?)?,
            })
        })
        .collect()
}

/// Starts a node with the sink and waits until the sink has its position: it publishes
/// what commits from then on (what came before, it never will).
async fn start_node(
    node_id: &str,
    options: &NodeOptions,
    db: &TestDatabase,
) -> anyhow::Result<InProcessNode> {
    let node = InProcessNode::start(node_id, options).await?;
    let registered = eventually(WAIT, || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM event_consumers WHERE name = 'nats')",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap_or(false)
    })
    .await;
    anyhow::ensure!(registered, "{node_id}'s sink never registered its position");
    Ok(node)
}

/// Whether the sink's position is past every event of the outbox.
async fn caught_up(db: &TestDatabase) -> anyhow::Result<bool> {
    let position: Option<(i64, i32)> =
        sqlx::query_as("SELECT after_tx, after_ordinal FROM event_consumers WHERE name = 'nats'")
            .fetch_optional(&db.pool)
            .await?;
    let last = outbox(db).await?.last().map(|event| event.cursor);
    Ok(match (position, last) {
        (Some((tx_id, ordinal)), Some(last)) => EventCursor { tx_id, ordinal } >= last,
        (Some(_), None) => true,
        (None, _) => false,
    })
}

async fn stream_messages(js: &jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    let mut stream = js.get_stream(stream).await?;
    Ok(stream.info().await?.state.messages)
}

/// Whether the sink has published every outbox event, each once, and moved past them.
async fn delivered(db: &TestDatabase, js: &jetstream::Context, stream: &str) -> bool {
    let check = async {
        let events = outbox(db).await?.len() as u64;
        anyhow::Ok(
            events > 0 && stream_messages(js, stream).await? == events && caught_up(db).await?,
        )
    };
    check.await.unwrap_or(false)
}

/// Every message of the stream, in the stream's order, through a consumer of the test's.
async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
) -> anyhow::Result<Vec<jetstream::Message>> {
    let total = stream_messages(js, stream).await? as usize;
    let consumer = js
        .get_stream(stream)
        .await?
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await?;
    let mut messages = Vec::with_capacity(total);
    let deadline = tokio::time::Instant::now() + WAIT;
    while messages.len() < total && tokio::time::Instant::now() < deadline {
        let mut batch = consumer
            .fetch()
            .max_messages(total - messages.len())
            .expires(Duration::from_secs(2))
            .messages()
            .await?;
        while let Some(message) = batch.next().await {
            messages.push(message.map_err(|error| anyhow::anyhow!(error))?);
        }
    }
    anyhow::ensure!(
        messages.len() == total,
        "read {} of the stream's {total} messages",
        messages.len()
    );
    Ok(messages)
}

/// Waits until the sink has published every outbox event, each once, and moved past them.
async fn wait_delivered(
    db: &TestDatabase,
    js: &jetstream::Context,
    stream: &str,
    node: &InProcessNode,
) -> anyhow::Result<()> {
    if eventually(WAIT, || delivered(db, js, stream)).await {
        return Ok(());
    }
    anyhow::bail!(
        "the stream did not get every outbox event: {}",
        undelivered(db, js, stream, node).await?
    )
}

/// What a failed wait saw: the outbox events missing from the stream, the position, and
/// what the node's acks said.
async fn undelivered(
    db: &TestDatabase,
    js: &jetstream::Context,
    stream: &str,
    node: &InProcessNode,
) -> anyhow::Result<String> {
    let stored: HashSet<String> = read_stream(js, stream)
        .await?
        .iter()
        .map(|m| serde_json::from_slice::<Value>(&m.payload).map(|b| b["eventId"].to_string()))
        .collect::<Result<_, _>>()?;
    let missing: Vec<(EventCursor, String)> = outbox(db)
        .await?
        .into_iter()
        .filter(|e| !stored.contains(&format!("\"{}\"", e.event_id)))
        .map(|e| (e.cursor, e.event_type))
        .collect();
    let position: Option<(i64, i32)> =
        sqlx::query_as("SELECT after_tx, after_ordinal FROM event_consumers WHERE name = 'nats'")
            .fetch_optional(&db.pool)
            .await?;
    Ok(format!(
        "{} in the stream, missing {missing:?}; position {position:?}; acks stored {}, duplicate {}, failed {}",
        stored.len(),
        published(node, "stored").await?,
        published(node, "duplicate").await?,
        published(node, "failed").await?
    ))
}

/// A client of the tests' tenant that may also read events.
fn client(node: &InProcessNode, tenant: &str) -> ApiClient {
    ApiClient::with_token(
        &node.api.base_url,
        Some(&auth::token(
            tenant,
            &[
                "wallets:read",
                "wallets:create",
                "wallets:deposit",
                "wallets:withdraw",
                "events:read",
            ],
        )),
    )
}

/// Some wallets, each with deposits, a withdrawal and a rejected withdrawal, at once.
async fn traffic(api: &ApiClient, wallets: usize) -> anyhow::Result<Vec<Uuid>> {
    let runs = (0..wallets).map(|_| async {
        let wallet = api.create_wallet().await?;
        for (kind, amount, status) in [
            ("DEPOSIT", "10.00", StatusCode::OK),
            ("DEPOSIT", "5.25", StatusCode::OK),
            ("WITHDRAW", "1000.00", StatusCode::CONFLICT),
            ("WITHDRAW", "3.00", StatusCode::OK),
        ] {
            let answer = api.operate(wallet, kind, amount, None).await?;
            anyhow::ensure!(answer.status == status, "{kind} {amount}: {answer:?}");
        }
        anyhow::Ok(wallet)
    });
    futures::future::try_join_all(runs).await
}

/// The sample of `wallet_events_published_total` with this outcome, on a node's admin port.
async fn published(node: &InProcessNode, outcome: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{}/metrics", node.admin_url))
        .await?
        .text()
        .await?;
    let prefix = format!("wallet_events_published_total{{outcome=\"{outcome}\"}} ");
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0))
}

#[tokio::test]
async fn committed_events_arrive_in_jetstream_once_each_and_each_wallets_in_order()
-> anyhow::Result<()> {
    let Some(nats) = NatsServer::start("nats::committed_events_arrive_in_jetstream").await? else {
        return Ok(());
    };
    let db = TestDatabase::create().await?;
    let sink = Sink::new();
    let node = start_node("node-a", &sink.options(&db, &nats), &db).await?;
    let js = nats.jetstream().await?;

    traffic(&client(&node, auth::TENANT), 4).await?;
    // A tenant with dots in its name still gets one subject token.
    let dotted = client(&node, "acme.eu");
    let dotted_wallet = dotted.create_wallet().await?;
    dotted
        .operate(dotted_wallet, "DEPOSIT", "1.00", None)
        .await?;

    wait_delivered(&db, &js, &sink.stream, &node).await?;
    let events = outbox(&db).await?;
    let messages = read_stream(&js, &sink.stream).await?;
    assert_eq!(messages.len(), events.len());

    let by_id: BTreeMap<Uuid, &OutboxEvent> = events.iter().map(|e| (e.event_id, e)).collect();
    assert_eq!(by_id.len(), events.len(), "event ids are distinct");
    let mut seen = HashSet::new();
    let mut per_wallet: BTreeMap<Uuid, Vec<Uuid>> = BTreeMap::new();
    for message in &messages {
        let body: Value = serde_json::from_slice(&message.payload)?;
        let event_id: Uuid = body["eventId"].as_str().unwrap_or_default().parse()?;
        let header = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get("Nats-Msg-Id"))
            .map(|value| value.as_str().to_owned());
        assert_eq!(
            header,
            Some(event_id.to_string()),
            "Nats-Msg-Id is the eventId"
        );
        assert!(seen.insert(event_id), "{event_id} is in the stream twice");
        let row = by_id
            .get(&event_id)
            .unwrap_or_else(|| panic!("{event_id} is in the stream but not in the outbox"));
        assert_eq!(
            message.subject.as_str(),
            format!(
                "{}.{}.{}",
                sink.prefix,
                row.tenant.replace('.', "~"),
                row.event_type
            )
        );
        assert_eq!(body["tenant"], row.tenant.as_str());
        assert_eq!(body["walletId"], row.wallet_id.to_string().as_str());
        assert_eq!(body["sequence"], row.sequence);
        assert_eq!(body["type"], row.event_type.as_str());
        assert_eq!(body["cursor"], row.cursor.encode().as_str());
        assert_eq!(body["data"], row.data);
        per_wallet.entry(row.wallet_id).or_default().push(event_id);
    }
    assert!(
        messages
            .iter()
            .any(|m| m.subject.as_str() == format!("{}.acme~eu.wallet.created", sink.prefix)),
        "the dotted tenant's subject"
    );
    // Each wallet's events in the stream are in the outbox's order, which is its sequence order.
    for (wallet, published) in &per_wallet {
        let expected: Vec<Uuid> = events
            .iter()
            .filter(|e| e.wallet_id == *wallet)
            .map(|e| e.event_id)
            .collect();
        assert_eq!(published, &expected, "wallet {wallet}");
        let sequences: Vec<i64> = published.iter().map(|id| by_id[id].sequence).collect();
        assert!(sequences.is_sorted(), "wallet {wallet}: {sequences:?}");
    }
    assert_eq!(published(&node, "stored").await?, events.len() as f64);
    node.stop().await
}

#[tokio::test]
async fn a_page_published_again_after_a_restart_is_stored_once() -> anyhow::Result<()> {
    let Some(nats) = NatsServer::start("nats::a_page_published_again_after_a_restart").await?
    else {
        return Ok(());
    };
    let db = TestDatabase::create().await?;
    let sink = Sink::new();
    let options = sink.options(&db, &nats);
    let js = nats.jetstream().await?;
    let node = start_node("node-a", &options, &db).await?;
    traffic(&client(&node, auth::TENANT), 3).await?;
    wait_delivered(&db, &js, &sink.stream, &node).await?;
    let events = outbox(&db).await?.len();
    node.stop().await?;

    // As if the node had died after its PubAcks but before it moved its position: the
    // next node starts from the beginning and publishes every event again.
    sqlx::query("UPDATE event_consumers SET after_tx = 0, after_ordinal = -1 WHERE name = 'nats'")
        .execute(&db.pool)
        .await?;
    let node = start_node("node-b", &options, &db).await?;
    assert!(
        eventually(WAIT, || async {
            caught_up(&db).await.unwrap_or(false)
                && published(&node, "duplicate").await.unwrap_or(0.0) == events as f64
        })
        .await,
        "node-b did not publish the {events} events again: {} duplicates",
        published(&node, "duplicate").await?
    );
    assert_eq!(published(&node, "stored").await?, 0.0);
    assert_eq!(stream_messages(&js, &sink.stream).await?, events as u64);
    let ids: HashSet<String> = read_stream(&js, &sink.stream)
        .await?
        .iter()
        .map(|m| serde_json::from_slice::<Value>(&m.payload).map(|b| b["eventId"].to_string()))
        .collect::<Result<_, _>>()?;
    assert_eq!(ids.len(), events, "each eventId once");

    // And it carries on with what comes next.
    let api = client(&node, auth::TENANT);
    let wallet = api.create_wallet().await?;
    api.operate(wallet, "DEPOSIT", "2.00", None).await?;
    wait_delivered(&db, &js, &sink.stream, &node).await?;
    assert_eq!(stream_messages(&js, &sink.stream).await?, events as u64 + 2);
    node.stop().await
}

#[tokio::test]
async fn a_nats_outage_leaves_writes_alone_and_the_sink_catches_up() -> anyhow::Result<()> {
    let Some(mut nats) = NatsServer::start("nats::a_nats_outage_leaves_writes_alone").await? else {
        return Ok(());
    };
    let db = TestDatabase::create().await?;
    let sink = Sink::new();
    let node = start_node("node-a", &sink.options(&db, &nats), &db).await?;
    let api = client(&node, auth::TENANT);
    let wallet = api.create_wallet().await?;
    api.operate(wallet, "DEPOSIT", "1.00", None).await?;
    let js = nats.jetstream().await?;
    wait_delivered(&db, &js, &sink.stream, &node).await?;

    nats.kill().await?;
    for _ in 0..20 {
        let answer = api.operate(wallet, "DEPOSIT", "1.00", None).await?;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    }
    assert_eq!(
        api.balance(wallet).await?,
        rust_decimal::Decimal::new(2100, 2)
    );
    assert!(
        !caught_up(&db).await?,
        "nothing moves the position while NATS is down"
    );

    nats.restart().await?;
    let js = nats.jetstream().await?;
    // The sink catches up once NATS is back.
    wait_delivered(&db, &js, &sink.stream, &node).await?;
    let ids: HashSet<String> = read_stream(&js, &sink.stream)
        .await?
        .iter()
        .map(|m| serde_json::from_slice::<Value>(&m.payload).map(|b| b["eventId"].to_string()))
        .collect::<Result<_, _>>()?;
    assert_eq!(ids.len(), outbox(&db).await?.len());
    node.stop().await
}

/// The sink's claim as PostgreSQL shows it: a session of the test's database idle in a
/// transaction that holds an advisory lock. (backend pid, transaction start, its xid).
async fn open_claim(db: &TestDatabase) -> anyhow::Result<Option<(i32, String, Option<String>)>> {
    Ok(sqlx::query_as(
        "SELECT a.pid, a.xact_start::text, a.backend_xid::text FROM pg_stat_activity a \
         JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'advisory' AND l.granted \
         WHERE a.datname = current_database() AND a.state = 'idle in transaction' LIMIT 1",
    )
    .fetch_optional(&db.pool)
    .await?)
}

#[tokio::test]
async fn a_stalled_nats_holds_no_reader_of_the_outbox_back() -> anyhow::Result<()> {
    let Some(nats) =
        NatsServer::start("nats::a_stalled_nats_holds_no_reader_of_the_outbox_back").await?
    else {
        return Ok(());
    };
    let db = TestDatabase::create().await?;
    let sink = Sink::new();
    let mut options = sink.options(&db, &nats);
    // A page waits this long for its acks: the claim stays open as long.
    options.extra.push((
        "WALLET_EVENTS_NATS_TIMEOUT_MS".to_owned(),
        "10000".to_owned(),
    ));
    let node = start_node("node-a", &options, &db).await?;
    let api = client(&node, auth::TENANT);
    let wallet = api.create_wallet().await?;
    let js = nats.jetstream().await?;
    wait_delivered(&db, &js, &sink.stream, &node).await?;
    let before = outbox(&db)
        .await?
        .last()
        .map(|e| e.cursor)
        .unwrap_or(EventCursor::START);

    // Stopped, NATS keeps its connections but answers nothing: the sink claims a page,
    // publishes into the void and waits for acks that never come.
    nats.pause()?;
    let mut deposits = 0;
    let mut seen = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !seen && deposits < 500 && tokio::time::Instant::now() < deadline {
        let answer = api.operate(wallet, "DEPOSIT", "1.00", None).await?;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        deposits += 1;
        let Some(claim) = open_claim(&db).await? else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // The claim has no transaction id, so the horizon passes it: while it is open,
        // the pull API gets to every deposit committed so far. (The horizon is the whole
        // server's: other tests' transactions may hold it back a moment, hence the poll.)
        assert_eq!(claim.2, None, "the sink's claim holds a transaction id");
        while !seen && open_claim(&db).await? == Some(claim.clone()) {
            let page = api
                .get(&format!(
                    "/api/v1/events?walletId={wallet}&limit=1000&after={}",
                    before.encode()
                ))
                .await?;
            let items = page.body["items"].as_array().map_or(0, Vec::len);
            // Only if the claim was open all along: the same session, the same transaction.
            seen = items == deposits && open_claim(&db).await? == Some(claim.clone());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    nats.resume()?;
    assert!(
        seen,
        "never saw the pull API answer while the sink's claim was open"
    );
    wait_delivered(&db, &js, &sink.stream, &node).await?;
    node.stop().await
}
