//! The owner's side of forwarding: signed requests only (`crate::internal_auth`); each
//! command of a batch is answered with its outcome or why it has none (`Undelivered`),
//! as the local executor said.

use salvo::prelude::*;

use super::problem::{Problem, write_json};
use super::{AppState, app_state};

use futures::future::join_all;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::internal_auth::{self, AuthError};
use crate::routing::{
    ForwardBatch, ForwardReply, ForwardResult, ForwardedCommand, MAX_FORWARD_BATCH, ReadBatch,
    ReadReply, ReadResult,
};
use crate::submit::Submit;

fn unauthorized(state: &AppState, error: AuthError, res: &mut Response) {
    state.internal_auth.refused(error);
    tracing::warn!(reason = error.label(), "internal request refused: {error}");
    Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        error.to_string(),
    )
    .write_to(res);
}

/// The body of a signed internal request; `None` once the refusal is written.
async fn signed_body(
    req: &mut Request,
    state: &AppState,
    res: &mut Response,
) -> Option<bytes::Bytes> {
    // The headers first: an unsigned or stale request is refused before its body is read.
    let claimed = {
        let headers = req.headers();
        state.internal_auth.check_headers(
            |name| headers.get(name).and_then(|value| value.to_str().ok()),
            internal_auth::now_ms(),
        )
    };
    let claimed = match claimed {
        Ok(claimed) => claimed,
        Err(error) => {
            unauthorized(state, error, res);
            return None;
        }
    };
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let body = match req.payload_with_max_size(state.max_body_bytes * 512).await {
        Ok(body) => body.clone(),
        Err(error) => {
            malformed(res, error.to_string());
            return None;
        }
    };
    if let Err(error) =
        state
            .internal_auth
            .verify(&claimed, &method, &path, &body, internal_auth::now_ms())
    {
        unauthorized(state, error, res);
        return None;
    }
    Some(body)
}

fn malformed(res: &mut Response, detail: String) {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "malformed-request",
        "Malformed request",
        detail,
    )
    .write_to(res);
}

#[handler]
pub async fn execute_operation(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let Some(state) = app_state(depot, res) else {
        return;
    };
    let Some(body) = signed_body(req, &state, res).await else {
        return;
    };
    let batch = match serde_json::from_slice::<ForwardBatch>(&body) {
        Ok(batch) if batch.operations.len() <= MAX_FORWARD_BATCH => batch,
        Ok(batch) => {
            let count = batch.operations.len();
            return malformed(
                res,
                format!("{count} commands in one batch; at most {MAX_FORWARD_BATCH}"),
            );
        }
        Err(error) => return malformed(res, error.to_string()),
    };
    // All commands go to their executors at once, so they share the owner's next batches.
    // They go through the same interface the router uses for this node's own shards; if
    // the sender gives up and closes the connection, these futures are dropped and
    // commands not planned yet are dropped with them.
    let results = join_all(
        batch
            .operations
            .into_iter()
            .map(|forwarded| execute(&state, forwarded)),
    )
    .await;
    write_json(
        res,
        StatusCode::OK,
        "application/json",
        &ForwardReply { results },
    );
}

async fn execute(state: &AppState, forwarded: ForwardedCommand) -> ForwardResult {
    let shard = state.router.shard_of(&forwarded.command.wallet_id);
    // Continue the trace of the request the command came from, on this node.
    let span = tracing::info_span!("forwarded_operation", shard, operation_id = %forwarded.command.operation_id);
    let _ = span.set_parent(TraceContextPropagator::new().extract(&forwarded.trace));
    state
        .executors
        .submit(shard, forwarded.command)
        .instrument(span)
        .await
        .into()
}

/// Balance reads for the wallets this node owns, answered from its memory only: the
/// reader has PostgreSQL for everything else.
#[handler]
pub async fn read_wallets(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let Some(state) = app_state(depot, res) else {
        return;
    };
    let Some(body) = signed_body(req, &state, res).await else {
        return;
    };
    let batch = match serde_json::from_slice::<ReadBatch>(&body) {
        Ok(batch) if batch.reads.len() <= MAX_FORWARD_BATCH => batch,
        Ok(batch) => {
            let count = batch.reads.len();
            return malformed(
                res,
                format!("{count} reads in one batch; at most {MAX_FORWARD_BATCH}"),
            );
        }
        Err(error) => return malformed(res, error.to_string()),
    };
    let results = batch
        .reads
        .into_iter()
        .map(
            |read| match state.router.committed_wallet(&read.wallet_id) {
                Some(wallet) if wallet.tenant == read.tenant => ReadResult::Found(wallet),
                Some(_) => ReadResult::NotFound,
                None => ReadResult::NotFromMemory,
            },
        )
        .collect();
    write_json(
        res,
        StatusCode::OK,
        "application/json",
        &ReadReply { results },
    );
}
