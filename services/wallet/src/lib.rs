//! The wallet node: public API, group-commit executors, routing to shard owners.
//!
//! The data path reads top to bottom: `http` (route, validate) → `routing` (owner:
//! this node or a peer) → `executor` (batch per shard) → `store` (one transaction).

pub mod auth;
pub mod config;
pub mod domain;
pub mod events;
pub mod executor;
pub mod health;
pub mod http;
pub mod internal_auth;
pub mod routing;
pub mod startup;
pub mod store;
pub mod submit;
pub mod telemetry;
pub mod webhooks;

pub use config::Config;
pub use startup::Application;

/// An error and its sources in one line, for logs and problem details; a source whose
/// message the text already holds is not repeated (many errors repeat their source).
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(error) = next {
        let part = error.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = error.source();
    }
    text
}
