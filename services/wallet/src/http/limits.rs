//! The per-request handler timeout, the last bound on any request.
//!
//! Writes bound their own time (the router answers or gives up before this fires),
//! so on a write this only fires on a bug; it then closes the connection instead of
//! answering, because a 5xx would claim the write was not applied. A read that takes
//! too long is answered 503.

use std::time::Duration;

use salvo::http::Method;
use salvo::prelude::*;

use super::problem::Problem;

const EVENTS_PATH: &str = "/api/v1/events";

pub struct HandlerTimeout {
    limit: Duration,
}

impl HandlerTimeout {
    pub fn new(limit: Duration) -> Self {
        Self { limit }
    }
}

#[async_trait]
impl Handler for HandlerTimeout {
    async fn handle(
        &self,
        req: &mut Request,
        depot: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        // A long poll bounds itself (30 s at most, then one read); a stream's handler
        // returns as soon as its body starts.
        if req.uri().path().starts_with(EVENTS_PATH) {
            ctrl.call_next(req, depot, res).await;
            return;
        }
        let write = req.method() != Method::GET && req.method() != Method::HEAD;
        if tokio::time::timeout(self.limit, ctrl.call_next(req, depot, res))
            .await
            .is_ok()
        {
            return;
        }
        ctrl.skip_rest();
        tracing::error!(
            limit_ms = self.limit.as_millis() as u64,
            write,
            "handler timeout"
        );
        if write {
            ctrl.conn().abort();
        }
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service-unavailable",
            "Service unavailable",
            "the request took too long; nothing was changed",
        )
        .write_to(res);
    }
}
