//! Least privilege (migrations/0003): the nodes' role records operations and moves
//! balances but cannot rewrite history, and the audit trail refuses changes from anyone,
//! the owner included, outside a maintenance transaction.

use reqwest::StatusCode;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use uuid::Uuid;
use wallet::store::Resolution;
use wallet_tests::db::APP_LOGIN;
use wallet_tests::{PrivatePostgres, TestDatabase};

use crate::single_node;

/// The SQLSTATE of a failed statement, or a description of why there is none.
fn code<T: std::fmt::Debug>(result: &Result<T, sqlx::Error>) -> String {
    match result {
        Ok(done) => format!("succeeded: {done:?}"),
        Err(sqlx::Error::Database(db)) => db.code().unwrap_or_default().into_owned(),
        Err(other) => format!("not a database error: {other}"),
    }
}

fn message<T: std::fmt::Debug>(result: &Result<T, sqlx::Error>) -> String {
    match result {
        Ok(done) => format!("succeeded: {done:?}"),
        Err(error) => error.to_string(),
    }
}

async fn app_pool(db: &TestDatabase) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(2)
        .connect(&db.app_url)
        .await?)
}

#[tokio::test]
async fn the_node_works_fully_as_the_app_role() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let created = node
        .api
        .post_raw("/api/v1/wallets", "{}", &[("Idempotency-Key", "create-1")])
        .await?;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let wallet: Uuid = created.body["walletId"]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    let replay = node
        .api
        .post_raw("/api/v1/wallets", "{}", &[("Idempotency-Key", "create-1")])
        .await?;
    assert_eq!(
        replay.body, created.body,
        "wallet creation replays its answer"
    );
    let deposit = node
        .api
        .operate(wallet, "DEPOSIT", "5.00", Some("pay-1"))
        .await?;
    assert_eq!(deposit.status, StatusCode::OK, "{deposit:?}");
    let rejected = node.api.operate(wallet, "WITHDRAW", "9.00", None).await?;
    assert_eq!(rejected.status, StatusCode::CONFLICT, "{rejected:?}");
    assert_eq!(node.api.balance(wallet).await?.to_string(), "5.00");
    let history = node
        .api
        .get(&format!("/api/v1/wallets/{wallet}/operations"))
        .await?;
    assert_eq!(history.status, StatusCode::OK, "{history:?}");
    let ready = reqwest::get(format!("{}/readyz", node.admin_url)).await?;
    assert_eq!(
        ready.status(),
        StatusCode::OK,
        "schema check as the app role"
    );

    // The node really ran as the app login, not as the admin the test connects with.
    let users: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT usename::text FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() \
         AND usename <> current_user",
    )
    .bind(&db.name)
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(users, vec![APP_LOGIN.to_owned()]);

    // The look-up of an ambiguous commit locks fences FOR UPDATE: that works too.
    let store = db.app_store().await?;
    let operation: Uuid = deposit.body["operationId"]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    let shards: Vec<u32> = sqlx::query_scalar("SELECT shard::bigint FROM shard_fences")
        .fetch_all(&db.pool)
        .await?
        .into_iter()
        .map(|shard: i64| shard as u32)
        .collect();
    assert!(
        !shards.is_empty(),
        "the node claimed its shards as the app role"
    );
    assert_eq!(
        store.resolve(&shards, &[operation]).await?,
        Resolution::Committed
    );
    node.stop().await
}

#[tokio::test]
async fn the_app_role_cannot_change_history_or_a_wallets_identity() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let wallet = node.api.create_wallet().await?;
    node.api.operate(wallet, "DEPOSIT", "5.00", None).await?;
    node.stop().await?;
    let app = app_pool(&db).await?;
    let denied = "42501"; // insufficient_privilege

    for statement in [
        "UPDATE operations SET amount = 1000",
        "UPDATE operations SET status = 'REJECTED', reason = 'x'",
        "DELETE FROM operations",
        "TRUNCATE operations",
        "UPDATE wallets SET id = gen_random_uuid()",
        "UPDATE wallets SET created_at = now() - interval '1 year'",
        "DELETE FROM wallets",
        "UPDATE idempotency_keys SET response_status = 500",
        "DELETE FROM idempotency_keys",
        "DELETE FROM shard_fences",
        "DELETE FROM _sqlx_migrations",
        "INSERT INTO wallets (id, balance, version, created_at) VALUES (gen_random_uuid(), 0, 0, now())",
        "CREATE TABLE extra (id int)",
    ] {
        let result = sqlx::query(statement).execute(&app).await;
        let refused = message(&result);
        assert_eq!(code(&result), denied, "{statement}: {refused}");
        // Refused by the grants, before any trigger.
        assert!(
            refused.contains("permission denied"),
            "{statement}: {refused}"
        );
    }
    // What the executors do is allowed: move the balance, version and updated_at.
    sqlx::query("UPDATE wallets SET balance = balance, version = version, updated_at = now()")
        .execute(&app)
        .await?;
    let operations: i64 = sqlx::query_scalar("SELECT count(*) FROM operations")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(operations, 1, "history unchanged");
    Ok(())
}

#[tokio::test]
async fn the_owner_is_refused_too_unless_the_maintenance_setting_is_on() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let wallet = node.api.create_wallet().await?;
    node.api.operate(wallet, "DEPOSIT", "5.00", None).await?;
    node.stop().await?;
    // The admin user created and migrated the database: owner and superuser.
    let owner = &db.pool;
    for statement in [
        "UPDATE operations SET amount = 1000",
        "DELETE FROM operations",
        "TRUNCATE operations",
    ] {
        let refused = message(&sqlx::query(statement).execute(owner).await);
        assert!(
            refused.contains("operations are the audit trail"),
            "{statement}: {refused}"
        );
    }

    let mut conn = owner.acquire().await?;
    let mut tx = conn.begin().await?;
    tx.execute("SET LOCAL wallet.maintenance = 'on'").await?;
    let changed = sqlx::query("UPDATE operations SET reason = NULL WHERE status = 'APPLIED'")
        .execute(&mut *tx)
        .await?
        .rows_affected();
    assert_eq!(changed, 1, "maintenance may change history on purpose");
    tx.commit().await?;
    // SET LOCAL ended with the transaction: the session is refused again.
    let refused = message(
        &sqlx::query("DELETE FROM operations")
            .execute(&mut *conn)
            .await,
    );
    assert!(refused.contains("audit trail"), "{refused}");
    Ok(())
}

/// On a server where the migration user may not create roles (managed PostgreSQL), the
/// migration names what is missing, and goes through once an administrator made it.
#[tokio::test]
async fn a_migration_user_without_createrole_is_told_to_have_the_role_created() -> anyhow::Result<()>
{
    let postgres = match PrivatePostgres::start().await {
        Ok(postgres) => postgres,
        Err(why) => {
            eprintln!(
                "SKIPPED a_migration_user_without_createrole_is_told_to_have_the_role_created: \
                 no private PostgreSQL can run here: {why}"
            );
            return Ok(());
        }
    };
    let admin_url = postgres.admin_url();
    let mut admin = PgConnection::connect(&admin_url).await?;
    admin.execute("CREATE ROLE migrator LOGIN").await?;
    admin
        .execute("CREATE DATABASE owned OWNER migrator")
        .await?;
    let mut url = reqwest::Url::parse(&wallet_tests::db::with_database(&admin_url, "owned")?)?;
    url.set_username("migrator")
        .map_err(|()| anyhow::anyhow!("no user in {admin_url}"))?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(url.as_str())
        .await?;
    let migrator = sqlx::migrate!("../migrations");

    let refused = match migrator.run(&pool).await {
        Ok(()) => "applied".to_owned(),
        Err(sqlx::migrate::MigrateError::ExecuteMigration(sqlx::Error::Database(db), _)) => {
            db.message().to_owned()
        }
        Err(other) => other.to_string(),
    };
    assert!(
        refused.contains("role wallet_app does not exist and migrator may not create roles"),
        "{refused}"
    );

    admin.execute("CREATE ROLE wallet_app NOLOGIN").await?;
    migrator.run(&pool).await?;
    let granted: bool = sqlx::query_scalar(
        "SELECT has_table_privilege('wallet_app', 'operations', 'INSERT') \
         AND NOT has_table_privilege('wallet_app', 'operations', 'UPDATE')",
    )
    .fetch_one(&pool)
    .await?;
    assert!(granted);
    Ok(())
}
