//! `apply`, `status` and `wait` against real PostgreSQL, as real processes.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;

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
        if line.contains("waiting for schema version 1, database at") {
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
        stdout(&out).contains("schema at version 1"),
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
        err.contains(
            "timed out after 2s waiting for schema version 1; database at 0 (no migrations table)"
        ),
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
        stderr(&out).contains("DATABASE_URL is not set"),
        "{}",
        describe(&out)
    );
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

    let err = migrate::apply_with(migrator, &url)
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
