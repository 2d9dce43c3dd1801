//! Planning one batch: every command applied in arrival order to a copy of the
//! committed state of its wallet (and hold), producing the rows to write and the answer
//! each command gets once they are committed. Pure: no I/O, no clock but `now`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

use super::Pending;
use crate::domain::{
    Action, CommandOutcome, HoldRecord, HoldStatus, MAX_BALANCE, OperationCommand, OperationRecord,
    OperationStatus, OperationType, RejectionReason, TransferRecord, TransferStatus,
};
use crate::store::{LedgerWrites, PostedTransfer, WalletState, WalletUpdate};

/// What one command turns into while a batch is planned.
#[derive(Clone)]
pub(super) enum Planned {
    /// Settled without writing: found from an earlier request, or refused.
    Done(CommandOutcome),
    /// Its deadline passed before it was planned (after the look-up, if it may exist).
    Expired,
    /// Written by this batch: answered with this once the batch commits.
    New(CommandOutcome),
}

pub(super) struct Plan {
    pub planned: Vec<Planned>,
    pub records: Vec<OperationRecord>,
    pub updates: Vec<WalletUpdate>,
    pub ledger: LedgerWrites,
    pub next_state: HashMap<Uuid, WalletState>,
}

/// What planning needs from the cache and the database.
pub(super) struct Prepared {
    pub states: HashMap<Uuid, WalletState>,
    /// Operations recorded before under the batch's ids or idempotency keys.
    pub existing: Vec<OperationRecord>,
    /// The holds the batch's commands act on, as committed.
    pub holds: HashMap<Uuid, HoldRecord>,
}

/// The id of the RELEASE row a command writes after its first row (the rest of a
/// partial capture, or an expiry found on the way): fixed by the command, like the first.
fn release_id(operation_id: Uuid) -> Uuid {
    Uuid::new_v5(&operation_id, b"release")
}

/// The batch's rows so far and the state they leave.
struct Draft<'a> {
    prepared: &'a Prepared,
    shard: u32,
    now: DateTime<Utc>,
    records: Vec<OperationRecord>,
    ledger: LedgerWrites,
    next_state: HashMap<Uuid, WalletState>,
    next_holds: HashMap<Uuid, HoldRecord>,
}

/// One history row of a command, as planned.
struct Row {
    operation_id: Uuid,
    operation_type: OperationType,
    amount: Decimal,
    reason: Option<RejectionReason>,
    transfer_id: Option<Uuid>,
    hold_id: Option<Uuid>,
    /// Only the command's first row carries its key and fingerprint.
    keyed: bool,
}

impl Draft<'_> {
    fn state(&self, wallet_id: &Uuid) -> Option<&WalletState> {
        self.next_state
            .get(wallet_id)
            .or_else(|| self.prepared.states.get(wallet_id))
    }

    fn hold(&self, hold_id: &Uuid) -> Option<&HoldRecord> {
        self.next_holds
            .get(hold_id)
            .or_else(|| self.prepared.holds.get(hold_id))
    }

    /// Records `row` on the command's wallet, whose state becomes `next`.
    fn record(
        &mut self,
        command: &OperationCommand,
        mut next: WalletState,
        row: Row,
    ) -> OperationRecord {
        next.version += 1;
        // Never earlier than the wallet's last row, so time order is sequence order.
        next.updated_at = self.now.max(next.updated_at);
        let record = OperationRecord {
            operation_id: row.operation_id,
            wallet_id: command.wallet_id,
            seq: next.version,
            operation_type: row.operation_type,
            amount: row.amount,
            status: if row.reason.is_some() {
                OperationStatus::Rejected
            } else {
                OperationStatus::Applied
            },
            reason: row.reason,
            balance_after: next.balance,
            held_after: next.held,
            transfer_id: row.transfer_id,
            hold_id: row.hold_id,
            idempotency_key: if row.keyed {
                command.idempotency_key.clone()
            } else {
                None
            },
            request_hash: row.keyed.then(|| command.request_hash.clone()),
            created_at: next.updated_at,
        };
        self.next_state.insert(command.wallet_id, next);
        self.records.push(record.clone());
        record
    }

    fn settle_hold(
        &mut self,
        mut hold: HoldRecord,
        status: HoldStatus,
        captured: Decimal,
    ) -> HoldRecord {
        hold.status = status;
        hold.captured_amount = captured;
        hold.updated_at = self.now;
        self.next_holds.insert(hold.hold_id, hold.clone());
        self.ledger.settled_holds.push(hold.clone());
        hold
    }

    /// Releases an ACTIVE hold whose expiry has passed.
    fn expire(
        &mut self,
        command: &OperationCommand,
        state: WalletState,
        hold: HoldRecord,
        id: Uuid,
    ) -> HoldRecord {
        let mut next = state;
        next.held -= hold.amount;
        self.record(
            command,
            next,
            Row {
                operation_id: id,
                operation_type: OperationType::Release,
                amount: hold.amount,
                reason: None,
                transfer_id: None,
                hold_id: Some(hold.hold_id),
                keyed: id == command.operation_id,
            },
        );
        self.settle_hold(hold, HoldStatus::Expired, Decimal::new(0, 2))
    }

    /// Plans one command against its wallet's current state.
    fn apply(&mut self, command: &OperationCommand, state: WalletState) -> Planned {
        let id = command.operation_id;
        let plain = |operation_type, amount, reason| Row {
            operation_id: id,
            operation_type,
            amount,
            reason,
            transfer_id: None,
            hold_id: None,
            keyed: true,
        };
        match &command.action {
            Action::Deposit { amount } => {
                let amount = amount.value();
                let (next, reason) = credit(state, amount);
                let row = plain(OperationType::Deposit, amount, reason);
                Planned::New(CommandOutcome::Recorded(self.record(command, next, row)))
            }
            Action::Withdraw { amount } => {
                let amount = amount.value();
                let (next, reason) = debit(state, amount);
                let row = plain(OperationType::Withdraw, amount, reason);
                Planned::New(CommandOutcome::Recorded(self.record(command, next, row)))
            }
            Action::TransferOut {
                to_wallet_id,
                to_shard,
                amount,
            } => {
                let amount = amount.value();
                let (next, reason) = debit(state, amount);
                let row = Row {
                    transfer_id: Some(id),
                    ..plain(OperationType::TransferOut, amount, reason)
                };
                let record = self.record(command, next, row);
                self.ledger.new_transfers.push(TransferRecord {
                    transfer_id: id,
                    tenant: command.tenant.clone(),
                    from_wallet_id: command.wallet_id,
                    to_wallet_id: *to_wallet_id,
                    amount,
                    status: if reason.is_some() {
                        TransferStatus::Rejected
                    } else {
                        TransferStatus::Pending
                    },
                    to_shard: *to_shard,
                    created_at: record.created_at,
                    posted_at: None,
                });
                Planned::New(CommandOutcome::Recorded(record))
            }
            Action::TransferIn {
                transfer_id,
                from_wallet_id,
                amount,
            } => {
                let amount = amount.value();
                let (next, reason) = credit(state, amount);
                if reason.is_some() {
                    // The debit is committed and cannot be refused afterwards: the transfer
                    // stays PENDING (and is reported) rather than credit a partial amount.
                    tracing::error!(transfer_id = %transfer_id, wallet_id = %command.wallet_id,
                        "a transfer's credit would take the destination past the largest balance");
                    return Planned::Done(CommandOutcome::CreditRefused);
                }
                let row = Row {
                    transfer_id: Some(*transfer_id),
                    ..plain(OperationType::TransferIn, amount, None)
                };
                let record = self.record(command, next, row);
                self.ledger.posted_transfers.push(PostedTransfer {
                    transfer_id: *transfer_id,
                    from_wallet_id: *from_wallet_id,
                    posted_at: record.created_at,
                });
                Planned::New(CommandOutcome::Recorded(record))
            }
            Action::Hold { amount, expires_at } => {
                let amount = amount.value();
                let available = state.available();
                let mut next = state;
                let reason = if amount <= available {
                    next.held += amount;
                    None
                } else {
                    Some(RejectionReason::InsufficientFunds)
                };
                let row = Row {
                    hold_id: Some(id),
                    ..plain(OperationType::Hold, amount, reason)
                };
                let record = self.record(command, next, row);
                let hold = HoldRecord {
                    hold_id: id,
                    tenant: command.tenant.clone(),
                    wallet_id: command.wallet_id,
                    shard: self.shard,
                    amount,
                    captured_amount: Decimal::new(0, 2),
                    status: if reason.is_some() {
                        HoldStatus::Rejected
                    } else {
                        HoldStatus::Active
                    },
                    expires_at: *expires_at,
                    created_at: record.created_at,
                    updated_at: record.created_at,
                };
                self.next_holds.insert(id, hold.clone());
                self.ledger.new_holds.push(hold);
                // Answered from the row, like a replay of the request will be.
                Planned::New(CommandOutcome::Recorded(record))
            }
            Action::Capture { hold_id, amount } => {
                let hold = match self.active_hold(command, *hold_id) {
                    Ok(hold) => hold,
                    Err(planned) => return *planned,
                };
                if hold.expires_at.is_some_and(|at| at <= self.now) {
                    let expired = self.expire(command, state, hold, release_id(id));
                    return Planned::New(CommandOutcome::HoldNotActive(expired));
                }
                let captured = amount.map_or(hold.amount, |amount| amount.value());
                if captured > hold.amount {
                    return Planned::Done(CommandOutcome::CaptureExceedsHold(hold));
                }
                let mut next = state;
                next.balance -= captured;
                next.held -= captured;
                let row = Row {
                    hold_id: Some(*hold_id),
                    ..plain(OperationType::Capture, captured, None)
                };
                self.record(command, next.clone(), row);
                let rest = hold.amount - captured;
                if rest > Decimal::ZERO {
                    let mut released = self.state(&command.wallet_id).cloned().unwrap_or(next);
                    released.held -= rest;
                    self.record(
                        command,
                        released,
                        Row {
                            operation_id: release_id(id),
                            operation_type: OperationType::Release,
                            amount: rest,
                            reason: None,
                            transfer_id: None,
                            hold_id: Some(*hold_id),
                            keyed: false,
                        },
                    );
                }
                let hold = self.settle_hold(hold, HoldStatus::Captured, captured);
                Planned::New(CommandOutcome::Hold(hold))
            }
            Action::Void { hold_id } | Action::Expire { hold_id } => {
                let hold = match self.active_hold(command, *hold_id) {
                    Ok(hold) => hold,
                    Err(planned) => return *planned,
                };
                let due = hold.expires_at.is_some_and(|at| at <= self.now);
                if matches!(command.action, Action::Void { .. }) && !due {
                    let mut next = state;
                    next.held -= hold.amount;
                    let row = Row {
                        hold_id: Some(*hold_id),
                        ..plain(OperationType::Release, hold.amount, None)
                    };
                    self.record(command, next, row);
                    let hold = self.settle_hold(hold, HoldStatus::Voided, Decimal::new(0, 2));
                    return Planned::New(CommandOutcome::Hold(hold));
                }
                if !due {
                    // An expiry asked for early (clocks differ): nothing to do yet.
                    return Planned::Done(CommandOutcome::Hold(hold));
                }
                let expired = self.expire(command, state, hold, id);
                Planned::New(if matches!(command.action, Action::Void { .. }) {
                    CommandOutcome::HoldNotActive(expired)
                } else {
                    CommandOutcome::Hold(expired)
                })
            }
            Action::SetOverdraftLimit { limit } => {
                let mut next = state;
                next.overdraft_limit = *limit;
                if next.available() < Decimal::ZERO {
                    return Planned::Done(CommandOutcome::LimitInUse);
                }
                let row = plain(OperationType::OverdraftLimit, *limit, None);
                Planned::New(CommandOutcome::Recorded(self.record(command, next, row)))
            }
        }
    }

    /// The command's hold if it is ACTIVE, or the answer if it is not.
    fn active_hold(
        &self,
        command: &OperationCommand,
        hold_id: Uuid,
    ) -> Result<HoldRecord, Box<Planned>> {
        match self.hold(&hold_id) {
            Some(hold) if hold.wallet_id == command.wallet_id && hold.tenant == command.tenant => {
                if hold.status == HoldStatus::Active {
                    Ok(hold.clone())
                } else {
                    Err(Box::new(Planned::Done(CommandOutcome::HoldNotActive(
                        hold.clone(),
                    ))))
                }
            }
            _ => Err(Box::new(Planned::Done(CommandOutcome::HoldNotFound))),
        }
    }
}

/// Money in: refused past the largest balance a wallet may hold.
fn credit(state: WalletState, amount: Decimal) -> (WalletState, Option<RejectionReason>) {
    match state.balance.checked_add(amount) {
        Some(balance) if balance <= MAX_BALANCE => (WalletState { balance, ..state }, None),
        _ => (state, Some(RejectionReason::BalanceLimitExceeded)),
    }
}

/// Money out: refused beyond what is available (balance - held + overdraft limit).
fn debit(state: WalletState, amount: Decimal) -> (WalletState, Option<RejectionReason>) {
    if amount <= state.available() {
        let balance = state.balance - amount;
        (WalletState { balance, ..state }, None)
    } else {
        (state, Some(RejectionReason::InsufficientFunds))
    }
}

/// Applies the batch in arrival order to a copy of the wallets' committed state.
/// With `events`, the batch also writes its outbox rows.
pub(super) fn plan(
    batch: &[Pending],
    prepared: &Prepared,
    shard: u32,
    now: DateTime<Utc>,
    events: bool,
) -> Plan {
    let by_id: HashMap<Uuid, &OperationRecord> = prepared
        .existing
        .iter()
        .map(|op| (op.operation_id, op))
        .collect();
    let by_key: HashMap<(Uuid, &str), &OperationRecord> = prepared
        .existing
        .iter()
        .filter_map(|op| Some(((op.wallet_id, op.idempotency_key.as_deref()?), op)))
        .collect();
    // The key's first command in this batch: its fingerprint, and where its answer is.
    let mut new_keys: HashMap<(Uuid, String), (String, usize)> = HashMap::new();
    // A retried command can meet its earlier attempt in the same batch: one answer for both.
    let mut new_ids: HashMap<Uuid, usize> = HashMap::new();
    let mut draft = Draft {
        prepared,
        shard,
        now,
        records: Vec::new(),
        ledger: LedgerWrites::default(),
        next_state: HashMap::new(),
        next_holds: HashMap::new(),
    };
    let mut planned = Vec::with_capacity(batch.len());

    for pending in batch {
        let command = &pending.command;
        // First of all: another tenant's wallet does not exist for this caller, not
        // even its operations or idempotency keys.
        let Some(state) = draft
            .state(&command.wallet_id)
            .filter(|state| state.tenant == command.tenant)
            .cloned()
        else {
            planned.push(Planned::Done(CommandOutcome::WalletNotFound));
            continue;
        };
        if let Some(previous) = by_id.get(&command.operation_id) {
            planned.push(Planned::Done(CommandOutcome::Recorded((*previous).clone())));
            continue;
        }
        if let Some(&earlier) = new_ids.get(&command.operation_id) {
            planned.push(planned[earlier].clone());
            continue;
        }
        let key = command
            .idempotency_key
            .as_ref()
            .map(|key| (command.wallet_id, key.clone()));
        if let Some(key) = &key {
            // The key's first operation: stored earlier, or new in this very batch.
            let first = match by_key.get(&(key.0, key.1.as_str())) {
                Some(stored) => Some((
                    stored.request_hash.clone().unwrap_or_default(),
                    Planned::Done(CommandOutcome::Recorded((*stored).clone())),
                )),
                None => new_keys
                    .get(key)
                    .map(|(hash, earlier)| (hash.clone(), planned[*earlier].clone())),
            };
            if let Some((first_hash, first_answer)) = first {
                planned.push(if first_hash == command.request_hash {
                    first_answer
                } else {
                    Planned::Done(CommandOutcome::IdempotencyKeyReused)
                });
                continue;
            }
        }
        // Checked after the look-ups: a command that may exist is only reported
        // expired once it is known not to be in the database.
        if command.deadline.has_passed() {
            planned.push(Planned::Expired);
            continue;
        }
        let written = draft.records.len();
        let outcome = draft.apply(command, state);
        if draft.records.len() > written {
            new_ids.insert(command.operation_id, planned.len());
            if let Some(key) = key {
                new_keys.insert(key, (command.request_hash.clone(), planned.len()));
            }
        }
        planned.push(outcome);
    }

    let updates = draft
        .next_state
        .iter()
        .filter_map(|(wallet_id, next)| {
            let before = prepared.states.get(wallet_id)?;
            Some(WalletUpdate {
                wallet_id: *wallet_id,
                balance: next.balance,
                held: next.held,
                overdraft_limit: next.overdraft_limit,
                version: next.version,
                updated_at: next.updated_at,
                expected_version: before.version,
            })
        })
        .collect();
    let mut ledger = draft.ledger;
    if events {
        let tenant_of = |wallet_id: &Uuid| {
            draft
                .next_state
                .get(wallet_id)
                .or_else(|| prepared.states.get(wallet_id))
                .map(|state| &state.tenant)
        };
        ledger.events = crate::events::of_batch(&draft.records, &ledger, tenant_of);
    }
    Plan {
        planned,
        records: draft.records,
        updates,
        ledger,
        next_state: draft.next_state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Tenant;

    fn dec(text: &str) -> Decimal {
        text.parse().expect("decimal")
    }

    fn wallet(balance: &str, held: &str, limit: &str) -> WalletState {
        WalletState {
            balance: dec(balance),
            held: dec(held),
            overdraft_limit: dec(limit),
            version: 0,
            tenant: Tenant::parse("t").expect("tenant"),
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn a_debit_may_use_the_overdraft_but_not_the_held_funds() {
        let (next, reason) = debit(wallet("10.00", "4.00", "5.00"), dec("11.00"));
        assert_eq!((next.balance, reason), (dec("-1.00"), None));
        let (next, reason) = debit(wallet("10.00", "4.00", "5.00"), dec("11.01"));
        assert_eq!(
            (next.balance, reason),
            (dec("10.00"), Some(RejectionReason::InsufficientFunds))
        );
    }

    #[test]
    fn a_credit_past_the_largest_balance_is_refused() {
        let (next, reason) = credit(wallet("0.00", "0", "0"), MAX_BALANCE);
        assert_eq!((next.balance, reason), (MAX_BALANCE, None));
        let (_, reason) = credit(next, dec("0.01"));
        assert_eq!(reason, Some(RejectionReason::BalanceLimitExceeded));
    }
}
