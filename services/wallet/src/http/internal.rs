//! The owner's side of forwarding: authenticated; each command of a batch is answered
//! with its outcome or why it has none (`Undelivered`), as the local executor said.

use salvo::http::header::AUTHORIZATION;
use salvo::prelude::*;
use secrecy::ExposeSecret;

use super::problem::{Problem, write_json};
use super::{AppState, app_state};

use futures::future::join_all;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::routing::{
    ForwardBatch, ForwardReply, ForwardResult, ForwardedCommand, MAX_FORWARD_BATCH,
};
use crate::submit::Submit;

/// Compares in constant time, so the secret cannot be guessed byte by byte.
fn secret_matches(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[handler]
pub async fn execute_operation(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let Some(state) = app_state(depot, res) else {
        return;
    };
    let expected = format!("Bearer {}", state.internal_secret.expose_secret());
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .map(|value| value.as_bytes())
        .unwrap_or_default();
    if !secret_matches(given, expected.as_bytes()) {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            "missing or wrong internal secret",
        )
        .write_to(res);
        return;
    }
    let parsed = req
        .payload_with_max_size(state.max_body_bytes * 512)
        .await
        .map_err(|error| error.to_string())
        .and_then(|bytes| {
            serde_json::from_slice::<ForwardBatch>(bytes).map_err(|error| error.to_string())
        });
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

#[cfg(test)]
mod tests {
    use super::secret_matches;

    #[test]
    fn secrets_must_match_exactly() {
        assert!(secret_matches(b"Bearer abc", b"Bearer abc"));
        assert!(!secret_matches(b"Bearer abd", b"Bearer abc"));
        assert!(!secret_matches(b"Bearer ab", b"Bearer abc"));
        assert!(!secret_matches(b"", b"Bearer abc"));
    }
}
