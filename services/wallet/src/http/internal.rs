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
    ForwardBatch, ForwardReply, ForwardResult, ForwardedCommand, MAX_FORWARD_BATCH,
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

#[handler]
pub async fn execute_operation(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let Some(state) = app_state(depot, res) else {
        return;
    };
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
        Err(error) => return unauthorized(&state, error, res),
    };
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let body = match req.payload_with_max_size(state.max_body_bytes * 512).await {
        Ok(body) => body,
        Err(error) => {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "malformed-request",
                "Malformed request",
                error.to_string(),
            )
            .write_to(res);
            return;
        }
    };
    if let Err(error) =
        state
            .internal_auth
            .verify(&claimed, &method, &path, body, internal_auth::now_ms())
    {
        return unauthorized(&state, error, res);
    }
    let parsed = serde_json::from_slice::<ForwardBatch>(body).map_err(|error| error.to_string());
    let batch = match parsed {
        Ok(batch) if batch.operations.len() <= MAX_FORWARD_BATCH => batch,
        Ok(batch) => {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "malformed-request",
                "Malformed request",
                format!(
                    "{} commands in one batch; at most {MAX_FORWARD_BATCH}",
                    batch.operations.len()
                ),
            )
            .write_to(res);
            return;
        }
        Err(detail) => {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "malformed-request",
                "Malformed request",
                detail,
            )
            .write_to(res);
            return;
        }
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
