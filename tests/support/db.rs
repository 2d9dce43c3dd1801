use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, Executor, PgConnection, PgPool};

use crate::{env_or, unique_name};

/// The login the tests' nodes use: a member of `wallet_app` and nothing more, as in
/// production (see `migrations/0003_least_privilege.sql`).
pub const APP_LOGIN: &str = "wallet_test_node";
const APP_PASSWORD: &str = "wallet";

/// A database of its own for one test, migrated to the current schema.
pub struct TestDatabase {
    pub name: String,
    /// As the admin user, who created the database and runs the migrations (its owner).
    pub url: String,
    /// As `APP_LOGIN`: what a node connects with.
    pub app_url: String,
    /// As the admin user.
    pub pool: PgPool,
}

impl TestDatabase {
    /// A node's `Store` over two connections of the app role, every pool one and the same:
    /// for tests that call the store directly, without a node's workers beside them.
    pub async fn app_store(&self) -> anyhow::Result<wallet::store::Store> {
        use wallet::store::{Pools, Store, Timeouts};
        let app = PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.app_url)
            .await?;
        Ok(Store::new(
            Pools {
                reads: app.clone(),
                commits: app.clone(),
                control: app.clone(),
                deliveries: app,
            },
            Timeouts {
                commit: std::time::Duration::from_secs(5),
                read: std::time::Duration::from_secs(5),
            },
        ))
    }

    pub async fn create() -> anyhow::Result<Self> {
        let db = Self::create_empty().await?;
        db.migrate().await?;
        Ok(db)
    }

    /// A migrated database on the server of `admin_url` (a test's private one, say).
    pub async fn create_on(admin_url: &str) -> anyhow::Result<Self> {
        let db = Self::create_empty_on(admin_url).await?;
        db.migrate().await?;
        Ok(db)
    }

    /// A database the migrator has not run on yet.
    pub async fn create_empty() -> anyhow::Result<Self> {
        let admin_url = env_or(
            "DATABASE_ADMIN_URL",
            "postgres://wallet:wallet@127.0.0.1:55432/postgres",
        );
        Self::create_empty_on(&admin_url).await
    }

    async fn create_empty_on(admin_url: &str) -> anyhow::Result<Self> {
        let name = unique_name("test");
        let mut admin = PgConnection::connect(admin_url).await?;
        admin
            .execute(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
            .await?;
        ensure_app_login(&mut admin).await?;
        admin.close().await?;
        let url = with_database(admin_url, &name)?;
        let mut app_url = reqwest::Url::parse(&url)?;
        app_url
            .set_username(APP_LOGIN)
            .and_then(|()| app_url.set_password(Some(APP_PASSWORD)))
            .map_err(|()| anyhow::anyhow!("DATABASE_ADMIN_URL cannot carry a user"))?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await?;
        Ok(Self {
            name,
            url,
            app_url: app_url.into(),
            pool,
        })
    }

    /// Applies `migrations/` as the migrator would.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        sqlx::migrate!("../migrations").run(&self.pool).await?;
        Ok(())
    }
}

/// `url` with its database part replaced by `name`, the query (TLS settings) kept.
pub fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let mut url = reqwest::Url::parse(url)?;
    anyhow::ensure!(
        url.path().len() > 1,
        "DATABASE_ADMIN_URL has no database part"
    );
    url.set_path(&format!("/{name}"));
    Ok(url.into())
}

/// Creates `wallet_app` (as the migration would) and the tests' app login in it, once
/// per server. Tests of several processes race here: losing a race to create is fine.
async fn ensure_app_login(admin: &mut PgConnection) -> anyhow::Result<()> {
    let sql = format!(
        "DO $$ BEGIN \
           BEGIN CREATE ROLE wallet_app NOLOGIN; \
           EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END; \
           BEGIN CREATE ROLE {APP_LOGIN} LOGIN PASSWORD '{APP_PASSWORD}' IN ROLE wallet_app; \
           EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END; \
         END $$"
    );
    let mut last = None;
    for _ in 0..5 {
        if is_member(admin).await? {
            return Ok(());
        }
        match admin.execute(sqlx::AssertSqlSafe(sql.clone())).await {
            Ok(_) => {}
            Err(error) => last = Some(error),
        }
    }
    if is_member(admin).await? {
        return Ok(());
    }
    Err(last.map_or_else(
        || anyhow::anyhow!("{APP_LOGIN} is not a member of wallet_app"),
        anyhow::Error::from,
    ))
}

async fn is_member(admin: &mut PgConnection) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_auth_members m \
         JOIN pg_roles r ON r.oid = m.roleid JOIN pg_roles u ON u.oid = m.member \
         WHERE r.rolname = 'wallet_app' AND u.rolname = $1)",
    )
    .bind(APP_LOGIN)
    .fetch_one(&mut *admin)
    .await?)
}
