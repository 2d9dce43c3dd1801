use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{SubsecRound, Utc};
use rust_decimal::Decimal;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::committer::Committer;
use super::{ExecutionError, ExecutorMetrics, Pending};
use crate::domain::{
    CommandOutcome, MAX_BALANCE, OperationRecord, OperationStatus, OperationType, RejectionReason,
};
use crate::store::{CommitError, ShardFence, Store, WalletState, WalletUpdate};

/// Attempts of one batch when the failure says a retry is safe.
const MAX_ATTEMPTS: u32 = 4;
/// Beyond this many cached wallets the cache starts over; it is only a cache.
const MAX_CACHED_WALLETS: usize = 200_000;

pub(super) struct ShardExecutor {
    shard: u32,
    fence: i64,
    store: Store,
    committer: Committer,
    batch_max: usize,
    metrics: ExecutorMetrics,
    fence_lost: mpsc::UnboundedSender<u32>,
    /// Committed state of the wallets this shard has seen, loaded fresh after the claim.
    cache: HashMap<Uuid, WalletState>,
}

enum Flow {
    Continue,
    Fenced,
}

/// What one command turns into while a batch is planned.
enum Planned {
    Done(CommandOutcome),
    /// Index into the batch's new operation records.
    New(usize),
}

struct Plan {
    planned: Vec<Planned>,
    records: Vec<OperationRecord>,
    updates: Vec<WalletUpdate>,
    next_state: HashMap<Uuid, WalletState>,
}

impl ShardExecutor {
    pub(super) fn new(
        shard: u32,
        fence: i64,
        store: Store,
        committer: Committer,
        batch_max: usize,
        metrics: ExecutorMetrics,
        fence_lost: mpsc::UnboundedSender<u32>,
    ) -> Self {
        Self {
            shard,
            fence,
            store,
            committer,
            batch_max,
            metrics,
            fence_lost,
            cache: HashMap::new(),
        }
    }

    pub(super) async fn run(
        mut self,
        mut queue: mpsc::UnboundedReceiver<Pending>,
        stop: CancellationToken,
    ) {
        loop {
            let first = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                next = queue.recv() => match next {
                    Some(pending) => pending,
                    None => break,
                },
            };
            // Everything that queued while the previous batch committed goes into this one.
            let mut batch = vec![first];
            while batch.len() < self.batch_max {
                match queue.try_recv() {
                    Ok(pending) => batch.push(pending),
                    Err(_) => break,
                }
            }
            let span = tracing::info_span!("batch", shard = self.shard, size = batch.len());
            if let Flow::Fenced = self.process(batch).instrument(span).await {
                // The Postgres fence moved on: another node owns the shard now.
                let _ = self.fence_lost.send(self.shard);
                break;
            }
        }
        queue.close();
        while let Ok(pending) = queue.try_recv() {
            let _ = pending.reply.send(Err(ExecutionError::NotOwner));
        }
    }

    async fn process(&mut self, batch: Vec<Pending>) -> Flow {
        let mut attempt = 1;
        loop {
            match self.try_commit(&batch, attempt > 1).await {
                Ok(outcomes) => {
                    for (pending, outcome) in batch.into_iter().zip(outcomes) {
                        let _ = pending.reply.send(Ok(outcome));
                    }
                    return Flow::Continue;
                }
                Err(error) if matches!(*error, CommitError::Fenced { .. }) => {
                    tracing::warn!(
                        shard = self.shard,
                        fence = self.fence,
                        "batch rejected by the shard fence"
                    );
                    self.metrics.fence_rejections.inc();
                    self.metrics
                        .batch_failures
                        .with_label_values(&["fenced"])
                        .inc();
                    for pending in batch {
                        let _ = pending.reply.send(Err(ExecutionError::NotOwner));
                    }
                    return Flow::Fenced;
                }
                Err(error) => {
                    // Whatever the batch touched may or may not be in the database now.
                    for pending in &batch {
                        self.cache.remove(&pending.command.wallet_id);
                    }
                    let retry = (error.is_transient()
                        || matches!(*error, CommitError::StaleVersion))
                        && attempt < MAX_ATTEMPTS;
                    let reason = if matches!(*error, CommitError::StaleVersion) {
                        "stale_version"
                    } else if error.is_transient() {
                        "transient"
                    } else {
                        "error"
                    };
                    self.metrics
                        .batch_failures
                        .with_label_values(&[reason])
                        .inc();
                    if retry {
                        tracing::warn!(error = %error_chain(&*error), attempt, "batch commit failed, retrying");
                        tokio::time::sleep(Duration::from_millis(25 * u64::from(attempt))).await;
                        attempt += 1;
                        continue;
                    }
                    tracing::error!(error = %error_chain(&*error), attempt, "batch commit failed");
                    for pending in batch {
                        let _ = pending.reply.send(Err(ExecutionError::Unavailable));
                    }
                    return Flow::Continue;
                }
            }
        }
    }

    async fn try_commit(
        &mut self,
        batch: &[Pending],
        retrying: bool,
    ) -> Result<Vec<CommandOutcome>, Arc<CommitError>> {
        self.load_missing(batch).await.map_err(Arc::new)?;
        let existing = self
            .existing_operations(batch, retrying)
            .await
            .map_err(Arc::new)?;
        let plan = self.plan(batch, &existing);

        if !plan.records.is_empty() {
            let fence = ShardFence {
                shard: self.shard,
                fence: self.fence,
            };
            self.committer
                .commit(fence, plan.records.clone(), plan.updates)
                .await?;
        }
        if self.cache.len() > MAX_CACHED_WALLETS {
            self.cache.clear();
        }
        self.cache.extend(plan.next_state);
        for record in &plan.records {
            let result = match record.status {
                OperationStatus::Applied => "applied",
                OperationStatus::Rejected => "rejected",
            };
            self.metrics
                .operations
                .with_label_values(&[record.operation_type.as_str(), result])
                .inc();
        }
        Ok(plan
            .planned
            .into_iter()
            .map(|planned| match planned {
                Planned::Done(outcome) => outcome,
                Planned::New(index) => CommandOutcome::Recorded(plan.records[index].clone()),
            })
            .collect())
    }

    async fn load_missing(&mut self, batch: &[Pending]) -> Result<(), CommitError> {
        let missing: Vec<Uuid> = batch
            .iter()
            .map(|pending| pending.command.wallet_id)
            .filter(|id| !self.cache.contains_key(id))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if !missing.is_empty() {
            self.cache.extend(self.store.wallets(&missing).await?);
        }
        Ok(())
    }

    /// Operations recorded before under the same id (a retried request) or idempotency key.
    async fn existing_operations(
        &self,
        batch: &[Pending],
        retrying: bool,
    ) -> Result<Vec<OperationRecord>, CommitError> {
        let ids: Vec<Uuid> = batch
            .iter()
            .filter(|pending| retrying || pending.command.resubmitted)
            .map(|pending| pending.command.operation_id)
            .collect();
        let keyed: Vec<(Uuid, String)> = batch
            .iter()
            .filter_map(|pending| {
                Some((
                    pending.command.wallet_id,
                    pending.command.idempotency_key.clone()?,
                ))
            })
            .collect();
        if ids.is_empty() && keyed.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.store.existing_operations(&ids, &keyed).await?)
    }

    /// Applies the batch in arrival order to a copy of the cached balances.
    fn plan(&self, batch: &[Pending], existing: &[OperationRecord]) -> Plan {
        let by_id: HashMap<Uuid, &OperationRecord> =
            existing.iter().map(|op| (op.operation_id, op)).collect();
        let by_key: HashMap<(Uuid, &str), &OperationRecord> = existing
            .iter()
            .filter_map(|op| Some(((op.wallet_id, op.idempotency_key.as_deref()?), op)))
            .collect();
        let mut new_keys: HashMap<(Uuid, String), usize> = HashMap::new();
        // A retried command can meet its earlier attempt in the same batch: one record for both.
        let mut new_ids: HashMap<Uuid, usize> = HashMap::new();
        let mut next_state: HashMap<Uuid, WalletState> = HashMap::new();
        let mut records: Vec<OperationRecord> = Vec::new();
        let mut planned = Vec::with_capacity(batch.len());
        // PostgreSQL keeps microseconds: answer with what a replay will read back.
        let now = Utc::now().trunc_subsecs(6);

        for pending in batch {
            let command = &pending.command;
            if let Some(previous) = by_id.get(&command.operation_id) {
                planned.push(Planned::Done(CommandOutcome::Recorded((*previous).clone())));
                continue;
            }
            if let Some(&index) = new_ids.get(&command.operation_id) {
                planned.push(Planned::New(index));
                continue;
            }
            if let Some(key) = command.idempotency_key.as_deref() {
                // The key's first operation: stored earlier, or new in this very batch.
                let first = match by_key.get(&(command.wallet_id, key)) {
                    Some(stored) => Some((
                        stored.request_hash.clone(),
                        Planned::Done(CommandOutcome::Recorded((*stored).clone())),
                    )),
                    None => new_keys
                        .get(&(command.wallet_id, key.to_owned()))
                        .map(|&index| (records[index].request_hash.clone(), Planned::New(index))),
                };
                if let Some((first_hash, first_answer)) = first {
                    planned.push(
                        if first_hash.as_deref() == Some(command.request_hash.as_str()) {
                            first_answer
                        } else {
                            Planned::Done(CommandOutcome::IdempotencyKeyReused)
                        },
                    );
                    continue;
                }
            }
            let Some(state) = next_state
                .get(&command.wallet_id)
                .or_else(|| self.cache.get(&command.wallet_id))
                .copied()
            else {
                planned.push(Planned::Done(CommandOutcome::WalletNotFound));
                continue;
            };
            let amount = command.amount.value();
            let (balance, rejection) = apply(state.balance, command.operation_type, amount);
            let version = state.version + 1;
            next_state.insert(command.wallet_id, WalletState { balance, version });
            records.push(OperationRecord {
                operation_id: command.operation_id,
                wallet_id: command.wallet_id,
                seq: version,
                operation_type: command.operation_type,
                amount,
                status: if rejection.is_some() {
                    OperationStatus::Rejected
                } else {
                    OperationStatus::Applied
                },
                reason: rejection,
                balance_after: balance,
                idempotency_key: command.idempotency_key.clone(),
                request_hash: Some(command.request_hash.clone()),
                created_at: now,
            });
            if let Some(key) = &command.idempotency_key {
                new_keys.insert((command.wallet_id, key.clone()), records.len() - 1);
            }
            new_ids.insert(command.operation_id, records.len() - 1);
            planned.push(Planned::New(records.len() - 1));
        }

        let updates = next_state
            .iter()
            .filter_map(|(wallet_id, next)| {
                let before = self.cache.get(wallet_id)?;
                Some(WalletUpdate {
                    wallet_id: *wallet_id,
                    balance: next.balance,
                    version: next.version,
                    expected_version: before.version,
                })
            })
            .collect();
        Plan {
            planned,
            records,
            updates,
            next_state,
        }
    }
}

/// The balance after one operation, or the unchanged balance and why it was refused.
fn apply(
    balance: Decimal,
    operation_type: OperationType,
    amount: Decimal,
) -> (Decimal, Option<RejectionReason>) {
    match operation_type {
        OperationType::Deposit => match balance.checked_add(amount) {
            Some(next) if next <= MAX_BALANCE => (next, None),
            _ => (balance, Some(RejectionReason::BalanceLimitExceeded)),
        },
        OperationType::Withdraw if amount <= balance => (balance - amount, None),
        OperationType::Withdraw => (balance, Some(RejectionReason::InsufficientFunds)),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros_free::dec;

    mod rust_decimal_macros_free {
        macro_rules! dec {
            ($text:literal) => {
                <rust_decimal::Decimal as std::str::FromStr>::from_str($text)
                    .expect("decimal literal")
            };
        }
        pub(crate) use dec;
    }

    #[test]
    fn withdraw_beyond_the_balance_is_rejected_without_change() {
        assert_eq!(
            apply(dec!("10.00"), OperationType::Withdraw, dec!("10.01")),
            (dec!("10.00"), Some(RejectionReason::InsufficientFunds))
        );
        assert_eq!(
            apply(dec!("10.00"), OperationType::Withdraw, dec!("10.00")),
            (dec!("0.00"), None)
        );
    }

    #[test]
    fn deposit_past_the_column_limit_is_rejected() {
        assert_eq!(
            apply(MAX_BALANCE, OperationType::Deposit, dec!("0.01")),
            (MAX_BALANCE, Some(RejectionReason::BalanceLimitExceeded))
        );
        assert_eq!(
            apply(dec!("1.10"), OperationType::Deposit, dec!("2.25")),
            (dec!("3.35"), None)
        );
    }
}
