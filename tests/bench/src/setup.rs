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

/// Wallets numbered within one random prefix: wallet i has the id `prefix | i`
/// (the last 48 bits, the UUID's last group), so a run's wallets are one id range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Numbered {
    prefix: u128,
    pub n: usize,
}

const INDEX_BITS: u32 = 48;

impl Numbered {
    /// A fresh prefix from a v4 UUID: its version and variant bits stay intact.
    pub fn new(n: usize) -> Self {
        Self::with_prefix(Uuid::new_v4().as_u128(), n)
    }

    fn with_prefix(random: u128, n: usize) -> Self {
        Self {
            prefix: random & !((1u128 << INDEX_BITS) - 1),
            n,
        }
    }

    pub fn id(&self, i: usize) -> Uuid {
        Uuid::from_u128(self.prefix | i as u128)
    }

    pub fn ids(&self) -> Vec<Uuid> {
        (0..self.n).map(|i| self.id(i)).collect()
    }

    /// The first and last possible id of the prefix (covers every wallet of the run).
    pub fn range(&self) -> (Uuid, Uuid) {
        (
            Uuid::from_u128(self.prefix),
            Uuid::from_u128(self.prefix | ((1u128 << INDEX_BITS) - 1)),
        )
    }

    /// "xxxxxxxx-xxxx-xxxx-xxxx-": the id text before the index's 12 hex digits.
    pub fn text_prefix(&self) -> String {
        let full = Uuid::from_u128(self.prefix).hyphenated().to_string();
        full[..24].to_owned()
    }
}

/// Inserts wallets `0..n` of `wallets` with balance 0 directly in PostgreSQL,
/// `chunk` rows per statement (a million through the API would take minutes).
pub async fn seed_numbered(
    pool: &sqlx::PgPool,
    tenant: &str,
    wallets: &Numbered,
    chunk: usize,
) -> Result<(), sqlx::Error> {
    let prefix = wallets.text_prefix();
    let chunk = chunk.max(1);
    let mut from = 0usize;
    while from < wallets.n {
        let to = (from + chunk).min(wallets.n);
        sqlx::query(
            "INSERT INTO wallets (id, tenant_id, balance, version) \
             SELECT ($1 || lpad(to_hex(g), 12, '0'))::uuid, $4, 0, 0 \
             FROM generate_series($2::bigint, $3::bigint) AS g",
        )
        .bind(&prefix)
        .bind(from as i64)
        .bind(to as i64 - 1)
        .bind(tenant)
        .execute(pool)
        .await?;
        from = to;
    }
    Ok(())
}

/// Deletes the wallets of `wallets` and their audit rows, `chunk` wallets per
/// statement, so repeated runs do not leave millions of rows behind. Needs the owner
/// of the tables: the app role may not delete.
pub async fn delete_numbered(
    pool: &sqlx::PgPool,
    wallets: &Numbered,
    chunk: usize,
) -> Result<(), sqlx::Error> {
    let chunk = chunk.max(1);
    let mut from = 0usize;
    while from < wallets.n {
        let to = (from + chunk).min(wallets.n);
        let (lo, hi) = (wallets.id(from), wallets.id(to - 1));
        let mut tx = pool.begin().await?;
        // The audit trail refuses deletes outside a maintenance transaction (0003).
        sqlx::query("SET LOCAL wallet.maintenance = 'on'")
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM operations WHERE wallet_id BETWEEN $1 AND $2")
            .bind(lo)
            .bind(hi)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM wallets WHERE id BETWEEN $1 AND $2")
            .bind(lo)
            .bind(hi)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        from = to;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_ids_share_a_prefix_and_stay_v4() {
        let w = Numbered::with_prefix(Uuid::new_v4().as_u128(), 1_000_001);
        assert_eq!(w.id(0).get_version_num(), 4);
        assert_eq!(w.id(1_000_000).get_version_num(), 4);
        assert!(w.id(0).to_string().ends_with("-000000000000"));
        assert!(w.id(255).to_string().ends_with("-0000000000ff"));
        assert!(w.id(7).to_string().starts_with(&w.text_prefix()));
        let (lo, hi) = w.range();
        assert!(lo <= w.id(0) && w.id(1_000_000) <= hi);
        assert!(hi.to_string().ends_with("-ffffffffffff"));
        assert_eq!(w.ids().len(), 1_000_001);
    }
}
