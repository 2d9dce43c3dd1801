//! The local development issuer: tokens and the matching JWKS from one ES256 key.
//! `wallet token` and `wallet jwks` call these; `make dev` and `make up` use them.

use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("the signing key is not a PKCS#8 PEM P-256 key")]
    Key(#[source] jsonwebtoken::errors::Error),
    #[error("signing the token")]
    Sign(#[source] jsonwebtoken::errors::Error),
    #[error("{0:?} is not a tenant (1-64 letters, digits, '.', '_', '-')")]
    Tenant(String),
}

/// What a minted token says.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub tenant: String,
    pub scopes: Vec<String>,
    pub ttl: Duration,
    pub issuer: String,
    pub audience: String,
    pub kid: String,
    pub subject: String,
    pub tenant_claim: String,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
    scope: String,
    #[serde(flatten)]
    tenant: std::collections::HashMap<&'a str, &'a str>,
}

/// A token signed with the ES256 key in `key_pem`.
pub fn token(key_pem: &[u8], request: &TokenRequest) -> Result<String, MintError> {
    if super::Tenant::parse(&request.tenant).is_none() {
        return Err(MintError::Tenant(request.tenant.clone()));
    }
    let key = EncodingKey::from_ec_pem(key_pem).map_err(MintError::Key)?;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(request.kid.clone());
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        iss: &request.issuer,
        aud: &request.audience,
        sub: &request.subject,
        iat: now,
        nbf: now,
        exp: now.saturating_add(request.ttl.as_secs()),
        scope: request.scopes.join(" "),
        tenant: [(request.tenant_claim.as_str(), request.tenant.as_str())].into(),
    };
    jsonwebtoken::encode(&header, &claims, &key).map_err(MintError::Sign)
}

/// The public half of the key in `key_pem`, as a JWKS the nodes can trust.
pub fn jwks(key_pem: &[u8], kid: &str) -> Result<JwkSet, MintError> {
    let key = EncodingKey::from_ec_pem(key_pem).map_err(MintError::Key)?;
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).map_err(MintError::Key)?;
    jwk.common.key_id = Some(kid.to_owned());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    Ok(JwkSet { keys: vec![jwk] })
}
