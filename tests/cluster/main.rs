//! Several nodes as separate processes: ownership moves, kills, pauses, restarts, and
//! outages of Redis and PostgreSQL; transfers between owners under those faults.
//!
//! Every test starts its own nodes on its own database and Redis prefix, drives load
//! at all of them while it breaks something, and then audits PostgreSQL: nothing
//! acknowledged lost or doubled, nothing recorded that a client was refused (4xx) or
//! told was not applied (5xx), exact balances. Node logs go to
//! `target/test-logs/<redis prefix>-<node>.log`.

mod chaos;
mod harness;
mod internal_port;
mod kill;
mod membership;
mod partition;
mod pause;
mod postgres;
mod redis;
mod rolling;
mod transfers;
mod webhooks;
