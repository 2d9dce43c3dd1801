//! Schema migrations against PostgreSQL: `apply`, `status` and `wait`.
//!
//! The SQL lives in the repository's `migrations/` folder and is embedded into the
//! binary, so the image that runs a release is also the one that knows its schema.

use std::collections::BTreeSet;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection, Row};
use tokio::time::Instant;

/// sqlx's bookkeeping table; `wait` and `status` read it directly.
const MIGRATIONS_TABLE: &str = "_sqlx_migrations";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("DATABASE_URL is not a valid PostgreSQL URL: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("timed out after {0:?} connecting to the database")]
    ConnectTimeout(Duration),
    #[error("reading the applied migrations failed: {0}")]
    Query(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] MigrateError),
    #[error("the database was not reachable within {waited:?}: {last}")]
    DatabaseUnavailable { waited: Duration, last: String },
    #[error(
        "this build's migrations reach version {latest}, not the target {target}: use a migrator image of the release that needs {target}"
    )]
    TargetUnreachable { target: i64, latest: i64 },
    #[error(
        "the database has version(s) {unknown:?} that this build does not carry, below its newest ({latest}): the database has another migration history"
    )]
    UnknownOlderVersions { unknown: Vec<i64>, latest: i64 },
    #[error(
        "the database is at version {database}, newer than this build, yet misses this build's version(s) {pending:?}"
    )]
    PendingBelowNewer { pending: Vec<i64>, database: i64 },
    #[error(
        "timed out after {waited:?} waiting for schema version {wanted}; database at {current}"
    )]
    WaitTimeout {
        waited: Duration,
        wanted: i64,
        current: DatabaseVersion,
    },
}

impl Error {
    /// Whether running `apply` again later may succeed (the database was unreachable or
    /// busy), as opposed to a migration or a history that fails the same way every time.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect(_)
            | Error::ConnectTimeout(_)
            | Error::DatabaseUnavailable { .. }
            | Error::Query(_)
            | Error::WaitTimeout { .. } => true,
            Error::Migrate(MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _)) => {
                match e {
                    // lock_not_available (lock_timeout), serialization failure, deadlock.
                    sqlx::Error::Database(db) => {
                        matches!(db.code().as_deref(), Some("55P03" | "40001" | "40P01"))
                    }
                    sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
                    _ => false,
                }
            }
            Error::InvalidUrl(_)
            | Error::Migrate(_)
            | Error::TargetUnreachable { .. }
            | Error::UnknownOlderVersions { .. }
            | Error::PendingBelowNewer { .. } => false,
        }
    }
}

/// The migrations compiled into this binary.
pub fn migrator() -> Migrator {
    sqlx::migrate!("../../migrations")
}

/// The highest embedded migration: the schema version this build needs.
pub fn latest_version() -> i64 {
    migrator()
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| m.version)
        .max()
        .unwrap_or(0)
}

async fn connect(url: &SecretString) -> Result<PgConnection, Error> {
    let options: PgConnectOptions = url.expose_secret().parse().map_err(Error::InvalidUrl)?;
    let connecting = options.connect();
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(conn) => conn.map_err(Error::Connect),
        Err(_) => Err(Error::ConnectTimeout(CONNECT_TIMEOUT)),
    }
}

/// Connects, retrying for up to `timeout`: a migration Job often starts before its
/// database accepts connections (a StatefulSet still starting, a password not yet set).
async fn connect_within(url: &SecretString, timeout: Duration) -> Result<PgConnection, Error> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut next_log = started;
    loop {
        let error = match connect(url).await {
            Ok(conn) => return Ok(conn),
            Err(e @ Error::InvalidUrl(_)) => return Err(e),
            Err(e) => e,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::DatabaseUnavailable {
                waited: timeout,
                last: error.to_string(),
            });
        }
        if now >= next_log {
            tracing::info!("waiting for the database: {error}");
            next_log = now + Duration::from_secs(5);
        }
        tokio::time::sleep(Duration::from_secs(1).min(deadline - now)).await;
    }
}

/// How `apply` runs.
#[derive(Debug, Clone, Copy)]
pub struct ApplyOptions {
    /// The version the caller needs; `None` = every embedded migration.
    pub target: Option<i64>,
    /// How long to wait for the database to accept a connection.
    pub connect_timeout: Duration,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        Self {
            target: None,
            connect_timeout: CONNECT_TIMEOUT,
        }
    }
}

/// What `apply` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Versions this run applied (empty if another run or an earlier one had).
    pub applied: Vec<i64>,
    /// The schema version the database has after the run (its highest applied one).
    pub version: i64,
    /// Applied versions this build does not carry, all newer than its own: a newer
    /// release migrated the database (after a rollback, for example).
    pub newer: Vec<i64>,
}

/// Applies every pending embedded migration.
///
/// Takes sqlx's session advisory lock itself (instead of letting the migrator take
/// it) so it can read the applied set under the lock and report exactly what this
/// run did; concurrent runs therefore apply each migration once and the loser
/// reports "up to date".
pub async fn apply(url: &SecretString, opts: ApplyOptions) -> Result<ApplyReport, Error> {
    apply_with(migrator(), url, opts).await
}

/// `apply` with another set of migrations (tests use a folder of their own).
pub async fn apply_with(
    migrator: Migrator,
    url: &SecretString,
    opts: ApplyOptions,
) -> Result<ApplyReport, Error> {
    let latest = migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    if let Some(target) = opts.target
        && target > latest
    {
        // Before connecting: no database state can make this build reach the target.
        return Err(Error::TargetUnreachable { target, latest });
    }
    let mut conn = connect_within(url, opts.connect_timeout).await?;
    lock(&mut conn).await?;
    let result = apply_locked(migrator, &mut conn).await;
    // A failed unlock is harmless: the lock is session-scoped and dies with `conn`.
    let unlocked = conn.unlock().await;
    let report = result?;
    unlocked?;
    let _ = conn.close().await;
    Ok(report)
}

/// Takes sqlx's migration lock (the same key, so sqlx's own `unlock` releases it) by
/// polling `pg_try_advisory_lock` instead of blocking in `pg_advisory_lock`. A session
/// blocked in that statement holds a snapshot, and `CREATE INDEX CONCURRENTLY` in the
/// holder's migration waits for every older snapshot: the two would deadlock.
async fn lock(conn: &mut PgConnection) -> Result<(), Error> {
    const CRC_IEEE: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut *conn)
        .await
        .map_err(Error::Query)?;
    // sqlx-postgres' generate_lock_id.
    let key = 0x3d32_ad9e_i64 * i64::from(CRC_IEEE.checksum(database.as_bytes()));
    let mut reported = Instant::now();
    loop {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut *conn)
            .await
            .map_err(Error::Query)?;
        if locked {
            return Ok(());
        }
        if reported.elapsed() >= Duration::from_secs(10) {
            tracing::info!("waiting for another migration run to finish");
            reported = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn apply_locked(
    mut migrator: Migrator,
    conn: &mut PgConnection,
) -> Result<ApplyReport, Error> {
    conn.ensure_migrations_table(MIGRATIONS_TABLE).await?;
    let before: BTreeSet<i64> = conn
        .list_applied_migrations(MIGRATIONS_TABLE)
        .await?
        .into_iter()
        .map(|m| m.version)
        .collect();
    let embedded: BTreeSet<i64> = migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| m.version)
        .collect();
    let latest = embedded.last().copied().unwrap_or(0);
    let unknown: Vec<i64> = before.difference(&embedded).copied().collect();
    let newer = check_history(&unknown, &before, &embedded, latest)?;
    // We hold the lock already; the migrator must not take it a second time. Versions
    // this build does not carry are all newer (checked above): sqlx must not refuse them.
    migrator.set_locking(false);
    migrator.set_ignore_missing(!newer.is_empty());
    migrator.run(&mut *conn).await?;
    let after: BTreeSet<i64> = conn
        .list_applied_migrations(MIGRATIONS_TABLE)
        .await?
        .into_iter()
        .map(|m| m.version)
        .collect();
    Ok(ApplyReport {
        applied: after.difference(&before).copied().collect(),
        version: after.last().copied().unwrap_or(0),
        newer,
    })
}

/// A database migrated by a newer release is fine for an older one (migrations are
/// expand/contract), provided every version this build does not know is newer than all
/// it carries and none of its own is missing; anything else is another history.
fn check_history(
    unknown: &[i64],
    applied: &BTreeSet<i64>,
    embedded: &BTreeSet<i64>,
    latest: i64,
) -> Result<Vec<i64>, Error> {
    if unknown.is_empty() {
        return Ok(Vec::new());
    }
    let older: Vec<i64> = unknown.iter().copied().filter(|v| *v < latest).collect();
    if !older.is_empty() {
        return Err(Error::UnknownOlderVersions {
            unknown: older,
            latest,
        });
    }
    let pending: Vec<i64> = embedded.difference(applied).copied().collect();
    if !pending.is_empty() {
        return Err(Error::PendingBelowNewer {
            pending,
            database: applied.last().copied().unwrap_or(0),
        });
    }
    Ok(unknown.to_vec())
}

/// One embedded migration and whether the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationState {
    pub version: i64,
    pub description: String,
    pub state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Applied,
    Pending,
    /// Recorded as applied, but the embedded SQL differs from what was run.
    ChecksumMismatch,
    /// Recorded with success = false (a failed `-- no-transaction` migration).
    Dirty,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Applied => "applied",
            State::Pending => "pending",
            State::ChecksumMismatch => "applied, checksum differs from the embedded SQL",
            State::Dirty => "failed (dirty)",
        })
    }
}

/// The embedded migrations compared with the database's `_sqlx_migrations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub migrations: Vec<MigrationState>,
    /// Versions in the database that this build does not know (a newer release ran).
    pub unknown: Vec<i64>,
}

impl StatusReport {
    pub fn pending(&self) -> impl Iterator<Item = &MigrationState> {
        self.migrations.iter().filter(|m| m.state == State::Pending)
    }
}

pub async fn status(url: &SecretString) -> Result<StatusReport, Error> {
    let mut conn = connect(url).await?;
    let rows = if table_exists(&mut conn).await? {
        sqlx::query("SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .map_err(Error::Query)?
    } else {
        Vec::new()
    };
    let _ = conn.close().await;
    let mut recorded = std::collections::BTreeMap::new();
    for row in rows {
        let version: i64 = row.try_get("version").map_err(Error::Query)?;
        let success: bool = row.try_get("success").map_err(Error::Query)?;
        let checksum: Vec<u8> = row.try_get("checksum").map_err(Error::Query)?;
        recorded.insert(version, (success, checksum));
    }
    let migrator = migrator();
    let mut migrations = Vec::new();
    for m in migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
    {
        let state = match recorded.remove(&m.version) {
            None => State::Pending,
            Some((false, _)) => State::Dirty,
            Some((true, checksum)) if checksum != *m.checksum => State::ChecksumMismatch,
            Some((true, _)) => State::Applied,
        };
        migrations.push(MigrationState {
            version: m.version,
            description: m.description.to_string(),
            state,
        });
    }
    Ok(StatusReport {
        migrations,
        unknown: recorded.into_keys().collect(),
    })
}

async fn table_exists(conn: &mut PgConnection) -> Result<bool, Error> {
    sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
        .bind(MIGRATIONS_TABLE)
        .fetch_one(conn)
        .await
        .map_err(Error::Query)
}

/// The schema version as `wait` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseVersion {
    /// Highest successfully applied migration (0: the table exists but is empty).
    At(i64),
    /// No `_sqlx_migrations` table yet.
    NoMigrationsTable,
    /// Connecting or querying failed; the message says why.
    Unreachable(String),
}

impl DatabaseVersion {
    fn reached(&self, wanted: i64) -> bool {
        matches!(self, DatabaseVersion::At(v) if *v >= wanted)
    }
}

impl std::fmt::Display for DatabaseVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatabaseVersion::At(v) => write!(f, "{v}"),
            DatabaseVersion::NoMigrationsTable => f.write_str("0 (no migrations table)"),
            DatabaseVersion::Unreachable(why) => write!(f, "unknown (unreachable: {why})"),
        }
    }
}

/// Reads the schema version; every failure is a state, never an error, because an
/// init container must keep waiting through a database that is still starting.
pub async fn database_version(url: &SecretString) -> DatabaseVersion {
    let mut conn = match connect(url).await {
        Ok(conn) => conn,
        Err(e) => return DatabaseVersion::Unreachable(e.to_string()),
    };
    let version = match table_exists(&mut conn).await {
        Ok(false) => DatabaseVersion::NoMigrationsTable,
        Ok(true) => {
            match sqlx::query_scalar::<_, Option<i64>>(
                "SELECT max(version) FROM _sqlx_migrations WHERE success",
            )
            .fetch_one(&mut conn)
            .await
            {
                Ok(v) => DatabaseVersion::At(v.unwrap_or(0)),
                Err(e) => DatabaseVersion::Unreachable(e.to_string()),
            }
        }
        Err(e) => DatabaseVersion::Unreachable(e.to_string()),
    };
    let _ = conn.close().await;
    version
}

/// How `wait` polls and reports.
#[derive(Debug, Clone, Copy)]
pub struct WaitOptions {
    pub wanted: i64,
    pub timeout: Duration,
    pub poll_interval: Duration,
    pub log_interval: Duration,
}

impl WaitOptions {
    pub fn new(wanted: i64, timeout: Duration) -> Self {
        Self {
            wanted,
            timeout,
            poll_interval: Duration::from_secs(1),
            log_interval: Duration::from_secs(5),
        }
    }
}

/// Blocks until the schema is at least `wanted`; returns the version reached.
pub async fn wait(url: &SecretString, opts: WaitOptions) -> Result<i64, Error> {
    let started = Instant::now();
    let deadline = started + opts.timeout;
    let mut next_log = started;
    loop {
        let current = database_version(url).await;
        if let DatabaseVersion::At(v) = current
            && current.reached(opts.wanted)
        {
            tracing::info!(version = v, wanted = opts.wanted, "schema is ready");
            return Ok(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::WaitTimeout {
                waited: opts.timeout,
                wanted: opts.wanted,
                current,
            });
        }
        if now >= next_log {
            tracing::info!(
                "waiting for schema version {}, database at {current}",
                opts.wanted
            );
            next_log = now + opts.log_interval;
        }
        tokio::time::sleep(opts.poll_interval.min(deadline - now)).await;
    }
}

/// Parses `300s`, `5m`, `1h`, `500ms` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 300s, 5m, 500ms"))?;
    let seconds = |factor: u64| {
        n.checked_mul(factor)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("duration {text:?} is too large"))
    };
    match unit {
        "" | "s" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        "ms" => Ok(Duration::from_millis(n)),
        _ => Err(format!(
            "invalid duration unit in {text:?}: use ms, s, m or h"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("300s"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5 days").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn embedded_migrations_include_the_first_schema() {
        assert!(latest_version() >= 1);
        assert!(migrator().iter().any(|m| m.version == 1));
    }
}
