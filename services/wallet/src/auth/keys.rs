//! The issuer's public keys (a JWKS) from a file, a URL or OIDC discovery, refetched
//! when a token names a key the set does not have, at most once per refresh interval.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::time::Instant;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// A JWKS document on disk (re-read on an unknown `kid`, so a rotated file is seen).
    File(PathBuf),
    /// A JWKS URL (`jwks_uri`).
    Url(String),
    /// An OIDC issuer: the JWKS URL comes from `/.well-known/openid-configuration`.
    Discovery(String),
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("reading the key set {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fetching {url}")]
    Fetch {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the key set from {origin} is not a JWKS")]
    Parse {
        origin: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the key set from {0} has no key for RS256, ES256 or EdDSA")]
    NoUsableKeys(String),
}

/// Keys by `kid` (keys without one are under `None`).
type KeyMap = HashMap<Option<String>, Vec<(Algorithm, Arc<DecodingKey>)>>;

pub struct Keys {
    source: KeySource,
    client: reqwest::Client,
    current: RwLock<Arc<KeyMap>>,
    /// When the set was last fetched; one refresh at a time.
    refreshed: tokio::sync::Mutex<Instant>,
    refresh_interval: Duration,
}

impl Keys {
    pub async fn load(
        source: KeySource,
        refresh_interval: Duration,
        fetch_timeout: Duration,
    ) -> Result<Self, KeysError> {
        let client = reqwest::Client::builder()
            .timeout(fetch_timeout)
            .build()
            .map_err(|source| KeysError::Fetch {
                url: "(client)".to_owned(),
                source,
            })?;
        let keys = fetch(&source, &client).await?;
        Ok(Self {
            source,
            client,
            current: RwLock::new(Arc::new(keys)),
            refreshed: tokio::sync::Mutex::new(Instant::now()),
            refresh_interval,
        })
    }

    /// The key for a token's `kid` and `alg`, refetching the set once if it is unknown.
    pub async fn find(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Option<Arc<DecodingKey>>, KeysError> {
        if let Some(key) = lookup(&self.snapshot(), kid, alg) {
            return Ok(Some(key));
        }
        let mut refreshed = self.refreshed.lock().await;
        // Another request may have refreshed while this one waited.
        if let Some(key) = lookup(&self.snapshot(), kid, alg) {
            return Ok(Some(key));
        }
        if refreshed.elapsed() < self.refresh_interval {
            return Ok(None);
        }
        *refreshed = Instant::now();
        match fetch(&self.source, &self.client).await {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "signing keys refreshed");
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
            }
            // Keep the keys there are: tokens signed by them still verify.
            Err(error) => tracing::warn!(error = %error, "refreshing the signing keys failed"),
        }
        Ok(lookup(&self.snapshot(), kid, alg))
    }

    fn snapshot(&self) -> Arc<KeyMap> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

fn lookup(keys: &KeyMap, kid: Option<&str>, alg: Algorithm) -> Option<Arc<DecodingKey>> {
    let matching = |candidates: &Vec<(Algorithm, Arc<DecodingKey>)>| {
        candidates
            .iter()
            .find(|(key_alg, _)| *key_alg == alg)
            .map(|(_, key)| key.clone())
    };
    match kid {
        Some(kid) => keys.get(&Some(kid.to_owned())).and_then(matching),
        // Without a kid, only an unambiguous set will do.
        None => {
            let mut all = keys
                .values()
                .flatten()
                .filter(|(key_alg, _)| *key_alg == alg);
            match (all.next(), all.next()) {
                (Some((_, key)), None) => Some(key.clone()),
                _ => None,
            }
        }
    }
}

async fn fetch(source: &KeySource, client: &reqwest::Client) -> Result<KeyMap, KeysError> {
    let (origin, text) = match source {
        KeySource::File(path) => {
            let origin = path.display().to_string();
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|source| KeysError::Read {
                    path: origin.clone(),
                    source,
                })?;
            (origin, text)
        }
        KeySource::Url(url) => (url.clone(), get(client, url).await?),
        KeySource::Discovery(issuer) => {
            let url = format!(
                "{}/.well-known/openid-configuration",
                issuer.trim_end_matches('/')
            );
            let document = get(client, &url).await?;
            #[derive(serde::Deserialize)]
            struct Discovery {
                jwks_uri: String,
            }
            let discovery: Discovery =
                serde_json::from_str(&document).map_err(|source| KeysError::Parse {
                    origin: url.clone(),
                    source,
                })?;
            (
                discovery.jwks_uri.clone(),
                get(client, &discovery.jwks_uri).await?,
            )
        }
    };
    let set: JwkSet = serde_json::from_str(&text).map_err(|source| KeysError::Parse {
        origin: origin.clone(),
        source,
    })?;
    let mut keys = KeyMap::new();
    for jwk in &set.keys {
        let Some(alg) = algorithm_of(jwk) else {
            continue;
        };
        match DecodingKey::from_jwk(jwk) {
            Ok(key) => keys
                .entry(jwk.common.key_id.clone())
                .or_default()
                .push((alg, Arc::new(key))),
            Err(error) => {
                tracing::warn!(kid = ?jwk.common.key_id, error = %error, "skipping an unreadable key")
            }
        }
    }
    if keys.is_empty() {
        return Err(KeysError::NoUsableKeys(origin));
    }
    Ok(keys)
}

async fn get(client: &reqwest::Client, url: &str) -> Result<String, KeysError> {
    let fetch_error = |source| KeysError::Fetch {
        url: url.to_owned(),
        source,
    };
    client
        .get(url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(fetch_error)?
        .text()
        .await
        .map_err(fetch_error)
}

/// The one algorithm a key is used with: its `alg` if it names one, else what its type
/// implies. Keys for anything but RS256, ES256 and EdDSA are left out.
fn algorithm_of(jwk: &Jwk) -> Option<Algorithm> {
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    match jwk.common.key_algorithm {
        None => Some(implied),
        Some(KeyAlgorithm::RS256) if implied == Algorithm::RS256 => Some(implied),
        Some(KeyAlgorithm::ES256) if implied == Algorithm::ES256 => Some(implied),
        Some(KeyAlgorithm::EdDSA) if implied == Algorithm::EdDSA => Some(implied),
        Some(_) => None,
    }
}
