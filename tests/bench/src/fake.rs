//! An in-memory stand-in for the wallet API (same paths and bodies, no database):
//! it lets the generator be measured on its own and tested without the cluster.

use crate::money::format_cents;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use uuid::Uuid;

/// The wallets of one fake cluster; share it between listeners to imitate nodes.
#[derive(Default)]
pub struct State {
    balances: Mutex<HashMap<Uuid, i64>>,
    /// Ledger: held amount per wallet and holds (wallet, amount, active).
    held: Mutex<HashMap<Uuid, i64>>,
    holds: Mutex<HashMap<Uuid, (Uuid, i64, bool)>>,
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let ct = if status.is_success() {
        "application/json"
    } else {
        "application/problem+json"
    };
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
    r
}

fn problem(status: StatusCode, detail: &str) -> Response<Full<Bytes>> {
    json(
        status,
        serde_json::json!({"type": "about:blank", "status": status.as_u16(), "detail": detail})
            .to_string(),
    )
}

fn parse_cents(v: &serde_json::Value) -> Option<i64> {
    let s = match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let (int, frac) = s.split_once('.').unwrap_or((&s, "0"));
    if frac.len() > 2 {
        return None;
    }
    let cents = int.parse::<i64>().ok()? * 100 + format!("{frac:0<2}").parse::<i64>().ok()?;
    (cents > 0).then_some(cents)
}

fn operation(state: &State, body: &[u8]) -> Response<Full<Bytes>> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return problem(StatusCode::BAD_REQUEST, "malformed JSON");
    };
    let Some(wallet) = v["walletId"].as_str().and_then(|s| Uuid::parse_str(s).ok()) else {
        return problem(StatusCode::BAD_REQUEST, "walletId");
    };
    let Some(cents) = parse_cents(&v["amount"]) else {
        return problem(StatusCode::UNPROCESSABLE_ENTITY, "amount");
    };
    let op_type = v["operationType"].as_str().unwrap_or_default();
    let delta = match op_type {
        "DEPOSIT" => cents,
        "WITHDRAW" => -cents,
        _ => return problem(StatusCode::UNPROCESSABLE_ENTITY, "operationType"),
    };
    let id = Uuid::new_v4();
    let mut balances = state.balances.lock().unwrap_or_else(|p| p.into_inner());
    let Some(balance) = balances.get_mut(&wallet) else {
        return problem(StatusCode::NOT_FOUND, "unknown wallet");
    };
    if *balance + delta < 0 {
        return json(
            StatusCode::CONFLICT,
            serde_json::json!({"type": "insufficient-funds", "status": 409, "operationId": id})
                .to_string(),
        );
    }
    *balance += delta;
    json(
        StatusCode::OK,
        format!(
            r#"{{"operationId":"{id}","walletId":"{wallet}","operationType":"{op_type}","amount":"{}","status":"APPLIED","balanceAfter":"{}","createdAt":"1970-01-01T00:00:00Z"}}"#,
            format_cents(cents),
            format_cents(*balance)
        ),
    )
}

fn uuid_field(v: &serde_json::Value, field: &str) -> Option<Uuid> {
    v[field].as_str().and_then(|s| Uuid::parse_str(s).ok())
}

/// POST /api/v1/transfers, applied at once (always POSTED).
fn transfer(state: &State, body: &[u8]) -> Response<Full<Bytes>> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return problem(StatusCode::BAD_REQUEST, "malformed JSON");
    };
    let (Some(from), Some(to)) = (uuid_field(&v, "fromWalletId"), uuid_field(&v, "toWalletId"))
    else {
        return problem(StatusCode::BAD_REQUEST, "wallet ids");
    };
    let Some(cents) = parse_cents(&v["amount"]) else {
        return problem(StatusCode::UNPROCESSABLE_ENTITY, "amount");
    };
    if from == to {
        return problem(StatusCode::UNPROCESSABLE_ENTITY, "same wallet");
    }
    let id = Uuid::new_v4();
    let mut balances = state.balances.lock().unwrap_or_else(|p| p.into_inner());
    let held = state
        .held
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&from)
        .copied()
        .unwrap_or(0);
    let (Some(&fb), true) = (balances.get(&from), balances.contains_key(&to)) else {
        return problem(StatusCode::NOT_FOUND, "unknown wallet");
    };
    if fb - held < cents {
        return json(
            StatusCode::CONFLICT,
            serde_json::json!({"type": "insufficient-funds", "status": 409, "transferId": id})
                .to_string(),
        );
    }
    *balances.entry(from).or_insert(0) -= cents;
    *balances.entry(to).or_insert(0) += cents;
    json(
        StatusCode::OK,
        format!(
            r#"{{"transferId":"{id}","fromWalletId":"{from}","toWalletId":"{to}","amount":"{}","status":"POSTED","createdAt":"1970-01-01T00:00:00Z"}}"#,
            format_cents(cents)
        ),
    )
}

/// POST /api/v1/wallets/{id}/holds.
fn create_hold(state: &State, wallet: Uuid, body: &[u8]) -> Response<Full<Bytes>> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return problem(StatusCode::BAD_REQUEST, "malformed JSON");
    };
    let Some(cents) = parse_cents(&v["amount"]) else {
        return problem(StatusCode::UNPROCESSABLE_ENTITY, "amount");
    };
    let balances = state.balances.lock().unwrap_or_else(|p| p.into_inner());
    let Some(&balance) = balances.get(&wallet) else {
        return problem(StatusCode::NOT_FOUND, "unknown wallet");
    };
    let id = Uuid::new_v4();
    let mut held = state.held.lock().unwrap_or_else(|p| p.into_inner());
    let h = held.entry(wallet).or_insert(0);
    if balance - *h < cents {
        return json(
            StatusCode::CONFLICT,
            serde_json::json!({"type": "insufficient-funds", "status": 409, "holdId": id})
                .to_string(),
        );
    }
    *h += cents;
    state
        .holds
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, (wallet, cents, true));
    json(
        StatusCode::CREATED,
        format!(
            r#"{{"holdId":"{id}","walletId":"{wallet}","amount":"{}","capturedAmount":"0.00","status":"ACTIVE","expiresAt":null,"createdAt":"1970-01-01T00:00:00Z"}}"#,
            format_cents(cents)
        ),
    )
}

/// POST /api/v1/holds/{id}/capture, in full. Locks in the order of create_hold.
fn capture_hold(state: &State, hold: Uuid) -> Response<Full<Bytes>> {
    let mut balances = state.balances.lock().unwrap_or_else(|p| p.into_inner());
    let mut held = state.held.lock().unwrap_or_else(|p| p.into_inner());
    let mut holds = state.holds.lock().unwrap_or_else(|p| p.into_inner());
    let Some((wallet, cents, active)) = holds.get_mut(&hold) else {
        return problem(StatusCode::NOT_FOUND, "unknown hold");
    };
    if !*active {
        return json(
            StatusCode::CONFLICT,
            serde_json::json!({"type": "hold-not-active", "status": "CAPTURED"}).to_string(),
        );
    }
    *active = false;
    *balances.entry(*wallet).or_insert(0) -= *cents;
    *held.entry(*wallet).or_insert(0) -= *cents;
    json(
        StatusCode::OK,
        format!(
            r#"{{"holdId":"{hold}","walletId":"{wallet}","amount":"{0}","capturedAmount":"{0}","status":"CAPTURED"}}"#,
            format_cents(*cents)
        ),
    )
}

/// `/api/v1/<prefix><uuid><suffix>` -> the uuid.
fn path_id(path: &str, prefix: &str, suffix: &str) -> Option<Uuid> {
    let rest = path.strip_prefix(prefix)?.strip_suffix(suffix)?;
    Uuid::parse_str(rest).ok()
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(problem(StatusCode::BAD_REQUEST, "body")),
    };
    let path = parts.uri.path();
    let resp = match (&parts.method, path) {
        (&Method::POST, "/api/v1/wallet") => operation(&state, &body),
        (&Method::POST, "/api/v1/transfers") => transfer(&state, &body),
        (&Method::POST, p) if p.starts_with("/api/v1/wallets/") && p.ends_with("/holds") => {
            match path_id(p, "/api/v1/wallets/", "/holds") {
                Some(w) => create_hold(&state, w, &body),
                None => problem(StatusCode::BAD_REQUEST, "wallet id"),
            }
        }
        (&Method::POST, p) if p.starts_with("/api/v1/holds/") && p.ends_with("/capture") => {
            match path_id(p, "/api/v1/holds/", "/capture") {
                Some(h) => capture_hold(&state, h),
                None => problem(StatusCode::BAD_REQUEST, "hold id"),
            }
        }
        (&Method::POST, "/api/v1/wallets") => {
            let id = Uuid::new_v4();
            state
                .balances
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, 0);
            json(
                StatusCode::CREATED,
                format!(r#"{{"walletId":"{id}","balance":"0.00"}}"#),
            )
        }
        // The process metrics the memory sampler reads, of this process.
        (&Method::GET, "/metrics") => {
            let pid = std::process::id();
            let rss = crate::cluster::rss_bytes(pid).unwrap_or(0);
            let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
            let mut r = Response::new(Full::new(Bytes::from(format!(
                "process_resident_memory_bytes {rss}\nprocess_open_fds {fds}\n"
            ))));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (&Method::GET, p) if p.starts_with("/cluster/owner/") => json(
            StatusCode::OK,
            format!(
                r#"{{"walletId":"{}","shard":0,"owner":"node-0"}}"#,
                &p["/cluster/owner/".len()..]
            ),
        ),
        (&Method::GET, p) if p.starts_with("/api/v1/wallets/") => {
            let id = Uuid::parse_str(&p["/api/v1/wallets/".len()..]).ok();
            match id.and_then(|id| {
                state
                    .balances
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&id)
                    .map(|b| (id, *b))
            }) {
                Some((id, b)) => json(
                    StatusCode::OK,
                    format!(r#"{{"walletId":"{id}","balance":"{}"}}"#, format_cents(b)),
                ),
                None => problem(StatusCode::NOT_FOUND, "unknown wallet"),
            }
        }
        _ => problem(StatusCode::NOT_FOUND, "no such route"),
    };
    Ok(resp)
}

/// Serves on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener) -> std::io::Result<()> {
    serve_state(listener, Arc::default()).await
}

pub async fn serve_state(listener: TcpListener, state: Arc<State>) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(state.clone(), req));
            // A client that goes away mid-request is not the server's problem.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_like_the_api() {
        assert_eq!(parse_cents(&serde_json::json!("10.50")), Some(1050));
        assert_eq!(parse_cents(&serde_json::json!("7")), Some(700));
        assert_eq!(parse_cents(&serde_json::json!(2.5)), Some(250));
        assert_eq!(parse_cents(&serde_json::json!("0.001")), None);
        assert_eq!(parse_cents(&serde_json::json!("0")), None);
        assert_eq!(parse_cents(&serde_json::json!(null)), None);
    }
}
