use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{SubsecRound, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::cache::Caches;
use super::committer::Committer;
use super::plan::{Plan, Planned, Prepared, plan};
use super::{ExecutorMetrics, Pending, Stall};
use crate::domain::OperationStatus;
use crate::store::{CommitError, Resolution, ShardFence, Store, StoreError};
use crate::submit::{MayExist, NotApplied, Undelivered};

/// Attempts of one batch when the failure says a retry is safe.
const MAX_ATTEMPTS: u32 = 4;

pub(super) struct ShardExecutor {
    shard: u32,
    fence: i64,
    store: Store,
    committer: Committer,
    caches: Arc<Caches>,
    batch_max: usize,
    /// Whether batches write their outbox rows.
    events: bool,
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
        caches: Arc<Caches>,
        batch_max: usize,
        events: bool,
        metrics: ExecutorMetrics,
        fence_lost: mpsc::Sender<u32>,
        stall: Arc<Stall>,
    ) -> Self {
        Self {
            shard,
            fence,
            store,
            committer,
            caches,
            batch_max,
            events,
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
            // PostgreSQL keeps microseconds: answer with what a replay will read back.
            let now = Utc::now().trunc_subsecs(6);
            let plan = plan(&batch, &prepared, self.shard, now, self.events);
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
            .commit(
                fence,
                plan.records.clone(),
                plan.updates.clone(),
                plan.ledger.clone(),
            )
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
                self.caches
                    .wallets
                    .put(self.fence, *wallet_id, state.clone());
            } else {
                self.caches
                    .wallets
                    .refresh(self.fence, *wallet_id, state.clone());
            }
        }
        // Holds as committed: ACTIVE ones for their capture or void, settled ones for
        // the 409 of a late one.
        for hold in plan
            .ledger
            .new_holds
            .iter()
            .chain(&plan.ledger.settled_holds)
        {
            self.caches
                .holds
                .put(self.fence, hold.hold_id, hold.clone());
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
            self.caches.wallets.remove(wallet_id);
        }
        for hold in plan
            .ledger
            .new_holds
            .iter()
            .chain(&plan.ledger.settled_holds)
        {
            self.caches.holds.remove(&hold.hold_id);
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
                Planned::New(outcome) => match failure {
                    None => Ok(outcome),
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
            match self.caches.wallets.get(self.fence, &wallet_id) {
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
        let mut holds = HashMap::new();
        let mut missing_holds = Vec::new();
        for hold_id in batch
            .iter()
            .filter_map(|pending| pending.command.action.hold_id())
        {
            match self.caches.holds.get(self.fence, &hold_id) {
                Some(hold) => {
                    holds.insert(hold_id, hold);
                }
                None => missing_holds.push(hold_id),
            }
        }
        if !missing_holds.is_empty() {
            holds.extend(
                self.store
                    .holds(&missing_holds)
                    .await?
                    .into_iter()
                    .map(|hold| (hold.hold_id, hold)),
            );
        }
        Ok(Prepared {
            states,
            existing,
            holds,
        })
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
