//! PostgreSQL itself crashes under load and comes back. The test runs its own server
//! (the shared one serves the other tests): while it is down nothing can commit, so
//! clients get deadline answers, and those must be true; once it accepts connections
//! again, writes resume.

use std::time::{Duration, Instant};

use wallet_tests::{PrivatePostgres, StopMode, TestDatabase, eventually};

use crate::harness::{Load, SETTLE, TestCluster, inspect, serial};

/// How long PostgreSQL stays down.
const OUTAGE: Duration = Duration::from_secs(3);
/// The requirement on how soon writes resume once PostgreSQL accepts connections
/// (reported, not asserted: timings are not asserted in tests).
const RESUME_TARGET: Duration = Duration::from_secs(5);
/// Acknowledged answers after the restart that count as "writes resumed".
const RESUMED: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_postgres_crashes_and_restarts_writes_resume_and_no_5xx_was_applied()
-> anyhow::Result<()> {
    let serial = serial().await;
    let mut postgres = match PrivatePostgres::start().await {
        Ok(postgres) => postgres,
        Err(why) => {
            eprintln!(
                "SKIPPED after_postgres_crashes_and_restarts_writes_resume_and_no_5xx_was_applied: \
                 no private PostgreSQL can run here: {why}"
            );
            return Ok(());
        }
    };
    let db = TestDatabase::create_on(&postgres.admin_url()).await?;
    let cluster = TestCluster::start_with(serial, db, 3, |options| {
        // Shorter than the outage: clients get deadline answers while their batches
        // wait for the database, and must be able to trust them.
        options.request_deadline_ms = 2_000;
    })
    .await?;
    let wallets = cluster.funded_wallets(20, "1000.00").await?;
    let load = Load::builder(&cluster, &wallets)
        .clients(24)
        .hot_share(50)
        .start();
    load.wait_progress(200, false).await?;

    // As a crash: every PostgreSQL process exits at once, commits in flight get no answer.
    postgres.stop(StopMode::Immediate).await?;
    let stopped_at = Instant::now();
    let acknowledged_before = load.acknowledged();
    // The outage itself lasts this long; nothing waits on it to synchronise.
    tokio::time::sleep(OUTAGE).await;
    let acknowledged_during = load.acknowledged() - acknowledged_before;
    let restarted_at = Instant::now();
    let accepting_at = postgres.restart().await?;

    let baseline = load.acknowledged();
    let resumed = eventually(SETTLE, || {
        std::future::ready(load.acknowledged() >= baseline + RESUMED)
    })
    .await;
    let resumed_after = accepting_at.elapsed();
    eprintln!(
        "PostgreSQL down for {:?} (accepting connections {:?} after its start); \
         {RESUMED} writes acknowledged {resumed_after:?} after it accepted connections ({} the {RESUME_TARGET:?} target); \
         {acknowledged_during} acknowledged while it was down",
        accepting_at - stopped_at,
        accepting_at - restarted_at,
        if resumed_after <= RESUME_TARGET {
            "within"
        } else {
            "NOT within"
        },
    );
    assert!(
        resumed,
        "writes did not resume within {SETTLE:?} of PostgreSQL accepting connections: {} acknowledged since",
        load.acknowledged() - baseline
    );
    cluster.wait_settled(3).await?;
    load.wait_progress(200, false).await?;
    let records = load.stop().await?;

    let report = inspect(&cluster, &wallets, &records, 1).await?;
    eprintln!("PostgreSQL restart summary: {}", report.summary());
    assert_eq!(
        report.lost, 0,
        "acknowledged but lost: {:#?}",
        report.examples
    );
    assert_eq!(report.duplicates, 0, "duplicates: {:#?}", report.examples);
    assert_eq!(
        report.untruthful, 0,
        "5xx answers whose operation was applied: {:#?}",
        report.examples
    );
    assert!(
        report.unexpected(&[503]).is_empty(),
        "{:?}",
        report.by_status
    );
    // No node died: every request got an HTTP answer.
    assert_eq!(
        report.transport_errors, 0,
        "{:?}",
        report.first_transport_error
    );
    assert_eq!(
        report.without_operation_id, 0,
        "answers without operationId (every answer must carry one): {:?}",
        report.by_status
    );
    Ok(())
}
