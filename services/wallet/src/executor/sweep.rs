//! The owner's sweep: work that must happen even when nobody asks for it. Holds past
//! their `expiresAt` are expired, and PENDING transfers into this node's shards whose
//! fast-path credit did not arrive (the node that took the request died, or the credit
//! timed out) are posted. Both go through the shard's executor like any command, so they
//! are ordered and fenced with everything else; both are safe to repeat.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::ExecutorPool;
use crate::domain::{
    Action, Amount, CommandOutcome, Deadline, OperationCommand, transfer_credit_id,
};
use crate::store::Store;
use crate::submit::{Submit, Undelivered};

#[derive(Clone, Copy, Debug)]
pub struct SweepSettings {
    /// How often the node looks for due holds and PENDING transfers.
    pub interval: Duration,
    /// A PENDING transfer younger than this is left to the fast path.
    pub pending_after: Duration,
    /// Most holds, and most transfers, handled per sweep.
    pub batch: i64,
}

/// Sweeps the node's shards every `interval` until `stop`.
pub async fn sweep_until_stopped(
    pool: Arc<ExecutorPool>,
    store: Store,
    settings: SweepSettings,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let shards = pool.active_shards();
        if shards.is_empty() {
            continue;
        }
        let (holds, transfers) = tokio::join!(
            expire_holds(&pool, &store, &shards, settings),
            post_transfers(&pool, &store, &shards, settings),
        );
        for (kind, result) in [("holds", holds), ("transfers", transfers)] {
            if let Err(error) = result {
                tracing::warn!(error = %error, kind, "sweep failed; trying again next time");
            }
        }
    }
}

fn command(
    tenant: crate::auth::Tenant,
    wallet_id: Uuid,
    operation_id: Uuid,
    action: Action,
    settings: SweepSettings,
) -> OperationCommand {
    // A sweep's command that does not make it in time is found again by the next one.
    OperationCommand::new(
        operation_id,
        tenant,
        wallet_id,
        action,
        None,
        Deadline::after(settings.interval.max(Duration::from_secs(1))),
    )
}

async fn expire_holds(
    pool: &ExecutorPool,
    store: &Store,
    shards: &[u32],
    settings: SweepSettings,
) -> Result<(), crate::store::StoreError> {
    let due = store.due_holds(shards, settings.batch).await?;
    let submissions = due.into_iter().map(|hold| async move {
        let command = command(
            hold.tenant.clone(),
            hold.wallet_id,
            Uuid::now_v7(),
            Action::Expire {
                hold_id: hold.hold_id,
            },
            settings,
        );
        (hold.shard, pool.submit(hold.shard, command).await)
    });
    for (shard, result) in join_all(submissions).await {
        match result {
            Ok(CommandOutcome::Hold(hold)) if hold.status == crate::domain::HoldStatus::Expired => {
                pool.metrics
                    .swept
                    .with_label_values(&["hold_expired"])
                    .inc();
            }
            Ok(_) | Err(Undelivered::NotOwner) => {}
            Err(undelivered) => {
                tracing::debug!(shard, %undelivered, "expiring a hold did not complete");
            }
        }
    }
    Ok(())
}

async fn post_transfers(
    pool: &ExecutorPool,
    store: &Store,
    shards: &[u32],
    settings: SweepSettings,
) -> Result<(), crate::store::StoreError> {
    let pending = store
        .pending_transfers(shards, settings.pending_after, settings.batch)
        .await?;
    let submissions = pending.into_iter().filter_map(|transfer| {
        let Ok(amount) = Amount::new(transfer.amount) else {
            tracing::error!(transfer_id = %transfer.transfer_id, "a stored transfer has an invalid amount");
            return None;
        };
        Some(async move {
            let mut command = command(
                transfer.tenant.clone(),
                transfer.to_wallet_id,
                transfer_credit_id(transfer.transfer_id),
                Action::TransferIn {
                    transfer_id: transfer.transfer_id,
                    from_wallet_id: transfer.from_wallet_id,
                    amount,
                },
                settings,
            );
            command.may_exist = true;
            (transfer.to_shard, pool.submit(transfer.to_shard, command).await)
        })
    });
    for (shard, result) in join_all(submissions).await {
        match result {
            Ok(CommandOutcome::Recorded(_)) => {
                pool.metrics
                    .swept
                    .with_label_values(&["transfer_posted"])
                    .inc();
            }
            Ok(_) | Err(Undelivered::NotOwner) => {}
            Err(undelivered) => {
                tracing::debug!(shard, %undelivered, "posting a transfer did not complete");
            }
        }
    }
    Ok(())
}
