//! Who is calling: bearer JWTs checked against a JWKS, scopes, and the caller's tenant.
//!
//! Every public route but the OpenAPI document and Swagger UI needs a token. A verified
//! token is cached until it expires, so the signature is checked once per token, not
//! once per request.

mod keys;
pub mod mint;

pub use keys::{KeySource, Keys, KeysError};

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{Algorithm, Validation};
use lru::LruCache;
use serde::Deserialize;

/// What a token may do. Later features add their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Balance, history and operation look-ups.
    WalletsRead,
    WalletsCreate,
    /// Privileged: a deposit creates money.
    WalletsDeposit,
    WalletsWithdraw,
    /// Settings such as limits.
    WalletsAdmin,
    /// Moves money between the tenant's wallets.
    TransfersWrite,
    /// Creates, captures and voids holds.
    HoldsWrite,
    /// Reads the tenant's events: pages, the stream.
    EventsRead,
    /// Registers, lists and removes webhooks, and retries their deliveries.
    WebhooksAdmin,
}

impl Scope {
    pub const ALL: [Scope; 9] = [
        Self::WalletsRead,
        Self::WalletsCreate,
        Self::WalletsDeposit,
        Self::WalletsWithdraw,
        Self::WalletsAdmin,
        Self::TransfersWrite,
        Self::HoldsWrite,
        Self::EventsRead,
        Self::WebhooksAdmin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::WalletsRead => "wallets:read",
            Self::WalletsCreate => "wallets:create",
            Self::WalletsDeposit => "wallets:deposit",
            Self::WalletsWithdraw => "wallets:withdraw",
            Self::WalletsAdmin => "wallets:admin",
            Self::TransfersWrite => "transfers:write",
            Self::HoldsWrite => "holds:write",
            Self::EventsRead => "events:read",
            Self::WebhooksAdmin => "webhooks:admin",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|scope| scope.as_str() == value)
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// A set of scopes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scopes(u16);

impl Scopes {
    pub fn all() -> Self {
        Scope::ALL.into_iter().collect()
    }

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        Self(iter.into_iter().fold(0, |bits, scope| bits | scope.bit()))
    }
}

/// The tenant a wallet belongs to, and a caller acts for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Tenant(Arc<str>);

impl Tenant {
    pub const MAX_LEN: usize = 64;

    /// 1 to 64 characters of letters, digits, `.`, `_` and `-`.
    pub fn parse(value: &str) -> Option<Self> {
        let valid = !value.is_empty()
            && value.len() <= Self::MAX_LEN
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        valid.then(|| Self(Arc::from(value)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for Tenant {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Tenant {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).ok_or_else(|| serde::de::Error::custom("not a tenant name"))
    }
}

impl std::fmt::Display for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A verified caller.
#[derive(Clone, Debug)]
pub struct Principal {
    pub tenant: Tenant,
    pub scopes: Scopes,
    pub subject: Option<String>,
    /// `exp` of the token, Unix seconds.
    expires_at: u64,
}

impl Principal {
    /// The caller when authentication is off: the configured tenant, every scope.
    pub fn unauthenticated(tenant: Tenant) -> Self {
        Self {
            tenant,
            scopes: Scopes::all(),
            subject: None,
            expires_at: u64::MAX,
        }
    }
}

/// Why a request is not authenticated or not allowed. The HTTP layer maps these to
/// 401 (with `WWW-Authenticate`) and 403.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("the token has expired")]
    Expired,
    #[error("the token lacks the scope {}", .0.as_str())]
    MissingScope(Scope),
    /// The keys could not be fetched: not the caller's fault.
    #[error("the signing keys are unavailable")]
    KeysUnavailable(#[source] KeysError),
}

impl From<KeysError> for AuthError {
    fn from(error: KeysError) -> Self {
        Self::KeysUnavailable(error)
    }
}

/// How tokens are checked.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub source: KeySource,
    /// Accepted `iss` values.
    pub issuers: Vec<String>,
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// The claim that names the caller's tenant.
    pub tenant_claim: String,
    /// Verified tokens kept, so a token's signature is checked once.
    pub cache_tokens: usize,
    /// Unknown `kid`s refetch the keys at most this often.
    pub refresh_interval: Duration,
    /// Bound on fetching the keys (URL sources).
    pub fetch_timeout: Duration,
}

/// Algorithms accepted; `none` and the HMAC family never are.
const ALGORITHMS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

const CACHE_STRIPES: usize = 16;

/// Checks bearer tokens. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    keys: Keys,
    issuers: Vec<String>,
    audience: String,
    leeway: Duration,
    tenant_claim: String,
    /// Striped so that concurrent requests rarely wait on one lock.
    verified: Vec<Mutex<LruCache<Box<str>, Principal>>>,
}

/// The claims read from a token; `iss`, `aud`, `exp` and `nbf` are checked by the
/// validation before these are looked at.
#[derive(Deserialize)]
struct Claims {
    exp: u64,
    sub: Option<String>,
    /// OAuth 2.0 style: space-separated.
    #[serde(default)]
    scope: Option<String>,
    /// Some issuers (Azure AD, Okta) send `scp`, a string or a list.
    #[serde(default)]
    scp: Option<serde_json::Value>,
    #[serde(flatten)]
    rest: HashMap<String, serde_json::Value>,
}

impl Authenticator {
    pub async fn new(config: &AuthConfig) -> Result<Self, KeysError> {
        let keys = Keys::load(
            config.source.clone(),
            config.refresh_interval,
            config.fetch_timeout,
        )
        .await?;
        let per_stripe = NonZeroUsize::new(config.cache_tokens.div_ceil(CACHE_STRIPES).max(1))
            .unwrap_or(NonZeroUsize::MIN);
        Ok(Self {
            inner: Arc::new(Inner {
                keys,
                issuers: config.issuers.clone(),
                audience: config.audience.clone(),
                leeway: config.leeway,
                tenant_claim: config.tenant_claim.clone(),
                verified: (0..CACHE_STRIPES)
                    .map(|_| Mutex::new(LruCache::new(per_stripe)))
                    .collect(),
            }),
        })
    }

    /// The caller a bearer token stands for.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let now = jsonwebtoken::get_current_timestamp();
        let stripe = &self.inner.verified
            [xxhash_rust::xxh3::xxh3_64(token.as_bytes()) as usize % CACHE_STRIPES];
        if let Some(principal) = lock(stripe).get(token).cloned() {
            if now
                <= principal
                    .expires_at
                    .saturating_add(self.inner.leeway.as_secs())
            {
                return Ok(principal);
            }
            lock(stripe).pop(token);
            return Err(AuthError::Expired);
        }
        let principal = self.verify(token).await?;
        lock(stripe).put(Box::from(token), principal.clone());
        Ok(principal)
    }

    async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|error| AuthError::Invalid(format!("unreadable header: {error}")))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let key = self
            .inner
            .keys
            .find(header.kid.as_deref(), header.alg)
            .await?
            .ok_or_else(|| {
                AuthError::Invalid(match &header.kid {
                    Some(kid) => format!("no key {kid:?} for {:?} in the key set", header.alg),
                    None => "the token names no key (kid)".to_owned(),
                })
            })?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&self.inner.issuers);
        validation.set_audience(&[&self.inner.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = self.inner.leeway.as_secs();
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|error| match error.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(error.to_string()),
            })?
            .claims;
        let tenant = claims
            .rest
            .get(&self.inner.tenant_claim)
            .and_then(|value| value.as_str())
            .and_then(Tenant::parse)
            .ok_or_else(|| {
                AuthError::Invalid(format!(
                    "the claim {:?} must name the tenant (1-{} letters, digits, '.', '_', '-')",
                    self.inner.tenant_claim,
                    Tenant::MAX_LEN
                ))
            })?;
        Ok(Principal {
            tenant,
            scopes: scopes_of(claims.scope.as_deref(), claims.scp.as_ref()),
            subject: claims.sub,
            expires_at: claims.exp,
        })
    }
}

/// Unknown scopes are ignored: a token may carry scopes of other services.
fn scopes_of(scope: Option<&str>, scp: Option<&serde_json::Value>) -> Scopes {
    let from_scope = scope.into_iter().flat_map(str::split_whitespace);
    let from_scp: Vec<&str> = match scp {
        Some(serde_json::Value::String(text)) => text.split_whitespace().collect(),
        Some(serde_json::Value::Array(items)) => {
            items.iter().filter_map(serde_json::Value::as_str).collect()
        }
        _ => Vec::new(),
    };
    from_scope
        .chain(from_scp)
        .filter_map(Scope::parse)
        .collect()
}

/// A poisoned stripe only held cached verifications: keep using it.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_come_from_scope_and_scp_and_unknown_ones_are_ignored() {
        let scopes = scopes_of(
            Some("wallets:read other:thing"),
            Some(&serde_json::json!(["wallets:deposit"])),
        );
        assert!(scopes.contains(Scope::WalletsRead));
        assert!(scopes.contains(Scope::WalletsDeposit));
        assert!(!scopes.contains(Scope::WalletsWithdraw));
        assert!(
            scopes_of(None, Some(&serde_json::json!("wallets:admin")))
                .contains(Scope::WalletsAdmin)
        );
        assert_eq!(scopes_of(None, None), Scopes::default());
    }

    #[test]
    fn tenants_are_short_and_plain() {
        assert!(Tenant::parse("acme-eu.1_b").is_some());
        assert!(Tenant::parse("").is_none());
        assert!(Tenant::parse("a b").is_none());
        assert!(Tenant::parse("ä").is_none());
        assert!(Tenant::parse(&"x".repeat(65)).is_none());
    }
}
