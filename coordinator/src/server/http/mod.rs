//! The operator's web surface (`[http]` in `coordinator.toml`): a read-only dashboard, the live
//! `status.json`, Prometheus `/metrics`, and admin actions behind a bearer token.
//!
//! | route                          | what                                                    |
//! |--------------------------------|---------------------------------------------------------|
//! | `GET /`                        | the dashboard (HTML, JS and SVG in the binary)          |
//! | `GET /status.json`             | this process's [`Status`], as the dashboard reads it    |
//! | `GET /metrics`                 | the same figures in Prometheus's text format            |
//! | `GET /healthz`                 | `ok` while the driver answers                           |
//! | `POST /admin/pause`, `/resume` | start no new round / start rounds again                 |
//! | `POST /admin/revoke/{name}`    | refuse an institution from now on (its sessions end)    |
//! | `POST /admin/reinstate/{name}` | take it off the operator's revoked list                 |
//!
//! Every answer comes from the driver (a [`Query`]), so what a page shows is the core's state at
//! one instant. Admin actions are operator decisions in the core
//! ([`OperatorAction`]): journalled or replicated like everything else. On a replica that does
//! not lead they are refused with the leader's address.

mod metrics;

use std::sync::Arc;

use amity_protocol::message::{ErrorCode, ServerMsg};
use amity_protocol::tls::is_valid_name;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};

use crate::core::OperatorAction;

use super::shared::Shared;
use super::{Query, Status};

/// The dashboard page.
const DASHBOARD: &str = include_str!("dashboard.html");

/// What the handlers share.
#[derive(Clone)]
struct Web {
    shared: Arc<Shared>,
    /// The admin bearer token; `None`: admin actions are refused.
    token: Option<Arc<str>>,
}

/// Serves the operator's web surface on `listener` until the task is aborted.
pub(super) fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    token: Option<String>,
) -> tokio::task::JoinHandle<()> {
    let web = Web {
        shared,
        token: token.map(Arc::from),
    };
    let app = Router::new()
        .route("/", get(dashboard))
        .route("/status.json", get(status_json))
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .route("/admin/pause", post(pause))
        .route("/admin/resume", post(resume))
        .route("/admin/revoke/{name}", post(revoke))
        .route("/admin/reinstate/{name}", post(reinstate))
        .with_state(web);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("dashboard server stopped: {e}");
        }
    })
}

async fn dashboard() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], Html(DASHBOARD))
}

/// The driver's current status (`None`: it is gone, the coordinator is stopping).
async fn ask_status(shared: &Shared) -> Option<Status> {
    // The release listing is re-read here if the folder changed (the driver only reads the
    // cached one).
    shared.releases.current().await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    shared.queries.send(Query::Dashboard(tx)).ok()?;
    rx.await.ok().map(|s| *s)
}

fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the coordinator is stopping\n",
    )
        .into_response()
}

async fn status_json(State(web): State<Web>) -> Response {
    match ask_status(&web.shared).await {
        Some(s) => ([(header::CACHE_CONTROL, "no-store")], axum::Json(s)).into_response(),
        None => unavailable(),
    }
}

async fn metrics_page(State(web): State<Web>) -> Response {
    match ask_status(&web.shared).await {
        Some(s) => (
            [(header::CONTENT_TYPE, amity_protocol::metrics::CONTENT_TYPE)],
            metrics::render(&s),
        )
            .into_response(),
        None => unavailable(),
    }
}

async fn healthz(State(web): State<Web>) -> Response {
    match ask_status(&web.shared).await {
        Some(_) => "ok\n".into_response(),
        None => unavailable(),
    }
}

async fn pause(State(web): State<Web>, headers: HeaderMap) -> Response {
    decide(&web, &headers, OperatorAction::Pause).await
}

async fn resume(State(web): State<Web>, headers: HeaderMap) -> Response {
    decide(&web, &headers, OperatorAction::Resume).await
}

async fn revoke(State(web): State<Web>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    decide(&web, &headers, OperatorAction::Revoke { name }).await
}

async fn reinstate(
    State(web): State<Web>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    decide(&web, &headers, OperatorAction::Reinstate { name }).await
}

/// Checks the bearer token, then hands the decision to the driver and reports its answer.
async fn decide(web: &Web, headers: &HeaderMap, action: OperatorAction) -> Response {
    let Some(token) = &web.token else {
        return (
            StatusCode::FORBIDDEN,
            "admin actions are off: set [http] admin_token_file in coordinator.toml\n",
        )
            .into_response();
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !presented.is_some_and(|p| same_secret(p.as_bytes(), token.as_bytes())) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a valid `Authorization: Bearer <token>` header is needed\n",
        )
            .into_response();
    }
    if let OperatorAction::Revoke { name } | OperatorAction::Reinstate { name } = &action
        && !is_valid_name(name)
    {
        return (
            StatusCode::BAD_REQUEST,
            format!("`{name}` is not a certificate name (1-64 of A-Z a-z 0-9 . _ -)\n"),
        )
            .into_response();
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    if web
        .shared
        .queries
        .send(Query::Operator(action.clone(), tx))
        .is_err()
    {
        return unavailable();
    }
    match rx.await {
        Ok(ServerMsg::Status(_)) => {
            tracing::info!(%action, "admin action carried out");
            (StatusCode::OK, format!("{action}: done\n")).into_response()
        }
        Ok(ServerMsg::Error {
            code: ErrorCode::NotLeader,
            message,
        }) => {
            let leader = if message.is_empty() {
                "none is known yet".to_owned()
            } else {
                format!("it is {message}")
            };
            (
                StatusCode::CONFLICT,
                format!("this replica does not lead ({leader}): use the leader's dashboard\n"),
            )
                .into_response()
        }
        Ok(ServerMsg::Error { message, .. }) => {
            (StatusCode::BAD_REQUEST, format!("{action}: {message}\n")).into_response()
        }
        Ok(_) | Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{action}: not carried out (the coordinator is stopping, or this replica lost \
                 its leadership before the decision committed); ask again\n"
            ),
        )
            .into_response(),
    }
}

/// Compares two secrets in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_compared_whole() {
        assert!(same_secret(b"abcdef0123456789", b"abcdef0123456789"));
        assert!(!same_secret(b"abcdef0123456789", b"abcdef0123456788"));
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
