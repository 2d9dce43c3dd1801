//! RFC 9457 problem details: the body of every error response.

use salvo::http::header::{CONTENT_TYPE, HeaderValue};
use salvo::http::{Response, StatusCode};
use salvo::oapi::ToSchema;
use serde::Serialize;
use serde_json::{Map, Value};

pub const PROBLEM_JSON: &str = "application/problem+json";
const TYPE_BASE: &str = "https://wallet.dev/problems/";

/// A problem document. `type` is stable; clients branch on it, not on `title` or `detail`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[salvo(schema(name = "Problem"))]
pub struct Problem {
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Extra members, such as `operationId` of a rejected operation.
    #[serde(flatten)]
    #[salvo(schema(value_type = Object))]
    pub extensions: Map<String, Value>,
}

impl Problem {
    pub fn new(status: StatusCode, slug: &str, title: &str, detail: impl Into<String>) -> Self {
        Self {
            problem_type: format!("{TYPE_BASE}{slug}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            extensions: Map::new(),
        }
    }

    pub fn with(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.extensions.insert(name.to_owned(), value.into());
        self
    }

    /// Adds `name` unless the problem has it already.
    pub fn with_default(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.extensions
            .entry(name.to_owned())
            .or_insert_with(|| value.into());
        self
    }

    pub fn write_to(&self, res: &mut Response) {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        write_json(res, status, PROBLEM_JSON, self);
    }
}

/// Writes `body` as JSON with an exact status and content type.
pub fn write_json(
    res: &mut Response,
    status: StatusCode,
    content_type: &'static str,
    body: &impl Serialize,
) {
    res.status_code(status);
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let _ = res.write_body(bytes);
        }
        Err(error) => {
            tracing::error!(error = %error, "response body could not be serialised");
            res.status_code(StatusCode::INTERNAL_SERVER_ERROR);
        }
    }
}
