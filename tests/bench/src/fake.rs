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
