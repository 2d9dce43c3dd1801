//! Authentication, scopes, tenants and rate limits of the public API.

use jsonwebtoken::Algorithm;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;
use wallet_tests::auth::{self, ALL_SCOPES, claims, custom_token, token};
use wallet_tests::{ApiClient, InProcessNode, NodeOptions, TestDatabase};

use crate::single_node;

fn client(node: &InProcessNode, token: Option<&str>) -> ApiClient {
    ApiClient::with_token(&node.api.base_url, token)
}

async fn operations_in_db(db: &TestDatabase) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM operations")
        .fetch_one(&db.pool)
        .await?)
}

#[tokio::test]
async fn requests_without_a_valid_token_get_401_with_a_challenge_and_change_nothing()
-> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let wallet = node.api.create_wallet().await?;
    let es = |claims: &Value| custom_token("es256.pem", Algorithm::ES256, Some(auth::KID), claims);
    let now = jsonwebtoken::get_current_timestamp();
    let with = |name: &str, value: Value| {
        let mut claims = claims(auth::TENANT, &ALL_SCOPES);
        claims[name] = value;
        claims
    };
    let valid = token(auth::TENANT, &ALL_SCOPES);
    // The payload of a valid token with another tenant, under the original signature.
    let tampered = {
        let parts: Vec<&str> = valid.split('.').collect();
        let other = token("other", &ALL_SCOPES);
        let other_payload = other.split('.').nth(1).unwrap_or_default();
        format!("{}.{}.{}", parts[0], other_payload, parts[2])
    };
    let unsigned = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(claims(auth::TENANT, &ALL_SCOPES).to_string())
        )
    };
    let hs256 = {
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some("test-rs256".to_owned());
        jsonwebtoken::encode(
            &header,
            &claims(auth::TENANT, &ALL_SCOPES),
            &jsonwebtoken::EncodingKey::from_secret(&std::fs::read(auth::key_path(
                "rs256.jwk.json",
            ))?),
        )?
    };
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, r#"Bearer realm="wallet""#),
        ("not a JWT", Some("abc".to_owned()), "invalid_token"),
        (
            "expired",
            Some(es(&with("exp", json!(now - 3600)))),
            "invalid_token",
        ),
        (
            "not yet valid",
            Some(es(&with("nbf", json!(now + 3600)))),
            "invalid_token",
        ),
        (
            "wrong audience",
            Some(es(&with("aud", json!("someone-else")))),
            "invalid_token",
        ),
        (
            "wrong issuer",
            Some(es(&with("iss", json!("https://evil.example")))),
            "invalid_token",
        ),
        (
            "no tenant",
            Some(es(&with("tenant", Value::Null))),
            "invalid_token",
        ),
        (
            "unknown kid",
            Some(custom_token(
                "es256.pem",
                Algorithm::ES256,
                Some("nobody"),
                &claims(auth::TENANT, &ALL_SCOPES),
            )),
            "invalid_token",
        ),
        (
            "signed by a key the node does not trust",
            Some(custom_token(
                "es256-other.pem",
                Algorithm::ES256,
                Some(auth::KID),
                &claims(auth::TENANT, &ALL_SCOPES),
            )),
            "invalid_token",
        ),
        ("alg none", Some(unsigned), "invalid_token"),
        // HMAC is never accepted, so a public key cannot be used as a shared secret.
        ("HS256", Some(hs256), "invalid_token"),
        ("tampered payload", Some(tampered), "invalid_token"),
    ];
    for (case, token, challenge) in cases {
        let api = client(&node, token.as_deref());
        let answers = [
            api.post_raw("/api/v1/wallets", "{}", &[]).await?,
            api.operate(wallet, "DEPOSIT", "10.00", None).await?,
            api.get(&format!("/api/v1/wallets/{wallet}")).await?,
            api.get(&format!("/api/v1/wallets/{wallet}/operations"))
                .await?,
        ];
        for answer in answers {
            assert_eq!(
                answer.status,
                StatusCode::UNAUTHORIZED,
                "{case}: {answer:?}"
            );
            assert_eq!(answer.content_type, "application/problem+json", "{case}");
            assert_eq!(
                answer.body["type"], "https://wallet.dev/problems/unauthorized",
                "{case}"
            );
        }
        let raw = api
            .http
            .get(api.url(&format!("/api/v1/wallets/{wallet}")))
            .send()
            .await?;
        let header = raw
            .headers()
            .get("www-authenticate")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            header.contains(challenge),
            "{case}: WWW-Authenticate {header:?}"
        );
    }
    assert_eq!(operations_in_db(&db).await?, 0, "nothing was applied");
    let wallets: i64 = sqlx::query_scalar("SELECT count(*) FROM wallets")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(wallets, 1, "only the wallet of the valid token");
    Ok(())
}

#[tokio::test]
async fn es256_eddsa_and_rs256_tokens_are_accepted_and_the_docs_need_none() -> anyhow::Result<()> {
    let (_db, node) = single_node().await?;
    let claims = claims(auth::TENANT, &ALL_SCOPES);
    for (key, alg, kid) in [
        ("es256.pem", Algorithm::ES256, auth::KID),
        ("ed25519.pem", Algorithm::EdDSA, "test-ed25519"),
        ("rs256.pem", Algorithm::RS256, "test-rs256"),
    ] {
        let api = client(&node, Some(&custom_token(key, alg, Some(kid), &claims)));
        api.create_wallet()
            .await
            .map_err(|error| anyhow::anyhow!("{alg:?}: {error}"))?;
    }
    let anonymous = client(&node, None);
    let doc = anonymous.get("/api-doc/openapi.json").await?;
    assert_eq!(doc.status, StatusCode::OK);
    assert_eq!(
        doc.body["components"]["securitySchemes"]["bearer"]["scheme"], "bearer",
        "{}",
        doc.body["components"]
    );
    let create_security = &doc.body["paths"]["/api/v1/wallets"]["post"]["security"];
    assert_eq!(create_security, &json!([{"bearer": ["wallets:create"]}]));
    let read_security = &doc.body["paths"]["/api/v1/wallets/{wallet_id}"]["get"]["security"];
    assert_eq!(read_security, &json!([{"bearer": ["wallets:read"]}]));
    let answer = anonymous
        .http
        .get(anonymous.url("/swagger-ui/"))
        .send()
        .await?;
    assert_eq!(answer.status(), StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn each_route_needs_its_scope() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let wallet = node.api.create_wallet().await?;
    node.api.operate(wallet, "DEPOSIT", "10.00", None).await?;
    let with = |scopes: &[&str]| client(&node, Some(&token(auth::TENANT, scopes)));
    let forbidden = |answer: &wallet_tests::api::Answer, scope: &str| {
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{answer:?}");
        assert_eq!(answer.body["requiredScope"], scope, "{answer:?}");
    };

    let no_create = with(&["wallets:read", "wallets:deposit", "wallets:withdraw"]);
    forbidden(
        &no_create.post_raw("/api/v1/wallets", "{}", &[]).await?,
        "wallets:create",
    );
    let no_deposit = with(&["wallets:read", "wallets:create", "wallets:withdraw"]);
    forbidden(
        &no_deposit.operate(wallet, "DEPOSIT", "1.00", None).await?,
        "wallets:deposit",
    );
    // Withdrawing is allowed with only its own scope.
    let withdrawer = with(&["wallets:withdraw"]);
    assert_eq!(
        withdrawer
            .operate(wallet, "WITHDRAW", "1.00", None)
            .await?
            .status,
        StatusCode::OK
    );
    let no_withdraw = with(&["wallets:read", "wallets:deposit"]);
    forbidden(
        &no_withdraw
            .operate(wallet, "WITHDRAW", "1.00", None)
            .await?,
        "wallets:withdraw",
    );
    let no_read = with(&["wallets:create", "wallets:deposit", "wallets:withdraw"]);
    for path in [
        format!("/api/v1/wallets/{wallet}"),
        format!("/api/v1/wallets/{wallet}/operations"),
        format!("/api/v1/wallets/{wallet}/operations/{}", Uuid::now_v7()),
    ] {
        forbidden(&no_read.get(&path).await?, "wallets:read");
    }
    let reader = with(&["wallets:read"]);
    assert_eq!(
        reader.balance(wallet).await?,
        rust_decimal::Decimal::new(900, 2)
    );
    assert_eq!(
        operations_in_db(&db).await?,
        2,
        "the deposit and the one allowed withdrawal"
    );
    Ok(())
}

#[tokio::test]
async fn another_tenants_wallets_do_not_exist_for_the_caller() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let acme = client(&node, Some(&token("acme", &ALL_SCOPES)));
    let globex = client(&node, Some(&token("globex", &ALL_SCOPES)));
    let wallet = acme.create_wallet().await?;
    let deposit = acme
        .operate(wallet, "DEPOSIT", "10.00", Some("k-1"))
        .await?;
    let operation = deposit.body["operationId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    for path in [
        format!("/api/v1/wallets/{wallet}"),
        format!("/api/v1/wallets/{wallet}/operations"),
        format!("/api/v1/wallets/{wallet}/operations/{operation}"),
    ] {
        let answer = globex.get(&path).await?;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}: {answer:?}");
    }
    for (kind, key) in [
        ("DEPOSIT", None),
        ("WITHDRAW", None),
        ("DEPOSIT", Some("k-1")),
    ] {
        let answer = globex.operate(wallet, kind, "5.00", key).await?;
        assert_eq!(
            answer.status,
            StatusCode::NOT_FOUND,
            "{kind} {key:?}: {answer:?}"
        );
        assert_eq!(
            answer.body["type"],
            "https://wallet.dev/problems/wallet-not-found"
        );
        assert!(
            answer.body.get("operation").is_none(),
            "no replay of acme's operation"
        );
    }
    assert_eq!(
        acme.balance(wallet).await?,
        rust_decimal::Decimal::new(1000, 2)
    );
    assert_eq!(operations_in_db(&db).await?, 1);

    // Creation keys are per tenant: the same key gives each tenant its own wallet.
    let create = |api: &ApiClient| {
        let api = api.clone();
        async move {
            api.post_raw("/api/v1/wallets", "{}", &[("Idempotency-Key", "order-17")])
                .await
        }
    };
    let first = create(&acme).await?;
    let again = create(&acme).await?;
    let other = create(&globex).await?;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body, again.body, "a replay within the tenant");
    assert_eq!(other.status, StatusCode::CREATED);
    assert_ne!(first.body["walletId"], other.body["walletId"], "{other:?}");
    let tenants: Vec<String> =
        sqlx::query_scalar("SELECT tenant_id FROM wallets ORDER BY tenant_id")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(tenants, ["acme", "acme", "globex"]);
    Ok(())
}

#[tokio::test]
async fn a_rotated_key_set_is_picked_up_for_a_new_kid() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let dir = std::env::temp_dir().join(wallet_tests::unique_name("jwks"));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("jwks.json");
    // At first only the Ed25519 key is trusted.
    let ed: Value = serde_json::from_slice(&std::fs::read(auth::key_path("ed25519.jwk.json"))?)?;
    std::fs::write(&file, json!({"keys": [ed]}).to_string())?;
    let mut options = NodeOptions::new(&db.app_url);
    options
        .extra
        .retain(|(name, _)| name != "WALLET_AUTH_JWKS_FILE");
    options.extra.extend([
        (
            "WALLET_AUTH_JWKS_FILE".to_owned(),
            file.display().to_string(),
        ),
        (
            "WALLET_AUTH_REFRESH_INTERVAL_MS".to_owned(),
            "200".to_owned(),
        ),
    ]);
    let node = InProcessNode::start("node-a", &options).await?;
    let es_token = token(auth::TENANT, &ALL_SCOPES);
    let es = client(&node, Some(&es_token));
    assert_eq!(
        es.post_raw("/api/v1/wallets", "{}", &[]).await?.status,
        StatusCode::UNAUTHORIZED
    );

    // The issuer publishes its new key: the next token with that kid finds it.
    std::fs::write(&file, auth::jwks().to_string())?;
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    assert_eq!(
        es.post_raw("/api/v1/wallets", "{}", &[]).await?.status,
        StatusCode::CREATED
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[tokio::test]
async fn a_burst_beyond_the_tenants_rate_gets_429_with_retry_after_and_is_not_applied()
-> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let mut options = NodeOptions::new(&db.app_url);
    options
        .extra
        .push(("WALLET_RATE_LIMIT_WRITE".to_owned(), "1/5".to_owned()));
    let node = InProcessNode::start("node-a", &options).await?;
    let wallet = node.api.create_wallet().await?;
    let answers = futures::future::join_all(
        (0..20).map(|_| node.api.operate(wallet, "DEPOSIT", "1.00", None)),
    )
    .await;
    let mut ok = 0;
    let mut limited = 0;
    for answer in answers {
        let answer = answer?;
        match answer.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited += 1;
                assert_eq!(
                    answer.body["type"],
                    "https://wallet.dev/problems/rate-limited"
                );
                let retry: u64 = answer.retry_after.as_deref().unwrap_or_default().parse()?;
                assert!((1..=2).contains(&retry), "Retry-After {retry}");
            }
            other => anyhow::bail!("unexpected {other}: {answer:?}"),
        }
    }
    assert!(limited >= 14, "{ok} applied, {limited} limited");
    assert_eq!(
        operations_in_db(&db).await?,
        ok,
        "only the answered 200s are applied"
    );
    // Another tenant has its own bucket; reads have theirs.
    let other = client(&node, Some(&token("other", &ALL_SCOPES)));
    let its_wallet = other.create_wallet().await?;
    assert_eq!(
        other
            .operate(its_wallet, "DEPOSIT", "1.00", None)
            .await?
            .status,
        StatusCode::OK
    );
    assert_eq!(
        node.api.balance(wallet).await?,
        rust_decimal::Decimal::from(ok)
    );
    Ok(())
}

/// An issuer's discovery document and JWKS over HTTP; counts the JWKS fetches.
struct Issuer {
    url: String,
    jwks: std::sync::Arc<std::sync::Mutex<Value>>,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Issuer {
    async fn start(jwks: Value) -> anyhow::Result<Self> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let keys = std::sync::Arc::new(std::sync::Mutex::new(jwks));
        let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (served, counted, base) = (keys.clone(), fetches.clone(), url.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&request);
                let body = if line.starts_with("GET /.well-known/openid-configuration ") {
                    json!({"issuer": base, "jwks_uri": format!("{base}/keys")}).to_string()
                } else if line.starts_with("GET /keys ") {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    served
                        .lock()
                        .map(|keys| keys.to_string())
                        .unwrap_or_default()
                } else {
                    String::new()
                };
                let status = if body.is_empty() {
                    "404 Not Found"
                } else {
                    "200 OK"
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        Ok(Self {
            url,
            jwks: keys,
            fetches,
        })
    }

    fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn keys_come_from_oidc_discovery_and_unknown_kids_refetch_them_at_most_once_per_interval()
-> anyhow::Result<()> {
    let ed: Value = serde_json::from_slice(&std::fs::read(auth::key_path("ed25519.jwk.json"))?)?;
    let issuer = Issuer::start(json!({"keys": [ed]})).await?;
    let db = TestDatabase::create().await?;
    let mut options = NodeOptions::new(&db.app_url);
    options
        .extra
        .retain(|(name, _)| name != "WALLET_AUTH_JWKS_FILE");
    options.extra.extend([
        ("WALLET_AUTH_OIDC_ISSUER_URL".to_owned(), issuer.url.clone()),
        (
            "WALLET_AUTH_REFRESH_INTERVAL_MS".to_owned(),
            "1000".to_owned(),
        ),
    ]);
    let node = InProcessNode::start("node-a", &options).await?;
    assert_eq!(issuer.fetches(), 1, "the keys are fetched at start");

    // The Ed25519 key is known; tokens naming another kid do not hammer the issuer.
    let ed_token = custom_token(
        "ed25519.pem",
        Algorithm::EdDSA,
        Some("test-ed25519"),
        &claims(auth::TENANT, &ALL_SCOPES),
    );
    client(&node, Some(&ed_token)).create_wallet().await?;
    let es = client(&node, Some(&token(auth::TENANT, &ALL_SCOPES)));
    for _ in 0..20 {
        let answer = es.post_raw("/api/v1/wallets", "{}", &[]).await?;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{answer:?}");
    }
    assert!(
        issuer.fetches() <= 2,
        "{} fetches for 20 unknown kids",
        issuer.fetches()
    );

    // The issuer rotates in its ES256 key: after the interval, the next token finds it.
    if let Ok(mut keys) = issuer.jwks.lock() {
        *keys = auth::jwks();
    }
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let created = es.post_raw("/api/v1/wallets", "{}", &[]).await?;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    assert!(issuer.fetches() <= 3, "{} fetches", issuer.fetches());
    Ok(())
}

#[tokio::test]
async fn a_node_whose_key_source_cannot_be_read_does_not_start() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let mut options = NodeOptions::new(&db.app_url);
    options
        .extra
        .retain(|(name, _)| name != "WALLET_AUTH_JWKS_FILE");
    options.extra.push((
        "WALLET_AUTH_JWKS_FILE".to_owned(),
        "/nonexistent/jwks.json".to_owned(),
    ));
    let error = match InProcessNode::start_unready("node-a", &options).await {
        Ok(_) => anyhow::bail!("a node without readable keys started"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("/nonexistent/jwks.json"), "{error}");
    Ok(())
}
