use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{SubsecRound, Utc};
use rust_decimal::Decimal;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::cache::WalletCache;
use super::committer::Committer;
use super::{ExecutorMetrics, Pending, Stall};
use crate::domain::{
    CommandOutcome, MAX_BALANCE, OperationRecord, OperationStatus, OperationType, RejectionReason,
};
use crate::store::{
    CommitError, Resolution, ShardFence, Store, StoreError, WalletState, WalletUpdate,
};
use crate::submit::{MayExist, NotApplied, Undelivered};

/// Attempts of one batch when the failure says a retry is safe.
const MAX_ATTEMPTS: u32 = 4;

pub(super) struct ShardExecutor {
    shard: u32,
    fence: i64,
    store: Store,
    committer: Committer,
    cache: Arc<WalletCache>,
    batch_max: usize,
    metrics: ExecutorMetrics,
    fence_lost: mpsc::Sender<u32>,
    stall: Arc<Stall>,
}

enum Flow {
    Continue,
    /// The PostgreSQL fence moved on: another node owns the shard now.
    Fenced,
    /// Stopped while a commit's outcome was still being looked up.
    Stopped,
}

/// What one command turns into while a batch is planned.
enum Planned {
    /// Settled without writing: found from an earlier request, or refused.
    Done(CommandOutcome),
    /// Its deadline passed before it was planned (after the look-up, if it may exist).
    Expired,
    /// Index into the batch's new operation records.
    New(usize),
}

struct Plan {
    planned: Vec<Planned>,
    records: Vec<OperationRecord>,
    updates: Vec<WalletUpdate>,
    next_state: HashMap<Uuid, WalletState>,
}

/// What planning needs from the cache and the database.
struct Prepared {
    states: HashMap<Uuid, WalletState>,
    existing: Vec<OperationRecord>,
}

/// How a planned batch ended.
enum Committed {
    Yes,
    /// Certainly not committed.
    No(Arc<CommitError>),
    /// The shard was stopped before the outcome could be looked up.
    Unknown,
}

impl ShardExecutor {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        shard: u32,
        fence: i64,
        store: Store,
        committer: Committer,
        cache: Arc<WalletCache>,
        batch_max: usize,
        metrics: ExecutorMetrics,
        fence_lost: mpsc::Sender<u32>,
        stall: Arc<Stall>,
    ) -> Self {
        Self {
            shard,
            fence,
            store,
            committer,
            cache,
            batch_max,
            metrics,
            fence_lost,
            stall,
        }
    }

    pub(super) async fn run(self, mut queue: mpsc::Receiver<Pending>, stop: CancellationToken) {
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
            // The whole batch counts, loads included: a shard that cannot load its
            // wallets cannot commit either, and must hand over like one whose COMMIT hangs.
            self.stall.begin();
            let flow = self.process(batch, &stop).instrument(span).await;
            self.stall.end();
            match flow {
                Flow::Continue => {}
                Flow::Fenced => {
                    let _ = self.fence_lost.send(self.shard).await;
                    break;
                }
                Flow::Stopped => break,
            }
        }
        queue.close();
        // Never planned: certainly not applied, and the owner is elsewhere now.
        while let Ok(pending) = queue.try_recv() {
            let _ = pending.reply.send(Err(Undelivered::NotOwner));
        }
    }

    /// Plans, commits and answers one batch, retrying what is safe to retry.
    async fn process(&self, mut batch: Vec<Pending>, stop: &CancellationToken) -> Flow {
        let mut attempt = 1;
        loop {
            batch = self.admit(batch);
            if batch.is_empty() {
                return Flow::Continue;
            }
            let prepared = tokio::select! {
                biased;
                () = stop.cancelled() => return self.unplanned(batch, Flow::Stopped),
                prepared = self.prepare(&batch, attempt > 1) => prepared,
            };
            let prepared = match prepared {
                Ok(prepared) => prepared,
                Err(error) => {
                    // Nothing was written; the batch can be planned again.
                    self.metrics
                        .batch_failures
                        .with_label_values(&[if error.is_transient() {
                            "transient"
                        } else {
                            "error"
                        }])
                        .inc();
                    if error.is_transient() && attempt < MAX_ATTEMPTS {
                        tracing::warn!(error = %error_chain(&error), attempt, "loading a batch's wallets failed, retrying");
                        if !self.pause(attempt, stop).await {
                            return self.unplanned(batch, Flow::Stopped);
                        }
                        attempt += 1;
                        continue;
                    }
                    tracing::error!(error = %error_chain(&error), attempt, "loading a batch's wallets failed");
                    return self.unplanned(batch, Flow::Continue);
                }
            };
            let plan = self.plan(&batch, &prepared);
            if plan.records.is_empty() {
                self.answer(batch, plan, None);
                return Flow::Continue;
            }
            let committed = self.commit(&plan, stop).await;
            let error = match committed {
                Committed::Yes => {
                    self.remember(&plan);
                    self.answer(batch, plan, None);
                    return Flow::Continue;
                }
                Committed::Unknown => {
                    self.forget(&plan);
                    self.answer(
                        batch,
                        plan,
                        Some(Undelivered::MayExist(MayExist::CommitUnresolved)),
                    );
                    return Flow::Stopped;
                }
                Committed::No(error) => error,
            };
            self.forget(&plan);
            self.metrics
                .batch_failures
                .with_label_values(&[error.metric_label()])
                .inc();
            if let CommitError::Fenced { .. } = *error {
                tracing::warn!(
                    shard = self.shard,
                    fence = self.fence,
                    "batch rejected by the shard fence"
                );
                self.metrics.fence_rejections.inc();
                self.answer(batch, plan, Some(Undelivered::NotOwner));
                return Flow::Fenced;
            }
            if error.is_transient() && attempt < MAX_ATTEMPTS {
                tracing::warn!(error = %error_chain(&*error), attempt, "batch commit failed, retrying");
                if !self.pause(attempt, stop).await {
                    self.answer(batch, plan, Some(Undelivered::NotOwner));
                    return Flow::Stopped;
                }
                attempt += 1;
                continue;
            }
            tracing::error!(error = %error_chain(&*error), attempt, "batch commit failed");
            self.answer(
                batch,
                plan,
                Some(Undelivered::NotApplied(NotApplied::CommitFailed)),
            );
            return Flow::Continue;
        }
    }

    /// Drops what must not be planned: commands whose caller gave up (nobody would
    /// hear the answer, so they are never committed), and expired commands that cannot
    /// exist yet. Expired commands that may exist are kept for their look-up.
    fn admit(&self, batch: Vec<Pending>) -> Vec<Pending> {
        batch
            .into_iter()
            .filter_map(|pending| {
                if pending.reply.is_closed() {
                    self.metrics
                        .dropped
                        .with_label_values(&["caller_gone"])
                        .inc();
                    return None;
                }
                if pending.command.deadline.has_passed() && !pending.command.may_exist {
                    self.metrics.dropped.with_label_values(&["expired"]).inc();
                    let _ = pending
                        .reply
                        .send(Err(Undelivered::NotApplied(NotApplied::Expired)));
                    return None;
                }
                Some(pending)
            })
            .collect()
    }

    /// Sleeps before a retry; `false` if the shard was stopped meanwhile.
    async fn pause(&self, attempt: u32, stop: &CancellationToken) -> bool {
        tokio::select! {
            () = stop.cancelled() => false,
            () = tokio::time::sleep(Duration::from_millis(25 * u64::from(attempt))) => true,
        }
    }

    /// Answers a batch that could not be planned: nothing of it was written now, but
    /// commands that may exist from an earlier attempt were not looked up either.
    /// A stopped shard's owner is elsewhere now, so the rest go there.
    fn unplanned(&self, batch: Vec<Pending>, flow: Flow) -> Flow {
        for pending in batch {
            let answer = if pending.command.may_exist {
                Undelivered::MayExist(MayExist::CommitUnresolved)
            } else if matches!(flow, Flow::Stopped) {
                Undelivered::NotOwner
            } else {
                Undelivered::NotApplied(NotApplied::CommitFailed)
            };
            let _ = pending.reply.send(Err(answer));
        }
        flow
    }

    /// Commits the plan; an ambiguous commit is looked up until its outcome is known
    /// or the shard is stopped.
    async fn commit(&self, plan: &Plan, stop: &CancellationToken) -> Committed {
        let fence = ShardFence {
            shard: self.shard,
            fence: self.fence,
        };
        let error = match self
            .committer
            .commit(fence, plan.records.clone(), plan.updates.clone())
            .await
        {
            Ok(()) => return Committed::Yes,
            Err(error) => error,
        };
        if !matches!(*error, CommitError::Ambiguous(_)) {
            return Committed::No(error);
        }
        tracing::warn!(error = %error_chain(&*error), shard = self.shard, "commit got no answer; looking it up");
        self.metrics
            .batch_failures
            .with_label_values(&["ambiguous"])
            .inc();
        let ids: Vec<Uuid> = plan.records.iter().map(|r| r.operation_id).collect();
        let shards = [self.shard];
        let mut backoff = Duration::from_millis(50);
        loop {
            let looked_up = tokio::select! {
                biased;
                () = stop.cancelled() => return Committed::Unknown,
                looked_up = self.store.resolve(&shards, &ids) => looked_up,
            };
            match looked_up {
                Ok(Resolution::Committed) => return Committed::Yes,
                // Safe to plan again: the next attempt's fence check says if we still own it.
                Ok(Resolution::Absent) => {
                    return Committed::No(Arc::new(CommitError::NotCommitted));
                }
                Err(lookup) => {
                    tracing::warn!(error = %error_chain(&lookup), shard = self.shard, "looking up an ambiguous commit failed; retrying");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return Committed::Unknown,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// The committed state goes into the cache. A wallet whose only operations were
    /// refused is not promoted there.
    fn remember(&self, plan: &Plan) {
        let applied: HashSet<Uuid> = plan
            .records
            .iter()
            .filter(|record| record.status == OperationStatus::Applied)
            .map(|record| record.wallet_id)
            .collect();
        for (wallet_id, state) in &plan.next_state {
            if applied.contains(wallet_id) {
                self.cache.put(self.fence, *wallet_id, state.clone());
            } else {
                self.cache.refresh(self.fence, *wallet_id, state.clone());
            }
        }
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
    }

    /// After a failed or unknown commit the touched wallets are loaded afresh.
    fn forget(&self, plan: &Plan) {
        for wallet_id in plan.next_state.keys() {
            self.cache.remove(wallet_id);
        }
    }

    /// Answers every command of a planned batch; `failure` is the answer of the new
    /// records when the batch did not commit.
    fn answer(&self, batch: Vec<Pending>, plan: Plan, failure: Option<Undelivered>) {
        for (pending, planned) in batch.into_iter().zip(plan.planned) {
            let answer = match planned {
                Planned::Done(outcome) => Ok(outcome),
                Planned::Expired => {
                    self.metrics.dropped.with_label_values(&["expired"]).inc();
                    Err(Undelivered::NotApplied(NotApplied::Expired))
                }
                Planned::New(index) => match failure {
                    None => Ok(CommandOutcome::Recorded(plan.records[index].clone())),
                    Some(failure) => Err(failure),
                },
            };
            let _ = pending.reply.send(answer);
        }
    }

    /// The batch's wallets (cached, or loaded) and the operations recorded before under
    /// the same ids (commands that may exist, or every one on a retry) or keys.
    async fn prepare(&self, batch: &[Pending], retrying: bool) -> Result<Prepared, StoreError> {
        let mut states = HashMap::new();
        let mut missing = HashSet::new();
        for pending in batch {
            let wallet_id = pending.command.wallet_id;
            if states.contains_key(&wallet_id) || missing.contains(&wallet_id) {
                continue;
            }
            match self.cache.get(self.fence, &wallet_id) {
                Some(state) => {
                    states.insert(wallet_id, state);
                }
                None => {
                    missing.insert(wallet_id);
                }
            }
        }
        if !missing.is_empty() {
            let missing: Vec<Uuid> = missing.into_iter().collect();
            states.extend(self.store.wallets(&missing).await?);
        }
        let ids: Vec<Uuid> = batch
            .iter()
            .filter(|pending| retrying || pending.command.may_exist)
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
        let existing = if ids.is_empty() && keyed.is_empty() {
            Vec::new()
        } else {
            self.store.existing_operations(&ids, &keyed).await?
        };
        Ok(Prepared { states, existing })
    }

    /// Applies the batch in arrival order to a copy of the wallets' committed state.
    fn plan(&self, batch: &[Pending], prepared: &Prepared) -> Plan {
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
            // First of all: another tenant's wallet does not exist for this caller, not
            // even its operations or idempotency keys.
            let owner = next_state
                .get(&command.wallet_id)
                .or_else(|| prepared.states.get(&command.wallet_id))
                .map(|state| &state.tenant);
            if owner != Some(&command.tenant) {
                planned.push(Planned::Done(CommandOutcome::WalletNotFound));
                continue;
            }
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
            // Checked after the look-ups: a command that may exist is only reported
            // expired once it is known not to be in the database.
            if command.deadline.has_passed() {
                planned.push(Planned::Expired);
                continue;
            }
            let Some(state) = next_state
                .get(&command.wallet_id)
                .or_else(|| prepared.states.get(&command.wallet_id))
                .cloned()
            else {
                planned.push(Planned::Done(CommandOutcome::WalletNotFound));
                continue;
            };
            let amount = command.amount.value();
            let (balance, rejection) = apply(state.balance, command.operation_type, amount);
            let version = state.version + 1;
            next_state.insert(
                command.wallet_id,
                WalletState {
                    balance,
                    version,
                    tenant: state.tenant,
                },
            );
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
                let before = prepared.states.get(wallet_id)?;
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
