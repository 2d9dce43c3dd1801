//! Request id, tracing span, trace context and metrics around every request.

use std::time::Instant;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use salvo::http::header::{HeaderMap, HeaderValue};
use salvo::prelude::*;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::problem::Problem;

pub const REQUEST_ID: &str = "x-request-id";
const ROUTE_KEY: &str = "route-template";
const MAX_REQUEST_ID_LEN: usize = 128;

#[derive(Clone)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl HttpMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let labels = ["route", "method", "status"];
        let requests = IntCounterVec::new(
            Opts::new(
                "wallet_http_requests_total",
                "HTTP requests by route template, method and status",
            ),
            &labels,
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "wallet_http_request_duration_seconds",
                "HTTP request latency by route template",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &labels,
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Self { requests, duration })
    }
}

/// Marks a route with its template, so metrics never carry raw paths (and ids).
pub struct RouteTemplate(pub &'static str);

#[async_trait]
impl Handler for RouteTemplate {
    async fn handle(
        &self,
        _req: &mut Request,
        depot: &mut Depot,
        _res: &mut Response,
        _ctrl: &mut FlowCtrl,
    ) {
        depot.insert(ROUTE_KEY, self.0);
    }
}

pub struct Observe {
    metrics: HttpMetrics,
    port: &'static str,
}

impl Observe {
    pub fn new(metrics: HttpMetrics, port: &'static str) -> Self {
        Self { metrics, port }
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}

fn request_id(req: &Request) -> String {
    req.headers()
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_LEN
                && id.bytes().all(|b| b.is_ascii_graphic())
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

#[async_trait]
impl Handler for Observe {
    async fn handle(
        &self,
        req: &mut Request,
        depot: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        let started = Instant::now();
        let request_id = request_id(req);
        let method = req.method().as_str().to_owned();
        let span = tracing::info_span!(
            "request",
            request_id = %request_id,
            method = %method,
            path = %req.uri().path(),
            port = self.port,
        );
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
        let _ = span.set_parent(parent);
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            res.headers_mut().insert(REQUEST_ID, value);
        }
        ctrl.call_next(req, depot, res)
            .instrument(span.clone())
            .await;

        let status = res.status_code.unwrap_or(StatusCode::OK);
        // To the trace only. Recording a field on the span would have the JSON log layer
        // parse and re-serialize the span's fields on every request (5% of a node's CPU
        // under reads); the finishing event below carries the status for the log.
        span.set_attribute("http.response.status_code", i64::from(status.as_u16()));
        let route = depot
            .get::<&'static str>(ROUTE_KEY)
            .copied()
            .unwrap_or("unmatched");
        let labels = [route, method.as_str(), status.as_str()];
        let elapsed = started.elapsed();
        self.metrics.requests.with_label_values(&labels).inc();
        self.metrics
            .duration
            .with_label_values(&labels)
            .observe(elapsed.as_secs_f64());
        span.in_scope(|| {
            tracing::debug!(
                status = status.as_u16(),
                elapsed_ms = elapsed.as_secs_f64() * 1e3,
                "request finished"
            );
        });
    }
}

/// Answers errors that no handler wrote (unknown route, wrong method, panics) as problems.
#[handler]
pub async fn problem_catcher(res: &mut Response, ctrl: &mut FlowCtrl) {
    if !res.body.is_none() {
        return;
    }
    let status = res.status_code.unwrap_or(StatusCode::NOT_FOUND);
    let problem = match status {
        StatusCode::NOT_FOUND => {
            Problem::new(status, "not-found", "Not found", "no resource at this path")
        }
        StatusCode::METHOD_NOT_ALLOWED => Problem::new(
            status,
            "method-not-allowed",
            "Method not allowed",
            "this path does not take this method",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => Problem::new(
            status,
            "payload-too-large",
            "Request body too large",
            "the request body is too large",
        ),
        status if status.is_server_error() => {
            tracing::error!(
                status = status.as_u16(),
                "request failed without an error body"
            );
            Problem::new(
                status,
                "internal-error",
                "Internal error",
                "the request could not be completed",
            )
        }
        status => Problem::new(
            status,
            "http-error",
            status.canonical_reason().unwrap_or("Error"),
            "the request could not be handled",
        ),
    };
    problem.write_to(res);
    ctrl.skip_rest();
}
