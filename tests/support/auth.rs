//! The tests' own token issuer: fixed keys in `tests/support/keys`, a JWKS file the test
//! nodes trust, and tokens for any tenant and scopes.

use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use wallet::auth::mint::{self, TokenRequest};

pub const ISSUER: &str = "wallet-test";
pub const AUDIENCE: &str = "wallet";
pub const KID: &str = "test-es256";
/// The tenant of `ApiClient::new`'s token.
pub const TENANT: &str = "test";
pub const ALL_SCOPES: [&str; 9] = [
    "wallets:read",
    "wallets:create",
    "wallets:deposit",
    "wallets:withdraw",
    "wallets:admin",
    "transfers:write",
    "holds:write",
    "events:read",
    "webhooks:admin",
];

pub fn key_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("support/keys")
        .join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(key_path(name)).unwrap_or_else(|error| panic!("test key {name}: {error}"))
}

/// The JWKS of the test issuer's ES256 key plus the Ed25519 and RSA test keys.
pub fn jwks() -> Value {
    let mut set = serde_json::to_value(mint::jwks(&read("es256.pem"), KID).expect("jwks"))
        .expect("jwks json");
    for extra in ["ed25519.jwk.json", "rs256.jwk.json"] {
        let jwk: Value = serde_json::from_slice(&read(extra)).expect("jwk");
        if let Some(keys) = set["keys"].as_array_mut() {
            keys.push(jwk);
        }
    }
    set
}

/// A JWKS file with `jwks()`, written once per test binary (same content every time).
pub fn jwks_file() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-keys");
    let path = dir.join("jwks.json");
    if !path.exists() {
        std::fs::create_dir_all(&dir).expect("test key folder");
        // Written aside and renamed: parallel tests never see half a file.
        let tmp = dir.join(format!("jwks.{}.tmp", uuid::Uuid::new_v4().simple()));
        std::fs::write(&tmp, jwks().to_string()).expect("write jwks");
        std::fs::rename(&tmp, &path).expect("rename jwks");
    }
    path
}

/// The node settings that make it trust the test issuer.
pub fn node_env() -> Vec<(String, String)> {
    vec![
        (
            "WALLET_AUTH_JWKS_FILE".to_owned(),
            jwks_file().display().to_string(),
        ),
        ("WALLET_AUTH_ISSUER".to_owned(), ISSUER.to_owned()),
        ("WALLET_AUTH_AUDIENCE".to_owned(), AUDIENCE.to_owned()),
    ]
}

/// A valid ES256 token of the test issuer.
pub fn token(tenant: &str, scopes: &[&str]) -> String {
    mint::token(
        &read("es256.pem"),
        &TokenRequest {
            tenant: tenant.to_owned(),
            scopes: scopes.iter().map(|scope| (*scope).to_owned()).collect(),
            ttl: Duration::from_secs(24 * 3600),
            issuer: ISSUER.to_owned(),
            audience: AUDIENCE.to_owned(),
            kid: KID.to_owned(),
            subject: "test".to_owned(),
            tenant_claim: "tenant".to_owned(),
        },
    )
    .expect("mint a test token")
}

/// A token with every claim under the test's control, signed with `key` (a file of
/// `tests/support/keys`) as `alg` with `kid`.
pub fn custom_token(key: &str, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let pem = read(key);
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        other => panic!("no test key for {other:?}"),
    }
    .expect("test key");
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).expect("sign")
}

/// Claims valid now for `tenant` with `scopes`, to be altered by a test.
pub fn claims(tenant: &str, scopes: &[&str]) -> Value {
    let now = jsonwebtoken::get_current_timestamp();
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "test",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "scope": scopes.join(" "),
        "tenant": tenant,
    })
}
