//! Reading request input without losing anything: exact amounts from the raw JSON
//! text (never through a float), and a precise error for each kind of bad input.

use salvo::prelude::Request;
use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::error::ApiError;
use chrono::{DateTime, SubsecRound, Utc};
use rust_decimal::Decimal;

use crate::domain::{Amount, AmountError, OperationType};

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Reads the body up to `max_bytes`; an empty body reads as `None`.
pub async fn body(req: &mut Request, max_bytes: usize) -> Result<Option<Vec<u8>>, ApiError> {
    match req.payload_with_max_size(max_bytes).await {
        Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Ok(None),
        Ok(bytes) => Ok(Some(bytes.to_vec())),
        Err(salvo::http::ParseError::PayloadTooLarge) => Err(ApiError::PayloadTooLarge(max_bytes)),
        Err(error) => Err(ApiError::MalformedRequest(format!(
            "the request body could not be read: {error}"
        ))),
    }
}

/// Parses a JSON object into `T`: broken JSON is a 400, JSON of the wrong shape a 422.
pub fn json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    // Derived structs also accept arrays (fields by position); the API takes objects only.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                Ok(_) => ApiError::Validation("the request body must be a JSON object".to_owned()),
                Err(error) => ApiError::MalformedJson(error.to_string()),
            },
        );
    }
    serde_json::from_slice(bytes).map_err(|error| match error.classify() {
        serde_json::error::Category::Syntax
        | serde_json::error::Category::Eof
        | serde_json::error::Category::Io => ApiError::MalformedJson(error.to_string()),
        serde_json::error::Category::Data => ApiError::Validation(error.to_string()),
    })
}

pub fn uuid(text: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(text)
        .map_err(|_| ApiError::InvalidUuid(format!("{what} must be a UUID, got {text:?}")))
}

pub fn path_uuid(req: &Request, name: &str, what: &str) -> Result<Uuid, ApiError> {
    let text: String = req.param(name).unwrap_or_default();
    uuid(&text, what)
}

pub fn idempotency_key(req: &Request) -> Result<Option<String>, ApiError> {
    let Some(value) = req.headers().get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|key| {
            !key.is_empty()
                && key.len() <= MAX_IDEMPOTENCY_KEY_LEN
                && key.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| {
            ApiError::MalformedRequest(
                "Idempotency-Key must be 1 to 255 visible ASCII characters".to_owned(),
            )
        })?;
    Ok(Some(key.to_owned()))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawOperationRequest<'a> {
    #[serde(borrow)]
    wallet_id: &'a RawValue,
    #[serde(borrow)]
    operation_type: &'a RawValue,
    #[serde(borrow)]
    amount: &'a RawValue,
}

pub struct OperationInput {
    pub wallet_id: Uuid,
    pub operation_type: OperationType,
    pub amount: Amount,
}

pub fn operation(bytes: &[u8]) -> Result<OperationInput, ApiError> {
    let raw: RawOperationRequest<'_> = json(bytes)?;
    let wallet_id = raw_uuid(raw.wallet_id, "walletId")?;
    // The other types are written by their own endpoints.
    let operation_type = serde_json::from_str::<String>(raw.operation_type.get())
        .ok()
        .and_then(|text| OperationType::parse(&text))
        .filter(|kind| matches!(kind, OperationType::Deposit | OperationType::Withdraw))
        .ok_or_else(|| {
            ApiError::Validation(format!(
                "operationType must be \"DEPOSIT\" or \"WITHDRAW\", got {}",
                raw.operation_type.get()
            ))
        })?;
    let amount = raw_amount(raw.amount, "amount")?;
    Ok(OperationInput {
        wallet_id,
        operation_type,
        amount,
    })
}

/// A UUID given as a JSON string.
fn raw_uuid(raw: &RawValue, what: &str) -> Result<Uuid, ApiError> {
    match serde_json::from_str::<String>(raw.get()) {
        Ok(text) => uuid(&text, what),
        Err(_) => Err(ApiError::InvalidUuid(format!(
            "{what} must be a UUID string, got {}",
            raw.get()
        ))),
    }
}

/// A decimal given as a JSON string or number, read from its text.
fn raw_decimal_text(raw: &RawValue, what: &str) -> Result<String, ApiError> {
    let text = raw.get();
    if text.starts_with('"') {
        serde_json::from_str(text)
            .map_err(|_| ApiError::Validation(format!("{what} must be a decimal number")))
    } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        Ok(text.to_owned())
    } else {
        Err(ApiError::Validation(format!(
            "{what} must be a decimal number, given as a string like \"10.50\" or a JSON number"
        )))
    }
}

fn raw_amount(raw: &RawValue, what: &str) -> Result<Amount, ApiError> {
    let text = raw_decimal_text(raw, what)?;
    Amount::parse(&text)
        .map_err(|error| ApiError::Validation(error.to_string().replacen("amount", what, 1)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTransferRequest<'a> {
    #[serde(borrow)]
    from_wallet_id: &'a RawValue,
    #[serde(borrow)]
    to_wallet_id: &'a RawValue,
    #[serde(borrow)]
    amount: &'a RawValue,
}

pub struct TransferInput {
    pub from_wallet_id: Uuid,
    pub to_wallet_id: Uuid,
    pub amount: Amount,
}

pub fn transfer(bytes: &[u8]) -> Result<TransferInput, ApiError> {
    let raw: RawTransferRequest<'_> = json(bytes)?;
    let input = TransferInput {
        from_wallet_id: raw_uuid(raw.from_wallet_id, "fromWalletId")?,
        to_wallet_id: raw_uuid(raw.to_wallet_id, "toWalletId")?,
        amount: raw_amount(raw.amount, "amount")?,
    };
    if input.from_wallet_id == input.to_wallet_id {
        return Err(ApiError::Validation(
            "fromWalletId and toWalletId must be different wallets".to_owned(),
        ));
    }
    Ok(input)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawHoldRequest<'a> {
    #[serde(borrow)]
    amount: &'a RawValue,
    #[serde(default, borrow)]
    expires_at: Option<&'a RawValue>,
}

pub struct HoldInput {
    pub amount: Amount,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A hold's amount and optional expiry, which must lie in the future.
pub fn hold(bytes: &[u8]) -> Result<HoldInput, ApiError> {
    let raw: RawHoldRequest<'_> = json(bytes)?;
    let amount = raw_amount(raw.amount, "amount")?;
    let expires_at = match raw.expires_at.map(RawValue::get) {
        None | Some("null") => None,
        Some(text) => {
            let at = serde_json::from_str::<String>(text)
                .ok()
                .and_then(|text| DateTime::parse_from_rfc3339(&text).ok())
                .ok_or_else(|| {
                    ApiError::Validation(format!(
                        "expiresAt must be an RFC 3339 time such as \"2030-01-01T00:00:00Z\", got {text}"
                    ))
                })?
                .with_timezone(&Utc)
                .trunc_subsecs(6);
            if at <= Utc::now() {
                return Err(ApiError::Validation(format!(
                    "expiresAt must lie in the future, got {}",
                    at.to_rfc3339()
                )));
            }
            Some(at)
        }
    };
    Ok(HoldInput { amount, expires_at })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCaptureRequest<'a> {
    #[serde(default, borrow)]
    amount: Option<&'a RawValue>,
}

/// The amount of a capture; none (or no body) captures the whole hold.
pub fn capture(bytes: Option<&[u8]>) -> Result<Option<Amount>, ApiError> {
    let Some(bytes) = bytes else {
        return Ok(None);
    };
    let raw: RawCaptureRequest<'_> = json(bytes)?;
    match raw.amount {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => raw_amount(raw, "amount").map(Some),
    }
}

/// A void takes no parameters: no body, or an empty object.
pub fn void(bytes: Option<&[u8]>) -> Result<(), ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Empty {}
    if let Some(bytes) = bytes {
        let _: Empty = json(bytes)?;
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawWalletPatch<'a> {
    #[serde(borrow)]
    overdraft_limit: &'a RawValue,
}

/// A new overdraft limit: zero or more, with at most two decimals.
pub fn overdraft_limit(bytes: &[u8]) -> Result<Decimal, ApiError> {
    let raw: RawWalletPatch<'_> = json(bytes)?;
    let text = raw_decimal_text(raw.overdraft_limit, "overdraftLimit")?;
    match Amount::parse(&text) {
        Ok(amount) => Ok(amount.value()),
        Err(AmountError::NotPositive) => {
            let value: Decimal = text.trim().parse().map_err(|_| {
                ApiError::Validation("overdraftLimit must be a decimal number".to_owned())
            })?;
            if value.is_zero() {
                Ok(Decimal::new(0, 2))
            } else {
                Err(ApiError::Validation(
                    "overdraftLimit must not be negative".to_owned(),
                ))
            }
        }
        Err(error) => Err(ApiError::Validation(error.to_string().replacen(
            "amount",
            "overdraftLimit",
            1,
        ))),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawWebhookRequest<'a> {
    #[serde(borrow)]
    url: &'a RawValue,
    #[serde(borrow)]
    event_types: &'a RawValue,
}

pub struct WebhookInput {
    pub url: url::Url,
    /// In the order given, without repeats; at least one.
    pub event_types: Vec<crate::events::EventType>,
}

/// A webhook's URL (see `webhooks::target::parse`) and event types.
pub fn webhook(bytes: &[u8]) -> Result<WebhookInput, ApiError> {
    use crate::events::EventType;
    let raw: RawWebhookRequest<'_> = json(bytes)?;
    let url = serde_json::from_str::<String>(raw.url.get()).map_err(|_| {
        ApiError::Validation(format!("url must be a string, got {}", raw.url.get()))
    })?;
    let url = crate::webhooks::target::parse(&url)?;
    let known = || EventType::ALL.map(EventType::as_str).join(", ");
    let names = serde_json::from_str::<Vec<String>>(raw.event_types.get()).map_err(|_| {
        ApiError::Validation(format!(
            "eventTypes must be a list of event types ({}), got {}",
            known(),
            raw.event_types.get()
        ))
    })?;
    let mut event_types = Vec::with_capacity(names.len());
    for name in &names {
        let kind = EventType::parse(name).ok_or_else(|| {
            ApiError::Validation(format!("unknown event type {name:?}; known: {}", known()))
        })?;
        if !event_types.contains(&kind) {
            event_types.push(kind);
        }
    }
    if event_types.is_empty() {
        return Err(ApiError::Validation(format!(
            "eventTypes must name at least one event type ({})",
            known()
        )));
    }
    Ok(WebhookInput { url, event_types })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(body: &str) -> u16 {
        match operation(body.as_bytes()) {
            Ok(_) => 200,
            Err(error) => error.status().as_u16(),
        }
    }

    const WALLET: &str = "0b7c8f5e-3f0a-4c55-9d2e-6a1d2f3b4c5d";

    #[test]
    fn each_kind_of_bad_input_gets_its_status() {
        let ok = format!(r#"{{"walletId":"{WALLET}","operationType":"DEPOSIT","amount":"10.50"}}"#);
        assert_eq!(status(&ok), 200);
        assert_eq!(
            status(&format!(
                r#"{{"walletId":"{WALLET}","operationType":"DEPOSIT","amount":10.5}}"#
            )),
            200
        );
        assert_eq!(status(r#"{"walletId":"#), 400);
        assert_eq!(
            status(r#"{"walletId":"nope","operationType":"DEPOSIT","amount":"1"}"#),
            400
        );
        assert_eq!(
            status(r#"{"walletId":17,"operationType":"DEPOSIT","amount":"1"}"#),
            400
        );
        assert_eq!(
            status(&format!(
                r#"{{"walletId":"{WALLET}","operationType":"STEAL","amount":"1"}}"#
            )),
            422
        );
        assert_eq!(
            status(&format!(
                r#"{{"walletId":"{WALLET}","operationType":"DEPOSIT","amount":"1","x":1}}"#
            )),
            422
        );
        assert_eq!(
            status(&format!(
                r#"{{"walletId":"{WALLET}","operationType":"DEPOSIT"}}"#
            )),
            422
        );
        assert_eq!(
            status(&format!(
                r#"{{"walletId":"{WALLET}","operationType":"DEPOSIT","amount":true}}"#
            )),
            422
        );
        assert_eq!(
            status(&format!(
                r#"{{"walletId":"{WALLET}","operationType":"DEPOSIT","amount":0.001}}"#
            )),
            422
        );
        assert_eq!(
            status(&format!(
                r#"{{"walletId":"{WALLET}","operationType":"DEPOSIT","amount":1e40}}"#
            )),
            422
        );
        assert_eq!(status("[]"), 422);
        assert_eq!(status(&format!(r#"["{WALLET}","DEPOSIT","1"]"#)), 422);
        assert_eq!(status("[1,"), 400);
    }

    #[test]
    fn webhook_bodies_are_read_exactly() {
        let status = |body: &str| match webhook(body.as_bytes()) {
            Ok(_) => 200,
            Err(error) => error.status().as_u16(),
        };
        let ok = r#"{"url":"https://hooks.example.com/w","eventTypes":["operation.applied","operation.applied"]}"#;
        assert_eq!(status(ok), 200);
        let input = webhook(ok.as_bytes())
            .map_err(|e| e.to_string())
            .expect("valid");
        assert_eq!(input.event_types.len(), 1, "repeats are dropped");
        assert_eq!(status(r#"{"url":"https://x.example","#), 400);
        for bad in [
            r#"{"url":"https://x.example","eventTypes":["operation.applied"],"secret":"mine"}"#,
            r#"{"url":"https://x.example","eventTypes":[]}"#,
            r#"{"url":"https://x.example","eventTypes":["operation.deleted"]}"#,
            r#"{"url":"https://x.example","eventTypes":"operation.applied"}"#,
            r#"{"url":"https://x.example"}"#,
            r#"{"url":17,"eventTypes":["operation.applied"]}"#,
            r#"{"url":"ftp://x.example","eventTypes":["operation.applied"]}"#,
            r#"{"url":"not a url","eventTypes":["operation.applied"]}"#,
            r#"["https://x.example",["operation.applied"]]"#,
        ] {
            assert_eq!(status(bad), 422, "{bad}");
        }
    }

    #[test]
    fn number_amounts_are_read_from_their_text_not_a_float() {
        let body = format!(
            r#"{{"walletId":"{WALLET}","operationType":"DEPOSIT","amount":999999999999999999.99}}"#
        );
        let input = operation(body.as_bytes())
            .map_err(|e| e.to_string())
            .expect("valid");
        assert_eq!(input.amount.to_string(), "999999999999999999.99");
    }
}
