//! Signed node-to-node requests. The sender signs, with the internal secret
//! (HMAC-SHA256, `wallet_cluster::SigningKeys`), the method, the path, the node the
//! request is meant for, a timestamp, a random nonce and the SHA-256 of the body; the
//! secret itself never travels. The receiver accepts a request only if the signature
//! verifies under its current or previous secret, the request names this node, its
//! timestamp is within the replay window of its own clock, and its nonce has not been
//! seen inside that window. Naming the node keeps a request captured on its way to one
//! node from being replayed at another, whose replay cache never saw it.
//!
//! Nodes' clocks must agree to well within the window (NTP does it by milliseconds).

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{IntCounterVec, Opts, Registry};
use sha2::{Digest, Sha256};
use wallet_cluster::SigningKeys;

pub const TIMESTAMP_HEADER: &str = "x-wallet-timestamp";
pub const NONCE_HEADER: &str = "x-wallet-nonce";
pub const NODE_HEADER: &str = "x-wallet-node";
pub const SIGNATURE_HEADER: &str = "x-wallet-signature";

/// What a request signature covers, besides its fields.
const REQUEST_PURPOSE: &str = "wallet-internal-request-v1";

/// Most nonces remembered. Beyond it the oldest is forgotten and requests not newer
/// than it are refused as stale: the window shrinks under a flood, it never leaks.
/// About 50 bytes each.
pub const REPLAY_CACHE_MAX: usize = 100_000;

/// The headers that authenticate one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedHeaders {
    pub timestamp_ms: i64,
    pub nonce: String,
    pub node: String,
    pub signature: String,
}

impl SignedHeaders {
    /// `(name, value)` pairs to put on the request.
    pub fn pairs(&self) -> [(&'static str, String); 4] {
        [
            (TIMESTAMP_HEADER, self.timestamp_ms.to_string()),
            (NONCE_HEADER, self.nonce.clone()),
            (NODE_HEADER, self.node.clone()),
            (SIGNATURE_HEADER, self.signature.clone()),
        ]
    }
}

/// Milliseconds since the Unix epoch by this machine's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64)
}

fn fields<'a>(
    method: &'a str,
    path: &'a str,
    node: &'a str,
    timestamp: &'a str,
    nonce: &'a str,
    body_digest: &'a [u8],
) -> [&'a [u8]; 6] {
    [
        method.as_bytes(),
        path.as_bytes(),
        node.as_bytes(),
        timestamp.as_bytes(),
        nonce.as_bytes(),
        body_digest,
    ]
}

/// Signs a request to `node` (its member id) with a fresh nonce.
pub fn sign(
    keys: &SigningKeys,
    method: &str,
    path: &str,
    node: &str,
    body: &[u8],
    timestamp_ms: i64,
) -> SignedHeaders {
    let nonce = format!("{:032x}", uuid::Uuid::new_v4().as_u128());
    let timestamp = timestamp_ms.to_string();
    let digest = Sha256::digest(body);
    let signature = keys.sign(
        REQUEST_PURPOSE,
        &fields(method, path, node, &timestamp, &nonce, &digest),
    );
    SignedHeaders {
        timestamp_ms,
        nonce,
        node: node.to_owned(),
        signature,
    }
}

/// Why a request was refused (401). Nothing of a refused request is executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the request is not signed")]
    Unsigned,
    #[error("the request is meant for another node")]
    WrongNode,
    #[error("the request's timestamp is outside the replay window")]
    Stale,
    #[error("the signature does not match the request")]
    BadSignature,
    #[error("the request was already received")]
    Replayed,
}

impl AuthError {
    /// The `reason` label of `wallet_internal_auth_failures_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Unsigned => "unsigned",
            Self::WrongNode => "wrong_node",
            Self::Stale => "stale",
            Self::BadSignature => "bad_signature",
            Self::Replayed => "replayed",
        }
    }
}

/// A request's claims, read from its headers before its body.
#[derive(Debug)]
pub struct Claimed {
    timestamp: String,
    timestamp_ms: i64,
    nonce: u128,
    nonce_text: String,
    node: String,
    signature: String,
}

/// The receiving side: this node's id, its secrets, the window and the nonces seen.
pub struct Verifier {
    keys: SigningKeys,
    node_id: String,
    window: Duration,
    replay: Mutex<ReplayCache>,
    failures: IntCounterVec,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("node_id", &self.node_id)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn new(
        keys: SigningKeys,
        node_id: String,
        window: Duration,
        registry: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let failures = IntCounterVec::new(
            Opts::new(
                "wallet_internal_auth_failures_total",
                "Internal requests refused before anything ran, by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(failures.clone()))?;
        for reason in [
            AuthError::Unsigned,
            AuthError::WrongNode,
            AuthError::Stale,
            AuthError::BadSignature,
            AuthError::Replayed,
        ] {
            failures.with_label_values(&[reason.label()]);
        }
        Ok(Self {
            keys,
            node_id,
            window,
            replay: Mutex::new(ReplayCache::new(REPLAY_CACHE_MAX)),
            failures,
        })
    }

    /// Counts a refusal (the handler logs it).
    pub fn refused(&self, error: AuthError) {
        self.failures.with_label_values(&[error.label()]).inc();
    }

    /// Checks what the headers alone can tell, so an unsigned or stale request is
    /// refused before its body is read. `header` gives a header's value by name.
    pub fn check_headers<'h>(
        &self,
        header: impl Fn(&str) -> Option<&'h str>,
        now_ms: i64,
    ) -> Result<Claimed, AuthError> {
        let (Some(timestamp), Some(nonce_text), Some(node), Some(signature)) = (
            header(TIMESTAMP_HEADER),
            header(NONCE_HEADER),
            header(NODE_HEADER),
            header(SIGNATURE_HEADER),
        ) else {
            return Err(AuthError::Unsigned);
        };
        let timestamp_ms: i64 = timestamp.parse().map_err(|_| AuthError::Unsigned)?;
        let nonce = (nonce_text.len() == 32)
            .then(|| u128::from_str_radix(nonce_text, 16).ok())
            .flatten()
            .ok_or(AuthError::Unsigned)?;
        if node != self.node_id {
            return Err(AuthError::WrongNode);
        }
        let window = self.window.as_millis() as i64;
        // Both ways: a clock ahead of ours by more than the window is as suspicious.
        if timestamp_ms.abs_diff(now_ms) > window as u64 {
            return Err(AuthError::Stale);
        }
        Ok(Claimed {
            timestamp: timestamp.to_owned(),
            timestamp_ms,
            nonce,
            nonce_text: nonce_text.to_owned(),
            node: node.to_owned(),
            signature: signature.to_owned(),
        })
    }

    /// Verifies the signature over the whole request, then remembers its nonce; a
    /// nonce already seen (or older than what the cache still remembers) is refused.
    pub fn verify(
        &self,
        claimed: &Claimed,
        method: &str,
        path: &str,
        body: &[u8],
        now_ms: i64,
    ) -> Result<(), AuthError> {
        let digest = Sha256::digest(body);
        let signed = fields(
            method,
            path,
            &claimed.node,
            &claimed.timestamp,
            &claimed.nonce_text,
            &digest,
        );
        if !self
            .keys
            .verify(REQUEST_PURPOSE, &signed, &claimed.signature)
        {
            return Err(AuthError::BadSignature);
        }
        // Only signed requests reach the cache, so forgeries cannot flood it.
        self.replay
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .admit(
                claimed.nonce,
                claimed.timestamp_ms,
                now_ms - self.window.as_millis() as i64,
            )
    }
}

/// The nonces of the signed requests accepted inside the window, bounded.
#[derive(Debug)]
struct ReplayCache {
    seen: HashSet<u128>,
    /// In arrival order, with each request's timestamp.
    order: VecDeque<(i64, u128)>,
    /// Requests at or before this timestamp are refused: the cache may have forgotten
    /// some of them to stay within its bound.
    floor_ms: i64,
    max: usize,
}

impl ReplayCache {
    fn new(max: usize) -> Self {
        Self {
            seen: HashSet::new(),
            order: VecDeque::new(),
            floor_ms: i64::MIN,
            max: max.max(1),
        }
    }

    /// Admits a request (its nonce and timestamp) unless it may have been seen;
    /// forgets what fell out of the window (`oldest_ms` is its start).
    fn admit(&mut self, nonce: u128, timestamp_ms: i64, oldest_ms: i64) -> Result<(), AuthError> {
        while let Some(&(at, old)) = self.order.front() {
            if at >= oldest_ms {
                break;
            }
            // Outside the window: refused by the timestamp check from now on anyway.
            self.order.pop_front();
            self.seen.remove(&old);
        }
        if timestamp_ms <= self.floor_ms {
            return Err(AuthError::Stale);
        }
        if !self.seen.insert(nonce) {
            return Err(AuthError::Replayed);
        }
        self.order.push_back((timestamp_ms, nonce));
        while self.order.len() > self.max {
            if let Some((at, old)) = self.order.pop_front() {
                self.seen.remove(&old);
                self.floor_ms = self.floor_ms.max(at);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const WINDOW: Duration = Duration::from_secs(30);
    const NOW: i64 = 1_800_000_000_000;
    const PATH: &str = "/internal/v1/operations";

    fn keys(current: &str, previous: Option<&str>) -> SigningKeys {
        SigningKeys::new(current.into(), previous.map(Into::into))
    }

    fn verifier(keys: SigningKeys) -> Verifier {
        Verifier::new(keys, "node-1".into(), WINDOW, &Registry::new()).expect("verifier")
    }

    fn headers(signed: &SignedHeaders) -> HashMap<&'static str, String> {
        signed.pairs().into_iter().collect()
    }

    /// Runs both checks as the handler does.
    fn check(
        verifier: &Verifier,
        headers: &HashMap<&'static str, String>,
        method: &str,
        body: &[u8],
        now: i64,
    ) -> Result<(), AuthError> {
        let claimed = verifier.check_headers(|name| headers.get(name).map(String::as_str), now)?;
        verifier.verify(&claimed, method, PATH, body, now)
    }

    #[test]
    fn a_signed_request_is_accepted_once() {
        let keys = keys("secret", None);
        let verifier = verifier(keys.clone());
        let signed = sign(&keys, "POST", PATH, "node-1", b"{}", NOW);
        let headers = headers(&signed);
        assert_eq!(check(&verifier, &headers, "POST", b"{}", NOW + 5), Ok(()));
        assert_eq!(
            check(&verifier, &headers, "POST", b"{}", NOW + 10),
            Err(AuthError::Replayed)
        );
        // Two requests of the same instant have different nonces.
        let again = sign(&keys, "POST", PATH, "node-1", b"{}", NOW);
        assert_ne!(again.nonce, signed.nonce);
        assert_eq!(
            check(&verifier, &self::headers(&again), "POST", b"{}", NOW),
            Ok(())
        );
    }

    #[test]
    fn unsigned_stale_misdirected_and_tampered_requests_are_refused() {
        let keys = keys("secret", None);
        let verifier = verifier(keys.clone());
        let good = headers(&sign(&keys, "POST", PATH, "node-1", b"{\"a\":1}", NOW));

        for missing in [
            TIMESTAMP_HEADER,
            NONCE_HEADER,
            NODE_HEADER,
            SIGNATURE_HEADER,
        ] {
            let mut headers = good.clone();
            headers.remove(missing);
            assert_eq!(
                check(&verifier, &headers, "POST", b"{\"a\":1}", NOW),
                Err(AuthError::Unsigned),
                "without {missing}"
            );
        }
        let window = WINDOW.as_millis() as i64;
        for now in [NOW + window + 1, NOW - window - 1] {
            assert_eq!(
                check(&verifier, &good, "POST", b"{\"a\":1}", now),
                Err(AuthError::Stale)
            );
        }
        let elsewhere = headers(&sign(&keys, "POST", PATH, "node-2", b"{\"a\":1}", NOW));
        assert_eq!(
            check(&verifier, &elsewhere, "POST", b"{\"a\":1}", NOW),
            Err(AuthError::WrongNode)
        );
        // Another body, method, timestamp or nonce than the one signed.
        assert_eq!(
            check(&verifier, &good, "POST", b"{\"a\":2}", NOW),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            check(&verifier, &good, "PUT", b"{\"a\":1}", NOW),
            Err(AuthError::BadSignature)
        );
        let mut moved = good.clone();
        moved.insert(TIMESTAMP_HEADER, (NOW + 1).to_string());
        assert_eq!(
            check(&verifier, &moved, "POST", b"{\"a\":1}", NOW),
            Err(AuthError::BadSignature)
        );
        let mut renonced = good.clone();
        renonced.insert(NONCE_HEADER, format!("{:032x}", 7));
        assert_eq!(
            check(&verifier, &renonced, "POST", b"{\"a\":1}", NOW),
            Err(AuthError::BadSignature)
        );
        // Signed with a secret this node does not hold.
        let forged = headers(&sign(
            &self::keys("guess", None),
            "POST",
            PATH,
            "node-1",
            b"{\"a\":1}",
            NOW,
        ));
        assert_eq!(
            check(&verifier, &forged, "POST", b"{\"a\":1}", NOW),
            Err(AuthError::BadSignature)
        );
        // None of the refusals used up the genuine request's nonce.
        assert_eq!(check(&verifier, &good, "POST", b"{\"a\":1}", NOW), Ok(()));
    }

    #[test]
    fn the_previous_secret_verifies_during_a_rotation() {
        let old = keys("old", None);
        let rotating = keys("new", Some("old"));
        // A node that already switched accepts a node that did not, and the other way round.
        let from_old = headers(&sign(&old, "POST", PATH, "node-1", b"", NOW));
        assert_eq!(
            check(&verifier(rotating.clone()), &from_old, "POST", b"", NOW),
            Ok(())
        );
        let from_new = headers(&sign(&rotating, "POST", PATH, "node-1", b"", NOW));
        assert_eq!(
            check(
                &verifier(keys("old", Some("new"))),
                &from_new,
                "POST",
                b"",
                NOW
            ),
            Ok(())
        );
        // Once the old secret is dropped, it is refused.
        assert_eq!(
            check(&verifier(keys("new", None)), &from_old, "POST", b"", NOW),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn the_replay_cache_stays_bounded_and_never_forgets_into_a_replay() {
        let mut cache = ReplayCache::new(3);
        for (nonce, at) in [(1, 100), (2, 101), (3, 102)] {
            assert_eq!(cache.admit(nonce, at, 0), Ok(()));
        }
        // A fourth pushes the oldest out: its nonce is forgotten, but everything at or
        // before its timestamp is now refused.
        assert_eq!(cache.admit(4, 103, 0), Ok(()));
        assert_eq!(cache.seen.len(), 3);
        assert_eq!(cache.admit(1, 100, 0), Err(AuthError::Stale));
        assert_eq!(cache.admit(9, 100, 0), Err(AuthError::Stale));
        assert_eq!(cache.admit(2, 101, 0), Err(AuthError::Replayed));
        // Entries that fell out of the window are dropped.
        assert_eq!(cache.admit(5, 200, 150), Ok(()));
        assert_eq!(cache.order.len(), 1);
    }
}
