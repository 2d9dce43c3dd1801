//! Races of the ledger on one node: concurrent captures and voids of one hold have
//! exactly one winner, and holds, withdrawals and outgoing transfers racing on a wallet
//! that lives on its overdraft never commit a row that takes it below its limit
//! (balance_after - held_after + the limit then >= 0, read from PostgreSQL in seq
//! order). Each test ends with the ledger audit of the whole database.

use std::collections::BTreeMap;

use futures::future::join_all;
use reqwest::StatusCode;
use rust_decimal::Decimal;
use uuid::Uuid;
use wallet_tests::api::Answer;
use wallet_tests::{ApiClient, TestDatabase, ledger};

use crate::single_node;

fn dec(text: &str) -> Decimal {
    text.parse().expect("decimal literal")
}

/// The decimal string `field` of an answer's body.
fn amount(answer: &Answer, field: &str) -> Decimal {
    answer.body[field]
        .as_str()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("no decimal {field} in {answer:?}"))
}

fn id(answer: &Answer, field: &str) -> Uuid {
    answer.body[field]
        .as_str()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {answer:?}"))
}

/// The last part of a problem's `type`. A hold-not-active problem names the hold's
/// current status in `holdStatus`, not `status`, which problem+json keeps
/// for the HTTP status.
fn problem(answer: &Answer) -> &str {
    answer.body["type"]
        .as_str()
        .and_then(|uri| uri.rsplit('/').next())
        .unwrap_or_default()
}

async fn funded(api: &ApiClient, amount: &str) -> anyhow::Result<Uuid> {
    let wallet = api.create_wallet().await?;
    let answer = api.operate(wallet, "DEPOSIT", amount, None).await?;
    anyhow::ensure!(answer.status == StatusCode::OK, "deposit: {answer:?}");
    Ok(wallet)
}

async fn active_hold(api: &ApiClient, wallet: Uuid, amount: &str) -> anyhow::Result<Uuid> {
    let answer = api.create_hold(wallet, amount, None).await?;
    anyhow::ensure!(
        answer.status == StatusCode::CREATED && answer.body["status"] == "ACTIVE",
        "hold: {answer:?}"
    );
    Ok(id(&answer, "holdId"))
}

/// The APPLIED rows of a hold: (type -> amounts).
async fn hold_rows(
    db: &TestDatabase,
    hold: Uuid,
) -> anyhow::Result<BTreeMap<String, Vec<Decimal>>> {
    let rows: Vec<(String, Decimal)> = sqlx::query_as(
        "SELECT operation_type, amount FROM operations \
         WHERE hold_id = $1 AND status = 'APPLIED' ORDER BY seq",
    )
    .bind(hold)
    .fetch_all(&db.pool)
    .await?;
    let mut by_type: BTreeMap<String, Vec<Decimal>> = BTreeMap::new();
    for (kind, amount) in rows {
        by_type.entry(kind).or_default().push(amount);
    }
    Ok(by_type)
}

fn rows(entries: &[(&str, &str)]) -> BTreeMap<String, Vec<Decimal>> {
    let mut by_type: BTreeMap<String, Vec<Decimal>> = BTreeMap::new();
    for (kind, amount) in entries {
        by_type
            .entry((*kind).to_owned())
            .or_default()
            .push(dec(amount));
    }
    by_type
}

/// No transfer left PENDING, and the ledger audit of the whole database is clean.
async fn audit_clean(db: &TestDatabase) -> anyhow::Result<ledger::LedgerAudit> {
    if let Err(left) = ledger::wait_no_pending(&db.pool, std::time::Duration::from_secs(10)).await?
    {
        anyhow::bail!("transfers still PENDING on a single node after 10 s: {left:#?}");
    }
    let audit = ledger::audit_ledger(&db.pool).await?;
    audit.ensure_clean()?;
    Ok(audit)
}

#[tokio::test]
async fn a_hundred_concurrent_captures_of_one_hold_capture_it_exactly_once() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let wallet = funded(&node.api, "100.00").await?;
    let hold = active_hold(&node.api, wallet, "40.00").await?;

    // Even ones capture all of it, odd ones 15.00 (the rest released): one of them wins.
    let answers =
        join_all((0..100).map(|i| node.api.capture_hold(hold, (i % 2 == 1).then_some("15.00"))))
            .await;
    let mut winners = Vec::new();
    let mut refused = 0;
    for (i, answer) in answers.into_iter().enumerate() {
        let answer = answer?;
        match answer.status {
            StatusCode::OK => {
                assert_eq!(answer.body["status"], "CAPTURED", "{answer:?}");
                winners.push((i, answer));
            }
            StatusCode::CONFLICT => {
                assert_eq!(problem(&answer), "hold-not-active", "{answer:?}");
                assert_eq!(answer.content_type, "application/problem+json");
                assert_eq!(answer.body["holdStatus"], "CAPTURED", "{answer:?}");
                refused += 1;
            }
            other => panic!("capture {i}: unexpected {other}: {answer:?}"),
        }
    }
    assert_eq!(
        (winners.len(), refused),
        (1, 99),
        "exactly one capture wins: {winners:?}"
    );
    let (winner, won) = &winners[0];
    let captured = if winner % 2 == 1 {
        dec("15.00")
    } else {
        dec("40.00")
    };
    assert_eq!(amount(won, "capturedAmount"), captured, "{won:?}");

    let view = node.api.get(&format!("/api/v1/holds/{hold}")).await?;
    assert_eq!(view.status, StatusCode::OK, "{view:?}");
    assert_eq!(view.body["status"], "CAPTURED");
    assert_eq!(amount(&view, "capturedAmount"), captured);
    let expected = if captured == dec("40.00") {
        rows(&[("HOLD", "40.00"), ("CAPTURE", "40.00")])
    } else {
        rows(&[
            ("HOLD", "40.00"),
            ("CAPTURE", "15.00"),
            ("RELEASE", "25.00"),
        ])
    };
    assert_eq!(hold_rows(&db, hold).await?, expected, "captured once");
    let wallet_view = node.api.wallet_view(wallet).await?;
    assert_eq!(
        (wallet_view.balance, wallet_view.held),
        (dec("100.00") - captured, Decimal::ZERO)
    );
    audit_clean(&db).await?;
    node.stop().await
}

#[tokio::test]
async fn captures_and_voids_racing_on_a_hold_have_exactly_one_winner() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let wallet = funded(&node.api, "1000.00").await?;
    let mut holds = Vec::new();
    for _ in 0..10 {
        holds.push(active_hold(&node.api, wallet, "25.00").await?);
    }

    // 20 captures and 20 voids of each of the 10 holds, interleaved, all 400 at once;
    // half the holds see a capture first, the other half a void.
    let requests: Vec<(usize, bool)> = (0..40)
        .flat_map(|i| (0..holds.len()).map(move |hold| (hold, (i + hold) % 2 == 0)))
        .collect();
    let answers = join_all(requests.iter().map(|(hold, capture)| {
        let (api, hold) = (&node.api, holds[*hold]);
        let capture = *capture;
        async move {
            if capture {
                api.capture_hold(hold, None).await
            } else {
                api.void_hold(hold).await
            }
        }
    }))
    .await;

    // Per hold: the winning 200s (capture or not) and the statuses the 409s named.
    let mut won: BTreeMap<usize, Vec<bool>> = BTreeMap::new();
    let mut refused: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for ((hold, capture), answer) in requests.iter().zip(answers) {
        let answer = answer?;
        match answer.status {
            StatusCode::OK => {
                let due = if *capture { "CAPTURED" } else { "VOIDED" };
                assert_eq!(answer.body["status"], due, "{answer:?}");
                won.entry(*hold).or_default().push(*capture);
            }
            StatusCode::CONFLICT => {
                assert_eq!(problem(&answer), "hold-not-active", "{answer:?}");
                refused.entry(*hold).or_default().push(
                    answer.body["holdStatus"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
            other => panic!("unexpected {other}: {answer:?}"),
        }
    }
    let mut captured = Decimal::ZERO;
    let (mut by_capture, mut by_void) = (0, 0);
    for (index, hold) in holds.iter().enumerate() {
        let winners = won.get(&index).cloned().unwrap_or_default();
        assert_eq!(winners.len(), 1, "hold {hold}: winners {winners:?}");
        let status = if winners[0] { "CAPTURED" } else { "VOIDED" };
        let losers = refused.get(&index).cloned().unwrap_or_default();
        assert_eq!(losers.len(), 39, "hold {hold}");
        assert!(
            losers.iter().all(|named| named == status),
            "hold {hold} won by {status}, the refused were told {losers:?}"
        );
        let stored: String = sqlx::query_scalar("SELECT status FROM holds WHERE id = $1")
            .bind(hold)
            .fetch_one(&db.pool)
            .await?;
        assert_eq!(stored, status, "hold {hold}");
        let expected = if winners[0] {
            by_capture += 1;
            captured += dec("25.00");
            rows(&[("HOLD", "25.00"), ("CAPTURE", "25.00")])
        } else {
            by_void += 1;
            rows(&[("HOLD", "25.00"), ("RELEASE", "25.00")])
        };
        assert_eq!(hold_rows(&db, *hold).await?, expected, "hold {hold}");
    }
    eprintln!("captures and voids racing: {by_capture} holds captured, {by_void} voided");
    let view = node.api.wallet_view(wallet).await?;
    assert_eq!(
        (view.balance, view.held),
        (dec("1000.00") - captured, Decimal::ZERO)
    );
    audit_clean(&db).await?;
    node.stop().await
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Race {
    Hold,
    Withdraw,
    Transfer,
    Deposit,
    Limit(&'static str),
    Void(usize),
}

impl Race {
    async fn send(self, api: &ApiClient, wallet: Uuid, other: Uuid, holds: &[Uuid]) -> Answer {
        let answer = match self {
            Self::Hold => api.create_hold(wallet, "5.00", None).await,
            Self::Withdraw => api.operate(wallet, "WITHDRAW", "5.00", None).await,
            Self::Transfer => api.transfer(wallet, other, "5.00", None).await,
            Self::Deposit => api.operate(wallet, "DEPOSIT", "5.00", None).await,
            Self::Limit(limit) => api.set_overdraft_limit(wallet, limit).await,
            Self::Void(hold) => api.void_hold(holds[hold]).await,
        };
        answer.unwrap_or_else(|error| panic!("{self:?}: no answer: {error:#}"))
    }

    /// Whether `answer` is one this request may get: its success, or the 409 named.
    fn allowed(self, answer: &Answer) -> bool {
        let success = match self {
            Self::Hold => StatusCode::CREATED,
            _ => StatusCode::OK,
        };
        let refusal = match self {
            Self::Hold | Self::Withdraw | Self::Transfer => Some("insufficient-funds"),
            Self::Limit(_) => Some("limit-in-use"),
            Self::Deposit | Self::Void(_) => None,
        };
        answer.status == success
            || (answer.status == StatusCode::CONFLICT && Some(problem(answer)) == refusal)
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Hold => "hold",
            Self::Withdraw => "withdraw",
            Self::Transfer => "transfer",
            Self::Deposit => "deposit",
            Self::Limit(_) => "limit",
            Self::Void(_) => "void",
        }
    }
}

/// Sends `races` all at once; returns the answers, after checking each is allowed.
async fn race(
    api: &ApiClient,
    wallet: Uuid,
    other: Uuid,
    holds: &[Uuid],
    races: &[Race],
    tally: &mut BTreeMap<(&'static str, u16), usize>,
) -> Vec<Answer> {
    let answers = join_all(races.iter().map(|r| r.send(api, wallet, other, holds))).await;
    for (r, answer) in races.iter().zip(&answers) {
        assert!(r.allowed(answer), "{r:?}: {answer:?}");
        *tally.entry((r.kind(), answer.status.as_u16())).or_default() += 1;
    }
    answers
}

#[tokio::test]
async fn holds_withdrawals_and_transfers_racing_on_an_overdrawn_wallet_never_take_it_past_its_limit()
-> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let api = &node.api;
    // Balance 0 and an overdraft limit of 100.00: every debit goes into the overdraft.
    let wallet = api.create_wallet().await?;
    let other = api.create_wallet().await?;
    let limit = api.set_overdraft_limit(wallet, "100.00").await?;
    assert_eq!(limit.status, StatusCode::OK, "{limit:?}");
    assert_eq!(amount(&limit, "overdraftLimit"), dec("100.00"));
    assert_eq!(amount(&limit, "available"), dec("100.00"));

    // Round 1: 40 holds, 40 withdrawals and 40 outgoing transfers of 5.00 (600.00 asked
    // of 100.00 available) racing 20 deposits of 5.00 and 10 changes of the limit
    // between 60.00 and 100.00, interleaved.
    let mut round: Vec<Race> = Vec::new();
    for i in 0..40 {
        round.extend([Race::Hold, Race::Withdraw, Race::Transfer]);
        if i % 2 == 0 {
            round.push(Race::Deposit);
        }
        if i % 4 == 1 {
            round.push(Race::Limit(if i % 8 == 1 { "60.00" } else { "100.00" }));
        }
    }
    let mut tally = BTreeMap::new();
    let answers = race(api, wallet, other, &[], &round, &mut tally).await;
    let holds: Vec<Uuid> = round
        .iter()
        .zip(&answers)
        .filter(|(r, answer)| **r == Race::Hold && answer.status == StatusCode::CREATED)
        .map(|(_, answer)| id(answer, "holdId"))
        .collect();
    for (r, answer) in round.iter().zip(&answers) {
        if answer.status == StatusCode::CONFLICT && matches!(r, Race::Hold) {
            // A refused hold is recorded, REJECTED, under the holdId of its answer.
            let stored: Option<String> =
                sqlx::query_scalar("SELECT status FROM holds WHERE id = $1")
                    .bind(id(answer, "holdId"))
                    .fetch_optional(&db.pool)
                    .await?;
            assert_eq!(stored.as_deref(), Some("REJECTED"), "{answer:?}");
        }
    }

    // Round 2: every hold voided (releases) racing 40 more withdrawals and 20 transfers.
    let mut round2: Vec<Race> = (0..holds.len()).map(Race::Void).collect();
    for i in 0..60 {
        let at = (i * 7) % (round2.len() + 1);
        round2.insert(
            at,
            if i % 3 == 2 {
                Race::Transfer
            } else {
                Race::Withdraw
            },
        );
    }
    race(api, wallet, other, &holds, &round2, &mut tally).await;
    eprintln!(
        "overdraft race: {} holds taken and voided; answers by (request, status): {tally:?}",
        holds.len()
    );

    // At every committed row, in seq order: balance_after - held_after + limit >= 0.
    let trail = ledger::operations_of(&db.pool, wallet).await?;
    let mut limit = Decimal::ZERO;
    let (mut lowest_available, mut lowest_balance) = (dec("100.00"), Decimal::ZERO);
    for (index, row) in trail.iter().enumerate() {
        assert_eq!(row.seq, index as i64 + 1, "gap-free seq");
        if row.kind == "OVERDRAFT_LIMIT" && row.status == "APPLIED" {
            limit = row.amount;
        }
        let available = row.balance_after - row.held_after + limit;
        assert!(
            available >= Decimal::ZERO,
            "seq {} ({} {} {}): balance_after {} - held_after {} + limit {limit} = {available}",
            row.seq,
            row.kind,
            row.status,
            row.amount,
            row.balance_after,
            row.held_after
        );
        lowest_available = lowest_available.min(available);
        lowest_balance = lowest_balance.min(row.balance_after);
    }
    let count = |kind: &'static str, status: u16| tally.get(&(kind, status)).copied().unwrap_or(0);
    // The race did reach the limit: debits were refused, the balance went negative and
    // available came within one request (5.00) of zero.
    assert!(
        count("hold", 409) + count("withdraw", 409) + count("transfer", 409) > 0,
        "{tally:?}"
    );
    assert!(
        lowest_balance < Decimal::ZERO,
        "the overdraft was never used"
    );
    assert!(
        lowest_available < dec("5.00"),
        "available never reached the limit: {lowest_available}"
    );

    // Exact: every accepted withdrawal and transfer moved 5.00, every hold was released.
    let five = dec("5.00");
    let debits = Decimal::from(count("withdraw", 200) + count("transfer", 200));
    let view = api.wallet_view(wallet).await?;
    assert_eq!(
        view.balance,
        five * (Decimal::from(count("deposit", 200)) - debits)
    );
    assert_eq!(view.held, Decimal::ZERO);
    assert_eq!(
        view.available,
        view.balance - view.held + view.overdraft_limit
    );
    let audit = audit_clean(&db).await?;
    assert_eq!(
        api.wallet_view(other).await?.balance,
        five * Decimal::from(count("transfer", 200))
    );
    eprintln!(
        "overdraft race: {} rows on the wallet, lowest balance {lowest_balance}, lowest available \
         {lowest_available}, final {view:?}; ledger: {}",
        trail.len(),
        audit.summary()
    );
    node.stop().await
}
