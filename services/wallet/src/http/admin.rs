//! Probes, metrics and the cluster view, on the admin port.

use prometheus::Encoder;
use salvo::prelude::*;
use serde_json::json;

use super::app_state;
use super::problem::{Problem, write_json};
use crate::store::REQUIRED_SCHEMA_VERSION;

/// Alive: the process answers. Nothing external is checked, so a database outage
/// does not make Kubernetes restart every pod.
#[handler]
pub async fn healthz(res: &mut Response) {
    write_json(
        res,
        StatusCode::OK,
        "application/json",
        &json!({"status": "ok"}),
    );
}

/// Ready: the database is usable (as the health monitor sees it: a blip shorter than
/// `WALLET_DB_UNUSABLE_AFTER_MS` does not count), its schema is new enough, and this node
/// is a registered member that can route. Read from state, never from a query of its
/// own, so probes cannot pile onto a slow database.
#[handler]
pub async fn readyz(depot: &mut Depot, res: &mut Response) {
    let Some(state) = app_state(depot, res) else {
        return;
    };
    let health = state.health.borrow().clone();
    let schema = match health.schema_version {
        Some(version) if health.schema_ok() => version.to_string(),
        Some(version) => format!("{version}, older than required"),
        None if health.problem.is_none() => "not migrated".to_owned(),
        None => "unknown".to_owned(),
    };
    let database = match (&health.problem, health.usable) {
        (None, _) => "ok".to_owned(),
        (Some(problem), true) => format!("usable, last check failed: {problem}"),
        (Some(problem), false) => format!("unusable: {problem}"),
    };
    let cluster_ok = state.cluster.is_ready();
    let ready = health.schema_ok() && cluster_ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    write_json(
        res,
        status,
        "application/json",
        &json!({
            "status": if ready { "ready" } else { "not ready" },
            "database": database,
            "schemaVersion": schema,
            "requiredSchemaVersion": REQUIRED_SCHEMA_VERSION,
            "cluster": if cluster_ok { "member" } else { "not registered" },
        }),
    );
}

#[handler]
pub async fn metrics(depot: &mut Depot, res: &mut Response) {
    let Some(state) = app_state(depot, res) else {
        return;
    };
    state.executors.set_cached_wallets_gauge();
    let encoder = prometheus::TextEncoder::new();
    let mut buffer = Vec::new();
    if let Err(error) = encoder.encode(&state.registry.gather(), &mut buffer) {
        tracing::error!(error = %error, "metrics could not be encoded");
        res.status_code(StatusCode::INTERNAL_SERVER_ERROR);
        return;
    }
    res.headers_mut().insert(
        salvo::http::header::CONTENT_TYPE,
        salvo::http::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    let _ = res.write_body(buffer);
}

#[handler]
pub async fn cluster(depot: &mut Depot, res: &mut Response) {
    let Some(state) = app_state(depot, res) else {
        return;
    };
    write_json(
        res,
        StatusCode::OK,
        "application/json",
        &state.cluster.snapshot(),
    );
}

#[handler]
pub async fn owner(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let Some(state) = app_state(depot, res) else {
        return;
    };
    let text: String = req.param("wallet_id").unwrap_or_default();
    let Ok(wallet_id) = uuid::Uuid::try_parse(&text) else {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-uuid",
            "Invalid UUID",
            "walletId must be a UUID",
        )
        .write_to(res);
        return;
    };
    let shard = state.cluster.shard_of(&wallet_id);
    let owner_id = state.cluster.owner_of(shard).map(|member| member.id);
    write_json(
        res,
        StatusCode::OK,
        "application/json",
        &json!({"walletId": wallet_id, "shard": shard, "owner": owner_id}),
    );
}
