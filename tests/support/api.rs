use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use uuid::Uuid;

/// A thin client of the public API that returns status and JSON, never panicking on errors.
#[derive(Clone)]
pub struct ApiClient {
    pub base_url: String,
    pub http: reqwest::Client,
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: String,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<String>,
    pub body: Value,
}

/// What GET /api/v1/wallets/{id} says about the money of a wallet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalletView {
    pub balance: Decimal,
    pub held: Decimal,
    pub available: Decimal,
    pub overdraft_limit: Decimal,
}

impl ApiClient {
    /// A client of tenant `auth::TENANT` with every scope.
    pub fn new(base_url: &str) -> Self {
        Self::with_token(
            base_url,
            Some(&crate::auth::token(
                crate::auth::TENANT,
                &crate::auth::ALL_SCOPES,
            )),
        )
    }

    /// A client sending `token` as its bearer token, or none.
    pub fn with_token(base_url: &str, token: Option<&str>) -> Self {
        Self::build(base_url, token, None)
    }

    /// `new`'s client, but idle connections are dropped after 2 s, before a node's header
    /// timeout (5 s, which hyper also applies between requests) closes them: under a load
    /// whose concurrency swings, a request on a connection the node is closing at that
    /// very moment fails without an answer, and that says nothing about the node.
    pub fn for_load(base_url: &str) -> Self {
        Self::build(
            base_url,
            Some(&crate::auth::token(
                crate::auth::TENANT,
                &crate::auth::ALL_SCOPES,
            )),
            Some(std::time::Duration::from_secs(2)),
        )
    }

    fn build(base_url: &str, token: Option<&str>, idle: Option<std::time::Duration>) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(value) = token.and_then(|token| {
            reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).ok()
        }) {
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let mut builder = reqwest::Client::builder()
            .pool_max_idle_per_host(512)
            .timeout(std::time::Duration::from_secs(60))
            .default_headers(headers);
        if let Some(idle) = idle {
            builder = builder.pool_idle_timeout(idle);
        }
        Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            http: builder.build().unwrap_or_default(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub async fn answer(response: reqwest::Response) -> anyhow::Result<Answer> {
        let status = response.status();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let bytes = response.bytes().await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)?
        };
        Ok(Answer {
            status,
            content_type,
            retry_after,
            body,
        })
    }

    pub async fn create_wallet(&self) -> anyhow::Result<Uuid> {
        let answer =
            Self::answer(self.http.post(self.url("/api/v1/wallets")).send().await?).await?;
        anyhow::ensure!(
            answer.status == StatusCode::CREATED,
            "create wallet: {answer:?}"
        );
        Ok(answer.body["walletId"]
            .as_str()
            .unwrap_or_default()
            .parse()?)
    }

    pub async fn operate(
        &self,
        wallet_id: Uuid,
        operation_type: &str,
        amount: &str,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<Answer> {
        let mut request = self.http.post(self.url("/api/v1/wallet")).json(
            &json!({"walletId": wallet_id, "operationType": operation_type, "amount": amount}),
        );
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        Self::answer(request.send().await?).await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Answer> {
        let mut request = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Self::answer(request.send().await?).await
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        Self::answer(self.http.get(self.url(path)).send().await?).await
    }

    /// POST /api/v1/transfers from `from` to `to`.
    pub async fn transfer(
        &self,
        from: Uuid,
        to: Uuid,
        amount: &str,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<Answer> {
        let mut request = self
            .http
            .post(self.url("/api/v1/transfers"))
            .json(&json!({"fromWalletId": from, "toWalletId": to, "amount": amount}));
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        Self::answer(request.send().await?).await
    }

    /// POST /api/v1/wallets/{id}/holds, without an expiry unless `expires_at` (RFC 3339).
    pub async fn create_hold(
        &self,
        wallet_id: Uuid,
        amount: &str,
        expires_at: Option<&str>,
    ) -> anyhow::Result<Answer> {
        let mut body = json!({"amount": amount});
        if let Some(at) = expires_at {
            body["expiresAt"] = json!(at);
        }
        let request = self
            .http
            .post(self.url(&format!("/api/v1/wallets/{wallet_id}/holds")))
            .json(&body);
        Self::answer(request.send().await?).await
    }

    /// POST /api/v1/holds/{id}/capture: the whole hold, or `amount` of it.
    pub async fn capture_hold(
        &self,
        hold_id: Uuid,
        amount: Option<&str>,
    ) -> anyhow::Result<Answer> {
        let body = amount.map_or_else(|| json!({}), |amount| json!({"amount": amount}));
        let request = self
            .http
            .post(self.url(&format!("/api/v1/holds/{hold_id}/capture")))
            .json(&body);
        Self::answer(request.send().await?).await
    }

    /// POST /api/v1/holds/{id}/void.
    pub async fn void_hold(&self, hold_id: Uuid) -> anyhow::Result<Answer> {
        let request = self
            .http
            .post(self.url(&format!("/api/v1/holds/{hold_id}/void")))
            .json(&json!({}));
        Self::answer(request.send().await?).await
    }

    /// PATCH /api/v1/wallets/{id} with a new overdraft limit.
    pub async fn set_overdraft_limit(
        &self,
        wallet_id: Uuid,
        limit: &str,
    ) -> anyhow::Result<Answer> {
        let request = self
            .http
            .patch(self.url(&format!("/api/v1/wallets/{wallet_id}")))
            .json(&json!({"overdraftLimit": limit}));
        Self::answer(request.send().await?).await
    }

    /// GET /api/v1/wallets/{id}: balance, held, available and overdraft limit.
    pub async fn wallet_view(&self, wallet_id: Uuid) -> anyhow::Result<WalletView> {
        let answer = self.get(&format!("/api/v1/wallets/{wallet_id}")).await?;
        anyhow::ensure!(answer.status == StatusCode::OK, "wallet: {answer:?}");
        let field = |name: &str| -> anyhow::Result<Decimal> {
            answer.body[name]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("no {name} in {}", answer.body))?
                .parse()
                .map_err(Into::into)
        };
        Ok(WalletView {
            balance: field("balance")?,
            held: field("held")?,
            available: field("available")?,
            overdraft_limit: field("overdraftLimit")?,
        })
    }

    pub async fn balance(&self, wallet_id: Uuid) -> anyhow::Result<Decimal> {
        let answer = self.get(&format!("/api/v1/wallets/{wallet_id}")).await?;
        anyhow::ensure!(answer.status == StatusCode::OK, "balance: {answer:?}");
        Ok(answer.body["balance"]
            .as_str()
            .unwrap_or_default()
            .parse()?)
    }
}
