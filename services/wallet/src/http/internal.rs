//! The owner's side of forwarding: authenticated, and 421 when the shard is not served here.

use salvo::http::header::AUTHORIZATION;
use salvo::prelude::*;
use secrecy::ExposeSecret;

use super::AppState;
use super::problem::{Problem, write_json};
use crate::domain::OperationCommand;
use crate::executor::ExecutionError;

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
    let Ok(state) = depot.get_typed::<AppState>().cloned() else {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal-error",
            "Internal error",
            "state missing",
        )
        .write_to(res);
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
    let command: OperationCommand = match req.payload_with_max_size(state.max_body_bytes * 2).await
    {
        Ok(bytes) => match serde_json::from_slice(bytes) {
            Ok(command) => command,
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
        },
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
    let shard = state.router.shard_of(&command.wallet_id);
    match state.executors.execute(shard, command).await {
        Ok(outcome) => write_json(res, StatusCode::OK, "application/json", &outcome),
        Err(ExecutionError::NotOwner) => Problem::new(
            StatusCode::MISDIRECTED_REQUEST,
            "not-owner",
            "Not the owner",
            format!("this node does not serve shard {shard}"),
        )
        .write_to(res),
        Err(ExecutionError::Unavailable) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service-unavailable",
            "Service unavailable",
            "the operation could not be committed",
        )
        .write_to(res),
    }
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
