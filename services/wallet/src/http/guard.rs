//! The gate in front of every public route: who is calling (bearer token), may they
//! (scope), and is their tenant within its rate (token bucket). Answers 401, 403 and 429
//! before anything is read or written.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::clock::{Clock, MonotonicClock};
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

/// A tenant's token buckets, on the operating system's monotonic clock rather than
/// governor's default (quanta's TSC reading, which is only as steady as the TSC a thread
/// happens to read in a VM); one 429 at 2% of the rate was seen in a fault test.
type TenantLimiter = RateLimiter<
    Tenant,
    DashMapStateStore<Tenant>,
    MonotonicClock,
    governor::middleware::NoOpMiddleware<std::time::Instant>,
>;
use salvo::http::header::AUTHORIZATION;
use salvo::oapi::security::SecurityRequirement;
use salvo::prelude::*;

use super::error::ApiError;
use crate::auth::{AuthError, Authenticator, Principal, Scope, Tenant};

/// How callers are authenticated, as the handlers see it.
pub enum Authentication {
    Jwt(Authenticator),
    /// Authentication off: everyone is this principal.
    Off(Principal),
}

impl Authentication {
    async fn principal(&self, req: &Request) -> Result<Principal, AuthError> {
        match self {
            Self::Off(principal) => Ok(principal.clone()),
            Self::Jwt(authenticator) => {
                let header = req.headers().get(AUTHORIZATION).ok_or(AuthError::Missing)?;
                let token = header
                    .to_str()
                    .ok()
                    .and_then(|value| {
                        let (scheme, token) = value.split_once(' ')?;
                        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
                    })
                    .filter(|token| !token.is_empty())
                    .ok_or_else(|| {
                        AuthError::Invalid("expected `Authorization: Bearer <token>`".to_owned())
                    })?;
                authenticator.authenticate(token).await
            }
        }
    }
}

/// The kinds of request a tenant's rate is counted for separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateClass {
    Read,
    Write,
    Create,
}

/// A token bucket: a steady rate and the burst it allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    quota: Quota,
}

impl Rate {
    /// `None` when either is zero (no limit).
    pub fn new(per_second: u32, burst: u32) -> Option<Self> {
        let quota =
            Quota::per_second(NonZeroU32::new(per_second)?).allow_burst(NonZeroU32::new(burst)?);
        Some(Self { quota })
    }
}

/// Limits per tenant, by class; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default)]
pub struct RateLimits {
    pub read: Option<Rate>,
    pub write: Option<Rate>,
    pub create: Option<Rate>,
}

/// The buckets of this node. Per node on purpose: a cluster-wide bucket would put a
/// Redis round trip on every request; with requests spread over N nodes the cluster
/// allows about N times the configured rate.
pub struct RateLimiters {
    read: Option<TenantLimiter>,
    write: Option<TenantLimiter>,
    create: Option<TenantLimiter>,
    clock: MonotonicClock,
    /// Checks so far; the bucket count is looked at only every `SWEEP_EVERY` checks,
    /// because counting walks every shard of the map.
    checks: AtomicU64,
}

/// Buckets kept before idle ones are dropped (a full bucket is the same as none).
const TENANTS_KEPT: usize = 10_000;
/// How often (in checks) the bucket count is compared with `TENANTS_KEPT`.
const SWEEP_EVERY: u64 = 1024;

impl RateLimiters {
    pub fn new(limits: RateLimits) -> Self {
        let limiter = |rate: Option<Rate>| {
            rate.map(|rate| RateLimiter::dashmap_with_clock(rate.quota, MonotonicClock))
        };
        Self {
            read: limiter(limits.read),
            write: limiter(limits.write),
            create: limiter(limits.create),
            clock: MonotonicClock,
            checks: AtomicU64::new(0),
        }
    }

    fn check(&self, class: RateClass, tenant: &Tenant) -> Result<(), ApiError> {
        let limiter = match class {
            RateClass::Read => &self.read,
            RateClass::Write => &self.write,
            RateClass::Create => &self.create,
        };
        let Some(limiter) = limiter else {
            return Ok(());
        };
        let checks = self.checks.fetch_add(1, Ordering::Relaxed);
        if checks.is_multiple_of(SWEEP_EVERY) && limiter.len() > TENANTS_KEPT {
            limiter.retain_recent();
        }
        limiter.check_key(tenant).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            ApiError::RateLimited {
                retry_after_seconds: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            }
        })
    }
}

/// One route's gate. The scope is `None` where the handler decides it (an operation's
/// scope depends on its type, read from the body).
pub struct Guard {
    scope: Option<Scope>,
    class: RateClass,
}

impl Guard {
    pub fn new(scope: Option<Scope>, class: RateClass) -> Self {
        Self { scope, class }
    }
}

#[async_trait]
impl Handler for Guard {
    async fn handle(
        &self,
        req: &mut Request,
        depot: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        let checked = match depot.get_typed::<super::AppState>() {
            Ok(state) => self.check(state, req).await,
            Err(_) => Err(ApiError::Unexpected(anyhow::anyhow!(
                "application state missing from the depot"
            ))),
        };
        match checked {
            Ok(principal) => {
                depot.insert_typed(principal);
            }
            Err(error) => {
                ctrl.skip_rest();
                error.write(req, depot, res).await;
            }
        }
    }
}

impl Guard {
    async fn check(&self, state: &super::AppState, req: &Request) -> Result<Principal, ApiError> {
        let principal = state.authentication.principal(req).await?;
        if let Some(scope) = self.scope {
            require(&principal, scope)?;
        }
        state.rate_limiters.check(self.class, &principal.tenant)?;
        Ok(principal)
    }
}

/// 403 unless the caller has `scope`.
pub fn require(principal: &Principal, scope: Scope) -> Result<(), ApiError> {
    if principal.scopes.contains(scope) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(scope))
    }
}

/// The caller the route's guard let through.
pub fn principal(depot: &Depot) -> Result<&Principal, ApiError> {
    depot.get_typed::<Principal>().map_err(|_| {
        ApiError::Unexpected(anyhow::anyhow!(
            "the route has no guard: no caller in the depot"
        ))
    })
}

/// The OpenAPI name of the bearer scheme.
pub const BEARER: &str = "bearer";

pub fn security(scope: Scope) -> SecurityRequirement {
    SecurityRequirement::new(BEARER, [scope.as_str()])
}
