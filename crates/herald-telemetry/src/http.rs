//! `/metrics`, `/healthz` and `/readyz` over HTTP, for `herald relay --http-addr` and for
//! services that run relays and consumers in-process.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use herald_core::telemetry::{Health, Report, Thresholds};
use serde::Serialize;

use crate::Metrics;

/// The endpoints to serve. Without a relay, `/healthz` and `/readyz` answer 200 as long as
/// the process serves HTTP; without metrics, `/metrics` answers 404.
#[derive(Clone, Default)]
pub struct Endpoints {
    metrics: Option<Metrics>,
    relays: Vec<(Arc<Health>, Thresholds)>,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field("metrics", &self.metrics.is_some())
            .field("relays", &self.relays.len())
            .finish()
    }
}

/// `/healthz` and `/readyz`'s body: the overall status and each relay's report.
#[derive(Serialize)]
struct Body {
    status: &'static str,
    relays: Vec<Report>,
}

impl Endpoints {
    /// No endpoint yet: add [`metrics`](Self::metrics) and [`relay`](Self::relay).
    pub fn new() -> Endpoints {
        Endpoints::default()
    }

    /// Serves `metrics` at `/metrics`.
    pub fn metrics(mut self, metrics: Metrics) -> Endpoints {
        self.metrics = Some(metrics);
        self
    }

    /// Makes `/healthz` and `/readyz` answer for a relay ([`herald_core::Relay::health`] and
    /// [`herald_core::Relay::thresholds`]). Several relays may be added; each must pass.
    pub fn relay(mut self, health: Arc<Health>, thresholds: Thresholds) -> Endpoints {
        self.relays.push((health, thresholds));
        self
    }

    /// The readiness of every relay added, as `/readyz` reports it.
    pub fn readiness(&self) -> (bool, Vec<Report>) {
        self.check(Health::readiness)
    }

    fn check(&self, f: fn(&Health, &Thresholds) -> Report) -> (bool, Vec<Report>) {
        let reports: Vec<Report> = self.relays.iter().map(|(h, t)| f(h, t)).collect();
        (reports.iter().all(Report::is_ok), reports)
    }

    /// An axum router with the three routes, to mount in an application's own server.
    pub fn router(self) -> Router {
        Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(Arc::new(self))
    }

    /// Serves the router on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }
}

async fn metrics(State(e): State<Arc<Endpoints>>) -> Response {
    match &e.metrics {
        Some(m) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            m.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}

fn answer((ok, relays): (bool, Vec<Report>)) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Body {
        status: if ok { "ok" } else { "unavailable" },
        relays,
    };
    (status, axum::Json(body)).into_response()
}

async fn healthz(State(e): State<Arc<Endpoints>>) -> Response {
    answer(e.check(Health::liveness))
}

async fn readyz(State(e): State<Arc<Endpoints>>) -> Response {
    answer(e.check(Health::readiness))
}
