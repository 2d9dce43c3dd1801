//! Creating and seeding the wallets a scenario uses, through the public API.

use crate::client::{Conn, Target, WALLETS_PATH};
use crate::cluster::wallet_id;
use crate::workload::{Kind, operation_body};
use bytes::Bytes;
use http::{Method, Uri};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("creating wallet: {0}")]
    Create(String),
    #[error("seeding wallet {0}: {1}")]
    Seed(Uuid, String),
}

const ATTEMPTS: usize = 5;

async fn create_one(conn: &mut Conn, timeout: Duration) -> Result<Uuid, SetupError> {
    let mut last = String::new();
    for _ in 0..ATTEMPTS {
        match conn
            .send(
                Method::POST,
                Uri::from_static(WALLETS_PATH),
                Bytes::from_static(b"{}"),
                timeout,
            )
            .await
        {
            Ok((201, body)) => {
                return wallet_id(&body).ok_or_else(|| {
                    SetupError::Create(format!("no walletId in {}", String::from_utf8_lossy(&body)))
                });
            }
            Ok((status, body)) => {
                last = format!("HTTP {status}: {}", String::from_utf8_lossy(&body))
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(SetupError::Create(last))
}

async fn seed_one(
    conn: &mut Conn,
    wallet: Uuid,
    cents: i64,
    timeout: Duration,
) -> Result<(), SetupError> {
    let body = Bytes::from(operation_body(wallet, Kind::Deposit, cents));
    let mut last = String::new();
    for _ in 0..ATTEMPTS {
        match conn.post_operation(body.clone(), None, timeout).await {
            Ok((200, _)) => return Ok(()),
            // A 5xx or a lost answer may still have been applied: retrying could
            // deposit twice, which the check tolerates because it snapshots the
            // balance only after seeding.
            Ok((status, b)) => last = format!("HTTP {status}: {}", String::from_utf8_lossy(&b)),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(SetupError::Seed(wallet, last))
}

/// Creates `n` wallets and deposits `seed_cents` into each, with `concurrency`
/// connections spread over the targets.
pub async fn create_wallets(
    targets: &[Arc<Target>],
    n: usize,
    seed_cents: i64,
    concurrency: usize,
    timeout: Duration,
) -> Result<Vec<Uuid>, SetupError> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for c in 0..concurrency.clamp(1, n.max(1)) {
        let target = targets[c % targets.len()].clone();
        let next = next.clone();
        handles.push(tokio::spawn(async move {
            let mut conn = Conn::new(target);
            let mut made = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let w = create_one(&mut conn, timeout).await?;
                if seed_cents > 0 {
                    seed_one(&mut conn, w, seed_cents, timeout).await?;
                }
                made.push(w);
            }
            Ok::<_, SetupError>(made)
        }));
    }
    let mut wallets = Vec::with_capacity(n);
    for h in handles {
        match h.await {
            Ok(r) => wallets.extend(r?),
            Err(e) => return Err(SetupError::Create(e.to_string())),
        }
    }
    Ok(wallets)
}
