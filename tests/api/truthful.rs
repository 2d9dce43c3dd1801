//! Answers that never lie: 200 and 409 mean committed, every 5xx means not applied (now
//! or later), and every answer names its operation. Slow commits, late commit answers
//! and full queues are injected with triggers in the test's own database.

use futures::future::join_all;
use reqwest::StatusCode;
use uuid::Uuid;
use wallet_tests::api::Answer;
use wallet_tests::{InProcessNode, NodeOptions, TestDatabase};

async fn node(
    db: &TestDatabase,
    extra: &[(&str, &str)],
    deadline_ms: u64,
) -> anyhow::Result<InProcessNode> {
    let mut options = NodeOptions::new(&db.app_url);
    options.request_deadline_ms = deadline_ms;
    options.extra.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    InProcessNode::start("node-a", &options).await
}

async fn stored(db: &TestDatabase, operation_id: Uuid) -> anyhow::Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM operations WHERE id = $1")
            .bind(operation_id)
            .fetch_one(&db.pool)
            .await
            .map(|n: i64| n == 1)?,
    )
}

fn operation_id(answer: &Answer) -> Uuid {
    answer.body["operationId"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no operationId in {answer:?}"))
}

/// The first commit that inserts a row into `table` matching `when` sleeps `seconds`
/// at COMMIT (a deferred constraint trigger); then it raises if `fail`.
async fn slow_first_commit(
    db: &TestDatabase,
    table: &str,
    when: &str,
    seconds: f64,
    fail: bool,
) -> anyhow::Result<()> {
    let raise = if fail {
        "RAISE EXCEPTION 'injected failure at commit';"
    } else {
        ""
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SEQUENCE slow_{table}_commits;
         CREATE FUNCTION slow_{table}_commit() RETURNS trigger LANGUAGE plpgsql
         -- As its creator: the nodes' role may not use the sequence, and needs not.
         SECURITY DEFINER AS $$
         BEGIN
           -- nextval survives a rollback, so only the first commit is slow.
           IF {when} AND nextval('slow_{table}_commits') = 1 THEN
             PERFORM pg_sleep({seconds});
             {raise}
           END IF;
           RETURN NEW;
         END $$;
         CREATE CONSTRAINT TRIGGER slow_{table}_commit AFTER INSERT ON {table}
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_{table}_commit();"
    )))
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Every commit containing an operation of `amount` sleeps `seconds` at COMMIT, the
/// first time only; then it raises if `fail`.
async fn slow_commit_once(
    db: &TestDatabase,
    amount: &str,
    seconds: f64,
    fail: bool,
) -> anyhow::Result<()> {
    slow_first_commit(
        db,
        "operations",
        &format!("NEW.amount = {amount}"),
        seconds,
        fail,
    )
    .await
}

/// Sends a deposit of 1.11 (whose commit the test made slow), waits until that commit is
/// asleep in PostgreSQL, then sends 20 deposits of 2.00 that queue behind it; the first
/// must be 200. Returns the answers of the 20.
async fn behind_a_slow_batch(
    db: &TestDatabase,
    node: &InProcessNode,
    wallet: Uuid,
) -> anyhow::Result<Vec<Answer>> {
    let first = {
        let api = node.api.clone();
        tokio::spawn(async move { api.operate(wallet, "DEPOSIT", "1.11", None).await })
    };
    // Not a fixed pause: on a loaded machine the first request may not have reached the
    // shard yet, and the 20 would then go first or share its batch.
    slow_commit_started(db).await?;
    let queued = join_all((0..20).map(|_| node.api.operate(wallet, "DEPOSIT", "2.00", None))).await;
    let first = first.await??;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    queued.into_iter().collect()
}

/// Waits until a session of the test's database sleeps in the injected commit trigger.
async fn slow_commit_started(db: &TestDatabase) -> anyhow::Result<()> {
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let sleeping: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event = 'PgSleep'",
        )
        .fetch_one(&db.pool)
        .await?;
        if sleeping > 0 {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < give_up,
            "the slow commit never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Checks each answer against the database: a 200 is stored, a 503 is the problem
/// `problem` with Retry-After and is not stored. Returns (applied, refused).
async fn sort_answers(
    db: &TestDatabase,
    answers: Vec<Answer>,
    problem: &str,
) -> anyhow::Result<(i64, i64)> {
    let (mut applied, mut refused) = (0, 0);
    for answer in answers {
        let id = operation_id(&answer);
        match answer.status {
            StatusCode::OK => {
                applied += 1;
                assert!(stored(db, id).await?, "200 but not stored: {answer:?}");
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                refused += 1;
                assert_eq!(
                    answer.body["type"],
                    format!("https://wallet.dev/problems/{problem}")
                );
                assert!(answer.retry_after.is_some(), "{answer:?}");
                assert!(!stored(db, id).await?, "503 but applied: {answer:?}");
            }
            other => panic!("unexpected {other}: {answer:?}"),
        }
    }
    Ok((applied, refused))
}

#[tokio::test]
async fn a_commit_whose_answer_comes_too_late_is_looked_up_and_answered_200_once()
-> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    // The commit outlives the node's commit timeout, then succeeds on the server.
    slow_commit_once(&db, "21.21", 1.6, false).await?;
    let node = node(&db, &[("WALLET_COMMIT_TIMEOUT_MS", "800")], 10_000).await?;
    let wallet = node.api.create_wallet().await?;
    let answer = node.api.operate(wallet, "DEPOSIT", "21.21", None).await?;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert!(stored(&db, operation_id(&answer)).await?);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM operations WHERE wallet_id = $1")
        .bind(wallet)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, 1, "applied once");
    assert_eq!(node.api.balance(wallet).await?.to_string(), "21.21");
    let metrics = reqwest::get(format!("{}/metrics", node.admin_url))
        .await?
        .text()
        .await?;
    assert!(
        metrics.lines().any(|line| line
            .starts_with("wallet_batch_failures_total{reason=\"ambiguous\"}")
            && !line.ends_with(" 0")),
        "the ambiguous commit is counted"
    );
    node.stop().await
}

#[tokio::test]
async fn a_commit_that_fails_after_the_timeout_is_looked_up_retried_and_applied_once()
-> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    slow_commit_once(&db, "22.22", 1.6, true).await?;
    let node = node(&db, &[("WALLET_COMMIT_TIMEOUT_MS", "800")], 10_000).await?;
    let wallet = node.api.create_wallet().await?;
    let answer = node.api.operate(wallet, "DEPOSIT", "22.22", None).await?;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert!(stored(&db, operation_id(&answer)).await?);
    assert_eq!(node.api.balance(wallet).await?.to_string(), "22.22");
    node.stop().await
}

#[tokio::test]
async fn commands_whose_deadline_passes_in_the_queue_are_503_and_never_applied()
-> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    // The first batch holds the shard for 1.8 s; what queues behind it expires. The first
    // command itself must be planned within the deadline even while the rest of the
    // suite loads the machine: 1 s, not a few hundred ms. A 10 s lease makes the commit
    // timeout 2 s, so the slow commit still ends within it.
    slow_commit_once(&db, "1.11", 1.8, false).await?;
    let mut options = NodeOptions::new(&db.app_url);
    options.request_deadline_ms = 1_000;
    options.lease_ttl_ms = 10_000;
    let node = InProcessNode::start("node-a", &options).await?;
    let wallet = node.api.create_wallet().await?;
    let queued = behind_a_slow_batch(&db, &node, wallet).await?;
    let (_, unavailable) = sort_answers(&db, queued, "service-unavailable").await?;
    assert!(unavailable > 0, "some commands expired in the queue");
    // Nothing answered 503 shows up later either.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM operations WHERE wallet_id = $1")
        .bind(wallet)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, 1 + 20 - unavailable);
    node.stop().await
}

#[tokio::test]
async fn a_full_shard_queue_answers_503_overloaded_at_once_and_applies_nothing()
-> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    slow_commit_once(&db, "1.11", 1.0, false).await?;
    let node = node(&db, &[("WALLET_SHARD_QUEUE_MAX", "2")], 10_000).await?;
    let wallet = node.api.create_wallet().await?;
    let queued = behind_a_slow_batch(&db, &node, wallet).await?;
    let (applied, overloaded) = sort_answers(&db, queued, "overloaded").await?;
    assert!(
        overloaded > 0 && applied > 0,
        "{overloaded} overloaded, {applied} applied"
    );
    assert_eq!(
        node.api.balance(wallet).await?,
        rust_decimal::Decimal::new(111 + 200 * applied, 2)
    );
    node.stop().await
}

#[tokio::test]
async fn every_answer_of_an_operation_names_its_operation_id() -> anyhow::Result<()> {
    let (_db, node) = crate::single_node().await?;
    let wallet = node.api.create_wallet().await?;
    let cases: Vec<(String, StatusCode)> = vec![
        ("{".to_owned(), StatusCode::BAD_REQUEST),
        (
            format!(
                r#"{{"walletId":"{}","operationType":"DEPOSIT","amount":"1.00"}}"#,
                Uuid::now_v7()
            ),
            StatusCode::NOT_FOUND,
        ),
        (
            format!(r#"{{"walletId":"{wallet}","operationType":"DEPOSIT","amount":"1.001"}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            format!(r#"{{"walletId":"{wallet}","operationType":"WITHDRAW","amount":"5.00"}}"#),
            StatusCode::CONFLICT,
        ),
        (
            format!(r#"{{"walletId":"{wallet}","operationType":"DEPOSIT","amount":"5.00"}}"#),
            StatusCode::OK,
        ),
    ];
    for (body, status) in cases {
        let answer = node
            .api
            .post_raw("/api/v1/wallet", body.clone(), &[])
            .await?;
        assert_eq!(answer.status, status, "{body}: {answer:?}");
        operation_id(&answer);
    }
    node.stop().await
}

async fn wallets_in(db: &TestDatabase) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM wallets")
        .fetch_one(&db.pool)
        .await?)
}

#[tokio::test]
async fn a_wallet_creation_whose_commit_answer_comes_too_late_is_settled_and_answered_201_once()
-> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    slow_first_commit(&db, "wallets", "true", 1.6, false).await?;
    let node = node(&db, &[("WALLET_COMMIT_TIMEOUT_MS", "800")], 10_000).await?;
    let headers = [("idempotency-key", "late-commit")];
    let first = node.api.post_raw("/api/v1/wallets", "{}", &headers).await?;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let wallet: Uuid = first.body["walletId"]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    assert_eq!(wallets_in(&db).await?, 1, "created once");
    assert!(node.api.balance(wallet).await?.is_zero());
    let replay = node.api.post_raw("/api/v1/wallets", "{}", &headers).await?;
    assert_eq!(
        (replay.status, &replay.body),
        (StatusCode::CREATED, &first.body),
        "the key answers the first creation"
    );
    assert_eq!(wallets_in(&db).await?, 1);
    node.stop().await
}

#[tokio::test]
async fn a_wallet_creation_whose_commit_fails_after_the_timeout_is_created_once()
-> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    slow_first_commit(&db, "wallets", "true", 1.6, true).await?;
    let node = node(&db, &[("WALLET_COMMIT_TIMEOUT_MS", "800")], 10_000).await?;
    let answer = node.api.post_raw("/api/v1/wallets", "{}", &[]).await?;
    assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
    let wallet: Uuid = answer.body["walletId"]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    assert_eq!(wallets_in(&db).await?, 1, "created once");
    assert!(node.api.balance(wallet).await?.is_zero());
    node.stop().await
}
