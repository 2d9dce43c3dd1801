//! `apply`, `status` and `wait` against real PostgreSQL, as real processes.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;

use std::time::Duration;

use secrecy::SecretString;
use support::{TestDb, describe, stderr, stdout};
use wallet_migrator::migrate;

async fn applied_rows(db: &TestDb, version: i64) -> i64 {
    let mut conn = db.connect().await;
    sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE version = $1 AND success")
        .bind(version)
        .fetch_one(&mut conn)
        .await
        .expect("count applied migrations")
}

#[tokio::test]
async fn apply_then_status_shows_nothing_pending() {
    let db = TestDb::create().await;
    let latest = migrate::latest_version();

    let before = db.run(&["status"]);
    assert!(before.status.success(), "{}", describe(&before));
    assert!(
        stdout(&before).contains(&format!("pending: {}", 1)),
        "an empty database has everything pending: {}",
        describe(&before)
    );

    let apply = db.run(&["apply"]);
    assert!(apply.status.success(), "{}", describe(&apply));
    assert!(
        stdout(&apply).contains("applied version 1"),
        "{}",
        describe(&apply)
    );

    let again = db.run(&["apply"]);
    assert!(again.status.success(), "{}", describe(&again));
    assert_eq!(
        stdout(&again).trim(),
        format!("schema up to date at version {latest}")
    );

    let status = db.run(&["status"]);
    assert!(status.status.success(), "{}", describe(&status));
    assert!(
        stdout(&status).contains("pending: none"),
        "{}",
        describe(&status)
    );
    let report = migrate::status(&SecretString::from(db.url.clone()))
        .await
        .expect("status");
    assert_eq!(report.pending().count(), 0);
    assert!(
        report
            .migrations
            .iter()
            .all(|m| m.state == migrate::State::Applied)
    );

    // The schema really is there, not only the bookkeeping row.
    let mut conn = db.connect().await;
    let wallets: i64 = sqlx::query_scalar("SELECT count(*) FROM wallets")
        .fetch_one(&mut conn)
        .await
        .expect("wallets table exists");
    assert_eq!(wallets, 0);
}

#[tokio::test]
async fn concurrent_applies_both_succeed_and_apply_once() {
    let db = TestDb::create().await;
    let spawn = || {
        db.command(&["apply"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn apply")
    };
    let (first, second) = (spawn(), spawn());
    let outputs = [
        first.wait_with_output().expect("first apply"),
        second.wait_with_output().expect("second apply"),
    ];
    for out in &outputs {
        assert!(out.status.success(), "{}", describe(out));
    }
    let appliers = outputs
        .iter()
        .filter(|o| stdout(o).contains("applied version 1"))
        .count();
    assert_eq!(
        appliers,
        1,
        "exactly one run applies: {}\n{}",
        describe(&outputs[0]),
        describe(&outputs[1])
    );
    assert_eq!(applied_rows(&db, 1).await, 1);
}

#[tokio::test]
async fn wait_is_released_by_apply() {
    let db = TestDb::create().await;
    let mut wait = db
        .command(&["wait", "--timeout", "120s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wait");

    // Block until wait reports that it is waiting: the process state, not a timer.
    let mut reader = BufReader::new(wait.stderr.take().expect("piped stderr"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("read wait's stderr");
        assert!(n > 0, "wait exited without waiting:\n{seen}");
        seen.push_str(&line);
        if line.contains(&format!(
            "waiting for schema version {}, database at",
            migrate::latest_version()
        )) {
            break;
        }
    }
    assert!(
        wait.try_wait().expect("poll wait").is_none(),
        "wait must still be running before apply:\n{seen}"
    );
    // Keep draining so wait can never block on a full pipe.
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest);
        rest
    });

    let apply = db.run(&["apply"]);
    assert!(apply.status.success(), "{}", describe(&apply));

    let out = wait.wait_with_output().expect("wait finishes");
    let rest = drain.join().unwrap_or_default();
    assert!(
        out.status.success(),
        "wait exits 0 once the schema is there: {}\n{rest}",
        out.status
    );
    assert!(
        stdout(&out).contains(&format!("schema at version {}", migrate::latest_version())),
        "{}",
        stdout(&out)
    );
}

#[tokio::test]
async fn wait_times_out_on_an_empty_database() {
    let db = TestDb::create().await;
    let out = db.run(&["wait", "--timeout", "2s"]);
    assert!(!out.status.success(), "{}", describe(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "timed out after 2s waiting for schema version {}; database at 0 (no migrations table)",
            migrate::latest_version()
        )),
        "{}",
        describe(&out)
    );
}

#[tokio::test]
async fn wait_treats_an_unreachable_database_as_not_yet() {
    let mut cmd = std::process::Command::new(support::BIN);
    // Port 1 on loopback: nothing listens, connections are refused at once.
    let out = cmd
        .args(["wait", "--version", "1", "--timeout", "2s"])
        .env(
            "DATABASE_URL",
            "postgres://wallet:wallet@127.0.0.1:1/wallet",
        )
        .env("RUST_LOG", "info")
        .env_remove("WALLET_LOG_FORMAT")
        .output()
        .expect("run wait");
    assert!(!out.status.success(), "{}", describe(&out));
    let err = stderr(&out);
    assert!(
        err.contains("waiting for schema version 1, database at unknown (unreachable"),
        "{}",
        describe(&out)
    );
    assert!(err.contains("timed out after 2s"), "{}", describe(&out));
}

#[tokio::test]
async fn wait_for_a_version_already_applied_returns_at_once() {
    let db = TestDb::create().await;
    let apply = db.run(&["apply"]);
    assert!(apply.status.success(), "{}", describe(&apply));
    let out = db.run(&["wait", "--version", "1", "--timeout", "5s"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        !stderr(&out).contains("waiting for schema"),
        "{}",
        describe(&out)
    );
    let ahead = db.run(&["wait", "--version", "999", "--timeout", "2s"]);
    assert!(
        !ahead.status.success(),
        "a newer version than applied keeps waiting: {}",
        describe(&ahead)
    );
}

#[tokio::test]
async fn apply_without_database_url_fails_clearly() {
    let out = std::process::Command::new(support::BIN)
        .arg("apply")
        .env_remove("DATABASE_URL")
        .output()
        .expect("run apply");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("DATABASE_URL (or DATABASE_URL_FILE) is not set"),
        "{}",
        describe(&out)
    );
}

#[tokio::test]
async fn apply_reads_the_database_url_from_a_mounted_file() {
    let db = TestDb::create().await;
    let file = std::env::temp_dir().join(format!("{}.url", db.name));
    // As a Kubernetes Secret mounts it: the value with a trailing newline.
    std::fs::write(&file, format!("{}\n", db.url)).expect("write the URL file");
    let mut apply = db.command(&["apply"]);
    apply
        .env_remove("DATABASE_URL")
        .env("DATABASE_URL_FILE", &file);
    let out = apply.output().expect("run apply");
    assert!(out.status.success(), "{}", describe(&out));
    let status = db.run(&["status"]);
    assert!(
        stdout(&status).contains("pending: none"),
        "{}",
        describe(&status)
    );
    // Both at once is refused rather than one silently winning.
    let mut both = db.command(&["status"]);
    both.env("DATABASE_URL_FILE", &file);
    let out = both.output().expect("run status");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not both"), "{}", describe(&out));
    std::fs::remove_file(&file).expect("remove the URL file");
}

#[tokio::test]
async fn a_failing_migration_fails_apply_and_leaves_earlier_ones_applied() {
    let db = TestDb::create().await;
    let dir = std::env::temp_dir().join(format!("wallet-migrator-{}", db.name));
    std::fs::create_dir_all(&dir).expect("temp migrations dir");
    std::fs::write(dir.join("0001_good.sql"), "CREATE TABLE good (id INT);").expect("write");
    std::fs::write(
        dir.join("0002_bad.sql"),
        "ALTER TABLE missing ADD COLUMN x INT;",
    )
    .expect("write");
    let migrator = sqlx::migrate::Migrator::new(dir.as_path())
        .await
        .expect("read migrations");
    let url = SecretString::from(db.url.clone());

    let err = migrate::apply_with(migrator, &url, migrate::ApplyOptions::default())
        .await
        .expect_err("the second migration fails");
    let _ = std::fs::remove_dir_all(&dir);
    let text = err.to_string();
    assert!(text.contains("migration failed"), "{text}");
    assert!(text.contains("while executing migration 2"), "{text}");
    assert!(text.contains("\"missing\" does not exist"), "{text}");
    assert_eq!(applied_rows(&db, 1).await, 1, "version 1 stays applied");
    assert_eq!(
        applied_rows(&db, 2).await,
        0,
        "the failed migration is not recorded"
    );
    assert_eq!(
        migrate::database_version(&url).await,
        migrate::DatabaseVersion::At(1)
    );
}

/// A folder of migrations, one file per (version, SQL), removed on drop.
struct MigrationsDir(std::path::PathBuf);

impl MigrationsDir {
    fn new(db: &TestDb, tag: &str, files: &[(i64, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("wallet-migrator-{}-{tag}", db.name));
        std::fs::create_dir_all(&dir).expect("temp migrations dir");
        for (version, sql) in files {
            std::fs::write(dir.join(format!("{version:04}_step.sql")), sql).expect("write");
        }
        Self(dir)
    }

    async fn migrator(&self) -> sqlx::migrate::Migrator {
        sqlx::migrate::Migrator::new(self.0.as_path())
            .await
            .expect("read migrations")
    }
}

impl Drop for MigrationsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn with_target(target: i64) -> migrate::ApplyOptions {
    migrate::ApplyOptions {
        target: Some(target),
        ..migrate::ApplyOptions::default()
    }
}

#[tokio::test]
async fn an_older_build_accepts_a_database_a_newer_release_migrated() {
    // `helm rollback` across a schema change: the old migrator meets version 2.
    let db = TestDb::create().await;
    let url = SecretString::from(db.url.clone());
    let newer = MigrationsDir::new(
        &db,
        "newer",
        &[
            (1, "CREATE TABLE a (id INT);"),
            (2, "CREATE TABLE b (id INT);"),
        ],
    );
    migrate::apply_with(newer.migrator().await, &url, with_target(2))
        .await
        .expect("the newer release migrates");
    let older = MigrationsDir::new(&db, "older", &[(1, "CREATE TABLE a (id INT);")]);
    let report = migrate::apply_with(older.migrator().await, &url, with_target(1))
        .await
        .expect("the database is at the target or above");
    assert_eq!(report.applied, Vec::<i64>::new());
    assert_eq!(report.version, 2, "the version the database really has");
    assert_eq!(report.newer, vec![2]);
}

#[tokio::test]
async fn a_database_with_an_unknown_older_version_is_another_history() {
    let db = TestDb::create().await;
    let url = SecretString::from(db.url.clone());
    let theirs = MigrationsDir::new(
        &db,
        "theirs",
        &[
            (1, "CREATE TABLE a (id INT);"),
            (2, "CREATE TABLE b (id INT);"),
        ],
    );
    migrate::apply_with(theirs.migrator().await, &url, with_target(2))
        .await
        .expect("migrated");
    let ours = MigrationsDir::new(
        &db,
        "ours",
        &[
            (1, "CREATE TABLE a (id INT);"),
            (3, "CREATE TABLE c (id INT);"),
        ],
    );
    let err = migrate::apply_with(ours.migrator().await, &url, with_target(3))
        .await
        .expect_err("version 2 is not ours and older than our 3");
    assert!(
        matches!(err, migrate::Error::UnknownOlderVersions { ref unknown, latest: 3 } if unknown == &[2]),
        "{err}"
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn apply_with_a_target_exits_0_on_a_newer_database_and_reports_its_version() {
    let db = TestDb::create().await;
    let first = db.run(&["apply"]);
    assert!(first.status.success(), "{}", describe(&first));
    // What a newer release would leave behind: a version this build does not carry.
    let mut conn = db.connect().await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99999, 'from a newer release', true, '\\x00', 1)",
    )
    .execute(&mut conn)
    .await
    .expect("insert a newer version");

    let out = db.run(&["apply", "--target", "1"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        stdout(&out).contains(&format!(
            "database at version 99999, newer than this build's {}",
            migrate::latest_version()
        )),
        "{}",
        describe(&out)
    );
}

#[tokio::test]
async fn apply_fails_loudly_when_its_migrations_cannot_reach_the_target() {
    let db = TestDb::create().await;
    let out = db.run(&["apply", "--target", "999"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        stderr(&out).contains(&format!(
            "this build's migrations reach version {}, not the target 999",
            migrate::latest_version()
        )),
        "{}",
        describe(&out)
    );
}

/// The admin URL's host:port, where the test PostgreSQL listens.
fn postgres_addr(db: &TestDb) -> String {
    let after_at = db.url.rsplit_once('@').map_or("", |(_, rest)| rest);
    after_at.split('/').next().unwrap_or_default().to_owned()
}

/// Reads `child`'s stderr until a line contains `marker`; panics if it exits first.
fn read_until(
    child: &mut std::process::Child,
    marker: &str,
) -> BufReader<std::process::ChildStderr> {
    let mut reader = BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("read stderr");
        assert!(n > 0, "exited before logging {marker:?}:\n{seen}");
        seen.push_str(&line);
        if line.contains(marker) {
            return reader;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_waits_for_a_database_that_starts_late() {
    let db = TestDb::create().await;
    // A port with nothing behind it yet: the database "is still starting".
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let late_url = db
        .url
        .replace(&postgres_addr(&db), &format!("127.0.0.1:{port}"));
    let mut apply = std::process::Command::new(support::BIN)
        .args(["apply", "--connect-timeout", "60s"])
        .env("DATABASE_URL", &late_url)
        .env("RUST_LOG", "info")
        .env_remove("WALLET_LOG_FORMAT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn apply");
    let reader = read_until(&mut apply, "waiting for the database");
    let drain = std::thread::spawn(move || {
        let mut reader = reader;
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest);
        rest
    });

    // The database comes up: a proxy on that port to the real one.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the late port");
    let upstream = postgres_addr(&db);
    let proxy = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    let out = tokio::task::spawn_blocking(move || apply.wait_with_output())
        .await
        .expect("join")
        .expect("apply finishes");
    proxy.abort();
    let rest = drain.join().unwrap_or_default();
    assert!(out.status.success(), "{}\n{rest}", out.status);
    assert!(
        stdout(&out).contains("applied version 1"),
        "{}",
        stdout(&out)
    );
    assert_eq!(applied_rows(&db, 1).await, 1);
}

#[tokio::test]
async fn apply_gives_up_on_an_unreachable_database_after_its_timeout() {
    let out = std::process::Command::new(support::BIN)
        .args(["apply", "--connect-timeout", "2s"])
        .env(
            "DATABASE_URL",
            "postgres://wallet:wallet@127.0.0.1:1/wallet",
        )
        .env("RUST_LOG", "info")
        .env_remove("WALLET_LOG_FORMAT")
        .output()
        .expect("run apply");
    assert_eq!(
        out.status.code(),
        Some(1),
        "transient: not the permanent exit code 3: {}",
        describe(&out)
    );
    assert!(
        stderr(&out).contains("the database was not reachable within 2s"),
        "{}",
        describe(&out)
    );
}

#[tokio::test]
async fn wait_stops_at_once_on_sigterm() {
    // In a container the migrator is PID 1, which the kernel does not kill on a signal it
    // has no handler for; here (not PID 1) an unhandled SIGTERM would kill the process by
    // the signal. Exiting with 143 and a message shows the handler ran.
    let mut wait = std::process::Command::new(support::BIN)
        .args(["wait", "--version", "1", "--timeout", "300s"])
        .env(
            "DATABASE_URL",
            "postgres://wallet:wallet@127.0.0.1:1/wallet",
        )
        .env("RUST_LOG", "info")
        .env_remove("WALLET_LOG_FORMAT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wait");
    let mut reader = read_until(&mut wait, "waiting for schema version 1");
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &wait.id().to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success());
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = wait.try_wait().expect("poll wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "wait still runs 5 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    assert_eq!(status.code(), Some(143), "{status}\n{rest}");
    assert!(rest.contains("stopped by SIGTERM"), "{rest}");
}

/// What the Job of a WalletMigration with `caBundle` gets: `PGSSLROOTCERT` and `PGSSLMODE`
/// beside a URL that names neither. A wrong CA must then fail the connection (so the
/// variables are read), the right one must pass.
#[tokio::test]
async fn the_ca_bundle_variables_make_apply_verify_the_servers_certificate() {
    let (Ok(ca), Ok(other_ca)) = (
        std::env::var("WALLET_TLS_CA"),
        std::env::var("WALLET_TLS_OTHER_CA"),
    ) else {
        eprintln!(
            "SKIPPED the_ca_bundle_variables_make_apply_verify_the_servers_certificate: no WALLET_TLS_CA; run `source <(scripts/stack.sh env)`"
        );
        return;
    };
    let db = TestDb::create().await;
    assert!(!db.url.contains("sslmode"), "{}", db.url);
    let mut wrong = db.command(&["apply", "--connect-timeout", "2s"]);
    wrong
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &other_ca);
    let out = wrong.output().expect("run apply");
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        stderr(&out).to_lowercase().contains("certificate"),
        "{}",
        describe(&out)
    );
    let untouched: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NULL")
        .fetch_one(&mut db.connect().await)
        .await
        .expect("look for the migrations table");
    assert!(untouched, "nothing ran over the refused connection");

    let mut right = db.command(&["apply"]);
    right
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &ca);
    let out = right.output().expect("run apply");
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(applied_rows(&db, 1).await, 1);
}
