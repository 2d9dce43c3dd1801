//! SIGTERM: stop accepting, finish what is queued, exit 0.

use futures::future::join_all;
use reqwest::StatusCode;
use wallet_tests::{NodeOptions, NodeProcess, TestDatabase};

#[tokio::test]
async fn sigterm_finishes_in_flight_operations_and_exits_zero() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let mut node = NodeProcess::start("node-a", &NodeOptions::new(&db.app_url)).await?;
    let wallet = node.api.create_wallet().await?;

    let api = node.api.clone();
    let load = tokio::spawn(async move {
        join_all((0..400).map(|_| api.operate(wallet, "DEPOSIT", "1.00", None))).await
    });
    // Terminate once the node has started answering this burst.
    let started = wallet_tests::eventually(std::time::Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM operations")
            .fetch_one(&db.pool)
            .await
            .unwrap_or(0)
            > 0
    })
    .await;
    assert!(started);
    let exit = node.terminate().await?;
    assert!(exit.success(), "exit status {exit:?}");

    let answers = load.await?;
    let mut acknowledged = 0;
    for answer in answers {
        // A request that reached the node is answered; one that came after the listener
        // closed fails to connect, which a client can safely retry.
        match answer {
            Ok(answer) => {
                assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
                acknowledged += 1;
            }
            Err(error) => assert!(format!("{error:?}").contains("onnect"), "{error:?}"),
        }
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM operations WHERE wallet_id = $1")
        .bind(wallet)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(
        stored, acknowledged,
        "every answered operation is committed, nothing else"
    );
    let balance: rust_decimal::Decimal =
        sqlx::query_scalar("SELECT balance FROM wallets WHERE id = $1")
            .bind(wallet)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(balance, rust_decimal::Decimal::from(acknowledged));
    Ok(())
}
