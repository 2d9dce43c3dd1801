//! Webhooks: the outbox's events POSTed to a tenant's URLs, signed, at least once.
//!
//! Two kinds of work, spread over the nodes by row locks (`FOR UPDATE SKIP LOCKED`), so
//! any number of nodes share them without coordinating (see docs/design.md, "Webhooks"):
//!
//! - fan-out: a node claims webhooks whose tenant has events past the webhook's position,
//!   writes one delivery row per matching event and moves the position, in one
//!   transaction. A delivery exists for every matching event exactly once
//!   (`UNIQUE (webhook_id, event_id)`).
//! - delivery: a node claims due PENDING deliveries, pushes their due time a claim lease
//!   ahead and commits that, POSTs outside any transaction, then records the outcome.
//!   A node that dies mid-delivery leaves its claims to lapse, and another node sends
//!   them again: the same body, the same `Wallet-Event-Id` and `Wallet-Delivery-Id`.
//!
//! Delivery state lives in PostgreSQL only; nothing is lost with a node.

mod metrics;
mod sender;
pub mod target;
mod worker;

pub use metrics::WebhookMetrics;
pub use sender::{Attempt, Sender, SenderError};
pub use worker::{Workers, start};

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use uuid::Uuid;

use crate::auth::Tenant;
use crate::events::EventType;

/// Live webhooks a tenant may have at once.
pub const MAX_PER_TENANT: i64 = 100;

/// A webhook as stored (its secret stays in the store but for creation).
#[derive(Clone, Debug)]
pub struct Webhook {
    pub id: Uuid,
    pub tenant: Tenant,
    pub url: String,
    pub event_types: Vec<EventType>,
    pub created_at: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Due at `next_attempt_at` (or being attempted, while a claim holds it).
    Pending,
    Delivered,
    /// Out of retries: the dead-letter list, until someone retries it.
    Failed,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 3] = [Self::Pending, Self::Delivered, Self::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Delivered => "DELIVERED",
            Self::Failed => "FAILED",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
    }
}

/// A delivery of one event to one webhook, as stored.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub id: Uuid,
    pub webhook_id: Uuid,
    pub event_id: Uuid,
    pub event_type: EventType,
    /// The event's JSON, exactly as POSTed.
    pub body: String,
    pub status: DeliveryStatus,
    /// Attempts started so far (one killed with its node counts too).
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub retry_until: DateTime<Utc>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// A delivery a node has claimed: what it needs to send it and to record the outcome.
#[derive(Clone, Debug)]
pub struct ClaimedDelivery {
    pub id: Uuid,
    pub event_id: Uuid,
    pub event_type: EventType,
    pub body: String,
    pub url: String,
    pub secret: String,
    /// This claim's attempt number: the outcome is recorded only while it is still the
    /// delivery's latest, so a node whose claim lapsed cannot overwrite a newer attempt.
    pub attempt: i32,
    pub retry_until: DateTime<Utc>,
    /// When the event happened, for the lag histogram.
    pub occurred_at: Option<DateTime<Utc>>,
}

/// A new webhook's signing secret: 32 random bytes, shown once. Receivers key the HMAC
/// with the whole string, prefix included.
pub fn new_secret() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("whsec_{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// `Wallet-Signature`: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
/// The time is signed with the body, so a receiver can refuse old replays.
pub fn signature(secret: &str, timestamp: i64, body: &str) -> String {
    // HMAC takes keys of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// The wait before retry number `attempt` (1 after the first failure): "full jitter",
/// uniformly random between zero and `min(max, base × 2^(attempt − 1))`, so receivers
/// coming back are not hit by every delivery at once. `random` is any random number.
pub fn backoff(attempt: i32, base: Duration, max: Duration, random: u64) -> Duration {
    let doublings = u32::try_from(attempt.saturating_sub(1).clamp(0, 31)).unwrap_or(31);
    let ceiling = base.saturating_mul(1u32 << doublings).min(max);
    let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(random % ceiling_ms.saturating_add(1))
}

/// A random number for [`backoff`]; without the OS's randomness, no jitter (the ceiling).
pub fn jitter() -> u64 {
    getrandom::u64().unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_time_dot_body_in_hex() {
        // echo -n '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec_test
        assert_eq!(
            signature("whsec_test", 1_700_000_000, r#"{"a":1}"#),
            "t=1700000000,v1=38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"
        );
    }

    #[test]
    fn backoff_stays_within_its_doubling_ceiling_and_the_cap() {
        let base = Duration::from_millis(1_000);
        let max = Duration::from_millis(3_600_000);
        for attempt in 1..40 {
            let ceiling = base.saturating_mul(1 << (attempt - 1).min(31)).min(max);
            for random in [0, 1, 999, 123_456_789, u64::MAX] {
                assert!(backoff(attempt, base, max, random) <= ceiling, "{attempt}");
            }
            assert_eq!(backoff(attempt, base, max, 0), Duration::ZERO);
        }
        assert_eq!(backoff(1, base, max, 1_000), base);
        assert_eq!(backoff(3, base, max, 4_000), Duration::from_millis(4_000));
        assert_eq!(
            backoff(0, base, max, 1_000),
            base,
            "attempt 0 is treated as 1"
        );
    }

    #[test]
    fn secrets_are_long_random_and_distinct() {
        let (a, b) = (new_secret().expect("random"), new_secret().expect("random"));
        assert_ne!(a, b);
        assert!(a.starts_with("whsec_") && a.len() == 6 + 43, "{a}");
    }

    #[test]
    fn statuses_round_trip() {
        for status in DeliveryStatus::ALL {
            assert_eq!(DeliveryStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(DeliveryStatus::parse("pending"), None);
    }
}
