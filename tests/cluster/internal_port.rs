//! The internal (node-to-node) port serves only callers holding the shared secret,
//! and the public port does not serve the internal route at all.

use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::harness::TestCluster;

const INTERNAL_OPERATIONS: &str = "/internal/v1/operations";

#[tokio::test]
async fn the_internal_port_refuses_callers_without_the_shared_secret() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1, |_| {}).await?;
    let node = &cluster.nodes[0];
    let wallet = cluster.funded_wallets(1, "10.00").await?[0];
    // The shape of a forwarded command does not matter: authentication comes first.
    let body = json!({"walletId": wallet, "operationId": Uuid::new_v4()}).to_string();
    let http = reqwest::Client::new();
    let url = format!("{}{INTERNAL_OPERATIONS}", node.internal_url());

    let missing = http
        .post(&url)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);

    for wrong in [
        "Bearer wrong-secret".to_owned(),
        format!("Bearer {}x", cluster.options.internal_secret),
        cluster.options.internal_secret.clone(),
        format!("Basic {}", cluster.options.internal_secret),
    ] {
        let answer = http
            .post(&url)
            .header("content-type", "application/json")
            .header("authorization", &wrong)
            .body(body.clone())
            .send()
            .await?;
        assert_eq!(
            answer.status(),
            StatusCode::UNAUTHORIZED,
            "authorization {wrong:?}"
        );
    }

    // With the secret the request gets past authentication (and fails on the body).
    let right = http
        .post(&url)
        .header("content-type", "application/json")
        .header(
            "authorization",
            format!("Bearer {}", cluster.options.internal_secret),
        )
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(right.status(), StatusCode::BAD_REQUEST);

    let public = node
        .api
        .post_raw(
            INTERNAL_OPERATIONS,
            body,
            &[(
                "authorization",
                &format!("Bearer {}", cluster.options.internal_secret),
            )],
        )
        .await?;
    assert_eq!(public.status, StatusCode::NOT_FOUND, "{public:?}");

    // None of it touched the wallet.
    assert_eq!(node.api.balance(wallet).await?, "10.00".parse()?);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM operations WHERE wallet_id = $1")
        .bind(wallet)
        .fetch_one(&cluster.db.pool)
        .await?;
    assert_eq!(rows, 1);
    Ok(())
}
