//! Trace export: spans reach an OTLP receiver with the caller's trace id, also from
//! the owner a request was forwarded to.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use wallet_tests::{NodeOptions, NodeProcess, TestDatabase, eventually};

/// A minimal OTLP/HTTP receiver: keeps the raw protobuf bodies posted to /v1/traces.
async fn otlp_receiver() -> anyhow::Result<(String, Arc<Mutex<Vec<Vec<u8>>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let store = bodies.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    let mut request_line = true;
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" && !request_line {
                            break;
                        }
                        request_line = false;
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    store.lock().unwrap_or_else(|p| p.into_inner()).push(body);
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if reader.get_mut().write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((url, bodies))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[tokio::test]
async fn spans_arrive_at_the_otlp_receiver_with_the_callers_trace_id() -> anyhow::Result<()> {
    let (endpoint, bodies) = otlp_receiver().await?;
    let db = TestDatabase::create().await?;
    let mut options = NodeOptions::new(&db.app_url);
    options.extra.extend([
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), endpoint),
        ("OTEL_SERVICE_NAME".to_owned(), "wallet-test".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
    ]);
    let mut first = NodeProcess::start("node-a", &options).await?;
    let mut second = NodeProcess::start("node-b", &options).await?;
    let wallet = first.api.create_wallet().await?;

    // Send the operation to the node that does NOT own the wallet, so it is forwarded;
    // first wait until both nodes see each other and agree on the owner.
    let owner_seen_by = |admin_url: String| async move {
        let answer: serde_json::Value = reqwest::get(format!("{admin_url}/cluster/owner/{wallet}"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        Some(answer["owner"].clone())
    };
    let agreed = eventually(Duration::from_secs(20), || {
        let (a, b) = (first.admin_url.clone(), second.admin_url.clone());
        async move {
            let views = (owner_seen_by(a.clone()).await, owner_seen_by(b).await);
            let members: Option<serde_json::Value> = async {
                reqwest::get(format!("{a}/cluster"))
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()
            }
            .await;
            let both_members = members
                .is_some_and(|m| m["members"].as_array().is_some_and(|list| list.len() == 2));
            both_members && views.0.is_some() && views.0 == views.1
        }
    })
    .await;
    assert!(agreed, "the two nodes did not agree on the wallet's owner");
    let owner = owner_seen_by(first.admin_url.clone())
        .await
        .unwrap_or_default();
    let entry = if owner == "node-a" { &second } else { &first };
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let answer = wallet_tests::ApiClient::answer(
        entry
            .api
            .http
            .post(entry.api.url("/api/v1/wallet"))
            .header("traceparent", &traceparent)
            .json(&serde_json::json!({"walletId": wallet, "operationType": "DEPOSIT", "amount": "3.00"}))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");

    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16))
        .collect::<Result<_, _>>()?;
    // Both nodes export spans of this trace: the entry node's request span and the
    // owner's span of the forwarded operation, which continued the caller's traceparent.
    let arrived = eventually(Duration::from_secs(20), || {
        let bodies = bodies.clone();
        let trace_bytes = trace_bytes.clone();
        async move {
            let bodies = bodies.lock().unwrap_or_else(|p| p.into_inner());
            let with_trace: Vec<&Vec<u8>> = bodies
                .iter()
                .filter(|body| contains(body, &trace_bytes))
                .collect();
            let internal = with_trace
                .iter()
                .any(|body| contains(body, b"forwarded_operation"));
            let public = with_trace
                .iter()
                .any(|body| contains(body, b"/api/v1/wallet"));
            // The request span carries the answer's status as an attribute.
            let status = with_trace
                .iter()
                .any(|body| contains(body, b"http.response.status_code"));
            internal
                && public
                && status
                && with_trace.iter().any(|body| contains(body, b"wallet-test"))
        }
    })
    .await;
    assert!(
        arrived,
        "spans with trace id {trace_id} from both nodes did not arrive"
    );
    first.terminate().await?;
    second.terminate().await?;
    Ok(())
}
