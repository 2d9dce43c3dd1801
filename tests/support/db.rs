use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, Executor, PgConnection, PgPool};

use crate::{env_or, unique_name};

/// A database of its own for one test, migrated to the current schema.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDatabase {
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
        admin.close().await?;
        let url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => anyhow::bail!("DATABASE_ADMIN_URL has no database part"),
        };
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await?;
        Ok(Self { name, url, pool })
    }

    /// Applies `migrations/` as the migrator would.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        sqlx::migrate!("../migrations").run(&self.pool).await?;
        Ok(())
    }
}
