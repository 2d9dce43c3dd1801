//! The three HTTP faces of a node: the public API, the internal port peers forward
//! to, and the admin port for probes and metrics.

mod admin;
mod error;
mod events;
mod guard;
mod input;
mod internal;
mod ledger;
mod limits;
mod observe;
mod problem;
pub(crate) mod views;
mod wallets;
mod webhooks;

pub use error::ApiError;
pub use guard::{Authentication, Rate, RateLimiters, RateLimits};
pub use observe::HttpMetrics;
pub use problem::Problem;
pub use views::{OperationPage, OperationView, WalletView};

use std::sync::Arc;

use salvo::catcher::Catcher;
use salvo::oapi::security::{Http, HttpAuthScheme, SecurityScheme};
use salvo::oapi::swagger_ui::SwaggerUi;
use salvo::oapi::{Info, OpenApi, RouterExt};
use salvo::prelude::*;
use wallet_cluster::Cluster;

use crate::auth::Scope;
use crate::executor::ExecutorPool;
use crate::routing::OperationRouter;
use crate::store::Store;
use guard::{Guard, RateClass};
use observe::{Observe, RouteTemplate};

pub const OPENAPI_PATH: &str = "/api-doc/openapi.json";

/// Shared state of the handlers, put into every request's depot.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub router: Arc<OperationRouter>,
    pub executors: Arc<ExecutorPool>,
    pub cluster: Arc<Cluster>,
    /// The database as the health monitor last saw it.
    pub health: tokio::sync::watch::Receiver<crate::health::DatabaseHealth>,
    pub max_body_bytes: usize,
    /// How long a write may wait to be planned by its shard's owner.
    pub request_deadline: std::time::Duration,
    /// How long a transfer's answer waits for its credit before it says PENDING.
    pub transfer_credit_wait: std::time::Duration,
    /// The last bound on any request's handler.
    pub handler_timeout: std::time::Duration,
    /// Checks the signatures of internal requests.
    pub internal_auth: Arc<crate::internal_auth::Verifier>,
    /// How public callers are authenticated.
    pub authentication: Arc<Authentication>,
    pub rate_limiters: Arc<RateLimiters>,
    pub registry: prometheus::Registry,
    /// Wakes long polls and streams when events may have arrived.
    pub event_tail: crate::events::EventTail,
    /// What webhook creation checks and a manual retry grants.
    pub webhooks: crate::config::WebhooksConfig,
}

/// The handlers' shared state; without it (a wiring bug) the answer is an opaque 500.
fn app_state(depot: &Depot, res: &mut Response) -> Option<AppState> {
    let state = depot.get_typed::<AppState>().ok().cloned();
    if state.is_none() {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal-error",
            "Internal error",
            "state missing",
        )
        .write_to(res);
    }
    state
}

/// A route whose metrics label is its template (`{wallet_id}`), never the raw path.
fn route(template: &'static str) -> Router {
    Router::with_path(template.trim_start_matches('/')).hoop(RouteTemplate(template))
}

/// A public route behind its guard: a bearer token with `scope`, within the tenant's
/// rate for `class`; the OpenAPI document declares the same.
fn guarded(template: &'static str, scope: Scope, class: RateClass) -> Router {
    route(template)
        .hoop(Guard::new(Some(scope), class))
        .oapi_security(guard::security(scope))
}

/// The versioned public API, without docs; the OpenAPI document is generated from it.
pub fn api_router() -> Router {
    let read = |template| guarded(template, Scope::WalletsRead, RateClass::Read);
    Router::new()
        .push(
            guarded("/api/v1/wallets", Scope::WalletsCreate, RateClass::Create)
                .post(wallets::create_wallet),
        )
        // The scope depends on the operation's type, in the body: the handler checks it.
        .push(
            route("/api/v1/wallet")
                .hoop(Guard::new(None, RateClass::Write))
                .oapi_security(guard::security(Scope::WalletsDeposit))
                .oapi_security(guard::security(Scope::WalletsWithdraw))
                .post(wallets::post_operation),
        )
        .push(read("/api/v1/wallets/{wallet_id}").get(wallets::get_wallet))
        .push(
            guarded(
                "/api/v1/wallets/{wallet_id}",
                Scope::WalletsAdmin,
                RateClass::Write,
            )
            .patch(ledger::patch_wallet),
        )
        .push(read("/api/v1/wallets/{wallet_id}/balance").get(ledger::balance_at))
        .push(
            guarded(
                "/api/v1/wallets/{wallet_id}/holds",
                Scope::HoldsWrite,
                RateClass::Write,
            )
            .post(ledger::create_hold),
        )
        .push(read("/api/v1/holds/{hold_id}").get(ledger::get_hold))
        .push(
            guarded(
                "/api/v1/holds/{hold_id}/capture",
                Scope::HoldsWrite,
                RateClass::Write,
            )
            .post(ledger::capture_hold),
        )
        .push(
            guarded(
                "/api/v1/holds/{hold_id}/void",
                Scope::HoldsWrite,
                RateClass::Write,
            )
            .post(ledger::void_hold),
        )
        .push(
            guarded("/api/v1/transfers", Scope::TransfersWrite, RateClass::Write)
                .post(ledger::post_transfer),
        )
        .push(read("/api/v1/transfers/{transfer_id}").get(ledger::get_transfer))
        .push(
            guarded("/api/v1/events", Scope::EventsRead, RateClass::Read).get(events::list_events),
        )
        .push(
            guarded("/api/v1/events/stream", Scope::EventsRead, RateClass::Read)
                .get(events::stream_events),
        )
        .push(
            guarded("/api/v1/webhooks", Scope::WebhooksAdmin, RateClass::Write)
                .post(webhooks::create_webhook),
        )
        .push(
            guarded("/api/v1/webhooks", Scope::WebhooksAdmin, RateClass::Read)
                .get(webhooks::list_webhooks),
        )
        .push(
            guarded(
                "/api/v1/webhooks/{webhook_id}",
                Scope::WebhooksAdmin,
                RateClass::Write,
            )
            .delete(webhooks::delete_webhook),
        )
        .push(
            guarded(
                "/api/v1/webhooks/{webhook_id}/deliveries",
                Scope::WebhooksAdmin,
                RateClass::Read,
            )
            .get(webhooks::list_deliveries),
        )
        .push(
            guarded(
                "/api/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/retry",
                Scope::WebhooksAdmin,
                RateClass::Write,
            )
            .post(webhooks::retry_delivery),
        )
        .push(read("/api/v1/wallets/{wallet_id}/operations").get(wallets::list_operations))
        .push(
            read("/api/v1/wallets/{wallet_id}/operations/{operation_id}")
                .get(wallets::get_operation),
        )
}

pub fn openapi() -> OpenApi {
    OpenApi::with_info(
        Info::new("Wallet service", env!("CARGO_PKG_VERSION")).description(
            "Exact-money wallets: create, deposit, withdraw, transfers, holds, overdraft limits, \
             balances now and at any past point, and a full audit trail. \
             Every operation needs `Authorization: Bearer <JWT>` with the scopes it lists; \
             wallets belong to the tenant of the token that created them.",
        ),
    )
    .add_security_scheme(
        guard::BEARER,
        SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer).bearer_format("JWT")),
    )
    .merge_router(&api_router())
}

fn service(router: Router, state: AppState, metrics: HttpMetrics, port: &'static str) -> Service {
    let router = Router::new()
        .hoop(Observe::new(metrics, port))
        .hoop(limits::HandlerTimeout::new(state.handler_timeout))
        .hoop(salvo::affix_state::inject(state))
        .push(router);
    Service::new(router).catcher(Catcher::default().hoop(observe::problem_catcher))
}

pub fn public_service(state: AppState, metrics: HttpMetrics) -> Service {
    let doc = openapi();
    let router = Router::new()
        .push(api_router())
        .push(doc.into_router(OPENAPI_PATH))
        .push(SwaggerUi::new(OPENAPI_PATH).into_router("swagger-ui"));
    service(router, state, metrics, "public")
}

pub fn internal_service(state: AppState, metrics: HttpMetrics) -> Service {
    let router = Router::new()
        .push(route(crate::routing::INTERNAL_OPERATIONS_PATH).post(internal::execute_operation))
        .push(route(crate::routing::INTERNAL_READS_PATH).post(internal::read_wallets));
    service(router, state, metrics, "internal")
}

pub fn admin_service(state: AppState, metrics: HttpMetrics) -> Service {
    let router = Router::new()
        .push(route("/healthz").get(admin::healthz))
        .push(route("/readyz").get(admin::readyz))
        .push(route("/metrics").get(admin::metrics))
        .push(route("/cluster").get(admin::cluster))
        .push(route("/cluster/owner/{wallet_id}").get(admin::owner));
    service(router, state, metrics, "admin")
}
