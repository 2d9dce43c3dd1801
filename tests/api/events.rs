//! The outbox through the public API: pages with long polls, the Server-Sent Events
//! stream, the ledger's own events, and bad queries, each checked against PostgreSQL.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;
use wallet_tests::api::ApiClient;
use wallet_tests::events::event_id;
use wallet_tests::ledger;

use crate::single_node;

/// One event as a consumer received it.
#[derive(Debug, Clone)]
struct Received {
    event_id: Uuid,
    wallet_id: Uuid,
    sequence: i64,
    event_type: String,
    cursor: String,
    body: Value,
}

fn received(value: &Value) -> anyhow::Result<Received> {
    let uuid = |field: &str| -> anyhow::Result<Uuid> {
        Ok(value[field]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("{field} in {value}"))?
            .parse()?)
    };
    Ok(Received {
        event_id: uuid("eventId")?,
        wallet_id: uuid("walletId")?,
        sequence: value["sequence"]
            .as_i64()
            .ok_or_else(|| anyhow::anyhow!("sequence in {value}"))?,
        event_type: value["type"].as_str().unwrap_or_default().to_owned(),
        cursor: value["cursor"].as_str().unwrap_or_default().to_owned(),
        body: value.clone(),
    })
}

/// Pages from `after` until `count` events came, each page a long poll.
async fn pull(
    api: &ApiClient,
    query: &str,
    mut after: Option<String>,
    count: usize,
) -> anyhow::Result<(Vec<Received>, String)> {
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let cursor = after
            .as_deref()
            .map(|c| format!("&after={c}"))
            .unwrap_or_default();
        let answer = api
            .get(&format!("/api/v1/events?limit=137&wait=5{query}{cursor}"))
            .await?;
        anyhow::ensure!(answer.status == StatusCode::OK, "{answer:?}");
        for item in answer.body["items"].as_array().into_iter().flatten() {
            events.push(received(item)?);
        }
        after = answer.body["nextCursor"].as_str().map(str::to_owned);
        anyhow::ensure!(after.is_some(), "no nextCursor: {answer:?}");
        if events.len() >= count {
            return Ok((events, after.unwrap_or_default()));
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "pulled {} of {count} events",
            events.len()
        );
    }
}

/// An open event stream and the events parsed from it so far.
struct Stream {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
    /// Keep-alive comments seen.
    comments: usize,
}

impl Stream {
    async fn open(
        api: &ApiClient,
        query: &str,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut request = api
            .http
            .get(api.url(&format!("/api/v1/events/stream?{query}")))
            .timeout(Duration::from_secs(600));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await?;
        anyhow::ensure!(
            response.status() == StatusCode::OK,
            "stream: {} {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        anyhow::ensure!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        Ok(Self {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
            comments: 0,
        })
    }

    /// The next event; its SSE `id:` must be its cursor and `event:` its type.
    async fn next(&mut self, within: Duration) -> anyhow::Result<Received> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let mut id = None;
                let mut name = None;
                let mut data = String::new();
                for line in frame.lines() {
                    if let Some(value) = line.strip_prefix("id:") {
                        id = Some(value.trim().to_owned());
                    } else if let Some(value) = line.strip_prefix("event:") {
                        name = Some(value.trim().to_owned());
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.trim_start());
                    } else if line.starts_with(':') {
                        self.comments += 1;
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let event = received(&serde_json::from_str(&data)?)?;
                anyhow::ensure!(id.as_deref() == Some(event.cursor.as_str()), "{frame}");
                anyhow::ensure!(
                    name.as_deref() == Some(event.event_type.as_str()),
                    "{frame}"
                );
                return Ok(event);
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .map_err(|_| anyhow::anyhow!("no event within {within:?}"))?
                .ok_or_else(|| anyhow::anyhow!("the stream ended"))??;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

/// Every operation row's event id, with its wallet and sequence.
async fn committed_operations(pool: &sqlx::PgPool) -> anyhow::Result<HashMap<Uuid, (Uuid, i64)>> {
    let rows: Vec<(Uuid, Uuid, i64, String)> =
        sqlx::query_as("SELECT id, wallet_id, seq, status FROM operations")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(id, wallet, seq, status)| {
            let kind = if status == "APPLIED" {
                "operation.applied"
            } else {
                "operation.rejected"
            };
            (event_id(kind, id), (wallet, seq))
        })
        .collect())
}

/// The events are exactly the committed operations, once each, every wallet's in order.
fn check_exact(
    who: &str,
    events: &[Received],
    committed: &HashMap<Uuid, (Uuid, i64)>,
) -> anyhow::Result<()> {
    let mut seen = HashSet::new();
    let mut last: HashMap<Uuid, i64> = HashMap::new();
    for event in events {
        anyhow::ensure!(seen.insert(event.event_id), "{who}: {event:?} twice");
        let Some((wallet, seq)) = committed.get(&event.event_id) else {
            anyhow::bail!("{who}: {event:?} has no committed operation");
        };
        anyhow::ensure!(
            (*wallet, *seq) == (event.wallet_id, event.sequence),
            "{who}: {event:?} where wallet {wallet} seq {seq} was due"
        );
        if let Some(previous) = last.insert(event.wallet_id, event.sequence) {
            anyhow::ensure!(
                event.sequence > previous,
                "{who}: wallet {} seq {} after {previous}",
                event.wallet_id,
                event.sequence
            );
        }
    }
    anyhow::ensure!(
        seen.len() == committed.len(),
        "{who}: {} events for {} committed operations",
        seen.len(),
        committed.len()
    );
    Ok(())
}

#[tokio::test]
async fn a_puller_and_a_stream_see_exactly_the_committed_operations_of_a_concurrent_run()
-> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let api = &node.api;
    let mut wallets = Vec::new();
    for _ in 0..10 {
        wallets.push(api.create_wallet().await?);
    }
    let only_operations = "types=operation.applied,operation.rejected";
    let mut stream = Stream::open(api, only_operations, None).await?;

    // 1000 concurrent requests; withdrawals of 3.00 against deposits of 1.00 get
    // rejected now and then, and rejections are events too.
    let answers: Vec<StatusCode> = futures::stream::iter(0..1000)
        .map(|i| {
            let api = api.clone();
            let wallet = wallets[i % wallets.len()];
            async move {
                let (kind, amount) = if i % 4 == 3 {
                    ("WITHDRAW", "3.00")
                } else {
                    ("DEPOSIT", "1.00")
                };
                api.operate(wallet, kind, amount, None)
                    .await
                    .map(|answer| answer.status)
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let statuses: BTreeMap<u16, usize> = answers.iter().fold(BTreeMap::new(), |mut m, s| {
        *m.entry(s.as_u16()).or_default() += 1;
        m
    });
    assert!(
        answers
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::CONFLICT),
        "{statuses:?}"
    );

    let committed = committed_operations(&db.pool).await?;
    assert_eq!(committed.len(), 1000, "{statuses:?}");
    let (pulled, _) = pull(api, &format!("&{only_operations}"), None, committed.len()).await?;
    check_exact("pull", &pulled, &committed)?;

    let mut streamed = Vec::new();
    while streamed.len() < committed.len() {
        streamed.push(stream.next(Duration::from_secs(30)).await?);
    }
    check_exact("stream", &streamed, &committed)?;

    ledger::audit_ledger(&db.pool).await?.ensure_clean()?;
    Ok(())
}

#[tokio::test]
async fn the_stream_resumes_after_a_dropped_connection_without_gaps() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let api = &node.api;
    let wallet = api.create_wallet().await?;
    for _ in 0..30 {
        api.operate(wallet, "DEPOSIT", "1.00", None).await?;
    }
    let query = format!("walletId={wallet}");
    let mut first = Stream::open(api, &query, None).await?;
    let mut got = Vec::new();
    for _ in 0..12 {
        got.push(first.next(Duration::from_secs(30)).await?);
    }
    drop(first);
    for _ in 0..30 {
        api.operate(wallet, "DEPOSIT", "1.00", None).await?;
    }
    let last = got.last().map(|e| e.cursor.clone()).unwrap_or_default();
    // A wrong `after` is ignored when Last-Event-ID is there: it is what a browser resends.
    let mut second = Stream::open(
        api,
        &format!("{query}&after={}", got[0].cursor),
        Some(&last),
    )
    .await?;
    // wallet.created, then 60 deposits.
    while got.len() < 61 {
        got.push(second.next(Duration::from_secs(30)).await?);
    }
    let sequences: Vec<i64> = got.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (0..=60).collect::<Vec<_>>());
    assert_eq!(got[0].event_type, "wallet.created");
    assert_eq!(got[0].event_id, event_id("wallet.created", wallet));
    // Nothing more: the next read waits, it does not repeat anything.
    assert!(second.next(Duration::from_millis(1500)).await.is_err());
    ledger::audit_ledger(&db.pool).await?.ensure_clean()?;
    Ok(())
}

#[tokio::test]
async fn a_long_poll_is_answered_by_the_event_it_waited_for() -> anyhow::Result<()> {
    let (_db, node) = single_node().await?;
    let api = node.api.clone();
    let wallet = api.create_wallet().await?;
    let (created, cursor) = pull(&api, &format!("&walletId={wallet}"), None, 1).await?;
    assert_eq!(created.len(), 1);
    // Drained: no wait, no items, and a cursor to continue from.
    let empty = api
        .get(&format!("/api/v1/events?walletId={wallet}&after={cursor}"))
        .await?;
    assert_eq!(empty.status, StatusCode::OK, "{empty:?}");
    assert_eq!(empty.body["items"].as_array().map(Vec::len), Some(0));
    let cursor = empty.body["nextCursor"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    let poller = {
        let api = api.clone();
        tokio::spawn(async move {
            api.get(&format!(
                "/api/v1/events?walletId={wallet}&after={cursor}&wait=30"
            ))
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !poller.is_finished(),
        "the long poll answered before any event"
    );
    let deposit = api.operate(wallet, "DEPOSIT", "2.50", None).await?;
    assert_eq!(deposit.status, StatusCode::OK);
    let answer = poller.await??;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    let items = answer.body["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "{answer:?}");
    let event = &items[0];
    assert_eq!(event["type"], "operation.applied");
    assert_eq!(event["data"]["operationId"], deposit.body["operationId"]);
    assert_eq!(event["data"]["amount"], "2.50");
    assert_eq!(event["data"]["balanceAfter"], "2.50");
    assert_eq!(event["sequence"], 1);
    assert_eq!(event["tenant"], wallet_tests::auth::TENANT);
    Ok(())
}

/// The events of one wallet, by type, from the pull API.
async fn events_of(api: &ApiClient, wallet: Uuid, count: usize) -> anyhow::Result<Vec<Received>> {
    Ok(pull(api, &format!("&walletId={wallet}"), None, count)
        .await?
        .0)
}

#[tokio::test]
async fn transfers_and_holds_have_their_events() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let api = &node.api;
    let from = api.create_wallet().await?;
    let to = api.create_wallet().await?;
    api.operate(from, "DEPOSIT", "10.00", None).await?;

    let posted = api.transfer(from, to, "4.00", None).await?;
    assert_eq!(posted.status, StatusCode::OK, "{posted:?}");
    let transfer_id: Uuid = posted.body["transferId"]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    let rejected = api.transfer(from, to, "100.00", None).await?;
    assert_eq!(rejected.status, StatusCode::CONFLICT, "{rejected:?}");
    let rejected_id: Uuid = rejected.body["transferId"]
        .as_str()
        .unwrap_or_default()
        .parse()?;

    let partial = api.create_hold(from, "3.00", None).await?;
    assert_eq!(partial.status, StatusCode::CREATED, "{partial:?}");
    let partial_id: Uuid = partial.body["holdId"]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    assert_eq!(
        api.capture_hold(partial_id, Some("1.00")).await?.status,
        StatusCode::OK
    );
    let voided = api.create_hold(from, "1.00", None).await?;
    let voided_id: Uuid = voided.body["holdId"].as_str().unwrap_or_default().parse()?;
    assert_eq!(api.void_hold(voided_id).await?.status, StatusCode::OK);
    let soon = (chrono::Utc::now() + chrono::Duration::milliseconds(600)).to_rfc3339();
    let expiring = api.create_hold(from, "1.00", Some(&soon)).await?;
    let expiring_id: Uuid = expiring.body["holdId"]
        .as_str()
        .unwrap_or_default()
        .parse()?;

    // Destination: wallet.created, the credit's operation.applied and transfer.posted.
    let at_destination = events_of(api, to, 3).await?;
    let posted_event = at_destination
        .iter()
        .find(|e| e.event_type == "transfer.posted")
        .ok_or_else(|| anyhow::anyhow!("{at_destination:?}"))?;
    assert_eq!(
        posted_event.event_id,
        event_id("transfer.posted", transfer_id)
    );
    assert_eq!(posted_event.body["data"]["fromWalletId"], from.to_string());
    assert_eq!(posted_event.body["data"]["status"], "POSTED");
    assert_eq!(posted_event.body["data"]["amount"], "4.00");

    // Source: created, deposit, debit, rejected debit + transfer.rejected, hold + created,
    // capture + captured, release (the rest: no event of its own), hold + created, release
    // + voided, hold + created, and (by the sweep) release + expired.
    let at_source = events_of(api, from, 18).await?;
    let kinds: Vec<&str> = at_source.iter().map(|e| e.event_type.as_str()).collect();
    let by_id = |id: Uuid| at_source.iter().find(|e| e.event_id == id);
    let rejected_event = by_id(event_id("transfer.rejected", rejected_id))
        .ok_or_else(|| anyhow::anyhow!("{kinds:?}"))?;
    assert_eq!(rejected_event.body["data"]["status"], "REJECTED");
    let captured =
        by_id(event_id("hold.captured", partial_id)).ok_or_else(|| anyhow::anyhow!("{kinds:?}"))?;
    assert_eq!(captured.body["data"]["capturedAmount"], "1.00");
    assert_eq!(captured.body["data"]["status"], "CAPTURED");
    assert!(
        by_id(event_id("hold.created", partial_id)).is_some(),
        "{kinds:?}"
    );
    assert!(
        by_id(event_id("hold.voided", voided_id)).is_some(),
        "{kinds:?}"
    );
    assert!(
        by_id(event_id("hold.expired", expiring_id)).is_some(),
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| k.starts_with("hold.")).count(),
        6,
        "{kinds:?}"
    );
    // One type only.
    let (only, _) = pull(
        api,
        &format!("&walletId={from}&types=hold.expired"),
        None,
        1,
    )
    .await?;
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].event_type, "hold.expired");

    ledger::audit_ledger(&db.pool).await?.ensure_clean()?;
    Ok(())
}

#[tokio::test]
async fn another_tenant_sees_none_of_the_events() -> anyhow::Result<()> {
    let (_db, node) = single_node().await?;
    let wallet = node.api.create_wallet().await?;
    node.api.operate(wallet, "DEPOSIT", "1.00", None).await?;
    let other = ApiClient::with_token(
        &node.api.base_url,
        Some(&wallet_tests::auth::token(
            "other",
            &wallet_tests::auth::ALL_SCOPES,
        )),
    );
    for query in ["", &format!("?walletId={wallet}")] {
        let answer = other.get(&format!("/api/v1/events{query}")).await?;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        assert_eq!(answer.body["items"], Value::Array(vec![]), "{answer:?}");
    }
    // The owner sees both.
    let (own, _) = pull(&node.api, "", None, 2).await?;
    assert_eq!(own.len(), 2);
    Ok(())
}

#[tokio::test]
async fn bad_event_queries_get_clear_4xx_problems() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let api = &node.api;
    let wallet = api.create_wallet().await?;
    let foreign_cursor =
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, "seq:5");
    let cases = [
        ("?after=not-a-cursor", "malformed-request"),
        (
            &format!("?after={foreign_cursor}") as &str,
            "malformed-request",
        ),
        ("?types=operation.deleted", "malformed-request"),
        ("?types=operation.applied,", "malformed-request"),
        ("?walletId=nope", "invalid-uuid"),
        ("?wait=31", "malformed-request"),
        ("?wait=-1", "malformed-request"),
        ("?wait=1.5", "malformed-request"),
        ("?limit=0", "malformed-request"),
        ("?limit=1001", "malformed-request"),
        ("?limit=ten", "malformed-request"),
        ("?type=hold.expired", "malformed-request"),
    ];
    for (query, problem) in cases {
        for path in ["/api/v1/events", "/api/v1/events/stream"] {
            // The stream has no limit or wait of its own, but the same parser.
            let answer = api.get(&format!("{path}{query}")).await?;
            assert_eq!(
                answer.status,
                StatusCode::BAD_REQUEST,
                "{path}{query}: {answer:?}"
            );
            assert!(
                answer.content_type.starts_with("application/problem+json"),
                "{answer:?}"
            );
            assert_eq!(
                answer.body["type"]
                    .as_str()
                    .map(|t| t.rsplit('/').next().unwrap_or(t)),
                Some(problem),
                "{path}{query}: {answer:?}"
            );
        }
    }
    let bad_resume = api
        .http
        .get(api.url("/api/v1/events/stream"))
        .header("Last-Event-ID", "garbage")
        .send()
        .await?;
    assert_eq!(bad_resume.status(), StatusCode::BAD_REQUEST);

    // A cursor from before what pruning removed: 410, never a silent gap.
    let (events, _) = pull(api, &format!("&walletId={wallet}"), None, 1).await?;
    sqlx::query(
        "INSERT INTO events_pruned (through_tx, pruned_at) VALUES ((SELECT max(tx_id) + 1 FROM events), now())",
    )
    .execute(&db.pool)
    .await?;
    let expired = api
        .get(&format!("/api/v1/events?after={}", events[0].cursor))
        .await?;
    assert_eq!(expired.status, StatusCode::GONE, "{expired:?}");
    assert!(
        expired.body["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("cursor-expired")),
        "{expired:?}"
    );

    // The scope.
    let reader = ApiClient::with_token(
        &api.base_url,
        Some(&wallet_tests::auth::token(
            wallet_tests::auth::TENANT,
            &["wallets:read"],
        )),
    );
    for path in ["/api/v1/events", "/api/v1/events/stream"] {
        let answer = reader.get(path).await?;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{answer:?}");
        assert_eq!(answer.body["requiredScope"], "events:read");
    }
    Ok(())
}
