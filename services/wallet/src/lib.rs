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
